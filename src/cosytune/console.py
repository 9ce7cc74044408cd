"""What every command shows on the console: a progress bar on stderr and a closing summary on stdout.

Library entry points (the data commands, training, synthesis) and ``cosytune run`` use these, so a
stage run by the pipeline looks the same as the standalone command.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", enabled: bool = True,
             unit: str | None = None):
    """A tqdm progress bar on stderr (disabled when not wanted or not on rank 0)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                unit=unit or ("file" if desc else "it"), leave=False)


def print_summary(title: str, items: Mapping[str, Any] | list[tuple[str, Any]]) -> None:
    """Print the closing summary of a command on stdout: a title and aligned key/value lines."""
    pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
    width = max((len(k) for k, _ in pairs), default=0)
    print(f"== {title}")
    for k, v in pairs:
        print(f"  {k.ljust(width)}  {v}")
