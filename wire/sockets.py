"""The OS socket under a trio stream: who is at the other end (thin trio adapter).

Role in the pipeline: the control port (:mod:`protocol.serve`) and the relay
(:mod:`relay.serve.server`) accept TCP connections that they may wrap in TLS
and WebSocket layers. Both need the peer's address under those layers, once
as data (the control port's per-address connection cap, the relay core's
``(ip, port)`` that mesh watchers see) and once for log lines.

Invariants:

* Never raises: a socket that is already gone (``getpeername`` fails) or that
  has no IP address (a Unix socket pair in tests) has no peer address
  (``None``, or ``"?"`` in logs).
* Only the layers named here are looked through (TLS, WebSocket); any other
  wrapper hides the socket, which is the safe answer for a helper that only
  informs.
"""

from __future__ import annotations

import trio

from .wsstream import WebSocketStream

__all__ = ["format_address", "peer_address", "peer_name"]


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
