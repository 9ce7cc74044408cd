"""Intelligibility measures of one take: CER (zh) / WER (en) after normalising both sides, the
substitution/deletion/insertion counts of the alignment, and a repeated-n-gram score that flags an LLM
that loops ("the the the ..." or a phrase said twice).

Normalisation, applied to the reference and the ASR output alike: the same text front end the
synthesiser uses (numbers, dates and symbols spelled out by wetext), NFKC, lower case, punctuation
removed; Chinese is compared character by character, other text word by word.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from cosytune.text.normalize import contains_chinese

_PUNCT_CATEGORIES = ("P", "S")


def language_of(text: str) -> str:
    """``zh`` for text with Chinese characters, else ``en``."""
    return "zh" if contains_chinese(text) else "en"


def clean(text: str) -> str:
    """NFKC, lower case, punctuation and symbols to spaces, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c)[0] in _PUNCT_CATEGORIES and c != "'" else c for c in text)
    text = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", text)  # quotes, not apostrophes inside words
    return " ".join(text.split())


def units(text: str, lang: str) -> list[str]:
    """Comparison units of cleaned text: characters for zh (spaces dropped), words otherwise."""
    if lang == "zh":
        return [c for c in text if not c.isspace()]
    return text.split()


@dataclass(frozen=True)
class EditCounts:
    """Levenshtein alignment of hypothesis to reference."""

    ref_len: int
    substitutions: int
    deletions: int
    insertions: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def error_rate(self) -> float:
        """(S + D + I) / N; an empty reference gives 0 for an empty hypothesis, else 1 per inserted unit."""
        return self.errors / self.ref_len if self.ref_len else float(self.insertions)


def align(ref: list[str], hyp: list[str]) -> EditCounts:
    """Minimum-edit alignment counts (ties broken towards substitutions, then deletions)."""
    n, m = len(ref), len(hyp)
    # Each cell: (cost, subs, dels, ins).
    prev = [(j, 0, 0, j) for j in range(m + 1)]
    for i in range(1, n + 1):
        cur = [(i, 0, i, 0)]
        for j in range(1, m + 1):
            if ref[i - 1] == hyp[j - 1]:
                best = prev[j - 1]
            else:
                c, s, d, k = prev[j - 1]
                best = (c + 1, s + 1, d, k)
            c, s, d, k = prev[j]
            if c + 1 < best[0]:
                best = (c + 1, s, d + 1, k)
            c, s, d, k = cur[j - 1]
            if c + 1 < best[0]:
                best = (c + 1, s, d, k + 1)
            cur.append(best)
        prev = cur
    _, s, d, k = prev[m]
    return EditCounts(n, s, d, k)


def repeated_ngram_score(tokens: list[str], n: int | None = None) -> float:
    """Share of n-grams that repeat an earlier n-gram of the same take (0 = none repeated).

    ``n`` defaults to 3 for words and 4 for Chinese characters' worth of units; a fluent sentence scores
    near 0, a model stuck in a loop approaches 1.
    """
    n = n or 3
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    counts = Counter(grams)
    return sum(c - 1 for c in counts.values()) / len(grams)


@dataclass(frozen=True)
class Intelligibility:
    """Scores of one take against its text."""

    lang: str
    error_rate: float
    """CER for zh, WER otherwise."""
    substitution_rate: float
    deletion_rate: float
    insertion_rate: float
    repeat_score: float
    """:func:`repeated_ngram_score` of the ASR output minus that of the reference (looping beyond the text)."""
    reference: str
    hypothesis: str


def score_text(reference: str, hypothesis: str, normalize: Callable[[str], str] | None = None) -> Intelligibility:
    """Compare what was asked for with what the ASR heard.

    Args:
        reference: the sentence given to the synthesiser.
        hypothesis: the ASR transcript of the take.
        normalize: the text front end applied to both sides before cleaning (spells out numbers); None
            compares cleaned text only.
    """
    lang = language_of(reference)
    ref_t, hyp_t = reference, hypothesis
    if normalize is not None:
        ref_t, hyp_t = normalize(reference), normalize(hypothesis) if hypothesis.strip() else ""
    ref_u, hyp_u = units(clean(ref_t), lang), units(clean(hyp_t), lang)
    e = align(ref_u, hyp_u)
    n = max(e.ref_len, 1)
    gram = 4 if lang == "zh" else 3
    rep = max(0.0, repeated_ngram_score(hyp_u, gram) - repeated_ngram_score(ref_u, gram))
    return Intelligibility(lang, e.error_rate, e.substitutions / n, e.deletions / n, e.insertions / n, rep,
                           " ".join(ref_u) if lang != "zh" else "".join(ref_u),
                           " ".join(hyp_u) if lang != "zh" else "".join(hyp_u))


def text_key(text: str) -> str:
    """A key that matches a sentence however it is punctuated or cased (for overlap checks)."""
    return "".join(units(clean(text), "zh"))
