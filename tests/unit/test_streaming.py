"""Streaming schedule and silence thinning (pure bookkeeping; no model needed)."""

from __future__ import annotations

import pytest

from cosytune.infer.streaming import SilenceThinner, StreamSchedule, StreamState
from cosytune.models.llm import LLMConfig


def _drain(state: StreamState, total: int, feed_step: int = 1):
    """Feed ``total`` tokens ``feed_step`` at a time, collecting every chunk (then the final one)."""
    chunks = []
    for start in range(0, total, feed_step):
        state.tokens.extend(range(start, min(total, start + feed_step)))
        while (c := state.next_chunk()) is not None:
            chunks.append(c)
    chunks.append(state.final_chunk())
    return chunks


@pytest.mark.parametrize("prompt_tokens", [0, 10, 25, 37])
def test_schedule_matches_upstream(prompt_tokens):
    sched = StreamSchedule()
    chunks = _drain(StreamState(sched, prompt_tokens), 400)
    pad = (-prompt_tokens) % 25
    hops = [c.hop for c in chunks[:-1]]
    assert hops[:4] == [25 + pad, 50, 100, 100]
    for c in chunks[:-1]:
        assert c.end == c.offset + c.hop + sched.pre_lookahead_len and not c.final
    # Prompt + first hop ends on a DiT chunk boundary (25 tokens = 50 frames).
    assert (prompt_tokens + chunks[0].hop) % 25 == 0
    # Chunks tile the token sequence exactly once.
    covered = [t for c in chunks for t in range(c.offset, c.offset + c.hop)]
    assert covered == list(range(400))
    assert chunks[-1].final and chunks[-1].end == 400


def test_schedule_does_not_depend_on_arrival_pattern():
    a = _drain(StreamState(StreamSchedule(), 7), 333, feed_step=1)
    b = _drain(StreamState(StreamSchedule(), 7), 333, feed_step=57)
    assert a == b


def test_hop_growth_is_per_request():
    """Upstream grows the hop on the shared model; here a second request starts from 25 again."""
    first = StreamState(StreamSchedule(), 0)
    _drain(first, 300)
    assert first.hop == 100
    second = StreamState(StreamSchedule(), 0)
    assert second.next_chunk() is None and second.hop == 25


def test_short_utterance_is_one_final_chunk():
    state = StreamState(StreamSchedule(), 5)
    state.tokens.extend(range(10))
    assert state.next_chunk() is None
    final = state.final_chunk()
    assert (final.offset, final.end, final.final) == (0, 10, True)
    with pytest.raises(ValueError):
        state.final_chunk()
    assert state.next_chunk() is None


def test_silence_thinning_keeps_five_in_a_row():
    s = min(LLMConfig().silent_tokens)
    thinner = SilenceThinner(max_run=5)
    seq = [7] + [s] * 8 + [9] + [s] * 3
    kept = [t for t in seq if thinner.accept(t)]
    assert kept == [7] + [s] * 5 + [9] + [s] * 3
    assert thinner.dropped == 3
    off = SilenceThinner(max_run=0)
    assert all(off.accept(t) for t in seq)


def test_schedule_rejects_bad_constants():
    with pytest.raises(ValueError):
        StreamSchedule(token_hop_len=0)
    with pytest.raises(ValueError):
        StreamSchedule(token_hop_len=50, token_max_hop_len=25)
