"""Fast inference paths (cosytune.infer.fast) equal the reference paths; GPU-only checks skip on CPU."""

from __future__ import annotations

import shutil

import pytest
import torch

from cosytune.infer.fast import GraphedDecoder, GraphedFlowSampler, batched_cfg_sample
from cosytune.modeldir.builders import build_network
from cosytune.modeldir.presets import preset_hparams
from cosytune.models.llm import CosyVoice3LM, LLMConfig
from cosytune.models.qwen2 import KVCache, Qwen2Config
from cosytune.models.sampling import SamplingConfig

SMALL = LLMConfig(qwen2=Qwen2Config(vocab_size=200, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_window_layers=2),
                  endofprompt_id=150)


def _lm(device: str = "cpu", config: LLMConfig = SMALL) -> CosyVoice3LM:
    model = CosyVoice3LM(config).eval()
    model.init_weights(torch.Generator().manual_seed(3), std=0.5)  # on CPU, then moved
    return model.to(device)


def _prompts(model: CosyVoice3LM, n: int) -> list:
    return [model.build_prompt([5 + i, 150, 7, 9][: 2 + (i % 3)] + [150], prompt_speech_token=[1, 2, 3][: i % 4])
            for i in range(n)]


def test_static_step_equals_eager_step_and_reuses_cache():
    """The decoder's static-buffer step gives the eager ``step_logp`` results, row by row, over two prefills."""
    model = _lm()
    prompts = _prompts(model, 3)
    dec = GraphedDecoder(model, 3, 24, use_graph=True)  # no graph on CPU: same static code path
    for _ in range(2):  # second round: the same cache is reset and refilled
        logp = dec.prefill([p.lm_input for p in prompts]).clone()
        ref_cache = KVCache.allocate(model.config.qwen2, 1, 24)
        for i, p in enumerate(prompts):
            ref_cache.reset()
            with torch.no_grad():
                hidden, _ = model.llm.model.model.prefill(p.lm_input, ref_cache)
                torch.testing.assert_close(logp[i], model._logp(hidden[:, -1])[0], rtol=1e-5, atol=1e-5)
        out = dec.step(torch.tensor([4, 8, 15])).clone()
        with torch.no_grad():
            for i, p in enumerate(prompts):
                ref_cache.reset()
                model.llm.model.model.prefill(p.lm_input, ref_cache)
                ref, _ = model.step_logp(torch.tensor([[4, 8, 15][i]]), ref_cache)
                torch.testing.assert_close(out[i], ref[0], rtol=1e-5, atol=1e-5)
        assert out.shape == (3, model.config.speech_vocab_size)


def test_batched_rows_match_single_rows_over_several_steps():
    model = _lm()
    prompts = _prompts(model, 3)
    dec = GraphedDecoder(model, 3, 24)
    dec.prefill([p.lm_input for p in prompts])
    feeds = [torch.tensor([4, 8, 15]), torch.tensor([16, 23, 42]), torch.tensor([1, 0, 6760])]
    outs = [dec.step(f).clone() for f in feeds]
    assert dec.cache.lengths.tolist() == [p.lm_input.shape[1] + 3 for p in prompts]
    with torch.no_grad():
        for i, p in enumerate(prompts):
            c = KVCache.allocate(model.config.qwen2, 1, 24)
            model.llm.model.model.prefill(p.lm_input, c)
            for k, f in enumerate(feeds):
                ref, c = model.step_logp(f[i: i + 1], c)
                torch.testing.assert_close(outs[k][i], ref[0], rtol=1e-5, atol=1e-5)


def test_decode_equals_reference_decode_tokens():
    """Same prompt, same sampler, same generator seed -> the same token ids as ``CosyVoice3LM.decode``."""
    model = _lm()
    prompt = _prompts(model, 2)[1]
    sampling = SamplingConfig()
    ref = [s.token_id for s in model.decode(prompt, sampling=sampling, generator=torch.Generator().manual_seed(1))]
    dec = GraphedDecoder(model, 1, prompt.lm_input.shape[1] + prompt.max_len)
    fast = [s.token_id for s in dec.decode(prompt, sampling=sampling, generator=torch.Generator().manual_seed(1))]
    assert fast == ref and len(ref) > 1


def test_decode_rejects_too_small_cache_and_wrong_batch():
    model = _lm()
    prompt = _prompts(model, 1)[0]
    with pytest.raises(ValueError, match="capacity"):
        list(GraphedDecoder(model, 1, prompt.lm_input.shape[1] + 1).decode(prompt))
    with pytest.raises(ValueError, match="batch-1"):
        list(GraphedDecoder(model, 2, 64).decode(prompt))
    with pytest.raises(ValueError, match="2 rows"):
        GraphedDecoder(model, 2, 64).prefill([prompt.lm_input])


@pytest.fixture(scope="module")
def tiny_flow():
    torch.manual_seed(0)
    return build_network("flow", preset_hparams("tiny")).eval()


def test_batched_cfg_sample_equals_reference_sample(tiny_flow):
    """B=1 equals ``CausalConditionalCFM.sample``; each row of a B=2 batch equals its own B=1 run."""
    dec = tiny_flow.decoder
    n_mels = dec.estimator.proj_out.out_features if hasattr(dec.estimator, "proj_out") else 80
    T = 20
    g = torch.Generator().manual_seed(0)
    mu, cond = torch.randn(2, n_mels, T, generator=g), torch.randn(2, n_mels, T, generator=g)
    spks = torch.randn(2, n_mels, generator=g)
    mask = torch.ones(2, 1, T)
    t_span = dec.time_grid(4, torch.float32, torch.device("cpu"))
    noise = dec.fixed_noise(T, torch.device("cpu"), torch.float32)
    ref = [dec.sample(mu[i:i + 1], mask[:1], spks[i:i + 1], cond[i:i + 1], n_timesteps=4, cfg_rate=0.7)
           for i in range(2)]
    fast = batched_cfg_sample(dec.estimator, mu, mask, spks, cond, noise.expand(2, -1, -1), t_span, 0.7)
    for i in range(2):
        torch.testing.assert_close(fast[i: i + 1], ref[i], rtol=1e-5, atol=1e-5)
    # bf16 autocast stays close to fp32 (the benchmark reports the full-size error)
    bf = batched_cfg_sample(dec.estimator, mu, mask, spks, cond, noise.expand(2, -1, -1), t_span, 0.7,
                            autocast_dtype=torch.bfloat16)
    assert bf.dtype == torch.float32 and torch.isfinite(bf).all()
    assert (bf - fast).abs().max() < 0.5 * fast.abs().max()


@pytest.mark.gpu
def test_cuda_graph_matches_eager_on_gpu():
    """Graph replay vs the eager static step on GPU, in fp32 and bf16: same logits within tolerance, same argmax."""
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        model = _lm("cuda", LLMConfig.tiny()).to(dtype)
        prompts = [model.build_prompt([5, 6, model.config.endofprompt_id], prompt_speech_token=[1, 2, 3][:i])
                   for i in range(4)]
        graph = GraphedDecoder(model, 4, 64, use_graph=True, prefill_bucket=8)
        eager = GraphedDecoder(model, 4, 64, use_graph=False)
        for _ in range(2):  # the second prefill replays the captured prefill graph
            a = graph.prefill([p.lm_input for p in prompts]).clone()
            b = eager.prefill([p.lm_input for p in prompts]).clone()
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        assert len(graph._prefill_graphs) == 1 and torch.equal(graph.cache.lengths, eager.cache.lengths)
        for k in range(20):
            feed = torch.tensor([k, k + 1, 100 + k, 6000], device="cuda")
            a, b = graph.step(feed).clone(), eager.step(feed).clone()
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        assert torch.equal(graph.cache.lengths, eager.cache.lengths)


def test_step_argmax_feeds_back_greedy_ids_on_device():
    model = _lm()
    prompts = _prompts(model, 2)
    dec = GraphedDecoder(model, 2, 24)
    first = dec.prefill([p.lm_input for p in prompts]).argmax(-1)
    dec.argmax.copy_(first)
    ids = dec.step_argmax().clone()
    assert ids.shape == (2,) and ids.dtype == torch.long
    ref = GraphedDecoder(model, 2, 24)
    ref.prefill([p.lm_input for p in prompts])
    assert torch.equal(ref.step(first).argmax(-1), ids)


@pytest.mark.gpu
def test_batched_cfg_sample_on_gpu_matches_cpu_reference(tiny_flow):
    """The batched sampler on GPU (fp32) equals the CPU reference sample; bf16 autocast stays close."""
    dec = tiny_flow.decoder
    T = 40
    g = torch.Generator().manual_seed(1)
    mu, cond, spks = torch.randn(1, 80, T, generator=g), torch.randn(1, 80, T, generator=g), torch.randn(1, 80, generator=g)
    ref = dec.sample(mu, torch.ones(1, 1, T), spks, cond, n_timesteps=10, cfg_rate=0.7)
    est = build_network("flow", preset_hparams("tiny")).eval()
    est.load_state_dict(tiny_flow.state_dict())
    est = est.to("cuda").decoder
    cuda = torch.device("cuda")
    args = (mu.to(cuda), torch.ones(1, 1, T, device=cuda), spks.to(cuda), cond.to(cuda),
            dec.fixed_noise(T, cuda, torch.float32), est.time_grid(10, torch.float32, cuda), 0.7)
    fast = batched_cfg_sample(est.estimator, *args)
    torch.testing.assert_close(fast.cpu(), ref, rtol=1e-3, atol=1e-3)
    bf = batched_cfg_sample(est.estimator, *args, autocast_dtype=torch.bfloat16)
    assert float((bf.cpu() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()) < 0.05


needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("g++") is None,
                              reason="torch.compile on CPU needs a C/C++ compiler")


@needs_cc
def test_compiled_step_equals_eager_step():
    """The torch.compile'd step body (forced on CPU) gives the eager step's log-probs and advances the cache alike."""
    model = _lm()
    prompts = _prompts(model, 2)
    eager = GraphedDecoder(model, 2, 24)
    fast = GraphedDecoder(model, 2, 24, compile_mode="default", force_compile=True)
    assert fast.compiled and not eager.compiled
    # Every decoder shape of a pool / batcher compiles the same function: dynamo must not stop at its default 8.
    import torch._dynamo.config as dynamo_config

    assert dynamo_config.recompile_limit >= 128
    for d in (eager, fast):
        d.prefill([p.lm_input for p in prompts])
    for k in range(4):
        feed = torch.tensor([k, 50 + k])
        torch.testing.assert_close(fast.step(feed).clone(), eager.step(feed).clone(), rtol=1e-4, atol=1e-4)
        assert torch.equal(fast.cache.lengths, eager.cache.lengths)


def test_flow_sampler_hook_equals_reference_inference(tiny_flow):
    """``inference(sampler=GraphedFlowSampler)`` gives the reference mel, full and streaming (CPU: no graph)."""
    cfg = tiny_flow.config
    g = torch.Generator().manual_seed(2)
    token = torch.randint(0, cfg.vocab_size, (1, 12), generator=g)
    ptoken = torch.randint(0, cfg.vocab_size, (1, 5), generator=g)
    pfeat = torch.randn(1, 10, cfg.output_size, generator=g)
    emb = torch.randn(1, cfg.spk_embed_dim, generator=g)
    sampler = GraphedFlowSampler(tiny_flow.decoder)
    for streaming, finalize in ((False, True), (True, False)):
        ref = tiny_flow.inference(token, ptoken, pfeat, emb, streaming=streaming, finalize=finalize, n_timesteps=3)
        fast = tiny_flow.inference(token, ptoken, pfeat, emb, streaming=streaming, finalize=finalize, n_timesteps=3,
                                   sampler=sampler)
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert sampler.captures == 0  # no graphs on CPU


@pytest.mark.gpu
def test_graphed_flow_sampler_on_gpu(tiny_flow):
    """Graph replay equals the eager batched solve for new inputs of a captured shape; shapes are LRU-bounded."""
    flow = build_network("flow", preset_hparams("tiny")).eval()
    flow.load_state_dict(tiny_flow.state_dict())
    flow = flow.to("cuda")
    dec = flow.decoder
    eager = GraphedFlowSampler(dec, use_graph=False)
    graphed = GraphedFlowSampler(dec, max_graphs=2)
    for T in (30, 30, 40, 50, 30):
        g = torch.Generator().manual_seed(T)
        mu, cond = torch.randn(2, 80, T, generator=g).cuda(), torch.randn(2, 80, T, generator=g).cuda()
        spks, mask = torch.randn(2, 80, generator=g).cuda(), torch.ones(2, 1, T, device="cuda")
        for streaming in (False, True):
            ref = eager(mu, mask, spks, cond, n_timesteps=4, streaming=streaming)
            out = graphed(mu, mask, spks, cond, n_timesteps=4, streaming=streaming).clone()
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert len(graphed._graphs) == 2 and graphed.captures == 8  # 30,40,50 twice each + 30 again twice


def test_flow_sampler_bucket_padding_keeps_valid_frames(tiny_flow):
    """Right-padding the frames to a bucket (mask 0) leaves the valid frames' mel unchanged, full and streaming."""
    dec = tiny_flow.decoder
    T = 37
    g = torch.Generator().manual_seed(4)
    mu, cond, spks = torch.randn(1, 80, T, generator=g), torch.randn(1, 80, T, generator=g), torch.randn(1, 80, generator=g)
    mask = torch.ones(1, 1, T)
    for streaming in (False, True):
        ref = GraphedFlowSampler(dec)(mu, mask, spks, cond, n_timesteps=3, streaming=streaming)
        out = GraphedFlowSampler(dec, bucket=16)(mu, mask, spks, cond, n_timesteps=3, streaming=streaming)
        assert out.shape == ref.shape == (1, 80, T)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_synthesizer_fast_flow_on_gpu(tmp_path):
    """``Synthesizer(fast_flow=True)`` on CUDA: graph-replayed flow gives the reference audio, full and streamed."""
    import numpy as np

    from cosytune.infer.synthesizer import SynthesisOptions, Synthesizer
    from cosytune.modeldir.presets import write_model_dir

    model_dir = write_model_dir(tmp_path / "m", "tiny", seed=0)
    ref = Synthesizer.from_dir(model_dir, device="cuda")
    fast = Synthesizer.from_dir(model_dir, device="cuda", fast_flow=True)
    opts = SynthesisOptions(seed=3, text_frontend=False)
    text = "You are a helpful assistant.<|endofprompt|>Graphs replay the same solve."
    for _ in range(2):  # second round replays the captured buckets
        a = ref.synthesize(text, options=opts, speaker=_embedding_speaker(ref))
        b = fast.synthesize(text, options=opts, speaker=_embedding_speaker(fast))
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.audio, b.audio, atol=2e-3, rtol=0)
    assert fast._flow_sampler.captures >= 1
    chunks = [c.audio for c in fast.stream(text, options=opts, speaker=_embedding_speaker(fast))]
    ref_chunks = [c.audio for c in ref.stream(text, options=opts, speaker=_embedding_speaker(ref))]
    np.testing.assert_allclose(np.concatenate(chunks), np.concatenate(ref_chunks), atol=2e-3, rtol=0)


def _embedding_speaker(synth):
    from cosytune.infer.frontend import speaker_from_spk2info

    return speaker_from_spk2info("t", {"embedding": torch.ones(192)})


def test_synthesizer_flow_sampler_path_on_cpu(tmp_path):
    """The Synthesizer's sampler path (bucketed GraphedFlowSampler; no graphs on CPU) gives the reference audio."""
    import numpy as np

    from cosytune.infer.synthesizer import FLOW_BUCKET, SynthesisOptions, Synthesizer
    from cosytune.modeldir.presets import write_model_dir

    model_dir = write_model_dir(tmp_path / "m", "tiny", seed=0)
    synth = Synthesizer.from_dir(model_dir, device="cpu", fast_flow=True)
    assert not synth.fast_flow and synth._flow_sampler is None  # CUDA only
    opts = SynthesisOptions(seed=3, text_frontend=False)
    text = "You are a helpful assistant.<|endofprompt|>Buckets pad the frames."
    ref = synth.synthesize(text, options=opts, speaker=_embedding_speaker(synth))
    synth._flow_sampler = GraphedFlowSampler(synth.flow.decoder, bucket=FLOW_BUCKET)
    out = synth.synthesize(text, options=opts, speaker=_embedding_speaker(synth))
    assert out.tokens == ref.tokens
    np.testing.assert_allclose(out.audio, ref.audio, atol=2e-4, rtol=0)


@pytest.fixture(scope="module")
def tiny_hift():
    torch.manual_seed(0)
    return build_network("hift", preset_hparams("tiny")).eval()


def test_graphed_vocoder_on_cpu_is_the_plain_call(tiny_hift):
    from cosytune.infer.fast import GraphedVocoder

    voc = GraphedVocoder(tiny_hift)
    mel = torch.randn(1, 80, 30, generator=torch.Generator().manual_seed(1))
    for finalize in (True, False):
        ref = tiny_hift.inference(mel, finalize=finalize)
        out = voc(mel, finalize=finalize)
        torch.testing.assert_close(out.wav, ref.wav, rtol=0, atol=0)
    assert voc.captures == 0
    with pytest.raises(ValueError, match="non-final chunk"):
        voc(mel[:, :, :5], finalize=False)


@pytest.mark.gpu
def test_graphed_vocoder_on_gpu(tiny_hift):
    """Replays equal the eager vocoder for new mels of a captured shape; new noise means a new capture."""
    from cosytune.infer.fast import GraphedVocoder

    hift = build_network("hift", preset_hparams("tiny")).eval()
    hift.load_state_dict(tiny_hift.state_dict())
    hift = hift.to("cuda")
    voc = GraphedVocoder(hift, max_graphs=2)
    for T, finalize in ((30, False), (30, False), (40, True), (30, False)):
        mel = torch.randn(1, 80, T, generator=torch.Generator().manual_seed(T + 7 * finalize)).cuda()
        ref = hift.inference(mel, finalize=finalize)
        out = voc(mel, finalize=finalize)
        torch.testing.assert_close(out.wav, ref.wav, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.f0, ref.f0)
    assert voc.captures == 2
    old = hift.fixed_noise(1000)
    hift.set_fixed_noise(torch.rand_like(old.sine_noise), old.rand_ini)
    mel = torch.randn(1, 80, 30, device="cuda")
    torch.testing.assert_close(voc(mel, finalize=False).wav, hift.inference(mel, finalize=False).wav,
                               rtol=1e-5, atol=1e-5)
    assert voc.captures == 3


def test_fast_estimator_under_autocast_matches_the_original(tiny_flow):
    """bf16 parameters + GEMM position convs, under bf16 autocast: the same solve as the fp32-parameter DiT
    under the same autocast (within bf16 rounding of the different conv summation order)."""
    from cosytune.infer.fast import fast_estimator

    dec = tiny_flow.decoder
    fast = fast_estimator(dec.estimator, param_dtype=torch.bfloat16)
    assert dec.estimator.input_embed.conv_pos_embed.impl == "conv"  # the original is untouched
    assert next(dec.estimator.parameters()).dtype == torch.float32
    assert fast.rotary_embed.inv_freq.dtype == torch.float32
    T = 40
    g = torch.Generator().manual_seed(9)
    mu, cond, spks = torch.randn(1, 80, T, generator=g), torch.randn(1, 80, T, generator=g), torch.randn(1, 80, generator=g)
    mask = torch.ones(1, 1, T)
    for streaming in (False, True):
        ref = GraphedFlowSampler(dec, autocast_dtype=torch.bfloat16)(mu, mask, spks, cond, n_timesteps=3,
                                                                     streaming=streaming)
        out = GraphedFlowSampler(dec, autocast_dtype=torch.bfloat16, estimator=fast)(
            mu, mask, spks, cond, n_timesteps=3, streaming=streaming)
        assert (out - ref).abs().max() < 6e-3 * ref.abs().max()  # bf16 rounding of another summation order
        exact = GraphedFlowSampler(dec)(mu, mask, spks, cond, n_timesteps=3, streaming=streaming)
        assert (out - exact).abs().max() < 1e-2 * exact.abs().max()
    # With the library convolution the bf16 parameters change nothing at all under autocast.
    same = fast_estimator(dec.estimator, param_dtype=torch.bfloat16, gemm_conv=False)
    torch.testing.assert_close(GraphedFlowSampler(dec, autocast_dtype=torch.bfloat16, estimator=same)(
        mu, mask, spks, cond, n_timesteps=3), GraphedFlowSampler(dec, autocast_dtype=torch.bfloat16)(
        mu, mask, spks, cond, n_timesteps=3), rtol=0, atol=0)


def test_position_conv_auto_picks_gemm_for_small_calls_only(monkeypatch):
    """``impl="auto"``: the GEMM form up to GEMM_CONV_MAX_ROW_FRAMES rows × frames, the library conv above."""
    from cosytune.models import dit

    m = dit.CausalConvPositionEmbedding(64, 31, 16)
    x = torch.randn(2, 30, 64, generator=torch.Generator().manual_seed(2))
    ref_conv = m(x)
    m.impl = "gemm"
    ref_gemm = m(x)
    torch.testing.assert_close(ref_gemm, ref_conv, rtol=1e-5, atol=1e-5)
    m.impl = "auto"
    calls = []
    real = dit.grouped_conv1d_gemm
    monkeypatch.setattr(dit, "grouped_conv1d_gemm", lambda *a: calls.append(1) or real(*a))
    m(x)
    assert len(calls) == 2  # 60 row-frames: both convs as GEMMs
    monkeypatch.setattr(dit, "GEMM_CONV_MAX_ROW_FRAMES", 59)
    torch.testing.assert_close(m(x), ref_conv, rtol=0, atol=0)
    assert len(calls) == 2


def test_warm_prefill_widths_are_powers_of_two_up_to_half_the_capacity():
    """The prompt widths pools and batchers capture at warm-up: 32, 64, ... up to half the capacity, at most 1024."""
    from cosytune.infer.fast import warm_prefill_widths

    assert warm_prefill_widths(512) == [32, 64, 128, 256]
    assert warm_prefill_widths(4096) == [32, 64, 128, 256, 512, 1024]
    assert warm_prefill_widths(40) == []
