"""Small helpers shared by the subcommand modules: flag aliases, progress bars, summaries."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping
from typing import Any


def flag(parser: argparse.ArgumentParser | Any, name: str, *aliases: str, **kwargs: Any) -> argparse.Action:
    """Add ``--name`` (snake_case, the seed workflow's spelling), its kebab-case twin and aliases."""
    opts = [f"--{name}"]
    kebab = f"--{name.replace('_', '-')}"
    if kebab not in opts:
        opts.append(kebab)
    for a in aliases:
        a = a if a.startswith("-") else f"--{a}"
        if a not in opts:
            opts.append(a)
    kwargs.setdefault("dest", name)
    return parser.add_argument(*opts, **kwargs)


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", enabled: bool = True):
    """A tqdm progress bar on stderr (disabled when not wanted or not on rank 0)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                unit="file" if desc else "it", leave=False)


def print_summary(title: str, items: Mapping[str, Any] | list[tuple[str, Any]]) -> None:
    """Print the closing summary of a command on stdout: a title and aligned key/value lines."""
    pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
    width = max((len(k) for k, _ in pairs), default=0)
    print(f"== {title}")
    for k, v in pairs:
        print(f"  {k.ljust(width)}  {v}")
