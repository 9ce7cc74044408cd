"""One command from a folder of recordings to a tuned voice.

Runs prepare-audio, transcribe, extract-embedding, extract-speech-token, make-parquet, train (LLM;
flow only with --train_flow), average, assemble (+ spk2info) and a sample synthesis, in WORK.
Stages whose inputs and settings are unchanged are skipped, so an interrupted run continues where
it stopped when you run the same command again.
"""

from __future__ import annotations

import argparse

from cosytune.cli.common import flag, print_summary

EPILOG = """examples:
  cosytune run --audio "/mnt/c/AIGC/数据集/Dream" --speaker dream --base_model pretrained/Fun-CosyVoice3-0.5B \\
      --work work/dream
  cosytune run ... --transcripts my_texts.txt          # your own transcripts instead of ASR
  cosytune run ... --from train-llm --force train-llm  # redo training only
stages: prepare-audio transcribe extract-embedding extract-speech-token make-parquet train-llm train-flow
        average assemble synthesize
"""


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``cosytune run``: one per :class:`~cosytune.pipeline.RunConfig` field (its doc is the help,
    its default shown), the seed workflow's names as aliases, then the stage selection."""
    from cosytune.cli.config_flags import add_config_flags
    from cosytune.pipeline import RunConfig

    add_config_flags(p, RunConfig, skip={"train_overrides"}, class_defaults=True, valued_bools={"vad_filter"},
                     aliases={"audio": ["audio_dir"], "speaker": ["spk_id"], "base_model": ["base_model_dir"]})
    flag(p, "from", "--from_stage", dest="start", default=None, help="first stage to consider")
    flag(p, "until", default=None, help="last stage to run")
    flag(p, "force", action="append", default=[], help="re-run this stage (and what depends on it) even if up to "
         "date; repeatable")
    p.add_argument("train_overrides", nargs="*", help="training overrides, e.g. optim.lr=2e-5 (anywhere on the line)")


#: key=value training overrides may stand anywhere between the flags (cli.main parses intermixed).
INTERMIXED = True


def build_parser(p: argparse.ArgumentParser) -> None:
    add_run_flags(p)


def config_from_args(args: argparse.Namespace):
    from dataclasses import fields

    from cosytune.pipeline import RunConfig

    values = {f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)}
    values["train_overrides"] = tuple(args.train_overrides)
    if str(values.get("initial_prompt")).lower() == "none":
        values["initial_prompt"] = None
    return RunConfig(**values)


def report(res, cfg) -> None:
    rows = [(s.name, (f"{s.status}{f' in {s.seconds:.1f}s' if s.status == 'done' else ''}"
                      f"{f' ({s.note})' if s.note else ''}")) for s in res.stages]
    if res.review is not None:
        how = (f"check {res.review} (fix texts, mark clips to delete), then run 'cosytune apply-review --dir "
               f"{res.review.parent}' and this command again without --review")
        rows.append(("stopped for review", how))
    elif any(s.name == "transcribe" and s.status == "done" for s in res.stages):
        rows.append(("transcripts", "used as transcribed; add --review to stop and check them before training"))
    rows.append(("model dir", res.model_dir or "(not assembled yet)"))
    for p in res.listen:
        rows.append(("listen", p))
    if cfg.train_flow:
        rows.append(("compare", "out/tuned/ (tuned LLM + tuned flow) vs out/tuned_llm_base_flow/ (the seed's fallback)"))
    else:
        rows.append(("compare", "the flow is the base one; try --train_flow only if the voice timbre is off"))
    print_summary("run", rows)


def run(args: argparse.Namespace) -> int:
    from cosytune.pipeline import Runner

    cfg = config_from_args(args)
    cfg.work.mkdir(parents=True, exist_ok=True)
    res = Runner(cfg, progress=not args.no_progress).run(args.start, args.until, tuple(args.force))
    report(res, cfg)
    return 0
