"""Build a speaker model dir: base model files + tuned llm.pt (+ flow.pt) + spk2info.pt.

Large unchanged files are hard-linked (else symlinked, else copied). Without --flow_pt the base
flow stays (the seed's 'tuned LLM + base flow', usually the clearer choice on small data).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cosytune.cli.common import flag

EPILOG = """example:
  cosytune assemble --base_model_dir pretrained/Fun-CosyVoice3-0.5B --out_model_dir models/alice \\
      --llm_pt exp/llm/llm_avg.pt --spk2embedding_pt data/train/spk2embedding.pt
"""


def build_parser(p: argparse.ArgumentParser) -> None:
    flag(p, "base_model_dir", "--base_model", required=True, type=Path, help="the base model dir (upstream layout)")
    flag(p, "out_model_dir", "--out_dir", required=True, type=Path, help="where to write the speaker model dir")
    flag(p, "llm_pt", required=True, type=Path, help="tuned LLM weights (averaged or an epoch checkpoint)")
    flag(p, "flow_pt", type=Path, default=None, help="tuned flow weights (default: keep the base flow)")
    flag(p, "spk2embedding_pt", type=Path, default=None, help="spk2embedding.pt to write spk2info.pt from")
    flag(p, "spk_id", action="append", default=None, help="speaker id(s) to include (default: all)")
    flag(p, "overwrite", action="store_true", help="replace files in an existing output dir")


def run(args: argparse.Namespace) -> int:
    from cosytune.steps import run_assemble

    run_assemble(args.base_model_dir, args.out_model_dir, args.llm_pt, flow_pt=args.flow_pt,
                 spk2embedding_pt=args.spk2embedding_pt, spk_ids=args.spk_id, overwrite=args.overwrite)
    return 0
