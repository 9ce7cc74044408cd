"""Which utterances are kept (filters), which deserve a look in review (flags), and the train/dev split."""

from __future__ import annotations

import random
import re
import unicodedata

from cosytune.data.kaldi import kaldi_sort_key
from cosytune.data.transcribe.config import ASR_BACKENDS, TranscribeConfig
from cosytune.data.transcribe.metrics import speakable_units
from cosytune.data.transcribe.records import Utterance
from cosytune.errors import DataError

TYPICAL_CPS = (6.0, 22.0)
# Whisper's own quality heuristics (openai/whisper transcribe.py defaults): a segment with
# avg log-prob below -1, no-speech probability above 0.6 or gzip ratio above 2.4 is suspect.
LOW_LOGPROB = -1.0
HIGH_NO_SPEECH = 0.6
HIGH_COMPRESSION = 2.4
# Phrases Whisper is known to invent on silence or music (learnt from subtitle credits in its
# training data); an ASR text containing one is flagged for review, not dropped.
_KNOWN_HALLUCINATIONS = re.compile(
    r"thanks? (you )?for watching|please subscribe|like and subscribe|subtitles? by|amara\.org"
    r"|字幕|请不吝点赞|订阅|明镜与点点|ご視聴ありがとうございました",
    re.IGNORECASE,
)


def check_utterance(u: Utterance, cfg: TranscribeConfig) -> tuple[str, str] | None:
    """The first filter an utterance fails, as ``(reason, detail)``, or None when it passes."""
    if u.duration_s > cfg.max_sec:
        return "too_long", f"{u.duration_s:.2f} s > max_sec {cfg.max_sec} s"
    if u.duration_s < cfg.min_sec:
        return "too_short", f"{u.duration_s:.2f} s < min_sec {cfg.min_sec} s"
    if not u.text.strip():
        if u.text_error:
            return u.text_error, "no text came from the backend; type one in review.tsv to keep it"
        return "empty_transcript", "the transcript is empty"
    units = speakable_units(u.text)
    if units == 0:
        return "no_speakable_text", f"no letters or digits outside annotations in {u.text[:60]!r}"
    cps = units / max(u.duration_s, 1e-6)
    if cps < cfg.min_cps:
        return (
            "chars_per_sec_too_low",
            f"{cps:.1f} chars/s < {cfg.min_cps} for {u.text[:60]!r} in {u.duration_s:.2f} s",
        )
    if cps > cfg.max_cps:
        return (
            "chars_per_sec_too_high",
            f"{cps:.1f} chars/s > {cfg.max_cps} for {u.text[:60]!r} in {u.duration_s:.2f} s",
        )
    return None


def review_flags(u: Utterance, max_disagreement: float = 0.35) -> tuple[str, ...]:
    """Hints for the review file: why a kept row deserves a look."""
    flags = []
    if u.check_cer is not None and u.check_cer > max_disagreement and not u.edited:
        flags.append("asr_disagrees")
    if u.chars_per_s and u.chars_per_s < TYPICAL_CPS[0]:
        flags.append("slow_speech")
    if u.chars_per_s is not None and u.chars_per_s > TYPICAL_CPS[1]:
        flags.append("fast_speech")
    if u.asr_avg_logprob is not None and u.asr_avg_logprob < LOW_LOGPROB:
        flags.append("asr_low_confidence")
    if u.asr_no_speech_prob is not None and u.asr_no_speech_prob > HIGH_NO_SPEECH:
        flags.append("asr_no_speech")
    if u.asr_compression_ratio is not None and u.asr_compression_ratio > HIGH_COMPRESSION:
        flags.append("asr_repetitive")
    if any(c.isdigit() for c in u.text):
        flags.append("digits")
    if (
        u.text
        and u.text_source in ASR_BACKENDS
        and not any(unicodedata.category(c).startswith("P") for c in u.text)
    ):
        flags.append("no_punctuation")
    if u.text_source in ASR_BACKENDS and not u.edited and _KNOWN_HALLUCINATIONS.search(u.text):
        flags.append("asr_known_hallucination")
    return tuple(flags)


def dev_count(n: int, dev_size: float) -> int:
    """Number of dev utterances wanted: a count (``dev_size`` >= 1) or a fraction, at least 1."""
    return int(dev_size) if dev_size >= 1 else max(1, round(n * dev_size))


def split_train_dev(utts: list[Utterance], dev_size: float, seed: int) -> tuple[set[str], set[str]]:
    """Seeded train/dev split grouped by source recording.

    Source groups are shuffled with ``random.Random(seed)`` (after sorting, so the result does
    not depend on input order) and taken into dev while they fit the wanted size; if none
    fits, the smallest group is taken, so dev is never empty.

    Returns:
        ``(train_ids, dev_ids)``.

    Raises:
        DataError: when there are fewer than two source recordings or dev would leave train empty.
    """
    groups: dict[str, list[str]] = {}
    for u in utts:
        groups.setdefault(u.source, []).append(u.utt)
    n = len(utts)
    want = dev_count(n, dev_size)
    if len(groups) < 2 or want >= n:
        raise DataError(
            f"too little data to split into train and dev: {n} usable utterance(s) from {len(groups)} source "
            f"recording(s), dev size {dev_size:g} wants {want}. Need at least 2 recordings and dev smaller than "
            "the whole set: add recordings, lower --dev_size, or fix the rejects listed in rejects.jsonl."
        )
    keys = sorted(groups, key=kaldi_sort_key)
    random.Random(seed).shuffle(keys)
    dev: set[str] = set()
    for k in keys:
        if len(dev) >= want:
            break
        if len(dev) + len(groups[k]) <= want:
            dev.update(groups[k])
    if not dev:  # every recording has more slices than wanted: take the smallest (dev is never empty)
        dev.update(groups[min(keys, key=lambda k: len(groups[k]))])
    if len(dev) >= n:
        raise DataError(
            f"the dev set would take all {n} utterances (one recording holds most); lower --dev_size"
        )
    train = {u.utt for u in utts} - dev
    return train, dev
