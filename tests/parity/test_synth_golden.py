"""The golden end-to-end inference paths fed through the Synthesizer's own stages.

``llm_tiny_infer`` goes through ``Synthesizer.generate_tokens`` (prompt layout, seeded generator, min-len
rule), ``flow_tiny_infer`` through ``Synthesizer.tokens_to_mel`` and the streaming schedule, and
``hift_tiny_infer`` through ``Synthesizer.mel_to_wav`` and the streaming vocoder step. Every size, input,
seed and tolerance comes from the fixture files.
"""

from __future__ import annotations

import pytest
import torch

from cosytune.infer.frontend import Speaker
from cosytune.infer.streaming import StreamSchedule, StreamState
from cosytune.infer.synthesizer import PreparedRequest, SynthesisOptions, Synthesizer
from cosytune.models.hift import HiFTGenerator, HiFTStreamState
from cosytune.models.llm import CosyVoice3LM
from cosytune.models.sampling import SamplingConfig
from cosytune.weights.io import load_state_dict

LLM_STEM, FLOW_STEM, HIFT_STEM = "llm_tiny_infer", "flow_tiny_infer", "hift_tiny_infer"


class _Tok:
    def encode(self, text: str) -> list[int]:  # pragma: no cover - the golden paths pass ids directly
        raise AssertionError("not used")


def _llm(golden, case: dict) -> CosyVoice3LM:
    config = golden.llm_config(min_token_text_ratio=case["min_token_text_ratio"],
                               max_token_text_ratio=case["max_token_text_ratio"])
    model = CosyVoice3LM(config).eval()
    load_state_dict(model, golden.tensors("llm_tiny_weights"), "llm")
    return model


@pytest.fixture(scope="module")
def hift(golden):
    model = HiFTGenerator(golden.hift_config())
    load_state_dict(model, golden.tensors("hift_tiny_weights"), "hift")
    t = golden.tensors(HIFT_STEM)
    model.set_fixed_noise(t["sine_waves_fixed_prefix"], t["rand_ini"])
    return model.eval(), t


@pytest.fixture(scope="module")
def flow(golden):
    from cosytune.models.flow import build_flow
    from cosytune.weights.io import strict_load

    model = build_flow(golden.flow_config()).eval()
    strict_load(model, golden.tensors("flow_tiny_weights"), source="flow_tiny_weights")
    return model


def _synth(llm=None, flow=None, hift=None) -> Synthesizer:
    anchor = llm if llm is not None else (flow if flow is not None else hift)
    return Synthesizer(llm if llm is not None else anchor, flow, hift, tokenizer=_Tok())


@pytest.mark.parametrize("name", ["A_ras", "A_greedy", "A_ras_stop", "B_ras", "B_greedy", "C_greedy"])
def test_llm_tokens_through_synthesizer(golden, name):
    cases = golden.json(LLM_STEM)
    if name not in cases:
        pytest.skip(f"fixture set has no case {name}")
    case, t = cases[name], golden.tensors(LLM_STEM)
    synth = _synth(llm=_llm(golden, case))
    s = case["sampling"]
    options = SynthesisOptions(sampling=SamplingConfig(top_p=s["top_p"], top_k=s["top_k"], win_size=s["win_size"],
                                                       tau_r=s["tau_r"]),
                               min_len_mode="upstream", seed=case["seed"])
    speaker = Speaker(torch.zeros(1, 192), torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 80))
    req = PreparedRequest("zero_shot", t[f"{name}.text"].reshape(-1).tolist(),
                          t[f"{name}.prompt_text"].reshape(-1).tolist(),
                          t[f"{name}.prompt_speech_token"].reshape(-1).tolist(), speaker, True, "")
    # The fixture seeded torch's global CPU generator right before decoding; a fresh CPU generator with
    # the same seed gives the same Exp(1) draws.
    tokens = list(synth.generate_tokens(req, options, case["seed"]))
    golden.check(LLM_STEM, f"{name}.token_ids", torch.tensor(tokens), torch.tensor(case["tokens"]))


def test_hift_final_through_synthesizer(golden, hift):
    model, t = hift
    synth = _synth(hift=model)
    wav = synth.mel_to_wav(t["speech_feat"])
    golden.check(HIFT_STEM, "final.wav", wav[None], t["final.wav"])


def test_hift_stream_step_matches_chunk_and_final(golden, hift):
    model, t = hift
    mel = t["speech_feat"]
    state = HiFTStreamState()
    first = model.stream_step(state, mel, finalize=False)
    golden.check(HIFT_STEM, "chunk.wav", first, t["chunk.wav"])
    rest = model.stream_step(state, mel[:, :, :0], finalize=True)
    golden.check(HIFT_STEM, "final.wav", torch.cat([first, rest], dim=1), t["final.wav"])


@pytest.mark.parametrize("run", ["final_full", "chunk_stream", "final_stream"])
def test_flow_mel_through_synthesizer(golden, flow, run):
    info, t = golden.json(FLOW_STEM)[run], golden.tensors(FLOW_STEM)
    synth = _synth(flow=flow)
    mel = synth.tokens_to_mel(t["token"], t["prompt_token"], t["prompt_feat"], t["embedding"],
                              streaming=info["streaming"], finalize=info["finalize"])
    assert mel.shape[2] == info["mel_frames_out"]
    golden.check(FLOW_STEM, f"{run}.mel", mel, t[f"{run}.mel"])


def test_first_stream_chunk_is_the_fixture_chunk(golden):
    """The fixture's streaming chunk (prompt P tokens) is exactly the first chunk our schedule issues."""
    t, info = golden.tensors(FLOW_STEM), golden.json(FLOW_STEM)["chunk_stream"]
    p, n = t["prompt_token"].shape[1], t["token"].shape[1]
    state = StreamState(StreamSchedule(), p)
    state.tokens = t["token"].reshape(-1).tolist()
    chunk = state.next_chunk()
    assert chunk is not None and chunk.offset == 0 and chunk.end == n
    assert chunk.hop * 2 == info["mel_frames_out"]
    assert (p + chunk.hop) % StreamSchedule().token_hop_len == 0
