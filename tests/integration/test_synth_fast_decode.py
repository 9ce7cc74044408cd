"""The Synthesizer's pooled fast LLM decoder (``fast_decode``) on CPU, with the tiny random model dir.

On CPU the ``GraphedDecoder`` runs its static step eagerly (no CUDA graph), which exercises the same
pool, checkout/return and decode code as the GPU path. Checks: the fast path gives exactly the reference
tokens and audio for a seed, streaming matches one-shot, interleaved requests each get their own decoder,
the pool reuses and bounds its decoders, and ``--no_fast_decode`` reaches the Synthesizer and run.json.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from speaker_models import assert_same_takes, same_networks, speaker_model_dir

from cosytune.cli.main import main
from cosytune.infer.synthesizer import DecoderPool, SynthesisOptions, Synthesizer

TEXT = "Hello there, how are you today?"
LONG = ("A request long enough to be cut into several streamed chunks, so that two generators really take "
        "turns while both are still producing audio, chunk after chunk, until the end.")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model_dir):
    """Tiny random model dir with one SFT speaker, ``alice``."""
    return speaker_model_dir(tmp_path_factory.mktemp("fastdec") / "m", tokenizer_from=tiny_model_dir / "CosyVoice-BlankEN")


@pytest.fixture(scope="module")
def synths(model_dir):
    fast = Synthesizer.from_dir(model_dir, device="cpu", hash_files=False, fast_decode=True)
    # Same networks, reference decoder: differences can only come from the decoder.
    ref = same_networks(fast, fast_decode=False)
    return fast, ref


def _opts(seed: int = 11) -> SynthesisOptions:
    # No text front end: wetext's grammar load would dominate these tests' time and adds nothing here.
    return SynthesisOptions(seed=seed, text_frontend=False)


def test_auto_mode_is_off_on_cpu(synths):
    fast, _ = synths
    s = same_networks(fast)  # fast_decode=None: auto
    assert s.fast_decode is False and s.decoder_pool is None
    r = s.synthesize(TEXT, spk_id="alice", options=_opts())
    assert r.info["llm_decoder"] == "reference"


def test_fast_equals_reference_tokens_and_audio(synths):
    fast, ref = synths
    for a, _ in assert_same_takes(fast, ref, TEXT, (11, 12), ("static", "reference")):
        assert len(a.tokens) >= 2 * a.info["text_tokens"]


def test_draw_q_passes_through(synths):
    """Injected Exp(1) draws reach the fast decoder exactly as the reference one."""
    fast, ref = synths
    req = fast.prepare(TEXT, spk_id="alice", options=_opts())

    from cosytune.models.sampling import exponential_draws

    def draws():  # a separate random stream from the request's seeded generator
        return exponential_draws(torch.Generator().manual_seed(5))

    a = list(fast.generate_tokens(req, _opts(), 11, draw_q=draws()))
    b = list(ref.generate_tokens(req, _opts(), 11, draw_q=draws()))
    c = list(ref.generate_tokens(req, _opts(), 11))
    assert a == b and a != c


def test_streaming_fast_matches_one_shot(synths):
    fast, ref = synths
    chunks = list(fast.stream(LONG, spk_id="alice", options=_opts()))
    result = chunks[-1].result
    assert len(chunks) >= 3 and result.info["llm_decoder"] == "static"
    assert np.array_equal(np.concatenate([c.audio for c in chunks]), result.audio)
    assert result.tokens == fast.synthesize(LONG, spk_id="alice", options=_opts()).tokens
    ref_chunks = list(ref.stream(LONG, spk_id="alice", options=_opts()))
    assert all(np.array_equal(x.audio, y.audio) for x, y in zip(chunks, ref_chunks, strict=True))


def test_interleaved_streams_get_their_own_decoders(synths):
    fast, _ = synths
    pool = fast.decoder_pool
    alone = {s: [c.audio for c in fast.stream(LONG, spk_id="alice", options=_opts(s))] for s in (1, 2)}
    before = pool.stats()
    gen_a = fast.stream(LONG, spk_id="alice", options=_opts(1))
    gen_b = fast.stream(LONG, spk_id="alice", options=_opts(2))
    got_a, got_b = [next(gen_a).audio], [next(gen_b).audio]
    assert pool.stats()["in_use"] == 2  # both requests hold a decoder at once, never the same one
    for a, b in zip(gen_a, gen_b):
        got_a.append(a.audio)
        got_b.append(b.audio)
    got_a += [c.audio for c in gen_a]
    got_b += [c.audio for c in gen_b]
    after = pool.stats()
    assert after["in_use"] == 0 and after["peak_in_use"] >= 2
    assert after["released"] - before["released"] == 2
    for got, s in ((got_a, 1), (got_b, 2)):
        assert len(got) == len(alone[s]) and all(np.array_equal(x, y) for x, y in zip(got, alone[s]))
    # A stream closed early gives its decoder back.
    gen = fast.stream(LONG, spk_id="alice", options=_opts(3))
    next(gen)
    assert pool.stats()["in_use"] == 1
    gen.close()
    assert pool.stats()["in_use"] == 0


def test_two_threads_get_what_each_gets_alone(synths):
    import threading

    fast, ref = synths
    want = {s: ref.synthesize(LONG, spk_id="alice", options=_opts(s)).audio for s in (4, 5)}
    got: dict = {}
    start = threading.Barrier(2)

    def work(seed: int) -> None:
        start.wait()
        got[seed] = fast.synthesize(LONG, spk_id="alice", options=_opts(seed)).audio

    threads = [threading.Thread(target=work, args=(s,)) for s in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(got) == set(want) and all(np.array_equal(got[s], want[s]) for s in want)
    assert fast.decoder_pool.stats()["in_use"] == 0


def test_pool_reuses_and_is_bounded(synths):
    fast, _ = synths
    pool = DecoderPool(fast.llm, bucket=64, max_idle_per_bucket=2)
    s = same_networks(fast, fast_decode=True)
    s.decoder_pool = pool
    first = s.synthesize(TEXT, spk_id="alice", options=_opts())
    for _ in range(2):
        again = s.synthesize(TEXT, spk_id="alice", options=_opts())
        assert again.tokens == first.tokens
    st = pool.stats()
    assert st["created"] == 1 and st["reused"] == 2 and st["in_use"] == 0 and sum(st["idle"].values()) == 1
    # Capacities are bucketed and capped at max_position_embeddings; beyond it: reference fallback.
    limit = pool.limit
    assert pool.capacity_for(1) == 64 and pool.capacity_for(65) == 128 and pool.capacity_for(limit) == limit
    assert pool.capacity_for(limit + 1) is None and pool.acquire(limit + 1) is None
    # Four decoders out at once, all returned: only two stay idle in their bucket.
    held = [pool.acquire(10) for _ in range(4)]
    assert len({id(d) for d in held}) == 4 and pool.stats()["in_use"] == 4
    for d in held:
        pool.release(d)
    st = pool.stats()
    assert st["idle"][64] == 2 and st["discarded"] >= 2 and st["peak_in_use"] == 4 and st["fallbacks"] == 1


def test_too_long_prompt_falls_back_to_reference(synths):
    fast, ref = synths
    s = same_networks(fast, fast_decode=True)
    req = s.prepare(TEXT, spk_id="alice", options=_opts())
    s.decoder_pool = DecoderPool(fast.llm)
    s.decoder_pool.limit = 1  # every request now needs more than the cap
    info: dict = {}
    tokens = list(s.generate_tokens(req, _opts(), 11, info=info))
    assert info["llm_decoder"] == "reference" and tokens == list(ref.generate_tokens(req, _opts(), 11))


def test_cli_no_fast_decode_reaches_synthesizer(model_dir, tmp_path, monkeypatch):
    seen: list = []
    real = Synthesizer.from_dir.__func__

    def spy(cls, *args, **kw):
        seen.append((kw.get("fast_decode"), kw.get("compile_decode"), kw.get("fast_flow")))
        synth = real(cls, *args, **kw)
        assert synth.decode_compile_mode is None and not synth.fast_flow  # both CUDA-only
        return synth

    monkeypatch.setattr(Synthesizer, "from_dir", classmethod(spy))
    out = tmp_path / "o"
    base = ["--model_dir", str(model_dir), "--spk_id", "alice", "--seed", "5", "--device", "cpu", "--no_progress",
            "--no_text_frontend"]
    assert main(["infer", *base, "--text", TEXT, "--out_dir", str(out), "--no_fast_decode"]) == 0
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["settings"]["no_fast_decode"] is True and info["request"]["llm_decoder"] == "reference"
    assert main(["infer", *base, "--text", TEXT, "--out_dir", str(tmp_path / "p"), "--compile_decode",
                 "--fast_flow"]) == 0
    lines = tmp_path / "lines.txt"
    lines.write_text("One line.\nAnother line.\n", encoding="utf-8")
    assert main(["infer-batch", *base, "--input", str(lines), "--out_dir", str(tmp_path / "b"),
                 "--no-fast-decode"]) == 0
    batch = json.loads((tmp_path / "b" / "run.json").read_text(encoding="utf-8"))
    assert batch["request"]["llm_decoder"] == ["reference"]
    # fast decode and fast flow: auto (None: on for CUDA) unless turned off; compile: only when asked for
    assert seen == [(False, False, None), (None, True, True), (False, False, None)]
