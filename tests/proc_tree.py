"""Interrupting a ``torchrun`` job in tests the way a crash or a power cut does: every process at once.

torchrun starts its workers in sessions of their own, so killing the launcher (or its process group) leaves
them running; :func:`kill_tree` kills the launcher and every descendant, found through ``/proc``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every living descendant of ``pid`` (Linux ``/proc``)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc) -> None:
    """SIGKILL the ``subprocess.Popen`` ``proc`` and all its descendants, then reap ``proc``."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
