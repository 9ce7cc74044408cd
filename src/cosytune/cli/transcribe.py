"""Transcribe prepared wavs (faster-whisper, openai-whisper or your own text) into a dataset.

Reads the out_dir of 'cosytune prepare-audio' (or any folder of audio files) and writes
metadata.jsonl, Kaldi train/ and dev/ dirs (wav.scp, text, utt2spk, spk2utt, instruct), an
editable review.tsv and rejects.jsonl. Re-running reuses cached ASR results and keeps the
edits already made in review.tsv.

Settings come from defaults < --config YAML < key=value overrides < explicit flags.
"""

from __future__ import annotations

import argparse

from cosytune.cli.common import flag

EPILOG = """examples:
  # your own transcripts (lines 'file.mp3|text'), after prepare-audio
  cosytune transcribe --in_dir wavs --out_dir dataset --backend transcripts --transcripts transcripts.txt
  # faster-whisper, Mandarin, on a GPU (seed workflow flag names work too)
  cosytune transcribe --wav_dir wavs --out_root dataset --spk_id xuan --backend faster-whisper \\
      --whisper_model large-v3 --device cuda --compute_type float16 --language zh
  # then fix suspicious lines in dataset/review.tsv and rebuild train/dev without ASR
  cosytune apply-review --dir dataset
"""


def _add(group, name: str, *aliases: str, **kw) -> None:
    """A flag that maps 1:1 onto a TranscribeConfig key (None = not given, config decides)."""
    kw.setdefault("default", None)
    flag(group, name, *aliases, **kw)


CONFIG_FLAGS = (
    "backend",
    "transcripts",
    "asr_fallback",
    "cross_check",
    "max_disagreement",
    "speaker",
    "language",
    "whisper_model",
    "device",
    "compute_type",
    "vad_filter",
    "beam_size",
    "initial_prompt",
    "max_new_tokens",
    "num_threads",
    "instruct",
    "dev_size",
    "seed",
    "min_sec",
    "max_sec",
    "min_cps",
    "max_cps",
)


def build_parser(parser: argparse.ArgumentParser) -> None:
    """Add transcribe's arguments."""
    io = parser.add_argument_group("input and output")
    flag(
        io,
        "in_dir",
        "--wav_dir",
        "--input",
        required=True,
        metavar="DIR",
        help="prepare-audio's out_dir (with prepared.jsonl) or a folder of audio files",
    )
    flag(
        io,
        "out_dir",
        "--out_root",
        "--output",
        metavar="DIR",
        default=None,
        help="where to write the dataset (default: the input folder)",
    )
    flag(io, "config", metavar="YAML", default=None, help="settings file (keys of TranscribeConfig)")
    io.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. dev_size=3")

    g = parser.add_argument_group("text source")
    _add(
        g,
        "backend",
        choices=["faster-whisper", "openai-whisper", "transcripts"],
        help="where text comes from (default faster-whisper)",
    )
    _add(
        g,
        "transcripts",
        metavar="FILE",
        help="'name|text' lines (or TSV / JSONL); without it, a .txt/.lab beside each source file",
    )
    _add(
        g,
        "asr_fallback",
        choices=["none", "faster-whisper", "openai-whisper"],
        help="with --backend transcripts: ASR for sliced sources and clips without text (default none)",
    )
    _add(
        g,
        "cross_check",
        choices=["none", "faster-whisper", "openai-whisper"],
        help="also transcribe with this ASR and flag rows whose text disagrees (asr_disagrees) for review",
    )
    _add(
        g,
        "max_disagreement",
        type=float,
        help="character error rate above which a row is flagged (default 0.35)",
    )
    _add(g, "speaker", "--spk_id", metavar="ID", help="speaker id, prefixes utterance ids (default spk)")
    _add(g, "language", metavar="CODE", help="language code (en, zh, ...); default: detect per clip")

    a = parser.add_argument_group("ASR")
    _add(
        a,
        "whisper_model",
        "--model",
        metavar="NAME_OR_DIR",
        help="model name or local dir (default large-v3)",
    )
    _add(a, "device", help="auto, cpu or cuda (default auto)")
    _add(a, "compute_type", help="CTranslate2 compute type: default, int8, float16, ... (default default)")
    _add(
        a,
        "vad_filter",
        nargs="?",
        const="true",
        metavar="BOOL",
        help="Silero VAD before decoding (default true; '--vad_filter false' turns it off)",
    )
    _add(a, "beam_size", type=int, help="beam width (default 5)")
    _add(
        a,
        "initial_prompt",
        metavar="TEXT",
        help="prompt that makes Whisper punctuate; 'auto' (default) picks one for --language; '' for none",
    )
    _add(a, "max_new_tokens", type=int, help="cap on decoded tokens per 30 s window")
    _add(a, "num_threads", type=int, help="CPU threads for faster-whisper (0 = its default)")

    d = parser.add_argument_group("dataset")
    _add(d, "instruct", metavar="TEXT", help="instruct for every utterance; must end with <|endofprompt|>")
    _add(d, "dev_size", type=float, help="dev size: fraction < 1 or count >= 1 (default 0.1; at least 1)")
    _add(d, "seed", type=int, help="split seed (default 1986)")
    _add(d, "min_sec", type=float, help="reject shorter clips (default 0.5)")
    _add(d, "max_sec", type=float, help="reject longer clips (default 30)")
    _add(d, "min_cps", type=float, help="reject slower speech, Latin-equivalent chars/s (default 2)")
    _add(d, "max_cps", type=float, help="reject faster speech, Latin-equivalent chars/s (default 30)")
    parser.set_defaults(_config_keys=CONFIG_FLAGS)


def collect_overrides(args: argparse.Namespace, names: list[str]) -> dict:
    """Positional key=value overrides, then explicit flags on top."""
    from cosytune.config.loading import parse_overrides

    out = parse_overrides(list(getattr(args, "overrides", None) or []))
    for name in names:
        v = getattr(args, name, None)
        if v is not None:
            out[name] = v
    return out


def run(args: argparse.Namespace) -> int:
    """Run transcribe; returns the exit code."""
    from cosytune.config.loading import load_config
    from cosytune.data.transcribe import TranscribeConfig
    from cosytune.steps import run_transcribe

    overrides = collect_overrides(args, list(CONFIG_FLAGS))
    if args.transcripts is not None and args.backend is None:
        overrides.setdefault("backend", "transcripts")  # --transcripts FILE alone means "use my text"
    cfg = load_config(TranscribeConfig, args.config, overrides)
    out_dir = args.out_dir or args.in_dir
    summary = run_transcribe(args.in_dir, out_dir, cfg, show_progress=not args.no_progress)
    print(
        f"next: review {summary.out_dir / 'review.tsv'}, then 'cosytune apply-review --dir {summary.out_dir}'"
    )
    return 0
