"""Small helpers shared by the subcommand modules: flag aliases, progress bars, summaries."""

from __future__ import annotations

import argparse
from typing import Any

from cosytune.console import print_summary, progress

__all__ = ["add_in_out_dirs", "add_settings_args", "flag", "print_summary", "progress"]


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


def add_in_out_dirs(parser: argparse.ArgumentParser | Any, in_aliases: tuple[str, ...], in_help: str,
                    out_aliases: tuple[str, ...], out_help: str, *, out_required: bool = True) -> None:
    """The ``--in_dir`` / ``--out_dir`` folders of a data command, with the seed workflow's names as aliases."""
    flag(parser, "in_dir", *in_aliases, required=True, metavar="DIR", help=in_help)
    flag(parser, "out_dir", *out_aliases, required=out_required, default=None, metavar="DIR", help=out_help)


def add_settings_args(parser: argparse.ArgumentParser | Any, example: str, *, config_of: str | None = None,
                      what: str = "config overrides") -> None:
    """A config-backed command's ``--config YAML`` (when ``config_of`` names its settings class) and
    positional ``key=value`` overrides."""
    if config_of:
        flag(parser, "config", metavar="YAML", default=None, help=f"settings file (keys of {config_of})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"{what}, e.g. {example}")
