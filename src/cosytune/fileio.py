"""Atomic file writes and small JSON/JSONL helpers.

Every file cosytune produces is written to a temporary sibling and renamed into place, so an
interrupted run never leaves a half-written file that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: The process umask, read once at import (reading it means setting it, which is not thread-safe).
_UMASK = _read_umask()


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0o666 less the umask (0o644 under 022)."""
    return 0o666 & ~_UMASK


def dir_mode() -> int:
    """The mode ``mkdir`` would give a new folder: 0o777 less the umask."""
    return 0o777 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    The temporary name keeps the final suffix (so writers that infer the format from the
    extension, like soundfile, still work). The file gets the mode the user's umask gives new
    files (0644 under 022), not mkstemp's 0600. On error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:40]}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.fchmod(fd, file_mode())  # mkstemp makes it 0600; the result must be readable as any new file would be
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file for writing; it replaces ``path`` only when the block succeeds."""
    if "b" in mode:
        encoding = None
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write UTF-8 text."""
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Atomically write JSON (UTF-8, non-ASCII kept readable)."""
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Atomically write one JSON object per line; returns the row count."""
    n = 0
    with atomic_open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_json_or(path: str | os.PathLike, default: Any = None) -> Any:
    """The JSON object in a file we wrote (a state, a cache, a record), or ``default`` when the file is
    missing, unreadable or not a JSON object: such files are rebuilt, never trusted half-read."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default
    return obj if isinstance(obj, dict) else default


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; a malformed line raises ``ValueError`` naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg}); fix or delete that line") from e
    return rows


def read_user_text(path: str | os.PathLike, what: str = "text file") -> str:
    """Read a text file a person wrote, in the encodings their editors save: UTF-8 (with or without BOM),
    UTF-16/32 with a BOM (Windows Notepad's "Unicode"), or GBK/GB18030 (Chinese Windows' "ANSI").

    A file in another encoding gets a :class:`~cosytune.errors.DataError` that says how to convert it,
    never a ``UnicodeDecodeError`` traceback. GB18030 is accepted only when the result holds CJK text, and
    a warning says which encoding was assumed.
    """
    import logging

    from cosytune.errors import DataError

    raw = Path(path).read_bytes()
    for bom, enc in ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
                     (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if raw.startswith(bom):
            try:
                return raw.decode(enc)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: the {what} starts like {enc.upper()} but is not valid {enc.upper()} "
                                f"({e.reason} at byte {e.start}); save it again as UTF-8") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as utf8_error:
        try:
            text = raw.decode("gb18030")
        except UnicodeDecodeError:
            text = ""
        if any("\u4e00" <= ch <= "\u9fff" for ch in text):
            logging.getLogger(__name__).warning(
                "%s is not UTF-8; read it as GBK/GB18030 (Chinese Windows' default). Save it as UTF-8 to be sure",
                path)
            return text
        raise DataError(
            f"{path}: the {what} is not UTF-8 (invalid byte {raw[utf8_error.start]:#04x} at byte {utf8_error.start}) "
            "and not GBK or UTF-16 either. Save it as UTF-8 (e.g. `iconv -f <its encoding> -t UTF-8 in > out`, "
            "or \"Save as… UTF-8\" in your editor)"
        ) from None


def file_identity(path: str | os.PathLike) -> list[int] | None:
    """``[size, mtime_ns]`` of a file, None if it is absent: cheap, and changed by any rewrite or truncation."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-serialisable object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


LOCK_NAME = ".cosytune.lock"


@contextlib.contextmanager
def exclusive_lock(directory: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` (an ``flock`` on ``directory/.cosytune.lock``) for the block.

    A second process that asks for the same lock fails at once with a
    :class:`~cosytune.errors.BusyError` naming the holder (pid, host, command, start time), instead of
    both writing into the same files. The lock goes with the process, so a killed run leaves nothing to
    clean up; the file stays and describes the last holder.

    Args:
        directory: the folder to lock (created if absent).
        what: how the folder is named in the message, e.g. ``"work dir"``.
    """
    import fcntl
    import socket
    import sys
    import time

    from cosytune.errors import BusyError

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 65536, 0).decode("utf-8") or "{}")
            except ValueError:
                holder = {}
            who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, `{holder.get('command', '?')}`, "
                   f"since {holder.get('since', '?')}")
            raise BusyError(
                f"{what} {directory} is in use by another cosytune process ({who}). Two runs in one folder would "
                "overwrite each other's files: wait for that one to finish (or stop it), or use another folder"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:500],
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        yield path
    finally:
        os.close(fd)

