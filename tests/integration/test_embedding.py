"""extract-embedding on real speech through the tiny CAM++-interface model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from frontend_data import small_dataset

from cosytune.audio.io import load_wav
from cosytune.data.embedding import compute_campplus_feature, extract_embeddings
from cosytune.data.frontend_common import read_kaldi_dir
from cosytune.errors import DataError
from cosytune.modeldir.onnx_models import CampPlus
from cosytune.modeldir.onnx_tiny import build_tiny_campplus


@pytest.fixture(scope="module")
def campplus(tmp_path_factory):
    return build_tiny_campplus(tmp_path_factory.mktemp("m") / "campplus.onnx")


def test_embeddings_files_match_upstream_format(tmp_path, sample_speaker_dir, campplus):
    d = small_dataset(tmp_path, sample_speaker_dir, n=6, broken_clip=True)
    s = extract_embeddings(d, campplus.parent, device="cpu", num_threads=2, chunk_size=4)
    assert (s.computed, s.reused, s.speakers) == (6, 0, 2)
    assert s.rejected == {"unreadable_audio": 1}
    utt2emb = torch.load(d / "utt2embedding.pt", weights_only=True)
    spk2emb = torch.load(d / "spk2embedding.pt", weights_only=True)
    kd = read_kaldi_dir(d)
    assert list(utt2emb) == [u for u in kd.utts if u != "spkB_broken"]  # wav.scp order, reject left out
    assert all(isinstance(v, list) and len(v) == 192 and isinstance(v[0], float) for v in utt2emb.values())
    assert set(spk2emb) == {"spkA", "spkB"}
    for spk, mean in spk2emb.items():
        mine = [utt2emb[u] for u in utt2emb if kd.utt2spk[u] == spk]
        np.testing.assert_allclose(mean, np.mean(np.array(mine, dtype=np.float32), axis=0), atol=1e-6)
    # The stored vector is exactly CAM++(CMN fbank of the 16 kHz mono audio).
    u = next(iter(utt2emb))
    ref = CampPlus(campplus, device="cpu").embed(compute_campplus_feature(load_wav(kd.utt2wav[u], 16000)))
    np.testing.assert_allclose(utt2emb[u], ref, atol=1e-6)
    rows = [json.loads(line) for line in (d / "rejects.jsonl").read_text().splitlines()]
    assert rows == [{"stage": "extract-embedding", "input": "spkB_broken", "reason": "unreadable_audio",
                     "detail": rows[0]["detail"]}] and "broken.wav" in rows[0]["detail"]


def test_resume_and_force(tmp_path, sample_speaker_dir, campplus):
    d = small_dataset(tmp_path, sample_speaker_dir, n=4)
    first = extract_embeddings(d, campplus, device="cpu")
    before = torch.load(d / "utt2embedding.pt", weights_only=True)
    # Simulate an interrupted run: one utterance missing from the checkpoint.
    partial = dict(before)
    dropped = partial.pop(next(iter(partial)))
    torch.save(partial, d / "utt2embedding.pt")
    again = extract_embeddings(d, campplus, device="cpu")
    assert (first.computed, again.computed, again.reused) == (4, 1, 3)
    after = torch.load(d / "utt2embedding.pt", weights_only=True)
    assert after == before and list(after) == list(before) and dropped in after.values()
    forced = extract_embeddings(d, campplus, device="cpu", force=True)
    assert forced.computed == 4


def test_missing_speaker_lists_offending_ids(tmp_path, sample_speaker_dir, campplus):
    d = small_dataset(tmp_path, sample_speaker_dir, n=3)
    lines = (d / "utt2spk").read_text().splitlines()
    (d / "utt2spk").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(DataError, match=lines[0].split()[0]):
        extract_embeddings(d, campplus, device="cpu")
