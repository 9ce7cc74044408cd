"""The device gate (launches shared, CUDA graph captures exclusive) and the dtype resolution of the defaults."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from cosytune.errors import UsageError
from cosytune.infer.fast import DeviceGate
from cosytune.infer.synthesizer import resolve_dtype


def test_exclusive_waits_for_every_shared_holder_and_keeps_new_ones_out():
    gate = DeviceGate()
    inside: list[str] = []
    holding = threading.Event()
    release = threading.Event()

    def launcher() -> None:
        with gate.shared():
            inside.append("shared-in")
            holding.set()
            release.wait(5)
            inside.append("shared-out")

    def capturer() -> None:
        with gate.exclusive():
            inside.append("exclusive")

    a = threading.Thread(target=launcher)
    a.start()
    holding.wait(5)
    b = threading.Thread(target=capturer)
    b.start()
    time.sleep(0.1)
    assert inside == ["shared-in"]  # the capture waits while a launcher is inside
    late: list[str] = []

    def late_launcher() -> None:
        with gate.shared():
            late.append(inside[-1])

    c = threading.Thread(target=late_launcher)
    c.start()
    time.sleep(0.1)
    assert late == []  # a waiting capture goes first: new launchers queue behind it
    release.set()
    for t in (a, b, c):
        t.join(5)
    assert inside == ["shared-in", "shared-out", "exclusive"] and late == ["exclusive"]
    assert gate.exclusive_count == 1


def test_a_shared_holder_can_capture_and_two_upgrades_do_not_deadlock():
    gate = DeviceGate()
    barrier = threading.Barrier(2)
    done: list[int] = []

    def work(k: int) -> None:
        with gate.shared():
            barrier.wait(5)  # both hold the gate shared before either upgrades
            # re-entrant shared, then an upgrade, then launching inside one's own capture
            with gate.shared(), gate.exclusive(), gate.shared():
                done.append(k)
            done.append(10 + k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert sorted(done) == [0, 1, 10, 11] and gate.exclusive_count == 2
    with gate.exclusive():  # and the gate is free again afterwards
        pass


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype(None, "cpu") is torch.float32
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    assert resolve_dtype("float16", "cuda") is torch.float16
    assert resolve_dtype(torch.float32, "cuda") is torch.float32
    expected = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    assert resolve_dtype("auto", "cuda") is expected
    with pytest.raises(UsageError, match="dtype must be one of auto"):
        resolve_dtype("int8", "cpu")
