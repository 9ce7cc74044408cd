"""Speech tokens (S3 tokenizer v3, 25 Hz) for a Kaldi data dir: ``utt2speech_token.pt``.

Upstream reference: ``FunAudioLLM/CosyVoice:tools/extract_speech_token.py`` (recipe stage 2). Per
utterance: decode, mix to mono, resample to 16 kHz (torchaudio-compatible sinc), 128-bin Whisper log-mel
(its ``max − 8`` floor per utterance), ``speech_tokenizer_v3.onnx`` → token ids. The file is
``{utt: list[int]}`` in ``wav.scp`` order, as upstream writes it.

Differences from upstream, on purpose:
* utterances longer than 30 s (the tokenizer's limit) are **rejects** recorded in ``rejects.jsonl``
  with their duration, not silent empty lists; too-short and unreadable ones are rejects too;
* many utterances share one ONNX call when the model takes a dynamic batch (see
  :class:`cosytune.models.onnx_models.SpeechTokenizer`), else concurrent single calls;
* resumable, like :mod:`cosytune.data.embedding`.

Note (upstream-spec §7.3): offline tokens come from the *unpadded* 16 kHz audio and can differ by ±1
from ``speech_feat_len / 2`` of the 24 kHz mel, which breaks upstream's flow training; the trainer
must align them (or use online tokens).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cosytune.audio.features import whisper_log_mel
from cosytune.data.frontend_common import (
    load_audio,
    load_pt_map,
    model_fingerprint,
    read_kaldi_dir,
    resolve_wav_path,
    safe_call,
    save_pt_map,
)
from cosytune.data.rejects import RejectLog
from cosytune.errors import DataError
from cosytune.fileio import write_json

logger = logging.getLogger(__name__)

__all__ = ["MAX_SECONDS", "STAGE", "SpeechTokenSummary", "compute_tokenizer_feature", "extract_speech_tokens"]

STAGE = "extract-speech-token"
TOKEN_FILE = "utt2speech_token.pt"
STATE_FILE = ".extract-speech-token.state.json"
SAMPLE_RATE = 16000
MAX_SECONDS = 30.0  # the tokenizer's limit (upstream frontend asserts it; the tool writes [])
MIN_FRAMES = 4  # one token needs four 10 ms log-mel frames
CHECKPOINT_EVERY_S = 60.0


@dataclass
class SpeechTokenSummary:
    """What :func:`extract_speech_tokens` did."""

    utterances: int = 0
    computed: int = 0
    reused: int = 0
    tokens: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"
    batched: bool = False
    seconds: float = 0.0
    audio_seconds: float = 0.0
    path: Path | None = None


def compute_tokenizer_feature(wav16k: torch.Tensor) -> np.ndarray:
    """Tokenizer input for one 16 kHz waveform: Whisper 128-bin log-mel, ``(128, N // 160)`` float32."""
    return whisper_log_mel(wav16k, n_mels=128).numpy()


def _prepare(path: Path) -> tuple[np.ndarray | None, float]:
    wav = load_audio(path, SAMPLE_RATE)
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
) -> SpeechTokenSummary:
    """Compute ``utt2speech_token.pt`` in ``data_dir``.

    Args:
        data_dir: Kaldi-style dir with ``wav.scp``.
        onnx_path: ``speech_tokenizer_v3.onnx`` (or ``.batch.onnx``) or a model dir containing the former.
        device: onnxruntime device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        num_threads: worker threads for decoding/features and concurrent model calls.
        max_batch: most utterances per ONNX call when the model takes a dynamic batch
            (``None``: 32 on CUDA, 1 on CPU).
        chunk_size: utterances decoded and tokenised per step (bounds memory).
        force: recompute every utterance even if a previous run's results exist.
        rejects_path: ``rejects.jsonl`` to record rejects in (default ``<data_dir>/rejects.jsonl``).
        progress: called with the number of utterances finished after each step.

    Returns:
        A :class:`SpeechTokenSummary`.

    Raises:
        DataError: a missing/malformed ``wav.scp``, or no utterance could be tokenised.
        ModelDirError: the ONNX model is missing or unreadable.
    """
    from cosytune.models.onnx_models import SpeechTokenizer

    t0 = time.perf_counter()
    kd = read_kaldi_dir(data_dir, need=("wav.scp",))
    model = SpeechTokenizer(onnx_path, device=device, num_threads=num_threads, max_batch=max_batch)
    rejects = RejectLog(Path(rejects_path) if rejects_path else kd.path / "rejects.jsonl", STAGE)
    out_path, state_path = kd.path / TOKEN_FILE, kd.path / STATE_FILE
    fingerprint = model_fingerprint(model.path)

    cache: dict[str, list[int]] = {}
    if not force and out_path.is_file() and state_path.is_file():
        try:
            state = json.loads(state_path.read_text())
        except ValueError:
            state = {}
        if state.get("fingerprint") == fingerprint:
            cache = {u: v for u, v in load_pt_map(out_path).items() if u in kd.utt2wav and len(v) > 0}
        else:
            logger.info("%s was made with another model (or an older run); recomputing every utterance", out_path)
    todo = [u for u in kd.utts if u not in cache]
    summary = SpeechTokenSummary(utterances=len(kd.utts), reused=len(kd.utts) - len(todo), device=model.device)
    if progress and summary.reused:
        progress(summary.reused)

    def checkpoint() -> None:
        save_pt_map(out_path, {u: cache[u] for u in kd.utts if u in cache})
        write_json(state_path, {"fingerprint": fingerprint})

    last_save = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            paths = [resolve_wav_path(kd, kd.utt2wav[u]) for u in chunk]
            prepared = list(pool.map(safe_call(_prepare), paths))
            ok_utts, feats = [], []
            for u, p, res in zip(chunk, paths, prepared):
                if isinstance(res, Exception):
                    rejects.add(u, "unreadable_audio", f"{p}: {res}")
                    continue
                feat, dur = res
                if feat is None:
                    rejects.add(u, "too_long_for_tokenizer",
                                f"{p}: {dur:.2f} s; speech_tokenizer_v3 takes at most {MAX_SECONDS:.0f} s — "
                                "split it (cosytune prepare-audio slices long recordings)")
                    continue
                if feat.shape[1] < MIN_FRAMES:
                    rejects.add(u, "too_short", f"{p}: {dur:.3f} s is shorter than one speech token (40 ms)")
                    continue
                summary.audio_seconds += dur
                ok_utts.append(u)
                feats.append(feat)
            tokens = model.tokenize_many(feats) if feats else []
            for u, tok in zip(ok_utts, tokens):
                if tok.size == 0:
                    rejects.add(u, "no_tokens", f"{kd.utt2wav[u]}: the tokenizer returned no tokens")
                    continue
                cache[u] = [int(x) for x in tok]
                summary.computed += 1
            if progress:
                progress(len(chunk))
            if time.monotonic() - last_save > CHECKPOINT_EVERY_S:
                checkpoint()
                last_save = time.monotonic()

    if not cache:
        rejects.save()
        raise DataError(f"{kd.path}: no utterance could be tokenised ({len(rejects)} rejects, see {rejects.path})")
    checkpoint()
    rejects.save()
    summary.batched = model.max_batch > 1
    summary.tokens = sum(len(v) for v in cache.values())
    summary.rejected = dict(rejects.counts())
    summary.seconds = time.perf_counter() - t0
    summary.path = out_path
    return summary
