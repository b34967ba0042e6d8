"""The server process keeps its long-lived heap out of collections, and still
collects cycles (young ones at every step, frozen ones at the full step)."""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import weakref
from collections.abc import Iterator

import pytest
import trio

from cli import gcpolicy
from cli.gcpolicy import manage_gc
from cli.spawn import child_env


class _Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture(autouse=True)
def _unfreeze_after() -> Iterator[None]:
    yield
    gc.unfreeze()


def _cycle() -> weakref.ref[_Cycle]:
    obj = _Cycle()
    return weakref.ref(obj)


async def test_freezes_then_collects_young_and_later_frozen_cycles(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Virtual time: the policy's steps fall at exact instants, however loaded the
    # machine is, and the test takes no wall-clock time.
    gc.unfreeze()
    kept = [_Cycle() for _ in range(10)]  # alive: frozen, never freed
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: manage_gc(interval=0.2, full_interval=1.0, task_status=task_status))
        assert gc.get_freeze_count() > 0
        frozen_before = gc.get_freeze_count()
        # A cycle that became garbage while frozen is only collected by the full step.
        old = kept.pop()
        old_ref = weakref.ref(old)
        del old
        # A young cycle goes at the next step (as it would without the policy).
        young = _cycle()
        await trio.sleep(0.5)
        assert young() is None
        assert old_ref() is not None, "a frozen cycle was scanned before the full step"
        await trio.sleep(1.0)
        assert old_ref() is None
        assert gc.get_freeze_count() > 0 and abs(gc.get_freeze_count() - frozen_before) < frozen_before
        nursery.cancel_scope.cancel()
    assert all(k.me is k for k in kept)


class _CpuClock:
    """The process's CPU clock as the policy sees it, moved by the test: how busy each
    tick was is what the test says, not what a loaded machine makes of it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def burn(self, seconds: float) -> None:
        self.now += seconds


async def test_trims_once_a_burst_is_over_and_not_while_idle_or_busy(
    monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock
) -> None:
    # Virtual time and virtual CPU time, both moved by hand one tick at a time: the
    # policy's decisions depend only on the work the test says it did.
    trims: list[float] = []
    monkeypatch.setattr(gcpolicy, "_trim", lambda: trims.append(trio.current_time()))
    cpu = _CpuClock()

    async def tick() -> None:
        mock_clock.jump(0.2)
        await trio.testing.wait_all_tasks_blocked()  # the policy's step has run

    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: manage_gc(
            interval=3600.0, trim_interval=0.2, trim_work=0.05, cpu_time=cpu, task_status=task_status
        ))
        await trio.testing.wait_all_tasks_blocked()
        trims.clear()  # the first step trims
        for _ in range(5):
            cpu.burn(0.001)  # a little housekeeping: not a burst
            await tick()
        assert trims == [], "an idle process trimmed"
        for _ in range(4):
            cpu.burn(0.1)  # busy through several ticks
            await tick()
        assert trims == [], "a busy process trimmed"
        await tick()  # the first quiet tick after the burst
        assert trims == [trio.current_time()], "not trimmed once the burst was over"
        for _ in range(3):
            await tick()
        assert len(trims) == 1, "trimmed again with nothing done since"
        nursery.cancel_scope.cancel()


async def test_steps_do_not_count_the_frozen_objects_unless_debug_logging_is_on(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # gc.get_freeze_count() walks every frozen object (millions in a server or a
    # load-generator worker): it is only for a debug line, so it runs only when that
    # line is written.
    counted: list[int] = []
    real = gc.get_freeze_count

    def counting() -> int:
        counted.append(1)
        return real()

    monkeypatch.setattr(gc, "get_freeze_count", counting)
    for level, expect_counts in ((logging.INFO, False), (logging.DEBUG, True)):
        counted.clear()
        caplog.set_level(level, logger=gcpolicy.log.name)
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: manage_gc(interval=0.2, full_interval=100.0, task_status=task_status))
            await trio.sleep(1.0)  # five steps
            nursery.cancel_scope.cancel()
        assert bool(counted) is expect_counts, level


# Run in a child: the threshold is the whole process's, and it cannot be given back to
# glibc's dynamic default once set.
_MMAP_PROBE = """
import ctypes, sys
from cli.gcpolicy import set_mmap_threshold

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
if not hasattr(libc, "mallinfo2"):
    print("skip"); sys.exit()
libc.mallinfo2.restype = Info
if sys.argv[1] == "fixed":
    assert set_mmap_threshold(64 * 1024)
# A 1 MiB buffer freed: glibc's default would now raise its threshold to 1 MiB.
big = bytes(1 << 20)
del big
before = libc.mallinfo2().hblks
held = bytes(96 * 1024)
print(libc.mallinfo2().hblks - before)
"""


@pytest.mark.parametrize(("how", "mapped"), [("fixed", "1"), ("default", "0")])
def test_a_fixed_mmap_threshold_gives_large_buffers_their_own_mapping(how: str, mapped: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _MMAP_PROBE, how], capture_output=True, text=True, check=True,
        env=child_env({k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}),
    ).stdout.strip()
    if out == "skip":
        pytest.skip("not glibc 2.33+")
    # Fixed, a 96 KiB buffer is mapped on its own (and unmapped when freed) however
    # large the buffers freed before; by default it would be carved from the heap.
    assert out == mapped


def test_the_mmap_threshold_is_checked() -> None:
    with pytest.raises(ValueError, match="mmap threshold"):
        gcpolicy.set_mmap_threshold(0)
