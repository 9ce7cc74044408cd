"""The ``cosytune`` entry point.

Subcommands live in ``cosytune.cli.<module>`` and are imported only when used, so
``cosytune --help`` and light commands start fast (no torch import). Each module provides
``build_parser(parser)`` and ``run(args) -> int``.

Exit codes: 0 ok, 1 runtime failure, 2 usage or config error. Logging is configured here and
nowhere else; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cosytune import __version__
from cosytune.errors import CosytuneError

# name -> (module under cosytune.cli, one-line help). Order is the order of the workflow.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "run the whole pipeline on the shipped sample (tiny model, CPU, offline)"),
    "run": ("run", "one command from a folder of recordings to a tuned voice"),
    "prepare-audio": ("prepare_audio", "convert, trim, normalise and slice raw audio to 24 kHz mono wavs"),
    "transcribe": ("transcribe", "transcribe wavs (faster-whisper or your own text) into Kaldi train/dev dirs"),
    "apply-review": ("apply_review", "rebuild train/dev from an edited review file without re-running ASR"),
    "dataset-report": ("dataset_report", "minutes, durations, chars/s and rejects of a dataset (text + PNG)"),
    "extract-embedding": ("extract_embedding", "CAM++ speaker embeddings (utt2embedding.pt, spk2embedding.pt)"),
    "extract-speech-token": ("extract_speech_token", "speech tokens with speech_tokenizer_v3.onnx"),
    "make-parquet": ("make_parquet", "parquet shards + data.list for training"),
    "train": ("train", "LLM or flow SFT (single process or torchrun DDP)"),
    "average": ("average", "average the best or last N checkpoints"),
    "assemble": ("assemble", "build a speaker model dir: base files + tuned llm/flow + spk2info.pt"),
    "spk2info": ("spk2info", "write spk2info.pt entries from speaker embeddings or prompts"),
    "infer": ("infer", "synthesise speech from a model dir"),
    "infer-batch": ("infer_batch", "synthesise many segments, one file each"),
    "serve": ("serve", "HTTP speech API (OpenAI-compatible, streaming) + the listening lab page"),
    "eval": ("eval", "scorecard: did the fine-tune help? (CER/WER, speaker similarity, DNSMOS; HTML report)"),
    "init-model": ("init_model", "write a complete model dir with random weights (tiny or full preset)"),
    "doctor": ("doctor", "check Python, torch, GPUs, onnxruntime, audio decoding and a model dir"),
}


def _common_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("general")
    g.add_argument("--debug", action="store_true", help="show full tracebacks and debug logging")
    g.add_argument(
        "--log_level", "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default: %(default)s)",
    )
    g.add_argument("--no_progress", "--no-progress", action="store_true", help="hide progress bars")
    return p


def _available(module_name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(f"cosytune.cli.{module_name}") is not None


def _root_help() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        f"cosytune {__version__}: fine-tune CosyVoice 3 on one speaker and speak in that voice.",
        "",
        "usage: cosytune <command> [options]      (cosytune <command> --help for its options)",
        "",
        "commands:",
    ]
    lines += [f"  {n.ljust(width)}  {h}" for n, (m, h) in COMMANDS.items() if _available(m)]
    lines += ["", "Exit codes: 0 ok, 1 runtime failure, 2 usage or config error. Add --debug for tracebacks."]
    return "\n".join(lines)


def configure_logging(level: str, debug: bool) -> None:
    """Configure root logging for the CLI (the library never does this)."""
    lvl = logging.DEBUG if debug else getattr(logging, level)
    rank = _env_rank()
    if rank > 0 and not debug:
        lvl = max(lvl, logging.WARNING)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if debug else "%(levelname)s: %(message)s"
    if rank >= 0 and _env_world() > 1:
        fmt = f"[rank{rank}] " + fmt
    logging.basicConfig(level=lvl, format=fmt, datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    for noisy in ("numba", "matplotlib", "PIL", "urllib3", "httpx", "faster_whisper", "h5py"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))


def _env_rank() -> int:
    import os

    return int(os.environ.get("RANK", "0") or 0)


def _env_world() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        try:
            print(_root_help())
        except BrokenPipeError:
            pass
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"cosytune {__version__}")
        return 0
    name = argv[0].replace("_", "-")
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        print(f"cosytune: unknown command {argv[0]!r}.{hint} Run 'cosytune --help' for the list.", file=sys.stderr)
        return 2
    module_name, help_line = COMMANDS[name]
    if not _available(module_name):
        print(f"cosytune: command {name!r} is planned but not available in this version.", file=sys.stderr)
        return 2
    debug = "--debug" in argv
    module = importlib.import_module(f"cosytune.cli.{module_name}")
    parser = argparse.ArgumentParser(
        prog=f"cosytune {name}",
        description=(module.__doc__ or help_line).strip(),
        parents=[_common_parent()],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=getattr(module, "EPILOG", None),
    )
    module.build_parser(parser)
    parse = parser.parse_intermixed_args if getattr(module, "INTERMIXED", False) else parser.parse_args
    args = parse(argv[1:])
    configure_logging(args.log_level, args.debug)
    try:
        return int(module.run(args) or 0)
    except CosytuneError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        # Output piped into a command that stopped reading (e.g. `| head`): not an error of ours.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to continue where it stopped", file=sys.stderr)
        return 130
