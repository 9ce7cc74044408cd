"""The editable review file: one row per utterance, so a person fixes only the suspicious lines.

``review.tsv`` is tab-separated UTF-8 with a header row and these columns::

    utt_id  duration_s  status  flags  delete  asr_check  text

* ``status``: ``train``, ``dev`` or ``rejected:<reason>`` (information only).
* ``flags``: comma-separated hints why a row deserves a look (low ASR confidence, unusual
  speaking rate, digits, ...), information only. Rows with a reject or flags come first.
* ``delete``: type ``x`` (or ``1``/``yes``/``y``/``true``/``delete``) to drop the row; leave it
  empty to keep it.
* ``asr_check``: what the cross-check ASR heard (``cross_check`` setting), information only;
  a row whose text disagrees with it is flagged ``asr_disagrees``.
* ``text``: the transcript; edit it in place. It is the last column so it may contain anything
  except tabs and line breaks. A rejected row (e.g. ``rejected:no_transcript``) comes back
  when its text is typed in and it passes the filters.

Lines starting with ``#`` are comments. Fields quoted the way spreadsheet programs quote them
(``"..."`` with ``""`` inside) are unquoted on reading, and ``\\r`` line ends are accepted, so
the file survives a round trip through a spreadsheet program saving as tab-separated text.

``cosytune apply-review`` (see :func:`cosytune.data.transcribe.apply_review`) reads the file
back and rebuilds train/dev without re-running ASR; a re-run of ``cosytune transcribe`` also
keeps these edits.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cosytune.errors import DataError
from cosytune.fileio import read_user_text, write_text

REVIEW_COLUMNS = ("utt_id", "duration_s", "status", "flags", "delete", "asr_check", "text")
DELETE_MARKS = frozenset({"x", "1", "yes", "y", "true", "delete", "d"})
KEEP_MARKS = frozenset({"", "0", "no", "n", "false", "keep"})


@dataclass(frozen=True)
class ReviewRow:
    """One row of ``review.tsv``."""

    utt: str
    duration_s: float
    status: str
    flags: tuple[str, ...]
    delete: bool
    text: str
    check_text: str = ""


def _clean_field(value: str) -> str:
    """Fields never contain tabs or line breaks (that would break the file's layout)."""
    return " ".join(value.split()) if any(c in value for c in "\t\r\n") else value


def write_review(path: str | os.PathLike, rows: Iterable[ReviewRow]) -> int:
    """Atomically write ``review.tsv``: rejected rows first, then flagged rows, then the rest.

    Returns:
        The number of rows written.
    """

    def order(r: ReviewRow) -> tuple[int, bytes]:
        rank = 0 if r.status.startswith("rejected") else 1 if r.flags else 2
        return rank, r.utt.encode("utf-8")

    rows = sorted(rows, key=order)
    lines = [
        "# Edit 'text' to fix a transcript; put x in 'delete' to drop a row. Then run:",
        "#   cosytune apply-review --dir <this folder>",
        "\t".join(REVIEW_COLUMNS),
    ]
    for r in rows:
        fields = [
            r.utt,
            f"{r.duration_s:.2f}",
            r.status,
            ",".join(r.flags),
            "x" if r.delete else "",
            r.check_text,
            r.text,
        ]
        lines.append("\t".join(_clean_field(f) for f in fields))
    write_text(path, "\n".join(lines) + "\n")
    return len(rows)


def _unquote(field: str) -> str:
    if len(field) >= 2 and field[0] == '"' and field[-1] == '"':
        return field[1:-1].replace('""', '"')
    return field


def read_review(path: str | os.PathLike) -> dict[str, ReviewRow]:
    """Read ``review.tsv`` into ``{utt_id: row}``.

    Raises:
        DataError: naming the file and line for a missing header, a row with too few columns,
            an unknown delete mark, or a duplicate utterance id.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"review file {path} does not exist; run 'cosytune transcribe' first, which writes it"
        )
    out: dict[str, ReviewRow] = {}
    header_seen = False
    problems: list[str] = []
    # The review file is edited by hand, often in a spreadsheet that saves UTF-16 or GBK.
    for i, line in enumerate(read_user_text(path, "review file").splitlines(), 1):
        line = line.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [_unquote(x) for x in line.split("\t", len(REVIEW_COLUMNS) - 1)]
        if not header_seen:
            if tuple(x.strip() for x in fields) != REVIEW_COLUMNS:
                raise DataError(
                    f"{path}:{i}: expected the header {'<TAB>'.join(REVIEW_COLUMNS)}, found {line!r}; "
                    "keep the header row and the tab separators when editing"
                )
            header_seen = True
            continue
        if len(fields) < len(REVIEW_COLUMNS) - 1:
            problems.append(
                f"line {i}: expected {len(REVIEW_COLUMNS)} tab-separated columns, found {len(fields)}"
            )
            continue
        if len(fields) == len(REVIEW_COLUMNS) - 1:  # an empty text column lost its trailing tab
            fields.append("")
        utt, dur, status, flags, delete, check_text, text = fields
        utt = utt.strip()
        mark = delete.strip().lower()
        if mark not in DELETE_MARKS and mark not in KEEP_MARKS:
            problems.append(
                f"line {i} ({utt}): delete column holds {delete!r}; use x to delete or leave it empty"
            )
            continue
        if utt in out:
            problems.append(f"line {i}: utterance {utt!r} appears twice")
            continue
        try:
            duration_s = float(dur)
        except ValueError:
            duration_s = float("nan")
        out[utt] = ReviewRow(
            utt=utt,
            duration_s=duration_s,
            status=status.strip(),
            flags=tuple(x for x in flags.strip().split(",") if x),
            delete=mark in DELETE_MARKS,
            text=" ".join(text.split()),
            check_text=check_text.strip(),
        )
    if not header_seen:
        raise DataError(f"{path} has no header row; expected {'<TAB>'.join(REVIEW_COLUMNS)}")
    if problems:
        raise DataError(f"{path}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return out
