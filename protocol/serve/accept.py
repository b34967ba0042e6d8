"""The accept loop: connections in, and the connection caps.

Theory of operation
-------------------
One :func:`accept_loop` task runs per listening socket.  Each accepted socket
is either admitted, counted in :class:`Admission` and handed to the server's
``handle_stream`` in the connection nursery, or refused and closed before a
byte is read::

    listener.accept() ──OSError EMFILE/ENFILE/ENOMEM/ENOBUFS──▶ log, sleep 100 ms, retry
          │                          (any other OSError ends the loop: the server stops)
          ▼
    Admission.admit(peer_address)   (wire.sockets)
          ├─ refused "max_connections" ─────────────┐
          ├─ refused "max_connections_per_address" ─┴─▶ stats.refused[reason] += 1,
          │                                             aclose (shielded)
          ▼
    Admitted ──▶ nursery.start_soon(handle_stream, stream, admitted)
                    ...
                 connection closes ──▶ Admitted.release()   (exactly once)

The per-address cap counts an IPv4 address, or an IPv6 /64 (one customer's
prefix); IPv4-mapped IPv6 addresses count as their IPv4 address.  Addresses
in ``ServeOptions.cap_exempt`` (default loopback, where a reverse proxy sits)
and non-IP sockets only count against the global cap.

Invariants
----------
* ``stats.open`` is the number of :class:`Admitted` not yet released, and
  ``Admission`` holds a per-address count only while it is above zero (an
  address whose connections all closed costs no memory).
* :meth:`Admitted.release` gives the place back once, however many times it
  is called.
* Every refusal is counted and logged at DEBUG; a WARNING, with the running
  total, goes out at most once a minute (``_WARN_EVERY``).

Named drops (``ConnectionStats.refused``): ``max_connections``,
``max_connections_per_address``.

Why a loop of our own and not ``trio.serve_listeners``: trio's wraps each
connection in a task frame of its own, around ``handle_stream``; ours starts
``handle_stream`` directly (it closes the stream itself), one coroutine less
for every connected node.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import os
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from wire.sockets import peer_address, peer_name

from .config import ConnectionStats, ServeOptions

__all__ = ["Admission", "Admitted", "accept_loop"]

log = logging.getLogger("protocol.serve")

#: accept(2) errors that mean "overloaded, retry soon" (as trio.serve_listeners).
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)


class Admitted:
    """One admitted connection's place in the counts; given back once, on close."""

    __slots__ = ("_key", "_table")

    def __init__(self, table: Admission, key: str | None) -> None:
        self._table: Admission | None = table
        self._key = key

    def release(self) -> None:
        """The connection closed: give its place back (only the first call counts)."""
        table, self._table = self._table, None
        if table is not None:
            table.release(self._key)


class Admission:
    """The connection caps: how many are open, in total and per address."""

    __slots__ = ("_by_address", "_exempt", "_last_warning", "_options", "_stats")

    #: Seconds between two warnings about refused connections.
    _WARN_EVERY: Final = 60.0

    def __init__(self, options: ServeOptions, stats: ConnectionStats) -> None:
        self._options = options
        self._stats = stats
        self._by_address: dict[str, int] = {}
        self._exempt = options.cap_exempt
        self._last_warning = -math.inf

    def address_key(self, sockaddr: object) -> str | None:
        """What the per-address cap counts: the IPv4 address or the IPv6 /64;
        ``None`` for exempt addresses and non-IP sockets."""
        if not isinstance(sockaddr, tuple) or not sockaddr:
            return None
        try:
            ip = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self._exempt):
            return None
        if isinstance(ip, ipaddress.IPv6Address):
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
        return str(ip)

    def admit(self, sockaddr: object) -> Admitted | str:
        """Count a new connection in, or return why it is refused."""
        opts, stats = self._options, self._stats
        if stats.open >= opts.max_connections:
            return self._refuse("max_connections", sockaddr)
        key = self.address_key(sockaddr)
        if key is not None:
            if self._by_address.get(key, 0) >= opts.max_connections_per_address:
                return self._refuse("max_connections_per_address", sockaddr)
            self._by_address[key] = self._by_address.get(key, 0) + 1
        stats.open += 1
        stats.accepted += 1
        return Admitted(self, key)

    def release(self, key: str | None) -> None:
        """Count a connection out (through :meth:`Admitted.release` only)."""
        self._stats.open -= 1
        if key is not None:
            left = self._by_address.pop(key) - 1
            if left:
                self._by_address[key] = left

    def _refuse(self, reason: str, sockaddr: object) -> str:
        self._stats.refused[reason] += 1
        now = trio.current_time()
        if now - self._last_warning >= self._WARN_EVERY:
            self._last_warning = now
            log.warning(
                "refusing connections (%s reached, e.g. from %s); %d refused so far",
                reason,
                sockaddr[0] if isinstance(sockaddr, tuple) and sockaddr else "?",
                sum(self._stats.refused.values()),
            )
        return reason


async def accept_loop(
    listener: trio.SocketListener,
    nursery: trio.Nursery,
    admission: Admission,
    handle_stream: Callable[[trio.SocketStream, Admitted], Awaitable[None]],
) -> None:
    """Accept connections forever; each admitted one runs ``handle_stream`` in ``nursery``.

    What ``trio.serve_listeners`` does, minus its per-connection wrapper
    task frame (``handle_stream`` closes the stream itself): one coroutine
    less for every connected node. Like trio, an overloaded system
    (EMFILE and friends) is logged and retried after 100 ms. Connections
    over ``max_connections`` or ``max_connections_per_address`` are closed
    as soon as they are accepted (counted in ``stats.refused``).
    """
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error(
                    "accept failed with %s (%s); retrying in 100 ms",
                    errno.errorcode[exc.errno],
                    os.strerror(exc.errno),
                )
                await trio.sleep(0.1)
            else:
                admitted = admission.admit(peer_address(stream))
                if isinstance(admitted, str):
                    # Refused: closed at once, before reading anything.
                    log.debug("%s: refused (%s)", peer_name(stream), admitted)
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
                    continue
                nursery.start_soon(handle_stream, stream, admitted)
