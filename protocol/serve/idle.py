"""The idle-reader set: one task waits for every idle tunnel's socket.

Theory of operation
-------------------
A node keeps its Noise tunnel open for days and is idle nearly all of that
time: its map long poll is parked (:class:`~protocol.handler.Park`) and no
request is running.  Its reader would still be a task parked in
``wait_readable``, with its coroutine chain and epoll registration, ~2 KiB per
node.  Instead, a plain-TCP session with no timer running hands its socket to
:class:`IdleReaders` and its reader task ends.  The parked sockets sit in one
epoll set (one-shot); one task, :meth:`IdleReaders.run`, waits for that set to
become readable and starts a new reader for each socket that did (data, EOF or
an error alike).

One session's reader, as this set sees it::

              park(fd, session)                 epoll reports fd
    reading ────────────────────▶ parked ──────────────────────────▶ reading
       ▲  (idle, no timer runs)     │            resume_reading(): a new task
       │                            │
       └────────unpark() True───────┘  a timer starts (the last stream ended, the
                                       session is aborted): the session starts
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
* When :meth:`IdleReaders.run` ends (the server stops), every session still
  parked is ended, shielded, and the epoll object is closed.

Where epoll does not exist (not Linux), :func:`idle_readers` returns ``None``
and every reader stays a task.
"""

from __future__ import annotations

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

    __slots__ = ("_epoll", "_sessions")

    _EVENTS: Final = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._sessions: dict[int, ParkedReader] = {}

    def park(self, fd: int, session: ParkedReader) -> None:
        """The reader of ``session`` ends: wait for ``fd`` here instead."""
        self._sessions[fd] = session
        try:
            self._epoll.modify(fd, self._EVENTS)  # registered before, fired since
        except FileNotFoundError:
            self._epoll.register(fd, self._EVENTS)

    def unpark(self, fd: int, session: ParkedReader) -> bool:
        """Take ``session`` out of the set (a timer now concerns it); ``False``
        if it was not parked (its reader runs, or is about to)."""
        if self._sessions.get(fd) is not session:
            return False
        del self._sessions[fd]
        # Still registered (one-shot, armed): a late event finds no session and
        # is ignored; the next park() re-arms it.
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Wake the session of every socket that became readable, until cancelled;
        then end the sessions still parked."""
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(self._epoll.fileno())
                for fd, _ in self._epoll.poll(0):
                    session = self._sessions.pop(fd, None)
                    if session is not None:
                        session.resume_reading()
        finally:
            sessions = list(self._sessions.values())
            self._sessions.clear()
            with trio.CancelScope(shield=True):
                for session in sessions:
                    await session.end("server stopped")
            self._epoll.close()


def idle_readers() -> IdleReaders | None:
    """Where epoll exists (Linux), the shared waiter for idle readers."""
    return IdleReaders() if hasattr(select, "epoll") else None
