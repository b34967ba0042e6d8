"""Waiting for something that has no event to wait on: polling with a deadline.

The test house has three ways to wait, and this module is the last resort:

* a timer of our own code, in this process: trio's virtual clock (the
  ``autojump_clock`` or ``mock_clock`` fixture of pytest-trio), so the test takes no
  wall time and cannot be late on a loaded machine;
* another task of the test's own process: :func:`trio.testing.wait_all_tasks_blocked`,
  or an event the code under test sets;
* everything else -- a server in another process, the file it writes, a counter a
  worker thread moves, the kernel delivering a datagram -- has nothing to wait on, so
  it is polled here: the condition is read every :data:`INTERVAL` seconds until it
  holds, and a test that waits too long fails saying what it waited for.

The deadlines are generous on purpose (a loaded 2-core machine is slow, not wrong):
they decide only how long a broken build takes to fail, never whether a working one
passes.  Nothing here asserts on durations.
"""

from __future__ import annotations

import inspect
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast, overload

import trio

__all__ = ["INTERVAL", "wait_until", "wait_until_sync"]

T = TypeVar("T")

#: How often a condition is read again.
INTERVAL = 0.02


def _late(what: str, seconds: float, detail: Callable[[], str] | None) -> AssertionError:
    more = f"\n{detail()}" if detail is not None else ""
    return AssertionError(f"waited {seconds} s for {what}{more}")


@overload
async def wait_until(
    condition: Callable[[], Awaitable[T | None]],
    *,
    what: str = "the condition",
    seconds: float = ...,
    detail: Callable[[], str] | None = ...,
) -> T: ...


@overload
async def wait_until(
    condition: Callable[[], T | None],
    *,
    what: str = "the condition",
    seconds: float = ...,
    detail: Callable[[], str] | None = ...,
) -> T: ...


async def wait_until(
    condition: Callable[[], object],
    *,
    what: str = "the condition",
    seconds: float = 10,
    detail: Callable[[], str] | None = None,
) -> T:
    """Return the first true value of ``condition`` (called, and awaited if it is async).

    Polls every :data:`INTERVAL` seconds of *wall* time, under any trio clock: the
    pause is spent in a worker thread and the deadline read from
    :func:`time.monotonic`, so a virtual clock neither cuts the wait short (autojump)
    nor stops it (a ``mock_clock`` nobody moves).  Meanwhile the other tasks run, and
    an autojump clock may move to their next timer.

    Raises:
        AssertionError: ``seconds`` passed first; names ``what`` and adds ``detail()``.
    """
    deadline = time.monotonic() + seconds
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return cast(T, result)
        if time.monotonic() > deadline:
            raise _late(what, seconds, detail)
        await trio.to_thread.run_sync(time.sleep, INTERVAL)


def wait_until_sync(
    condition: Callable[[], T | None],
    *,
    what: str = "the condition",
    seconds: float = 30,
    process: subprocess.Popen[bytes] | subprocess.Popen[str] | None = None,
    detail: Callable[[], str] | None = None,
) -> T:
    """Return the first true value of ``condition``, for a test outside trio.

    With ``process``, a process that exits meanwhile fails the wait at once (it will
    not bring the condition any more).

    Raises:
        AssertionError: ``seconds`` passed or ``process`` exited first; names ``what``
            and adds ``detail()`` (a log's tail, say).
    """
    deadline = time.monotonic() + seconds
    while True:
        result = condition()
        if result:
            return result
        if process is not None and process.poll() is not None:
            more = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"the process exited ({process.returncode}) before {what}{more}")
        if time.monotonic() > deadline:
            raise _late(what, seconds, detail)
        time.sleep(INTERVAL)
