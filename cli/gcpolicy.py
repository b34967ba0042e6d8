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
connect storm's full maps the allocator would otherwise keep tens of MiB. A burst
(a connect storm, a policy fan-out) frees most of what it allocated only when it
ends, which may be just after a step; so between steps the process also trims
once a burst is over: when it did real work since the last trim (``trim_work``
seconds of CPU) and the last ``trim_interval`` was quiet. An idle process never
trims (nothing to give back), a busy one does not give pages back that it would
fault in again at once, and idle memory does not depend on when the last step ran.

Large buffers (a full map's JSON and its compressed frames, a policy compile's
tables) are not left to glibc's default either: above ``M_MMAP_THRESHOLD`` (128 KiB at
start) glibc gives a buffer its own mapping, returned to the system when freed, but it
raises that threshold to the size of every such buffer freed (up to 32 MiB). After the
first full maps, the next ones are carved from the heap between long-lived objects,
and the holes they leave stay resident. :func:`set_mmap_threshold` fixes the threshold
(``tuning.malloc_mmap_threshold``), which turns that growth off: at 5,000 corp nodes the
server held 0.8 KiB per idle node less (19.1-19.8 KiB with a fixed threshold of 64 KiB
to 4 MiB, 20.4 with glibc's; issue 19). The default, 4 MiB, is above the buffers each
stream of a reconnect herd has of its own (a full map of 10,000 peers is 1.3 MB
compressed, and the frames and sealed records made of it as large): below them,
every such buffer is mapped, faulted in page by page and unmapped, once per stream;
with 64 KiB, reconnecting 10,000 flat nodes took 124 s of server CPU instead of 74 s
(2.5 minutes of system time instead of one).

This is a property of the process, not of the library: :func:`cli.server.run_server`
runs it; tests that embed a server (:func:`~cli.server.open_server`) leave the interpreter alone.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import time
from collections.abc import Callable
from typing import Final

import trio

__all__ = ["MMAP_THRESHOLD_MAX", "manage_gc", "set_mmap_threshold"]

log = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` on another C library."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_TRIM: Final = _malloc_trim()

#: glibc's ``M_MMAP_THRESHOLD`` parameter number, and the largest value it accepts
#: (``HEAP_MAX_SIZE / 2`` on 64-bit).
_M_MMAP_THRESHOLD: Final = -3
MMAP_THRESHOLD_MAX: Final = 32 * 1024 * 1024


def set_mmap_threshold(size: int) -> bool:
    """Give every allocation of ``size`` bytes or more its own mapping, freed to the
    system with it, and keep that threshold fixed (glibc ``mallopt``; see the module
    docstring). Returns whether it took effect (False on another C library)."""
    if not 0 < size <= MMAP_THRESHOLD_MAX:
        raise ValueError(f"mmap threshold {size} is not in 1..{MMAP_THRESHOLD_MAX}")
    try:
        mallopt: Callable[[int, int], int] = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, size))


def _trim() -> None:
    if _TRIM is not None:
        _TRIM(0)


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
    # Hand the pages freed since (a connect storm's full maps) back to the system:
    # glibc keeps them otherwise, and idle RSS would depend on the largest burst
    # the process ever saw.
    _trim()
    return found, time.perf_counter() - start


async def manage_gc(
    *,
    interval: float = 10.0,
    full_interval: float = 3600.0,
    trim_interval: float = 1.0,
    trim_work: float = 0.05,
    cpu_time: Callable[[], float] = time.process_time,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Freeze the heap now and every ``interval`` s; unfreeze and collect all every
    ``full_interval`` s; in between, trim after a burst (see the module docstring).

    ``cpu_time`` is the process's CPU clock in seconds (what tells work from quiet);
    a test passes its own to say exactly how busy each tick was."""
    found, took = _freeze_survivors(full=True)
    if log.isEnabledFor(logging.DEBUG):  # get_freeze_count() walks every frozen object
        log.debug("gc: froze %d objects (%d collected in %.3f s)", gc.get_freeze_count(), found, took)
    task_status.started()
    last_full = last_step = trio.current_time()
    cpu_at_trim = cpu_at_tick = cpu_time()
    while True:
        await trio.sleep(min(trim_interval, interval))
        now, cpu = trio.current_time(), cpu_time()
        if now - last_step >= interval:
            full = now - last_full >= full_interval
            found, took = _freeze_survivors(full=full)
            last_step = now
            if full:
                last_full = now
                log.info("gc: full collection freed %d cycles in %.3f s", found, took)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("gc: %d objects frozen", gc.get_freeze_count())
            cpu_at_trim = cpu_time()
        elif cpu - cpu_at_trim >= trim_work and cpu - cpu_at_tick < 0.2 * trim_interval:
            _trim()
            cpu_at_trim = cpu_time()
        cpu_at_tick = cpu_time()
