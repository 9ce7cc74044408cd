"""Building the dataset: ``transcribe_dataset`` (inputs → text → filters → split → files) and
``apply_review`` (the same files again from an edited ``review.tsv``, without ASR). The outputs are listed
in :mod:`cosytune.data.transcribe`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from cosytune.config.loading import config_to_dict, dump_config, load_config
from cosytune.data.kaldi import (
    KALDI_FILES,
    KaldiEntry,
    kaldi_sort_key,
    upstream_warnings,
    validate_kaldi_dir,
    write_kaldi_dir,
)
from cosytune.data.rejects import RejectLog
from cosytune.data.review import ReviewRow, read_review, write_review
from cosytune.data.transcribe.asr import build_asr_backend, run_asr
from cosytune.data.transcribe.config import TranscribeConfig
from cosytune.data.transcribe.discovery import discover_inputs
from cosytune.data.transcribe.metrics import (
    char_error_rate,
    guess_language,
    normalize_transcript,
    speakable_units,
)
from cosytune.data.transcribe.records import TranscribeSummary, Utterance
from cosytune.data.transcribe.split import check_utterance, review_flags, split_train_dev
from cosytune.data.transcribe.transcripts import TranscriptTable, load_transcripts, read_sidecar
from cosytune.errors import CosytuneError, DataError
from cosytune.fileio import read_jsonl, sha256_file, sha256_json, write_json, write_jsonl

logger = logging.getLogger(__name__)

STAGE = "transcribe"


def merge_review(
    utts: list[Utterance], review: dict[str, ReviewRow]
) -> tuple[list[Utterance], set[str], int]:
    """Apply review edits: a text that differs from the backend's text, or a delete mark.

    Returns:
        ``(utterances with edited texts, ids marked deleted, number of edits)``.
    """
    out, deleted, edits = [], set(), 0
    for u in utts:
        row = review.get(u.utt)
        if row is None:
            out.append(u)
            continue
        if row.delete:
            deleted.add(u.utt)
            edits += 1
        if row.text != u.orig_text:
            if row.text != u.text:
                edits += 1
            u = replace(u, text=row.text, edited=True)
        out.append(u)
    unknown = sorted(set(review) - {u.utt for u in utts})
    if unknown:
        logger.warning(
            "review file lists %d utterance(s) that are not in the dataset (ignored), e.g. %s",
            len(unknown),
            unknown[:3],
        )
    return out, deleted, edits


def finalize_dataset(
    out_dir: Path, utts: list[Utterance], cfg: TranscribeConfig, rejects: RejectLog, deleted: set[str]
) -> TranscribeSummary:
    """Filter, split and write every output file (shared by transcribe and apply-review)."""
    dump_config(cfg, out_dir / "transcribe_config.yaml")
    checked: list[Utterance] = []
    for u in utts:
        cps = speakable_units(u.text) / max(u.duration_s, 1e-6) if u.text else None
        u = replace(u, chars_per_s=None if cps is None else round(cps, 3))
        problem = ("deleted_in_review", "marked for deletion in review.tsv") if u.utt in deleted else None
        problem = problem or check_utterance(u, cfg)
        if problem:
            rejects.add(u.wav, problem[0], f"{u.utt}: {problem[1]}")
            u = replace(u, status="rejected", reject_reason=problem[0])
        checked.append(replace(u, flags=review_flags(u, cfg.max_disagreement)))
    kept = [u for u in checked if u.status != "rejected"]
    try:
        if not kept:
            raise DataError(
                f"no usable utterances remain ({len(checked)} candidate(s), reasons: "
                f"{dict(rejects.counts())}); see {rejects.path} and {out_dir / 'review.tsv'}. Type transcripts "
                "into review.tsv and run 'cosytune apply-review'"
                + (
                    ", pass --transcripts FILE or --asr_fallback faster-whisper"
                    if cfg.backend == "transcripts"
                    else ""
                )
                + ", or adjust the filter bounds (min_sec, max_sec, min_cps, max_cps)"
            )
        train, dev = split_train_dev(kept, cfg.dev_size, cfg.seed)
    except DataError:  # the review file and rejects still tell the user what happened to every clip
        rejects.save()
        _write_review_and_utts(out_dir, checked)
        _clear_stale_outputs(out_dir)
        raise
    final = [
        replace(u, status="train" if u.utt in train else "dev") if u.status != "rejected" else u
        for u in checked
    ]
    for name, ids in (("train", train), ("dev", dev)):
        entries = [KaldiEntry(u.utt, u.wav, u.text, u.speaker, cfg.instruct) for u in final if u.utt in ids]
        write_kaldi_dir(out_dir / name, entries)
        problems = validate_kaldi_dir(out_dir / name)
        if problems:  # our own writer produced it, so this is a bug, not bad input
            raise CosytuneError(f"internal error: {out_dir / name} failed validation: {problems}")
        for w in upstream_warnings(out_dir / name):
            logger.warning(w)
    meta = []
    for u in final:
        if u.status == "rejected":
            continue
        d = {
            k: v
            for k, v in u.to_dict().items()
            if k not in ("status", "reject_reason", "text_error", "orig_text")
        }
        d["split"] = u.status
        d["instruct"] = cfg.instruct
        meta.append(d)
    write_jsonl(out_dir / "metadata.jsonl", meta)
    _write_review_and_utts(out_dir, final)
    rejects.save()
    summary = TranscribeSummary(
        out_dir=out_dir,
        candidates=len(final),
        kept=len(kept),
        train=len(train),
        dev=len(dev),
        minutes_total=sum(u.duration_s for u in final) / 60,
        minutes_usable=sum(u.duration_s for u in kept) / 60,
        rejects=rejects.counts(),
    )
    return summary


def _clear_stale_outputs(out_dir: Path) -> None:
    """Remove train/dev/metadata of an earlier run so nothing downstream trains on outdated lists."""
    stale = [out_dir / "metadata.jsonl"] + [out_dir / d / f for d in ("train", "dev") for f in KALDI_FILES]
    removed = [p for p in stale if p.is_file()]
    for p in removed:
        p.unlink()
    if removed:
        logger.warning("removed the previous run's metadata.jsonl and train/dev lists: they no longer match")


def _write_review_and_utts(out_dir: Path, utts: list[Utterance]) -> None:
    write_jsonl(out_dir / "utterances.jsonl", [u.to_dict() for u in utts])
    write_review(
        out_dir / "review.tsv",
        [
            ReviewRow(
                u.utt,
                u.duration_s,
                u.status if u.status != "rejected" else f"rejected:{u.reject_reason}",
                u.flags,
                u.reject_reason == "deleted_in_review",
                u.text,
                u.check_text,
            )
            for u in utts
        ],
    )


def _carry_rejects(in_dir: Path, out_dir: Path) -> None:
    """Copy earlier stages' rejects (prepare-audio) into out_dir so its rejects.jsonl is complete."""
    src, dst = in_dir / "rejects.jsonl", out_dir / "rejects.jsonl"
    if not src.is_file() or src.resolve() == dst.resolve():
        return
    try:
        earlier = [r for r in read_jsonl(src) if r.get("stage") != STAGE]
        stages = {r.get("stage") for r in earlier}
        ours = [r for r in read_jsonl(dst) if r.get("stage") not in stages] if dst.is_file() else []
    except ValueError as e:
        raise DataError(str(e)) from e
    write_jsonl(dst, earlier + ours)


def _load_previous(out_dir: Path) -> dict[str, Utterance]:
    path = out_dir / "utterances.jsonl"
    if not path.is_file():
        return {}
    try:
        return {u.utt: u for u in map(Utterance.from_dict, read_jsonl(path))}
    except (ValueError, TypeError) as e:
        logger.warning("ignoring unreadable %s (%s)", path, e)
        return {}


def transcribe_dataset(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: TranscribeConfig,
    progress: bool = False,
    backend_factory: Callable[[str, TranscribeConfig], Any] = build_asr_backend,
) -> TranscribeSummary:
    """Transcribe prepared clips and build ``metadata.jsonl``, ``train/``, ``dev/`` and ``review.tsv``.

    Re-running continues work: ASR results come from the cache, and edits already made in
    ``review.tsv`` are kept.

    Args:
        in_dir: prepare-audio's out_dir or a plain folder of audio files.
        out_dir: where the dataset files are written (may equal ``in_dir``).
        cfg: settings.
        progress: show a progress bar on stderr.
        backend_factory: builds the ASR backend by name (the default imports it lazily).

    Returns:
        Counts, minutes and rejects by reason.

    Raises:
        DataError: no usable utterance, too few to split, unreadable transcripts file.
        MissingDependencyError: the ASR backend's package is not installed.
    """
    in_dir, out_dir = Path(in_dir).resolve(), Path(out_dir).resolve()
    logger.info(
        "transcribe %s -> %s: backend %s%s, speaker %s, language %s, dev_size %g, seed %d",
        in_dir,
        out_dir,
        cfg.backend,
        f" (model {cfg.whisper_model}, device {cfg.device}, {cfg.compute_type})" if cfg.asr_backend() else "",
        cfg.speaker,
        cfg.language or "auto",
        cfg.dev_size,
        cfg.seed,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _carry_rejects(in_dir, out_dir)
    rejects = RejectLog(out_dir / "rejects.jsonl", STAGE)
    candidates = discover_inputs(in_dir, cfg.speaker, rejects)

    table: TranscriptTable | None = None
    if cfg.backend == "transcripts" and cfg.transcripts is not None:
        table = load_transcripts(cfg.transcripts)

    # 1. user transcripts (cheap); what is left goes to ASR if there is one
    with_text: list[Utterance] = []
    need_asr: list[Utterance] = []
    asr_name = cfg.asr_backend()
    for u in candidates:
        if not cfg.min_sec <= u.duration_s <= cfg.max_sec:
            with_text.append(u)  # the duration filter rejects it; no point decoding it
            continue
        if cfg.backend != "transcripts":
            need_asr.append(u)
            continue
        text = table.lookup(u.source, u.source_rel) if table else read_sidecar(u.source)
        if text is not None and u.num_segments <= 1:
            t = normalize_transcript(text)
            with_text.append(
                replace(
                    u,
                    text=t,
                    orig_text=t,
                    text_source="transcripts",
                    language=cfg.language or guess_language(t),
                )
            )
            continue
        reason = "sliced_source_needs_asr" if text is not None else "no_transcript"
        if asr_name:
            need_asr.append(u)
        else:
            with_text.append(replace(u, text_error=reason, language=cfg.language or ""))

    if table is not None and table.unused():
        unused = table.unused()
        logger.warning(
            "%d of %d line(s) of %s matched no audio file (check the names), e.g. %s",
            len(unused),
            len(table.names),
            table.origin,
            unused[:3],
        )

    # 2. ASR with a per-utterance cache
    asr_counts = [0, 0]
    if need_asr:
        results = run_asr(need_asr, asr_name, cfg, out_dir, progress, backend_factory, asr_counts)
        for u in need_asr:
            res = results.get(u.utt)
            if res is None:
                with_text.append(replace(u, text_error="asr_failed"))
                continue
            with_text.append(
                replace(
                    u,
                    text=res.text,
                    orig_text=res.text,
                    text_source=asr_name,
                    language=res.language or cfg.language or guess_language(res.text),
                    asr_avg_logprob=res.avg_logprob,
                    asr_no_speech_prob=res.no_speech_prob,
                    asr_compression_ratio=res.compression_ratio,
                    asr_language_prob=res.language_prob,
                )
            )

    # 2b. optional cross-check: a second transcript of clips whose text did not come from that ASR
    if cfg.cross_check != "none":
        to_check = [u for u in with_text if u.orig_text and u.text_source != cfg.cross_check]
        checks = run_asr(to_check, cfg.cross_check, cfg, out_dir, progress, backend_factory, asr_counts)
        by_utt = {u.utt: u for u in with_text}
        for utt, res in checks.items():
            u = by_utt[utt]
            by_utt[utt] = replace(
                u, check_text=res.text, check_cer=round(char_error_rate(u.orig_text, res.text), 4)
            )
        with_text = list(by_utt.values())

    # 3. keep review edits made since the last run
    with_text.sort(key=lambda u: kaldi_sort_key(u.utt))
    edits = 0
    deleted: set[str] = set()
    review_path = out_dir / "review.tsv"
    previous = _load_previous(out_dir)
    if review_path.is_file() and previous:
        review = read_review(review_path)
        # an edit is a review text differing from what the backend said *last time*
        review = {
            k: r for k, r in review.items() if k in previous and (r.delete or r.text != previous[k].orig_text)
        }
        for u in with_text:
            if u.utt in review and review[u.utt].text == previous[u.utt].orig_text:
                review[u.utt] = replace(review[u.utt], text=u.orig_text)
        with_text, deleted, edits = merge_review(with_text, review)
        if edits:
            logger.info("kept %d edit(s) from %s", edits, review_path)

    summary = finalize_dataset(out_dir, with_text, cfg, rejects, deleted)
    summary.asr_decoded, summary.asr_cached = asr_counts
    summary.review_edits = edits
    write_json(out_dir / "transcribe_summary.json", _summary_json(summary, in_dir, cfg))
    return summary


def apply_review(
    directory: str | os.PathLike,
    overrides: list[str] | dict | None = None,
    review_file: str | os.PathLike | None = None,
) -> TranscribeSummary:
    """Rebuild train/dev from an edited ``review.tsv`` without running ASR again.

    Args:
        directory: the out_dir of ``cosytune transcribe``.
        overrides: ``key=value`` changes to the saved config (e.g. ``dev_size=3``, ``max_cps=35``).
        review_file: an edited review file elsewhere (default ``<directory>/review.tsv``).

    Returns:
        Counts, minutes and rejects by reason.

    Raises:
        DataError: the directory was not made by transcribe, or the review file is malformed.
    """
    directory = Path(directory).resolve()
    cfg_path = directory / "transcribe_config.yaml"
    utts_path = directory / "utterances.jsonl"
    if not cfg_path.is_file() or not utts_path.is_file():
        raise DataError(
            f"{directory} has no transcribe_config.yaml / utterances.jsonl; pass the --out_dir of a "
            "finished 'cosytune transcribe' run"
        )
    cfg = load_config(TranscribeConfig, cfg_path, overrides)
    try:
        utts = [Utterance.from_dict(d) for d in read_jsonl(utts_path)]
    except (ValueError, TypeError) as e:
        raise DataError(f"{utts_path} is damaged ({e}); re-run 'cosytune transcribe'") from e
    review = read_review(review_file or directory / "review.tsv")
    missing = [u.utt for u in utts if u.utt not in review]
    if missing:
        logger.warning(
            "%d utterance(s) have no row in the review file and keep their text, e.g. %s; "
            "to drop a row put x in its delete column instead of removing the line",
            len(missing),
            missing[:3],
        )
    # start from the backend's text; the review file carries every edit made so far
    base = [
        replace(
            u,
            text=u.orig_text,
            edited=False,
            status="",
            reject_reason="",
            flags=(),
        )
        for u in utts
    ]
    merged, deleted, edits = merge_review(base, review)
    rejects = RejectLog(directory / "rejects.jsonl", STAGE)
    for r in _previous_input_rejects(directory):
        rejects.add(r["input"], r["reason"], r.get("detail", ""))
    summary = finalize_dataset(directory, merged, cfg, rejects, deleted)
    summary.review_edits = edits
    write_json(directory / "transcribe_summary.json", _summary_json(summary, None, cfg))
    return summary


_INPUT_REASONS = ("missing_wav", "unreadable_audio", "needs_prepare_audio")


def _previous_input_rejects(directory: Path) -> list[dict]:
    """Transcribe-stage rejects of inputs that never became candidates (kept across apply-review)."""
    path = directory / "rejects.jsonl"
    if not path.is_file():
        return []
    return [r for r in read_jsonl(path) if r.get("stage") == STAGE and r.get("reason") in _INPUT_REASONS]


def _summary_json(s: TranscribeSummary, in_dir: Path | None, cfg: TranscribeConfig) -> dict:
    """Counts plus hashes of the settings and the resulting manifest (lets a pipeline skip a done stage)."""
    counts = {k: v for k, v in asdict(s).items() if k != "out_dir"}
    return {
        "in_dir": str(in_dir) if in_dir else None,
        "config_sha256": sha256_json(config_to_dict(cfg)),
        "metadata_sha256": sha256_file(s.out_dir / "metadata.jsonl"),
        **counts,
        "minutes_total": round(s.minutes_total, 3),
        "minutes_usable": round(s.minutes_usable, 3),
        "rejects": dict(s.rejects),
    }
