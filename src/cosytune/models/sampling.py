"""Speech-token sampling for the CosyVoice 3 LLM: repetition-aware nucleus sampling (RAS).

What it does (per decoding step, on one log-probability vector over the speech vocabulary)
    1. Nucleus + top-k: sort ``p = softmax(logp)`` descending with a *stable* sort (ties go to the
       lowest id) and keep candidates while the running sum is below ``top_p`` and fewer than
       ``top_k`` are kept; the candidate that pushes the sum past ``top_p`` is included. The running
       sum is a float32 accumulation in that order and is compared with ``float32(top_p)``, exactly
       as upstream accumulates a 0-d float32 tensor (golden-notes §1.5).
    2. Draw one candidate in proportion to its (unnormalised) probability.
    3. Repetition check: if the pick occurs at least ``win_size * tau_r`` times among the last
       ``win_size`` decoded tokens, set its log-probability to -inf and redraw from the softmax of
       the *whole* vector (no top-k/top-p).

    ``temperature`` (not in upstream, default 1.0 = upstream) rescales the log-probabilities first;
    ``temperature == 0`` means greedy (the stable-sort argmax, lowest id on ties).

How a draw is made (bit-compatible with ``torch.multinomial(p, 1)``)
    torch's multinomial with one sample computes ``argmax(p / q)`` with ``q ~ Exp(1)`` drawn by
    ``torch.empty_like(p).exponential_(1)`` (the exponential-race trick), on CPU and CUDA alike. We
    do the same, drawing ``q`` from the ``torch.Generator`` passed in, so a generator seeded with s
    reproduces upstream run after ``torch.manual_seed(s)``. Tests can instead inject the recorded
    draws through ``draw_q`` (a callable ``p -> q``), which makes candidate lists and picks exact.

Shapes: ``logp`` is (V,) float, V = the speech vocabulary incl. specials (6761 for CosyVoice 3).

Reference: upstream ``FunAudioLLM/CosyVoice:cosyvoice/utils/common.py`` (``ras_sampling``,
``nucleus_sampling``, ``random_sampling``); spec §2.6; golden fixture ``ras_sampling``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cosytune.errors import ConfigError

DrawQ = Callable[[Tensor], Tensor]
"""Returns Exp(1) draws with the shape, dtype and device of the probability tensor it is given."""


@dataclass(frozen=True)
class SamplingConfig:
    """Parameters of :func:`ras_sample`; defaults are the Fun-CosyVoice3-0.5B yaml values."""

    top_p: float = 0.8
    """Nucleus mass; candidates are added while their running sum is below it."""
    top_k: int = 25
    """At most this many candidates."""
    win_size: int = 10
    """Repetition window: the last ``win_size`` decoded tokens."""
    tau_r: float = 0.1
    """Redraw when the pick repeats at least ``win_size * tau_r`` times in the window."""
    temperature: float = 1.0
    """Log-probabilities are divided by it (1.0 = upstream; 0 = greedy)."""

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            problems.append(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if not isinstance(self.win_size, int) or self.win_size < 1:
            problems.append(f"win_size must be an integer >= 1, got {self.win_size!r}")
        if self.tau_r < 0:
            problems.append(f"tau_r must be >= 0, got {self.tau_r}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if problems:
            raise ConfigError(problems, source="sampling config")


@dataclass(frozen=True)
class SampleResult:
    """One sampling decision with the bookkeeping the golden fixtures record."""

    token_id: int
    """The chosen id (after any repetition redraw)."""
    candidate_ids: tuple[int, ...]
    """Nucleus candidates in stable descending-probability order."""
    nucleus_pick_pos: int
    """Index of the nucleus pick within ``candidate_ids``."""
    nucleus_pick_id: int
    """The nucleus pick."""
    ras_redraw: bool
    """Whether the repetition check fired and ``token_id`` was redrawn from the full vector."""


def exponential_draws(generator: torch.Generator | None) -> DrawQ:
    """The default ``draw_q``: Exp(1) draws from ``generator`` (torch's default generator if None).

    The draws are made on the generator's device and moved to the probabilities' device, so a CPU
    generator also drives sampling on CUDA logits (and then gives the CPU random stream).
    """

    def draw(p: Tensor) -> Tensor:
        if generator is not None and generator.device.type != p.device.type:
            q = torch.empty(p.shape, dtype=p.dtype, device=generator.device).exponential_(1.0, generator=generator)
            return q.to(p.device)
        return torch.empty_like(p).exponential_(1.0, generator=generator)

    return draw


def draw_index(probs: Tensor, q: Tensor) -> int:
    """Index drawn in proportion to ``probs`` given Exp(1) draws ``q``: ``argmax(probs / q)``.

    This is what ``torch.multinomial(probs, 1)`` computes; the first maximum wins on ties.
    """
    return int(_draw_position(probs, q))


def _draw_position(probs: Tensor, q: Tensor) -> Tensor:
    """:func:`draw_index` as a 0-d tensor on ``probs``' device (no sync)."""
    if q.shape != probs.shape:
        raise ValueError(f"exponential draws have shape {tuple(q.shape)}, expected {tuple(probs.shape)}")
    return torch.argmax(probs / q.to(device=probs.device, dtype=probs.dtype))


def apply_temperature(logp: Tensor, temperature: float) -> Tensor:
    """Log-probabilities re-normalised at ``temperature`` (returned unchanged at 1.0 for parity)."""
    if temperature == 1.0 or temperature == 0.0:
        return logp
    return torch.log_softmax(logp / temperature, dim=-1)


def nucleus_candidates(logp: Tensor, top_p: float, top_k: int) -> tuple[Tensor, Tensor]:
    """Top-p/top-k candidates of a log-probability vector, exactly as upstream selects them.

    Args:
        logp: (V,) log-probabilities (entries may be -inf).
        top_p: nucleus mass (compared in float32).
        top_k: maximum number of candidates.

    Returns:
        ``(ids (k,) int64, probs (k,))``: candidate ids in stable descending order and their
        unnormalised softmax probabilities, on ``logp``'s device.
    """
    ids, probs, _ = _nucleus(logp, top_p, top_k)
    return ids, probs


def _nucleus(logp: Tensor, top_p: float, top_k: int) -> tuple[Tensor, Tensor, list[int]]:
    """:func:`nucleus_candidates` plus the candidate ids as a host list, read in the same transfer."""
    probs = logp.softmax(dim=0)
    sorted_p, sorted_ids = probs.sort(descending=True, stable=True)
    head, head_ids = sorted_p[:top_k], sorted_ids[:top_k]
    # One device-to-host transfer for the values and the ids (ids < 2**24 are exact in float32);
    # on CUDA every separate read is a synchronisation, and this runs once per token and row.
    host = torch.stack((head.float(), head_ids.float())).cpu().numpy()
    count = _nucleus_count(host[0], top_p)
    return head_ids[:count], head[:count], [int(i) for i in host[1, :count]]


def _nucleus_count(head: np.ndarray, top_p: float) -> int:
    """How many of the descending ``head`` probabilities the nucleus keeps (the one crossing top_p too)."""
    # Sequential float32 accumulation (torch.cumsum accumulates float32 in double on CPU and in a
    # parallel order on CUDA, either of which can flip the boundary case 0.4 + 0.4 vs 0.8).
    limit = np.float32(top_p)
    running = np.float32(0.0)
    count = 0
    for value in head:
        if not running < limit:
            break
        running = np.float32(running + value)
        count += 1
    return count


def _redraw(logp: Tensor, pick: int, draw: DrawQ) -> int:
    """The repetition redraw: from the softmax of the whole vector with ``pick`` excluded."""
    return int(redraw_index(logp, pick, draw))


def redraw_index(logp: Tensor, pick: int, draw: DrawQ) -> Tensor:
    """:func:`_redraw`'s index as a 0-d tensor on ``logp``'s device (read it later: no sync here)."""
    masked = logp.clone()
    masked[pick] = -float("inf")
    full = masked.softmax(dim=0)
    return _draw_position(full, draw(full))


def ras_sample(logp: Tensor, history: Sequence[int], config: SamplingConfig, *,
               generator: torch.Generator | None = None, draw_q: DrawQ | None = None) -> SampleResult:
    """Repetition-aware nucleus sampling of one token.

    Args:
        logp: (V,) log-probabilities. Not modified (upstream edits it in place; we work on a copy).
        history: previously decoded tokens (only the last ``win_size`` matter).
        config: sampling parameters.
        generator: source of randomness for the default draws (ignored if ``draw_q`` is given).
        draw_q: callable returning the Exp(1) draws for a probability tensor; called once for the
            nucleus draw and once more if the repetition redraw fires.

    Returns:
        The decision and its bookkeeping (:class:`SampleResult`).
    """
    if logp.dim() != 1:
        raise ValueError(f"ras_sample takes one (V,) log-probability vector, got shape {tuple(logp.shape)}")
    draw = draw_q if draw_q is not None else exponential_draws(generator)
    if config.temperature == 0.0:
        # Greedy: the stable sort's first element, i.e. the lowest id among the maxima.
        token = int(logp.sort(descending=True, stable=True)[1][0])
        return SampleResult(token, (token,), 0, token, False)
    logp = apply_temperature(logp, config.temperature)
    _ids, probs, ids = _nucleus(logp, config.top_p, config.top_k)
    pos = draw_index(probs, draw(probs))
    pick = ids[pos]
    repeats = sum(1 for t in history[-config.win_size:] if int(t) == pick)
    token, redraw = pick, False
    # Same float product as upstream (10 * 0.1 == 1.0; 10 * 1.1 == 11.000000000000002).
    if repeats >= config.win_size * config.tau_r:
        token, redraw = _redraw(logp, pick, draw), True
    return SampleResult(token, tuple(ids), pos, pick, redraw)


def ras_sample_rows(logp: Tensor, histories: Sequence[Sequence[int]], config: SamplingConfig, *,
                    generators: Sequence[torch.Generator | None]) -> list[int]:
    """:func:`ras_sample` for R rows at once: the same decision per row, with far fewer device round trips.

    Softmax, sort and the top-k head run once for all rows and are read back in one transfer; each row's
    Exp(1) draws come from its own generator exactly as :func:`ras_sample` makes them, and one argmax
    over the padded rows picks every nucleus candidate. Rows whose repetition check fires are redrawn
    one by one (rare). Used by batched decoding, where per-row sampling would cost a few device
    synchronisations per row and token.

    Args:
        logp: (R, V) log-probabilities (min-length masking already applied).
        histories: each row's previously decoded tokens.
        config: sampling parameters (shared by the rows).
        generators: one per row.

    Returns:
        The chosen token id of each row.
    """
    if logp.dim() != 2 or len(histories) != logp.shape[0] or len(generators) != logp.shape[0]:
        raise ValueError(f"ras_sample_rows needs (R, V) log-probs with R histories and generators; got "
                         f"{tuple(logp.shape)}, {len(histories)}, {len(generators)}")
    if config.temperature == 0.0:
        return logp.sort(dim=-1, descending=True, stable=True)[1][:, 0].tolist()
    logp = apply_temperature(logp, config.temperature)
    probs = logp.softmax(dim=-1)
    sorted_p, sorted_ids = probs.sort(dim=-1, descending=True, stable=True)
    head, head_ids = sorted_p[:, : config.top_k], sorted_ids[:, : config.top_k]
    host = torch.stack((head.float(), head_ids.float())).cpu().numpy()  # (2, R, k), one transfer
    counts = [_nucleus_count(row, config.top_p) for row in host[0]]
    # Padding: probability 0 and draw 1, so a padded slot never wins the argmax (a real candidate's
    # p/q is positive) and ties still go to the first maximum, as in draw_index.
    ratio = torch.zeros_like(head)
    for i, (count, gen) in enumerate(zip(counts, generators)):
        p_i = head[i, :count]
        ratio[i, :count] = p_i / exponential_draws(gen)(p_i).to(device=p_i.device, dtype=p_i.dtype)
    positions = ratio.argmax(dim=-1).tolist()
    tokens = []
    for i, pos in enumerate(positions):
        pick = int(host[1, i, pos])
        repeats = sum(1 for t in histories[i][-config.win_size:] if int(t) == pick)
        if repeats >= config.win_size * config.tau_r:  # same float product as ras_sample
            pick = _redraw(logp[i], pick, exponential_draws(generators[i]))
        tokens.append(pick)
    return tokens

