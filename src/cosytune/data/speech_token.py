"""Speech tokens (S3 tokenizer v3, 25 Hz) for a Kaldi data dir: ``utt2speech_token.pt``.

Upstream reference: ``FunAudioLLM/CosyVoice:tools/extract_speech_token.py`` (recipe stage 2). Per
utterance: decode, mix to mono, resample to 16 kHz (torchaudio-compatible sinc), 128-bin Whisper log-mel
(its ``max − 8`` floor per utterance), ``speech_tokenizer_v3.onnx`` → token ids. The file is
``{utt: list[int]}`` in ``wav.scp`` order, as upstream writes it.

Differences from upstream, on purpose:
* utterances longer than 30 s (the tokenizer's limit) are **rejects** recorded in ``rejects.jsonl``
  with their duration, not silent empty lists; too-short and unreadable ones are rejects too;
* many utterances share one ONNX call when the model takes a dynamic batch (see
  :class:`cosytune.modeldir.onnx_models.SpeechTokenizer`), else concurrent single calls;
* resumable, like :mod:`cosytune.data.embedding`.

Note (upstream-spec §7.3): offline tokens come from the *unpadded* 16 kHz audio and can differ by ±1
from ``speech_feat_len / 2`` of the 24 kHz mel, which breaks upstream's flow training; the trainer
must align them (or use online tokens).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cosytune.audio.features import whisper_log_mel
from cosytune.audio.io import load_wav
from cosytune.data.frontend_common import ExtractionSummary, ResumableExtraction, read_kaldi_dir

logger = logging.getLogger(__name__)

__all__ = ["MAX_SECONDS", "STAGE", "compute_tokenizer_feature", "extract_speech_tokens"]

STAGE = "extract-speech-token"
TOKEN_FILE = "utt2speech_token.pt"
SAMPLE_RATE = 16000
MAX_SECONDS = 30.0  # the tokenizer's limit (upstream frontend asserts it; the tool writes [])
MIN_FRAMES = 4  # one token needs four 10 ms log-mel frames


def compute_tokenizer_feature(wav16k: torch.Tensor) -> np.ndarray:
    """Tokenizer input for one 16 kHz waveform: Whisper 128-bin log-mel, ``(128, N // 160)`` float32."""
    return whisper_log_mel(wav16k, n_mels=128).numpy()


def _prepare(path: Path) -> tuple[np.ndarray | None, float]:
    wav = load_wav(path, SAMPLE_RATE)
    dur = wav.shape[0] / SAMPLE_RATE
    if dur > MAX_SECONDS:
        return None, dur  # do not spend time on features that will be rejected
    return compute_tokenizer_feature(wav), dur


def extract_speech_tokens(
    data_dir: str | os.PathLike,
    onnx_path: str | os.PathLike,
    *,
    device: str = "auto",
    num_threads: int = 2,
    max_batch: int | None = None,
    chunk_size: int = 128,
    force: bool = False,
    rejects_path: str | os.PathLike | None = None,
    progress: Callable[[int], None] | None = None,
) -> ExtractionSummary:
    """Compute ``utt2speech_token.pt`` in ``data_dir``.

    Args: as :func:`cosytune.data.embedding.extract_embeddings` (``data_dir`` needs only ``wav.scp``;
    ``onnx_path`` is ``speech_tokenizer_v3.onnx``, ``.batch.onnx``, or a model dir holding the former), and
        max_batch: most utterances per ONNX call when the model takes a dynamic batch
            (``None``: 32 on CUDA, 1 on CPU).

    Returns:
        An :class:`~cosytune.data.frontend_common.ExtractionSummary`.

    Raises:
        DataError: a missing/malformed ``wav.scp``, or no utterance could be tokenised.
        ModelDirError: the ONNX model is missing or unreadable.
    """
    from cosytune.modeldir.onnx_models import SpeechTokenizer

    t0 = time.perf_counter()
    kd = read_kaldi_dir(data_dir, need=("wav.scp",))
    model = SpeechTokenizer(onnx_path, device=device, num_threads=num_threads, max_batch=max_batch)
    job = ResumableExtraction(kd, STAGE, TOKEN_FILE, model, force, rejects_path, verb="tokenised")

    def screen(p: Path, feat: np.ndarray | None, dur: float):
        if feat is None:
            detail = (f"{p}: {dur:.2f} s; speech_tokenizer_v3 takes at most {MAX_SECONDS:.0f} s — "
                      "split it (cosytune prepare-audio slices long recordings)")
            return "too_long_for_tokenizer", detail
        if feat.shape[1] < MIN_FRAMES:
            return "too_short", f"{p}: {dur:.3f} s is shorter than one speech token (40 ms)"
        return None

    def convert(u: str, tok: np.ndarray):
        if tok.size == 0:
            return "no_tokens", f"{kd.utt2wav[u]}: the tokenizer returned no tokens"
        return [int(x) for x in tok]

    summary = job.run(prepare=_prepare, screen=screen, infer=model.tokenize_many, convert=convert,
                      chunk_size=chunk_size, num_threads=num_threads, progress=progress)
    summary.batched = model.max_batch > 1
    summary.tokens = sum(len(v) for v in job.cache.values())
    summary.seconds = time.perf_counter() - t0
    return summary
