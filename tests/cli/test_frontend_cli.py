"""The shipped sample dataset through extract-embedding, extract-speech-token and make-parquet (CLI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from frontend_data import sample_clips, write_data_dir

from cosytune.cli.main import main
from cosytune.data.frontend_common import read_kaldi_dir
from cosytune.data.parquet import read_parquet_rows
from cosytune.modeldir.onnx_tiny import build_tiny_campplus, build_tiny_speech_tokenizer


def test_sample_dataset_through_all_three_commands(tmp_path, sample_speaker_dir, capsys, monkeypatch):
    monkeypatch.setenv("COSYVOICE_ORT_FORCE_CPU", "1")
    models = tmp_path / "model"
    build_tiny_campplus(models / "campplus.onnx")
    build_tiny_speech_tokenizer(models / "speech_tokenizer_v3.onnx")
    clips = sample_clips(sample_speaker_dir)
    d = write_data_dir(tmp_path / "train", [(f"allison_{u}", w, t, "allison") for u, w, t in clips])

    assert main(["extract-embedding", "--dir", str(d), "--onnx_path", str(models / "campplus.onnx"),
                 "--no_progress"]) == 0
    assert main(["extract-speech-token", "--dir", str(d), "--onnx_path", str(models), "--onnx_device", "cuda",
                 "--num_thread", "2", "--no_progress"]) == 0
    assert main(["make-parquet", "--src_dir", str(d), "--des_dir", str(d / "parquet"),
                 "--num_utts_per_parquet", "10", "--num_processes", "1", "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "== extract-embedding" in out and "== extract-speech-token" in out and "== make-parquet" in out

    kd = read_kaldi_dir(d)
    utt2emb = torch.load(d / "utt2embedding.pt", weights_only=True)
    spk2emb = torch.load(d / "spk2embedding.pt", weights_only=True)
    tokens = torch.load(d / "utt2speech_token.pt", weights_only=True)
    assert len(utt2emb) == len(clips) == len(tokens) and "allison" in spk2emb and len(spk2emb["allison"]) == 192
    rows = [r for p in (d / "parquet" / "data.list").read_text().split() for r in read_parquet_rows(p)]
    assert len(rows) == len(clips) and [r["utt"] for r in rows] == kd.utts
    for r in rows:
        u = r["utt"]
        assert r["audio_data"] == Path(kd.utt2wav[u]).read_bytes()
        assert r["text"] == kd.utt2text[u] and r["spk"] == "allison"
        assert np.array_equal(np.float32(r["utt_embedding"]), np.float32(utt2emb[u]))
        assert np.array_equal(np.float32(r["spk_embedding"]), np.float32(spk2emb["allison"]))
        assert r["speech_token"] == tokens[u]

    # Re-running each command continues instead of redoing the work.
    assert main(["extract-embedding", "--dir", str(d), "--onnx_path", str(models), "--no_progress"]) == 0
    assert main(["make-parquet", "--src_dir", str(d), "--des_dir", str(d / "parquet"),
                 "--num_utts_per_parquet", "10", "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert f"reused from earlier run  {len(clips)}" in out and "(0 written, 3 unchanged)" in out


def test_cli_errors_are_messages(tmp_path, capsys):
    assert main(["extract-embedding", "--dir", str(tmp_path / "nope"), "--onnx_path", str(tmp_path)]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "wav.scp").write_text("u1 /x.wav\n")
    (tmp_path / "utt2spk").write_text("u1 s\n")
    assert main(["extract-embedding", "--dir", str(tmp_path), "--onnx_path", str(tmp_path)]) == 1
    assert "has no campplus.onnx" in capsys.readouterr().err
