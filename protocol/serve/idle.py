"""The idle-reader set: one task waits for every idle tunnel's socket.

Theory of operation
-------------------
A node keeps its Noise tunnel open for days and is idle nearly all of that
time: its map long poll is parked (:class:`~protocol.handler.Park`) and no
request is running.  Its reader would still be a task parked in
``wait_readable``, with its coroutine chain and epoll registration, ~2 KiB per
node.  Instead, a plain-TCP session with nothing to read hands its socket and
its deadline (``inf`` while its long poll is open; the idle timer while the
tunnel has no stream) to :class:`IdleReaders`, and its reader task ends.  The
parked sockets sit in one epoll set (one-shot), their deadlines in a heap; one
task, :meth:`IdleReaders.run`, waits for that set to become readable or the
earliest deadline to pass and starts a new reader for each socket that did
(data, EOF or an error alike) and each session whose deadline passed (which
then acts on its timer: closes an idle tunnel, expires a request body).

One session's reader, as this set sees it::

         park(fd, session, deadline)     epoll reports fd, or deadline passed
    reading ────────────────────▶ parked ──────────────────────────▶ reading
       ▲  (nothing to read)         │            resume_reading(): a new task
       │                            │
       └────────unpark() True───────┘  its deadline moves (the last stream ended,
                                       the session is aborted): the session starts
                                       its reader, or ends, itself
    parked ──server stops──▶ end("server stopped"), shielded

Invariants
----------
* A socket is in ``_sessions`` only while its session has no reader task:
  ``park`` is the reader's last act, and ``run`` or ``unpark`` take it out
  before anybody reads again.  So exactly one party reads a socket at a time.
* The epoll registration stays when a session is taken out (one-shot, armed):
  a late event finds no session and is ignored; the next ``park`` re-arms it
  (``modify``), and only a never-seen socket is ``register``ed.
* A deadline resumes its session only while the park it was given with lasts
  (each park has a number); entries of parks that are over are stale and
  skipped, and dropped when the heap holds twice as many (plus 64) as were live
  at the last sweep.
* When :meth:`IdleReaders.run` ends (the server stops), every session still
  parked is ended, shielded, and the epoll object is closed.

Where epoll does not exist (not Linux), :func:`idle_readers` returns ``None``
and every reader stays a task.
"""

from __future__ import annotations

import heapq
import math
import select
from typing import Final, Protocol

import trio

__all__ = ["IdleReaders", "ParkedReader", "idle_readers"]


class ParkedReader(Protocol):
    """What the set needs of a session whose reader parked
    (:class:`~protocol.serve.session.NoiseSession`)."""

    def resume_reading(self) -> None:
        """Its socket is readable: read on, in a new task."""

    async def end(self, reason: str) -> None:
        """The server stops: end the session (called shielded)."""


class IdleReaders:
    """Sessions whose reader parked, and the one task that waits for all of them
    (see the module docstring)."""

    __slots__ = ("_epoll", "_live_timers", "_scope", "_seq", "_sessions", "_timed", "_timers")

    _EVENTS: Final = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT

    def __init__(self) -> None:
        self._epoll = select.epoll()
        #: fd -> the parked session
        self._sessions: dict[int, ParkedReader] = {}
        #: fd -> the number of its park, for the parked sessions with a timer only: an
        #: idle tunnel (long poll open, no timer) costs one dict entry, no tuple and
        #: number (issue 19, memory).
        self._timed: dict[int, int] = {}
        #: (deadline, park number, fd) of parks with a timer, earliest first; an entry
        #: whose park is over (the session was taken out, or parked again since) is
        #: stale and skipped when it comes due.
        self._timers: list[tuple[float, int, int]] = []
        #: How many of ``_timers`` were live when they were last swept of stale ones.
        self._live_timers = 0
        self._seq = 0  # parks so far
        self._scope: trio.CancelScope | None = None  # run()'s wait, until the earliest timer

    def park(self, fd: int, session: ParkedReader, deadline: float = math.inf) -> None:
        """The reader of ``session`` ends: wait for ``fd`` here instead, and resume
        it at ``deadline`` (``inf``: no timer runs) if no data came by then."""
        self._seq += 1
        self._sessions[fd] = session
        if deadline != math.inf:
            self._timed[fd] = self._seq
        elif self._timed:
            self._untime(fd)
        try:
            self._epoll.modify(fd, self._EVENTS)  # registered before, fired since
        except FileNotFoundError:
            self._epoll.register(fd, self._EVENTS)
        if deadline != math.inf:
            # Stale entries are swept once they outnumber the live ones (as last
            # counted): an idle tunnel's park has no timer (its long poll is open), so
            # a bound by the parked sessions would keep ~2 stale entries per tunnel.
            if len(self._timers) > 2 * self._live_timers + 64:
                self._timers = [t for t in self._timers if self._is_parked(t[2], t[1])]
                heapq.heapify(self._timers)
                self._live_timers = len(self._timers)
            heapq.heappush(self._timers, (deadline, self._seq, fd))
            if self._scope is not None and deadline < self._scope.deadline:
                self._scope.deadline = deadline

    def _is_parked(self, fd: int, park: int) -> bool:
        """Whether the timed park number ``park`` of ``fd`` lasts."""
        return self._timed.get(fd) == park

    def _untime(self, fd: int) -> None:
        """Forget the timer of ``fd``'s park (if it had one); the last one out leaves
        a new empty dict, not one that keeps the table every tunnel's first park grew."""
        if self._timed.pop(fd, None) is not None and not self._timed:
            self._timed = {}

    def _take(self, fd: int) -> ParkedReader | None:
        """Take the session parked on ``fd`` out of the set (``None``: none is)."""
        session = self._sessions.pop(fd, None)
        if session is not None and self._timed:
            self._untime(fd)
        return session

    def _resume_due(self) -> None:
        """Resume every parked session whose timer passed."""
        now, timers = trio.current_time(), self._timers
        while timers and timers[0][0] <= now:
            _, park, fd = heapq.heappop(timers)
            if self._is_parked(fd, park):
                session = self._take(fd)
                assert session is not None
                session.resume_reading()

    def unpark(self, fd: int, session: ParkedReader) -> bool:
        """Take ``session`` out of the set (a timer now concerns it); ``False``
        if it was not parked (its reader runs, or is about to)."""
        if self._sessions.get(fd) is not session:
            return False
        self._take(fd)
        # Still registered (one-shot, armed): a late event finds no session and
        # is ignored; the next park() re-arms it.
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Wake the session of every socket that became readable, until cancelled;
        then end the sessions still parked."""
        task_status.started()
        try:
            while True:
                with trio.CancelScope(deadline=self._timers[0][0] if self._timers else math.inf) as wait:
                    self._scope = wait
                    await trio.lowlevel.wait_readable(self._epoll.fileno())
                self._scope = None
                for fd, _ in self._epoll.poll(0):
                    session = self._take(fd)
                    if session is not None:
                        session.resume_reading()
                self._resume_due()
        finally:
            self._scope = None
            sessions = list(self._sessions.values())
            self._sessions.clear()
            self._timed.clear()
            self._timers.clear()
            with trio.CancelScope(shield=True):
                for session in sessions:
                    await session.end("server stopped")
            self._epoll.close()


def idle_readers() -> IdleReaders | None:
    """Where epoll exists (Linux), the shared waiter for idle readers."""
    return IdleReaders() if hasattr(select, "epoll") else None
