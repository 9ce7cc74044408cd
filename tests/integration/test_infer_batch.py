"""Batched synthesis (cosytune.infer.batch) equals one-at-a-time synthesis, on the tiny model dir (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
from speaker_models import speaker_model_dir

from cosytune.errors import DataError
from cosytune.infer.batch import BatchRequest, synthesize_batch
from cosytune.infer.synthesizer import SynthesisOptions, Synthesizer
from cosytune.models.sampling import SamplingConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sample_speaker_dir, tiny_model_dir):
    clip = sample_speaker_dir / "audio" / "agent-user.mp3"
    return speaker_model_dir(tmp_path_factory.mktemp("batchmodel") / "a", zero_shot_clip=clip, tokenizer_from=tiny_model_dir / "CosyVoice-BlankEN")


@pytest.fixture(scope="module")
def synth(model_dir):
    return Synthesizer.from_dir(model_dir, device="cpu")


def _requests() -> list[BatchRequest]:
    return [
        BatchRequest("Hello there, how are you?", spk_id="alice", options=SynthesisOptions(seed=11, text_frontend=False)),
        BatchRequest("A much longer sentence, so that the rows have different lengths in both networks.",
                     spk_id="bob", mode="zero_shot", options=SynthesisOptions(seed=12, text_frontend=False)),
        BatchRequest("?!", spk_id="alice", options=SynthesisOptions(seed=13, text_frontend=False)),  # nothing to speak
        BatchRequest("Short.", spk_id="bob", mode="zero_shot", options=SynthesisOptions(seed=14, text_frontend=False, speed=1.5)),
        BatchRequest("Different sampler settings go to their own batch.", spk_id="alice",
                     options=SynthesisOptions(seed=15, text_frontend=False, sampling=SamplingConfig(top_k=5))),
    ]


@pytest.mark.parametrize("fast", [False, True])
def test_batch_equals_single_requests(synth, fast):
    reqs = _requests()
    done: list[int] = []
    stages: list[str] = []
    results = synthesize_batch(synth, reqs, batch_size=3, fast=fast, on_result=lambda i, r: done.append(i),
                               on_stage=stages.append)
    assert sorted(done) == list(range(len(reqs)))
    assert stages[0] == "batch 1/2: decoding 3 segment(s)" and "batch 2/2: rendering 1 segment(s)" in stages
    assert isinstance(results[2], DataError) and "nothing to speak" in str(results[2])
    # rows 0, 1, 3 share a sampler (one batch of 3); row 4 has its own settings (a batch of 1)
    assert [results[i].info["batch"]["rows"] for i in (0, 1, 3, 4)] == [3, 3, 3, 1]
    for req, res in zip(reqs, results):
        if isinstance(res, Exception):
            continue
        ref = synth.synthesize(req.text, spk_id=req.spk_id, mode=req.mode, options=req.options)
        assert res.tokens == ref.tokens and res.seed == ref.seed
        assert res.audio.shape == ref.audio.shape
        np.testing.assert_allclose(res.audio, ref.audio, atol=2e-4, rtol=0)
        assert res.info["mode"] == ref.info["mode"] and res.info["sampling"] == ref.info["sampling"]
        assert res.timings["audio_s"] == pytest.approx(ref.timings["audio_s"])


def test_batch_size_one_and_bad_size(synth):
    reqs = _requests()[:2]
    one = synthesize_batch(synth, reqs, batch_size=1)
    two = synthesize_batch(synth, reqs, batch_size=2)
    for a, b in zip(one, two):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.audio, b.audio, atol=2e-4, rtol=0)
    with pytest.raises(ValueError, match="batch_size"):
        synthesize_batch(synth, reqs, batch_size=0)


@pytest.mark.gpu
def test_graphed_rows_on_gpu_equal_eager_rows(model_dir):
    """On CUDA the batch decodes through a graph-captured GraphedDecoder; same tokens as the eager rows."""
    gpu = Synthesizer.from_dir(model_dir, device="cuda")
    reqs = [r for r in _requests() if r.text != "?!"]
    graphed = synthesize_batch(gpu, reqs, batch_size=4, fast=True)
    eager = synthesize_batch(gpu, reqs, batch_size=4, fast=False)
    for a, b in zip(graphed, eager):
        assert a.tokens == b.tokens and a.info["batch"]["fast_decode"] and not b.info["batch"]["fast_decode"]
        np.testing.assert_allclose(a.audio, b.audio, atol=1e-3, rtol=0)


def test_cli_batch_size_gives_the_same_wavs(model_dir, tmp_path):
    import soundfile as sf

    from cosytune.cli.main import main

    lines = tmp_path / "in.txt"
    lines.write_text("First line here.\nA second, rather longer line of text.\nThird.\n", encoding="utf-8")
    outs = {}
    for bs in (1, 3):
        out = tmp_path / f"b{bs}"
        assert main(["infer-batch", "--model_dir", str(model_dir), "--spk_id", "alice", "--input", str(lines),
                     "--out_dir", str(out), "--seed", "5", "--batch_size", str(bs), "--no_text_frontend",
                     "--no_progress"]) == 0
        outs[bs] = [sf.read(str(out / f"seg_{i:04d}.wav"), dtype="int16")[0] for i in range(3)]
    for a, b in zip(outs[1], outs[3]):
        assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 8
    assert main(["infer-batch", "--model_dir", str(model_dir), "--spk_id", "alice", "--input", str(lines),
                 "--out_dir", str(tmp_path / "bad"), "--batch_size", "0"]) == 2
