"""The OS socket under a trio stream: who is at the other end, and writing to it
without the scheduler (thin trio adapter).

Role in the pipeline: the control port (:mod:`protocol.serve`) and the relay
(:mod:`relay.serve.server`, :mod:`relay.serve.derp_io`) accept TCP connections
that they may wrap in TLS and WebSocket layers. Both need:

* the peer's address under those layers, once as data (the control port's
  per-address connection cap, the relay core's ``(ip, port)`` that mesh
  watchers see) and once for log lines (:func:`peer_address`,
  :func:`peer_name`, :func:`format_address`);
* the *direct-write fast path*: when nobody else is writing a plain TCP
  connection, write the bytes just produced straight to the socket with one
  non-blocking ``write(2)`` (:func:`plain_socket`, :func:`write_nowait`)
  instead of waking a writer task. A small batch (a map delta, a relayed
  packet) usually fits the kernel's send buffer, so it costs one system call
  and no trip through trio's scheduler; what the kernel does not take goes to
  the caller's blocking path, in order, before anything else.

Why writing a trio-owned socket directly is safe: trio's sockets are
non-blocking, so ``write(2)`` returns at once (taking part of the bytes, or
none: ``EAGAIN``); trio keeps no send buffer of its own for a plain
``SocketStream``, so bytes written beside it cannot overtake any; and the
callers guarantee one writer at a time (the control port's send lock, the
relay's ``busy`` flag), so bytes never interleave. TLS and WebSocket streams
hold bytes the socket does not show, so :func:`plain_socket` refuses them.

Invariants:

* Never raises: a socket that is already gone (``getpeername`` fails) or that
  has no IP address (a Unix socket pair in tests) has no peer address
  (``None``, or ``"?"`` in logs).
* Only the layers named here are looked through (TLS, WebSocket); any other
  wrapper hides the socket, which is the safe answer for a helper that only
  informs.
"""

from __future__ import annotations

import os

import trio

from .wsstream import WebSocketStream

__all__ = ["format_address", "peer_address", "peer_name", "plain_socket", "write_nowait"]


def peer_address(stream: trio.abc.Stream) -> tuple[str, int] | None:
    """The peer's ``(ip, port)`` under any TLS and WebSocket layers; ``None`` if unknown.

    An IPv6 address keeps its scope (``fe80::1%eth0``), as ``getpeername``
    gives it; the flow and scope numbers of the IPv6 tuple are dropped.
    """
    inner: object = stream
    while isinstance(inner, trio.SSLStream | WebSocketStream):
        inner = inner.transport_stream
    if not isinstance(inner, trio.SocketStream):
        return None
    try:
        name = inner.socket.getpeername()
    except OSError:
        return None
    if isinstance(name, tuple) and len(name) >= 2:
        return str(name[0]), int(name[1])
    return None


def format_address(address: tuple[str, int] | None) -> str:
    """``ip:port`` for log lines; ``"?"`` for an unknown address.

    IPv6 addresses are not bracketed: the control port derives a request's
    ``remote_addr`` by cutting at the last colon, and log readers know the form.
    """
    return "?" if address is None else f"{address[0]}:{address[1]}"


def peer_name(stream: trio.abc.Stream) -> str:
    """``ip:port`` of the peer for log lines (see :func:`peer_address`), ``"?"`` if unknown."""
    return format_address(peer_address(stream))


def plain_socket(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket of a plain TCP stream, which may be read and written directly.

    ``None`` for any other stream: TLS and WebSocket layers hold bytes (records,
    frames) that the socket does not show, so writing under them would corrupt the
    stream. The socket's ``fileno()`` is ``-1`` once it is closed.
    """
    return stream.socket if isinstance(stream, trio.SocketStream) else None


def write_nowait(fd: int, data: bytes) -> memoryview | None:
    """Write as much of ``data`` as the socket's send buffer takes now, without blocking.

    Args:
        fd: A non-blocking socket's file descriptor (from :func:`plain_socket`);
            the caller guarantees that nobody else writes it meanwhile.
        data: The bytes to write, in order after everything written before.

    Returns:
        ``None`` when all of ``data`` was written, else the rest (all of it when the
        buffer was full), which the caller must write next, before anything else.

    Raises:
        OSError: The connection failed (reset, or closed by the peer); nothing more
            can be written.
    """
    try:
        sent = os.write(fd, data)
    except BlockingIOError:
        sent = 0
    return None if sent == len(data) else memoryview(data)[sent:]
