"""Helpers for the front-end tests: small Kaldi data dirs built from the shipped sample clips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

INSTRUCT = "You are a helpful assistant.<|endofprompt|>"


def sample_clips(sample_speaker_dir: Path) -> list[tuple[str, Path, str]]:
    """(utt id, mp3 path, transcript) for every shipped clip, in file order."""
    rows = []
    for line in (sample_speaker_dir / "transcripts.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            name, text = line.split("|", 1)
            rows.append((Path(name).stem, sample_speaker_dir / "audio" / name, text.strip()))
    return rows


def write_data_dir(d: Path, entries: list[tuple[str, Path, str, str]], instruct: bool = True) -> Path:
    """Write wav.scp/text/utt2spk/spk2utt(/instruct) for (utt, wav, text, spk) entries."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "wav.scp").write_text("".join(f"{u} {w}\n" for u, w, _, _ in entries), encoding="utf-8")
    (d / "text").write_text("".join(f"{u} {t}\n" for u, _, t, _ in entries), encoding="utf-8")
    (d / "utt2spk").write_text("".join(f"{u} {s}\n" for u, _, _, s in entries), encoding="utf-8")
    spk2utt: dict[str, list[str]] = {}
    for u, _, _, s in entries:
        spk2utt.setdefault(s, []).append(u)
    (d / "spk2utt").write_text("".join(f"{s} {' '.join(us)}\n" for s, us in spk2utt.items()), encoding="utf-8")
    if instruct:
        (d / "instruct").write_text("".join(f"{u} {INSTRUCT}\n" for u, _, _, _ in entries), encoding="utf-8")
    return d


def small_dataset(root: Path, sample_speaker_dir: Path, n: int = 6, *, long_clip: bool = False,
                  broken_clip: bool = False) -> Path:
    """``n`` real clips split over two speakers, optionally plus a 31 s clip and an undecodable file."""
    clips = sample_clips(sample_speaker_dir)[:n]
    entries = [(f"{'spkA' if i % 2 == 0 else 'spkB'}_{u}", w, t, "spkA" if i % 2 == 0 else "spkB")
               for i, (u, w, t) in enumerate(clips)]
    if long_clip:
        parts = []
        for _, w, _ in sample_clips(sample_speaker_dir):
            x, sr = sf.read(str(w), dtype="float32")
            parts.append(x)
            if sum(len(p) for p in parts) > 31 * sr:
                break
        long_path = root / "long_31s.wav"
        root.mkdir(parents=True, exist_ok=True)
        sf.write(str(long_path), np.concatenate(parts)[: 31 * sr], sr, subtype="PCM_16")
        entries.append(("spkA_long", long_path, "a long recording", "spkA"))
    if broken_clip:
        bad = root / "broken.wav"
        root.mkdir(parents=True, exist_ok=True)
        bad.write_bytes(b"RIFF this is not really a wav file")
        entries.append(("spkB_broken", bad, "broken", "spkB"))
    return write_data_dir(root / "data", entries)
