"""Rejected inputs are data: every dropped row is recorded with stage, input, reason and detail."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from cosytune.fileio import read_jsonl, write_jsonl


@dataclass(frozen=True)
class Reject:
    """One input that did not make it through a stage."""

    stage: str
    input: str
    reason: str
    detail: str = ""


class RejectLog:
    """Collects rejects of one stage and merges them into ``rejects.jsonl`` atomically.

    Rows of other stages already in the file are kept; rows of this stage are replaced, so a
    re-run never duplicates them.
    """

    def __init__(self, path: str | os.PathLike, stage: str) -> None:
        self.path = Path(path)
        self.stage = stage
        self.rows: list[Reject] = []

    def add(self, input: str, reason: str, detail: str = "") -> None:
        self.rows.append(Reject(self.stage, str(input), reason, detail))

    def counts(self) -> Counter:
        return Counter(r.reason for r in self.rows)

    def save(self) -> None:
        keep = []
        if self.path.exists():
            keep = [r for r in read_jsonl(self.path) if r.get("stage") != self.stage]
        write_jsonl(self.path, keep + [asdict(r) for r in self.rows])

    def __len__(self) -> int:
        return len(self.rows)
