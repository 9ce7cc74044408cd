"""One command from a folder of recordings to a tuned voice.

Runs prepare-audio, transcribe, extract-embedding, extract-speech-token, make-parquet, train (LLM;
flow only with --train_flow), average, assemble (+ spk2info) and a sample synthesis, in WORK.
Stages whose inputs and settings are unchanged are skipped, so an interrupted run continues where
it stopped when you run the same command again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cosytune.cli.common import flag, print_summary

EPILOG = """examples:
  cosytune run --audio "/mnt/c/AIGC/数据集/Dream" --speaker dream --base_model pretrained/Fun-CosyVoice3-0.5B \\
      --work work/dream
  cosytune run ... --transcripts my_texts.txt          # your own transcripts instead of ASR
  cosytune run ... --from train-llm --force train-llm  # redo training only
stages: prepare-audio transcribe extract-embedding extract-speech-token make-parquet train-llm train-flow
        average assemble synthesize
"""


def add_run_flags(p: argparse.ArgumentParser, audio_required: bool = True) -> None:
    flag(p, "audio", "--audio_dir", required=audio_required, type=Path, help="folder of recordings of one speaker")
    flag(p, "speaker", "--spk_id", required=audio_required, help="speaker name (used as spk_id)")
    flag(p, "base_model", "--base_model_dir", required=audio_required, type=Path,
         help="base model dir, e.g. Fun-CosyVoice3-0.5B")
    flag(p, "work", required=audio_required, type=Path, help="work dir (data/, exp/, models/, out/)")
    flag(p, "transcripts", type=Path, default=None, help="'name|text' file with your own transcripts")
    flag(p, "backend", choices=["auto", "transcripts", "faster-whisper", "openai-whisper"], default="auto")
    flag(p, "whisper_model", default="large-v3", help="faster-whisper model name or local dir")
    flag(p, "language", default=None, help="language code for ASR (default: detect)")
    flag(p, "compute_type", default="default", help="faster-whisper compute type (e.g. float16, int8_float16)")
    p.add_argument("--vad_filter", action=argparse.BooleanOptionalAction, default=True,
                   help="faster-whisper's voice-activity filter (default: on)")
    flag(p, "initial_prompt", default="auto", help="faster-whisper initial prompt ('auto': punctuation hint for "
         "Chinese; 'none': no prompt)")
    flag(p, "review", action="store_true", help="stop after transcription so you can check data/review.tsv; "
         "then run 'cosytune apply-review --dir WORK/data' and the same command without --review")
    flag(p, "train_flow", action="store_true", help="also fine-tune the flow (off by default)")
    flag(p, "llm_epochs", type=int, default=0, help="max LLM epochs (default: scaled to the data size)")
    flag(p, "flow_epochs", type=int, default=0, help="max flow epochs (default: scaled to the data size)")
    flag(p, "num_average", type=int, default=5, help="checkpoints to average (best CV loss)")
    flag(p, "device", choices=["auto", "cpu", "cuda"], default="auto")
    flag(p, "sample_text", default=None,
         help="text of the sample synthesis at the end (default: a sentence in the language of your transcripts)")
    flag(p, "num_workers", type=int, default=0, help="data-loading workers for training")
    flag(p, "from", "--from_stage", dest="start", default=None, help="first stage to consider")
    flag(p, "until", default=None, help="last stage to run")
    flag(p, "force", action="append", default=[], help="re-run this stage even if up to date (repeatable)")
    p.add_argument("train_overrides", nargs="*", help="training overrides, e.g. optim.lr=2e-5 (anywhere on the line)")


#: key=value training overrides may stand anywhere between the flags (cli.main parses intermixed).
INTERMIXED = True


def build_parser(p: argparse.ArgumentParser) -> None:
    add_run_flags(p)


def config_from_args(args: argparse.Namespace):
    from cosytune.pipeline import RunConfig

    return RunConfig(
        audio=args.audio, speaker=args.speaker, base_model=args.base_model, work=args.work,
        transcripts=args.transcripts, backend=args.backend, whisper_model=args.whisper_model,
        language=args.language, train_flow=args.train_flow, llm_epochs=args.llm_epochs,
        flow_epochs=args.flow_epochs, num_average=args.num_average, device=args.device,
        sample_text=args.sample_text, train_overrides=tuple(args.train_overrides), num_workers=args.num_workers,
        review=args.review, compute_type=args.compute_type, vad_filter=args.vad_filter,
        initial_prompt=None if str(args.initial_prompt).lower() == "none" else args.initial_prompt,
    )


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
