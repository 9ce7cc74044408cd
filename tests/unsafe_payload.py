"""A crafted torch file whose unpickling runs a command: what the unsafe-file tests feed every loader."""

from __future__ import annotations

import os
from pathlib import Path

import torch


class _Payload:
    """Unpickling this calls ``os.system``, which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_evil(path: Path, marker: Path, wrap: str = "dict") -> Path:
    """A torch file that runs ``touch marker`` when unpickled without ``weights_only``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = _Payload(marker)
    obj = {"w": torch.zeros(2), "x": payload} if wrap == "dict" else payload
    torch.save(obj, path)
    return path
