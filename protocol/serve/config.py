"""The control port's settings and counters: what the adapter is told, and what it counts.

Theory of operation
-------------------
Nothing here moves a byte.  :class:`ServeOptions` is the frozen set of tunables the
CLI builds once from ``[limits]`` (:mod:`cli.config`); every module of the
package reads it and none changes it.  :class:`ConnectionStats` is the one
mutable object: plain integer counters that the accept loop, the front door,
the hand-off guard and the Noise sessions increment when a limit bites, and
that ``/metrics`` (:mod:`cli.web`) reads.  The three tuples name the keys of
its dictionaries, so a counter that is not listed here cannot be incremented
(``KeyError``) and every listed one is exported, at zero until it fires.

Invariants
----------
* Counters only grow, except ``ConnectionStats.open`` (admitted minus closed),
  which the accept loop's :class:`~protocol.serve.accept.Admitted` gives back
  exactly once per connection.
* ``cap_exempt`` defaults to :data:`LOOPBACK_NETWORKS`: a reverse proxy on this
  host would otherwise share one address's cap among all its clients.

This module does no I/O and imports no trio.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from .. import h2_bridge
from ..noise import Keypair

if TYPE_CHECKING:
    from hypercorn.config import Config as HypercornConfig

__all__ = [
    "LOOPBACK_NETWORKS",
    "MAX_RECV",
    "REFUSAL_REASONS",
    "SLOW_READER_KINDS",
    "TIMEOUT_KINDS",
    "ConnectionStats",
    "ServeOptions",
]


#: Bytes asked of a stream per read (the HTTP/1.1 front and the Noise reader alike).
MAX_RECV: Final = 65536


#: Addresses whose connections only the global cap limits: a reverse proxy on
#: this host (every client then comes from its address) and local tools.
LOOPBACK_NETWORKS: Final = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


@dataclass(frozen=True)
class ServeOptions:
    """Tunables of :func:`~protocol.serve.serve_control`.

    Attributes:
        max_body_size: Cap on request bodies inside the tunnel (Headscale: 1 MiB).
        head_timeout: Seconds to receive one *whole* HTTP/1.1 request head on
            the front (slowloris guard: the deadline is set when the request
            starts, not renewed by each read); also how long a kept-alive
            front connection may wait for its next request.
        body_timeout: Seconds to receive a request body once its head
            arrived: inside the tunnel per HTTP/2 stream (the stream is then
            answered 408 and reset), and on hypercorn connections for a whole
            request (the connection is then closed).
        tunnel_idle_timeout: Seconds a Noise tunnel may stay with no request
            being handled and no long poll open (then GOAWAY and close). A
            node's map long poll counts as open, however quiet.
        write_timeout: Seconds a connection may make no progress taking what
            we send (socket writes, or HTTP/2 flow-control window for a
            response) before it is closed as a slow reader.
        max_outgoing_buffer: Cap on the bytes held for one connection that
            the peer has not taken yet (queued for window, framed, or
            written only in part); above it the connection is closed as a
            slow reader. Must exceed the largest full map.
        max_connections: Connections open at once (all kinds); more are
            closed as soon as they are accepted.
        max_connections_per_address: Connections open at once from one
            address (IPv6: one /64); ``cap_exempt`` addresses are not counted.
        cap_exempt: Networks the per-address cap ignores (default loopback:
            a reverse proxy on this host).
        tls_handshake_timeout: Seconds for the TLS handshake.
        min_protocol_version: Close tunnels of clients below this capability
            version right after the handshake, like Headscale's early-noise
            check (it uses 113). 0 disables the check.
        send_early_payload: Send the ``nodeKeyChallenge`` early payload on
            native upgrades (never on WebSocket ones, as Go).
        max_concurrent_streams: ``SETTINGS_MAX_CONCURRENT_STREAMS``.
        max_buffered_bodies: Cap on incomplete request-body bytes buffered
            per connection (memory bound against half-sent bodies).
        challenge_source: Returns the per-connection ``nodeKeyChallenge``
            public key (32 bytes; its private half is never needed). Inject
            for deterministic tests (style rule 13).
        hypercorn_config: Config for the hand-off; ``None`` = defaults.
        stream_close_timeout: Seconds granted to a streaming response's
            ``aclose()`` after a reset or disconnect.
    """

    max_body_size: int = h2_bridge.DEFAULT_MAX_BODY_SIZE
    head_timeout: float = 10.0
    body_timeout: float = 30.0
    tunnel_idle_timeout: float = 180.0
    write_timeout: float = 30.0
    max_outgoing_buffer: int = 16 << 20
    max_connections: int = 10_000
    max_connections_per_address: int = 512
    cap_exempt: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = LOOPBACK_NETWORKS
    tls_handshake_timeout: float = 10.0
    min_protocol_version: int = 0
    send_early_payload: bool = True
    max_concurrent_streams: int = h2_bridge.DEFAULT_MAX_CONCURRENT_STREAMS
    max_buffered_bodies: int = h2_bridge.DEFAULT_MAX_BUFFERED_BODIES
    challenge_source: Callable[[], bytes] = field(default=lambda: Keypair.generate().public)
    hypercorn_config: HypercornConfig | None = field(default=None, compare=False)
    stream_close_timeout: float = 5.0


#: Why a connection was refused at accept (``ConnectionStats.refused``).
REFUSAL_REASONS: Final = ("max_connections", "max_connections_per_address")
#: Which deadline closed something (``ConnectionStats.timeouts``).
TIMEOUT_KINDS: Final = (
    "tls_handshake",  # the TLS handshake took too long
    "head",  # a request head did not arrive whole in time (slowloris)
    "keepalive",  # a kept-alive front connection sent no next request in time
    "body",  # a request body inside the tunnel stalled (stream answered 408)
    "http_body",  # a request on a hypercorn connection stalled (connection closed)
    "tunnel_idle",  # a tunnel had nothing open for tunnel_idle_timeout
)
#: How a slow reader was detected (``ConnectionStats.slow_readers``).
SLOW_READER_KINDS: Final = (
    "buffer",  # its outgoing buffer exceeded max_outgoing_buffer
    "write_stall",  # the socket took nothing for write_timeout
    "window_stall",  # it gave no flow-control window for write_timeout
)


class ConnectionStats:
    """Counters of the control port, read by ``/metrics`` (:mod:`cli.web`).

    Attributes:
        accepted: Connections accepted and admitted.
        open: Connections open now (admitted, not yet closed).
        refused: Connections closed at accept, by reason (:data:`REFUSAL_REASONS`).
        timeouts: Deadlines that fired, by kind (:data:`TIMEOUT_KINDS`).
        slow_readers: Connections closed as slow readers (:data:`SLOW_READER_KINDS`).
    """

    __slots__ = ("accepted", "open", "refused", "slow_readers", "timeouts")

    def __init__(self) -> None:
        self.accepted = 0
        self.open = 0
        self.refused = dict.fromkeys(REFUSAL_REASONS, 0)
        self.timeouts = dict.fromkeys(TIMEOUT_KINDS, 0)
        self.slow_readers = dict.fromkeys(SLOW_READER_KINDS, 0)
