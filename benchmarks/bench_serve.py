"""Load test of ``cosytune serve`` over loopback HTTP: N concurrent streaming clients, bounded in count and time.

The benchmark starts the server itself (``python -m cosytune serve`` on 127.0.0.1, a free port), waits for
``/health``, sends one warm-up request, then for each level of ``--concurrency`` runs that many client
threads that together send ``--requests`` streaming ``POST /v1/tts`` requests (``response_format=pcm``). Per
request it times the first audio byte (first chunk), the whole response and the audio length. Nothing is
retried: a refused (429), failed or short request counts as an error, so "none dropped" means errors == 0.

Reported (JSON with ``--out``, and a table): per level, first-chunk p50/p95, total p50/p95, aggregate x real
time (audio seconds per wall second), errors with their reasons; the server's load time and /metrics.

GPU (full-size model dir with a speaker; the server's defaults: bf16, graphed decoder/flow/vocoder, warm-up):
    python benchmarks/bench_serve.py --model_dir models/alice --device cuda \\
        --concurrency 1,8,16 --requests 32 --out bench_serve.json
Without --model_dir a random model dir of --preset is built, with a zero-shot speaker from the shipped sample.
CPU smoke run (tiny model):
    python benchmarks/bench_serve.py --preset tiny --device cpu --concurrency 1,2 --requests 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

TEXT = ("The quick brown fox jumps over the lazy dog while the morning sun rises slowly above the quiet hills, "
        "and somewhere in the valley a small bell begins to ring.")
PROMPT_CLIP = "agent-user.mp3"
PROMPT_TEXT = ("You are a helpful assistant.<|endofprompt|>"
               "Agent login. Please enter your agent number followed by the pound key.")
SAMPLE_RATE = 24000

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_api import pct, summary  # noqa: F401  (one percentile rule for both public-API benchmarks)
from serve_helpers import ServerProcess  # the serve tests' way to start the server and wait for /health


def build_model_dir(preset: str) -> Path:
    """A random model dir of ``preset`` with one zero-shot speaker (``bench``) from the shipped sample."""
    from cosytune.cli.main import main as cli
    from cosytune.modeldir.presets import write_model_dir

    d = write_model_dir(Path(tempfile.mkdtemp(prefix="bench_serve_")) / preset, preset=preset)
    clip = Path(str(files("cosytune") / "assets" / "sample_speaker" / "audio" / PROMPT_CLIP))
    rc = cli(["spk2info", "--model_dir", str(d), "--spk_id", "bench", "--prompt_wav", str(clip),
              "--prompt_text", PROMPT_TEXT])
    if rc != 0:
        raise SystemExit(f"could not add a speaker to {d} (exit {rc})")
    return d


def one_stream(url: str, voice: str, seed: int, timeout_s: float) -> dict[str, Any]:
    """One streaming request; first-chunk and total seconds, audio seconds, or the error."""
    import httpx

    t0 = time.perf_counter()
    first = None
    size = 0
    try:
        with httpx.stream("POST", url + "/v1/tts", timeout=timeout_s,
                          json={"text": TEXT, "spk_id": voice, "seed": seed, "stream": True,
                                "response_format": "pcm"}) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {r.read()[:200].decode(errors='replace')}"}
            for piece in r.iter_raw():
                if piece and first is None:
                    first = time.perf_counter() - t0
                size += len(piece)
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    total = time.perf_counter() - t0
    if size < 2 or first is None:
        return {"error": "empty response"}
    return {"first_chunk_s": first, "total_s": total, "audio_s": size / 2 / SAMPLE_RATE}


def level(url: str, voice: str, clients: int, requests: int, timeout_s: float) -> dict[str, Any]:
    """``clients`` threads sending ``requests`` streaming requests in all."""
    lock = threading.Lock()
    todo = list(range(requests))
    results: list[dict[str, Any]] = []

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            r = one_stream(url, voice, 1000 + i, timeout_s)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s * (requests // clients + 1))
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r] + ["not finished"] * (requests - len(results))
    return {"clients": clients, "requests": requests, "ok": len(ok), "errors": errors, "wall_s": wall,
            "first_chunk_s": summary([r["first_chunk_s"] for r in ok]),
            "total_s": summary([r["total_s"] for r in ok]),
            "audio_s": sum(r["audio_s"] for r in ok),
            "x_real_time": sum(r["audio_s"] for r in ok) / wall if wall > 0 else None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", type=Path, default=None, help="a model dir with a speaker (default: build --preset)")
    p.add_argument("--preset", choices=["tiny", "full"], default="tiny")
    p.add_argument("--voice", default=None, help="spk_id to request (default: the server's first speaker)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="server --dtype (default: the server's default, auto)")
    p.add_argument("--concurrency", default="1,8,16", help="comma-separated concurrent client counts")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default: 2 x clients)")
    p.add_argument("--workers", type=int, default=None, help="server --workers (default: the largest level)")
    p.add_argument("--server_args", default="", help="more 'cosytune serve' flags, e.g. '--no_fast_flow'")
    p.add_argument("--request_timeout", type=float, default=300.0, help="seconds per request before it counts as lost")
    p.add_argument("--startup_timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    import httpx

    from cosytune.fileio import write_json

    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise SystemExit("--concurrency needs positive integers, e.g. 1,8,16")
    model_dir = args.model_dir or build_model_dir(args.preset)
    workers = args.workers or max(levels)
    log = Path(tempfile.mkdtemp(prefix="bench_serve_log_")) / "server.log"
    try:
        server = ServerProcess(["--model_dir", str(model_dir), "--device", args.device, "--dtype", args.dtype,
                                "--workers", str(workers), "--max_queue", str(max(levels)),
                                "--request_timeout", str(args.request_timeout), *args.server_args.split()], log,
                               timeout_s=args.startup_timeout)
    except RuntimeError as e:  # it exited, or never answered /health: its log says why
        raise SystemExit(str(e)) from None
    try:
        health = httpx.get(server.url + "/health", timeout=10).json()
        voices = httpx.get(server.url + "/v1/speakers", timeout=10).json()["speakers"]
        voice = args.voice or (voices[0] if voices else None)
        if voice is None:
            raise SystemExit(f"{model_dir} has no speakers (spk2info.pt); add one with 'cosytune spk2info' or leave "
                             "out --model_dir to build a model with one")
        warm = one_stream(server.url, voice, 1, args.request_timeout)
        out: dict[str, Any] = {"device": health["device"], "model_dir": str(model_dir),
                               "dtype": health.get("dtype", args.dtype), "workers": workers,
                               "server_start_s": server.start_s, "warmup": warm, "levels": []}
        for c in levels:
            out["levels"].append(level(server.url, voice, c, args.requests or 2 * c, args.request_timeout))
        out["metrics"] = httpx.get(server.url + "/metrics", timeout=10).text
    finally:
        server.stop()
    if args.device.startswith("cuda") or (args.device == "auto" and out["device"].startswith("cuda")):
        try:
            import torch

            out["gpu"] = torch.cuda.get_device_name()
        except (ImportError, RuntimeError):
            pass
    if args.out:
        write_json(args.out, out)
    print(f"cosytune serve on {out.get('gpu', out['device'])} ({out['dtype']}, {workers} workers), "
          f"server up in {server.start_s:.1f} s")
    for lv in out["levels"]:
        fc, tt = lv["first_chunk_s"], lv["total_s"]
        f = (lambda x: "-" if x is None else f"{x:.3f}")
        print(f"  {lv['clients']:>3} streams  {lv['ok']}/{lv['requests']} ok  first chunk p50 {f(fc['p50'])} s "
              f"p95 {f(fc['p95'])} s  total p50 {f(tt['p50'])} s p95 {f(tt['p95'])} s  "
              f"{lv['x_real_time'] or 0:.2f}x real time  errors {len(lv['errors'])}")
    return out


if __name__ == "__main__":
    main()
