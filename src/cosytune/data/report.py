"""Dataset report: minutes, counts, durations, speaking rates and rejects, as text and a PNG.

Reads a ``cosytune transcribe`` out_dir (``metadata.jsonl``, ``utterances.jsonl``,
``rejects.jsonl``) or, failing that, a bare Kaldi data dir (``wav.scp`` + ``text``; durations
are then read from the audio headers). Speaking rate is in Latin-equivalent characters per
second, as defined in :mod:`cosytune.data.transcribe`.

Writes ``dataset_report.txt``, ``dataset_report.json`` and ``dataset_report.png`` (matplotlib,
Agg backend, so no display is needed) into the directory unless told otherwise.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cosytune.data.kaldi import read_kaldi_entries
from cosytune.data.transcribe import speakable_units
from cosytune.errors import DataError
from cosytune.fileio import atomic_path, read_jsonl, write_json, write_text

logger = logging.getLogger(__name__)

DURATION_BINS_S = (0.0, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0)


@dataclass
class DatasetReport:
    """Figures of one dataset."""

    directory: Path
    minutes_total: float = 0.0
    minutes_usable: float = 0.0
    candidates: int = 0
    kept: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    speakers: dict[str, int] = field(default_factory=dict)
    durations_s: list[float] = field(default_factory=list)
    chars_per_s: list[float] = field(default_factory=list)
    rejects: Counter = field(default_factory=Counter)
    """``(stage, reason) -> count``."""
    flags: Counter = field(default_factory=Counter)
    qa: dict[str, dict] = field(default_factory=dict)
    """Per-clip QA (DNSMOS, speaker distance, flags) when it ran (see :func:`apply_qa`)."""
    qa_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "minutes_total": round(self.minutes_total, 3),
            "minutes_usable": round(self.minutes_usable, 3),
            "candidates": self.candidates,
            "kept": self.kept,
            "splits": self.splits,
            "speakers": self.speakers,
            "duration_s": _stats(self.durations_s),
            "duration_histogram": duration_histogram(self.durations_s),
            "chars_per_s": _stats(self.chars_per_s),
            "rejects": {f"{s}/{r}": n for (s, r), n in sorted(self.rejects.items())},
            "flags": dict(sorted(self.flags.items())),
            **({"qa": qa_summary(self.qa), "qa_clips": self.qa} if self.qa else {}),
            **({"qa_note": self.qa_note} if self.qa_note else {}),
        }


def _stats(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    return {
        "min": round(min(xs), 3),
        "median": round(statistics.median(xs), 3),
        "mean": round(statistics.fmean(xs), 3),
        "max": round(max(xs), 3),
    }


def duration_histogram(durations_s: list[float], bins: tuple[float, ...] = DURATION_BINS_S) -> dict[str, int]:
    """Counts per duration bin, e.g. ``{"2-5 s": 10, ..., ">=30 s": 0}``."""
    edges = list(bins) + [float("inf")]
    out = {}
    for lo, hi in itertools.pairwise(edges):
        label = f"{lo:g}-{hi:g} s" if hi != float("inf") else f">={lo:g} s"
        out[label] = sum(lo <= d < hi for d in durations_s)
    return out


def build_report(directory: str | os.PathLike) -> DatasetReport:
    """Collect the figures of a transcribe out_dir or a Kaldi data dir.

    Raises:
        DataError: when the directory holds neither ``metadata.jsonl`` nor ``wav.scp``.
    """
    directory = Path(directory)
    rep = DatasetReport(directory=directory)
    meta = directory / "metadata.jsonl"
    try:
        if meta.is_file():
            rows = read_jsonl(meta)
            utts_path = directory / "utterances.jsonl"
            candidates = read_jsonl(utts_path) if utts_path.is_file() else rows
            rep.candidates = len(candidates)
            rep.minutes_total = sum(float(r.get("duration_s") or 0) for r in candidates) / 60
            for r in rows:
                rep.splits[r.get("split", "?")] = rep.splits.get(r.get("split", "?"), 0) + 1
                rep.speakers[r.get("speaker", "?")] = rep.speakers.get(r.get("speaker", "?"), 0) + 1
                rep.durations_s.append(float(r["duration_s"]))
                rep.chars_per_s.append(speakable_units(r.get("text", "")) / max(float(r["duration_s"]), 1e-6))
                rep.flags.update(r.get("flags") or [])
        elif (directory / "prepared.jsonl").is_file():  # a prepare-audio out_dir: no text yet
            rows = read_jsonl(directory / "prepared.jsonl")
            rep.candidates = len(rows)
            rep.splits["prepared"] = len(rows)
            rep.durations_s = [float(r["duration_s"]) for r in rows]
            rep.minutes_total = sum(float(r.get("source_duration_s") or r["duration_s"])
                                    for r in {r["source_rel"]: r for r in rows}.values()) / 60
        elif (directory / "wav.scp").is_file():
            rows = _kaldi_rows(directory)
            rep.candidates = len(rows)
            rep.splits[directory.name] = len(rows)
            for r in rows:
                rep.speakers[r["speaker"]] = rep.speakers.get(r["speaker"], 0) + 1
                rep.durations_s.append(r["duration_s"])
                rep.chars_per_s.append(speakable_units(r["text"]) / max(r["duration_s"], 1e-6))
            rep.minutes_total = sum(rep.durations_s) / 60
        else:
            raise DataError(
                f"{directory} holds none of metadata.jsonl (a 'cosytune transcribe' out_dir), prepared.jsonl "
                "(a 'cosytune prepare-audio' out_dir) or wav.scp (a Kaldi data dir); pass one of those"
            )
        rejects_path = directory / "rejects.jsonl"
        if rejects_path.is_file():
            rep.rejects = Counter(
                (r.get("stage", "?"), r.get("reason", "?")) for r in read_jsonl(rejects_path)
            )
    except ValueError as e:  # malformed JSONL line
        raise DataError(str(e)) from e
    rep.kept = len(rep.durations_s)
    rep.minutes_usable = sum(rep.durations_s) / 60
    return rep


def _kaldi_rows(directory: Path) -> list[dict]:
    import soundfile as sf

    rows = []
    for e in read_kaldi_entries(directory):
        try:
            info = sf.info(e.wav)
        except Exception as err:
            raise DataError(f"cannot read {e.wav} listed in {directory / 'wav.scp'}: {err}") from err
        rows.append({"duration_s": info.frames / info.samplerate, "text": e.text, "speaker": e.speaker})
    return rows


def format_report(rep: DatasetReport) -> str:
    """The report as plain text."""
    d = rep.to_dict()
    lines = [
        f"dataset report: {rep.directory}",
        f"  minutes        {rep.minutes_usable:.2f} usable of {rep.minutes_total:.2f} total",
        f"  utterances     {rep.kept} kept of {rep.candidates} candidates"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(rep.splits.items()))})" if rep.splits else ""),
        f"  speakers       {', '.join(f'{k} ({v})' for k, v in sorted(rep.speakers.items())) or '-'}",
    ]
    if rep.durations_s:
        s = d["duration_s"]
        lines.append(
            f"  duration s     min {s['min']:.2f}  median {s['median']:.2f}  mean {s['mean']:.2f}  max {s['max']:.2f}"
        )
        lines.append("  duration histogram")
        top = max(d["duration_histogram"].values()) or 1
        for label, n in d["duration_histogram"].items():
            lines.append(f"    {label:>9}  {n:5d}  {'#' * round(30 * n / top)}")
        c = d["chars_per_s"]
        lines.append(
            f"  chars/s        min {c['min']:.1f}  median {c['median']:.1f}  mean {c['mean']:.1f}  max {c['max']:.1f}"
            "  (Latin-equivalent: a CJK character counts 3)" if rep.chars_per_s
            else "  chars/s        - (no transcripts yet: run cosytune transcribe)"
        )
    total_rej = sum(rep.rejects.values())
    lines.append(f"  rejects        {total_rej}")
    for (stage, reason), n in sorted(rep.rejects.items()):
        lines.append(f"    {stage}/{reason}: {n}")
    if rep.flags:
        lines.append("  review flags   " + ", ".join(f"{k} {v}" for k, v in sorted(rep.flags.items())))
    if rep.qa:
        q = qa_summary(rep.qa)
        lines.append(f"  DNSMOS OVRL    min {q['ovrl_min']:.2f}  median {q['ovrl_median']:.2f}  (BAK median "
                     f"{q['bak_median']:.2f})")
        lines.append(f"  speaker dist.  median {q['distance_median']:.3f}  max {q['distance_max']:.3f}"
                     "  (Resemblyzer, 1 - cosine to the speaker centroid)")
        flagged = {u: c["flags"] for u, c in sorted(rep.qa.items()) if c["flags"]}
        lines.append(f"  QA flags       {len(flagged)} clip(s)" + ("" if flagged else " (none)"))
        lines += [f"    {u}: {', '.join(f)}" for u, f in flagged.items()]
    elif rep.qa_note:
        lines.append(f"  QA             {rep.qa_note}")
    return "\n".join(lines)


def report_figure(rep: DatasetReport) -> Any:
    """A matplotlib Figure with the duration histogram, the chars/s histogram and rejects by reason."""
    # A bare Figure renders with the Agg canvas and never touches pyplot's global backend state.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(13, 4), dpi=100)
    axes = fig.subplots(1, 3)
    ax = axes[0]
    # Equal 1 s bins (the text report keeps the coarser DURATION_BINS_S table).
    ax.hist(rep.durations_s, bins=list(range(math.floor(max(rep.durations_s, default=0)) + 2)),
            color="#4C72B0", edgecolor="white")
    ax.set_title(f"durations ({rep.kept} utts, {rep.minutes_usable:.1f} min usable)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("utterances")
    ax = axes[1]
    if rep.chars_per_s:
        # Bins of 1 char/s on whole-number edges, so bars have equal widths that read as rates.
        lo, hi = math.floor(min(rep.chars_per_s)), math.floor(max(rep.chars_per_s)) + 1
        ax.hist(rep.chars_per_s, bins=list(range(lo, hi + 1)), color="#55A868", edgecolor="white")
    else:
        ax.text(0.5, 0.5, "no transcripts yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("speaking rate")
    ax.set_xlabel("Latin-equivalent chars / s")
    ax.set_ylabel("utterances")
    ax = axes[2]
    if rep.rejects:
        items = sorted(rep.rejects.items(), key=lambda kv: kv[1])
        ax.barh([f"{s}/{r}" for (s, r), _ in items], [n for _, n in items], color="#C44E52")
        ax.set_title(f"rejects ({sum(rep.rejects.values())})")
        ax.set_xlabel("files")
    else:
        ax.text(0.5, 0.5, "no rejects", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("rejects (0)")
        ax.set_xticks([])
        ax.set_yticks([])
    for a in axes[:2]:
        a.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no fractional ticks
    if rep.rejects:
        axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def plot_report(rep: DatasetReport, path: str | os.PathLike) -> Path:
    """Save :func:`report_figure` as a PNG."""
    path = Path(path)
    fig = report_figure(rep)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def write_report(
    directory: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, qa: dict[str, dict] | None = None,
    qa_note: str = "",
) -> tuple[DatasetReport, dict[str, Path]]:
    """Build the report and write ``dataset_report.{txt,json,png}``.

    Args:
        directory: a transcribe out_dir or a Kaldi data dir.
        out_dir: where to write the files (default: ``directory``).
        qa: per-clip QA to include and to flag in ``review.tsv`` (see :func:`apply_qa`).
        qa_note: why there is no QA, for the report.

    Returns:
        The report and the paths written.
    """
    rep = build_report(directory)
    rep.qa_note = qa_note
    if qa:
        apply_qa(rep, qa)
    out = Path(out_dir) if out_dir is not None else Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "txt": out / "dataset_report.txt",
        "json": out / "dataset_report.json",
        "png": out / "dataset_report.png",
    }
    write_text(paths["txt"], format_report(rep) + "\n")
    write_json(paths["json"], rep.to_dict())
    plot_report(rep, paths["png"])
    return rep, paths


# ----------------------------------------------------------------------------------------------- QA
def report_clips(directory: str | os.PathLike) -> list[tuple[str, Path, str]]:
    """``(utt, wav, speaker)`` of every kept clip of a transcribe out_dir, prepare-audio out_dir or Kaldi dir."""
    directory = Path(directory)
    if (directory / "metadata.jsonl").is_file():
        return [(r["utt"], Path(r["wav"]), str(r.get("speaker", "?"))) for r in read_jsonl(directory / "metadata.jsonl")]
    if (directory / "prepared.jsonl").is_file():
        rows = read_jsonl(directory / "prepared.jsonl")
        return [(Path(r["wav"]).stem, directory / r["wav"] if not Path(r["wav"]).is_absolute() else Path(r["wav"]),
                 "speaker") for r in rows]
    if (directory / "wav.scp").is_file():
        return [(e.utt, Path(e.wav), e.speaker) for e in read_kaldi_entries(directory)]
    raise DataError(f"{directory} holds no metadata.jsonl, prepared.jsonl or wav.scp: nothing to check")


def qa_summary(qa: dict[str, dict]) -> dict[str, Any]:
    """Medians/extremes of the per-clip QA and the flag counts."""
    ovrl = [c["dnsmos_ovrl"] for c in qa.values()]
    bak = [c["dnsmos_bak"] for c in qa.values()]
    dist = [c["speaker_distance"] for c in qa.values() if c.get("speaker_distance") is not None]
    flags = Counter(f for c in qa.values() for f in c["flags"])
    return {"clips": len(qa), "ovrl_min": min(ovrl), "ovrl_median": statistics.median(ovrl),
            "bak_median": statistics.median(bak), "distance_median": statistics.median(dist) if dist else 0.0,
            "distance_max": max(dist) if dist else 0.0, "flags": dict(sorted(flags.items()))}


def apply_qa(rep: DatasetReport, qa: dict[str, dict]) -> int:
    """Fold per-clip QA (from ``cosytune.evaluation.qa``) into the report and flag the clips in the
    directory's ``review.tsv`` (flags are information only; existing flags, edits and deletions are kept).

    Returns:
        The number of review rows that gained a flag.
    """
    from dataclasses import replace

    from cosytune.data.review import read_review, write_review

    rep.qa = qa
    review = rep.directory / "review.tsv"
    if not review.is_file():
        return 0
    rows = read_review(review)
    changed = 0
    for utt, row in rows.items():
        new = [f for f in qa.get(utt, {}).get("flags", []) if f not in row.flags]
        if new:
            rows[utt] = replace(row, flags=row.flags + tuple(new))
            changed += 1
    if changed:
        write_review(review, rows.values())
    return changed
