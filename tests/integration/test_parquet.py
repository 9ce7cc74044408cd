"""make-parquet: upstream's columns, rows read back equal, id-mismatch errors, rejects, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from frontend_data import INSTRUCT, small_dataset

from cosytune.data.frontend_common import read_kaldi_dir
from cosytune.data.parquet import make_parquet, read_parquet_rows
from cosytune.errors import DataError


def _fake_maps(d, utts, spk_of, *, drop_token: str | None = None):
    rng = np.random.default_rng(0)
    utt2emb = {u: rng.standard_normal(192).astype(np.float32).tolist() for u in utts}
    spks = sorted(set(spk_of.values()))
    spk2emb = {s: rng.standard_normal(192).astype(np.float32).tolist() for s in spks}
    tokens = {u: rng.integers(0, 6561, size=int(rng.integers(5, 50))).tolist() for u in utts if u != drop_token}
    torch.save(utt2emb, d / "utt2embedding.pt")
    torch.save(spk2emb, d / "spk2embedding.pt")
    torch.save(tokens, d / "utt2speech_token.pt")
    return utt2emb, spk2emb, tokens


def test_rows_read_back_equal_with_upstream_columns(tmp_path, sample_speaker_dir):
    d = small_dataset(tmp_path, sample_speaker_dir, n=5)
    kd = read_kaldi_dir(d)
    utt2emb, spk2emb, tokens = _fake_maps(d, kd.utts, kd.utt2spk)
    s = make_parquet(d, tmp_path / "pq", num_utts_per_parquet=2, num_processes=1)
    assert (s.utterances, s.shards, s.written) == (5, 3, 3)
    shards = (tmp_path / "pq" / "data.list").read_text().split()
    assert [os.path.basename(p) for p in shards] == [f"parquet_{i:09d}.tar" for i in range(3)]
    schema = pq.read_schema(shards[0])
    assert schema.names == ["utt", "audio_data", "wav", "text", "spk", "utt_embedding", "spk_embedding",
                            "speech_token", "instruct"]
    assert schema.field("utt_embedding").type == pa.list_(pa.float32())
    assert schema.field("speech_token").type == pa.list_(pa.int64())
    rows = [r for p in shards for r in read_parquet_rows(p)]
    assert [r["utt"] for r in rows] == kd.utts
    for r in rows:
        u = r["utt"]
        wav = kd.path / kd.utt2wav[u] if not os.path.isabs(kd.utt2wav[u]) else kd.utt2wav[u]
        assert r["audio_data"] == Path(wav).read_bytes()
        assert r["wav"] == os.path.abspath(wav) and r["text"] == kd.utt2text[u] and r["spk"] == kd.utt2spk[u]
        assert r["instruct"] == INSTRUCT
        assert np.array_equal(np.array(r["utt_embedding"], np.float32), np.array(utt2emb[u], np.float32))
        assert np.array_equal(np.array(r["spk_embedding"], np.float32), np.array(spk2emb[kd.utt2spk[u]], np.float32))
        assert r["speech_token"] == tokens[u]
    # Upstream's reader: iter_batches(64) one row at a time, embeddings to float32 tensors.
    first = next(pq.ParquetFile(shards[0]).iter_batches(batch_size=64)).to_pylist()[0]
    assert torch.tensor(first["utt_embedding"], dtype=torch.float32).shape == (192,)
    # Companion json maps, including the spk map upstream leaves empty.
    utt_json = json.loads((tmp_path / "pq" / "utt2parquet_000000000.json").read_text())
    assert utt_json == {kd.utts[0]: shards[0], kd.utts[1]: shards[0]}
    spk_json = json.loads((tmp_path / "pq" / "spk2parquet_000000000.json").read_text())
    assert spk_json == {kd.utt2spk[kd.utts[0]]: shards[0], kd.utt2spk[kd.utts[1]]: shards[0]}
    assert len((tmp_path / "pq" / "utt2data.list").read_text().split()) == 3


def test_resume_keeps_unchanged_shards_and_parallel_writes(tmp_path, sample_speaker_dir):
    d = small_dataset(tmp_path, sample_speaker_dir, n=4)
    out = tmp_path / "pq"
    make_parquet(d, out, num_utts_per_parquet=2, num_processes=2)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("parquet_*.tar")}
    again = make_parquet(d, out, num_utts_per_parquet=2, num_processes=2)
    assert (again.written, again.reused) == (0, 2)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("parquet_*.tar")} == first
    # Changing one transcript rewrites only its shard; fewer shards remove the stale ones.
    kd = read_kaldi_dir(d)
    (d / "text").write_text("".join(f"{u} {'changed' if i == 3 else kd.utt2text[u]}\n" for i, u in enumerate(kd.utts)))
    assert make_parquet(d, out, num_utts_per_parquet=2).written == 1
    assert make_parquet(d, out, num_utts_per_parquet=10).shards == 1
    assert sorted(p.name for p in out.glob("parquet_*.tar")) == ["parquet_000000000.tar"]
    assert read_parquet_rows(out / "parquet_000000000.tar")[3]["text"] == "changed"


def test_damaged_shard_and_rerecorded_audio_are_rewritten(tmp_path, sample_speaker_dir):
    """A truncated shard is written again, and so is the shard of a clip re-recorded under the same name."""
    import soundfile as sf

    d = small_dataset(tmp_path, sample_speaker_dir, n=4)
    out = tmp_path / "pq"
    make_parquet(d, out, num_utts_per_parquet=2)
    shard = out / "parquet_000000001.tar"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:100])
    again = make_parquet(d, out, num_utts_per_parquet=2)
    assert (again.written, again.reused) == (1, 1) and shard.read_bytes() == whole
    kd = read_kaldi_dir(d)
    utt = kd.utts[0]
    wav = tmp_path / f"own{Path(kd.utt2wav[utt]).suffix}"  # our own copy: the shipped sample stays untouched
    wav.write_bytes(Path(kd.utt2wav[utt]).read_bytes())
    (d / "wav.scp").write_text("".join(f"{u} {wav if u == utt else kd.utt2wav[u]}\n" for u in kd.utts))
    make_parquet(d, out, num_utts_per_parquet=2)
    x, sr = sf.read(str(wav))
    sf.write(str(wav), x[::-1].copy(), sr)  # a different recording, same name and length
    again = make_parquet(d, out, num_utts_per_parquet=2)
    assert (again.written, again.reused) == (1, 1)
    assert read_parquet_rows(out / "parquet_000000000.tar")[0]["audio_data"] == wav.read_bytes()


def test_id_mismatches_are_listed(tmp_path, sample_speaker_dir):
    d = small_dataset(tmp_path, sample_speaker_dir, n=4)
    kd = read_kaldi_dir(d)
    _fake_maps(d, kd.utts[:-1] + ["ghost_utt"], kd.utt2spk)
    (d / "text").write_text("".join(f"{u} {kd.utt2text[u]}\n" for u in kd.utts[1:]))
    with pytest.raises(DataError) as e:
        make_parquet(d, tmp_path / "pq")
    msg = str(e.value)
    assert f"text lacks 1 id(s) of wav.scp: {kd.utts[0]}" in msg
    assert "utt2embedding.pt lacks 1 id(s)" in msg and kd.utts[-1] in msg
    assert "ghost_utt" in msg


def test_earlier_rejects_are_left_out(tmp_path, sample_speaker_dir):
    d = small_dataset(tmp_path, sample_speaker_dir, n=4)
    kd = read_kaldi_dir(d)
    gone = kd.utts[2]
    _fake_maps(d, kd.utts, kd.utt2spk, drop_token=gone)
    (d / "rejects.jsonl").write_text(json.dumps({"stage": "extract-speech-token", "input": gone,
                                                 "reason": "too_long_for_tokenizer", "detail": "31 s"}) + "\n")
    s = make_parquet(d, tmp_path / "pq")
    assert s.utterances == 3 and s.excluded == {"extract-speech-token: too_long_for_tokenizer": 1}
    assert gone not in [r["utt"] for r in read_parquet_rows(tmp_path / "pq" / "parquet_000000000.tar")]
    # Without the reject record the same gap is an error.
    (d / "rejects.jsonl").unlink()
    with pytest.raises(DataError, match=gone):
        make_parquet(d, tmp_path / "pq")


def test_dpo_adds_reject_speech_token(tmp_path, sample_speaker_dir):
    d = small_dataset(tmp_path, sample_speaker_dir, n=3)
    kd = read_kaldi_dir(d)
    reject_dir = Path(str(d) + "_reject")
    reject_dir.mkdir()
    torch.save({kd.utts[0]: [1, 2, 3]}, reject_dir / "utt2speech_token.pt")
    make_parquet(d, tmp_path / "pq", dpo=True)
    rows = read_parquet_rows(tmp_path / "pq" / "parquet_000000000.tar")
    assert [r["reject_speech_token"] for r in rows] == [[1, 2, 3], None, None]


def test_missing_instruct_warns_and_omits_the_column(tmp_path, sample_speaker_dir, caplog):
    d = small_dataset(tmp_path, sample_speaker_dir, n=2)
    (d / "instruct").unlink()
    with caplog.at_level("WARNING"):
        s = make_parquet(d, tmp_path / "pq")
    assert "instruct" not in s.columns and any("no instruct file" in r.message for r in caplog.records)
