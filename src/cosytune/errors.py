"""Error hierarchy. Every message says what was expected, what was found and what to do.

The CLI catches :class:`CosytuneError` and prints its message without a traceback
(exit code 1, or 2 for :class:`UsageError`/:class:`ConfigError`); ``--debug`` shows the traceback.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Items an error message lists before it says how many more there are.
MAX_LISTED = 20


def listing(items: Iterable[object], limit: int = MAX_LISTED, sep: str = ", ") -> str:
    """The first ``limit`` items joined by ``sep``, then how many more there are (for error messages)."""
    items = [str(i) for i in items]
    more = f"{sep if sep.isspace() else ' '}… and {len(items) - limit} more" if len(items) > limit else ""
    return sep.join(items[:limit]) + more


class CosytuneError(Exception):
    """Base class for errors that are shown to the user as a plain message."""

    exit_code = 1


class UsageError(CosytuneError):
    """A command line that cannot be run as given (missing or conflicting flags)."""

    exit_code = 2


class ConfigError(CosytuneError):
    """A config file or override with unknown keys or bad values; lists every problem."""

    exit_code = 2

    def __init__(self, problems: list[str] | str, source: str = "config") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n{lines}")


class DataError(CosytuneError):
    """Input data that cannot be used (missing files, inconsistent dataset dirs, no usable audio)."""


class CheckpointError(CosytuneError):
    """A weight file whose keys or shapes do not match the model, or that cannot be read."""


class ModelDirError(CosytuneError):
    """A model directory with missing or malformed files."""


class BusyError(CosytuneError):
    """A folder another cosytune process is working in (its lock is held); the message names the holder."""


class MissingDependencyError(CosytuneError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency or raise :class:`MissingDependencyError` with an install hint.

    Args:
        module: importable module name, e.g. ``"faster_whisper"``.
        extra: the cosytune extra that provides it, e.g. ``"asr"``.
        purpose: what it is needed for, shown in the message.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"{purpose} needs the Python package '{module}', which is not installed ({e}). "
            f"Install it with: pip install 'cosytune[{extra}]'"
        ) from e
