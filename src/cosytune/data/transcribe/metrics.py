"""Text measures of transcripts: normalisation, speakable length, character error rate, script language.

Speaking-rate filter: the rate is measured in *Latin-equivalent characters per second*:
letters count 1, while a CJK ideograph, kana or hangul syllable counts ``CJK_WEIGHT`` = 3
(one such character is about one syllable, roughly three Latin letters of speech) and a digit
counts ``DIGIT_WEIGHT`` = 3 (it expands to a spoken word); punctuation, spaces, symbols and
bracketed annotations (``[laughter]``, ``(music)``, ``<strong>``) count 0. Normal English is
about 10–16 letters/s and normal Mandarin 4–6 characters/s (12–18 on this scale), so the
default bounds 2–30 reject only clear mismatches: ASR hallucinations on silence (too slow) or
looping output and transcripts of another clip (too fast). Rates outside 6–22 are flagged
for review but kept.
"""

from __future__ import annotations

import re
import unicodedata

CJK_WEIGHT = 3.0
DIGIT_WEIGHT = 3.0
_ANNOTATION = re.compile(r"\[[^\]]*\]|\([^)]*\)|（[^）]*）|【[^】]*】|<[^>]*>|♪")


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
