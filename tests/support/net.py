"""Talking to a server over TCP: waiting for its port, reading a connection to its end."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable

import trio

from tests.support.waits import wait_until, wait_until_sync

__all__ = ["read_until_eof", "wait_listening", "wait_until_serving"]


async def _accepts(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return False
    await stream.aclose()
    return True


async def wait_until_serving(port: int, *, seconds: float = 30) -> None:
    """Return once something accepts TCP connections on 127.0.0.1:``port``.

    For a server in another process, which has no event to wait on: polling is the
    honest way.
    """
    await wait_until(lambda: _accepts(port), what=f"127.0.0.1:{port} to accept", seconds=seconds)


def _accepts_sync(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def wait_listening(
    port: int,
    *,
    seconds: float = 30,
    process: subprocess.Popen[bytes] | subprocess.Popen[str] | None = None,
    detail: Callable[[], str] | None = None,
) -> None:
    """:func:`wait_until_serving` for a test outside trio (``process`` exiting fails it)."""
    wait_until_sync(
        lambda: _accepts_sync(port), what=f"127.0.0.1:{port} to accept", seconds=seconds,
        process=process, detail=detail,
    )


async def read_until_eof(stream: trio.abc.ReceiveStream, limit: float = 5) -> bytes:
    """Everything ``stream`` receives until the peer closes it (a reset counts as closed).

    Fails with :class:`trio.TooSlowError` after ``limit`` seconds (of trio's clock, so a
    test on the virtual clock can wait out a server's deadline at no cost).
    """
    out = b""
    with trio.fail_after(limit):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return out
            if not data:
                return out
            out += data
