"""The speed users get: the public API only (``Synthesizer.from_dir`` + ``synthesize`` / ``stream``), with
the settings ``cosytune infer`` uses by default unless told otherwise (issue #14's measurement).

Nothing here reaches past the public API: no hand-built decoder, flow or vocoder path. A request is a
zero-shot request with a prompt clip from the shipped sample (so the prompt front end is paid, as by
``cosytune infer --prompt_wav``) and a ~125-token English text, RAS sampling and text normalisation on.

Reported (JSON with ``--out`` and a table):
  * load time; the first request after load (non-streaming and streaming first chunk): "cold";
  * warm non-streaming: per-request total, RTF, LLM ms/token, p50/p95 over ``--requests``;
  * warm streaming: first-chunk latency and RTF, p50/p95;
  * concurrent streaming for each of ``--concurrency`` (threads sharing one Synthesizer): first-chunk
    p50/p95, aggregate x real time, errors.

GPU (full-size random model dir):
    python benchmarks/bench_api.py --preset full --device cuda --dtype bfloat16 --requests 20 \\
        --concurrency 1,16 --out bench_api.json
CPU smoke run (tiny model):
    python benchmarks/bench_api.py --preset tiny --device cpu --requests 2 --concurrency 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from cosytune.fileio import write_json
from cosytune.infer.synthesizer import SynthesisOptions, Synthesizer

TEXT = ("The quick brown fox jumps over the lazy dog while the morning sun rises slowly above the quiet hills, "
        "and somewhere in the valley a small bell begins to ring, calling the villagers to gather for the "
        "market, where fresh bread, ripe apples and warm tea are waiting for everyone who arrives early.")
LONG_TEXT = " ".join([TEXT] * 3)
PROMPT_CLIP = "agent-user.mp3"
PROMPT_TEXT = "You are a helpful assistant.<|endofprompt|>Please enter the extension of the person you are calling."


def pct(xs: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of ``xs``; None when empty."""
    if not xs:
        return None
    ys = sorted(xs)
    return ys[min(len(ys) - 1, max(0, round(q / 100 * (len(ys) - 1))))]


def summary(xs: list[float]) -> dict[str, float | None]:
    return {"p50": pct(xs, 50), "p95": pct(xs, 95), "mean": statistics.fmean(xs) if xs else None, "n": len(xs)}


def one_request(synth: Synthesizer, seed: int, stream: bool, prompt_wav: Path, text: str = TEXT) -> dict[str, Any]:
    """One public-API request; wall-clock figures measured around the call (and its first chunk)."""
    options = SynthesisOptions(seed=seed)
    t0 = time.perf_counter()
    if not stream:
        # The audio is on the host when synthesize returns: no device-wide sync (it would also collide
        # with another thread's graph capture).
        res = synth.synthesize(text, prompt_wav=prompt_wav, prompt_text=PROMPT_TEXT, options=options)
        total = time.perf_counter() - t0
        return {"total_s": total, "audio_s": res.duration_s, "rtf": total / res.duration_s,
                "tokens": len(res.tokens), "llm_ms_per_token": 1000 * res.timings["llm_s"] / max(len(res.tokens), 1),
                "decoder": res.info.get("llm_decoder")}
    first = None
    audio_s = 0.0
    result = None
    for chunk in synth.stream(text, prompt_wav=prompt_wav, prompt_text=PROMPT_TEXT, options=options):
        if first is None and chunk.audio.shape[0]:
            first = time.perf_counter() - t0
        audio_s += chunk.audio.shape[0] / chunk.sample_rate
        result = chunk.result if chunk.final else result
    total = time.perf_counter() - t0
    stages = {k: v for k, v in result.timings.items() if k in STAGES} if result else {}
    return {"first_chunk_s": first, "total_s": total, "audio_s": audio_s, "rtf": total / audio_s if audio_s else None,
            "tokens": len(result.tokens) if result else None, "stages": stages}


#: The per-request stage times (``SynthesisResult.timings``) the concurrent runs add up.
STAGES = ("prepare_s", "llm_s", "flow_s", "hift_s")


class GpuSampler:
    """Mean GPU utilisation (NVML: the share of time a kernel was running) between :meth:`start` and
    :meth:`stop`, sampled every 50 ms in a thread; None where NVML is not importable or the device is not
    CUDA. Unlike a profiler trace it adds no overhead to the run it watches."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples = device, []
        self._stop = threading.Event()

    def start(self) -> None:
        if self.device.type == "cuda":
            try:
                torch.cuda.utilization(self.device)
            except Exception:  # noqa: BLE001 - no NVML binding: no figure
                return
            threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append(torch.cuda.utilization(self.device))

    def stop(self) -> None:
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


def profile(synth: Synthesizer, prompt_wav: Path, top: int = 15) -> dict[str, Any]:
    """Where a warm request's time goes: the stage split of a non-streaming request (``SynthesisResult.timings``)
    and a ``torch.profiler`` trace of a warm stream (GPU busy time vs wall time, the kernels and CPU ops that
    take the most time). The profiler adds some host overhead, so its wall time is not a headline figure."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    res = synth.synthesize(TEXT, prompt_wav=prompt_wav, prompt_text=PROMPT_TEXT, options=SynthesisOptions(seed=7))
    stages = {k: v for k, v in res.timings.items() if k.endswith("_s") and k != "audio_s"}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if synth.device.type == "cuda" else [])
    t0 = time.perf_counter()
    with torch_profile(activities=acts) as prof:
        n = sum(1 for _ in synth.stream(TEXT, prompt_wav=prompt_wav, prompt_text=PROMPT_TEXT,
                                        options=SynthesisOptions(seed=8)))
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    gpu = [e for e in events if getattr(e, "device_time_total", 0) > 0 and e.device_type.name == "CUDA"]
    busy = sum(e.device_time_total for e in gpu) / 1e6

    def rows(es, key):
        return [{"name": e.key[:90], "calls": e.count, "ms": getattr(e, key) / 1e3}
                for e in sorted(es, key=lambda e: -getattr(e, key))[:top]]

    return {"stages": stages, "stream": {"wall_s": wall, "chunks": n, "gpu_busy_s": busy,
                                         "gpu_busy_frac": busy / wall if wall else None,
                                         "top_kernels": rows(gpu, "device_time_total"),
                                         "top_cpu_ops": rows(list(events), "self_cpu_time_total")}}


def concurrent(synth: Synthesizer, clients: int, per_client: int, prompt_wav: Path) -> dict[str, Any]:
    """``clients`` threads, each streaming ``per_client`` requests through the one Synthesizer."""
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for i in range(per_client):
            try:
                row = one_request(synth, 1000 * k + i, True, prompt_wav)
            except Exception as e:  # noqa: BLE001 - a benchmark counts failures instead of stopping
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                rows.append(row)

    batcher = synth.batcher
    before = batcher.stats() if batcher is not None else None
    t0 = time.perf_counter()
    gpu = GpuSampler(synth.device)
    gpu.start()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gpu.stop()
    wall = time.perf_counter() - t0
    audio = sum(r["audio_s"] for r in rows)
    out = {"clients": clients, "requests": len(rows), "errors": errors, "wall_s": wall,
           "first_chunk_s": summary([r["first_chunk_s"] for r in rows if r["first_chunk_s"] is not None]),
           "x_real_time": audio / wall if wall else None,
           # Where the requests' time went: each stage's mean per request (llm_s is time spent waiting for
           # tokens, flow_s / hift_s rendering chunks), and the GPU's mean utilisation over the run.
           "stage_mean_s": {k: statistics.fmean(r["stages"].get(k, 0.0) for r in rows) if rows else None
                            for k in STAGES},
           "gpu_util_pct": gpu.mean}
    if before is not None:
        after = batcher.stats()
        steps = after["steps"] - before["steps"]
        out["batcher"] = {"steps": steps, "rows_per_step": (after["row_steps"] - before["row_steps"]) / steps
                          if steps else None, "steps_per_s": steps / wall if wall else None,
                          # the loop's step time by phase, ms per step (see DecodeBatcher.stats)
                          "ms_per_step": {k[:-2]: 1e3 * (after[k] - before[k]) / steps if steps else None
                                          for k in ("gate_s", "launch_s", "read_s", "pick_s")}}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", type=Path, default=None, help="an existing model dir (default: build --preset)")
    p.add_argument("--preset", choices=["tiny", "full"], default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None,
                   help="Synthesizer dtype (default: what cosytune infer uses, i.e. auto)")
    p.add_argument("--compile_decode", action="store_true", help="the opt-in compiled decoder step")
    p.add_argument("--parity", action="store_true", help="the pre-issue-14 defaults: float32, no fast flow, "
                   "no fast vocoder, no warm-up (graphed decoder only)")
    p.add_argument("--no_warmup", action="store_true")
    p.add_argument("--batch_decode", action="store_true", help="continuous batching on CPU too (it is the "
                   "default on CUDA; on CPU it runs eagerly, to time its host-side work)")
    p.add_argument("--no_batch_decode", action="store_true", help="one pooled decoder per request instead of "
                   "continuous batching (the default on CUDA)")
    p.add_argument("--decode_attention", default=None, help="the fast decoders' cache attention (sdpa, "
                   "efficient, matmul, reduce; default: the Synthesizer's choice)")
    p.add_argument("--stream_cache", action="store_true", help="the opt-in streaming flow cache (each chunk "
                   "solves only its own frames)")
    p.add_argument("--long_text", type=int, default=0, help="also time N warm requests of a ~30 s text, "
                   "streaming and not (streaming RTF vs non-streaming RTF)")
    p.add_argument("--profile", action="store_true", help="also profile a warm request (stage split; GPU busy "
                   "time and top kernels of a warm stream)")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--concurrency", default="1,16", help="comma-separated client counts")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    model_dir = args.model_dir
    if model_dir is None:
        from cosytune.modeldir.presets import write_model_dir

        model_dir = write_model_dir(Path(tempfile.mkdtemp(prefix="bench_api_")) / args.preset, preset=args.preset)
    prompt_wav = Path(str(files("cosytune") / "assets" / "sample_speaker" / "audio" / PROMPT_CLIP))
    kw: dict[str, Any] = {"device": args.device}
    if args.dtype:
        kw["dtype"] = getattr(torch, args.dtype)
    if args.compile_decode:
        kw["compile_decode"] = True
    if args.parity:
        kw.update(dtype=torch.float32, fast_flow=False, fast_vocoder=False, warmup=False, batch_decode=False)
    if args.batch_decode:
        kw.update(fast_decode=True, batch_decode=True)
    if args.no_batch_decode:
        kw["batch_decode"] = False
    if args.no_warmup:
        kw["warmup"] = False
    if args.stream_cache:
        kw["stream_cache"] = True
    if args.decode_attention:
        kw["decode_attention"] = args.decode_attention
    t0 = time.perf_counter()
    synth = Synthesizer.from_dir(model_dir, **kw)
    load_s = time.perf_counter() - t0
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if synth.device.type == "cuda" else "cpu",
                           "model_dir": str(model_dir), "settings": {k: str(v) for k, v in kw.items()},
                           "load_s": load_s, "warmup": dict(synth.warmup_info), "dtype": str(synth.dtype)}
    out["first_request"] = one_request(synth, 1, False, prompt_wav)
    out["first_stream"] = one_request(synth, 2, True, prompt_wav)
    warm = [one_request(synth, 10 + i, False, prompt_wav) for i in range(args.requests)]
    out["warm"] = {k: summary([r[k] for r in warm]) for k in ("total_s", "rtf", "llm_ms_per_token", "audio_s")}
    out["warm"]["decoder"] = sorted({str(r["decoder"]) for r in warm})
    stream = [one_request(synth, 100 + i, True, prompt_wav) for i in range(args.requests)]
    out["warm_stream"] = {k: summary([r[k] for r in stream if r[k] is not None])
                          for k in ("first_chunk_s", "rtf", "audio_s")}
    out["concurrent"] = [concurrent(synth, c, max(1, args.requests // c), prompt_wav)
                         for c in (int(x) for x in args.concurrency.split(",") if x)]
    if args.long_text:
        long = [one_request(synth, 500 + i, False, prompt_wav, LONG_TEXT) for i in range(args.long_text)]
        long_s = [one_request(synth, 500 + i, True, prompt_wav, LONG_TEXT) for i in range(args.long_text)]
        out["long"] = {"rtf": summary([r["rtf"] for r in long]), "audio_s": summary([r["audio_s"] for r in long]),
                       "stream_rtf": summary([r["rtf"] for r in long_s if r["rtf"] is not None]),
                       "stream_first_chunk_s": summary([r["first_chunk_s"] for r in long_s
                                                        if r["first_chunk_s"] is not None])}
    if args.profile:
        out["profile"] = profile(synth, prompt_wav)
    if args.out:
        write_json(args.out, out)
    print(f"public API on {out['device']} ({out['settings']}), load {load_s:.1f} s")
    fr, fs = out["first_request"], out["first_stream"]
    print(f"  first request   total {fr['total_s']:.3f} s  RTF {fr['rtf']:.3f}  "
          f"first stream chunk {fs['first_chunk_s'] or float('nan'):.3f} s")
    w, ws = out["warm"], out["warm_stream"]
    print(f"  warm            RTF p50 {w['rtf']['p50']:.3f} p95 {w['rtf']['p95']:.3f}  "
          f"LLM {w['llm_ms_per_token']['p50']:.2f} ms/token ({', '.join(w['decoder'])})  "
          f"audio {w['audio_s']['p50']:.1f} s")
    print(f"  warm stream     first chunk p50 {ws['first_chunk_s']['p50']:.3f} s p95 {ws['first_chunk_s']['p95']:.3f} s"
          f"  RTF p50 {ws['rtf']['p50']:.3f}")
    if "long" in out:
        lg = out["long"]
        print(f"  long text       {lg['audio_s']['p50']:.1f} s audio  RTF p50 {lg['rtf']['p50']:.3f}  stream RTF p50 "
              f"{lg['stream_rtf']['p50']:.3f}  first chunk p50 {lg['stream_first_chunk_s']['p50']:.3f} s")
    if "profile" in out:
        pr = out["profile"]
        print("  profile         stages " + ", ".join(f"{k} {v:.3f}" for k, v in pr["stages"].items()))
        st = pr["stream"]
        print(f"                  warm stream: wall {st['wall_s']:.3f} s, GPU busy {st['gpu_busy_s']:.3f} s "
              f"({100 * (st['gpu_busy_frac'] or 0):.0f}%); top kernels: "
              + "; ".join(f"{r['name'][:40]} {r['ms']:.1f} ms" for r in st["top_kernels"][:5]))
    for c in out["concurrent"]:
        fc = c["first_chunk_s"]
        p50 = f"{fc['p50']:.3f}" if fc["p50"] is not None else "-"
        p95 = f"{fc['p95']:.3f}" if fc["p95"] is not None else "-"
        print(f"  {c['clients']:>2} streams     first chunk p50 {p50} s p95 {p95} s  "
              f"{c['x_real_time'] or 0:.1f}x real time  errors {len(c['errors'])}")
        stages = ", ".join(f"{k} {v:.3f}" for k, v in c["stage_mean_s"].items() if v is not None)
        extra = f"; GPU busy {c['gpu_util_pct']:.0f}%" if c["gpu_util_pct"] is not None else ""
        if c.get("batcher") and c["batcher"]["steps"]:
            b = c["batcher"]
            extra += (f"; batcher {b['steps']} steps, {b['rows_per_step']:.1f} rows/step, {b['steps_per_s']:.0f} "
                      "steps/s, ms/step " + ", ".join(f"{k} {v:.2f}" for k, v in b["ms_per_step"].items()))
        print(f"                 per request: {stages}{extra}")
    return out


if __name__ == "__main__":
    main()
