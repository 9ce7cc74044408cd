"""Our Qwen2 decoder against transformers' Qwen2ForCausalLM, and the KV cache's correctness."""

from __future__ import annotations

import json

import pytest
import torch

from cosytune.errors import ConfigError
from cosytune.modeldir.model_dir import read_qwen2_config
from cosytune.models.qwen2 import KVCache, Qwen2Config, Qwen2ForCausalLM

# Tiny dimensions (a small text vocabulary keeps the parity test fast).
VOCAB, HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 300, 32, 64, 2, 4, 2


def _tiny_config(**kw) -> Qwen2Config:
    base = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
                "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "max_window_layers": LAYERS}
    base.update(kw)
    return Qwen2Config(**base)


def _random_model(config: Qwen2Config, seed: int = 0) -> Qwen2ForCausalLM:
    model = Qwen2ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.1 if name.endswith("bias") else (0.3 if p.dim() > 1 else 0.1)
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if name.endswith("norm.weight") else 0.0))
    return model


def _hf_model(config: Qwen2Config, ours: Qwen2ForCausalLM, attn: str):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config.to_hf_dict()))
    hf.config._attn_implementation = attn
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    return hf.eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefill_matches_transformers_with_padding(attn):
    config = _tiny_config()
    ours = _random_model(config)
    hf = _hf_model(config, ours, attn)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 9, HIDDEN, generator=gen)
    lens = torch.tensor([9, 6, 1])
    with torch.no_grad():
        mine = ours(x, lens)
        ref = hf(inputs_embeds=x, attention_mask=(torch.arange(9)[None] < lens[:, None]).long(),
                 output_hidden_states=True).hidden_states[-1]
        for b, n in enumerate(lens.tolist()):
            torch.testing.assert_close(mine[b, :n], ref[b, :n], atol=2e-5, rtol=0)
        torch.testing.assert_close(ours.logits(mine[0]), hf.lm_head(ref[0]), atol=1e-4, rtol=0)


def test_cached_decode_matches_transformers():
    """Prefill + single-token steps agree with transformers' own cache given a correct full mask."""
    transformers = pytest.importorskip("transformers")
    config = _tiny_config()
    ours = _random_model(config, seed=2)
    hf = _hf_model(config, ours, "sdpa")
    gen = torch.Generator().manual_seed(3)
    prompt, steps = torch.randn(1, 7, HIDDEN, generator=gen), torch.randn(1, 5, HIDDEN, generator=gen)
    cache = KVCache.allocate(config, 1, 7 + 5)
    with torch.no_grad():
        h, cache = ours.model.prefill(prompt, cache)
        out = hf(inputs_embeds=prompt, attention_mask=torch.ones(1, 7, dtype=torch.long),
                 use_cache=True, past_key_values=transformers.DynamicCache(), output_hidden_states=True)
        torch.testing.assert_close(h, out.hidden_states[-1], atol=2e-5, rtol=0)
        past = out.past_key_values
        for t in range(5):
            h, cache = ours.model.decode_step(steps[:, t:t + 1], cache)
            out = hf(inputs_embeds=steps[:, t:t + 1], attention_mask=torch.ones(1, 8 + t, dtype=torch.long),
                     use_cache=True, past_key_values=past, output_hidden_states=True)
            past = out.past_key_values
            torch.testing.assert_close(h, out.hidden_states[-1], atol=2e-5, rtol=0)
    assert cache.lengths.tolist() == [12]


def test_batched_cache_rows_of_different_lengths():
    """Rows with different prompt lengths decode together exactly as they do alone."""
    config = _tiny_config()
    model = _random_model(config, seed=4)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, HIDDEN, generator=gen)
    steps = torch.randn(2, 4, HIDDEN, generator=gen)
    lens = torch.tensor([6, 3])
    with torch.no_grad():
        cache = KVCache.allocate(config, 2, 12)
        prefill, cache = model.model.prefill(x, cache, lens)
        assert cache.lengths.tolist() == [6, 3]
        batched = [model.model.decode_step(steps[:, t:t + 1], cache)[0] for t in range(4)]
        for b, n in enumerate(lens.tolist()):
            full = model(torch.cat([x[b:b + 1, :n], steps[b:b + 1]], dim=1))  # no cache at all
            torch.testing.assert_close(prefill[b, :n], full[0, :n], atol=1e-5, rtol=0)
            for t in range(4):
                torch.testing.assert_close(batched[t][b, 0], full[0, n + t], atol=1e-5, rtol=0)
        # Chunked prefill (two calls) equals one call.
        one = model.model.prefill(x[:1], KVCache.allocate(config, 1, 8))[0]
        two_cache = KVCache.allocate(config, 1, 8)
        first = model.model.prefill(x[:1, :4], two_cache)[0]
        second = model.model.prefill(x[:1, 4:], two_cache)[0]
        torch.testing.assert_close(torch.cat([first, second], 1), one, atol=1e-5, rtol=0)
        # reset() makes the cache reusable.
        again = model.model.prefill(x[:1], two_cache.reset())[0]
        torch.testing.assert_close(again, one, atol=0, rtol=0)


def test_cache_capacity_and_batch_errors():
    config = _tiny_config()
    model = _random_model(config)
    with pytest.raises(ValueError, match="allocate a larger cache"):
        model.model.prefill(torch.zeros(1, 5, HIDDEN), KVCache.allocate(config, 1, 4))
    with pytest.raises(ValueError, match="rows"):
        model.model.prefill(torch.zeros(2, 2, HIDDEN), KVCache.allocate(config, 1, 4))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        KVCache.allocate(_tiny_config(max_position_embeddings=16), 1, 17)


def test_tied_lm_head_shares_the_embedding():
    model = Qwen2ForCausalLM(_tiny_config())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" in model.state_dict()
    untied = Qwen2ForCausalLM(_tiny_config(tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_config_from_hf_json_roundtrip(golden, tmp_path):
    written = golden.json("llm_tiny_config")["qwen2_config_written"]
    config = Qwen2Config.from_hf_dict(written)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "rope_theta", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(config, key) == written[key], key
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_hf_dict()))
    assert read_qwen2_config(path) == config
    full = golden.json("fullsize_keys")["qwen2_config"]
    assert Qwen2Config.from_hf_dict(full) == Qwen2Config()  # our defaults are the real backbone
    # transformers >= 5 writes rope_theta inside rope_parameters; informational fields do not count.
    v5 = {k: v for k, v in written.items() if k != "rope_theta"}
    v5.update(rope_parameters={"rope_type": "default", "rope_theta": written["rope_theta"]}, max_window_layers=1,
              dtype="bfloat16")
    v5.pop("torch_dtype", None)
    assert Qwen2Config.from_hf_dict(v5) == config


def test_config_errors_list_every_problem(tmp_path):
    with pytest.raises(ConfigError) as e:
        Qwen2Config.from_hf_dict({"model_type": "llama", "hidden_size": 32, "mystery": 1})
    text = str(e.value)
    assert "llama" in text and "mystery" in text
    with pytest.raises(ConfigError, match="rope_parameters"):
        Qwen2Config.from_hf_dict({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4}})
    with pytest.raises(ConfigError) as e:
        Qwen2Config(hidden_size=30, num_attention_heads=4, use_sliding_window=True, hidden_act="gelu",
                    rope_scaling={"type": "yarn"})
    assert len(e.value.problems) == 4
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        read_qwen2_config(bad)


def test_packed_projections_same_outputs_state_dict_and_training():
    """pack_projections: same no-grad outputs and cached steps, same state_dict, in-place loads reach the packed
    tensors, gradients still reach every projection, and a dtype move drops the packing."""
    config = _tiny_config()
    model = _random_model(config).eval()
    inner = model.model
    x = torch.randn(2, 7, config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = inner(x)
        cache = KVCache.allocate(config, 2, 9)
        inner.prefill(x, cache)
        ref_step, _ = inner.decode_step(x[:, :1], cache)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inner.pack_projections().pack_projections()  # idempotent
    assert all(layer.self_attn.packed is not None and layer.mlp.packed is not None for layer in inner.layers)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        torch.testing.assert_close(inner(x), ref, rtol=1e-5, atol=1e-5)
        cache = KVCache.allocate(config, 2, 9)
        inner.prefill(x, cache)
        step, _ = inner.decode_step(x[:, :1], cache)
        torch.testing.assert_close(step, ref_step, rtol=1e-5, atol=1e-5)
    # An in-place load updates what the packed GEMM reads.
    other = _random_model(config, seed=5)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(inner(x), other.model(x), rtol=1e-5, atol=1e-5)
    # With gradients the separate projections run, so every weight gets its gradient.
    model.train()
    inner(x).sum().backward()
    layer = inner.layers[0]
    for p in (layer.self_attn.q_proj.weight, layer.self_attn.v_proj.bias, layer.mlp.up_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    model.double()
    assert inner.layers[0].self_attn.packed is None and inner.layers[0].mlp.packed is None


@pytest.mark.parametrize("kind", ["reduce", "matmul", "efficient"])
@pytest.mark.parametrize("t", [1, 3])
def test_cache_attention_kinds_equal_sdpa_over_the_cache(t, kind):
    """Every cache attention of the decode steps (the reductions of compiled steps, the batched products,
    SDPA's memory-efficient kernel) gives the SDPA result (GQA, per-row lengths)."""
    from cosytune.models.qwen2 import CACHED_ATTENTION, _cached_attention

    g = torch.Generator().manual_seed(t)
    q = torch.randn(2, 6, t, 8, generator=g)
    k, v = torch.randn(2, 2, 20, 8, generator=g), torch.randn(2, 2, 20, 8, generator=g)
    lens = torch.tensor([4, 15])
    mask = (torch.arange(20)[None, None, None, :] <= (lens[:, None, None, None] + torch.arange(t)[None, None, :, None]))
    attend = CACHED_ATTENTION[kind]
    torch.testing.assert_close(attend(q, k, v, mask), _cached_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["reduce", "matmul", "efficient"])
def test_cache_attention_kinds_on_cuda_bf16(kind):
    """On the GPU in bfloat16 (a decode step's shapes: one query per row, a long cache) every kind stays
    within bf16 rounding of SDPA's own kernel choice."""
    from cosytune.models.qwen2 import CACHED_ATTENTION, _cached_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 14, 1, 64, generator=g).to("cuda", torch.bfloat16)
    k = torch.randn(4, 2, 512, 64, generator=g).to("cuda", torch.bfloat16)
    v = torch.randn(4, 2, 512, 64, generator=g).to("cuda", torch.bfloat16)
    lens = torch.tensor([3, 100, 300, 511], device="cuda")
    mask = (torch.arange(512, device="cuda")[None, None, None, :] <= lens[:, None, None, None])
    got, ref = CACHED_ATTENTION[kind](q, k, v, mask).float(), _cached_attention(q, k, v, mask).float()
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
