"""Batch synthesis spread over processes: ``torchrun --nproc_per_node=N -m cosytune infer-batch ...``.

Role
    ``cosytune infer-batch`` asks :class:`BatchRanks` where it stands. In one process (no torchrun) every
    method is the identity of what a single run does. Under torchrun each rank loads the model on its own
    GPU (``cuda:LOCAL_RANK``), takes its share of the segments still to do (:func:`deal_by_length`: greedy
    longest-first by text length, so ranks finish together), writes its wavs and, after every segment, its
    own manifest part ``batch.rank{R}.jsonl`` (the segments it wrote). Rank 0 then waits for every rank
    (the results are gathered), merges them into ``batch.jsonl``, ``rejects.jsonl`` and ``run.json``,
    writes the joined wav, prints the summary and removes the parts.

Resume
    Interrupted at any point, the same command (with any number of processes) resumes per segment: the
    manifest and the parts left by the interrupted run are read (and folded into ``batch.jsonl`` by rank 0
    before anything else runs); a segment is skipped when its entry has the same settings and its wav is
    there and readable, with the length the entry records (:func:`output_is_valid`).

Coordination
    Only small Python objects travel between ranks (the results of the segments, never audio), over gloo,
    whatever the device; the wavs go straight to the shared output folder. The rank layout, this rank's GPU
    and the process group are :class:`cosytune.ranks.Ranks`, as in training.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from cosytune.fileio import read_jsonl, write_jsonl
from cosytune.ranks import Ranks, leave_process_group

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a rank waits for the others (they may still be synthesising their share).
WAIT = datetime.timedelta(hours=24)


def deal_by_length(weights: Sequence[float], world_size: int) -> list[list[int]]:
    """Indices of ``weights`` dealt to ``world_size`` ranks: longest first, each to the rank with the least
    work so far (ties: the lower rank, the earlier index). Each rank's indices come back in input order."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = [0.0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        shares[r].append(i)
        loads[r] += weights[i]
    return [sorted(s) for s in shares]


def part_path(manifest: Path, rank: int) -> Path:
    """Where rank ``rank`` records the segments it wrote (beside ``manifest``)."""
    return manifest.with_name(f"{manifest.stem}.rank{rank}{manifest.suffix}")


def _parts(manifest: Path) -> list[Path]:
    return sorted(manifest.parent.glob(f"{manifest.stem}.rank*{manifest.suffix}"))


def read_manifests(manifest: Path) -> dict[str, dict[str, Any]]:
    """``{name: entry}`` of ``manifest`` and of the rank parts an interrupted run left (the parts are newer)."""
    out: dict[str, dict[str, Any]] = {}
    for path in [manifest, *_parts(manifest)]:
        if path.is_file():
            out.update({r["name"]: r for r in read_jsonl(path)})
    return out


def output_is_valid(wav: Path, entry: dict[str, Any]) -> bool:
    """The segment's wav is there, readable, and as long as its manifest entry says."""
    import soundfile as sf

    try:
        info = sf.info(str(wav))
    except (OSError, RuntimeError):  # missing or not a sound file (soundfile raises LibsndfileError, a RuntimeError)
        return False
    seconds = entry.get("seconds")
    return info.frames > 0 and (not isinstance(seconds, (int, float)) or abs(info.frames / info.samplerate
                                                                               - seconds) < 1e-3)


class BatchRanks(Ranks):
    """This process's place in a batch synthesis job (one process: rank 0 of 1)."""

    @classmethod
    def from_env(cls) -> BatchRanks:
        """From torchrun's ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``; joins the process group when there are several."""
        ranks = super().from_env()
        ranks.join("gloo", WAIT)
        return ranks

    def device(self, device: str) -> str:
        """The device this rank synthesises on: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` when several ranks
        share a machine's GPUs; otherwise ``device`` unchanged."""
        if self.distributed and device in ("auto", "cuda") and torch.cuda.is_available():
            return str(self.cuda())
        return device

    def read_previous(self, manifest: Path) -> dict[str, dict[str, Any]]:
        """The entries of earlier runs; rank 0 first folds parts left by an interrupted run into ``manifest``."""
        if self.is_main and _parts(manifest):
            write_jsonl(manifest, read_manifests(manifest).values())
            for p in _parts(manifest):
                p.unlink()
        self.barrier()
        return read_manifests(manifest)

    def share(self, items: Sequence[T], weight: Callable[[T], float]) -> list[T]:
        """This rank's share of ``items`` (all of them in one process), in their order."""
        if not self.distributed:
            return list(items)
        return [items[i] for i in deal_by_length([weight(x) for x in items], self.world_size)[self.rank]]

    def write_manifest(self, manifest: Path, done: list[dict[str, Any]], previous: dict[str, dict[str, Any]]) -> None:
        """Record the finished segments so an interrupted run resumes: one process rewrites ``manifest``
        (``done`` plus the earlier entries not redone); a rank writes its part (the segments it wrote)."""
        if not self.distributed:
            names = {d["name"] for d in done}
            write_jsonl(manifest, done + [r for n, r in previous.items() if n not in names])
            return
        write_jsonl(part_path(manifest, self.rank), [d for d in done if previous.get(d["name"]) is not d])

    def gather(self, value: T) -> list[T] | None:
        """Every rank's ``value`` on rank 0 (in rank order), after every rank got here; None on other ranks."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, value)
        return out if self.is_main else None

    def finish(self, manifest: Path) -> None:
        """After rank 0 wrote the merged ``manifest``: remove the parts and leave the process group."""
        if self.is_main:
            for p in _parts(manifest):
                p.unlink()
        if self.distributed:
            leave_process_group()
