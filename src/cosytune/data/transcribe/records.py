"""The records a transcribe run passes between its stages and reports: one clip, and the run's summary."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


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
