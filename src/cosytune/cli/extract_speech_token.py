"""Speech tokens of a Kaldi data dir with speech_tokenizer_v3.onnx → utt2speech_token.pt.

Per utterance: 16 kHz mono, 128-bin Whisper log-mel, speech_tokenizer_v3.onnx → 25 Hz token ids, written
exactly as upstream CosyVoice's tools/extract_speech_token.py writes them ({utt: list of ints}).
Utterances over 30 s (the tokenizer's limit), too short or unreadable are recorded in rejects.jsonl
with a reason (never stored as empty lists). Utterances are batched when the model takes a dynamic
batch; re-running continues where it stopped.
"""

from __future__ import annotations

import argparse

from cosytune.cli.common import flag
from cosytune.cli.extract_embedding import add_onnx_flags

EPILOG = """examples:
  cosytune extract-speech-token --dir data/train --onnx_path pretrained/Fun-CosyVoice3-0.5B/speech_tokenizer_v3.onnx
  cosytune extract-speech-token --dir data/train --onnx_path pretrained/Fun-CosyVoice3-0.5B --onnx_device cuda
  cosytune extract-speech-token --dir data/train --onnx_path pretrained/Fun-CosyVoice3-0.5B/speech_tokenizer_v3.batch.onnx

A model dir means its speech_tokenizer_v3.onnx, the file upstream's tool uses. A model whose batch axis
is fixed to 1 runs one utterance per call on --num_thread threads. One with a dynamic batch axis (e.g.
speech_tokenizer_v3.batch.onnx) gets --batch_size utterances per call (by default on CUDA only), after
a first check that batched tokens match single calls (it falls back to single calls if they do not).

COSYVOICE_ORT_FORCE_CPU=1 forces onnxruntime onto the CPU whatever --onnx_device says."""


def build_parser(parser: argparse.ArgumentParser) -> None:
    flag(parser, "dir", "data_dir", required=True, help="Kaldi-style data dir with wav.scp")
    add_onnx_flags(parser)
    flag(parser, "batch_size", type=int, default=None,
         help="most utterances per ONNX call when the model takes a dynamic batch "
              "(default: 32 on CUDA, 1 on CPU where threads are faster; 1 = no batching)")


def run(args: argparse.Namespace) -> int:
    from cosytune.steps import run_extract_speech_token

    run_extract_speech_token(args.dir, args.onnx_path, device=args.onnx_device, num_threads=args.num_thread,
                             max_batch=args.batch_size, force=args.force, rejects_path=args.rejects,
                             show_progress=not args.no_progress)
    return 0
