"""Kaldi-style data directories as upstream CosyVoice's data-prep tools read them.

A data dir holds one line per utterance in each of these files (``<utt> <value>``), sorted by
utterance id in byte order (what ``LC_ALL=C sort`` gives):

* ``wav.scp``   ``utt /abs/path/to/audio.wav``
* ``text``      ``utt transcript``
* ``utt2spk``   ``utt speaker``
* ``spk2utt``   ``speaker utt1 utt2 ...`` (sorted by speaker; the inverse of utt2spk)
* ``instruct``  ``utt You are a helpful assistant.<|endofprompt|>`` (CosyVoice 3 needs it)

Utterance ids are prefixed with the speaker id, so sorting utterances also keeps each
speaker's utterances together (the Kaldi convention that ``utt2spk`` and ``spk2utt`` sort alike).

Reading (one reader, :func:`read_kaldi_map`, for data prep and feature extraction alike) follows
upstream's tools (``tools/make_parquet_list.py``, ``tools/extract_*.py``: ``line.split()``): a line is
split at whitespace runs and the first field is the id; ``text`` and ``instruct`` are the remaining
fields re-joined with single spaces (and may be empty). One deliberate difference: where upstream keeps
only the second field of ``wav.scp``/``utt2spk``, we keep the rest of the line, so an audio path with a
space in it survives (:func:`upstream_warnings` tells when upstream would cut it). Blank lines are
skipped; duplicate ids and lines without a value are errors that list every offending line.

The writer puts exactly one space after the id, so whatever it writes reads back unchanged (ids have
no whitespace; transcripts are whitespace-normalised before they get here).

Reference: upstream-spec.md §7.6 (``examples/libritts/cosyvoice/local/prepare_data.py`` writes
these files; ``tools/make_parquet_list.py`` reads them).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cosytune.errors import DataError, listing
from cosytune.fileio import write_text
from cosytune.text.special import ENDOFPROMPT

logger = logging.getLogger(__name__)

KALDI_FILES = ("wav.scp", "text", "utt2spk", "spk2utt", "instruct")
#: Files whose value is words (re-joined with single spaces, may be empty) rather than one field.
WORD_FILES = ("text", "instruct")


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
    for name, field_name in (("wav.scp", "wav"), ("text", "text"), ("utt2spk", "speaker")):
        write_text(directory / name, "".join(f"{e.utt} {getattr(e, field_name)}\n" for e in rows))
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


def read_kaldi_map(path: str | os.PathLike, *, words: bool | None = None) -> dict[str, str]:
    """Read one ``<id> <value>`` list into a dict in file order (the rule is in the module docstring).

    Args:
        path: the list file.
        words: the value is words re-joined with single spaces and may be empty (``text``,
            ``instruct``); otherwise it is the rest of the line after the id and must not be empty.
            None = decided by the file name (:data:`WORD_FILES`).

    Raises:
        DataError: a missing file, or malformed lines (duplicate id, no value), every one listed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; expected a Kaldi '<utt> <value>' file there")
    if words is None:
        words = path.name in WORD_FILES
    out: dict[str, str] = {}
    problems: list[str] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split(None, 1)
            if not parts:
                continue
            key = parts[0]
            value = parts[1].strip() if len(parts) > 1 else ""
            if words:
                value = " ".join(value.split())
            elif not value:
                problems.append(f"line {n}: {line.strip()!r} has an id but no value")
                continue
            if key in out:
                problems.append(f"line {n}: id {key!r} appears twice")
                continue
            out[key] = value
    if problems:
        lines = listing(problems, sep="\n  ")
        raise DataError(f"{path}: {len(problems)} malformed line(s) (expected '<id> <value>' with unique ids):\n  "
                        f"{lines}\nFix these lines and re-run.")
    return out


@dataclass
class KaldiDir:
    """The lists of one Kaldi-style data dir, keyed by utterance id (``wav.scp`` order)."""

    path: Path
    utt2wav: dict[str, str]
    utt2text: dict[str, str] = field(default_factory=dict)
    utt2spk: dict[str, str] = field(default_factory=dict)
    utt2instruct: dict[str, str] | None = None

    @property
    def utts(self) -> list[str]:
        return list(self.utt2wav)

    def entries(self) -> list[KaldiEntry]:
        """Every utterance, sorted by id in byte order.

        Raises:
            DataError: when ``text``, ``utt2spk`` or ``instruct`` disagree with ``wav.scp`` about the ids.
        """
        problems = _id_problems(self.utt2wav, self.utt2text, self.utt2spk, self.utt2instruct)
        if problems:
            raise DataError(f"Kaldi dir {self.path} is inconsistent:\n  - " + "\n  - ".join(problems))
        instructs = self.utt2instruct
        return [
            KaldiEntry(utt, self.utt2wav[utt], self.utt2text[utt], self.utt2spk[utt],
                       instructs[utt] if instructs is not None else None)
            for utt in sorted(self.utt2wav, key=kaldi_sort_key)
        ]


def read_kaldi_dir(path: str | os.PathLike, *, need: tuple[str, ...] = ("wav.scp",)) -> KaldiDir:
    """Read a Kaldi-style data dir (written by :func:`write_kaldi_dir` or upstream's prepare_data.py).

    Args:
        path: the directory.
        need: files that must exist (``wav.scp`` always; add ``text``/``utt2spk`` where required).

    Returns:
        A :class:`KaldiDir`; optional files that are absent give empty maps (``instruct``: ``None``).

    Raises:
        DataError: a required file is missing, or a list has malformed/duplicate lines.
    """
    d = Path(path)
    if not d.is_dir():
        raise DataError(f"data dir {d} does not exist; expected a Kaldi-style dir with wav.scp, text, utt2spk "
                        "(as written by `cosytune transcribe`)")
    missing = [n for n in dict.fromkeys(("wav.scp",) + tuple(need)) if not (d / n).is_file()]
    if missing:
        raise DataError(f"data dir {d} lacks {', '.join(missing)}; expected the files `cosytune transcribe` "
                        "writes (wav.scp, text, utt2spk, spk2utt, instruct)")
    utt2wav = read_kaldi_map(d / "wav.scp")  # first: its problems are the ones to report first
    optional = {attr: read_kaldi_map(d / name) for name, attr in
                (("text", "utt2text"), ("utt2spk", "utt2spk"), ("instruct", "utt2instruct")) if (d / name).is_file()}
    return KaldiDir(d, utt2wav, **optional)


def read_kaldi_entries(directory: str | os.PathLike) -> list[KaldiEntry]:
    """The utterances of a data dir with ``wav.scp``, ``text`` and ``utt2spk`` (``instruct`` optional).

    Raises:
        DataError: when a file is missing or malformed, or the files disagree about the utterance ids.
    """
    return read_kaldi_dir(directory, need=("wav.scp", "text", "utt2spk")).entries()


def _id_problems(wavs: dict, texts: dict, spks: dict, instructs: dict | None) -> list[str]:
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

    Upstream's ``tools/make_parquet_list.py`` splits every ``wav.scp`` line at whitespace and keeps
    the second field, so an audio path containing a space is cut short there (and the file is not
    found). cosytune's reader keeps the rest of the line and is unaffected.

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
    names = ("wav.scp", "text", "utt2spk", "spk2utt") + (("instruct",) if (directory / "instruct").is_file() else ())
    try:
        maps = {name: read_kaldi_map(directory / name) for name in names}
    except DataError as e:
        return [str(e)]
    wavs, texts, spks, spk2utt_raw = maps["wav.scp"], maps["text"], maps["utt2spk"], maps["spk2utt"]
    instructs = maps.get("instruct")
    problems += _id_problems(wavs, texts, spks, instructs)
    inverse: dict[str, list[str]] = {}
    for utt, spk in spks.items():
        inverse.setdefault(spk, []).append(utt)
    spk2utt = {spk: v.split() for spk, v in spk2utt_raw.items()}
    if {k: sorted(v) for k, v in spk2utt.items()} != {k: sorted(v) for k, v in inverse.items()}:
        problems.append("spk2utt is not the inverse of utt2spk; regenerate it from utt2spk")
    for name, m in maps.items():
        keys = list(m)  # file order
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
