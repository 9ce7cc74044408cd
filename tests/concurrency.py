"""Run one function on several threads released together (the concurrency tests' common harness)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any


def run_together(fn: Callable[..., Any], args: Sequence[tuple], timeout: float = 600.0) -> dict[tuple, Any]:
    """``{a: fn(*a)}`` for every ``a`` in ``args``, each on its own thread, all started at one barrier.

    Raises AssertionError listing every thread's exception (with its arguments) when any failed.
    """
    got: dict[tuple, Any] = {}
    errors: list[tuple[tuple, BaseException]] = []
    start = threading.Barrier(len(args))

    def work(a: tuple) -> None:
        try:
            start.wait()
            got[a] = fn(*a)
        except BaseException as e:  # noqa: BLE001 - reported below, with the thread's arguments
            errors.append((a, e))

    threads = [threading.Thread(target=work, args=(a,)) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not errors, errors[:3]
    return got
