"""The settings of ``cosytune transcribe`` (and of ``apply-review``, which reuses them).

The speaking-rate bounds (``min_cps``/``max_cps``) are explained in :mod:`cosytune.data.transcribe.metrics`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cosytune.text.special import DEFAULT_INSTRUCT, ENDOFPROMPT

ASR_BACKENDS = ("faster-whisper", "openai-whisper")
_SPEAKER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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
