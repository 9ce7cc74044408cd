"""Average the N best (by CV loss) or last N training checkpoints into one llm.pt/flow.pt, or let the
scorecard pick (--select scorecard): the average and each checkpoint speak held-out sentences, and the
best by the rule of 'cosytune eval' is written (DST.selection.json says why)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cosytune.cli.common import flag

EPILOG = """examples:
  cosytune average --dst_model exp/llm/llm_avg.pt --src_path exp/llm --num 5 --val_best
  cosytune average --dst_model exp/flow/flow_last3.pt --src_path exp/flow --num 3 --last
  cosytune average --dst_model exp/llm/llm_best.pt --src_path exp/llm --select scorecard \\
      --model_dir models/dream --spk_id dream --data data --asr_model large-v3
"""


def build_parser(p: argparse.ArgumentParser) -> None:
    flag(p, "dst_model", required=True, type=Path, help="output .pt (a plain state dict)")
    flag(p, "src_path", required=True, type=Path, help="training run dir with epoch_*.pt and .yaml files")
    flag(p, "num", type=int, default=5, help="how many checkpoints to average (default: %(default)s)")
    g = p.add_mutually_exclusive_group()
    flag(g, "val_best", action="store_true", default=True, help="take the lowest CV losses (default)")
    g.add_argument("--last", dest="val_best", action="store_false", help="take the newest checkpoints")
    s = p.add_argument_group("--select scorecard")
    flag(s, "select", choices=["cv_loss", "scorecard"], default="cv_loss",
         help="cv_loss: average by CV loss (default); scorecard: score the average and every checkpoint and "
              "keep the best (CER must not regress, then speaker similarity, then DNSMOS OVRL)")
    flag(s, "model_dir", type=Path, default=None, help="model dir to synthesise with (holds the speaker)")
    flag(s, "spk_id", default=None, help="the speaker of the model dir's spk2info.pt")
    flag(s, "kind", choices=["llm", "flow"], default="llm", help="which network the checkpoints are")
    flag(s, "data", type=Path, default=None, help="the training data (transcribe out_dir or Kaldi dir): reference "
         "clip, centroid, speaking rate, held-out check")
    flag(s, "asr_model", default=None, help="Whisper model for CER/WER (none: the CER rule is skipped, and said so)")
    flag(s, "takes", type=int, default=2, help="takes per sentence (default %(default)s)")
    flag(s, "max_sentences", type=int, default=0, help="first N shipped sentences per language (0: all)")
    flag(s, "device", choices=["cpu", "cuda"], default="cpu")


def run(args: argparse.Namespace) -> int:
    if args.select == "scorecard":
        return _run_scorecard(args)
    from cosytune.steps import run_average

    run_average(args.src_path, args.dst_model, num=args.num, val_best=args.val_best)
    return 0


def _run_scorecard(args: argparse.Namespace) -> int:
    from cosytune.cli.common import print_summary
    from cosytune.errors import UsageError
    from cosytune.evaluation.api import EvalSettings, select_weights, training_reference

    missing = [f"--{n}" for n in ("model_dir", "spk_id", "data") if getattr(args, n) is None]
    if missing:
        raise UsageError(f"--select scorecard needs {', '.join(missing)}: the model dir and speaker to synthesise "
                         "with, and the training data it was tuned on")
    settings = EvalSettings(takes=args.takes, max_sentences=args.max_sentences, device=args.device,
                            asr_model=args.asr_model)
    res, rec = select_weights(args.src_path, args.dst_model, model_dir=args.model_dir, spk_id=args.spk_id,
                              kind=args.kind, num=args.num, settings=settings, ref=training_reference(args.data),
                              progress=not args.no_progress)
    print("verdict: " + res.verdict)
    print_summary("average --select scorecard", [
        ("picked", f"{rec['winner']} → {rec['written']}"),
        ("why", "; ".join(rec["why"])),
        *((f"  out: {k}", v) for k, v in rec["eliminated"].items()),
        ("rule", rec["rule"]),
        ("scorecard", rec["scorecard"]),
        ("record", args.dst_model.with_suffix(".selection.json")),
    ])
    return 0
