"""CAM++ speaker embeddings for a Kaldi data dir: ``utt2embedding.pt`` and ``spk2embedding.pt``.

Upstream reference: ``FunAudioLLM/CosyVoice:tools/extract_embedding.py`` (recipe stage 1). Per
utterance: decode, resample to 16 kHz (torchaudio-compatible sinc), 80-bin Kaldi fbank (dither 0), CMN,
``campplus.onnx`` → 192 floats. The speaker entry is the element-wise float32 mean of that speaker's
raw (un-normalised) utterance embeddings. Both files are ``{id: list[float]}`` dicts, as upstream
writes them, in ``wav.scp`` order.

Differences from upstream, on purpose:
* multi-channel audio is averaged to mono (the inference frontend does this; upstream's tool silently
  used channel 0);
* unreadable, too-short or non-finite utterances become rejects in ``rejects.jsonl`` instead of a
  crash, and their speaker mean is taken over the remaining utterances;
* the run is resumable: results are checkpointed and a re-run only computes missing utterances
  (everything is recomputed when the model file changed, or with ``force``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cosytune.audio.features import cmn, kaldi_fbank
from cosytune.audio.io import load_wav
from cosytune.data.frontend_common import (
    ExtractionSummary,
    ResumableExtraction,
    check_same_ids,
    read_kaldi_dir,
    save_pt_map,
)
from cosytune.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["STAGE", "compute_campplus_feature", "extract_embeddings"]

STAGE = "extract-embedding"
UTT_FILE = "utt2embedding.pt"
SPK_FILE = "spk2embedding.pt"
SAMPLE_RATE = 16000
MIN_FRAMES = 10  # 0.115 s; CAM++'s strided convolutions need a handful of frames


def compute_campplus_feature(wav16k: torch.Tensor) -> np.ndarray:
    """CAM++ input for one 16 kHz waveform: Kaldi fbank (80 bins, dither 0) minus its time mean, ``(T, 80)``."""
    return cmn(kaldi_fbank(wav16k, sample_rate=SAMPLE_RATE, num_mel_bins=80)).numpy()


def _prepare(path: Path) -> tuple[np.ndarray, float]:
    wav = load_wav(path, SAMPLE_RATE)
    return compute_campplus_feature(wav), wav.shape[0] / SAMPLE_RATE


def extract_embeddings(
    data_dir: str | os.PathLike,
    onnx_path: str | os.PathLike,
    *,
    device: str = "auto",
    num_threads: int = 2,
    chunk_size: int = 64,
    force: bool = False,
    rejects_path: str | os.PathLike | None = None,
    progress: Callable[[int], None] | None = None,
) -> ExtractionSummary:
    """Compute ``utt2embedding.pt`` and ``spk2embedding.pt`` in ``data_dir``.

    Args:
        data_dir: Kaldi-style dir with ``wav.scp`` and ``utt2spk``.
        onnx_path: ``campplus.onnx`` or a model dir containing it.
        device: onnxruntime device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        num_threads: worker threads for decoding/features and concurrent model calls.
        chunk_size: utterances decoded and embedded per step (bounds memory).
        force: recompute every utterance even if a previous run's results exist.
        rejects_path: ``rejects.jsonl`` to record rejects in (default ``<data_dir>/rejects.jsonl``).
        progress: called with the number of utterances finished after each step.

    Returns:
        An :class:`~cosytune.data.frontend_common.ExtractionSummary`.

    Raises:
        DataError: missing or inconsistent lists, or no utterance could be embedded.
        ModelDirError: the ONNX model is missing or unreadable.
    """
    from cosytune.modeldir.onnx_models import CampPlus

    t0 = time.perf_counter()
    kd = read_kaldi_dir(data_dir, need=("wav.scp", "utt2spk"))
    problems = check_same_ids({"wav.scp": set(kd.utt2wav), "utt2spk": set(kd.utt2spk)}, "wav.scp")
    if problems:
        raise DataError(f"{kd.path}: wav.scp and utt2spk disagree:\n  " + "\n  ".join(problems))
    model = CampPlus(onnx_path, device=device, num_threads=num_threads)
    job = ResumableExtraction(kd, STAGE, UTT_FILE, model, force, rejects_path, verb="embedded")

    def screen(p: Path, feat: np.ndarray, dur: float):
        if feat.shape[0] < MIN_FRAMES:
            detail = f"{p}: {dur:.3f} s gives {feat.shape[0]} fbank frames; CAM++ needs at least {MIN_FRAMES}"
            return "too_short", detail
        return None

    def convert(u: str, e: np.ndarray):
        if not np.all(np.isfinite(e)):
            return "non_finite_embedding", f"{kd.utt2wav[u]}: CAM++ returned NaN/inf"
        return [float(x) for x in e]

    summary = job.run(prepare=_prepare, screen=screen, infer=model.embed_many, convert=convert,
                      chunk_size=chunk_size, num_threads=num_threads, progress=progress)
    save_pt_map(kd.path / SPK_FILE, speaker_means(job.cache, kd.utt2spk, order=kd.utts))
    summary.wrote.append(kd.path / SPK_FILE)
    summary.speakers = len({kd.utt2spk[u] for u in job.cache})
    summary.seconds = time.perf_counter() - t0
    return summary


def speaker_means(utt2embedding: dict[str, list[float]], utt2spk: dict[str, str], *,
                  order: list[str] | None = None) -> dict[str, list[float]]:
    """Element-wise float32 mean of each speaker's raw utterance embeddings (upstream's spk2embedding)."""
    groups: dict[str, list[list[float]]] = {}
    for u in order if order is not None else list(utt2embedding):
        if u in utt2embedding:
            groups.setdefault(utt2spk[u], []).append(utt2embedding[u])
    return {s: torch.tensor(v, dtype=torch.float32).mean(dim=0).tolist() for s, v in groups.items()}

