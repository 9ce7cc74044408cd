"""extract-speech-token on real speech through the tiny speech_tokenizer_v3-interface models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from frontend_data import small_dataset

from cosytune.audio.io import load_wav
from cosytune.data.frontend_common import read_kaldi_dir
from cosytune.data.speech_token import compute_tokenizer_feature, extract_speech_tokens
from cosytune.modeldir.onnx_models import SpeechTokenizer
from cosytune.modeldir.onnx_tiny import build_tiny_speech_tokenizer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    return (build_tiny_speech_tokenizer(d / "speech_tokenizer_v3.onnx"),
            build_tiny_speech_tokenizer(d / "speech_tokenizer_v3.batch.onnx", batch=True))


def test_tokens_long_clip_rejected_and_batched_equals_single(tmp_path, sample_speaker_dir, tokenizers):
    single_model, batch_model = tokenizers
    d = small_dataset(tmp_path, sample_speaker_dir, n=6, long_clip=True)
    s = extract_speech_tokens(d, batch_model, device="cpu", max_batch=4, chunk_size=5)
    assert s.batched and s.computed == 6 and s.rejected == {"too_long_for_tokenizer": 1}
    tokens = torch.load(d / "utt2speech_token.pt", weights_only=True)
    kd = read_kaldi_dir(d)
    assert list(tokens) == [u for u in kd.utts if u != "spkA_long"]  # never an empty list for the long clip
    rows = [json.loads(line) for line in (d / "rejects.jsonl").read_text().splitlines()]
    assert [(r["input"], r["reason"]) for r in rows] == [("spkA_long", "too_long_for_tokenizer")]
    assert "31.00 s" in rows[0]["detail"]
    ref_model = SpeechTokenizer(single_model, device="cpu")
    for u, tok in tokens.items():
        wav = load_wav(kd.utt2wav[u], 16000)
        assert all(isinstance(t, int) for t in tok) and len(tok) == (wav.shape[0] // 160) // 4
        assert np.array_equal(np.array(tok), ref_model.tokenize(compute_tokenizer_feature(wav)))
    # Same tokens from the non-batch model through the CLI-level function (one call per utterance).
    s2 = extract_speech_tokens(d, single_model.parent, device="cpu", num_threads=2, force=True)
    assert not s2.batched and torch.load(d / "utt2speech_token.pt", weights_only=True) == tokens


def test_resume_skips_done_utterances(tmp_path, sample_speaker_dir, tokenizers):
    d = small_dataset(tmp_path, sample_speaker_dir, n=3)
    assert extract_speech_tokens(d, tokenizers[0], device="cpu").computed == 3
    again = extract_speech_tokens(d, tokenizers[0], device="cpu")
    assert (again.computed, again.reused) == (0, 3)
    # Another model file: cached tokens are stale and recomputed.
    assert extract_speech_tokens(d, tokenizers[1], device="cpu").computed == 3
