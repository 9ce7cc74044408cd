"""CosyVoice 3 LLM against the golden fixtures ``llm_tiny_*`` (training forward and inference).

Config, weights, inputs, recorded random draws, expected outputs and tolerances all come from the
fixture files, so another fixture set of the same format (other seeds and sizes) passes too.
"""

from __future__ import annotations

import random

import pytest
import torch

from cosytune.models.llm import IGNORE_ID, CosyVoice3LM
from cosytune.models.qwen2 import KVCache
from cosytune.models.sampling import SamplingConfig
from cosytune.weights.io import load_state_dict

TRAIN, INFER = "llm_tiny_train", "llm_tiny_infer"


class ReplayDraws:
    """``random()`` returning recorded Python draws in order (upstream's ``random.random()`` calls)."""

    def __init__(self, draws: list[float]) -> None:
        self.draws = list(draws)

    def random(self) -> float:
        assert self.draws, "more random() calls than upstream made"
        return self.draws.pop(0)


@pytest.fixture(scope="module")
def tiny_lm(golden) -> CosyVoice3LM:
    model = CosyVoice3LM(golden.llm_config()).eval()
    load_state_dict(model, golden.tensors("llm_tiny_weights"), "llm")
    return model


def _infer_cases(golden) -> dict[str, dict]:
    return {k: v for k, v in golden.json(INFER).items() if not k.startswith("_")}


def _sampling(case: dict) -> SamplingConfig:
    s = case["sampling"]
    return SamplingConfig(top_p=s["top_p"], top_k=s["top_k"], win_size=s["win_size"], tau_r=s["tau_r"])


def _prompt(model: CosyVoice3LM, tensors: dict, name: str, case: dict):
    return model.build_prompt(tensors[f"{name}.text"], tensors[f"{name}.prompt_text"],
                              tensors[f"{name}.prompt_speech_token"],
                              min_token_text_ratio=case["min_token_text_ratio"],
                              max_token_text_ratio=case["max_token_text_ratio"])


def _recorded_draws(tensors: dict, name: str, n_steps: int):
    queue = []
    for i in range(n_steps):
        queue.append(tensors[f"{name}.step{i:02d}.nucleus_q"])
        if f"{name}.step{i:02d}.ras_q" in tensors:
            queue.append(tensors[f"{name}.step{i:02d}.ras_q"])

    def draw(p: torch.Tensor) -> torch.Tensor:
        assert queue, "the sampler asked for more draws than the fixture recorded"
        q = queue.pop(0)
        assert q.shape == p.shape
        return q

    draw.remaining = queue  # type: ignore[attr-defined]
    return draw


# ---------------------------------------------------------------------------------- training forward
def test_train_layout_exact(golden, tiny_lm):
    t, meta = golden.tensors(TRAIN), golden.meta(TRAIN)
    draws = t["python_random_draws"].tolist()
    if "python_random_seed" in meta:  # the stored draws are those of random.Random(seed)
        rng = random.Random(meta["python_random_seed"])
        assert [rng.random() for _ in draws] == draws
    replay = ReplayDraws(draws)
    inputs = tiny_lm.prepare_inputs(t, replay)
    assert not replay.draws, "upstream draws once per utterance, even for ineligible ones"
    if "branches" in meta:
        assert inputs.branches == meta["branches"]
    golden.check(TRAIN, "lm_input", inputs.lm_input, t["lm_input"])
    golden.check(TRAIN, "lm_target", inputs.lm_target, t["lm_target"])
    golden.check(TRAIN, "lm_input_len", inputs.lm_input_lens, t["lm_input_len"])
    positions = (inputs.lm_target != IGNORE_ID).nonzero()
    golden.check(TRAIN, "target_positions", positions, t["target_positions"], tol_key="lm_target")


def test_train_forward_numerics(golden, tiny_lm):
    t = golden.tensors(TRAIN)
    inputs = tiny_lm.prepare_inputs(t, ReplayDraws(t["python_random_draws"].tolist()))
    with torch.no_grad():
        hidden = tiny_lm.hidden_states(inputs.lm_input, inputs.lm_input_lens)
        valid = torch.arange(hidden.shape[1])[None, :] < inputs.lm_input_lens[:, None].long()
        golden.check(TRAIN, "hidden", hidden[valid], t["hidden"][valid])
        pos = t["target_positions"]
        logits = tiny_lm.llm_decoder(hidden[pos[:, 0], pos[:, 1]])
        golden.check(TRAIN, "logits_at_targets", logits, t["logits_at_targets"])
        out = tiny_lm(t, ReplayDraws(t["python_random_draws"].tolist()))
    golden.check(TRAIN, "loss", out.loss.reshape(1), t["loss"])
    golden.check(TRAIN, "acc", out.acc.reshape(1), t["acc"])
    assert out.num_tokens == pos.shape[0]


def test_train_forward_backward_runs(golden, tiny_lm):
    """Gradients reach every parameter group upstream trains (nothing frozen)."""
    t = golden.tensors(TRAIN)
    model = CosyVoice3LM(tiny_lm.config)
    model.load_state_dict(tiny_lm.state_dict())
    out = model(t, random.Random(0))
    out.loss.backward()
    for name in ("speech_embedding.weight", "llm_decoder.weight", "llm.model.model.embed_tokens.weight",
                 "llm.model.model.layers.0.self_attn.q_proj.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------- inference
def test_infer_prompt_and_lengths(golden, tiny_lm):
    tensors = golden.tensors(INFER)
    for name, case in _infer_cases(golden).items():
        prompt = _prompt(tiny_lm, tensors, name, case)
        golden.check(INFER, f"{name}.lm_input", prompt.lm_input, tensors[f"{name}.lm_input"])
        assert (prompt.min_len, prompt.max_len) == (case["min_len"], case["max_len"]), name


def test_infer_teacher_forced_step_logp(golden, tiny_lm):
    """Feeding the recorded tokens through the KV cache, every step's log-probabilities match."""
    tensors = golden.tensors(INFER)
    for name, case in _infer_cases(golden).items():
        prompt = _prompt(tiny_lm, tensors, name, case)
        cache = KVCache.allocate(tiny_lm.config.qwen2, 1, prompt.lm_input.shape[1] + prompt.max_len)
        with torch.no_grad():
            hidden, cache = tiny_lm.llm.model.model.prefill(prompt.lm_input, cache)
            logps = [torch.log_softmax(tiny_lm.llm_decoder(hidden[0, -1]), dim=-1)]
            for tok in case["tokens"][: case["n_steps"] - 1]:
                lp, cache = tiny_lm.step_logp(torch.tensor([tok]), cache)
                logps.append(lp[0])
        assert int(cache.lengths[0]) == prompt.lm_input.shape[1] + case["n_steps"] - 1
        golden.check(INFER, f"{name}.step_logp", torch.stack(logps), tensors[f"{name}.step_logp"])


def test_infer_recorded_draws_reproduce_every_step(golden, tiny_lm):
    """With the fixture's Exp(1) draws, candidates, picks and tokens match exactly (parity mode)."""
    tensors = golden.tensors(INFER)
    for name, case in _infer_cases(golden).items():
        prompt = _prompt(tiny_lm, tensors, name, case)
        draw = _recorded_draws(tensors, name, case["n_steps"])
        steps = list(tiny_lm.decode(prompt, sampling=_sampling(case), draw_q=draw, min_len_mode="upstream"))
        assert len(steps) == case["n_steps"], name
        assert not draw.remaining, f"{name}: recorded draws left unused"
        for step, rec in zip(steps, case["steps"]):
            golden.check(INFER, f"{name}.step{step.step:02d}.nucleus_ids",
                         torch.tensor(step.sample.candidate_ids), tensors[f"{name}.step{step.step:02d}.nucleus_ids"])
            assert step.sample.nucleus_pick_pos == rec["nucleus_pick_pos"], (name, step.step)
            assert step.sample.ras_redraw == rec["ras_redraw"], (name, step.step)
            assert step.token_id == rec["final_id"], (name, step.step)
        tokens = [s.token_id for s in steps if not s.stop]
        golden.check(INFER, f"{name}.token_ids", torch.tensor(tokens), tensors[f"{name}.tokens"])
        assert steps[-1].stop == case["stopped_on_special"], name
        if case["stopped_on_special"]:
            assert steps[-1].token_id == case["stop_id"], name


def test_infer_end_to_end_seeded(golden, tiny_lm):
    """generate() with a generator seeded like upstream's torch.manual_seed yields the same tokens."""
    tensors = golden.tensors(INFER)
    for name, case in _infer_cases(golden).items():
        tokens = list(tiny_lm.generate(
            tensors[f"{name}.text"], tensors[f"{name}.prompt_text"], tensors[f"{name}.prompt_speech_token"],
            sampling=_sampling(case), generator=torch.Generator().manual_seed(case["seed"]),
            min_len_mode="upstream", min_token_text_ratio=case["min_token_text_ratio"],
            max_token_text_ratio=case["max_token_text_ratio"]))
        golden.check(INFER, f"{name}.token_ids", torch.tensor(tokens), tensors[f"{name}.tokens"])


def test_min_len_quirk_and_default(golden, tiny_lm):
    """A case that stops before min_len in upstream mode runs to at least min_len by default."""
    tensors = golden.tensors(INFER)
    early = {n: c for n, c in _infer_cases(golden).items()
             if c["stopped_on_special"] and len(c["tokens"]) < c["min_len"]}
    if not early:
        pytest.skip("this fixture set has no case that stops before min_len")
    for name, case in early.items():
        # HEAD masks only speech_token_size, so another stop id ends decoding early.
        assert case["stop_id"] != tiny_lm.config.speech_token_size
        kwargs = {"sampling": _sampling(case), "min_token_text_ratio": case["min_token_text_ratio"],
                      "max_token_text_ratio": case["max_token_text_ratio"]}
        args = (tensors[f"{name}.text"], tensors[f"{name}.prompt_text"], tensors[f"{name}.prompt_speech_token"])
        parity = list(tiny_lm.generate(*args, generator=torch.Generator().manual_seed(case["seed"]),
                                       min_len_mode="upstream", **kwargs))
        assert parity == case["tokens"]
        fixed = list(tiny_lm.generate(*args, generator=torch.Generator().manual_seed(case["seed"]), **kwargs))
        assert len(fixed) >= case["min_len"], name
        assert fixed[: len(parity)] == parity, "identical until the step where upstream stopped"
        assert all(t < tiny_lm.config.speech_token_size for t in fixed)


def test_kv_cache_equals_full_recompute(golden, tiny_lm):
    """Cached per-step log-probs equal a no-cache recompute of the whole sequence."""
    tensors = golden.tensors(INFER)
    for name, case in _infer_cases(golden).items():
        prompt = _prompt(tiny_lm, tensors, name, case)
        draw = _recorded_draws(tensors, name, case["n_steps"])
        steps = list(tiny_lm.decode(prompt, sampling=_sampling(case), draw_q=draw, min_len_mode="upstream"))
        fed = [s.token_id for s in steps[:-1]]
        with torch.no_grad():
            seq = torch.cat([prompt.lm_input, tiny_lm.speech_embedding.weight[fed][None]], dim=1)
            hidden = tiny_lm.hidden_states(seq)
            start = prompt.lm_input.shape[1] - 1
            full = torch.log_softmax(tiny_lm.llm_decoder(hidden[0, start:start + len(steps)]), dim=-1)
        golden.check(INFER, f"{name}.step_logp", torch.stack([s.logp for s in steps]), full)


def test_generate_batch_equals_single_runs(golden, tiny_lm):
    """Prompts of different lengths decoded in one batch give each prompt's single-run tokens."""
    tensors = golden.tensors(INFER)
    cases = _infer_cases(golden)
    names = list(cases)
    prompts = [_prompt(tiny_lm, tensors, n, cases[n]) for n in names]
    for sampling in (SamplingConfig(temperature=0.0), SamplingConfig()):
        singles = [list(tiny_lm.generate(
            tensors[f"{n}.text"], tensors[f"{n}.prompt_text"], tensors[f"{n}.prompt_speech_token"],
            sampling=sampling, generator=torch.Generator().manual_seed(cases[n]["seed"]),
            min_len_mode="upstream", min_token_text_ratio=cases[n]["min_token_text_ratio"],
            max_token_text_ratio=cases[n]["max_token_text_ratio"])) for n in names]
        batched = tiny_lm.generate_batch(
            prompts, sampling=sampling, min_len_mode="upstream",
            generators=[torch.Generator().manual_seed(cases[n]["seed"]) for n in names])
        assert batched == singles
