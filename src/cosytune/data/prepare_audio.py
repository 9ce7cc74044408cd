"""Stage ``prepare-audio``: a folder of raw recordings → 24 kHz mono PCM16 wavs + a manifest.

Pipeline per input file (one worker process per file, see :func:`prepare_audio`):
decode, mixing to mono and resampling to ``sample_rate`` with soxr chunk by chunk as it
decodes (:func:`cosytune.audio.io.load_mono`, so long recordings stay small in memory) → reject
heavy clipping (measured on the source channels during decoding) → trim both ends like sox
(:mod:`cosytune.audio.trim`) → if longer than ``max_duration_s``, slice at pauses
(:mod:`cosytune.audio.slicing`) and trim each slice → over-trim rule (clips > 1.5 s that would
end < 1.5 s stay untrimmed) → reject too-short → optional LUFS normalisation and peak ceiling
(:mod:`cosytune.audio.loudness`) → write PCM16 wav atomically.

Output contract (consumed by ``cosytune transcribe``; keep it stable)
--------------------------------------------------------------------
``out_dir/`` holds:

* ``<utt>.wav`` — 24 kHz (``sample_rate``) mono 16-bit PCM, one per kept utterance.
* ``prepared.jsonl`` — one row per output wav, sorted by ``source_rel`` then
  ``segment_index``. Fields:

  ``utt``                 safe unique stem (letters/digits/``_.-``, no whitespace); equals the
                          wav's stem. Sliced sources get ``<base>__<segment_index:03d>``.
  ``wav``                 path of the wav relative to ``out_dir`` (``<utt>.wav``).
  ``source``              absolute path of the input file.
  ``source_rel``          input path relative to ``in_dir`` (POSIX separators).
  ``duration_s``          duration of the output wav in seconds.
  ``num_samples``         its length in samples.
  ``sample_rate``         its sample rate (Hz).
  ``segment_index``       0-based index of this slice within the source.
  ``num_segments``        number of slices the source was cut into (> 1 means sliced; slices
                          later rejected still count, so indices can have gaps).
  ``source_start_s``      where the output starts in the source (seconds), after trimming.
  ``source_end_s``        where it ends in the source.
  ``forced_cut``          the slice ends at the quietest point rather than at a pause.
  ``trim``                ``{"applied", "removed_start_s", "removed_end_s"}``: what trimming
                          removed from this clip (or slice).
  ``untrimmed_overtrim``  the over-trim rule kept the clip untrimmed.
  ``loudness``            ``{"lufs_in", "lufs_out", "gain_db", "peak_db_in", "peak_db_out",
                          "ceiling_applied"}`` (LUFS values null unless measured).
  ``source_sample_rate``, ``source_channels``, ``source_duration_s``, ``clipped_fraction``.

* ``rejects.jsonl`` — via :class:`~cosytune.data.rejects.RejectLog`, stage ``prepare-audio``;
  ``input`` is the absolute source path; ``reason`` one of :data:`REJECT_REASONS`; ``detail``
  says what was found (and, for slices, which slice). Every input file appears in
  ``prepared.jsonl`` or in ``rejects.jsonl`` (or both, when only some slices were dropped),
  except text side files (``.txt``, ``.lab``, ...), which are skipped and counted.
* ``prepare_audio.yaml`` — the resolved config of the last run.
* ``.prepare_audio.state.jsonl`` — resume journal: per source, its size, mtime, the settings
  hash and its outputs (with each output's size and mtime, so a truncated or replaced output is made
  again rather than trusted). A re-run skips sources whose size, mtime and settings are unchanged
  and whose wavs still exist; outputs of sources that vanished or changed are removed.

Writes are atomic (temp file + rename); an interrupted run leaves no partial wav, and
re-running continues where it stopped (finished files are in the journal).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import re
import time
import unicodedata
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np

from cosytune.audio.io import MonoAudio
from cosytune.config.loading import config_to_dict, dump_config
from cosytune.console import progress as progress_bar
from cosytune.errors import DataError
from cosytune.fileio import file_identity, sha256_json, write_jsonl

logger = logging.getLogger(__name__)

STAGE = "prepare-audio"
MANIFEST_NAME = "prepared.jsonl"
REJECTS_NAME = "rejects.jsonl"
STATE_NAME = ".prepare_audio.state.jsonl"
CONFIG_NAME = "prepare_audio.yaml"
#: Bump when the processing changes in a way that makes old outputs stale.
ALGORITHM_VERSION = 1

#: Reject reasons this stage records.
REJECT_REASONS = (
    "zero_length",  # empty file, or it decodes to no samples
    "not_audio",  # no audio stream / not a media file
    "unreadable",  # audio extension but corrupt or undecodable
    "heavy_clipping",  # too many samples at full scale
    "all_silence",  # nothing above the trim threshold
    "too_short",  # shorter than min_duration_s after trimming
    "too_long",  # longer than max_duration_s with slicing disabled
    "processing_error",  # an unexpected failure while processing this file (bug report welcome)
    "worker_crashed",  # the worker process died (e.g. a decoder crash); re-run to retry
)


@dataclass(frozen=True)
class PrepareAudioConfig:
    """Settings of ``prepare-audio``; every field except ``num_workers`` affects the output."""

    sample_rate: int = 24000
    """Output sample rate in Hz (CosyVoice 3 works at 24 kHz)."""
    resample_quality: Literal["QQ", "LQ", "MQ", "HQ", "VHQ"] = "HQ"
    """soxr quality preset for resampling."""
    trim: bool = True
    """Trim silence at both ends (sox ``silence 1 D T reverse silence 1 D T reverse``)."""
    trim_threshold_db: float = -35.0
    """Silence threshold in dBFS (sox ``-35d``)."""
    trim_start_duration_s: float = 0.15
    """Sound needed before the start trim stops (sox ``0.15``)."""
    trim_end_duration_s: float = 0.15
    """The same at the end."""
    overtrim_min_s: float = 1.5
    """A clip longer than this that trimming would make shorter stays untrimmed (seed rule)."""
    min_duration_s: float = 0.5
    """Clips shorter than this after trimming are rejected (``too_short``)."""
    max_duration_s: float = 30.0
    """Longer recordings are sliced at pauses (or rejected when ``slice_long`` is off)."""
    slice_long: bool = True
    """Slice recordings longer than ``max_duration_s`` instead of rejecting them."""
    slice_min_s: float = 3.0
    """Slices shorter than this are joined with a neighbour when possible."""
    slice_target_s: float = 15.0
    """Pieces between pauses are joined while a slice stays within this length."""
    slice_threshold_db: float = -35.0
    """Silence level for pause detection in dBFS."""
    slice_min_pause_s: float = 0.3
    """Shortest pause to cut at."""
    loudness_target_lufs: float | None = None
    """Normalise each clip to this integrated loudness (e.g. -20); null = keep levels."""
    peak_ceiling_db: float | None = -1.0
    """Scale a clip down if its sample peak exceeds this (dBFS); null = no ceiling."""
    measure_loudness: bool = False
    """Measure LUFS of every clip even without a target (slower), for the manifest."""
    clip_level: float = 0.95
    """Amplitude (full scale 1.0) at which a decoded sample counts as clipped. Below 1.0 because
    lossy codecs turn flat clipped tops into ripples under full scale (AAC especially); clean
    speech normalised to full scale has < 0.1 % of samples above 0.95, clipped speech several %."""
    max_clipped_fraction: float = 0.01
    """Reject a file when more than this fraction of its samples is clipped."""
    num_workers: int = 0
    """Worker processes; 0 = all cores. Does not affect the output."""

    def __post_init__(self) -> None:
        problems = []
        if self.sample_rate < 8000:
            problems.append(f"sample_rate must be >= 8000 Hz, got {self.sample_rate}")
        if self.trim_threshold_db >= 0 or self.slice_threshold_db >= 0:
            problems.append(
                "trim_threshold_db and slice_threshold_db must be negative dBFS values (e.g. -35)"
            )
        if self.trim_start_duration_s < 0 or self.trim_end_duration_s < 0:
            problems.append("trim_start_duration_s and trim_end_duration_s must be >= 0")
        if not 0 <= self.min_duration_s < self.max_duration_s:
            problems.append(
                "need 0 <= min_duration_s < max_duration_s, got "
                f"{self.min_duration_s} and {self.max_duration_s}"
            )
        if not 0 < self.slice_min_s <= self.slice_target_s <= self.max_duration_s:
            problems.append(
                "need 0 < slice_min_s <= slice_target_s <= max_duration_s, got "
                f"{self.slice_min_s}, {self.slice_target_s}, {self.max_duration_s}"
            )
        if self.slice_min_pause_s <= 0:
            problems.append(f"slice_min_pause_s must be > 0, got {self.slice_min_pause_s}")
        if self.peak_ceiling_db is not None and self.peak_ceiling_db > 0:
            problems.append(f"peak_ceiling_db must be <= 0 dBFS, got {self.peak_ceiling_db}")
        if self.loudness_target_lufs is not None and not -70 <= self.loudness_target_lufs <= 0:
            problems.append(
                f"loudness_target_lufs must be between -70 and 0, got {self.loudness_target_lufs}"
            )
        if not 0 < self.clip_level <= 1.0:
            problems.append(f"clip_level must be in (0, 1], got {self.clip_level}")
        if not 0 <= self.max_clipped_fraction <= 1:
            problems.append(f"max_clipped_fraction must be in [0, 1], got {self.max_clipped_fraction}")
        if self.num_workers < 0:
            problems.append(f"num_workers must be >= 0 (0 = all cores), got {self.num_workers}")
        if problems:
            raise ValueError("; ".join(problems))

    def settings_hash(self) -> str:
        """Hash of everything that affects the output (not ``num_workers``)."""
        d = config_to_dict(self)
        d.pop("num_workers")
        d["algorithm_version"] = ALGORITHM_VERSION
        return sha256_json(d)[:16]


@dataclass
class PrepareSummary:
    """What a :func:`prepare_audio` run did."""

    in_dir: str
    out_dir: str
    num_inputs: int = 0
    num_processed: int = 0
    num_reused: int = 0
    num_sidecars_skipped: int = 0
    num_outputs: int = 0
    num_sliced_sources: int = 0
    num_untrimmed_overtrim: int = 0
    input_duration_s: float = 0.0
    processed_input_duration_s: float = 0.0
    output_duration_s: float = 0.0
    reject_counts: dict[str, int] = field(default_factory=dict)
    num_sources_without_output: int = 0
    elapsed_s: float = 0.0
    num_workers: int = 1

    def items(self) -> list[tuple[str, object]]:
        """Key/value lines for the CLI's closing summary."""
        rej = ", ".join(f"{k} {v}" for k, v in sorted(self.reject_counts.items())) or "none"
        speed = self.processed_input_duration_s / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return [
            (
                "input files",
                (
                    f"{self.num_inputs} ({self.num_processed} processed, {self.num_reused} unchanged "
                    f"and skipped, {self.num_sidecars_skipped} text side files ignored)"
                ),
            ),
            ("input audio", f"{self.input_duration_s / 60:.1f} min"),
            (
                "output wavs",
                (
                    f"{self.num_outputs} ({self.output_duration_s / 60:.1f} min), "
                    f"{self.num_sliced_sources} long source(s) sliced"
                ),
            ),
            (
                "kept untrimmed",
                f"{self.num_untrimmed_overtrim} (over-trim rule: trimming would leave too little)",
            ),
            ("rejects", rej),
            ("inputs with no output", self.num_sources_without_output),
            (
                "time",
                f"{self.elapsed_s:.1f} s on {self.num_workers} worker(s), {speed:.0f}x real time"
                if self.num_processed
                else f"{self.elapsed_s:.1f} s (nothing changed, nothing to do)",
            ),
            ("manifest", str(Path(self.out_dir) / MANIFEST_NAME)),
        ]


# ----------------------------------------------------------------------------------------- names


def safe_stem(source_rel: str) -> str:
    """A file-name-safe stem for an input path relative to ``in_dir``.

    Folder names and the file stem are joined with ``-``; anything other than Unicode letters,
    digits, ``_``, ``.`` and ``-`` becomes ``_`` (runs collapsed, so ``__`` never occurs and stays
    free for slice suffixes). Unicode is kept (NFC), length is capped at 80 characters.
    """
    p = PurePosixPath(source_rel)
    text = "-".join([*p.parent.parts, p.stem]) if str(p.parent) != "." else p.stem
    text = unicodedata.normalize("NFC", text)
    text = re.sub(r"[^\w.\-]+", "_", text)
    text = re.sub(r"_+", "_", text).strip("._-")
    return text[:80] or "audio"


def assign_names(source_rels: list[str]) -> dict[str, str]:
    """Map each relative input path to a unique safe stem.

    Stems that would collide (case-insensitively, for case-insensitive file systems) all get
    a short hash of their own relative path appended, so names do not depend on input order.
    """
    base = {rel: safe_stem(rel) for rel in source_rels}
    groups: dict[str, list[str]] = {}
    for rel, stem in base.items():
        groups.setdefault(stem.casefold(), []).append(rel)
    out = {}
    for rels in groups.values():
        for rel in rels:
            stem = base[rel]
            if len(rels) > 1:
                stem = f"{stem}-{hashlib.sha1(rel.encode('utf-8')).hexdigest()[:8]}"
            out[rel] = stem
    return out


# ------------------------------------------------------------------------------ per-file worker


@dataclass(frozen=True)
class _Task:
    source: str
    source_rel: str
    base: str
    out_dir: str
    cfg: PrepareAudioConfig


@dataclass
class _Result:
    source: str
    source_rel: str
    rows: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    source_duration_s: float = 0.0

    def reject(self, reason: str, detail: str) -> None:
        """Record that the source (or one of its slices) gave no output, and why."""
        self.rejects.append({"input": self.source, "reason": reason, "detail": detail})


def _r(x: float) -> float:
    # Microseconds: enough to recover exact sample positions at any audio rate.
    return round(float(x), 6)


def _process(task: _Task) -> _Result:
    """Process one input file; decode/processing failures become rejects, write failures raise."""
    from cosytune.audio.io import AudioDecodeError, load_mono

    res = _Result(task.source, task.source_rel)
    try:
        decoded = load_mono(task.source, task.cfg.clip_level, task.cfg.sample_rate, task.cfg.resample_quality)
    except AudioDecodeError as e:
        res.reject(e.reason, e.detail)
        return res
    except Exception as e:  # boundary: record, never crash the run
        logger.debug("decoding %s failed", task.source, exc_info=True)
        res.reject("unreadable", f"{type(e).__name__}: {e}")
        return res
    try:
        _process_decoded(task, decoded, res)
    except OSError:
        raise
    except Exception as e:  # boundary: record, never crash the run
        logger.debug("processing %s failed", task.source, exc_info=True)
        for row in res.rows:  # slices written before the failure would be orphans
            with contextlib.suppress(OSError):
                (Path(task.out_dir) / row["wav"]).unlink()
        res.rows.clear()
        res.reject("processing_error", f"{type(e).__name__}: {e}")
    return res


def _process_decoded(task: _Task, decoded: MonoAudio, res: _Result) -> None:
    from cosytune.audio.io import write_wav_pcm16
    from cosytune.audio.loudness import apply_gain_and_ceiling, peak_dbfs
    from cosytune.audio.slicing import Segment, slice_at_pauses
    from cosytune.audio.trim import TrimResult, trim_silence, trim_with_overtrim_rule

    cfg = task.cfg
    sr = cfg.sample_rate
    source_rate, channels, clipped = decoded.source_sample_rate, decoded.channels, decoded.clipped_fraction
    res.source_duration_s = decoded.source_duration_s
    if clipped > cfg.max_clipped_fraction:
        res.reject("heavy_clipping", f"{clipped:.2%} of samples at or above {cfg.clip_level} of full scale "
                   f"(limit {cfg.max_clipped_fraction:.2%}, setting max_clipped_fraction)")
        return
    # Already mono at the output rate: load_mono downmixes and resamples while decoding.
    assert decoded.sample_rate == sr
    mono = decoded.samples
    del decoded
    n = len(mono)

    def trim(x: np.ndarray) -> TrimResult:
        if not cfg.trim:
            # Keep everything, but still find out whether there is any sound at all.
            probe = trim_silence(
                x, sr, cfg.trim_threshold_db, cfg.trim_start_duration_s, cfg.trim_end_duration_s
            )
            return TrimResult(0, len(x), len(x), sox_start=probe.sox_start, sox_end=probe.sox_end)
        return trim_with_overtrim_rule(
            x,
            sr,
            cfg.trim_threshold_db,
            cfg.trim_start_duration_s,
            cfg.trim_end_duration_s,
            cfg.overtrim_min_s,
        )

    if n < cfg.min_duration_s * sr:  # judged before silence: a brief loud click is short, not "very quiet"
        res.reject("too_short", f"the whole clip is {n / sr:.3f} s < min_duration_s {cfg.min_duration_s}")
        return
    whole = trim(mono)
    if not whole.found_sound:
        quiet = (f"(sample peak {peak_dbfs(mono):.1f} dBFS; if it does hold speech, it is very quiet: "
                 "lower trim_threshold_db)" if np.any(mono) else "(digital silence: every sample is 0)")
        res.reject("all_silence", f"{n / sr:.2f} s with no 20 ms RMS above {cfg.trim_threshold_db} dBFS for "
                   f"{cfg.trim_start_duration_s} s {quiet}")
        return
    kept_len = whole.end - whole.start
    max_len = int(cfg.max_duration_s * sr)
    if kept_len > max_len and not cfg.slice_long:
        res.reject("too_long", f"{kept_len / sr:.1f} s after trimming > max_duration_s {cfg.max_duration_s}; "
                   "set slice_long=true to slice it")
        return
    if kept_len > max_len:
        region = mono[whole.start : whole.end]
        segments = [
            Segment(s.start + whole.start, s.end + whole.start, s.forced)
            for s in slice_at_pauses(
                region,
                sr,
                cfg.max_duration_s,
                cfg.slice_min_s,
                cfg.slice_target_s,
                cfg.slice_threshold_db,
                cfg.slice_min_pause_s,
            )
        ]
    else:
        segments = [Segment(0, n)]
    num_segments = len(segments)
    for k, seg in enumerate(segments):
        x = mono[seg.start : seg.end]
        tr = whole if num_segments == 1 else trim(x)
        where = (
            f"slice {k} of {num_segments} ({seg.start / sr:.2f}-{seg.end / sr:.2f} s): "
            if num_segments > 1
            else ""
        )
        if not tr.found_sound:
            res.reject("all_silence", f"{where}no sound above {cfg.trim_threshold_db} dBFS")
            continue
        y = x[tr.start : tr.end]
        if len(y) < cfg.min_duration_s * sr:
            res.reject("too_short", f"{where}{len(y) / sr:.3f} s after trimming (from {len(x) / sr:.3f} s) "
                       f"< min_duration_s {cfg.min_duration_s}")
            continue
        y, gain = apply_gain_and_ceiling(
            y, sr, cfg.loudness_target_lufs, cfg.peak_ceiling_db, cfg.measure_loudness
        )
        utt = task.base if num_segments == 1 else f"{task.base}__{k:03d}"
        wav_name = f"{utt}.wav"
        write_wav_pcm16(Path(task.out_dir) / wav_name, y, sr)
        res.rows.append(
            {
                "utt": utt,
                "wav": wav_name,
                "source": task.source,
                "source_rel": task.source_rel,
                "duration_s": _r(len(y) / sr),
                "num_samples": len(y),
                "sample_rate": sr,
                "segment_index": k,
                "num_segments": num_segments,
                "source_start_s": _r((seg.start + tr.start) / sr),
                "source_end_s": _r((seg.start + tr.end) / sr),
                "forced_cut": bool(seg.forced),
                "trim": {
                    "applied": cfg.trim and not tr.untrimmed_overtrim,
                    "removed_start_s": _r(tr.start / sr),
                    "removed_end_s": _r((len(x) - tr.end) / sr),
                },
                "untrimmed_overtrim": bool(tr.untrimmed_overtrim),
                "loudness": gain.to_dict(),
                "source_sample_rate": int(source_rate),
                "source_channels": int(channels),
                "source_duration_s": _r(res.source_duration_s),
                "clipped_fraction": round(clipped, 6),
            }
        )


# ----------------------------------------------------------------------------------- the stage


def _scan(in_dir: Path, out_dir: Path) -> tuple[list[Path], int]:
    """Input files (sorted, recursive), skipping hidden entries, ``out_dir`` and text side files."""
    from cosytune.audio.io import SIDECAR_EXTENSIONS

    files: list[Path] = []
    sidecars = 0
    out_resolved = out_dir.resolve()
    for root, dirs, names in os.walk(in_dir):
        root_path = Path(root)
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and (root_path / d).resolve() != out_resolved
        )
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = root_path / name
            if not path.is_file():
                continue
            if path.suffix.lower() in SIDECAR_EXTENSIONS:
                sidecars += 1
                continue
            files.append(path)
    return files, sidecars


def _read_state(path: Path) -> dict[str, dict]:
    """Last journal entry per source; a torn last line (interrupted write) is ignored."""
    state: dict[str, dict] = {}
    if not path.exists():
        return state
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            try:
                entry = json.loads(line)
                state[entry["source_rel"]] = entry
            except (json.JSONDecodeError, KeyError, TypeError):
                logger.warning(
                    "%s:%d: ignoring an unreadable resume-journal line (interrupted write?)", path, i
                )
    return state


def _fingerprint(path: Path) -> dict:
    return dict(zip(("size", "mtime_ns"), file_identity(path) or ()))


def _outputs_intact(out_dir: Path, entry: dict) -> bool:
    """Every wav of a journal entry is still the file written then (same size and mtime): a truncated,
    replaced or deleted output is made again instead of being trusted."""
    written = entry.get("outputs")
    if written is None:  # journals of older versions did not record them
        return False
    for r in entry.get("rows", []):
        p = out_dir / r["wav"]
        if not p.is_file() or file_identity(p) != written.get(r["wav"]):
            return False
    return True


def _remove_temp_files(out_dir: Path) -> None:
    # atomic_path names temporaries ".<stem>.<random>.tmp.wav"; a killed run can leave them.
    for tmp in out_dir.glob(".*.tmp.wav"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def _mp_context() -> multiprocessing.context.BaseContext:
    # fork starts workers in milliseconds (spawn re-imports numpy/soxr/av per worker, which
    # dominates short jobs); workers receive every input as an argument, so any method is
    # correct. Forking a process that runs other Python threads can deadlock, so then the
    # (slower) forkserver is used.
    import threading

    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def prepare_audio(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: PrepareAudioConfig | None = None,
    progress: bool = False,
) -> PrepareSummary:
    """Convert, trim, slice and normalise every recording under ``in_dir`` into ``out_dir``.

    See the module docstring for the output contract. Re-running continues an interrupted run
    and skips inputs whose size, mtime and settings are unchanged.

    Args:
        in_dir: folder of recordings, searched recursively (hidden entries skipped).
        out_dir: destination folder (created); may not be ``in_dir`` itself.
        cfg: settings; defaults to :class:`PrepareAudioConfig` ().
        progress: show a progress bar on stderr.

    Returns:
        A :class:`PrepareSummary`. It is not an error if every input was rejected; callers
        decide (the CLI exits 1 when ``num_outputs == 0``).

    Raises:
        DataError: ``in_dir`` is missing or not a folder, is the same as ``out_dir``, holds
            no candidate files, or an output cannot be written.
    """
    from cosytune.data.rejects import RejectLog

    t0 = time.perf_counter()
    cfg = cfg or PrepareAudioConfig()
    in_dir = Path(in_dir).expanduser()
    out_dir = Path(out_dir).expanduser()
    if not in_dir.is_dir():
        what = "does not exist" if not in_dir.exists() else "is not a folder"
        raise DataError(
            f"input folder {in_dir} {what}; pass --in_dir with the folder holding your recordings"
        )
    in_abs = in_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    out_abs = out_dir.resolve()
    if in_abs == out_abs:
        raise DataError(
            f"--out_dir must differ from --in_dir (both are {in_abs}); choose a new output folder"
        )
    files, sidecars = _scan(in_abs, out_abs)
    if not files:
        raise DataError(
            f"no input files found under {in_abs} (searched recursively; hidden files and "
            f"{sidecars} text side file(s) ignored); point --in_dir at your recordings"
        )

    rels = [p.relative_to(in_abs).as_posix() for p in files]
    names = assign_names(rels)
    settings = cfg.settings_hash()
    state_path = out_abs / STATE_NAME
    old_state = _read_state(state_path)
    _remove_temp_files(out_abs)

    entries: dict[str, dict] = {}
    tasks: list[_Task] = []
    for path, rel in zip(files, rels):
        fp = _fingerprint(path)
        old = old_state.get(rel)
        if (
            old
            and old.get("settings") == settings
            and old.get("size") == fp["size"]
            and old.get("mtime_ns") == fp["mtime_ns"]
            and old.get("base") == names[rel]
            and _outputs_intact(out_abs, old)
        ):
            entries[rel] = old
        else:
            tasks.append(_Task(str(path), rel, names[rel], str(out_abs), cfg))
    num_reused = len(entries)

    workers = cfg.num_workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(tasks)))
    summary = PrepareSummary(
        in_dir=str(in_abs),
        out_dir=str(out_abs),
        num_inputs=len(files),
        num_processed=len(tasks),
        num_reused=num_reused,
        num_sidecars_skipped=sidecars,
        num_workers=workers,
    )
    fingerprints = {t.source_rel: _fingerprint(Path(t.source)) for t in tasks}
    logger.info(
        "prepare-audio %s -> %s: %d input files, %d to process (%d unchanged), %d worker(s); "
        "%d Hz mono PCM16, trim %s, slices <= %g s, loudness %s",
        in_abs,
        out_abs,
        len(files),
        len(tasks),
        num_reused,
        workers,
        cfg.sample_rate,
        f"{cfg.trim_threshold_db:g} dBFS" if cfg.trim else "off",
        cfg.max_duration_s,
        f"{cfg.loudness_target_lufs:g} LUFS" if cfg.loudness_target_lufs is not None else "unchanged",
    )

    # The journal is appended to as files finish (the old entries stay until the final
    # compaction, so an interrupted run still knows which old outputs to clean up).
    def record(result: _Result, journal) -> None:
        entry = {
            "source_rel": result.source_rel,
            "settings": settings,
            "base": names[result.source_rel],
            **fingerprints[result.source_rel],
            "source_duration_s": result.source_duration_s,
            "rows": result.rows,
            "rejects": result.rejects,
            "outputs": {r["wav"]: file_identity(out_abs / r["wav"]) for r in result.rows},
        }
        entries[result.source_rel] = entry
        journal.write(json.dumps(entry, ensure_ascii=False) + "\n")
        journal.flush()

    with open(state_path, "a", encoding="utf-8") as journal, \
            progress_bar(total=len(tasks), desc="prepare-audio", enabled=progress) as bar:
        if workers == 1:
            for task in tasks:
                record(_run_task(task), journal)
                bar.update(1)
        else:
            _run_pool(tasks, workers, record, journal, bar)

    # Outputs of sources that vanished, changed or were re-sliced into fewer pieces.
    keep_wavs = {r["wav"] for e in entries.values() for r in e["rows"]}
    for old in old_state.values():
        for r in old.get("rows", []):
            if r["wav"] not in keep_wavs:
                with contextlib.suppress(OSError):
                    (out_abs / r["wav"]).unlink()

    rows = [
        r for rel in sorted(entries) for r in sorted(entries[rel]["rows"], key=lambda r: r["segment_index"])
    ]
    rejects = RejectLog(out_abs / REJECTS_NAME, STAGE)
    for rel in sorted(entries):
        for rj in entries[rel]["rejects"]:
            rejects.add(rj["input"], rj["reason"], rj.get("detail", ""))
    try:
        write_jsonl(out_abs / MANIFEST_NAME, rows)
        rejects.save()
        dump_config(cfg, out_abs / CONFIG_NAME)
        # Final compact journal, atomically.
        write_jsonl(state_path, [entries[rel] for rel in sorted(entries)])
    except OSError as e:
        raise DataError(
            f"cannot write the outputs in {out_abs}: {e}; check free space and permissions"
        ) from e

    summary.num_outputs = len(rows)
    summary.output_duration_s = sum(r["duration_s"] for r in rows)
    summary.input_duration_s = sum(e.get("source_duration_s", 0.0) for e in entries.values())
    summary.processed_input_duration_s = sum(
        entries[t.source_rel].get("source_duration_s", 0.0) for t in tasks if t.source_rel in entries
    )
    summary.num_sliced_sources = sum(
        1 for e in entries.values() if any(r["num_segments"] > 1 for r in e["rows"])
    )
    summary.num_untrimmed_overtrim = sum(1 for r in rows if r["untrimmed_overtrim"])
    summary.reject_counts = dict(rejects.counts())
    summary.num_sources_without_output = sum(1 for e in entries.values() if not e["rows"])
    summary.elapsed_s = time.perf_counter() - t0
    logger.debug("prepare-audio finished: %s", summary)
    return summary


def _run_task(task: _Task) -> _Result:
    try:
        return _process(task)
    except OSError as e:
        raise DataError(
            f"cannot write the output of {task.source_rel} to {task.out_dir}: {e}; "
            "check free space and permissions, then re-run to continue"
        ) from e


def _run_pool(tasks: list[_Task], workers: int, record, journal, bar) -> None:
    with ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context()) as pool:
        futures = {pool.submit(_run_task, t): t for t in tasks}
        broken: list[_Task] = []
        for fut in as_completed(futures):
            task = futures[fut]
            try:
                record(fut.result(), journal)
            except BrokenProcessPool as e:
                broken.append(task)
                logger.debug("worker pool broke while processing %s: %s", task.source, e)
            bar.update(1)
    # A worker that dies (decoder segfault, out of memory) breaks the whole pool and we cannot
    # tell which file did it; retry the unfinished ones one by one in fresh single-use pools.
    for task in broken:
        try:
            with ProcessPoolExecutor(max_workers=1, mp_context=_mp_context()) as pool:
                result = pool.submit(_run_task, task).result()
        except BrokenProcessPool:
            result = _Result(task.source, task.source_rel)
            result.reject("worker_crashed", "the worker process died while processing this file (decoder crash or "
                          "out of memory)")
        record(result, journal)
