"""Continuous batching of LLM decoding (``batch_decode``) on CPU, with the tiny random model dir.

On CPU the batch step runs eagerly (no CUDA graph) through the same loop thread, join/leave, per-row
sampler and KV copy as on the GPU. Checks: a request alone and concurrent requests (different seeds,
lengths, min-length rules, joining and leaving at different times) each get exactly the tokens and audio of
their own pooled decoder; the steps really are shared; rows beyond ``decode_rows`` wait their turn; a
stream closed early frees its row; requests the batcher cannot take go to the pooled decoders.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from concurrency import run_together
from speaker_models import assert_same_takes, same_networks, speaker_model_dir

from cosytune.infer.synthesizer import SynthesisOptions, Synthesizer
from cosytune.models.sampling import SamplingConfig

SHORT = "Hello there, how are you today?"
LONG = ("A request long enough to be cut into several streamed chunks, so that two generators really take "
        "turns while both are still producing audio, chunk after chunk, until the end.")


@pytest.fixture(scope="module")
def synths(tmp_path_factory):
    d = speaker_model_dir(tmp_path_factory.mktemp("batchdec") / "m")
    batched = Synthesizer.from_dir(d, device="cpu", hash_files=False, fast_decode=True, batch_decode=True)
    # Same networks, one pooled decoder per request: differences can only come from the batching.
    pooled = same_networks(batched, fast_decode=True, batch_decode=False)
    assert pooled.batcher is None and batched.batcher is not None
    return batched, pooled


def _opts(seed: int, **kw) -> SynthesisOptions:
    return SynthesisOptions(seed=seed, text_frontend=False, **kw)


def test_alone_it_equals_the_pooled_decoder(synths):
    batched, pooled = synths
    assert_same_takes(batched, pooled, SHORT, (3, 4), ("batched", "static"))


def test_concurrent_requests_each_get_their_own_tokens(synths):
    batched, pooled = synths
    # Different texts (so rows leave at different steps), seeds and min-length rules, one with other
    # sampling settings; each must decode exactly as it does alone.
    cases = [(LONG, 1, "all_stops", None), (SHORT, 2, "all_stops", None), (LONG, 3, "upstream", None),
             (SHORT, 4, "upstream", SamplingConfig(top_k=5, top_p=0.6)), (LONG, 5, "all_stops", None),
             (SHORT, 6, "all_stops", SamplingConfig(win_size=4, tau_r=0.5))]

    def opts(seed, mode, sampling):
        return _opts(seed, min_len_mode=mode, sampling=sampling)

    alone = {c: pooled.synthesize(c[0], spk_id="alice", options=opts(*c[1:])) for c in cases}
    before = batched.batcher.stats()
    got = run_together(lambda text, seed, mode, sampling: batched.synthesize(
        text, spk_id="alice", options=opts(seed, mode, sampling)), cases)
    after = batched.batcher.stats()
    for c in cases:
        assert got[c].info["llm_decoder"] == "batched"
        assert got[c].tokens == alone[c].tokens, c
        assert np.array_equal(got[c].audio, alone[c].audio), c
    steps, row_steps = after["steps"] - before["steps"], after["row_steps"] - before["row_steps"]
    # Shared steps: fewer batch steps than tokens decoded, and more than one row in some step.
    assert steps < row_steps and after["peak_rows"] >= 2 and after["in_use"] == 0
    # The steps' time by phase is accounted (launch and read always take some; the gate may be free).
    assert after["launch_s"] > before["launch_s"] and after["read_s"] > before["read_s"]
    assert after["pick_s"] > before["pick_s"] and after["gate_s"] >= before["gate_s"]


def test_rows_beyond_the_limit_wait_their_turn(synths):
    batched, pooled = synths
    small = same_networks(batched, fast_decode=True, batch_decode=True, decode_rows=2)
    seeds = [(s,) for s in (21, 22, 23, 24, 25)]
    alone = {s: pooled.synthesize(SHORT, spk_id="alice", options=_opts(s[0])).tokens for s in seeds}
    got = run_together(lambda seed: small.synthesize(SHORT, spk_id="alice", options=_opts(seed)).tokens, seeds)
    assert got == alone
    st = small.batcher.stats()
    assert st["peak_rows"] == 2 and st["requests"] == 5 and st["in_use"] == 0
    small.batcher.close()


def test_a_stream_closed_early_frees_its_row_and_others_go_on(synths):
    batched, pooled = synths
    want = [c.audio for c in pooled.stream(LONG, spk_id="alice", options=_opts(8))]
    keep = batched.stream(LONG, spk_id="alice", options=_opts(8))
    leave = batched.stream(LONG, spk_id="alice", options=_opts(9))
    got = [next(keep).audio]
    next(leave)
    assert batched.batcher.stats()["in_use"] >= 1
    leave.close()
    got += [c.audio for c in keep]
    assert len(got) == len(want) and all(np.array_equal(x, y) for x, y in zip(got, want, strict=True))
    # The closed row is dropped at the loop's next turn.
    for _ in range(200):
        if batched.batcher.stats()["in_use"] == 0:
            break
        threading.Event().wait(0.05)
    assert batched.batcher.stats()["in_use"] == 0


def test_requests_it_cannot_take_use_the_pooled_decoders(synths):
    batched, pooled = synths
    warm = _opts(5, sampling=SamplingConfig(temperature=0.8))
    a = batched.synthesize(SHORT, spk_id="alice", options=warm)
    b = pooled.synthesize(SHORT, spk_id="alice", options=warm)
    assert a.info["llm_decoder"] == "static" and a.tokens == b.tokens
    req = batched.prepare(SHORT, spk_id="alice", options=_opts(5))

    from cosytune.models.sampling import exponential_draws

    info: dict = {}
    tokens = list(batched.generate_tokens(req, _opts(5), 5, draw_q=exponential_draws(torch.Generator().manual_seed(1)),
                                          info=info))
    assert info["llm_decoder"] == "static" and tokens
    # A prompt beyond every capacity bucket: the batcher says no, the pool's rule decides.
    prompt = batched.llm.build_prompt(req.text_ids, req.llm_prompt_ids, req.llm_prompt_speech)
    assert batched.batcher.accepts(prompt)
    assert not batched.batcher.accepts(replace(prompt, max_len=batched.decoder_pool.limit + 1))


@pytest.mark.gpu
def test_batched_equals_pooled_on_cuda(tmp_path):
    """On the GPU: alone, the batched row gets the pooled decoder's tokens bit for bit (same shapes, same
    draws made ahead from the request's generator); together, every request still finishes and speaks."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    d = speaker_model_dir(tmp_path / "m")
    batched = Synthesizer.from_dir(d, device="cuda", hash_files=False, warmup=False)
    assert batched.batcher is not None
    pooled = same_networks(batched, batch_decode=False)
    for seed in (1, 2, 3):
        a = batched.synthesize(LONG, spk_id="alice", options=_opts(seed))
        b = pooled.synthesize(LONG, spk_id="alice", options=_opts(seed))
        assert a.info["llm_decoder"] == "batched" and b.info["llm_decoder"] == "graph"
        assert a.tokens == b.tokens
    got = run_together(lambda seed: batched.synthesize(LONG, spk_id="alice", options=_opts(seed)),
                        [(s,) for s in range(8)])
    assert all(len(r.tokens) > 0 and r.audio.size for r in got.values())
    assert batched.batcher.stats()["peak_rows"] >= 2


def test_the_loop_thread_ends_when_idle_and_comes_back(synths, monkeypatch):
    from cosytune.infer import batching

    batched, pooled = synths
    monkeypatch.setattr(batching, "IDLE_EXIT_S", 0.2)
    b = batching.DecodeBatcher(batched.llm, batched.decoder_pool.capacity_for, max_rows=4)
    assert batching.row_buckets(4) == [1, 2, 4] and batching.row_buckets(6) == [1, 2, 4, 6]
    req = batched.prepare(SHORT, spk_id="alice", options=_opts(7))
    prompt = batched.llm.build_prompt(req.text_ids, req.llm_prompt_ids, req.llm_prompt_speech)
    sampling = batched.llm.config.sampling
    dec = pooled.decoder_pool.acquire(prompt.lm_input.shape[1] + prompt.max_len)
    want = [s.token_id for s in dec.decode(prompt, sampling=sampling, generator=torch.Generator().manual_seed(7))]
    pooled.decoder_pool.release(dec)
    for _ in range(2):  # the second request starts a new loop thread after the first one ended
        got = [s.token_id for s in b.decode(prompt, sampling=sampling, generator=torch.Generator().manual_seed(7))]
        assert got == want
        for _ in range(100):
            if b._thread is None:
                break
            threading.Event().wait(0.05)
        assert b._thread is None
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(b.decode(prompt, sampling=sampling, generator=torch.Generator().manual_seed(7)))
    with pytest.raises(ValueError, match="capacity"):
        next(b.decode(replace(prompt, max_len=10**9), sampling=sampling, generator=torch.Generator()))


def test_repetition_redraws_match_the_single_decoder(synths):
    """tau_r=0 makes the repetition rule redraw at every step after the first: the batch reads all rows'
    redraws in one transfer and must still make each row's exact decisions."""
    batched, pooled = synths
    sampling = SamplingConfig(tau_r=0.0)
    prompts = {}
    for seed, text in ((31, SHORT), (32, LONG), (33, SHORT)):
        req = batched.prepare(text, spk_id="alice", options=_opts(seed))
        prompts[seed] = batched.llm.build_prompt(req.text_ids, req.llm_prompt_ids, req.llm_prompt_speech)
    want = {}
    for seed, prompt in prompts.items():
        dec = pooled.decoder_pool.acquire(prompt.lm_input.shape[1] + prompt.max_len)
        want[seed] = [s.sample for s in dec.decode(prompt, sampling=sampling,
                                                   generator=torch.Generator().manual_seed(seed))]
        pooled.decoder_pool.release(dec)
    got = run_together(lambda seed: [s.sample for s in batched.batcher.decode(
        prompts[seed], sampling=sampling, generator=torch.Generator().manual_seed(seed))], [(s,) for s in prompts])
    assert {s: got[(s,)] for s in prompts} == want
    assert all(sum(r.ras_redraw for r in rs) == len(rs) for rs in want.values())


def test_the_batcher_lowers_the_thread_switch_interval_never_raises_it(synths):
    """The loop thread must get the GIL back quickly from request threads: a batcher lowers the interpreter's
    switch interval to what it was given (CUDA's default, SWITCH_INTERVAL_S; CPU leaves it alone) and never
    raises one already lower."""
    import sys

    from cosytune.infer import batching

    batched, _ = synths
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        batching.DecodeBatcher(batched.llm, batched.decoder_pool.capacity_for, max_rows=2).close()
        assert sys.getswitchinterval() == pytest.approx(0.005)  # CPU: untouched
        batching.DecodeBatcher(batched.llm, batched.decoder_pool.capacity_for, max_rows=2,
                               switch_interval=batching.SWITCH_INTERVAL_S).close()
        assert sys.getswitchinterval() == pytest.approx(batching.SWITCH_INTERVAL_S)
        batching.DecodeBatcher(batched.llm, batched.decoder_pool.capacity_for, max_rows=2,
                               switch_interval=0.002).close()
        assert sys.getswitchinterval() == pytest.approx(batching.SWITCH_INTERVAL_S)  # never raised
    finally:
        sys.setswitchinterval(before)
