"""Issue 14's fast-by-default paths on CPU with tiny models (GPU checks are ``gpu``-marked).

* RAS sampled from the decoder's in-step softmax/sort (``sample_decode``: one transfer per token) gives the
  reference decoder's steps exactly: tokens, candidates, picks, redraws.
* Concurrent requests from many threads, while another thread keeps taking the device gate exclusively (as
  CUDA graph captures do), each get exactly what they get alone.
* The default Synthesizer and the opt-in paths give the same tokens for the same seed; on CPU the defaults
  resolve to float32 and eager flow/vocoder, and the warm-up is a no-op.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from concurrency import run_together
from speaker_models import assert_same_takes, same_networks, speaker_model_dir

from cosytune.infer.fast import GraphedDecoder
from cosytune.infer.synthesizer import SynthesisOptions, Synthesizer
from cosytune.models.llm import CosyVoice3LM, LLMConfig
from cosytune.models.qwen2 import Qwen2Config
from cosytune.models.sampling import SamplingConfig

SMALL = LLMConfig(qwen2=Qwen2Config(vocab_size=200, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_window_layers=2),
                  endofprompt_id=150, speech_token_size=40, num_special_tokens=8)
TEXT = "Hello there, how are you today?"
LONG = ("A request long enough to be cut into several streamed chunks, so that threads really take turns while "
        "all of them are still producing audio.")


def _lm(device: str = "cpu") -> CosyVoice3LM:
    model = CosyVoice3LM(SMALL).eval()
    model.init_weights(torch.Generator().manual_seed(3), std=0.5)
    return model.to(device)


def _steps(source, prompt, sampling, seed, mode, device="cpu"):
    gen = torch.Generator(device=device).manual_seed(seed)
    return [(s.token_id, s.sample.candidate_ids, s.sample.nucleus_pick_pos, s.sample.ras_redraw, s.logp.cpu())
            for s in source.decode(prompt, sampling=sampling, generator=gen, min_len_mode=mode)]


@pytest.mark.parametrize("mode", ["all_stops", "upstream"])
def test_sample_decode_equals_reference_decode(mode):
    """Same prompt, seed and sampler -> the same steps as ``CosyVoice3LM.decode``, redraws included."""
    model = _lm()
    # A small vocabulary and a short window make nucleus boundaries, stops and repetition redraws common.
    configs = [SamplingConfig(), SamplingConfig(top_p=0.6, top_k=3, win_size=4, tau_r=0.25)]
    redraws = stops_early = 0
    for i, sampling in enumerate(configs):
        for seed in range(6):
            prompt = model.build_prompt([5 + seed, 150, 7], prompt_speech_token=[1, 2][: seed % 3],
                                        min_token_text_ratio=2.0, max_token_text_ratio=12.0)
            dec = GraphedDecoder(model, 1, 64, sample_head=True)
            ref = _steps(model, prompt, sampling, 100 * i + seed, mode)
            got = _steps(dec, prompt, sampling, 100 * i + seed, mode)
            assert [g[:4] for g in got] == [r[:4] for r in ref]
            for g, r in zip(got, ref):
                torch.testing.assert_close(g[4], r[4], rtol=0, atol=1e-5)
            redraws += sum(r[3] for r in ref)
            stops_early += len(ref) < prompt.max_len
    assert redraws > 0 and stops_early > 0  # the cases worth checking did occur


def test_sample_decode_falls_back_for_injected_draws_and_temperature():
    from cosytune.models.sampling import exponential_draws

    model = _lm()
    prompt = model.build_prompt([9, 150, 7])
    dec = GraphedDecoder(model, 1, 128, sample_head=True)
    warm = SamplingConfig(temperature=0.7)
    got, ref = _steps(dec, prompt, warm, 4, "all_stops"), _steps(model, prompt, warm, 4, "all_stops")
    assert [g[:4] for g in got] == [r[:4] for r in ref]

    def tokens(source):
        q = exponential_draws(torch.Generator().manual_seed(8))
        return [s.token_id for s in source.decode(prompt, generator=torch.Generator().manual_seed(1), draw_q=q)]

    assert tokens(dec) == tokens(model)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model_dir):
    return speaker_model_dir(tmp_path_factory.mktemp("speed") / "m", tokenizer_from=tiny_model_dir / "CosyVoice-BlankEN")


def _opts(seed: int) -> SynthesisOptions:
    return SynthesisOptions(seed=seed, text_frontend=False)


def test_defaults_on_cpu_and_opt_in_paths_give_the_same_tokens(model_dir):
    default = Synthesizer.from_dir(model_dir, device="cpu", hash_files=False)
    assert default.dtype is torch.float32 and not default.fast_decode
    assert not default.fast_flow and not default.fast_vocoder and default.decoder_pool is None
    assert default.warmup() == {"decoder_graphs": 0, "flow_graphs": 0, "seconds": 0.0}
    opt_in = same_networks(default, fast_decode=True, fast_flow=True, fast_vocoder=True, compile_decode=True)
    assert_same_takes(default, opt_in, TEXT, (3, 4), ("reference", "static"))


def test_concurrent_requests_each_get_what_they_get_alone(model_dir):
    """Four threads (two streaming, two not) share one Synthesizer while a seventh keeps taking the gate
    exclusively, as captures do: every request gets exactly its lone tokens and audio, nothing hangs."""
    synth = Synthesizer.from_dir(model_dir, device="cpu", hash_files=False, fast_decode=True)
    seeds = list(range(21, 25))

    def run(seed: int) -> tuple[list[int], np.ndarray]:
        if seed % 2:
            chunks = list(synth.stream(LONG, spk_id="alice", options=_opts(seed)))
            return chunks[-1].result.tokens, np.concatenate([c.audio for c in chunks])
        r = synth.synthesize(LONG, spk_id="alice", options=_opts(seed))
        return r.tokens, r.audio

    alone = {s: run(s) for s in seeds}
    got: dict = {}
    errors: list[BaseException] = []
    stop = threading.Event()
    start = threading.Barrier(len(seeds) + 1)

    def client(seed: int) -> None:
        start.wait()
        try:
            got[seed] = run(seed)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def capturer() -> None:
        start.wait()
        while not stop.is_set():
            with synth.gate.exclusive():
                stop.wait(0.002)
            stop.wait(0.01)  # launchers get their turn between captures

    threads = [threading.Thread(target=client, args=(s,)) for s in seeds]
    cap = threading.Thread(target=capturer)
    for t in [*threads, cap]:
        t.start()
    for t in threads:
        t.join(600)
    stop.set()
    cap.join(10)
    assert not errors and not any(t.is_alive() for t in [*threads, cap])
    assert synth.gate.exclusive_count > 0
    for s in seeds:
        assert got[s][0] == alone[s][0] and np.array_equal(got[s][1], alone[s][1]), f"seed {s} differs"
    assert synth.decoder_pool.stats()["in_use"] == 0


@pytest.mark.gpu
def test_sample_decode_on_cuda_equals_reference_decode():
    """On CUDA the top-k draws are made before the nucleus size is known; they equal the reference's."""
    model = _lm("cuda")
    sampling = SamplingConfig(top_p=0.6, top_k=3, win_size=4, tau_r=0.25)
    for seed in range(8):
        prompt = model.build_prompt([5 + seed, 150, 7], prompt_speech_token=[1, 2][: seed % 3],
                                    min_token_text_ratio=2.0, max_token_text_ratio=12.0)
        for sampler in (SamplingConfig(), sampling):
            ref = _steps(model, prompt, sampler, seed, "all_stops", "cuda")
            for use_graph in (False, True):
                dec = GraphedDecoder(model, 1, 64, sample_head=True, use_graph=use_graph)
                got = _steps(dec, prompt, sampler, seed, "all_stops", "cuda")
                assert [g[:4] for g in got] == [r[:4] for r in ref]


@pytest.mark.gpu
def test_cuda_defaults_and_concurrent_captures(model_dir):
    """The default CUDA Synthesizer (bf16 where supported, graphs everywhere), *without* the warm-up so that
    16 threads capture new decoder/flow/vocoder graphs while the others launch: no capture error, and each
    request gets what it gets alone. Per-request decoders (``batch_decode=False``): that path promises equal
    tokens under load; the continuous batcher promises it only for a request alone (test_batch_decode.py)."""
    synth = Synthesizer.from_dir(model_dir, device="cuda", hash_files=False, warmup=False, batch_decode=False)
    assert synth.fast_decode and synth.fast_flow and synth.fast_vocoder
    assert synth.dtype is (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    seeds = list(range(40, 56))

    def run(seed: int):
        if seed % 2:
            chunks = list(synth.stream(LONG, spk_id="alice", options=_opts(seed)))
            return chunks[-1].result.tokens, np.concatenate([c.audio for c in chunks])
        r = synth.synthesize(LONG, spk_id="alice", options=_opts(seed))
        return r.tokens, r.audio

    got = run_together(run, [(s,) for s in seeds])
    assert synth.gate.exclusive_count > 0  # captures did happen during the concurrent run
    for s in seeds:
        tokens, audio = run(s)
        assert got[(s,)][0] == tokens
        np.testing.assert_allclose(got[(s,)][1], audio, atol=1e-4)
    info = Synthesizer.from_dir(model_dir, device="cuda", hash_files=False).warmup_info
    assert info["decoder_graphs"] > 0 and info["flow_graphs"] > 0


def test_stream_cache_gives_the_recomputing_streams_audio(model_dir):
    """``stream_cache``: each chunk's flow solve covers its own frames only; same chunks, same tokens, the
    same audio up to float rounding as the stream that re-solves the prefix."""
    plain = Synthesizer.from_dir(model_dir, device="cpu", hash_files=False)
    cached = same_networks(plain, stream_cache=True)
    a = list(plain.stream(LONG, spk_id="alice", options=_opts(7)))
    b = list(cached.stream(LONG, spk_id="alice", options=_opts(7)))
    assert len(a) == len(b) >= 3 and a[-1].result.tokens == b[-1].result.tokens
    for x, y in zip(a, b):
        assert x.audio.shape == y.audio.shape
        np.testing.assert_allclose(x.audio, y.audio, atol=1e-4)
