"""The listening lab's records: blind A/B ratings in ``<run dir>/lab/ratings.jsonl`` and their summary.

One line per judged pair::

    {"time_utc", "text_sha256", "text_chars", "choice": "a"|"b"|"same",
     "a": {"variant", "llm", "flow", "preset", "seed", "settings"}, "b": {...}, "winner": variant|null}

The text itself is never stored (only its hash and length, as in run.json). The summary counts, per
variant (``llm=… flow=… preset=…``; seeds pooled), wins, ties and losses, and gives the win rate (a tie
counts half) with a 95 % Wilson score interval.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cosytune.errors import DataError, UsageError
from cosytune.fileio import file_mode, read_jsonl

CHOICES = ("a", "b", "same")
_lock = threading.Lock()


def variant_label(take: dict[str, Any]) -> str:
    """The name a take's variant is summarised under."""
    return f"llm={take.get('llm', 'model')} flow={take.get('flow', 'model')} preset={take.get('preset', 'default')}"


def _take(take: Any, which: str) -> dict[str, Any]:
    if not isinstance(take, dict):
        raise UsageError(f"rating: '{which}' must be an object with llm, flow, preset and seed")
    out: dict[str, Any] = {}
    for key in ("llm", "flow", "preset"):
        v = take.get(key, "model" if key != "preset" else "default")
        if not isinstance(v, str) or not 0 < len(v) <= 100:
            raise UsageError(f"rating: {which}.{key} must be a short string, got {v!r}")
        out[key] = v
    seed = take.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise UsageError(f"rating: {which}.seed must be a non-negative integer, got {seed!r}")
    out["seed"] = seed
    settings = take.get("settings") or {}
    if not isinstance(settings, dict) or len(json.dumps(settings)) > 4000:
        raise UsageError(f"rating: {which}.settings must be a small object")
    out["settings"] = settings
    out["variant"] = variant_label(out)
    return out


def append_rating(path: Path, *, text: str, choice: str, a: Any, b: Any) -> dict[str, Any]:
    """Check one rating and append it to ``ratings.jsonl`` (one ``write`` of one line, under a lock,
    so concurrent raters never interleave). Returns the record written."""
    if choice not in CHOICES:
        raise UsageError(f"rating: choice must be one of {', '.join(CHOICES)}, got {choice!r}")
    if not isinstance(text, str) or not text.strip():
        raise UsageError("rating: 'text' (the sentence both takes say) must be a non-empty string")
    ta, tb = _take(a, "a"), _take(b, "b")
    winner = None if choice == "same" else (ta if choice == "a" else tb)["variant"]
    record = {"time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "text_chars": len(text),
              "choice": choice, "a": ta, "b": tb, "winner": winner}
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    path = Path(path)
    with _lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, file_mode())
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    return record


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (``successes`` may be fractional: ties count half)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(path: Path) -> list[dict[str, Any]]:
    """Per variant: comparisons, wins, ties, losses, win rate and its 95 % interval (best first)."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        rows = read_jsonl(path)
    except ValueError as e:
        raise DataError(f"{path} is damaged ({e}); fix or move the bad line") from e
    table: dict[str, dict[str, Any]] = {}
    for r in rows:
        a, b, choice = r.get("a") or {}, r.get("b") or {}, r.get("choice")
        va, vb = variant_label(a), variant_label(b)
        if va == vb or choice not in CHOICES:
            continue  # a take against its own variant says nothing about the variant
        for me, other, won in ((va, vb, choice == "a"), (vb, va, choice == "b")):
            t = table.setdefault(me, {"variant": me, "n": 0, "wins": 0, "ties": 0, "losses": 0})
            t["n"] += 1
            if choice == "same":
                t["ties"] += 1
            elif won:
                t["wins"] += 1
            else:
                t["losses"] += 1
    out = []
    for t in table.values():
        score = t["wins"] + 0.5 * t["ties"]
        lo, hi = wilson(score, t["n"])
        out.append({**t, "win_rate": score / t["n"], "ci95": [lo, hi]})
    return sorted(out, key=lambda t: (-t["win_rate"], t["variant"]))
