"""CosyVoice3LM structure, strict loading, layout edge cases, loss and input validation."""

from __future__ import annotations

import random

import pytest
import torch

from cosytune.errors import CheckpointError, ConfigError, DataError
from cosytune.modeldir.upstream_yaml import llm_config
from cosytune.models.llm import IGNORE_ID, TIED_KEYS, CosyVoice3LM, LLMConfig, count_parameters
from cosytune.models.qwen2 import Qwen2Config
from cosytune.models.sampling import SamplingConfig
from cosytune.weights.io import load_state_dict

# A tiny model with a small text vocabulary (fast to build); the speech vocabulary is the real one.
SMALL = LLMConfig(qwen2=Qwen2Config(vocab_size=200, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, max_window_layers=1),
                  endofprompt_id=150)


def _small_model(seed: int = 0, config: LLMConfig = SMALL) -> CosyVoice3LM:
    model = CosyVoice3LM(config).eval()
    model.init_weights(torch.Generator().manual_seed(seed), std=0.5)
    return model


def test_fullsize_keys_shapes_and_count_on_meta(golden):
    ref = golden.json("fullsize_keys")
    config = llm_config({"llm_input_size": ref["qwen2_config"]["hidden_size"],
                         "llm_output_size": ref["qwen2_config"]["hidden_size"],
                         "speech_token_size": LLMConfig().speech_token_size}, ref["qwen2_config"])
    assert config == LLMConfig.fun_cosyvoice3_0_5b()
    with torch.device("meta"):
        model = CosyVoice3LM(config)
    sd = model.state_dict()
    expected = ref["llm"]["keys"]
    assert list(sd) == list(expected), "key names or order differ from upstream llm.pt"
    for key, info in expected.items():
        assert list(sd[key].shape) == info["shape"], key
        assert str(sd[key].dtype).replace("torch.", "") == info["dtype"], key
    assert len(sd) == ref["llm"]["n_state_dict_tensors"]
    assert count_parameters(model) == ref["llm"]["n_parameters_dedup"] == ref["spec_param_counts"]["llm"]
    assert sum(t.numel() for t in sd.values()) == ref["llm"]["n_state_dict_elements_sum_all_keys"]
    for alias, target in ref["llm"]["tied_aliases"].items():
        assert TIED_KEYS[alias] == target
        assert sd[alias] is sd[target] or sd[alias].data_ptr() == sd[target].data_ptr()


def test_tiny_state_dict_matches_fixture(golden):
    cfg = golden.json("llm_tiny_config")
    model = CosyVoice3LM(golden.llm_config())
    sd = model.state_dict()
    assert list(sd) == cfg["state_dict_keys_in_order"]
    assert {k: list(v.shape) for k, v in sd.items()} == cfg["state_dict_shapes"]
    assert cfg["tied_keys"] == TIED_KEYS


def test_strict_loading_names_bad_keys():
    model = _small_model()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    # A file without the tied lm_head (like the golden weights) loads and re-ties.
    no_head = {k: v for k, v in sd.items() if k not in TIED_KEYS}
    fresh = _small_model(seed=1)
    load_state_dict(fresh, no_head, "llm")
    assert torch.equal(fresh.llm.model.lm_head.weight, sd["llm.model.model.embed_tokens.weight"])
    assert fresh.llm.model.lm_head.weight is fresh.text_embedding.weight
    # Missing, unexpected and mis-shaped keys are all named in one error.
    broken = dict(sd)
    del broken["llm_decoder.weight"]
    broken["llm_embedding.weight"] = torch.zeros(2, 16)
    broken["speech_embedding.weight"] = torch.zeros(10, 16)
    with pytest.raises(CheckpointError) as e:
        load_state_dict(fresh, broken, "llm")
    msg = str(e.value)
    assert "llm_decoder.weight" in msg and "llm_embedding.weight" in msg and "speech_embedding.weight" in msg
    # Training-checkpoint extras only with an explicit allow-list.
    extra = dict(sd, epoch=torch.tensor(3), step=torch.tensor(100))
    with pytest.raises(CheckpointError, match="epoch"):
        load_state_dict(fresh, extra, "llm")
    load_state_dict(fresh, extra, "llm", allow_unexpected=("epoch", "step"))
    # A tied alias that disagrees with its target is refused.
    untied = dict(sd)
    untied["llm.model.lm_head.weight"] = sd["llm.model.lm_head.weight"] + 1
    with pytest.raises(CheckpointError, match="differ"):
        load_state_dict(fresh, untied, "llm")


def test_init_weights_is_deterministic():
    a, b = _small_model(seed=3), _small_model(seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert torch.equal(a.llm.model.model.norm.weight, torch.ones(16))


def _batch(text_lens, speech_lens, instruct_lens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b = len(text_lens)
    text = torch.randint(0, 100, (b, max(max(text_lens), 1)), generator=gen)
    speech = torch.randint(0, 6561, (b, max(speech_lens)), generator=gen)
    instruct = torch.randint(0, 100, (b, max(instruct_lens)), generator=gen)
    return {"text_token": text, "text_token_len": torch.tensor(text_lens, dtype=torch.int32),
            "speech_token": speech, "speech_token_len": torch.tensor(speech_lens, dtype=torch.int32),
            "instruct_token": instruct, "instruct_token_len": torch.tensor(instruct_lens, dtype=torch.int32)}


class _Fixed:
    def __init__(self, value: float) -> None:
        self.value, self.calls = value, 0

    def random(self) -> float:
        self.calls += 1
        return self.value


def test_bistream_layout_targets():
    model = _small_model()
    cfg = model.config
    a, b = cfg.mix_ratio
    batch = _batch([2 * a + 2, a, 0], [(2 * a + 2) * (b // a) + 1, b // a * a + 4, 7], [2, 1, 3])
    rng = _Fixed(0.0)  # always below bistream_prob: every eligible utterance is bistream
    inputs = model.prepare_inputs(batch, rng)
    assert rng.calls == 3
    assert inputs.branches == ["bistream", "bistream", "bistream"]
    for i in range(3):
        n = int(inputs.lm_input_lens[i])
        tgt = inputs.lm_target[i, :n].tolist()
        speech = batch["speech_token"][i, : int(batch["speech_token_len"][i])].tolist()
        # Every speech token is predicted exactly once, in order, fill after each full block, eos last.
        assert [t for t in tgt if 0 <= t < cfg.speech_token_size] == speech
        n_full = int(batch["text_token_len"][i]) // a
        assert tgt.count(cfg.fill_id) == n_full and tgt[-1] == cfg.eos_id and tgt.count(cfg.eos_id) == 1
        # The input holds exactly one sos and one task embedding.
        rows = inputs.lm_input[i, :n]
        table = model.speech_embedding.weight
        assert int((rows == table[cfg.sos_id]).all(-1).sum()) == 1
        assert int((rows == table[cfg.task_id]).all(-1).sum()) == 1
        assert (inputs.lm_input[i, n:] == -1.0).all() and (inputs.lm_target[i, n:] == IGNORE_ID).all()
    # Not eligible (S/L <= b/a) or the draw too high: unistream, and the draw is still consumed.
    rng = _Fixed(0.99)
    inputs = model.prepare_inputs(batch, rng)
    assert inputs.branches == ["unistream"] * 3 and rng.calls == 3
    ratio_batch = _batch([a], [b], [1])  # S/L == b/a exactly: not eligible
    assert model.prepare_inputs(ratio_batch, _Fixed(0.0)).branches == ["unistream"]


def test_unistream_target_layout():
    model = _small_model()
    cfg = model.config
    batch = _batch([3], [4], [2])
    inputs = model.prepare_inputs(batch, _Fixed(0.9))
    speech = batch["speech_token"][0].tolist()
    assert inputs.lm_target[0].tolist() == [IGNORE_ID] * (1 + 2 + 3) + speech + [cfg.eos_id]
    emb = model.text_embedding(batch["text_token"][0])
    assert torch.equal(inputs.lm_input[0, 3:6], emb)


def test_label_smoothing_loss_matches_kl_reference():
    model = _small_model()
    batch = _batch([3, 2], [5, 3], [1, 2])
    for lsm, normalize in ((0.0, True), (0.1, True), (0.1, False)):
        model.config = LLMConfig(**{**SMALL.__dict__, "lsm_weight": lsm, "length_normalized_loss": normalize})
        inputs = model.prepare_inputs(batch, _Fixed(0.9))
        with torch.no_grad():
            hidden = model.hidden_states(inputs.lm_input, inputs.lm_input_lens)
            out = model.loss_from_hidden(hidden, inputs.lm_target)
            logits = model.llm_decoder(hidden).reshape(-1, model.config.speech_vocab_size)
            target = inputs.lm_target.reshape(-1)
            ignore = target == IGNORE_ID
            v = model.config.speech_vocab_size
            true = torch.full_like(logits, lsm / (v - 1))
            true.scatter_(1, target.masked_fill(ignore, 0)[:, None], 1 - lsm)
            kl = torch.nn.KLDivLoss(reduction="none")(torch.log_softmax(logits, 1), true)
            denom = int((~ignore).sum()) if normalize else 2
            ref = kl.masked_fill(ignore[:, None], 0).sum() / denom
        torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
        assert out.num_tokens == int((~ignore).sum())
    model.config = SMALL


def test_training_batch_errors():
    model = _small_model()
    batch = _batch([3], [4], [2])
    with pytest.raises(DataError, match="instruct_token"):
        model.prepare_inputs({k: v for k, v in batch.items() if not k.startswith("instruct")}, random.Random(0))
    bad = dict(batch, speech_token=torch.full((1, 4), 6561))
    with pytest.raises(DataError, match="speech tokens"):
        model.prepare_inputs(bad, random.Random(0))
    bad = dict(batch, text_token_len=torch.tensor([9]))
    with pytest.raises(DataError, match="text_token"):
        model.prepare_inputs(bad, random.Random(0))


def test_prompt_errors_and_lengths():
    model = _small_model()
    eop = model.config.endofprompt_id
    with pytest.raises(DataError, match="endofprompt"):
        model.build_prompt([1, 2, 3])
    with pytest.raises(DataError, match="empty"):
        model.build_prompt([], [eop])
    with pytest.raises(DataError, match="prompt speech"):
        model.build_prompt([1], [eop], [7000])
    with pytest.raises(DataError, match="text ids"):
        model.build_prompt([1, 5000], [eop])
    prompt = model.build_prompt([eop, 4, 5], None, [1, 2], min_token_text_ratio=1.5, max_token_text_ratio=3.3)
    assert prompt.lm_input.shape == (1, 1 + 3 + 1 + 2, 16)
    assert (prompt.min_len, prompt.max_len) == (int(3 * 1.5), int(3 * 3.3))


def test_generate_min_len_modes_and_max_len():
    """On a model that prefers stop ids, the default never stops before min_len; upstream mode can."""
    model = _small_model(seed=5)
    cfg = model.config
    with torch.no_grad():  # stop rows with 10x the norm: their logits dominate the speech tokens'
        model.llm_decoder.weight[cfg.speech_token_size:] *= 10
    text = [cfg.endofprompt_id, 3, 4, 5]
    greedy = SamplingConfig(temperature=0.0)
    steps = list(model.decode(model.build_prompt(text), sampling=greedy, min_len_mode="upstream"))
    assert steps[0].stop and steps[0].token_id != cfg.speech_token_size  # HEAD quirk: stops at once
    tokens = list(model.generate(text, sampling=greedy, min_token_text_ratio=1, max_token_text_ratio=3))
    assert len(tokens) == 4 and all(t < cfg.speech_token_size for t in tokens)  # then stops at min_len
    with torch.no_grad():
        model.llm_decoder.weight[cfg.speech_token_size:] *= 0.0
    # max_len caps decoding, and every yielded id is a speech token.
    tokens = list(model.generate(text, sampling=SamplingConfig(), generator=torch.Generator().manual_seed(0),
                                 min_token_text_ratio=2, max_token_text_ratio=2))
    assert len(tokens) == 8 and all(t < cfg.speech_token_size for t in tokens)


def test_llm_config_validation():
    with pytest.raises(ConfigError) as e:
        LLMConfig(num_special_tokens=2, mix_ratio=(0, 15), lsm_weight=1.5, min_token_text_ratio=30)
    assert len(e.value.problems) == 4
    with pytest.raises(ConfigError) as e:
        llm_config({"llm_input_size": 64, "llm_output_size": 896}, Qwen2Config())
    assert "speech_token_size" in str(e.value) and "llm_input_size" in str(e.value)
    tiny = LLMConfig.tiny()
    assert tiny.qwen2.hidden_size == 32 and tiny.speech_vocab_size == 6761


def test_step_logp_is_one_static_graph():
    """The single-token step traces as one graph: no host syncs, no data-dependent Python branches.

    That is what CUDA-graph capture needs; ``backend="eager"`` checks the trace without compiling.
    """
    from cosytune.models.qwen2 import KVCache

    model = _small_model(seed=7)
    cache = KVCache.allocate(model.config.qwen2, 2, 8)
    step = torch.compile(model.step_logp, backend="eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        model.llm.model.model.prefill(torch.randn(2, 3, 16), cache, torch.tensor([3, 2]))
        traced, _ = step(torch.tensor([5, 6]), cache)
        cache.lengths -= 1
        eager, _ = model.step_logp(torch.tensor([5, 6]), cache)
    assert torch.equal(traced, eager)
    assert cache.lengths.tolist() == [4, 3]
