"""Run the whole pipeline on the shipped real-speech sample, offline, on CPU, in a few minutes.

It builds a tiny random-weight CosyVoice 3 model (cosytune init-model --preset tiny) and runs
`cosytune run` on 28 mp3 clips of one speaker shipped with cosytune, using their transcripts.

A tiny random model cannot produce intelligible speech: the demo shows that every stage works
and what it produces. For a real voice, point the same pipeline at Fun-CosyVoice3-0.5B:
    cosytune demo --base_model /path/to/Fun-CosyVoice3-0.5B     (or COSYTUNE_BASE_MODEL=...)
or run `cosytune run --audio YOUR_CLIPS ...` on your own recordings.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cosytune.cli.common import flag, print_summary


def build_parser(p: argparse.ArgumentParser) -> None:
    flag(p, "work", type=Path, default=Path("work/demo"), help="work dir (default ./work/demo)")
    flag(p, "base_model", "--base_model_dir", type=Path, default=None,
         help="a real base model dir (default: $COSYTUNE_BASE_MODEL, else a tiny random model)")
    flag(p, "epochs", type=int, default=2, help="LLM epochs with the tiny model (default 2)")
    flag(p, "device", choices=["auto", "cpu", "cuda"], default="cpu")


def run(args: argparse.Namespace) -> int:
    from importlib.resources import files

    from cosytune.pipeline import RunConfig, Runner

    sample = Path(str(files("cosytune") / "assets" / "sample_speaker"))
    base = args.base_model or (Path(os.environ["COSYTUNE_BASE_MODEL"]) if os.environ.get("COSYTUNE_BASE_MODEL")
                               else None)
    tiny = base is None
    if tiny:
        from cosytune.modeldir.presets import is_complete_model_dir, write_model_dir

        base = args.work / "base_tiny"
        if not is_complete_model_dir(base, "tiny", 0):
            print(f"building a tiny random-weight model in {base} ...")
            write_model_dir(base, preset="tiny", seed=0)
    cfg = RunConfig(
        audio=sample / "audio", speaker="allison", base_model=base, work=args.work,
        transcripts=sample / "transcripts.txt", backend="transcripts",
        llm_epochs=args.epochs if tiny else 0, num_average=2 if tiny else 5, device=args.device,
        sample_text="Please enter your password followed by the pound key.",
        train_overrides=("log_interval=5",) if tiny else (),
    )
    res = Runner(cfg, progress=not args.no_progress).run()
    from cosytune.cli.run import report

    report(res, cfg)
    lines = [("sample", f"{sample} (28 clips by Allison Smith, CC-BY-SA-3.0)")]
    if tiny:
        lines += [
            ("model", "TINY RANDOM WEIGHTS: the audio is noise, not speech. This demo shows the pipeline works."),
            ("real voice", "cosytune demo --base_model /path/to/Fun-CosyVoice3-0.5B  (or set COSYTUNE_BASE_MODEL)"),
        ]
    print_summary("demo", lines)
    return 0
