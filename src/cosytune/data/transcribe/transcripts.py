"""The transcripts backend: the user's own text, from a transcripts file or sidecar ``.txt``/``.lab`` files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cosytune.errors import DataError
from cosytune.fileio import read_user_text

TRANSCRIPT_SIDECARS = (".txt", ".lab")


class TranscriptTable:
    """User transcripts looked up by source path, relative path, file name or stem."""

    def __init__(self, entries: dict[str, str], origin: str) -> None:
        self.origin = origin
        self.names = list(entries)
        self.by_key: dict[str, tuple[str, str]] = {}
        self.ambiguous: set[str] = set()
        self.used: set[str] = set()
        for name, text in entries.items():
            p = Path(name.replace("\\", "/"))
            for key in {name, p.as_posix(), p.name, p.stem, p.with_suffix("").as_posix()}:
                if key in self.by_key and self.by_key[key][1] != text:
                    self.ambiguous.add(key)
                self.by_key.setdefault(key, (name, text))

    def lookup(self, source: str, source_rel: str) -> str | None:
        """Text for a source recording, trying the most specific key first."""
        s, r = Path(source), Path(source_rel)
        for key in (source, s.as_posix(), r.as_posix(), r.with_suffix("").as_posix(), s.name, s.stem):
            if key in self.by_key and key not in self.ambiguous:
                name, text = self.by_key[key]
                self.used.add(name)
                return text
        return None

    def unused(self) -> list[str]:
        """Entries that matched no audio file so far (often a typo in the name)."""
        return [n for n in self.names if n not in self.used]


def load_transcripts(path: str | os.PathLike) -> TranscriptTable:
    """Read a transcripts file: ``name|text`` lines, ``name<TAB>text`` lines, or JSONL rows.

    Raises:
        DataError: listing every malformed line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"transcripts file {path} does not exist; expected 'name|text' lines")
    entries: dict[str, str] = {}
    problems = []
    for i, line in enumerate(read_user_text(path, "transcripts file").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"line {i}: not valid JSON ({e.msg})")
                continue
            name = next((row[k] for k in ("name", "file", "path", "audio", "wav", "utt") if row.get(k)), None)
            text = row.get("text")
            if name is None or not isinstance(text, str):
                problems.append(
                    f"line {i}: JSON row needs a name key (name/file/path/audio/wav/utt) and 'text'"
                )
                continue
        elif "|" in line:
            name, text = line.split("|", 1)
        elif "\t" in line:
            name, text = line.split("\t", 1)
        else:
            problems.append(
                f"line {i}: expected 'name|text', 'name<TAB>text' or a JSON object; found {line[:60]!r}"
            )
            continue
        name = str(name).strip()
        if name in entries:
            problems.append(f"line {i}: {name!r} appears twice")
            continue
        entries[name] = text
    if problems:
        raise DataError(
            f"transcripts file {path}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems[:20])
        )
    if not entries:
        raise DataError(f"transcripts file {path} holds no entries; expected 'name|text' lines")
    return TranscriptTable(entries, str(path))


def read_sidecar(source: str | os.PathLike) -> str | None:
    """Text of a same-named ``.txt`` / ``.lab`` beside a source audio file, if there is one."""
    source = Path(source)
    for ext in TRANSCRIPT_SIDECARS:
        p = source.with_suffix(ext)
        if p.is_file():
            return read_user_text(p, "transcript side file")
    return None
