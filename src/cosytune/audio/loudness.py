"""Loudness (ITU-R BS.1770 / EBU R128 LUFS via pyloudnorm), peak ceiling and clipping detection.

* :func:`measure_lufs` — integrated loudness of a mono signal; ``None`` when the clip is shorter
  than one 400 ms gating block or entirely gated out (silence).
* :func:`apply_gain_and_ceiling` — optional gain to a LUFS target, then a *peak ceiling*: if the
  peak exceeds the ceiling the whole clip is scaled down so it does not. This is a static gain
  (no compression, no look-ahead limiter), so it adds no distortion; the price is that a clip
  with a high crest factor ends a little below the LUFS target, which is recorded.
* :func:`clipping_fraction` — share of sample instants at or above a level close to full scale
  on any channel; a recording with many such instants was clipped when it was made.

Shapes: mono signals are 1-D float (samples,); :func:`clipping_fraction` also takes
(channels, samples).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

#: pyloudnorm's gating block; shorter clips have no integrated loudness.
LUFS_BLOCK_S = 0.4


def peak_dbfs(signal: np.ndarray) -> float:
    """Sample peak in dBFS (``-inf`` for digital silence)."""
    peak = float(np.max(np.abs(signal))) if signal.size else 0.0
    return 20.0 * math.log10(peak) if peak > 0 else -math.inf


def measure_lufs(signal: np.ndarray, sample_rate: int) -> float | None:
    """Integrated loudness in LUFS, or None when it is undefined (too short or silent).

    Args:
        signal: (samples,) mono float signal.
        sample_rate: in Hz.
    """
    if len(signal) < int(LUFS_BLOCK_S * sample_rate) + 1:
        return None
    import pyloudnorm

    meter = pyloudnorm.Meter(sample_rate)
    with warnings.catch_warnings():
        # pyloudnorm warns about possible clipping; we report peaks ourselves.
        warnings.simplefilter("ignore")
        value = float(meter.integrated_loudness(np.asarray(signal, dtype=np.float64)))
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class GainInfo:
    """What :func:`apply_gain_and_ceiling` did (all in dB; None where not measured).

    Attributes:
        lufs_in: loudness before, if measured.
        lufs_out: loudness after, if measured.
        gain_db: total gain applied (LUFS gain plus any ceiling reduction).
        peak_db_in: sample peak before.
        peak_db_out: sample peak after.
        ceiling_applied: the peak ceiling reduced the gain.
    """

    lufs_in: float | None
    lufs_out: float | None
    gain_db: float
    peak_db_in: float
    peak_db_out: float
    ceiling_applied: bool

    def to_dict(self) -> dict:
        """JSON-friendly dict (``-inf`` peaks become None)."""

        def r(v: object) -> object:  # dB values to 0.01; None and the flag as they are
            return (round(v, 2) if math.isfinite(v) else None) if isinstance(v, float) else v

        return {k: r(v) for k, v in asdict(self).items()}


def apply_gain_and_ceiling(
    signal: np.ndarray,
    sample_rate: int,
    target_lufs: float | None,
    peak_ceiling_db: float | None,
    measure: bool = False,
) -> tuple[np.ndarray, GainInfo]:
    """Normalise to ``target_lufs`` (optional), then keep the peak at or below the ceiling.

    Args:
        signal: (samples,) mono float signal.
        sample_rate: in Hz.
        target_lufs: loudness target, e.g. -20.0; None leaves the level alone. A clip whose
            loudness is undefined (shorter than 0.4 s or silent) is left alone too.
        peak_ceiling_db: maximum sample peak in dBFS after gain, e.g. -1.0; None disables.
        measure: also measure LUFS when no target is set (costs time).

    Returns:
        ``(signal_out, info)``; ``signal_out`` is float32.
    """
    peak_in = peak_dbfs(signal)
    lufs_in = measure_lufs(signal, sample_rate) if (target_lufs is not None or measure) else None
    gain_db = 0.0
    if target_lufs is not None and lufs_in is not None:
        gain_db = target_lufs - lufs_in
    ceiling_applied = False
    if peak_ceiling_db is not None and math.isfinite(peak_in) and peak_in + gain_db > peak_ceiling_db:
        gain_db = peak_ceiling_db - peak_in
        ceiling_applied = True
    out = signal.astype(np.float32, copy=False)
    if gain_db != 0.0:
        out = (out * np.float32(10.0 ** (gain_db / 20.0))).astype(np.float32)
    lufs_out = None if lufs_in is None else lufs_in + gain_db
    info = GainInfo(lufs_in, lufs_out, gain_db, peak_in, peak_in + gain_db, ceiling_applied)
    return out, info


def clipping_fraction(audio: np.ndarray, level: float = 0.95) -> float:
    """Fraction of sample instants where any channel reaches ``level`` (linear, full scale 1).

    Args:
        audio: (samples,) or (channels, samples) float signal as decoded.
        level: amplitude that counts as clipped; lossy codecs smear flat tops into ripples
            below full scale, so somewhat below 1.0.

    Returns:
        A value in [0, 1].
    """
    if audio.size == 0:
        return 0.0
    if max(float(audio.max()), -float(audio.min())) < level:
        return 0.0  # the common case, without allocating |audio|
    mag = np.abs(audio) if audio.ndim == 1 else np.max(np.abs(audio), axis=0)
    return float(np.count_nonzero(mag >= level)) / mag.shape[-1]
