"""Done-when check of issue 2: prepare-audio then transcribe --backend transcripts on mp3s under a
unicode path with spaces → 24 kHz mono PCM16 wavs, consistent metadata and Kaldi dirs, and
rejects.jsonl accounting for every input that did not make it.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cosytune.cli.main import main
from cosytune.data.kaldi import read_kaldi_entries, read_kaldi_map, validate_kaldi_dir
from cosytune.fileio import read_jsonl

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("cosytune.cli.prepare_audio") is None, reason="prepare-audio not available"
)


def test_prepare_audio_then_transcribe_on_unicode_paths(sample_speaker_dir, tmp_path, capsys):
    raw = tmp_path / "数据集" / "Dream 录音"
    raw.mkdir(parents=True)
    texts = dict(
        line.split("|", 1) for line in (sample_speaker_dir / "transcripts.txt").read_text().splitlines()
    )
    clips = sorted((sample_speaker_dir / "audio").glob("*.mp3"))
    for i, p in enumerate(clips[:4]):
        dst = raw / f"片段 {i} {p.name}"
        shutil.copy(p, dst)
        dst.with_suffix(".txt").write_text(texts[p.name], encoding="utf-8")
    # a 45 s recording with pauses: prepare-audio slices it, so its one transcript cannot be used
    pieces, sr = [], 16000
    for p in clips[4:]:
        audio, sr = sf.read(str(p), dtype="float32")
        pieces += [audio, np.zeros(int(0.8 * sr), np.float32)]
        if sum(len(x) for x in pieces) > 45 * sr:
            break
    sf.write(str(raw / "long take.mp3"), np.concatenate(pieces)[: 45 * sr], sr, format="MP3")
    (raw / "long take.txt").write_text("One transcript for the whole long take.", encoding="utf-8")
    (raw / "broken file.mp3").write_bytes(b"\x00not an mp3 at all" * 50)
    sf.write(str(raw / "silence.wav"), np.zeros(3 * sr, np.float32), sr)

    wavs, out = tmp_path / "wavs 24k", tmp_path / "数据 out"
    assert (
        main(
            [
                "prepare-audio",
                "--in_dir",
                str(raw.parent),
                "--out_dir",
                str(wavs),
                "--num_workers",
                "1",
                "--no_progress",
            ]
        )
        == 0
    ), capsys.readouterr().err
    assert (
        main(
            [
                "transcribe",
                "--wav_dir",
                str(wavs),
                "--out_root",
                str(out),
                "--spk_id",
                "dream",
                "--backend",
                "transcripts",
                "--language",
                "en",
                "dev_size=1",
                "--no_progress",
            ]
        )
        == 0
    )

    prepared = read_jsonl(wavs / "prepared.jsonl")
    for row in prepared:
        info = sf.info(str(wavs / row["wav"]))
        assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
    assert any(r["num_segments"] > 1 for r in prepared if r["source_rel"].endswith("long take.mp3"))

    meta = read_jsonl(out / "metadata.jsonl")
    assert len(meta) == 4 and all(m["speaker"] == "dream" for m in meta)
    ids = set()
    for split in ("train", "dev"):
        assert validate_kaldi_dir(out / split) == []
        entries = read_kaldi_entries(out / split)
        ids |= {e.utt for e in entries}
        for name in ("text", "utt2spk", "instruct"):
            assert set(read_kaldi_map(out / split / name)) == {e.utt for e in entries}
        spk2utt = {k: set(v.split()) for k, v in read_kaldi_map(out / split / "spk2utt").items()}
        assert spk2utt == {"dream": {e.utt for e in entries}}
        assert all(Path(e.wav).is_file() for e in entries)
    assert ids == {m["utt"] for m in meta}
    for m in meta:
        assert m["text"] == texts[Path(m["source"]).name.split(" ", 2)[2]]

    # every input file made it or is accounted for in rejects.jsonl (either stage)
    rejects = read_jsonl(out / "rejects.jsonl")
    wav_to_source = {str((wavs / r["wav"]).resolve()): r["source"] for r in prepared}
    accounted = {m["source"] for m in meta}
    accounted |= {r["input"] for r in rejects if r["stage"] == "prepare-audio"}
    accounted |= {wav_to_source[r["input"]] for r in rejects if r["stage"] == "transcribe"}
    inputs = {str(p.resolve()) for p in raw.iterdir() if p.suffix != ".txt"}
    assert inputs <= {str(Path(a).resolve()) for a in accounted}
    reasons = {(r["stage"], r["reason"]) for r in rejects}
    assert ("transcribe", "sliced_source_needs_asr") in reasons
    assert {r["input"] for r in rejects if r["stage"] == "prepare-audio"} >= {
        str((raw / "broken file.mp3").resolve()),
        str((raw / "silence.wav").resolve()),
    }
