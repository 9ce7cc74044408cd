"""Issue 2's "done when": prepare-audio then transcribe (own transcripts) on mp3s under a unicode
path with spaces give 24 kHz mono PCM16 wavs, consistent Kaldi dirs, and rejects for the rest."""

from __future__ import annotations

import shutil
from pathlib import Path

import soundfile as sf

from cosytune.cli.main import main
from cosytune.fileio import read_jsonl


def _kaldi(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, _, value = line.partition(" ")
        out[key] = value
    return out


def test_prepare_then_transcribe_with_own_transcripts(tmp_path, sample_speaker_dir):
    root = tmp_path / "数据集 Dream"
    raw = root / "原始 录音"
    raw.mkdir(parents=True)
    for p in sorted((sample_speaker_dir / "audio").glob("*.mp3")):
        shutil.copy2(p, raw / p.name)
    (raw / "broken take.mp3").write_bytes(b"\xff\xfb" + b"\x00" * 500)
    (raw / "empty.mp3").write_bytes(b"")
    transcripts = root / "transcripts.txt"
    shutil.copy2(sample_speaker_dir / "transcripts.txt", transcripts)
    # Outputs under the unicode path with spaces too (cosytune reads such wav.scp lines fine;
    # transcribe warns that upstream's tools would not).
    wavs = root / "wavs 24k"
    dataset = root / "data set"

    assert main(["prepare-audio", "--in_dir", str(raw), "--wav_dir", str(wavs), "--no_progress"]) == 0
    assert (
        main(
            [
                "transcribe",
                "--wav_dir",
                str(wavs),
                "--out_root",
                str(dataset),
                "--backend",
                "transcripts",
                "--transcripts",
                str(transcripts),
                "--spk_id",
                "dream",
                "--no_progress",
            ]
        )
        == 0
    )

    prepared = read_jsonl(wavs / "prepared.jsonl")
    assert len(prepared) == 28
    for row in prepared:
        info = sf.info(str(wavs / row["wav"]))
        assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
    utts_all = set()
    for split in ("train", "dev"):
        d = dataset / split
        wav_scp, text, utt2spk, instruct = (_kaldi(d / n) for n in ("wav.scp", "text", "utt2spk", "instruct"))
        spk2utt = {k: v.split() for k, v in _kaldi(d / "spk2utt").items()}
        assert wav_scp and set(wav_scp) == set(text) == set(utt2spk) == set(instruct)
        assert {(u, s) for s, us in spk2utt.items() for u in us} == set(utt2spk.items())
        assert all(Path(p).is_file() for p in wav_scp.values())
        assert all(v.endswith("<|endofprompt|>") for v in instruct.values())
        utts_all |= set(wav_scp)
    assert len(utts_all) == 28
    # Every input that did not make it is accounted for.
    rejected = {Path(r["input"]).name: r["reason"] for r in read_jsonl(wavs / "rejects.jsonl")}
    assert rejected == {"broken take.mp3": "unreadable", "empty.mp3": "zero_length"}
