"""run.json: what a synthesis run did, so it can be repeated and compared — without the user's text.

Layout (one JSON object, written atomically beside the audio)::

    {
      "cosytune_version", "created_utc", "command",
      "settings":  every CLI setting (paths, mode, sampling, speed, seed, strategy, device, dtype ...);
                   with --text the text itself is replaced by {"sha256", "chars"} (the seed workflow's
                   privacy rule); --prompt_text is stored the same way,
      "seed":      the seed actually used (drawn when none was given),
      "model_files": {"cosyvoice3.yaml"|"llm"|"flow"|"hift"|"spk2info.pt": {"path", "sha256", "swapped"}},
      "outputs":   [{"path", "samples", "seconds"}...],
      "timings":   {"load_s", "llm_s", "flow_s", "hift_s", "total_s", "audio_s", "rtf", "first_chunk_s"?},
      "request":   mode, token counts, speaker source, sampling, llm_decoder ("graph": preallocated cache +
                   CUDA-graph step, "static": the same step run eagerly, "reference": per-request cache;
                   infer-batch lists the ones used) ... (no raw text),
      "environment": python, torch, device, dtype
    }
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cosytune.fileio import write_json

__all__ = ["PRIVATE_SETTINGS", "redact_text", "write_run_json"]

#: Settings whose values are user text and are stored only as a hash and a length.
PRIVATE_SETTINGS = ("text", "prompt_text")


def redact_text(value: str | None) -> dict[str, Any] | None:
    """``{"sha256", "chars"}`` of a text (None stays None)."""
    if value is None:
        return None
    return {"sha256": hashlib.sha256(value.encode("utf-8")).hexdigest(), "chars": len(value)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):  # NaN is not JSON
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_run_json(path: str | os.PathLike, *, settings: dict[str, Any], seed: int | list[int] | None,
                   model_files: dict[str, Any], outputs: list[dict[str, Any]], timings: dict[str, Any],
                   request: dict[str, Any], device: str, dtype: str, command: str = "infer") -> Path:
    """Write run.json atomically; text-valued settings are redacted (see :data:`PRIVATE_SETTINGS`).

    Args:
        path: the file to write.
        settings: the command's settings (raw; this function redacts).
        seed: the seed(s) used.
        model_files: from ``Synthesizer.model_files``.
        outputs: audio files written.
        timings: seconds and ratios.
        request: ``SynthesisResult.info`` (already free of raw text).
        device, dtype: where it ran.
        command: ``infer`` or ``infer-batch``.

    Returns:
        The path written.
    """
    import torch

    from cosytune import __version__

    clean = dict(settings)
    for key in PRIVATE_SETTINGS:
        if key in clean and isinstance(clean[key], str):
            clean[key] = redact_text(clean[key])
    data = {
        "cosytune_version": __version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "settings": _jsonable(clean),
        "seed": seed,
        "model_files": _jsonable(model_files),
        "outputs": _jsonable(outputs),
        "timings": _jsonable(timings),
        "request": _jsonable(request),
        "environment": {"python": sys.version.split()[0], "platform": platform.platform(),
                        "torch": torch.__version__, "device": device, "dtype": dtype},
    }
    path = Path(path)
    write_json(path, data)
    return path
