"""The STUN adapter: UDP sockets in front of the sans-I/O STUN codec.

Theory of operation
-------------------
Clients send a STUN binding request to learn the address and port their
packets come from (their reflexive address, which NAT traversal needs).
:func:`serve_stun` binds one UDP socket per address family (``0.0.0.0`` and,
where the host has IPv6, ``::`` on the same port; or the one address asked
for) and runs one receive loop per socket::

    datagram ─▶ StunServer.handle_datagram ─▶ reply bytes | None ─▶ sendto

:meth:`StunServer.handle_datagram` does the protocol through
:mod:`relay.stun` (parse the request, build the response that echoes the
sender's address) and counts; it never raises for bad input: a datagram that
is not STUN, or malformed STUN, is counted and gets no answer.  Errors that
Linux surfaces on a UDP socket after an ICMP "unreachable" are skipped, and a
reply that cannot be sent is dropped: one client's broken path never stops
the loop.

Cancellation: cancelling the task closes the sockets.
"""

from __future__ import annotations

import errno
import socket as _stdsocket

import msgspec
import trio

from ..errors import NotStunError, StunError
from ..stun import DEFAULT_STUN_PORT, binding_response, parse_binding_request

__all__ = ["StunServer", "StunStats", "serve_stun"]


class StunStats(msgspec.Struct, frozen=True, kw_only=True):
    """Counters of the STUN server."""

    requests: int
    responses: int
    not_stun: int
    malformed: int


class StunServer:
    """Handle returned by :func:`serve_stun` (via ``task_status``)."""

    def __init__(self) -> None:
        self.addresses: list[tuple[str, int]] = []
        self._requests = 0
        self._responses = 0
        self._not_stun = 0
        self._malformed = 0

    @property
    def port(self) -> int:
        """The UDP port actually bound (useful with ``port=0``)."""
        return self.addresses[0][1]

    def stats(self) -> StunStats:
        """Snapshot of the counters."""
        return StunStats(
            requests=self._requests,
            responses=self._responses,
            not_stun=self._not_stun,
            malformed=self._malformed,
        )

    def handle_datagram(self, data: bytes, ip: str, port: int) -> bytes | None:
        """Answer one datagram (pure apart from counting); ``None`` means stay silent."""
        try:
            txid = parse_binding_request(data)
        except NotStunError:
            self._not_stun += 1
            return None
        except StunError:
            self._malformed += 1
            return None
        self._requests += 1
        return binding_response(txid, ip, port)


async def _stun_loop(sock: trio.socket.SocketType, server: StunServer) -> None:
    while True:
        try:
            data, addr = await sock.recvfrom(2048)
        except OSError as exc:  # e.g. ICMP port unreachable surfacing on Linux
            if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                continue
            raise
        reply = server.handle_datagram(data, addr[0], addr[1])
        if reply is not None:
            try:
                await sock.sendto(reply, addr)
                server._responses += 1
            except OSError:
                continue


async def serve_stun(
    host: str | None = None,
    port: int = DEFAULT_STUN_PORT,
    *,
    task_status: trio.TaskStatus[StunServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer STUN binding requests on UDP until cancelled.

    Args:
        host: address to bind; ``None`` binds ``0.0.0.0`` and (if available)
            ``::`` with the same port.
        port: UDP port; 0 picks a free one (the IPv6 socket then reuses it).
        task_status: receives the :class:`StunServer` once the sockets are bound.
    """
    server = StunServer()
    socks: list[trio.socket.SocketType] = []
    try:
        if host is None:
            targets: list[tuple[int, str]] = [(_stdsocket.AF_INET, "0.0.0.0")]
            if _stdsocket.has_ipv6:
                targets.append((_stdsocket.AF_INET6, "::"))
        else:
            infos = await trio.socket.getaddrinfo(host, port, type=_stdsocket.SOCK_DGRAM)
            targets = [(infos[0][0], str(infos[0][4][0]))]
        bound_port = port
        for family, addr in targets:
            sock = trio.socket.socket(family, _stdsocket.SOCK_DGRAM)
            if family == _stdsocket.AF_INET6:
                sock.setsockopt(_stdsocket.IPPROTO_IPV6, _stdsocket.IPV6_V6ONLY, 1)
            try:
                await sock.bind((addr, bound_port))
            except OSError:
                sock.close()
                if family == _stdsocket.AF_INET6 and host is None:
                    continue  # no IPv6 here; IPv4 alone is fine
                raise
            socks.append(sock)
            sockname = sock.getsockname()
            bound_port = int(sockname[1])
            server.addresses.append((str(sockname[0]), bound_port))
        async with trio.open_nursery() as nursery:
            for sock in socks:
                nursery.start_soon(_stun_loop, sock, server)
            task_status.started(server)
    finally:
        for sock in socks:
            sock.close()
