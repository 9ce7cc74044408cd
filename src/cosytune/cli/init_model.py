"""Write a complete CosyVoice 3 model dir with random weights, offline.

The directory has the upstream layout (cosyvoice3.yaml, llm.pt, flow.pt, hift.pt, campplus.onnx,
speech_tokenizer_v3.onnx, CosyVoice-BlankEN/ with a real Qwen2-vocabulary tokenizer) so every cosytune
command that takes --model_dir can use it, and so can upstream CosyVoice. The ONNX models are tiny
stand-ins with the real inputs and outputs. Random weights produce noise-like speech: the 'tiny' preset
exists for tests, demos and trying the pipeline without downloading the real model; 'full' has the
released sizes (~5.2 GB) for memory and speed tests.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cosytune.cli.common import flag, print_summary

EPILOG = """examples:
  cosytune init-model --preset tiny --out models/tiny
  cosytune init-model --preset tiny --out models/tiny --seed 3 --overwrite
  cosytune init-model --preset full --out models/random-full      # real sizes, random weights
"""


def build_parser(p: argparse.ArgumentParser) -> None:
    flag(p, "preset", choices=["tiny", "full"], default="tiny", help="model size (default: %(default)s)")
    flag(p, "out", "--out_dir", "--model_dir", required=True, type=Path, help="directory to create")
    flag(p, "seed", type=int, default=0, help="seed of every random weight (default: %(default)s)")
    flag(p, "overwrite", action="store_true",
         help="replace OUT if it exists (without it, an intact OUT of the same preset/seed is kept)")


def run(args: argparse.Namespace) -> int:
    import time

    from cosytune.modeldir.model_dir import ModelDir
    from cosytune.modeldir.presets import read_init_info, write_model_dir

    t0 = time.monotonic()
    out = write_model_dir(args.out, args.preset, args.seed, overwrite=args.overwrite)
    problems = ModelDir(out).problems()
    info = read_init_info(out) or {}
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    params = info.get("parameters", {})
    print_summary("init-model", [
        ("model dir", out),
        ("preset", f"{args.preset} (seed {args.seed})"),
        ("parameters", ", ".join(f"{k} {v:,}" for k, v in params.items())),
        ("size on disk", f"{size / 2**20:.1f} MiB"),
        ("check", "ok" if not problems else "; ".join(problems)),
        ("time", f"{time.monotonic() - t0:.1f} s"),
    ])
    return 0 if not problems else 1
