"""Parquet training shards in upstream CosyVoice's format, plus ``data.list`` and its companions.

Upstream reference: ``FunAudioLLM/CosyVoice:tools/make_parquet_list.py`` (recipe stage 3) writes the
shards; ``cosyvoice/dataset/processor.py`` ``parquet_opener`` reads them (``pq.ParquetFile(url)
.iter_batches(64)``, one dict per row). Layout written to ``des_dir``:

* ``parquet_{i:09d}.tar`` — a parquet file despite the extension (upstream's naming), one row per
  utterance, columns in upstream's order:

  =================== ====================== =============================================
  column              arrow type             content
  =================== ====================== =============================================
  utt                 string                 utterance id
  audio_data          binary                 the audio file's raw bytes
  wav                 string                 its path (as in wav.scp, made absolute)
  text                string                 transcript
  spk                 string                 speaker id
  utt_embedding       list<float32>          CAM++ embedding (if utt2embedding.pt exists)
  spk_embedding       list<float32>          speaker mean (if spk2embedding.pt exists)
  speech_token        list<int64>            speech tokens (if utt2speech_token.pt exists)
  instruct            string                 instruct prefix (if ``instruct`` exists)
  reject_speech_token list<int64>            DPO only: from ``<src_dir>_reject/utt2speech_token.pt``
  =================== ====================== =============================================

  Embeddings are stored as float32 arrays (upstream's pandas path stores float64 lists, which some
  forks trip over); upstream converts them with ``torch.tensor(..., dtype=float32)`` either way.
* ``utt2parquet_{i:09d}.json`` ``{utt: shard}`` and ``spk2parquet_{i:09d}.json`` ``{spk: shard}``
  (upstream leaves the latter empty because of a NameError; ours are filled).
* ``data.list``, ``utt2data.list``, ``spk2data.list`` — one absolute path per line.

Consistency: ``wav.scp`` defines the utterances; ``text``, ``utt2spk`` and (if present) ``instruct``,
``utt2embedding.pt`` and ``utt2speech_token.pt`` must hold exactly those ids, and ``spk2embedding.pt``
exactly their speakers. Utterances rejected by an earlier stage (recorded in ``rejects.jsonl``) are
left out rather than reported. Any other mismatch is a :class:`~cosytune.errors.DataError` listing the
offending ids per file. Shards are rebuilt only when their rows changed, so re-runs are cheap.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cosytune.data.rejects import RejectLog
from cosytune.errors import DataError, UsageError, listing
from cosytune.fileio import (
    atomic_path,
    file_identity,
    read_json_or,
    read_jsonl,
    sha256_json,
    write_json,
    write_text,
)

if TYPE_CHECKING:
    from cosytune.data.frontend_common import KaldiDir

# frontend_common (and with it torch) is imported inside the functions that need it, so the spawned
# shard-writing workers, which only import this module, start in a fraction of a second.

logger = logging.getLogger(__name__)

__all__ = ["COLUMNS", "STAGE", "ParquetSummary", "make_parquet", "parquet_schema", "read_parquet_rows"]

STAGE = "make-parquet"
STATE_FILE = ".make-parquet.state.json"
COLUMNS = ("utt", "audio_data", "wav", "text", "spk", "utt_embedding", "spk_embedding", "speech_token",
           "instruct", "reject_speech_token")
UPSTREAM_STAGES_THAT_DROP = ("extract-embedding", "extract-speech-token")
# The columns that come from the stages' .pt maps: column -> (map file, item type, keyed by speaker).
_MAP_COLUMNS = {"utt_embedding": ("utt2embedding.pt", float, False), "spk_embedding": ("spk2embedding.pt", float, True),
                "speech_token": ("utt2speech_token.pt", int, False)}
_SHARD_RE = re.compile(r"^(parquet|utt2parquet|spk2parquet)_(\d{9})\.(tar|json)$")


@dataclass
class ParquetSummary:
    """What :func:`make_parquet` did."""

    utterances: int = 0
    shards: int = 0
    written: int = 0
    reused: int = 0
    excluded: dict[str, int] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    seconds: float = 0.0
    data_list: Path | None = None


def parquet_schema(columns: list[str]):
    """The explicit arrow schema for the given subset of :data:`COLUMNS` (in upstream order)."""
    import pyarrow as pa

    types = {
        "utt": pa.string(),
        "audio_data": pa.binary(),
        "wav": pa.string(),
        "text": pa.string(),
        "spk": pa.string(),
        "utt_embedding": pa.list_(pa.float32()),
        "spk_embedding": pa.list_(pa.float32()),
        "speech_token": pa.list_(pa.int64()),
        "instruct": pa.string(),
        "reject_speech_token": pa.list_(pa.int64()),
    }
    return pa.schema([pa.field(c, types[c]) for c in COLUMNS if c in columns])


def _write_shard(job: dict) -> str:
    """Worker: read the audio bytes, write one parquet shard and its two json maps (all atomic)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: list[dict] = job["rows"]
    columns: list[str] = job["columns"]
    data: dict[str, list] = {c: [] for c in columns}
    for r in rows:
        for c in columns:
            if c == "audio_data":
                try:
                    with open(r["wav"], "rb") as f:
                        data[c].append(f.read())
                except OSError as e:
                    raise DataError(f"cannot read audio {r['wav']} of utterance {r['utt']} while writing "
                                    f"{job['parquet']}: {e}; restore the file and re-run make-parquet") from e
            else:
                data[c].append(r[c])
    table = pa.Table.from_pydict(data, schema=parquet_schema(columns))
    with atomic_path(job["parquet"]) as tmp:
        pq.write_table(table, str(tmp))
    write_json(job["utt_json"], {r["utt"]: job["parquet"] for r in rows})
    write_json(job["spk_json"], {s: job["parquet"] for s in dict.fromkeys(r["spk"] for r in rows)})
    return job["parquet"]


_SHARD_FILES = ("parquet", "utt_json", "spk_json")


def _shard_intact(recorded: object, key: str, job: dict) -> bool:
    """The shard was written from these inputs and its three files are still the ones written then."""
    if not isinstance(recorded, dict) or recorded.get("key") != key:
        return False
    return all(file_identity(job[k]) is not None and file_identity(job[k]) == recorded.get("files", {}).get(k)
               for k in _SHARD_FILES)


def _earlier_rejects(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    out = {}
    for r in read_jsonl(path):
        if r.get("stage") in UPSTREAM_STAGES_THAT_DROP:
            out.setdefault(str(r.get("input")), f"{r.get('stage')}: {r.get('reason')}")
    return out


def _consistency(kd: KaldiDir, maps: dict[str, dict], dropped: set[str]) -> list[str]:
    from cosytune.data.frontend_common import check_same_ids

    utts = set(kd.utt2wav)
    sets = {"wav.scp": utts, "text": set(kd.utt2text), "utt2spk": set(kd.utt2spk)}
    if kd.utt2instruct is not None:
        sets["instruct"] = set(kd.utt2instruct)
    problems = check_same_ids(sets, "wav.scp")
    kept = utts - dropped
    for name in ("utt2embedding.pt", "utt2speech_token.pt"):
        if name in maps:
            # Ids an earlier stage rejected may be present or absent; every other id must match.
            problems += check_same_ids({"wav.scp (minus earlier rejects)": kept, name: set(maps[name]) - dropped},
                                       "wav.scp (minus earlier rejects)")
    if "spk2embedding.pt" in maps:
        have = set(maps["spk2embedding.pt"])
        needed = {kd.utt2spk[u] for u in kept if u in kd.utt2spk}
        known = set(kd.utt2spk.values())
        if needed - have:
            problems.append(f"spk2embedding.pt lacks speaker(s) {listing(sorted(needed - have))}")
        if have - known:
            problems.append(f"spk2embedding.pt has speaker(s) not in utt2spk: {listing(sorted(have - known))}")
    return problems


def make_parquet(
    src_dir: str | os.PathLike,
    des_dir: str | os.PathLike,
    *,
    num_utts_per_parquet: int = 1000,
    num_processes: int = 1,
    dpo: bool = False,
    force: bool = False,
    rejects_path: str | os.PathLike | None = None,
    progress: Callable[[int], None] | None = None,
) -> ParquetSummary:
    """Write upstream-compatible parquet shards of ``src_dir`` into ``des_dir``.

    Args:
        src_dir: Kaldi-style dir (``wav.scp``, ``text``, ``utt2spk``; optional ``instruct`` and the
            ``.pt`` maps of ``extract-embedding`` / ``extract-speech-token``).
        des_dir: output dir (created).
        num_utts_per_parquet: rows per shard.
        num_processes: worker processes writing shards.
        dpo: add ``reject_speech_token`` from ``<src_dir>_reject/utt2speech_token.pt``.
        force: rewrite every shard even if unchanged.
        rejects_path: ``rejects.jsonl`` (default ``<src_dir>/rejects.jsonl``): read for earlier stages'
            rejects, and this stage's rejects are recorded there.
        progress: called with the number of utterances written after each shard.

    Returns:
        A :class:`ParquetSummary`.

    Raises:
        DataError: inconsistent ids across the lists and maps (all offenders listed), missing audio
            for every utterance, or an unreadable map.
        UsageError: bad sizes.
    """
    from cosytune.data.frontend_common import load_pt_map, read_kaldi_dir, resolve_wav_path

    t0 = time.perf_counter()
    if num_utts_per_parquet < 1 or num_processes < 1:
        raise UsageError(f"--num_utts_per_parquet and --num_processes must be >= 1; got "
                         f"{num_utts_per_parquet} and {num_processes}")
    kd = read_kaldi_dir(src_dir, need=("wav.scp", "text", "utt2spk"))
    des = Path(des_dir).resolve()
    des.mkdir(parents=True, exist_ok=True)
    rejects = RejectLog(Path(rejects_path) if rejects_path else kd.path / "rejects.jsonl", STAGE)
    earlier = _earlier_rejects(rejects.path)

    maps: dict[str, dict] = {}
    for name, _, _ in _MAP_COLUMNS.values():
        if (kd.path / name).is_file():
            maps[name] = load_pt_map(kd.path / name)
    dropped = {u for u in earlier if u in kd.utt2wav}
    problems = _consistency(kd, maps, dropped)
    reject_tokens: dict | None = None
    if dpo:
        rpath = Path(str(kd.path) + "_reject") / "utt2speech_token.pt"
        reject_tokens = load_pt_map(rpath) if rpath.is_file() else {}
    if problems:
        raise DataError(f"{kd.path}: the lists and maps disagree on utterance ids:\n  " + "\n  ".join(problems)
                        + "\nRe-run the stage that wrote the offending file (or fix the lists) and try again.")

    excluded = Counter(earlier[u] for u in dropped)
    columns = ["utt", "audio_data", "wav", "text", "spk"] + [c for c, (f, _, _) in _MAP_COLUMNS.items() if f in maps]
    if kd.utt2instruct is not None:
        columns.append("instruct")
    else:
        logger.warning("%s has no instruct file: the shards get no instruct column, which CosyVoice 3 LLM "
                       "training requires (write one line per utterance: '<utt> You are a helpful "
                       "assistant.<|endofprompt|>')", kd.path)
    if dpo:
        columns.append("reject_speech_token")

    rows: list[dict] = []
    for u in kd.utts:
        if u in dropped:
            continue
        wav = resolve_wav_path(kd, kd.utt2wav[u]).resolve()
        if not wav.is_file():
            rejects.add(u, "missing_audio", f"{wav} does not exist")
            continue
        if "utt2speech_token.pt" in maps and len(maps["utt2speech_token.pt"][u]) == 0:
            # Upstream's tool writes [] for clips over 30 s; its training filter drops them anyway.
            rejects.add(u, "empty_speech_token", "utt2speech_token.pt holds an empty list (clip over 30 s?)")
            continue
        st = wav.stat()
        row = {"utt": u, "wav": str(wav), "text": kd.utt2text[u], "spk": kd.utt2spk[u],
               "_file": [st.st_size, st.st_mtime_ns]}
        for c, (f, cast, by_speaker) in _MAP_COLUMNS.items():
            if f in maps:
                row[c] = [cast(x) for x in maps[f][kd.utt2spk[u] if by_speaker else u]]
        if "instruct" in columns:
            row["instruct"] = kd.utt2instruct[u]  # type: ignore[index]
        if dpo:
            rt = reject_tokens.get(u)  # type: ignore[union-attr]
            row["reject_speech_token"] = None if rt is None else [int(x) for x in rt]
        rows.append(row)
    excluded.update(rejects.counts())
    if not rows:
        rejects.save()
        raise DataError(f"{kd.path}: no utterance left to write ({sum(excluded.values())} excluded: {dict(excluded)})")

    state_path = des / STATE_FILE
    state = {} if force else read_json_or(state_path, {})
    jobs, new_state = [], {}
    for i, start in enumerate(range(0, len(rows), num_utts_per_parquet)):
        shard_rows = rows[start : start + num_utts_per_parquet]
        job = {
            "parquet": str(des / f"parquet_{i:09d}.tar"),
            "utt_json": str(des / f"utt2parquet_{i:09d}.json"),
            "spk_json": str(des / f"spk2parquet_{i:09d}.json"),
            "columns": columns,
            "rows": shard_rows,
        }
        # The audio bytes go into the shard, so the wavs' identity (size, mtime) is part of its key: a
        # re-recorded clip with the same name rewrites its shard.
        audio = [file_identity(r["wav"]) for r in shard_rows] if "audio_data" in columns else None
        key = sha256_json({"columns": columns, "rows": shard_rows, "audio": audio})
        new_state[job["parquet"]] = key
        done = _shard_intact(state.get(job["parquet"]), key, job)
        if not done:
            jobs.append(job)
    n_shards = len(new_state)
    summary = ParquetSummary(utterances=len(rows), shards=n_shards, reused=n_shards - len(jobs),
                             excluded=dict(excluded), columns=columns)
    if progress and summary.reused:
        progress(len(rows) - sum(len(j["rows"]) for j in jobs))

    def done_one(job: dict) -> None:
        # Record each finished shard at once (with its files' size and mtime), so an interrupted run resumes
        # after it and a shard damaged later is written again.
        state[job["parquet"]] = {"key": new_state[job["parquet"]],
                                 "files": {k: file_identity(job[k]) for k in _SHARD_FILES}}
        write_json(state_path, state)
        summary.written += 1
        if progress:
            progress(len(job["rows"]))

    for job in jobs:
        state.pop(job["parquet"], None)
    if num_processes > 1 and len(jobs) > 1:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # no fork: workers get everything through their arguments
        with ProcessPoolExecutor(max_workers=min(num_processes, len(jobs)), mp_context=ctx) as pool:
            for job, _ in zip(jobs, pool.map(_write_shard, jobs)):
                done_one(job)
    else:
        for job in jobs:
            _write_shard(job)
            done_one(job)

    # Shards of an earlier, larger run would otherwise linger next to the new ones.
    for p in des.iterdir():
        m = _SHARD_RE.match(p.name)
        if m and int(m.group(2)) >= n_shards:
            p.unlink()
    write_json(state_path, {p: state[p] for p in new_state})
    write_text(des / "data.list", "".join(f"{des / f'parquet_{i:09d}.tar'}\n" for i in range(n_shards)))
    write_text(des / "utt2data.list", "".join(f"{des / f'utt2parquet_{i:09d}.json'}\n" for i in range(n_shards)))
    write_text(des / "spk2data.list", "".join(f"{des / f'spk2parquet_{i:09d}.json'}\n" for i in range(n_shards)))
    rejects.save()
    summary.data_list = des / "data.list"
    summary.seconds = time.perf_counter() - t0
    return summary


def read_parquet_rows(path: str | os.PathLike) -> list[dict]:
    """Read a shard back as one dict per row (lists as Python lists, bytes as bytes)."""
    import pyarrow.parquet as pq

    return pq.read_table(str(path)).to_pylist()
