"""Silence trimming at both ends, equivalent to sox ``silence 1 D T reverse silence 1 D T reverse``.

The seed workflow trims every clip with
``sox in out silence 1 0.15 -35d reverse silence 1 0.15 -35d reverse``. What that does,
read from sox 14.4's ``src/silence.c`` (``SILENCE_TRIM`` mode, the only mode used with
``above_periods=1`` and no below-periods part):

1. **Level.** For every sample ``i`` sox computes a running RMS over a window of
   ``W = int(rate / 50)`` samples (20 ms) per channel, holding sample ``i`` and the ``W - 1``
   samples before it; the window starts zero-filled, so the first samples see zeros "before
   the file". The window is updated with every sample, kept or not, so the RMS is a pure
   function of the signal.
2. **Threshold.** The RMS (as a 32-bit sample value, truncated, then masked to the input's
   precision bits) divided by full scale, in dB, must be *strictly greater* than ``T``
   (``-35d`` = -35 dBFS, i.e. an amplitude of 10**(-35/20) ≈ 0.0178). For a multi-channel
   input a sample counts as "above" when any channel is above.
3. **Duration.** Samples are discarded until ``D`` seconds (``round(D * rate)`` samples) of
   *consecutive* above-threshold samples have been seen; output then starts at the first
   sample of that run (the run is held back, not lost). A shorter run is discarded and the
   search restarts. If no such run exists the output is empty.
4. ``reverse … reverse`` applies the same rule to the time-reversed result, which trims the
   end: in forward time the RMS window there looks *ahead* (sample ``i`` and the ``W - 1``
   after it, zeros past the end), and output ends after the last sample of the last run of
   ``D`` consecutive above-threshold samples.

:func:`trim_silence` implements exactly that, vectorised with numpy (cumulative sums instead of
sox's sample loop, and a growing prefix instead of the whole file, which is exact because the
RMS is causal). Differences, by design: it works on one mono channel (prepare-audio mixes to
mono and resamples to 24 kHz *before* trimming, whatever order a sox command line would imply),
on float samples, and applies sox's precision mask for ``precision_bits`` (default 16, the
precision of the PCM16 output; ``None`` disables it). On a 16-bit signal the result is exactly
sox's. Tests check known silence lengths, the corner cases above (run shorter than D, window
edge, strict comparison), a literal per-sample transcription of sox's state machine, and, when
the ``sox`` binary is installed, SoX 14.4.2 itself: the kept samples are bit-identical to the
seed's exact command.

The seed's over-trim rule is in :func:`trim_with_overtrim_rule`: a clip longer than
``min_keep_s`` (1.5 s) that trimming would make shorter than ``min_keep_s`` is kept untrimmed
(and flagged), because such a clip is usually quiet speech, not silence.

Shapes: ``signal`` is 1-D float (samples,), values in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TrimResult:
    """Where to cut a signal: keep ``signal[start:end]``.

    Attributes:
        start: first kept sample.
        end: one past the last kept sample (``start == end`` means nothing is kept).
        num_samples: length of the untrimmed signal.
        untrimmed_overtrim: the over-trim rule applied, so ``start, end = 0, num_samples``
            although the sox rule would have cut more.
        sox_start: where the sox rule alone would have started.
        sox_end: where the sox rule alone would have ended.
    """

    start: int
    end: int
    num_samples: int
    untrimmed_overtrim: bool = False
    sox_start: int = 0
    sox_end: int = 0

    @property
    def found_sound(self) -> bool:
        """Whether the sox rule found any non-silent run at all."""
        return self.sox_end > self.sox_start


def sox_window_size(sample_rate: int) -> int:
    """Samples in sox ``silence``'s RMS window: 20 ms, truncated (``rate / 50``)."""
    return max(1, int(sample_rate // 50))


def running_rms(signal: np.ndarray, window: int) -> np.ndarray:
    """RMS over the current sample and the ``window - 1`` before it, zeros before the start.

    Args:
        signal: (samples,) float.
        window: window length in samples.

    Returns:
        (samples,) float64 RMS values, the quantity sox's ``compute_rms`` returns.
    """
    energy = np.cumsum(np.square(signal, dtype=np.float64))
    if len(energy) > window:
        # energy[i] = csum[i] - csum[i - window] (the copy keeps the operands unaliased).
        energy[window:] -= energy[:-window].copy()
    # Cumulative-sum differences can go a hair below zero on exact silence.
    np.maximum(energy, 0.0, out=energy)
    return np.sqrt(energy / window)


def _above(rms: np.ndarray, threshold_db: float, precision_bits: int | None) -> np.ndarray:
    level = rms
    if precision_bits is not None:
        # sox truncates the RMS to a 32-bit sample, masks it to the input precision, then
        # divides by SOX_SAMPLE_MAX (2**31 - 1): i.e. floor to a multiple of 2**-(bits-1).
        step = 2.0 ** (precision_bits - 1)
        level = np.floor(rms * step) / step * (2.0**31 / (2.0**31 - 1))
    # 20*log10(level) > T  <=>  level > 10**(T/20) for level > 0 (level 0 is -inf dB, never above).
    return level > 10.0 ** (threshold_db / 20.0)


def _first_run_start(above: np.ndarray, min_run: int) -> int | None:
    """Start of the first run of at least ``min_run`` consecutive True values, or None."""
    if len(above) == 0:
        return None
    padded = np.concatenate(([False], above, [False])).astype(np.int8)
    edges = np.diff(padded)
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    long_enough = np.flatnonzero(ends - starts >= min_run)
    return int(starts[long_enough[0]]) if len(long_enough) else None


def sox_silence_start(
    signal: np.ndarray,
    sample_rate: int,
    threshold_db: float = -35.0,
    duration_s: float = 0.15,
    precision_bits: int | None = 16,
) -> int | None:
    """Index where sox ``silence 1 duration_s threshold_db d`` starts its output.

    Args:
        signal: (samples,) mono float signal.
        sample_rate: in Hz (sets the 20 ms RMS window and the run length).
        threshold_db: level in dBFS the RMS must exceed (strictly).
        duration_s: length of the run of consecutive above-threshold samples required.
        precision_bits: emulate sox's masking of the RMS to this many bits; None = exact.

    Returns:
        The first kept sample, or None when no such run exists (sox outputs nothing).
    """
    window = sox_window_size(sample_rate)
    min_run = max(1, round(duration_s * sample_rate))
    n = len(signal)
    # The RMS at sample i depends only on samples <= i, so a qualifying run found in a prefix
    # is exactly the one sox finds. Look at a short prefix first and grow it: speech usually
    # starts within a second, and long recordings then cost almost nothing to trim.
    end = min(n, max(4 * (min_run + window), sample_rate))
    while True:
        rms = running_rms(signal[:end], window)
        start = _first_run_start(_above(rms, threshold_db, precision_bits), min_run)
        if start is not None or end == n:
            return start
        end = min(n, end * 4)


def trim_silence(
    signal: np.ndarray,
    sample_rate: int,
    threshold_db: float = -35.0,
    start_duration_s: float = 0.15,
    end_duration_s: float = 0.15,
    precision_bits: int | None = 16,
) -> TrimResult:
    """The seed's ``silence 1 D T reverse silence 1 D T reverse``: trim both ends.

    Args:
        signal: (samples,) mono float signal.
        sample_rate: in Hz.
        threshold_db: silence threshold in dBFS (sox ``-35d``).
        start_duration_s: sound needed to stop trimming at the start (sox ``0.15``).
        end_duration_s: the same for the end (second ``silence`` effect).
        precision_bits: see :func:`sox_silence_start`.

    Returns:
        A :class:`TrimResult`; ``start == end`` when the signal is all silence.
    """
    n = len(signal)
    start = sox_silence_start(signal, sample_rate, threshold_db, start_duration_s, precision_bits)
    if start is None:
        return TrimResult(0, 0, n, sox_start=0, sox_end=0)
    rest = signal[start:]
    # The second pass runs on the reversed output of the first, exactly like the sox chain.
    back = sox_silence_start(rest[::-1], sample_rate, threshold_db, end_duration_s, precision_bits)
    if back is None:
        return TrimResult(start, start, n, sox_start=start, sox_end=start)
    end = start + len(rest) - back
    return TrimResult(start, end, n, sox_start=start, sox_end=end)


def trim_with_overtrim_rule(
    signal: np.ndarray,
    sample_rate: int,
    threshold_db: float = -35.0,
    start_duration_s: float = 0.15,
    end_duration_s: float = 0.15,
    min_keep_s: float = 1.5,
    precision_bits: int | None = 16,
) -> TrimResult:
    """:func:`trim_silence` plus the seed's rule against over-trimming.

    If the clip is longer than ``min_keep_s`` but the trimmed clip would be shorter, the
    clip is kept whole and ``untrimmed_overtrim`` is set. A clip in which the sox rule finds
    no sound at all is returned empty (all silence), whatever its length.

    Args:
        signal: (samples,) mono float signal.
        sample_rate: in Hz.
        threshold_db: see :func:`trim_silence`.
        start_duration_s: see :func:`trim_silence`.
        end_duration_s: see :func:`trim_silence`.
        min_keep_s: the seed's 1.5 s.
        precision_bits: see :func:`sox_silence_start`.

    Returns:
        A :class:`TrimResult`.
    """
    res = trim_silence(signal, sample_rate, threshold_db, start_duration_s, end_duration_s, precision_bits)
    n = len(signal)
    min_keep = round(min_keep_s * sample_rate)
    if res.found_sound and n > min_keep and (res.end - res.start) < min_keep:
        return TrimResult(0, n, n, untrimmed_overtrim=True, sox_start=res.sox_start, sox_end=res.sox_end)
    return res
