"""Transcription and dataset building: prepared wavs → metadata.jsonl + Kaldi train/dev dirs.

Role: the seed workflow's ``prepare_xuan_sft_dataset`` step, done properly. Input is the
out_dir of ``cosytune prepare-audio`` (24 kHz mono PCM16 wavs plus ``prepared.jsonl``, one row
per wav with ``wav``, ``utt``, ``source``, ``source_rel``, ``duration_s``, ``sample_rate``,
``segment_index``, ``num_segments``) or a plain folder of audio files (then each file is its
own source recording).

Text comes from a backend:

* ``transcripts``: the user's own text. ``--transcripts FILE`` holds ``name|text`` lines (or
  ``name<TAB>text``, or JSONL rows with a name key — ``name``/``file``/``path``/``audio``/
  ``wav``/``utt`` — and a ``text`` key) where name is the source file's path, its path relative
  to the input folder, its file name or its stem; without the flag a same-named ``.txt`` or
  ``.lab`` beside each *source* audio file is used. A single transcript of a recording that
  prepare-audio sliced cannot be split reliably, so such slices go to ASR when
  ``asr_fallback`` names a backend and otherwise become rejects (``sliced_source_needs_asr``).
* ``faster-whisper`` / ``openai-whisper``: ASR, imported lazily (extras ``asr`` / ``whisper``).
  Results are cached per utterance in ``asr_cache_<backend>.json`` (keyed by the wav's SHA-256
  and the decoding settings), so a re-run does not decode again.
* ``cross_check`` (optional): a second, independent transcript by an ASR backend of clips whose
  text came from elsewhere; rows whose character error rate against it exceeds
  ``max_disagreement`` are flagged ``asr_disagrees`` in the review file (a wrong or misplaced
  transcript shows up this way), never dropped.

Output (in out_dir):

* ``utterances.jsonl``: every candidate with readable audio, kept or not (the review base).
* ``metadata.jsonl``: kept utterances: ``utt``, ``wav``, ``duration_s``, ``sample_rate``,
  ``text``, ``speaker``, ``language``, ``instruct``, ``source``, ``source_rel``,
  ``segment_index``, ``num_segments``, ``split``, ``text_source``, ``edited``, ASR confidence
  (``asr_avg_logprob``, ``asr_no_speech_prob``, ``asr_compression_ratio``,
  ``asr_language_prob``; null without ASR), ``chars_per_s`` and review ``flags``.
* ``train/`` and ``dev/``: Kaldi dirs (see :mod:`cosytune.data.kaldi`) with ``instruct``.
* ``review.tsv``: the editable review file (see :mod:`cosytune.data.review`).
* ``rejects.jsonl``: rows of stage ``transcribe`` (plus the input folder's earlier stages).
* ``transcribe_config.yaml`` and ``transcribe_summary.json``.

Speaking-rate filter: the rate is measured in *Latin-equivalent characters per second*:
letters count 1, while a CJK ideograph, kana or hangul syllable counts ``CJK_WEIGHT`` = 3
(one such character is about one syllable, roughly three Latin letters of speech) and a digit
counts ``DIGIT_WEIGHT`` = 3 (it expands to a spoken word); punctuation, spaces, symbols and
bracketed annotations (``[laughter]``, ``(music)``, ``<strong>``) count 0. Normal English is
about 10–16 letters/s and normal Mandarin 4–6 characters/s (12–18 on this scale), so the
default bounds 2–30 reject only clear mismatches: ASR hallucinations on silence (too slow) or
looping output and transcripts of another clip (too fast). Rates outside 6–22 are flagged
for review but kept.

Reference: upstream-spec.md §7.6 (Kaldi files and the CosyVoice 3 instruct).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

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
from cosytune.errors import CosytuneError, DataError, UsageError, require
from cosytune.fileio import read_jsonl, sha256_file, sha256_json, write_json, write_jsonl
from cosytune.text.special import DEFAULT_INSTRUCT, ENDOFPROMPT

logger = logging.getLogger(__name__)

STAGE = "transcribe"
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus")
# Formats libsndfile cannot read: in a plain folder they are recorded as rejects (prepare-audio
# decodes them) rather than silently skipped.
OTHER_MEDIA_EXTENSIONS = (".m4a", ".aac", ".mp4", ".wma", ".amr", ".webm", ".mkv", ".mov", ".avi", ".3gp")
TRANSCRIPT_SIDECARS = (".txt", ".lab")
CJK_WEIGHT = 3.0
DIGIT_WEIGHT = 3.0
TYPICAL_CPS = (6.0, 22.0)
# Whisper's own quality heuristics (openai/whisper transcribe.py defaults): a segment with
# avg log-prob below -1, no-speech probability above 0.6 or gzip ratio above 2.4 is suspect.
LOW_LOGPROB = -1.0
HIGH_NO_SPEECH = 0.6
HIGH_COMPRESSION = 2.4
# Prompts in the punctuated style we want back: Whisper imitates the prompt's style.
PUNCTUATION_PROMPTS = {
    "zh": "以下是普通话的句子，带有标点符号。",
    "en": "Hello, welcome to my recording. This is a sentence, with punctuation.",
    "ja": "こんにちは。これは、句読点のある文章です。",
    "ko": "안녕하세요. 이것은 문장 부호가 있는 문장입니다.",
    "yue": "你好，歡迎收聽。呢個係有標點符號嘅句子。",
}
ASR_BACKENDS = ("faster-whisper", "openai-whisper")
# Phrases Whisper is known to invent on silence or music (learnt from subtitle credits in its
# training data); an ASR text containing one is flagged for review, not dropped.
_KNOWN_HALLUCINATIONS = re.compile(
    r"thanks? (you )?for watching|please subscribe|like and subscribe|subtitles? by|amara\.org"
    r"|字幕|请不吝点赞|订阅|明镜与点点|ご視聴ありがとうございました",
    re.IGNORECASE,
)
_ANNOTATION = re.compile(r"\[[^\]]*\]|\([^)]*\)|（[^）]*）|【[^】]*】|<[^>]*>|♪")
_SPEAKER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TranscribeConfig:
    """Settings of ``cosytune transcribe`` (and of ``apply-review``, which reuses them)."""

    backend: Literal["faster-whisper", "openai-whisper", "transcripts"] = "faster-whisper"
    """Where text comes from."""
    speaker: str = "spk"
    """Speaker id (seed: ``--spk_id``); prefixes every utterance id."""
    transcripts: Path | None = None
    """``name|text`` (or TSV / JSONL) file for the transcripts backend; None = sidecar .txt/.lab."""
    asr_fallback: Literal["none", "faster-whisper", "openai-whisper"] = "none"
    """ASR backend for clips the transcripts backend cannot cover (sliced sources, no text)."""
    whisper_model: str = "large-v3"
    """Whisper model name (downloaded once into the usual cache) or local model dir."""
    device: str = "auto"
    """ASR device: auto, cpu or cuda (cuda:N for openai-whisper)."""
    compute_type: str = "default"
    """CTranslate2 compute type (default, int8, float16, int8_float16, ...)."""
    vad_filter: bool = True
    """Run faster-whisper's Silero VAD before decoding (drops silence, fewer hallucinations)."""
    language: str | None = None
    """Language code (en, zh, ...); None = detect per clip."""
    beam_size: int = 5
    """Beam width of the ASR decoder."""
    initial_prompt: str | None = "auto"
    """Prompt that makes Whisper punctuate; 'auto' = a punctuated sentence in ``language``."""
    max_new_tokens: int | None = None
    """Cap on decoded tokens per 30 s window (None = Whisper's own limit)."""
    num_threads: int = 0
    """CPU threads for faster-whisper (0 = its default)."""
    cross_check: Literal["none", "faster-whisper", "openai-whisper"] = "none"
    """Also transcribe clips whose text came from elsewhere (your transcripts, another ASR) with
    this ASR and flag rows that disagree (``asr_disagrees``) for review."""
    max_disagreement: float = 0.35
    """Character error rate between the text and the cross-check above which a row is flagged."""
    instruct: str = DEFAULT_INSTRUCT
    """Instruct written for every utterance; CosyVoice 3 needs it to end with <|endofprompt|>."""
    dev_size: float = 0.1
    """Dev set size: a fraction (< 1) of the utterances or a count (>= 1); at least one."""
    seed: int = 1986
    """Seed of the train/dev split."""
    min_sec: float = 0.5
    """Shorter clips are rejected."""
    max_sec: float = 30.0
    """Longer clips are rejected (upstream's speech tokenizer handles at most 30 s)."""
    min_cps: float = 2.0
    """Lower bound of Latin-equivalent characters per second (see module docstring)."""
    max_cps: float = 30.0
    """Upper bound of Latin-equivalent characters per second."""

    def __post_init__(self) -> None:
        problems = []
        if not _SPEAKER_RE.match(self.speaker):
            problems.append(
                f"speaker: expected letters, digits, '.', '_' or '-' (no spaces), starting with a letter or "
                f"digit; found {self.speaker!r}"
            )
        if not self.instruct.endswith(ENDOFPROMPT) or "\n" in self.instruct:
            problems.append(f"instruct: must be one line ending with {ENDOFPROMPT}; found {self.instruct!r}")
        if self.dev_size <= 0 or (self.dev_size >= 1 and not float(self.dev_size).is_integer()):
            problems.append(
                f"dev_size: expected a fraction in (0, 1) or a whole count >= 1; found {self.dev_size}"
            )
        if not 0 <= self.min_sec < self.max_sec:
            problems.append(
                f"min_sec/max_sec: expected 0 <= min_sec < max_sec; found {self.min_sec}/{self.max_sec}"
            )
        if not 0 <= self.min_cps < self.max_cps:
            problems.append(
                f"min_cps/max_cps: expected 0 <= min_cps < max_cps; found {self.min_cps}/{self.max_cps}"
            )
        if self.beam_size < 1:
            problems.append(f"beam_size: expected >= 1; found {self.beam_size}")
        if self.backend in ASR_BACKENDS and self.transcripts is not None:
            problems.append("transcripts: a transcripts file is only read with backend=transcripts")
        if self.backend in ASR_BACKENDS and self.asr_fallback != "none":
            problems.append("asr_fallback: only used with backend=transcripts; remove it or set it to none")
        if self.cross_check != "none" and self.cross_check == self.backend:
            problems.append(
                "cross_check: must differ from backend (the same ASR would only agree with itself)"
            )
        if not 0 < self.max_disagreement <= 1:
            problems.append(f"max_disagreement: expected a fraction in (0, 1]; found {self.max_disagreement}")
        if problems:
            raise ValueError("; ".join(problems))

    def asr_backend(self) -> str | None:
        """The ASR backend in use: the main backend or the transcripts fallback (None: no ASR)."""
        if self.backend in ASR_BACKENDS:
            return self.backend
        return None if self.asr_fallback == "none" else self.asr_fallback


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Utterance:
    """One clip on its way to the dataset (frozen; stages return ``dataclasses.replace`` copies)."""

    utt: str
    """Utterance id, prefixed with the speaker id."""
    wav: str
    """Absolute audio path."""
    duration_s: float
    sample_rate: int
    speaker: str
    source: str
    """Absolute path of the source recording (the split groups by it)."""
    source_rel: str
    segment_index: int = 0
    num_segments: int = 1
    text: str = ""
    """Current transcript (after review edits)."""
    orig_text: str = ""
    """Transcript as the backend gave it (to tell review edits apart)."""
    text_source: str = ""
    """Backend the text came from: transcripts, faster-whisper or openai-whisper."""
    edited: bool = False
    """The text was changed in review.tsv."""
    text_error: str = ""
    """Why no text came from the backend (a reject reason), if none did."""
    language: str = ""
    asr_avg_logprob: float | None = None
    asr_no_speech_prob: float | None = None
    asr_compression_ratio: float | None = None
    asr_language_prob: float | None = None
    check_text: str = ""
    """Transcript of the cross-check ASR, if one ran."""
    check_cer: float | None = None
    """Character error rate of ``orig_text`` against ``check_text``."""
    chars_per_s: float | None = None
    flags: tuple[str, ...] = ()
    status: str = ""
    """train, dev or rejected."""
    reject_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flags"] = list(self.flags)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Utterance:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["flags"] = tuple(kw.get("flags") or ())
        return cls(**kw)


@dataclass
class TranscribeSummary:
    """What a transcribe or apply-review run did."""

    out_dir: Path
    candidates: int = 0
    kept: int = 0
    train: int = 0
    dev: int = 0
    asr_decoded: int = 0
    asr_cached: int = 0
    review_edits: int = 0
    minutes_total: float = 0.0
    minutes_usable: float = 0.0
    rejects: Counter = field(default_factory=Counter)

    def items(self) -> list[tuple[str, Any]]:
        out = [
            ("output", str(self.out_dir)),
            ("candidates", self.candidates),
            ("kept", f"{self.kept} (train {self.train}, dev {self.dev})"),
            ("minutes", f"{self.minutes_usable:.2f} usable of {self.minutes_total:.2f}"),
        ]
        if self.asr_decoded or self.asr_cached:
            out.append(("asr", f"{self.asr_decoded} decoded, {self.asr_cached} from cache"))
        if self.review_edits:
            out.append(("review edits applied", self.review_edits))
        out.append(("rejected", sum(self.rejects.values())))
        out += [(f"  {reason}", n) for reason, n in sorted(self.rejects.items())]
        return out


# --------------------------------------------------------------------------------------------
# Text measures
# --------------------------------------------------------------------------------------------


def normalize_transcript(text: str) -> str:
    """NFC, all whitespace runs (tabs, line breaks) to one space, stripped.

    A line break in a transcript would break the one-line-per-utterance Kaldi ``text`` file.
    """
    return " ".join(unicodedata.normalize("NFC", text).split())


def _is_cjk(ch: str) -> bool:
    o = ord(ch)
    return (
        0x3040 <= o <= 0x30FF  # hiragana, katakana
        or 0x3400 <= o <= 0x4DBF  # CJK ext A
        or 0x4E00 <= o <= 0x9FFF  # CJK unified
        or 0xAC00 <= o <= 0xD7AF  # hangul syllables
        or 0xF900 <= o <= 0xFAFF  # CJK compatibility
        or 0x20000 <= o <= 0x3134F  # CJK ext B-G
    )


def speakable_units(text: str) -> float:
    """Latin-equivalent speakable characters of ``text`` (see the module docstring).

    Bracketed annotations are removed first; letters count 1, CJK characters ``CJK_WEIGHT``,
    digits ``DIGIT_WEIGHT``, everything else 0.
    """
    units = 0.0
    for ch in _ANNOTATION.sub(" ", text):
        if _is_cjk(ch):
            units += CJK_WEIGHT
        elif ch.isdigit():
            units += DIGIT_WEIGHT
        elif ch.isalpha():
            units += 1.0
    return units


def _cer_units(text: str) -> list[str]:
    """Characters compared by :func:`char_error_rate`: letters and digits, case-folded."""
    return [c for c in unicodedata.normalize("NFKC", _ANNOTATION.sub(" ", text)).casefold() if c.isalnum()]


def char_error_rate(reference: str, hypothesis: str) -> float:
    """Levenshtein distance over letters and digits (punctuation, spaces and case ignored) / reference length.

    Returns 0 for two texts without letters or digits and 1 when only the reference has none.
    """
    ref, hyp = _cer_units(reference), _cer_units(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / len(ref)


def guess_language(text: str) -> str:
    """Language code from the script (zh/ja/ko), or ``"und"`` for other scripts."""
    kana = sum(0x3040 <= ord(c) <= 0x30FF for c in text)
    hangul = sum(0xAC00 <= ord(c) <= 0xD7AF for c in text)
    han = sum(_is_cjk(c) for c in text) - kana - hangul
    if kana:
        return "ja"
    if hangul > han:
        return "ko"
    if han:
        return "zh"
    return "und"


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _safe_id(s: str) -> str:
    """Kaldi-safe token: no whitespace or control characters (unicode letters are fine)."""
    out = "".join("_" if (c.isspace() or unicodedata.category(c)[0] == "C" or c in "/\\|") else c for c in s)
    return out.strip("_") or "utt"


def _unique(utt: str, taken: set[str]) -> str:
    cand, n = utt, 2
    while cand in taken:
        cand, n = f"{utt}-{n}", n + 1
    taken.add(cand)
    return cand


def discover_inputs(in_dir: str | os.PathLike, speaker: str, rejects: RejectLog) -> list[Utterance]:
    """List the clips to transcribe, from ``prepared.jsonl`` or a plain folder of audio.

    Args:
        in_dir: prepare-audio's out_dir, or any folder of audio files (searched recursively).
        speaker: speaker id used as the utterance id prefix.
        rejects: receives ``missing_wav`` / ``unreadable_audio`` rows.

    Returns:
        Candidates sorted by utterance id (text still empty).

    Raises:
        DataError: if the folder does not exist or holds no audio at all.
    """
    import soundfile as sf

    in_dir = Path(in_dir).resolve()
    if not in_dir.is_dir():
        raise DataError(f"input folder {in_dir} does not exist; pass the out_dir of 'cosytune prepare-audio'")
    taken: set[str] = set()
    out: list[Utterance] = []
    manifest = in_dir / "prepared.jsonl"
    if manifest.is_file():
        try:
            rows = read_jsonl(manifest)
        except ValueError as e:
            raise DataError(str(e)) from e
        for i, row in enumerate(rows, 1):
            if "wav" not in row:
                raise DataError(f"{manifest}:{i}: row has no 'wav' key; re-run 'cosytune prepare-audio'")
            wav = (in_dir / row["wav"]).resolve()
            base = _safe_id(str(row.get("utt") or Path(row["wav"]).with_suffix("").as_posix()))
            if not wav.is_file():
                rejects.add(str(wav), "missing_wav", f"listed in {manifest.name} but not on disk")
                continue
            try:
                info = sf.info(str(wav))
            except Exception as e:  # noqa: BLE001 - any decoder failure is a recorded reject
                rejects.add(str(wav), "unreadable_audio", f"{type(e).__name__}: {e}")
                continue
            source = str(row.get("source") or wav)
            out.append(
                Utterance(
                    utt=_unique(f"{speaker}_{base}", taken),
                    wav=str(wav),
                    duration_s=float(row.get("duration_s") or info.frames / info.samplerate),
                    sample_rate=int(info.samplerate),
                    speaker=speaker,
                    source=source,
                    source_rel=str(row.get("source_rel") or Path(source).name),
                    segment_index=int(row.get("segment_index") or 0),
                    num_segments=int(row.get("num_segments") or 1),
                )
            )
    else:
        files = sorted(
            (p for p in in_dir.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS),
            key=lambda p: kaldi_sort_key(p.relative_to(in_dir).as_posix()),
        )
        for p in sorted(in_dir.rglob("*")):
            if p.is_file() and p.suffix.lower() in OTHER_MEDIA_EXTENSIONS:
                rejects.add(
                    str(p), "needs_prepare_audio", "run 'cosytune prepare-audio' to convert it to wav"
                )
        for p in files:
            rel = p.relative_to(in_dir)
            try:
                info = sf.info(str(p))
                if info.frames <= 0:
                    raise ValueError("no audio frames")
            except Exception as e:  # noqa: BLE001 - any decoder failure is a recorded reject
                rejects.add(str(p), "unreadable_audio", f"{type(e).__name__}: {e}")
                continue
            base = _safe_id("__".join(rel.with_suffix("").parts))
            out.append(
                Utterance(
                    utt=_unique(f"{speaker}_{base}", taken),
                    wav=str(p.resolve()),
                    duration_s=info.frames / info.samplerate,
                    sample_rate=int(info.samplerate),
                    speaker=speaker,
                    source=str(p.resolve()),
                    source_rel=rel.as_posix(),
                )
            )
    if not out and not len(rejects):
        raise DataError(
            f"no audio found in {in_dir} (looked for prepared.jsonl or files ending in "
            f"{', '.join(AUDIO_EXTENSIONS)}); run 'cosytune prepare-audio' first"
        )
    return sorted(out, key=lambda u: kaldi_sort_key(u.utt))


# --------------------------------------------------------------------------------------------
# Transcripts backend
# --------------------------------------------------------------------------------------------


class TranscriptTable:
    """User transcripts looked up by source path, relative path, file name or stem."""

    def __init__(self, entries: dict[str, str], origin: str) -> None:
        self.origin = origin
        self.names = list(entries)
        self.by_key: dict[str, tuple[str, str]] = {}
        self.ambiguous: set[str] = set()
        self.used: set[str] = set()
        for name, text in entries.items():
            p = Path(name.replace("\\", "/"))
            for key in {name, p.as_posix(), p.name, p.stem, p.with_suffix("").as_posix()}:
                if key in self.by_key and self.by_key[key][1] != text:
                    self.ambiguous.add(key)
                self.by_key.setdefault(key, (name, text))

    def lookup(self, source: str, source_rel: str) -> str | None:
        """Text for a source recording, trying the most specific key first."""
        s, r = Path(source), Path(source_rel)
        for key in (source, s.as_posix(), r.as_posix(), r.with_suffix("").as_posix(), s.name, s.stem):
            if key in self.by_key and key not in self.ambiguous:
                name, text = self.by_key[key]
                self.used.add(name)
                return text
        return None

    def unused(self) -> list[str]:
        """Entries that matched no audio file so far (often a typo in the name)."""
        return [n for n in self.names if n not in self.used]


def load_transcripts(path: str | os.PathLike) -> TranscriptTable:
    """Read a transcripts file: ``name|text`` lines, ``name<TAB>text`` lines, or JSONL rows.

    Raises:
        DataError: listing every malformed line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"transcripts file {path} does not exist; expected 'name|text' lines")
    entries: dict[str, str] = {}
    problems = []
    for i, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"line {i}: not valid JSON ({e.msg})")
                continue
            name = next((row[k] for k in ("name", "file", "path", "audio", "wav", "utt") if row.get(k)), None)
            text = row.get("text")
            if name is None or not isinstance(text, str):
                problems.append(
                    f"line {i}: JSON row needs a name key (name/file/path/audio/wav/utt) and 'text'"
                )
                continue
        elif "|" in line:
            name, text = line.split("|", 1)
        elif "\t" in line:
            name, text = line.split("\t", 1)
        else:
            problems.append(
                f"line {i}: expected 'name|text', 'name<TAB>text' or a JSON object; found {line[:60]!r}"
            )
            continue
        name = str(name).strip()
        if name in entries:
            problems.append(f"line {i}: {name!r} appears twice")
            continue
        entries[name] = text
    if problems:
        raise DataError(
            f"transcripts file {path}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems[:20])
        )
    if not entries:
        raise DataError(f"transcripts file {path} holds no entries; expected 'name|text' lines")
    return TranscriptTable(entries, str(path))


def read_sidecar(source: str | os.PathLike) -> str | None:
    """Text of a same-named ``.txt`` / ``.lab`` beside a source audio file, if there is one."""
    source = Path(source)
    for ext in TRANSCRIPT_SIDECARS:
        p = source.with_suffix(ext)
        if p.is_file():
            return p.read_text(encoding="utf-8-sig")
    return None


# --------------------------------------------------------------------------------------------
# ASR backends
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AsrResult:
    """Text and confidence of one decoded clip."""

    text: str
    language: str
    avg_logprob: float | None = None
    """Duration-weighted mean of the segments' average token log-probabilities."""
    no_speech_prob: float | None = None
    """Highest no-speech probability of any segment."""
    compression_ratio: float | None = None
    """Highest gzip compression ratio of any segment (high = repetitive output)."""
    language_prob: float | None = None


def load_audio_16k(path: str | os.PathLike) -> Any:
    """Decode an audio file to mono float32 at 16 kHz (Whisper's input rate)."""
    import numpy as np
    import soundfile as sf
    import soxr

    audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    mono = audio.mean(axis=1)
    if sr != 16000:
        mono = soxr.resample(mono, sr, 16000, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _prompt(cfg: TranscribeConfig) -> str | None:
    if cfg.initial_prompt != "auto":
        return cfg.initial_prompt or None
    return PUNCTUATION_PROMPTS.get(cfg.language or "")


def _aggregate(
    segments: list[tuple[str, float, float, float, float]], language: str, lang_prob: float | None
) -> AsrResult:
    """Combine (text, duration, avg_logprob, no_speech_prob, compression_ratio) segment tuples."""
    text = normalize_transcript("".join(s[0] for s in segments))
    if not segments:
        return AsrResult(text="", language=language, language_prob=lang_prob)
    total = sum(max(s[1], 1e-3) for s in segments)
    return AsrResult(
        text=text,
        language=language,
        avg_logprob=sum(s[2] * max(s[1], 1e-3) for s in segments) / total,
        no_speech_prob=max(s[3] for s in segments),
        compression_ratio=max(s[4] for s in segments),
        language_prob=lang_prob,
    )


def _check_model_path(model: str) -> None:
    """A model given as a path must exist (otherwise it would be taken for a hub name)."""
    if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().exists():
        raise DataError(
            f"Whisper model dir {model} does not exist; pass an existing model dir or a model name such as large-v3"
        )


class FasterWhisperBackend:
    """faster-whisper (CTranslate2) ASR; the model loads from a local dir or the usual cache."""

    name = "faster-whisper"

    def __init__(self, cfg: TranscribeConfig) -> None:
        fw = require("faster_whisper", "asr", "the faster-whisper transcription backend")
        self.cfg = cfg
        _check_model_path(cfg.whisper_model)
        try:
            self.model = fw.WhisperModel(
                cfg.whisper_model,
                device=cfg.device,
                compute_type=cfg.compute_type,
                cpu_threads=cfg.num_threads,
            )
        except Exception as e:
            raise DataError(
                f"could not load faster-whisper model {cfg.whisper_model!r} on device {cfg.device!r} "
                f"(compute_type {cfg.compute_type!r}): {e}. Pass --whisper_model as a local CTranslate2 "
                "model dir or a model name (e.g. large-v3, downloaded once into the Hugging Face cache), "
                "and a compute type the device supports (int8 on CPU)."
            ) from e

    def transcribe(self, audio_16k: Any) -> AsrResult:
        """Decode one clip (mono float32 at 16 kHz)."""
        cfg = self.cfg
        segments, info = self.model.transcribe(
            audio_16k,
            language=cfg.language,
            beam_size=cfg.beam_size,
            vad_filter=cfg.vad_filter,
            initial_prompt=_prompt(cfg),
            condition_on_previous_text=False,  # a clip is one utterance; carrying text over invites loops
            max_new_tokens=cfg.max_new_tokens,
        )
        segs = [
            (s.text, s.end - s.start, s.avg_logprob, s.no_speech_prob, s.compression_ratio) for s in segments
        ]
        return _aggregate(segs, info.language, info.language_probability)


class OpenAIWhisperBackend:
    """openai-whisper ASR (PyTorch); optional, installed with ``pip install 'cosytune[whisper]'``."""

    name = "openai-whisper"

    def __init__(self, cfg: TranscribeConfig) -> None:
        whisper = require("whisper", "whisper", "the openai-whisper transcription backend")
        import torch

        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.cfg = cfg
        self.fp16 = device.startswith("cuda")
        _check_model_path(cfg.whisper_model)
        try:
            self.model = whisper.load_model(cfg.whisper_model, device=device)
        except (RuntimeError, OSError) as e:
            raise DataError(
                f"could not load openai-whisper model {cfg.whisper_model!r} on {device}: {e}"
            ) from e

    def transcribe(self, audio_16k: Any) -> AsrResult:
        """Decode one clip (mono float32 at 16 kHz)."""
        cfg = self.cfg
        res = self.model.transcribe(
            audio_16k,
            language=cfg.language,
            beam_size=cfg.beam_size,
            initial_prompt=_prompt(cfg),
            condition_on_previous_text=False,
            fp16=self.fp16,
        )
        segs = [
            (s["text"], s["end"] - s["start"], s["avg_logprob"], s["no_speech_prob"], s["compression_ratio"])
            for s in res.get("segments", [])
        ]
        return _aggregate(segs, res.get("language") or cfg.language or "", None)


def build_asr_backend(name: str, cfg: TranscribeConfig) -> FasterWhisperBackend | OpenAIWhisperBackend:
    """Construct an ASR backend by name (imports its package lazily)."""
    if name == "faster-whisper":
        return FasterWhisperBackend(cfg)
    if name == "openai-whisper":
        return OpenAIWhisperBackend(cfg)
    raise UsageError(f"unknown ASR backend {name!r}; expected one of {', '.join(ASR_BACKENDS)}")


def asr_settings(cfg: TranscribeConfig, backend: str) -> dict[str, Any]:
    """The settings that change ASR output; a cached result is reused only when they match."""
    return {
        "backend": backend,
        "model": cfg.whisper_model,
        "language": cfg.language,
        "beam_size": cfg.beam_size,
        "vad_filter": cfg.vad_filter,
        "initial_prompt": _prompt(cfg),
        "compute_type": cfg.compute_type,
        "max_new_tokens": cfg.max_new_tokens,
    }


class AsrCache:
    """ASR results per utterance, keyed by the wav's SHA-256 and the settings hash.

    Saved atomically every ``save_every`` new results and at the end, so an interrupted run
    loses at most that many decodes.
    """

    def __init__(self, path: Path, settings_hash: str, save_every: int = 20) -> None:
        self.path = path
        self.settings_hash = settings_hash
        self.save_every = save_every
        self.entries: dict[str, dict] = {}
        self._dirty = 0
        if path.is_file():
            try:
                self.entries = json.loads(path.read_text(encoding="utf-8")).get("entries", {})
            except (json.JSONDecodeError, AttributeError):
                logger.warning("ASR cache %s is unreadable; starting a new one", path)

    def get(self, utt: str, wav_sha: str) -> AsrResult | None:
        e = self.entries.get(utt)
        if e and e.get("wav_sha256") == wav_sha and e.get("settings") == self.settings_hash:
            return AsrResult(**e["result"])
        return None

    def put(self, utt: str, wav_sha: str, result: AsrResult) -> None:
        self.entries[utt] = {"wav_sha256": wav_sha, "settings": self.settings_hash, "result": asdict(result)}
        self._dirty += 1
        if self._dirty >= self.save_every:
            self.save()

    def save(self) -> None:
        if self._dirty or not self.path.exists():
            write_json(self.path, {"entries": self.entries}, indent=None)
            self._dirty = 0


# --------------------------------------------------------------------------------------------
# Filters, flags, split
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Review merge and dataset writing
# --------------------------------------------------------------------------------------------


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
    if not kept:
        rejects.save()
        _write_review_and_utts(out_dir, checked)
        _clear_stale_outputs(out_dir)
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
    try:
        train, dev = split_train_dev(kept, cfg.dev_size, cfg.seed)
    except DataError:
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


def _run_asr(
    utts: list[Utterance],
    name: str,
    cfg: TranscribeConfig,
    out_dir: Path,
    progress: bool,
    backend_factory: Callable[[str, TranscribeConfig], Any],
    counts: list[int],
) -> dict[str, AsrResult]:
    """Decode ``utts`` with ASR backend ``name``, reusing ``asr_cache_<name>.json``.

    The model loads only when some clip is not cached. A clip whose decoding raises is left
    out of the result (the caller records it as ``asr_failed``). ``counts`` gets
    ``[decoded, from_cache]`` added.
    """
    from tqdm.auto import tqdm

    out: dict[str, AsrResult] = {}
    if not utts:
        return out
    cache = AsrCache(out_dir / f"asr_cache_{name}.json", sha256_json(asr_settings(cfg, name)))
    backend = None
    try:
        for u in tqdm(utts, desc=name, disable=not progress, leave=False, unit="clip"):
            sha = sha256_file(u.wav)
            res = cache.get(u.utt, sha)
            if res is not None:
                counts[1] += 1
                out[u.utt] = res
                continue
            if backend is None:
                logger.info("loading %s model %s", name, cfg.whisper_model)
                backend = backend_factory(name, cfg)
            try:
                res = backend.transcribe(load_audio_16k(u.wav))
            except CosytuneError:
                raise
            except Exception as e:  # noqa: BLE001 - one bad clip is a reject, not a crashed run
                logger.warning("%s failed on %s: %s", name, u.wav, e)
                continue
            cache.put(u.utt, sha, res)
            counts[0] += 1
            out[u.utt] = res
    finally:
        cache.save()
    return out


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


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
        results = _run_asr(need_asr, asr_name, cfg, out_dir, progress, backend_factory, asr_counts)
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
        checks = _run_asr(to_check, cfg.cross_check, cfg, out_dir, progress, backend_factory, asr_counts)
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
    return {
        "in_dir": str(in_dir) if in_dir else None,
        "config_sha256": sha256_json(config_to_dict(cfg)),
        "metadata_sha256": sha256_file(s.out_dir / "metadata.jsonl"),
        "candidates": s.candidates,
        "kept": s.kept,
        "train": s.train,
        "dev": s.dev,
        "asr_decoded": s.asr_decoded,
        "asr_cached": s.asr_cached,
        "review_edits": s.review_edits,
        "minutes_total": round(s.minutes_total, 3),
        "minutes_usable": round(s.minutes_usable, 3),
        "rejects": dict(s.rejects),
    }


def iter_metadata(directory: str | os.PathLike) -> Iterable[dict]:
    """Rows of ``metadata.jsonl`` in a transcribe out_dir."""
    path = Path(directory) / "metadata.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist; run 'cosytune transcribe' first")
    return read_jsonl(path)
