"""The lab's dataset page: the transcript review loop of a ``cosytune transcribe`` output dir.

Rows come from ``review.tsv`` (``data.review.read_review``), clips from ``utterances.jsonl`` (utterance id →
its wav, as transcribe recorded it: a request names an utterance id, which is looked up, never a path).
An edit rewrites ``review.tsv`` atomically (``data.review.write_review``); "apply" runs the library's
``apply_review``, exactly as ``cosytune apply-review --dir`` does.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

from cosytune.errors import DataError, UsageError

_lock = threading.Lock()
MAX_TEXT = 2000


class DatasetDir:
    """A transcribe out dir served by the lab."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).resolve()
        if not (self.path / "review.tsv").is_file():
            raise UsageError(f"--data_dir {self.path}: no review.tsv there; expected the --out_dir of a finished "
                             "'cosytune transcribe' run")

    @property
    def review_path(self) -> Path:
        return self.path / "review.tsv"

    def rows(self) -> list[dict[str, Any]]:
        from cosytune.data.review import read_review

        wavs = self._wavs()
        out = []
        for r in read_review(self.review_path).values():
            out.append({"utt": r.utt, "duration_s": None if math.isnan(r.duration_s) else r.duration_s,
                        "status": r.status, "flags": list(r.flags), "delete": r.delete, "text": r.text,
                        "asr_check": r.check_text, "audio": r.utt in wavs})
        return out

    def _wavs(self) -> dict[str, Path]:
        from cosytune.fileio import read_jsonl

        p = self.path / "utterances.jsonl"
        if not p.is_file():
            return {}
        try:
            return {str(d["utt"]): Path(d["wav"]) for d in read_jsonl(p) if d.get("utt") and d.get("wav")}
        except (ValueError, TypeError) as e:
            raise DataError(f"{p} is damaged ({e}); re-run 'cosytune transcribe'") from e

    def wav_of(self, utt: str) -> Path:
        """The clip of an utterance id (looked up in utterances.jsonl)."""
        wav = self._wavs().get(utt)
        if wav is None or not wav.is_file():
            raise UsageError(f"no clip for utterance {utt!r} in this dataset")
        return wav

    def edit(self, utt: str, *, text: str | None = None, delete: bool | None = None) -> dict[str, Any]:
        """Change one row's text and/or delete mark and rewrite review.tsv atomically."""
        from dataclasses import replace

        from cosytune.data.review import read_review, write_review

        if text is not None:
            if not isinstance(text, str) or len(text) > MAX_TEXT:
                raise UsageError(f"text must be a string of at most {MAX_TEXT} characters")
            text = " ".join(text.split())
        with _lock:
            rows = read_review(self.review_path)
            if utt not in rows:
                raise UsageError(f"utterance {utt!r} is not in {self.review_path.name}")
            changes: dict[str, Any] = {}
            if text is not None:
                changes["text"] = text
            if delete is not None:
                changes["delete"] = bool(delete)
            rows[utt] = replace(rows[utt], **changes)
            write_review(self.review_path, rows.values())
            r = rows[utt]
        return {"utt": r.utt, "text": r.text, "delete": r.delete}

    def apply(self) -> dict[str, Any]:
        """``apply-review`` on this dir; returns its summary rows."""
        from cosytune.data.transcribe import apply_review

        with _lock:
            summary = apply_review(self.path)
        return {str(k): (v if isinstance(v, (int, float, str)) else str(v)) for k, v in summary.items()}
