"""Shared pieces of the feature-extraction stages: data-dir paths, audio decoding, ``.pt`` maps.

Kaldi-style data dirs are read by :func:`cosytune.data.kaldi.read_kaldi_dir` (the one reader data prep
uses too; re-exported here for the stages' convenience).

The ``.pt`` maps (``utt2embedding.pt``, ``spk2embedding.pt``, ``utt2speech_token.pt``) are plain
``{id: list}`` dicts saved with ``torch.save``, exactly what upstream's ``tools/extract_*.py`` write and
``tools/make_parquet_list.py`` reads; we write them atomically.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cosytune.data.kaldi import KaldiDir, read_kaldi_dir
from cosytune.data.rejects import RejectLog
from cosytune.errors import CosytuneError, DataError, listing
from cosytune.fileio import atomic_path, read_json_or, write_json

logger = logging.getLogger(__name__)

__all__ = [
    "ExtractionSummary",
    "KaldiDir",
    "ResumableExtraction",
    "check_same_ids",
    "load_pt_map",
    "read_kaldi_dir",
    "resolve_wav_path",
    "save_pt_map",
]


def resolve_wav_path(kd: KaldiDir, wav: str) -> Path:
    """A ``wav.scp`` path; relative paths are taken relative to the data dir if they exist there."""
    p = Path(wav)
    if not p.is_absolute() and not p.exists() and (kd.path / p).exists():
        return kd.path / p
    return p


def load_pt_map(path: str | os.PathLike) -> dict:
    """Load a ``{id: list}`` map written by :func:`save_pt_map` or by upstream's tools."""
    p = Path(path)
    from cosytune.weights.io import torch_load_safely

    obj = torch_load_safely(p, DataError, what="feature table")
    if not isinstance(obj, dict):
        raise DataError(f"{p}: expected a dict {{id: list}}, found {type(obj).__name__}; delete it and re-run")
    return obj


def save_pt_map(path: str | os.PathLike, obj: dict) -> None:
    """Atomically ``torch.save`` a ``{id: list}`` map."""
    with atomic_path(path) as tmp:
        torch.save(obj, str(tmp))


def check_same_ids(named_sets: dict[str, set[str]], reference: str) -> list[str]:
    """Compare id sets against ``reference``; return human-readable problems (empty if all agree)."""
    ref = named_sets[reference]
    problems = []
    for name, ids in named_sets.items():
        if name == reference:
            continue
        extra, missing = ids - ref, ref - ids
        if missing:
            problems.append(f"{name} lacks {len(missing)} id(s) of {reference}: {listing(sorted(missing))}")
        if extra:
            problems.append(f"{name} has {len(extra)} id(s) not in {reference}: {listing(sorted(extra))}")
    return problems


#: Seconds between intermediate saves of a long extraction run.
CHECKPOINT_EVERY_S = 60.0

Reject = tuple[str, str]
"""(reason, detail) of an utterance a stage drops."""


@dataclass
class ExtractionSummary:
    """What extract-embedding or extract-speech-token did."""

    stage: str
    utterances: int = 0
    computed: int = 0
    reused: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"
    seconds: float = 0.0
    audio_seconds: float = 0.0
    wrote: list[Path] = field(default_factory=list)
    speakers: int = 0
    """Speakers with an embedding (extract-embedding)."""
    tokens: int = 0
    """Speech tokens written (extract-speech-token)."""
    batched: bool = False
    """Many utterances shared one model call (extract-speech-token)."""

    def items(self) -> list[tuple[str, object]]:
        """Key/value lines for the command's closing summary."""
        rate = self.computed / self.seconds if self.seconds > 0 else 0.0
        return [
            ("utterances", self.utterances),
            ("computed", self.computed),
            ("reused from earlier run", self.reused),
            *([("speakers", self.speakers)] if self.speakers else []),
            *([("tokens", self.tokens)] if self.tokens else []),
            ("rejected", ", ".join(f"{k}: {v}" for k, v in sorted(self.rejected.items())) or "none"),
            ("device", f"{self.device}{' (batched)' if self.batched else ''}"),
            ("speed", f"{rate:.1f} utt/s, {self.audio_seconds / self.seconds if self.seconds else 0:.0f}x real time"),
            ("wrote", ", ".join(map(str, self.wrote))),
        ]


@dataclass
class ResumableExtraction:
    """The per-utterance loop shared by extract-embedding and extract-speech-token.

    Results already in ``<data dir>/<out_name>`` are reused when the state file beside it records the
    same model fingerprint (unless ``force``); the rest are computed chunk by chunk — audio decoded on a
    thread pool, screened, run through the model in one call per chunk, converted — with rejects
    recorded in ``rejects.jsonl``, progress reported and the map saved atomically every
    :data:`CHECKPOINT_EVERY_S` seconds, so an interrupted run continues where it stopped.

    Args:
        kd: the data dir.
        stage: the command (names the state file and the rejects).
        out_name: the ``{utt: list}`` map to write (``utt2embedding.pt``, ``utt2speech_token.pt``).
        model: the ONNX model in use (its ``path`` is fingerprinted, its ``device`` reported).
        force: ignore earlier results.
        rejects_path: ``rejects.jsonl`` to record rejects in (default ``<data dir>/rejects.jsonl``).
    """

    kd: KaldiDir
    stage: str
    out_name: str
    model: Any
    force: bool = False
    rejects_path: str | os.PathLike | None = None
    verb: str = "processed"
    """What happens to an utterance, for the error when none has a result ("embedded", ...)."""
    cache: dict[str, list] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out_path = self.kd.path / self.out_name
        self.state_path = self.kd.path / f".{self.stage}.state.json"
        model = Path(self.model.path).resolve()  # a cheap identity: cached results of another model are stale
        st = model.stat()
        self.fingerprint = {"model": str(model), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        self.rejects = RejectLog(Path(self.rejects_path) if self.rejects_path else self.kd.path / "rejects.jsonl",
                                 self.stage)
        if self.force or not (self.out_path.is_file() and self.state_path.is_file()):
            return
        if read_json_or(self.state_path, {}).get("fingerprint") == self.fingerprint:
            self.cache = {u: v for u, v in load_pt_map(self.out_path).items()
                          if u in self.kd.utt2wav and len(v) > 0}
        else:
            logger.info("%s was made with another model (or an older run); recomputing every utterance",
                        self.out_path)

    @property
    def todo(self) -> list[str]:
        """Utterances without a reusable result, in data-dir order."""
        return [u for u in self.kd.utts if u not in self.cache]

    def save(self) -> None:
        """Write the map (data-dir order) and the fingerprint atomically."""
        save_pt_map(self.out_path, {u: self.cache[u] for u in self.kd.utts if u in self.cache})
        write_json(self.state_path, {"fingerprint": self.fingerprint})

    def run(
        self,
        *,
        prepare: Callable[[Path], Any],
        screen: Callable[[Path, Any, float], Reject | None],
        infer: Callable[[Sequence[Any]], Sequence[Any]],
        convert: Callable[[str, Any], list | Reject],
        chunk_size: int,
        num_threads: int,
        progress: Callable[[int], None] | None = None,
    ) -> ExtractionSummary:
        """Compute every utterance of :attr:`todo`, then save the map and the rejects.

        Args:
            prepare: wav path → ``(feature, duration_s)`` (raising for unreadable audio).
            screen: ``(path, feature, duration_s)`` → a reject, or None to keep the utterance.
            infer: the model on a list of features, one output per feature.
            convert: ``(utt, output)`` → the list to store, or a reject (a tuple).

        Raises:
            DataError: no utterance has a result.
        """
        def prepare_or_error(path: Path) -> Any:  # one bad file is a recorded reject, not an aborted stage
            try:
                return prepare(path)
            except (CosytuneError, OSError, ValueError, RuntimeError) as e:
                return e

        todo, rejects = self.todo, self.rejects
        summary = ExtractionSummary(self.stage, utterances=len(self.kd.utts), reused=len(self.cache),
                                    device=self.model.device, wrote=[self.out_path])
        if summary.reused:
            logger.info("%s: reusing %d results of a previous run; computing %d", self.stage, summary.reused,
                        len(todo))
            if progress:
                progress(summary.reused)
        last_save = time.monotonic()
        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            for start in range(0, len(todo), chunk_size):
                chunk = todo[start : start + chunk_size]
                paths = [resolve_wav_path(self.kd, self.kd.utt2wav[u]) for u in chunk]
                ok_utts, feats = [], []
                for u, p, res in zip(chunk, paths, pool.map(prepare_or_error, paths)):
                    if isinstance(res, Exception):
                        rejects.add(u, "unreadable_audio", f"{p}: {res}")
                        continue
                    feat, dur = res
                    problem = screen(p, feat, dur)
                    if problem is not None:
                        rejects.add(u, *problem)
                        continue
                    summary.audio_seconds += dur
                    ok_utts.append(u)
                    feats.append(feat)
                outputs = infer(feats) if feats else []
                for u, out in zip(ok_utts, outputs):
                    value = convert(u, out)
                    if isinstance(value, tuple):
                        rejects.add(u, *value)
                        continue
                    self.cache[u] = value
                    summary.computed += 1
                if progress:
                    progress(len(chunk))
                if time.monotonic() - last_save > CHECKPOINT_EVERY_S:
                    self.save()
                    last_save = time.monotonic()
        rejects.save()
        if not self.cache:
            raise DataError(f"{self.kd.path}: no utterance could be {self.verb} ({len(rejects)} rejects, "
                            f"see {rejects.path})")
        self.save()
        summary.rejected = dict(rejects.counts())
        return summary
