"""CAM++ speaker embeddings of a Kaldi data dir → utt2embedding.pt and spk2embedding.pt.

Per utterance: 16 kHz, 80-bin Kaldi fbank, mean normalisation, campplus.onnx → 192 floats; each
speaker's entry is the mean of its utterances. Files are written exactly as upstream CosyVoice's
tools/extract_embedding.py writes them ({id: list of floats}). Re-running continues where it stopped;
unreadable or too-short clips are recorded in rejects.jsonl.
"""

from __future__ import annotations

import argparse

from cosytune.cli.common import flag

EPILOG = """examples:
  cosytune extract-embedding --dir data/train --onnx_path pretrained/Fun-CosyVoice3-0.5B/campplus.onnx
  cosytune extract-embedding --dir data/train --onnx_path pretrained/Fun-CosyVoice3-0.5B --onnx_device cpu

COSYVOICE_ORT_FORCE_CPU=1 forces onnxruntime onto the CPU whatever --onnx_device says."""


def add_onnx_flags(parser: argparse.ArgumentParser, default_threads: int = 2) -> None:
    """Flags shared by the two ONNX extraction commands."""
    flag(parser, "onnx_path", "model_dir", required=True,
         help="the ONNX file, or the model dir that contains it")
    flag(parser, "onnx_device", default="auto", metavar="{auto,cpu,cuda,cuda:N}",
         help="onnxruntime device (default auto: CUDA when it works, else CPU)")
    flag(parser, "num_thread", "num_threads", type=int, default=default_threads,
         help="worker threads for decoding and concurrent model calls (default: %(default)s)")
    flag(parser, "force", action="store_true", help="recompute every utterance, ignoring earlier results")
    flag(parser, "rejects", default=None, help="rejects.jsonl to record rejects in (default DIR/rejects.jsonl)")


def build_parser(parser: argparse.ArgumentParser) -> None:
    flag(parser, "dir", "data_dir", required=True, help="Kaldi-style data dir with wav.scp and utt2spk")
    add_onnx_flags(parser)


def run(args: argparse.Namespace) -> int:
    from cosytune.steps import run_extract_embedding

    run_extract_embedding(args.dir, args.onnx_path, device=args.onnx_device, num_threads=args.num_thread,
                          force=args.force, rejects_path=args.rejects, show_progress=not args.no_progress)
    return 0
