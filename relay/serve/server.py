"""The relay server: listeners, the HTTP front door, and the handle the embedding program holds.

Theory of operation
-------------------
:func:`serve_relay` is the one entry point.  It reads the relay's identity
(:mod:`relay.serve.identity`, in a worker thread), builds the sans-I/O
:class:`~relay.derp.server.RelayCore`, binds the TCP listener(s) (unless
``listen_port`` is ``None``), starts the STUN server (:mod:`relay.serve.stun_io`;
with ``stun_required`` false a taken port only logs a warning), the keep-alive
ticker and write-timeout watchdog (:mod:`relay.serve.derp_io`) and one task per
mesh peer (:mod:`relay.serve.mesh`), and only then hands a :class:`RelayServer`
to its caller through ``task_status``, so a started relay accepts connections.

Each accepted TCP connection runs :meth:`RelayServer._handle`::

    TCP ─▶ TLS handshake (unless tls="off") ─▶ h11 request loop ─▶ route_request
                 └──── all under handshake_timeout ────┘              │
          PlainResponse (probe, /generate_204, 404...) ◀── answered, next request
          DerpUpgrade / WebSocketUpgrade ─▶ 101 (or fast start) ─▶ DerpIO.serve

A connection that another server accepted (the control port's ``/derp``, when the
relay has no listener of its own: ``listen_port=None``) enters the same path through
:meth:`RelayServer.serve_handed_off` (TLS already terminated) or
:meth:`RelayServer.serve_handed_off_tls`; there a plain answer closes the connection.

The routing decision is sans-I/O (:func:`relay.http_front.route_request`);
this module only moves bytes and counts what happened (:class:`HttpStats`).
A TLS handshake the client gives up on is counted apart from one that
fails, since latency probes often abandon theirs.  Any connection error ends
that connection only; the stream is always closed forcefully on the way out.

Cancellation: cancelling the nursery that started :func:`serve_relay` closes
all listeners and connections; nothing outlives it.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

import h11
import msgspec
import trio

from wire.sockets import format_address, peer_address
from wire.wsstream import WebSocketStream

from ..auth import Authorizer
from ..certs import TlsMaterial
from ..derp.server import DupPolicy, KeyLimitPolicy, RelayCore, RelayStats
from ..errors import ConfigError, RemoteProtocolError
from ..http_front import DerpUpgrade, PlainResponse, WebSocketUpgrade, route_request
from ..keys import short_key
from .config import MeshPeer, RelayConfig
from .derp_io import RECV_SIZE, DerpIO, IoStats
from .identity import load_identity, parse_mesh_key
from .mesh import mesh_link
from .stun_io import StunServer, serve_stun

if TYPE_CHECKING:
    from projections.derpmap import DERPNode, DERPRegion

__all__ = ["HttpStats", "RelayServer", "serve_relay"]

log = logging.getLogger("tailledger.relay")

_MAX_HTTP_HEAD = 16 << 10


class HttpStats(msgspec.Struct, frozen=True, kw_only=True):
    """Counters of the relay's HTTP front door.

    Attributes:
        connections: TCP connections accepted.
        tls_failures: TLS handshakes that failed (a TLS error) or timed out.
        tls_abandoned: TLS handshakes the client gave up on (closed or reset the
            connection), e.g. a latency probe it no longer needed.
        requests: HTTP requests parsed.
        derp_upgrades: streams switched to DERP after a 101 response.
        derp_fast_start: streams switched to DERP with ``Derp-Fast-Start: 1``.
        websocket_upgrades: streams switched to DERP over WebSocket.
    """

    connections: int
    tls_failures: int
    tls_abandoned: int
    requests: int
    derp_upgrades: int
    derp_fast_start: int
    websocket_upgrades: int


class RelayServer:
    """A running relay; returned by :func:`serve_relay` through ``task_status``.

    Attributes:
        config: the configuration it runs with.
        core: the sans-I/O relay core (for stats and tests).
        public_key: the relay's DERP public key.
        cert_name: ``sha256-raw:<hex>`` of the served certificate, ``None`` with TLS off.
        derp_port: the TCP port actually bound.
        stun: the STUN server handle, or ``None`` when STUN is disabled.
    """

    def __init__(
        self,
        config: RelayConfig,
        core: RelayCore,
        ssl_context: ssl.SSLContext | None,
        tls: TlsMaterial | None,
    ) -> None:
        self.config = config
        self.core = core
        self.public_key = core.public_key
        self.cert_name = tls.cert_name if tls is not None else None
        self._ssl = ssl_context
        self.derp_port = 0
        self.stun: StunServer | None = None
        self._nursery: trio.Nursery | None = None
        self._derp = DerpIO(core, config)
        self._mesh_key: bytes | None = None
        self._mesh_links: dict[str, list[trio.CancelScope]] = {}
        self._http_counts = {k: 0 for k in HttpStats.__struct_fields__}

    # -- the API used by the embedding program --------------------------

    def revoke(self, node_key: bytes) -> int:
        """Disconnect every connection of ``node_key`` now; return how many.

        Call this when the event log says the node lost its authorization;
        the authorizer must already answer ``False`` for it, or the client
        simply reconnects.
        """
        return len(self.core.revoke(node_key))

    def reauthorize(self) -> int:
        """Re-check every connected client against the authorizer; return how many were closed."""
        return len(self.core.reauthorize())

    def add_mesh_peer(self, peer: MeshPeer) -> None:
        """Start a mesh link to ``peer`` now (in addition to ``config.mesh_with``).

        Useful when the region's relays learn of each other at run time.

        Raises:
            ConfigError: the relay has no mesh key.
            RuntimeError: the relay is not running.
        """
        if self._mesh_key is None:
            raise ConfigError("meshing needs a mesh_key")
        if self._nursery is None:
            raise RuntimeError("relay is not running")
        scope = trio.CancelScope()
        self._mesh_links.setdefault(peer.url, []).append(scope)
        self._nursery.start_soon(self._run_mesh_link, peer, self._mesh_key, scope)

    def remove_mesh_peer(self, url: str) -> int:
        """Close the mesh links to the relay at ``url`` (it left the region); the core
        forgets the clients it learnt through them. Returns how many links closed."""
        scopes = self._mesh_links.pop(url, [])
        for scope in scopes:
            scope.cancel()
        return len(scopes)

    @property
    def mesh_peers(self) -> tuple[str, ...]:
        """The URLs of the relays this one keeps mesh links to."""
        return tuple(self._mesh_links)

    async def _run_mesh_link(self, peer: MeshPeer, mesh_key: bytes, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await mesh_link(self.core, self.config, peer, mesh_key)
        finally:
            scopes = self._mesh_links.get(peer.url, [])
            if scope in scopes:
                scopes.remove(scope)
                if not scopes:
                    del self._mesh_links[peer.url]

    def stats(self) -> RelayStats:
        """Counters of the DERP core (drops by reason, packets, refusals...)."""
        return self.core.stats()

    def io_stats(self) -> IoStats:
        """Counters of reads and of the two write paths."""
        return self._derp.stats()

    def http_stats(self) -> HttpStats:
        """Counters of the HTTP front door (upgrades by kind, TLS failures)."""
        return HttpStats(**self._http_counts)

    @property
    def url(self) -> str:
        """The DERP URL of this relay on the first configured host name."""
        scheme = "http" if self._ssl is None else "https"
        host = self.config.hostnames[0] if self.config.hostnames else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.derp_port}/derp"

    def derp_node(
        self,
        *,
        region_id: int = 999,
        host_name: str | None = None,
        ipv4: str | None = None,
        ipv6: str | None = None,
        name: str | None = None,
        public_derp_port: int | None = None,
        public_stun_port: int | None = None,
    ) -> DERPNode:
        """This relay as a DERP map node (see :func:`projections.derpmap.embedded_region`).

        Ports default to the ones actually bound; pass the public ones when a
        proxy or NAT sits in front.
        """
        region = self.derp_region(
            region_id=region_id,
            host_name=host_name,
            ipv4=ipv4,
            ipv6=ipv6,
            node_name=name,
            public_derp_port=public_derp_port,
            public_stun_port=public_stun_port,
        )
        assert region.nodes
        return region.nodes[0]

    def derp_region(
        self,
        *,
        region_id: int = 999,
        region_code: str = "tailledger",
        region_name: str = "tailledger embedded DERP",
        host_name: str | None = None,
        ipv4: str | None = None,
        ipv6: str | None = None,
        node_name: str | None = None,
        public_derp_port: int | None = None,
        public_stun_port: int | None = None,
    ) -> DERPRegion:
        """This relay as a one-node DERP region, ready for :func:`projections.derpmap.merge_derp_maps`.

        Host name defaults to the first configured host name, ports to the
        bound ones, CertName to the served certificate's pin when it is self-signed.
        """
        # Imported here so the relay runs even where projections is not importable.
        from projections.derpmap import embedded_region

        host = host_name or (self.config.hostnames[0] if self.config.hostnames else "127.0.0.1")
        stun_port = -1
        if self.stun is not None:
            stun_port = self.stun.port
        if public_stun_port is not None:
            stun_port = public_stun_port
        return embedded_region(
            region_id=region_id,
            region_code=region_code,
            region_name=region_name,
            host_name=host,
            derp_port=public_derp_port if public_derp_port is not None else self.derp_port,
            stun_port=stun_port,
            cert_name=self.cert_name if self.config.tls == "self-signed" else None,
            ipv4=ipv4,
            ipv6=ipv6,
            node_name=node_name,
        )

    # -- connection handling -------------------------------------------

    async def serve_handed_off(self, stream: trio.abc.Stream, tcp: trio.SocketStream) -> None:
        """Serve a connection another server accepted (the control port's ``/derp``).

        ``stream`` replays the first request from its first byte and is already inside
        TLS when the other server terminates TLS; this relay's own TLS is not used.
        ``tcp`` is the TCP stream under it (for the peer's address). Closes ``stream``.
        """
        await self._serve_connection(stream, peer_address(tcp), tls=False, keep_alive=False)

    async def serve_handed_off_tls(self, stream: trio.abc.Stream, tcp: trio.SocketStream) -> None:
        """Like :meth:`serve_handed_off` for a connection that opens with a TLS
        ClientHello: terminate TLS with this relay's certificate, then serve DERP."""
        await self._serve_connection(stream, peer_address(tcp), tls=self._ssl is not None, keep_alive=False)

    async def _handle(self, tcp: trio.SocketStream) -> None:
        await self._serve_connection(tcp, peer_address(tcp), tls=self._ssl is not None)

    async def _serve_connection(
        self, transport: trio.abc.Stream, remote: tuple[str, int] | None, *, tls: bool, keep_alive: bool = True
    ) -> None:
        """TLS (when ``tls``), then HTTP until a DERP upgrade. Without ``keep_alive``
        a plain answer closes the connection: a connection handed over by the control
        port must not go on to serve that port's other paths with the relay's 404s."""
        stream: trio.abc.Stream = transport
        counters = self._http_counts
        counters["connections"] += 1
        try:
            route: DerpUpgrade | WebSocketUpgrade | None = None
            trailing = b""
            with trio.move_on_after(self.config.handshake_timeout):
                if tls and self._ssl is not None:
                    stream = trio.SSLStream(transport, self._ssl, server_side=True)
                    try:
                        await stream.do_handshake()
                    except trio.BrokenResourceError as exc:
                        # trio wraps both: a TLS error, or the transport going away.
                        gone = not isinstance(exc.__cause__, ssl.SSLError) or isinstance(
                            exc.__cause__, ssl.SSLEOFError
                        )
                        counters["tls_abandoned" if gone else "tls_failures"] += 1
                        raise
                    except BaseException:
                        counters["tls_failures"] += 1
                        raise
                route, trailing = await self._http(stream, keep_alive=keep_alive)
            if route is None:
                return
            if isinstance(route, WebSocketUpgrade):
                counters["websocket_upgrades"] += 1
            elif route.response:
                counters["derp_upgrades"] += 1
            else:
                counters["derp_fast_start"] += 1
            if route.response:
                await stream.send_all(route.response)
            if isinstance(route, WebSocketUpgrade):
                # Binary messages only, as Tailscale's derphttp (a text message
                # closes the connection there too).
                stream = WebSocketStream(
                    stream, client=False, trailing=trailing, violation=RemoteProtocolError, binary_only=True
                )
                trailing = b""
            await self._derp.serve(stream, trailing, remote, route.ideal_node)
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            h11.ProtocolError,
            ssl.SSLError,
            OSError,
        ) as exc:
            log.debug("relay: connection from %s ended: %r", format_address(remote), exc)
        finally:
            await trio.aclose_forcefully(stream)

    async def _http(
        self, stream: trio.abc.Stream, *, keep_alive: bool = True
    ) -> tuple[DerpUpgrade | WebSocketUpgrade | None, bytes]:
        """Serve HTTP requests until one upgrades to DERP or the client leaves."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HTTP_HEAD)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(RECV_SIZE)
                conn.receive_data(bytes(data))
                if not data and conn.their_state is not h11.DONE:
                    return None, b""
                continue
            if isinstance(event, h11.Request):
                self._http_counts["requests"] += 1
                route = route_request(
                    event.method,
                    event.target,
                    list(event.headers),
                    server_public=self.public_key,
                    websocket=self.config.websocket,
                )
                if not isinstance(route, PlainResponse):
                    return route, conn.trailing_data[0]
                head_only = event.method == b"HEAD"
                if not keep_alive:
                    route = msgspec.structs.replace(route, headers=[*route.headers, (b"Connection", b"close")])
                await self._respond(stream, conn, route, head_only)
                continue
            if isinstance(event, h11.EndOfMessage | h11.Data):
                continue
            if event is h11.PAUSED:
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return None, b""
                conn.start_next_cycle()
                continue
            return None, b""  # ConnectionClosed and anything unexpected

    async def _respond(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        route: PlainResponse,
        head_only: bool,
    ) -> None:
        headers = [*route.headers]
        body = b"" if route.status in (204, 304) else route.body
        if route.status not in (204, 304):
            headers.append((b"Content-Length", str(len(body)).encode()))
        out = conn.send(h11.Response(status_code=route.status, headers=headers)) or b""
        if body and not head_only:
            out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(out)


async def serve_relay(
    config: RelayConfig,
    authorizer: Authorizer,
    *,
    log_line: Callable[[str], None] | None = None,
    task_status: trio.TaskStatus[RelayServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the DERP relay (and its STUN server and mesh links) until cancelled.

    Args:
        config: listener, TLS, STUN and mesh settings.
        authorizer: who may connect; consulted at every login.
        log_line: receives the core's event lines (refusals, protocol errors,
            revocations); defaults to the ``tailledger.relay`` logger.
        task_status: receives the :class:`RelayServer` once every listener is
            bound, so ``await nursery.start(serve_relay, ...)`` returns a relay
            that accepts connections.

    Raises:
        ConfigError: unusable keys, certificates, mesh settings or limits.
        OSError: a port could not be bound.

    Cancellation: cancelling closes every listener and connection; the
    function returns only by raising ``trio.Cancelled`` or an error.
    """
    mesh_key = parse_mesh_key(config.mesh_key)
    if config.mesh_with and mesh_key is None:
        raise ConfigError("mesh_with needs a mesh_key")
    private_key, material, ctx = await trio.to_thread.run_sync(load_identity, config)
    try:
        core = RelayCore(
            private_key,
            authorizer,
            mesh_key=mesh_key,
            queue_depth=config.queue_depth,
            dup_policy=DupPolicy(config.dup_policy),
            rate_limit=config.rate_limit,
            rate_burst=config.rate_burst,
            max_conns_per_key=config.max_conns_per_key,
            key_limit_policy=KeyLimitPolicy(config.key_limit_policy),
            clock=trio.current_time,
            log=log_line or log.info,
        )
    except ValueError as exc:  # out-of-range limits: the core says which
        raise ConfigError(str(exc)) from None
    server = RelayServer(config, core, ctx, material)
    listeners: list[trio.SocketListener] = []
    if config.listen_port is not None:
        listeners = await trio.open_tcp_listeners(config.listen_port, host=config.listen_host)
        server.derp_port = int(listeners[0].socket.getsockname()[1])
    async with trio.open_nursery() as nursery:
        server._nursery = nursery
        server._mesh_key = mesh_key
        if config.stun:
            try:
                server.stun = await nursery.start(serve_stun, config.stun_host, config.stun_port)
            except OSError as exc:
                if config.stun_required:
                    raise
                log.warning(
                    "relay: STUN NOT served: UDP port %d is taken (%s); clients of this relay learn "
                    "no public address (set derp.server.stun_listen_addr to a free one)",
                    config.stun_port, exc.strerror or exc,
                )
        nursery.start_soon(server._derp.keepalive)
        if config.write_timeout is not None:
            nursery.start_soon(server._derp.write_watchdog, config.write_timeout)
        for peer in config.mesh_with:
            server.add_mesh_peer(peer)
        if listeners:
            await nursery.start(trio.serve_listeners, server._handle, listeners)
        log.info(
            "relay: DERP on %s (%s), key %s%s",
            f"port {server.derp_port}" if listeners else "the control port",
            "plain HTTP" if ctx is None else "TLS",
            short_key(server.public_key),
            "" if server.stun is None else f", STUN on port {server.stun.port}",
        )
        task_status.started(server)
