"""Kaldi-style data directories as upstream CosyVoice's data-prep tools read them.

A data dir holds one line per utterance in each of these files (``<utt> <value>``, one space
after the id, the value may contain spaces), sorted by utterance id in byte order (what
``LC_ALL=C sort`` gives):

* ``wav.scp``   ``utt /abs/path/to/audio.wav``
* ``text``      ``utt transcript``
* ``utt2spk``   ``utt speaker``
* ``spk2utt``   ``speaker utt1 utt2 ...`` (sorted by speaker; the inverse of utt2spk)
* ``instruct``  ``utt You are a helpful assistant.<|endofprompt|>`` (CosyVoice 3 needs it)

Utterance ids are prefixed with the speaker id, so sorting utterances also keeps each
speaker's utterances together (the Kaldi convention that ``utt2spk`` and ``spk2utt`` sort alike).

Reference: upstream-spec.md §7.6 (``examples/libritts/cosyvoice/local/prepare_data.py`` writes
these files; ``tools/make_parquet_list.py`` reads them and splits each line at the first space).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cosytune.errors import DataError
from cosytune.fileio import write_text
from cosytune.text.special import ENDOFPROMPT

logger = logging.getLogger(__name__)

KALDI_FILES = ("wav.scp", "text", "utt2spk", "spk2utt", "instruct")


@dataclass(frozen=True)
class KaldiEntry:
    """One utterance of a Kaldi data dir."""

    utt: str
    """Utterance id: no whitespace, starts with the speaker id."""
    wav: str
    """Audio path as written to ``wav.scp`` (absolute)."""
    text: str
    """Transcript on one line."""
    speaker: str
    """Speaker id: no whitespace."""
    instruct: str | None = None
    """Instruct string (ends with ``<|endofprompt|>`` for CosyVoice 3), or None to omit the file."""


def kaldi_sort_key(s: str) -> bytes:
    """Byte-order sort key, the order ``LC_ALL=C sort`` uses (and Kaldi's validators expect)."""
    return s.encode("utf-8")


def _check_token(kind: str, value: str) -> None:
    if not value or any(c.isspace() for c in value):
        raise DataError(
            f"{kind} {value!r} is empty or contains whitespace; Kaldi files split each line at the first "
            f"space, so ids must be single tokens. Rename it (e.g. replace spaces with '_')."
        )


def _check_value(kind: str, utt: str, value: str) -> None:
    if "\n" in value or "\r" in value:
        raise DataError(f"{kind} of {utt!r} contains a line break; Kaldi files need one line per utterance")


def write_kaldi_dir(directory: str | os.PathLike, entries: Iterable[KaldiEntry]) -> int:
    """Write ``wav.scp``, ``text``, ``utt2spk``, ``spk2utt`` and (if any entry has one) ``instruct``.

    Every file is written atomically; a stale ``instruct`` is removed when no entry has one.

    Args:
        directory: the data dir to create or overwrite.
        entries: utterances in any order; they are written sorted by id in byte order.

    Returns:
        The number of utterances written.

    Raises:
        DataError: on duplicate ids, ids with whitespace, or values with line breaks.
    """
    directory = Path(directory)
    rows = sorted(entries, key=lambda e: kaldi_sort_key(e.utt))
    seen: set[str] = set()
    spk2utt: dict[str, list[str]] = {}
    for e in rows:
        _check_token("utterance id", e.utt)
        _check_token("speaker id", e.speaker)
        for kind, value in (("wav path", e.wav), ("text", e.text), ("instruct", e.instruct or "")):
            _check_value(kind, e.utt, value)
        if e.utt in seen:
            raise DataError(f"utterance id {e.utt!r} appears twice; ids must be unique within a data dir")
        seen.add(e.utt)
        spk2utt.setdefault(e.speaker, []).append(e.utt)
    has_instruct = [e.instruct is not None for e in rows]
    if any(has_instruct) and not all(has_instruct):
        raise DataError("some utterances have an instruct and some do not; give every utterance one or none")
    directory.mkdir(parents=True, exist_ok=True)
    write_text(directory / "wav.scp", "".join(f"{e.utt} {e.wav}\n" for e in rows))
    write_text(directory / "text", "".join(f"{e.utt} {e.text}\n" for e in rows))
    write_text(directory / "utt2spk", "".join(f"{e.utt} {e.speaker}\n" for e in rows))
    spk_lines = [
        f"{spk} {' '.join(utts)}\n"
        for spk, utts in sorted(spk2utt.items(), key=lambda kv: kaldi_sort_key(kv[0]))
    ]
    write_text(directory / "spk2utt", "".join(spk_lines))
    if rows and all(has_instruct):
        write_text(directory / "instruct", "".join(f"{e.utt} {e.instruct}\n" for e in rows))
    elif (directory / "instruct").exists():
        (directory / "instruct").unlink()
    return len(rows)


def read_kaldi_map(path: str | os.PathLike, allow_empty_value: bool = False) -> dict[str, str]:
    """Read a ``<key> <value>`` file into a dict (value = rest of the line after the first space).

    Raises:
        DataError: on a missing file, a duplicate key or a line without a value.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; expected a Kaldi '<utt> <value>' file there")
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            key, _, value = line.partition(" ")
            if not value and not allow_empty_value:
                raise DataError(f"{path}:{i}: expected '<key> <value>', found {line!r}")
            if key in out:
                raise DataError(f"{path}:{i}: key {key!r} appears twice; keys must be unique")
            out[key] = value
    return out


def read_kaldi_dir(directory: str | os.PathLike) -> list[KaldiEntry]:
    """Read a data dir written by :func:`write_kaldi_dir` (or upstream's prepare_data.py).

    ``wav.scp``, ``text`` and ``utt2spk`` are required, ``instruct`` is optional.

    Raises:
        DataError: when a file is missing or the files disagree about the utterance ids.
    """
    directory = Path(directory)
    wavs = read_kaldi_map(directory / "wav.scp")
    texts = read_kaldi_map(directory / "text", allow_empty_value=True)
    spks = read_kaldi_map(directory / "utt2spk")
    instructs = read_kaldi_map(directory / "instruct") if (directory / "instruct").is_file() else None
    problems = _id_problems(directory, wavs, texts, spks, instructs)
    if problems:
        raise DataError(f"Kaldi dir {directory} is inconsistent:\n  - " + "\n  - ".join(problems))
    return [
        KaldiEntry(utt, wavs[utt], texts[utt], spks[utt], instructs[utt] if instructs is not None else None)
        for utt in sorted(wavs, key=kaldi_sort_key)
    ]


def _id_problems(directory: Path, wavs: dict, texts: dict, spks: dict, instructs: dict | None) -> list[str]:
    problems = []
    ids = set(wavs)
    others = [("text", texts), ("utt2spk", spks)] + (
        [("instruct", instructs)] if instructs is not None else []
    )
    for name, m in others:
        missing = sorted(ids - set(m))
        extra = sorted(set(m) - ids)
        if missing:
            problems.append(f"{len(missing)} utterance(s) of wav.scp missing from {name}, e.g. {missing[:3]}")
        if extra:
            problems.append(f"{len(extra)} utterance(s) in {name} but not in wav.scp, e.g. {extra[:3]}")
    return problems


def upstream_warnings(directory: str | os.PathLike) -> list[str]:
    """Things upstream CosyVoice's tools would misread in a data dir that our readers accept.

    Upstream's ``tools/make_parquet_list.py`` splits every ``wav.scp`` line at *any* whitespace
    and keeps the second field, so an audio path containing a space is cut short there (and the
    file is not found). cosytune's own readers split at the first space only and are unaffected.

    Returns:
        Warning messages (empty when upstream would read the dir as we do).
    """
    directory = Path(directory)
    wavs = read_kaldi_map(directory / "wav.scp")
    spaced = sorted(p for p in wavs.values() if any(c.isspace() for c in p))
    if not spaced:
        return []
    msg = (
        f"{len(spaced)} audio path(s) in {directory / 'wav.scp'} contain whitespace, e.g. {spaced[0]!r}; "
        "cosytune reads them fine, but upstream CosyVoice's tools/make_parquet_list.py splits wav.scp "
        "lines at whitespace and would cut them short. For upstream compatibility keep the prepared "
        "wavs under a path without spaces."
    )
    return [msg]


def validate_kaldi_dir(
    directory: str | os.PathLike,
    check_audio: bool = True,
    require_instruct: bool = True,
) -> list[str]:
    """List every problem of a data dir (empty list = valid).

    Checks: required files exist; every utterance id of ``wav.scp`` is in ``text``, ``utt2spk``
    and ``instruct`` and vice versa; ``spk2utt`` is exactly the inverse of ``utt2spk``; files are
    sorted in byte order; texts are non-empty; instructs end with ``<|endofprompt|>``; and (with
    ``check_audio``) every wav path exists.

    Args:
        directory: the data dir.
        check_audio: also check that each ``wav.scp`` path exists.
        require_instruct: treat a missing ``instruct`` file as a problem (CosyVoice 3 needs it).

    Returns:
        Human-readable problem descriptions.
    """
    directory = Path(directory)
    problems: list[str] = []
    needed = ["wav.scp", "text", "utt2spk", "spk2utt"] + (["instruct"] if require_instruct else [])
    missing_files = [n for n in needed if not (directory / n).is_file()]
    if missing_files:
        return [f"missing file(s) {', '.join(missing_files)} in {directory}"]
    try:
        wavs = read_kaldi_map(directory / "wav.scp")
        texts = read_kaldi_map(directory / "text", allow_empty_value=True)
        spks = read_kaldi_map(directory / "utt2spk")
        spk2utt_raw = read_kaldi_map(directory / "spk2utt")
        instructs = read_kaldi_map(directory / "instruct") if (directory / "instruct").is_file() else None
    except DataError as e:
        return [str(e)]
    problems += _id_problems(directory, wavs, texts, spks, instructs)
    inverse: dict[str, list[str]] = {}
    for utt, spk in spks.items():
        inverse.setdefault(spk, []).append(utt)
    spk2utt = {spk: v.split() for spk, v in spk2utt_raw.items()}
    if {k: sorted(v) for k, v in spk2utt.items()} != {k: sorted(v) for k, v in inverse.items()}:
        problems.append("spk2utt is not the inverse of utt2spk; regenerate it from utt2spk")
    for name in ("wav.scp", "text", "utt2spk", "spk2utt") + (("instruct",) if instructs is not None else ()):
        keys = [
            line.split(" ", 1)[0]
            for line in (directory / name).read_text(encoding="utf-8").splitlines()
            if line
        ]
        if keys != sorted(keys, key=kaldi_sort_key):
            problems.append(f"{name} is not sorted by id in byte order (LC_ALL=C sort)")
    empty = sorted(u for u, t in texts.items() if not t.strip())
    if empty:
        problems.append(f"{len(empty)} utterance(s) with empty text, e.g. {empty[:3]}")
    if instructs is not None:
        bad = sorted(u for u, t in instructs.items() if not t.endswith(ENDOFPROMPT))
        if bad:
            problems.append(f"{len(bad)} instruct(s) not ending with {ENDOFPROMPT}, e.g. {bad[:3]}")
    if check_audio:
        gone = sorted(u for u, p in wavs.items() if not Path(p).is_file())
        if gone:
            problems.append(
                f"{len(gone)} wav path(s) in wav.scp do not exist, e.g. {[wavs[u] for u in gone[:3]]}"
            )
    return problems
