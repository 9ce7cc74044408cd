"""Finding the clips to transcribe: prepare-audio's ``prepared.jsonl``, or a plain folder of audio files."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from cosytune.data.kaldi import kaldi_sort_key
from cosytune.data.rejects import RejectLog
from cosytune.data.transcribe.records import Utterance
from cosytune.errors import DataError
from cosytune.fileio import read_jsonl

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus")
# Formats libsndfile cannot read: in a plain folder they are recorded as rejects (prepare-audio
# decodes them) rather than silently skipped.
OTHER_MEDIA_EXTENSIONS = (".m4a", ".aac", ".mp4", ".wma", ".amr", ".webm", ".mkv", ".mov", ".avi", ".3gp")


def _safe_id(s: str) -> str:
    """Kaldi-safe token: no whitespace or control characters (unicode letters are fine)."""
    out = "".join("_" if (c.isspace() or unicodedata.category(c)[0] == "C" or c in "/\\|") else c for c in s)
    return out.strip("_") or "utt"


def _unique(utt: str, taken: set[str]) -> str:
    cand, n = utt, 2
    while cand in taken:
        cand, n = f"{utt}-{n}", n + 1
    taken.add(cand)
    return cand


def discover_inputs(in_dir: str | os.PathLike, speaker: str, rejects: RejectLog) -> list[Utterance]:
    """List the clips to transcribe, from ``prepared.jsonl`` or a plain folder of audio.

    Args:
        in_dir: prepare-audio's out_dir, or any folder of audio files (searched recursively).
        speaker: speaker id used as the utterance id prefix.
        rejects: receives ``missing_wav`` / ``unreadable_audio`` rows.

    Returns:
        Candidates sorted by utterance id (text still empty).

    Raises:
        DataError: if the folder does not exist or holds no audio at all.
    """
    import soundfile as sf

    in_dir = Path(in_dir).resolve()
    if not in_dir.is_dir():
        raise DataError(f"input folder {in_dir} does not exist; pass the out_dir of 'cosytune prepare-audio'")
    taken: set[str] = set()
    out: list[Utterance] = []

    def add(wav: Path, base: str, duration_s: float | None = None, **source) -> None:
        try:
            info = sf.info(str(wav))
            if info.frames <= 0:
                raise ValueError("no audio frames")
        except Exception as e:  # noqa: BLE001 - any decoder failure is a recorded reject
            rejects.add(str(wav), "unreadable_audio", f"{type(e).__name__}: {e}")
            return
        out.append(Utterance(utt=_unique(f"{speaker}_{_safe_id(base)}", taken), wav=str(wav),
                             duration_s=duration_s or info.frames / info.samplerate,
                             sample_rate=int(info.samplerate), speaker=speaker, **source))

    manifest = in_dir / "prepared.jsonl"
    if manifest.is_file():
        try:
            rows = read_jsonl(manifest)
        except ValueError as e:
            raise DataError(str(e)) from e
        for i, row in enumerate(rows, 1):
            if "wav" not in row:
                raise DataError(f"{manifest}:{i}: row has no 'wav' key; re-run 'cosytune prepare-audio'")
            wav = (in_dir / row["wav"]).resolve()
            if not wav.is_file():
                rejects.add(str(wav), "missing_wav", f"listed in {manifest.name} but not on disk")
                continue
            source = str(row.get("source") or wav)
            add(wav, str(row.get("utt") or Path(row["wav"]).with_suffix("").as_posix()),
                float(row.get("duration_s") or 0) or None, source=source,
                source_rel=str(row.get("source_rel") or Path(source).name),
                segment_index=int(row.get("segment_index") or 0), num_segments=int(row.get("num_segments") or 1))
    else:
        for p in sorted(in_dir.rglob("*")):
            if p.is_file() and p.suffix.lower() in OTHER_MEDIA_EXTENSIONS:
                rejects.add(str(p), "needs_prepare_audio", "run 'cosytune prepare-audio' to convert it to wav")
        files = sorted((p for p in in_dir.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS),
                       key=lambda p: kaldi_sort_key(p.relative_to(in_dir).as_posix()))
        for p in files:
            rel = p.relative_to(in_dir)
            add(p.resolve(), "__".join(rel.with_suffix("").parts), source=str(p.resolve()), source_rel=rel.as_posix())
    if not out and not len(rejects):
        raise DataError(
            f"no audio found in {in_dir} (looked for prepared.jsonl or files ending in "
            f"{', '.join(AUDIO_EXTENSIONS)}); run 'cosytune prepare-audio' first"
        )
    return sorted(out, key=lambda u: kaldi_sort_key(u.utt))
