"""Cut long recordings at pauses into utterance-sized segments.

Upstream CosyVoice drops anything longer than 30 s (``tools/extract_speech_token.py`` stores no
tokens for it), and un-sliced long clips are a classic out-of-memory cause in peer tools, so a
recording longer than ``max_s`` is cut rather than dropped:

1. **Pauses.** A 20 ms RMS is taken every 10 ms; frames below ``threshold_db`` form silent
   runs, and runs of at least ``min_pause_s`` are pauses. Each pause is a cut candidate at its
   middle, so both neighbours keep half of the pause (silence trimming removes it later).
2. **Grouping.** The pieces between candidates are joined greedily in time order: the current
   segment takes the next piece while it is shorter than ``min_s``, or while the sum stays
   within ``target_s``; never beyond ``max_s``. A final segment shorter than ``min_s`` joins
   its predecessor when that stays within ``max_s``.
3. **No pause long enough.** A piece longer than ``max_s`` (continuous speech or music) is cut
   at the quietest 20 ms frame between ``min_s`` and ``max_s`` from its start, repeatedly;
   such cuts are flagged ``forced``.

Every segment is at most ``max_s`` long, and the segments tile the input (no sample is lost).
Shapes: ``signal`` is 1-D float (samples,); segments are sample index ranges ``[start, end)``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

_HOP_S = 0.01


@dataclass(frozen=True)
class Segment:
    """A ``[start, end)`` sample range; ``forced`` when its end was not at a pause."""

    start: int
    end: int
    forced: bool = False

    @property
    def num_samples(self) -> int:
        """Length in samples."""
        return self.end - self.start


def frame_levels_db(signal: np.ndarray, sample_rate: int) -> tuple[np.ndarray, int, int]:
    """RMS level in dBFS of 20 ms frames every 10 ms.

    Returns:
        ``(levels_db, hop, win)``: levels (num_frames,), hop and window in samples. Frame ``k``
        covers ``signal[k*hop : k*hop + win]``.
    """
    hop = max(1, round(_HOP_S * sample_rate))
    win = 2 * hop  # a frame is two hops, so frame energies are sums of adjacent hop energies
    n = len(signal)
    if n == 0:
        return np.zeros(0), hop, win
    # Energy per hop-sized block, computed in chunks so an hour-long recording never needs a
    # float64 copy of itself (a cumulative sum would).
    num_blocks = -(-n // hop)
    block_energy = np.empty(num_blocks, dtype=np.float64)
    chunk = hop * 4096
    for start in range(0, n, chunk):
        part = signal[start : start + chunk].astype(np.float64)
        full = len(part) // hop
        b0 = start // hop
        blocks = part[: full * hop].reshape(full, hop)
        block_energy[b0 : b0 + full] = np.einsum("ij,ij->i", blocks, blocks)
        if len(part) > full * hop:
            tail = part[full * hop :]
            block_energy[b0 + full] = float(np.dot(tail, tail))
    if num_blocks == 1:
        return 10.0 * np.log10(block_energy / n + 1e-20), hop, win
    # Frame k covers blocks k and k+1; the last frame may be short (the signal's tail).
    lengths = np.full(num_blocks - 1, float(win))
    lengths[-1] = hop + (n - (num_blocks - 1) * hop)
    energy = (block_energy[:-1] + block_energy[1:]) / lengths
    return 10.0 * np.log10(energy + 1e-20), hop, win


def find_pauses(
    signal: np.ndarray, sample_rate: int, threshold_db: float = -35.0, min_pause_s: float = 0.3
) -> list[tuple[int, int]]:
    """Silent runs of at least ``min_pause_s``, as ``[start, end)`` sample ranges.

    Args:
        signal: (samples,) mono float signal.
        sample_rate: in Hz.
        threshold_db: frames below this RMS level (dBFS) are silent.
        min_pause_s: shortest silent run that counts as a pause.
    """
    levels, hop, win = frame_levels_db(signal, sample_rate)
    if len(levels) == 0:
        return []
    silent = np.concatenate(([0], (levels < threshold_db).astype(np.int8), [0]))
    edges = np.diff(silent)
    run_starts = np.flatnonzero(edges == 1)
    run_ends = np.flatnonzero(edges == -1)  # exclusive frame index
    pauses = []
    for a, b in zip(run_starts, run_ends):
        start = int(a) * hop
        end = min(len(signal), (int(b) - 1) * hop + win)
        if end - start >= min_pause_s * sample_rate:
            pauses.append((start, end))
    return pauses


def _quietest_cut(levels: np.ndarray, hop: int, win: int, lo: int, hi: int) -> int:
    """Sample index at the centre of the quietest frame lying inside ``[lo, hi]``."""
    first = int(np.ceil(lo / hop))
    last = max(first, int((hi - win) // hop))
    window = levels[first : last + 1]
    if len(window) == 0:
        return hi
    k = first + int(np.argmin(window))
    return min(hi, max(lo, k * hop + win // 2))


def slice_at_pauses(
    signal: np.ndarray,
    sample_rate: int,
    max_s: float = 30.0,
    min_s: float = 3.0,
    target_s: float = 15.0,
    threshold_db: float = -35.0,
    min_pause_s: float = 0.3,
) -> list[Segment]:
    """Split a signal longer than ``max_s`` into segments of at most ``max_s`` at pauses.

    Args:
        signal: (samples,) mono float signal.
        sample_rate: in Hz.
        max_s: hard upper bound on a segment's length.
        min_s: segments shorter than this are joined with a neighbour when possible.
        target_s: pieces are joined while the segment stays within this length.
        threshold_db: silence level for pause detection (dBFS).
        min_pause_s: shortest pause to cut at.

    Returns:
        Segments tiling ``[0, len(signal))`` in order; a single segment when the signal is not
        longer than ``max_s``.
    """
    n = len(signal)
    max_len = int(max_s * sample_rate)
    if n <= max_len:
        return [Segment(0, n)]
    min_len = min(int(min_s * sample_rate), max_len // 2)
    target_len = max(min_len, min(int(target_s * sample_rate), max_len))
    cuts = [(a + b) // 2 for a, b in find_pauses(signal, sample_rate, threshold_db, min_pause_s)]
    bounds = [0] + [c for c in cuts if 0 < c < n] + [n]
    levels, hop, win = frame_levels_db(signal, sample_rate)

    # Pieces between pauses; any piece over max_len is cut at its quietest frames (forced).
    pieces: list[Segment] = []
    for a, b in itertools.pairwise(bounds):
        while b - a > max_len:
            cut = _quietest_cut(levels, hop, win, a + min_len, a + max_len)
            pieces.append(Segment(a, cut, forced=True))
            a = cut
        if b > a:
            pieces.append(Segment(a, b))

    segments: list[Segment] = []
    cur = pieces[0]
    for piece in pieces[1:]:
        joined = piece.end - cur.start
        if joined <= max_len and (cur.num_samples < min_len or joined <= target_len):
            cur = Segment(cur.start, piece.end, piece.forced)
        else:
            segments.append(cur)
            cur = piece
    if segments and cur.num_samples < min_len and cur.end - segments[-1].start <= max_len:
        prev = segments.pop()
        cur = Segment(prev.start, cur.end, cur.forced)
    segments.append(cur)
    return segments
