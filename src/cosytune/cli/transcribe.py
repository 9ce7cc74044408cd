"""Transcribe prepared wavs (faster-whisper, openai-whisper or your own text) into a dataset.

Reads the out_dir of 'cosytune prepare-audio' (or any folder of audio files) and writes
metadata.jsonl, Kaldi train/ and dev/ dirs (wav.scp, text, utt2spk, spk2utt, instruct), an
editable review.tsv and rejects.jsonl. Re-running reuses cached ASR results and keeps the
edits already made in review.tsv.

Settings come from defaults < --config YAML < key=value overrides < explicit flags.
"""

from __future__ import annotations

import argparse

from cosytune.cli.common import add_in_out_dirs, add_settings_args

EPILOG = """examples:
  # your own transcripts (lines 'file.mp3|text'), after prepare-audio
  cosytune transcribe --in_dir wavs --out_dir dataset --backend transcripts --transcripts transcripts.txt
  # faster-whisper, Mandarin, on a GPU (seed workflow flag names work too)
  cosytune transcribe --wav_dir wavs --out_root dataset --spk_id xuan --backend faster-whisper \\
      --whisper_model large-v3 --device cuda --compute_type float16 --language zh
  # then fix suspicious lines in dataset/review.tsv and rebuild train/dev without ASR
  cosytune apply-review --dir dataset
"""


def build_parser(parser: argparse.ArgumentParser) -> None:
    """Add transcribe's arguments."""
    io = parser.add_argument_group("input and output")
    add_in_out_dirs(io, ("--wav_dir", "--input"), "prepare-audio's out_dir (with prepared.jsonl) or a folder of audio files",
                    ("--out_root", "--output"), "where to write the dataset (default: the input folder)",
                    out_required=False)
    add_settings_args(io, "dev_size=3", config_of="TranscribeConfig")

    from cosytune.cli.config_flags import add_config_flags
    from cosytune.data.transcribe import TranscribeConfig

    groups = {
        "text source": ("backend", "transcripts", "asr_fallback", "cross_check", "max_disagreement", "speaker",
                        "language"),
        "ASR": ("whisper_model", "device", "compute_type", "vad_filter", "beam_size", "initial_prompt",
                "max_new_tokens", "num_threads"),
        "dataset": ("instruct", "dev_size", "seed", "min_sec", "max_sec", "min_cps", "max_cps"),
    }
    for title, names in groups.items():
        add_config_flags(parser.add_argument_group(title), TranscribeConfig, names,
                         aliases={"speaker": ["spk_id"], "whisper_model": ["model"]}, valued_bools={"vad_filter"})


def run(args: argparse.Namespace) -> int:
    """Run transcribe; returns the exit code."""
    from cosytune.cli.config_flags import config_overrides
    from cosytune.config.loading import load_config
    from cosytune.data.transcribe import TranscribeConfig
    from cosytune.steps import run_transcribe

    overrides = config_overrides(args, TranscribeConfig)
    if args.transcripts is not None and args.backend is None:
        overrides.setdefault("backend", "transcripts")  # --transcripts FILE alone means "use my text"
    cfg = load_config(TranscribeConfig, args.config, overrides)
    out_dir = args.out_dir or args.in_dir
    summary = run_transcribe(args.in_dir, out_dir, cfg, show_progress=not args.no_progress)
    print(
        f"next: review {summary.out_dir / 'review.tsv'}, then 'cosytune apply-review --dir {summary.out_dir}'"
    )
    return 0
