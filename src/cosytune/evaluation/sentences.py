"""The held-out sentence set: shipped zh/en lists plus the user's own file, minus anything in the training text."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from cosytune.errors import DataError, UsageError
from cosytune.evaluation.textmetrics import language_of, text_key
from cosytune.fileio import read_user_text

SHIPPED_LANGUAGES = ("en", "zh")


@dataclass(frozen=True)
class Sentence:
    """One evaluation sentence."""

    id: str
    """``en-03``, ``zh-11``, ``user-02``."""
    text: str
    lang: str
    source: str
    """``shipped`` or the user's file name."""


def _lines(text: str) -> list[str]:
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]


def shipped(lang: str) -> list[Sentence]:
    """The shipped list of ``lang`` (``en`` or ``zh``)."""
    if lang not in SHIPPED_LANGUAGES:
        raise UsageError(f"no shipped sentence list for language {lang!r}; shipped: {', '.join(SHIPPED_LANGUAGES)}")
    text = (files("cosytune.evaluation") / "sentences" / f"{lang}.txt").read_text(encoding="utf-8")
    return [Sentence(f"{lang}-{i:02d}", s, lang, "shipped") for i, s in enumerate(_lines(text), 1)]


def user_sentences(path: str | os.PathLike) -> list[Sentence]:
    """Sentences of a user's text file (one per line, ``#`` comments)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--texts {path}: no such file; expected a UTF-8 text file with one sentence per line")
    out = [Sentence(f"user-{i:02d}", s, language_of(s), path.name) for i, s in enumerate(_lines(read_user_text(path)), 1)]
    if not out:
        raise DataError(f"--texts {path} holds no sentence (one per line; lines starting with # are comments)")
    return out


def overlaps(sentence: str, training_keys: set[str]) -> bool:
    """Whether a sentence is (part of) a training transcript, or a transcript is part of it."""
    k = text_key(sentence)
    if not k:
        return False
    return k in training_keys or any(len(t) >= 8 and (k in t or t in k) for t in training_keys)


@dataclass
class SentenceSet:
    sentences: list[Sentence]
    dropped: list[Sentence]
    """Sentences removed because the training text contains them."""


def build_sentence_set(languages: Sequence[str], *, texts_file: str | os.PathLike | None = None,
                       training_texts: Iterable[str] = (), max_per_language: int = 0) -> SentenceSet:
    """Shipped lists of ``languages`` (+ the user's file), minus any that overlap the training text.

    Args:
        languages: shipped lists to take (``en``, ``zh``); empty for the user's file only.
        texts_file: the user's own sentences.
        training_texts: transcripts of the training data.
        max_per_language: keep only the first N shipped sentences of each language (0: all).
    """
    keys = {k for k in (text_key(t) for t in training_texts) if k}
    pool: list[Sentence] = []
    for lang in languages:
        items = shipped(lang)
        pool += items[:max_per_language] if max_per_language > 0 else items
    if texts_file is not None:
        pool += user_sentences(texts_file)
    kept = [s for s in pool if not overlaps(s.text, keys)]
    dropped = [s for s in pool if overlaps(s.text, keys)]
    if not kept:
        raise DataError("every evaluation sentence is in the training text; pass --texts with held-out sentences")
    return SentenceSet(kept, dropped)
