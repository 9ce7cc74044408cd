"""Benchmark: speaker-embedding and speech-token extraction, utterances/s and × real time.

Runs the real library path (``cosytune.data.embedding.extract_embeddings`` and
``cosytune.data.speech_token.extract_speech_tokens``: decode → resample → features → onnxruntime)
on the shipped sample clips (28 real mp3 prompts, 166 s), repeated to ``--utts`` utterances.

Models (``--models``):
* ``tiny`` — the offline stand-ins of :mod:`cosytune.modeldir.onnx_tiny` (tiny networks: this measures
  the pipeline around the model: decoding, resampling, features, batching, ORT overhead);
* ``realistic`` — random-weight stand-ins with roughly the real compute: a 7.3 M-parameter conv
  speaker encoder (``campplus.onnx`` is 28.3 MB ≈ 7.1 M fp32 parameters) and a 4×-downsampling conv +
  6-layer 1280-d transformer tokenizer (~125 M parameters, ~0.5 GB; the real v3 tokenizer's size is
  not known here — this is the order of the v1/v2 files), both exported with the real I/O names;
* ``real`` — the real files from ``--model_dir`` (``campplus.onnx``, ``speech_tokenizer_v3.onnx`` and,
  if present, ``speech_tokenizer_v3.batch.onnx``).

Usage::

    python benchmarks/bench_features.py                         # CPU, tiny + realistic
    python benchmarks/bench_features.py --device cuda --utts 448 # GPU (needs onnxruntime-gpu)
    python benchmarks/bench_features.py --models real --model_dir /path/Fun-CosyVoice3-0.5B

The report names the onnxruntime provider actually used: without a working CUDA provider a
``--device cuda`` run falls back to CPU and says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def _standin_campplus(path: Path) -> None:
    import torch
    from torch import nn

    class SpeakerEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.front = nn.Conv1d(80, 512, 5, stride=2, padding=2)
            self.body = nn.ModuleList(nn.Conv1d(512, 512, 3, padding=1) for _ in range(9))
            self.proj = nn.Linear(1024, 192)

        def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (B, T, 80) -> (B, 192)
            x = torch.relu(self.front(feats.transpose(1, 2)))
            for conv in self.body:
                x = x + torch.relu(conv(x))
            stats = torch.cat([x.mean(dim=2), x.std(dim=2)], dim=1)
            return self.proj(stats)

    torch.manual_seed(0)
    model = SpeakerEncoder().eval()
    x = torch.randn(1, 200, 80)
    torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "B", 1: "T"}, "output": {0: "B"}}, opset_version=17, dynamo=False)


def _standin_tokenizer(path: Path, batch: bool) -> None:
    import torch
    from torch import nn

    class Block(nn.Module):
        """Pre-norm transformer block written out (the fused eval fast path does not export)."""

        def __init__(self, d: int, heads: int) -> None:
            super().__init__()
            self.heads = heads
            self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # x (B, T, d), bias (B, 1, 1, T)
            b, t, d = x.shape
            q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5 + bias, dim=-1)
            x = x + self.out((att @ v).transpose(1, 2).reshape(b, t, d))
            return x + self.ff(self.norm2(x))

    class Tokenizer(nn.Module):
        def __init__(self, d: int = 1280, layers: int = 6) -> None:
            super().__init__()
            self.conv = nn.Conv1d(128, d, 4, stride=4)  # 4 frames per token, no overlap
            self.blocks = nn.ModuleList(Block(d, 20) for _ in range(layers))
            self.proj = nn.Linear(d, 8)
            self.register_buffer("powers", 3.0 ** torch.arange(8, dtype=torch.float32))

        def forward(self, feats: torch.Tensor, feats_length: torch.Tensor) -> torch.Tensor:
            t4 = feats.shape[2] // 4
            x = self.conv(feats[:, :, : t4 * 4]).transpose(1, 2)  # (B, T4, d)
            pad = torch.arange(t4, device=feats.device)[None, :] >= (feats_length.long() // 4)[:, None]
            bias = (pad.float() * -1e9)[:, None, None, :]
            for blk in self.blocks:
                x = blk(x, bias)
            digits = torch.tanh(self.proj(x)).round() + 1.0
            return (digits * self.powers).sum(-1).to(torch.int32)

    torch.manual_seed(1)
    model = Tokenizer().eval()
    feats, lens = torch.randn(2, 128, 400), torch.tensor([400, 300], dtype=torch.int32)
    axes = {"feats": {2: "T"}, "indices": {1: "T_tok"}}
    if batch:
        axes = {"feats": {0: "B", 2: "T"}, "feats_length": {0: "B"}, "indices": {0: "B", 1: "T_tok"}}
    else:
        feats, lens = feats[:1], lens[:1]
    with torch.no_grad():
        torch.onnx.export(model, (feats, lens), str(path), input_names=["feats", "feats_length"],
                          output_names=["indices"], dynamic_axes=axes, opset_version=17, dynamo=False)


def build_models(kind: str, root: Path, model_dir: str | None) -> tuple[Path, Path, str]:
    """Return (campplus path, tokenizer path, description)."""
    if kind == "real":
        if not model_dir:
            raise SystemExit("--models real needs --model_dir with campplus.onnx and speech_tokenizer_v3.onnx")
        d = Path(model_dir)
        tok = d / "speech_tokenizer_v3.batch.onnx"
        tok = tok if tok.is_file() else d / "speech_tokenizer_v3.onnx"
        return d / "campplus.onnx", tok, f"real models from {d}"
    out = root / kind
    out.mkdir(parents=True, exist_ok=True)
    cam, tok = out / "campplus.onnx", out / "speech_tokenizer_v3.batch.onnx"
    if kind == "tiny":
        from cosytune.modeldir.onnx_tiny import build_tiny_campplus, build_tiny_speech_tokenizer

        build_tiny_campplus(cam)
        build_tiny_speech_tokenizer(tok, batch=True)
        return cam, tok, "tiny stand-ins (cosytune.modeldir.onnx_tiny)"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _standin_campplus(cam)
        _standin_tokenizer(tok, batch=True)
    return cam, tok, "realistic-size random stand-ins (7.3 M-param encoder, ~125 M-param tokenizer)"


def make_dataset(root: Path, n_utts: int) -> tuple[Path, float]:
    from importlib.resources import files

    import soundfile as sf

    src = Path(str(files("cosytune") / "assets" / "sample_speaker"))
    clips = []
    for line in (src / "transcripts.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            name, text = line.split("|", 1)
            clips.append((src / "audio" / name, text.strip()))
    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("av") is None:
        # No PyAV (its ffmpeg decodes mp3 for cosytune): give the pipeline 16-bit wav copies instead, decoded
        # once here by libsndfile. The figures then exclude mp3 decoding (reported as input_format).
        wav_dir = root / "wav"
        wav_dir.mkdir(exist_ok=True)
        converted = []
        for path, text in clips:
            out = wav_dir / (path.stem + ".wav")
            if not out.exists():
                audio, rate = sf.read(str(path), dtype="int16")
                sf.write(str(out), audio, rate, subtype="PCM_16")
            converted.append((out, text))
        clips = converted
    rows, seconds = [], 0.0
    for i in range(n_utts):
        wav, text = clips[i % len(clips)]
        rows.append((f"spk_{i:06d}", wav, text))
        seconds += sf.info(str(wav)).duration
    (d / "wav.scp").write_text("".join(f"{u} {w}\n" for u, w, _ in rows))
    (d / "text").write_text("".join(f"{u} {t}\n" for u, _, t in rows))
    (d / "utt2spk").write_text("".join(f"{u} spk\n" for u, _, _ in rows))
    return d, seconds


def run_one(kind: str, args: argparse.Namespace, root: Path) -> dict:
    from cosytune.data.embedding import extract_embeddings
    from cosytune.data.speech_token import extract_speech_tokens

    t = time.perf_counter()
    cam, tok, desc = build_models(kind, root, args.model_dir)
    build_s = time.perf_counter() - t
    d, audio_s = make_dataset(root / f"ds_{kind}", args.utts)
    # Warm-up (session creation, first-call allocations) outside the timed runs.
    warm = make_dataset(root / f"warm_{kind}", min(4, args.utts))[0]
    try:
        extract_embeddings(warm, cam, device=args.device, num_threads=args.threads)
        extract_speech_tokens(warm, tok, device=args.device, num_threads=args.threads, max_batch=args.batch_size)
    except Exception:
        rej = warm / "rejects.jsonl"
        if rej.is_file():  # say why, before the temporary folder goes
            print(rej.read_text(encoding="utf-8")[:3000], file=sys.stderr)
        raise

    # Decode + resample + features alone (what surrounds the ONNX calls), on the same threads.
    from concurrent.futures import ThreadPoolExecutor

    from cosytune.data import embedding as emb_mod
    from cosytune.data import speech_token as tok_mod
    from cosytune.data.frontend_common import read_kaldi_dir

    paths = list(read_kaldi_dir(d).utt2wav.values())
    feat_s = {}
    for name, fn in (("fbank", emb_mod._prepare), ("whisper_log_mel", tok_mod._prepare)):
        t = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.threads) as pool:
            list(pool.map(fn, [Path(p) for p in paths]))
        feat_s[name] = time.perf_counter() - t

    emb = extract_embeddings(d, cam, device=args.device, num_threads=args.threads, force=True)
    tokr = extract_speech_tokens(d, tok, device=args.device, num_threads=args.threads, max_batch=args.batch_size,
                                 force=True)
    return {
        "models": desc,
        "model_build_s": round(build_s, 2),
        "utterances": args.utts,
        "audio_s": round(audio_s, 1),
        "input_format": "mp3" if importlib.util.find_spec("av") is not None else "wav (no PyAV here)",
        "features_only": {k: {"seconds": round(v, 3), "utt_per_s": round(args.utts / v, 1),
                               "x_real_time": round(audio_s / v, 1)} for k, v in feat_s.items()},
        "embedding": {"device": emb.device, "seconds": round(emb.seconds, 3),
                      "utt_per_s": round(args.utts / emb.seconds, 1), "x_real_time": round(audio_s / emb.seconds, 1)},
        "speech_token": {"device": tokr.device, "batched": tokr.batched, "seconds": round(tokr.seconds, 3),
                         "utt_per_s": round(args.utts / tokr.seconds, 1),
                         "x_real_time": round(audio_s / tokr.seconds, 1)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="onnxruntime device: cpu, cuda, cuda:N, auto (default cpu)")
    p.add_argument("--models", default="tiny,realistic", help="comma list of tiny, realistic, real")
    p.add_argument("--model_dir", default=None, help="dir with the real ONNX files (for --models real)")
    p.add_argument("--utts", type=int, default=56, help="utterances (the 28 sample clips repeated; default 56)")
    p.add_argument("--threads", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="worker threads (default min(8, cores))")
    p.add_argument("--batch_size", type=int, default=None,
                   help="tokenizer batch (default: the library's choice, 32 on CUDA and 1 on CPU)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    import onnxruntime as ort
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
           "ort_providers": ort.get_available_providers(), "cpu_count": os.cpu_count(),
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "requested_device": args.device, "threads": args.threads}
    results = {"env": env, "runs": []}
    with tempfile.TemporaryDirectory(prefix="cosytune-bench-") as tmp:
        for kind in [k.strip() for k in args.models.split(",") if k.strip()]:
            r = run_one(kind, args, Path(tmp))
            results["runs"].append(r)
            e, s = r["embedding"], r["speech_token"]
            print(f"[{kind}] {r['models']}: {r['utterances']} utts, {r['audio_s']} s of audio")
            for k, v in r["features_only"].items():
                print(f"  {'decode+' + k:<24} {v['utt_per_s']:8.1f} utt/s  {v['x_real_time']:8.1f}x real time  (torch, CPU)")
            print(f"  {'embedding':<24} {e['utt_per_s']:8.1f} utt/s  {e['x_real_time']:8.1f}x real time  ({e['device']})")
            print(f"  {'speech tokens':<24} {s['utt_per_s']:8.1f} utt/s  {s['x_real_time']:8.1f}x real time  "
                  f"({s['device']}{', batched' if s['batched'] else ''})")
            sys.stdout.flush()
    print(json.dumps(results["env"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
