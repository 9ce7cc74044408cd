"""Average the N best (by CV loss) or last N training checkpoints into one llm.pt/flow.pt."""

from __future__ import annotations

import argparse
from pathlib import Path

from cosytune.cli.common import flag

EPILOG = """examples:
  cosytune average --dst_model exp/llm/llm_avg.pt --src_path exp/llm --num 5 --val_best
  cosytune average --dst_model exp/flow/flow_last3.pt --src_path exp/flow --num 3 --last
"""


def build_parser(p: argparse.ArgumentParser) -> None:
    flag(p, "dst_model", required=True, type=Path, help="output .pt (a plain state dict)")
    flag(p, "src_path", required=True, type=Path, help="training run dir with epoch_*.pt and .yaml files")
    flag(p, "num", type=int, default=5, help="how many checkpoints to average (default: %(default)s)")
    g = p.add_mutually_exclusive_group()
    flag(g, "val_best", action="store_true", default=True, help="take the lowest CV losses (default)")
    g.add_argument("--last", dest="val_best", action="store_false", help="take the newest checkpoints")


def run(args: argparse.Namespace) -> int:
    from cosytune.steps import run_average

    run_average(args.src_path, args.dst_model, num=args.num, val_best=args.val_best)
    return 0
