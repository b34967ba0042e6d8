"""Garbage collection for a server whose heap is large and mostly permanent.

A server with thousands of connected nodes holds hundreds of thousands of
container objects that live as long as the process (connections, peer views,
the compiled policy). CPython's oldest-generation collection walks all of them:
~0.4 s at 2,000 nodes, and it starts on its own whenever the old generation grew
by a quarter, which a policy change does. That pause lands in the middle of a
fan-out and delays every stream behind it.

So the process moves what survived into the permanent generation
(:func:`gc.freeze`), which collections do not scan, and repeats that every
``interval`` seconds for what survived since; automatic collections then only
look at young objects. Reference counting still frees frozen objects as usual;
only garbage *cycles* among frozen objects would wait, so every
``full_interval`` seconds everything is unfrozen and collected once (one
full-heap pause, by design at a time of our choosing, then frozen again).

Each step also asks glibc to return free pages (``malloc_trim``): after a
connect storm's full maps the allocator would otherwise keep tens of MiB.

This is a property of the process, not of the library: :func:`cli.server.run_server`
runs it; tests that embed a :class:`~cli.server.Server` leave the interpreter alone.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import time
from collections.abc import Callable
from typing import Final

import trio

__all__ = ["manage_gc"]

log = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` on another C library."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_TRIM: Final = _malloc_trim()


def _freeze_survivors(*, full: bool) -> tuple[int, float]:
    """Collect (everything when ``full``), then freeze the survivors.

    Returns:
        (objects collected, seconds the collection took).
    """
    start = time.perf_counter()
    if full:
        gc.unfreeze()
    found = gc.collect()
    gc.freeze()
    if _TRIM is not None:
        # Hand the pages freed since (a connect storm's full maps) back to the
        # system: glibc keeps them otherwise, and idle RSS would depend on the
        # largest burst the process ever saw.
        _TRIM(0)
    return found, time.perf_counter() - start


async def manage_gc(
    *,
    interval: float = 10.0,
    full_interval: float = 3600.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Freeze the heap now and every ``interval`` s; unfreeze and collect all every ``full_interval`` s."""
    found, took = _freeze_survivors(full=True)
    log.debug("gc: froze %d objects (%d collected in %.3f s)", gc.get_freeze_count(), found, took)
    task_status.started()
    last_full = trio.current_time()
    while True:
        await trio.sleep(interval)
        full = trio.current_time() - last_full >= full_interval
        found, took = _freeze_survivors(full=full)
        if full:
            last_full = trio.current_time()
            log.info("gc: full collection freed %d cycles in %.3f s", found, took)
        log.debug("gc: %d objects frozen", gc.get_freeze_count())
