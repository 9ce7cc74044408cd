"""Prompt front end: real speech through tiny ONNX stand-ins with the real interfaces; spk2info entries."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from cosytune.errors import DataError
from cosytune.infer.frontend import (
    ZERO_SHOT_KEYS,
    PromptFrontend,
    Speaker,
    align_token_mel,
    speaker_from_spk2info,
    speaker_to_spk2info,
)


@pytest.fixture(scope="module")
def frontend(tmp_path_factory):
    from cosytune.modeldir.onnx_tiny import build_tiny_campplus, build_tiny_speech_tokenizer

    d = tmp_path_factory.mktemp("onnx")
    return PromptFrontend(build_tiny_campplus(d / "campplus.onnx"), build_tiny_speech_tokenizer(d / "tok.onnx"))


@pytest.fixture
def clip(sample_speaker_dir):
    return sample_speaker_dir / "audio" / "agent-user.mp3"


def test_align_token_mel_truncates_the_longer_side():
    tok, feat = torch.arange(10)[None], torch.randn(1, 17, 80)
    t2, f2 = align_token_mel(tok, feat)
    assert t2.shape[1] == 8 and f2.shape[1] == 16
    t3, f3 = align_token_mel(tok[:, :5], feat)
    assert t3.shape[1] == 5 and f3.shape[1] == 10 and torch.equal(f3, feat[:, :10])


def test_real_speech_prompt_features(frontend, clip):
    spk = frontend.speaker_from_wav(clip)
    p = spk.num_prompt_tokens
    assert p > 0 and spk.speech_feat.shape == (1, 2 * p, 80)
    assert spk.embedding.shape == (1, 192) and torch.isfinite(spk.embedding).all()
    assert spk.speech_token.dtype == torch.int64 and int(spk.speech_token.min()) >= 0
    # 16 kHz input: ~25 tokens/s; the mel side is 24 kHz frames at 50 Hz from the same clip.
    seconds = sf.info(str(clip)).duration
    assert abs(p - 25 * seconds) <= 3
    # Deterministic.
    again = frontend.speaker_from_wav(clip)
    assert torch.equal(again.speech_token, spk.speech_token) and torch.equal(again.embedding, spk.embedding)


def test_spk2info_round_trip_has_upstream_keys(frontend, clip):
    spk = frontend.speaker_from_wav(clip)
    entry = speaker_to_spk2info(spk, [1, 2, 151646, 3])
    assert set(entry) == set(ZERO_SHOT_KEYS)
    assert entry["prompt_text"].dtype == torch.int32 and entry["llm_prompt_speech_token"].dtype == torch.int32
    assert int(entry["prompt_speech_feat_len"]) == 2 * int(entry["flow_prompt_speech_token_len"])
    back = speaker_from_spk2info("alice", entry)
    assert back.prompt_text_ids == [1, 2, 151646, 3] and back.source == "spk2info:alice"
    assert torch.equal(back.speech_token, spk.speech_token) and torch.equal(back.speech_feat, spk.speech_feat)
    sft = speaker_from_spk2info("bob", {"embedding": torch.ones(1, 192)})
    assert not sft.has_prompt_speech and sft.embedding.shape == (1, 192)
    with pytest.raises(DataError, match="expected 'embedding'"):
        speaker_from_spk2info("x", {"foo": torch.ones(1)})
    with pytest.raises(DataError, match="needs prompt speech"):
        speaker_to_spk2info(sft, [151646])


def test_bad_prompt_wavs_are_clear_errors(frontend, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        frontend.speaker_from_wav(tmp_path / "nope.wav")
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF not really a wav file at all" * 10)
    with pytest.raises(DataError, match="cannot use prompt wav"):
        frontend.speaker_from_wav(bad)
    low = tmp_path / "8k.wav"
    sf.write(str(low), np.random.default_rng(0).uniform(-0.3, 0.3, 8000).astype(np.float32), 8000)
    with pytest.raises(DataError, match="16000 Hz"):
        frontend.speaker_from_wav(low)
    silent = tmp_path / "silent.wav"
    sf.write(str(silent), np.zeros(24000, np.float32), 24000)
    with pytest.raises(DataError, match="silence"):
        frontend.speaker_from_wav(silent)
    long = tmp_path / "long.wav"
    sf.write(str(long), np.full(16000 * 31, 0.1, np.float32), 16000)
    with pytest.raises(DataError, match="at most 30"):
        frontend.speaker_from_wav(long)


def test_speaker_defaults():
    spk = Speaker(torch.zeros(1, 192), torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 80))
    assert not spk.has_prompt_speech and spk.num_prompt_tokens == 0
