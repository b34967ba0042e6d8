"""The network services of ``tailledger serve``: the control port, the relay, metrics.

:func:`cli.server.open_server` starts them, in this order, with the pieces here:
presence (:func:`start_presence`), the relay (:func:`start_relay`), the DERP map's
sources (:class:`DerpSources`), the control port (:func:`serve_control_port`) and
``/metrics`` (:func:`start_metrics`).

The control port serves ``/key`` and ``/ts2021`` (the Tailscale control protocol) and
hands every other HTTP request to hypercorn running the Quart app (:mod:`cli.web`).
The embedded DERP relay (on by default) runs beside it, authorizing clients from the
server's own projection of the log, and becomes region ``derp.server.region_id`` of the DERP map. Unless it is given a
listener of its own (``derp.server.listen_addr``) it is served on the control port at
``/derp``, as Headscale does, and the map names it by the server URL's host and port.

The DERP map is assembled at start-up (:func:`cli.settings.assemble_derp_map`) and
again every ``derp.auto_update_interval`` when files or URLs are configured:
``derp.paths`` files, then ``derp.urls`` documents, then the embedded region; a changed
map is pushed to every connected client; ``docs/derp.md`` explains the options. The
settings of each service come from :mod:`cli.settings`.
"""

from __future__ import annotations

import logging
import os
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import trio

from eventlog.sidetables import SideTables
from projections import ProjectionRunner, Tailnet
from projections.presence import PresenceTable
from projections.presence_io import persist_presence
from projections.tailcfg import DERPMap, DERPNode, DERPRegion
from protocol import ConnectionStats, DerpRoute, generate_private_key, serve_control
from protocol.control import Control

from .config import DEFAULT_METRICS_LISTEN_ADDR, Config, ConfigError, read_mesh_key, split_host_port
from .settings import assemble_derp_map, relay_config, serve_options
from .web import MetricSources, serve_metrics

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from eventlog.pgstore import PostgresSideTables
    from relay.serve import RelayServer

__all__ = [
    "DerpSources",
    "EmbeddedRegion",
    "load_noise_key",
    "refresh_derp_map",
    "relay_region",
    "replicas_of",
    "serve_control_port",
    "start_metrics",
    "start_presence",
    "start_relay",
    "start_relay_mesh",
]

log = logging.getLogger("tailledger")


def load_noise_key(data_dir: Path) -> bytes:
    """The server's Noise private key, made on first start (``noise_private.key``).

    Clients do not pin it, but a changed key makes every client re-fetch ``/key``;
    keep the file with the data.

    The key is written whole or not at all: to a temporary file, fsynced, renamed
    over the final name, and the directory fsynced. A crash at any point leaves either
    no key (a new one is made on the next start) or the complete key. A leftover
    temporary file is removed; an empty key file (left by versions that wrote it in
    place) is replaced, with a warning -- no client can have used an empty key.

    Raises:
        ConfigError: the key file holds something that is not a key.
    """
    path = data_dir / "noise_private.key"
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        log.warning("removing %s, left by a start that crashed while writing the Noise key", tmp)
        tmp.unlink()
    if path.exists():
        text = path.read_text(errors="replace").strip()
        if text:
            try:
                key = bytes.fromhex(text.removeprefix("privkey:"))
            except ValueError:
                key = b""
            if len(key) != 32:
                raise ConfigError(
                    f"{path} does not hold a Noise private key (privkey:<64 hex digits>); "
                    "restore it from a backup, or delete it to make a new one (clients re-fetch /key)"
                )
            return key
        log.warning("%s is empty (a crash while it was first written); making a new Noise key", path)
    key = generate_private_key()
    _write_atomically(path, f"privkey:{key.hex()}\n".encode())
    return key


def _write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so that a crash never leaves a partial file there."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass(frozen=True)
class DerpSources:
    """What the DERP map is made of, read: the ``derp.paths`` files and the bodies of
    the ``derp.urls``. With the embedded relay they make the map (:meth:`derp_map`)."""

    files: Mapping[str, bytes]
    urls: Mapping[str, bytes]

    @classmethod
    async def read(cls, config: Config) -> DerpSources:
        """Read the ``derp.paths`` files and fetch the ``derp.urls``.

        Raises:
            ConfigError: a file cannot be read or a URL cannot be fetched in 30 s.
        """
        from relay.fetch import DerpMapFetchError, fetch_derp_map

        files: dict[str, bytes] = {}
        for path in config.derp.paths:
            try:
                files[path] = await trio.to_thread.run_sync(Path(path).read_bytes)
            except OSError as exc:
                raise ConfigError(f"derp.paths: cannot read {path}: {exc.strerror}") from None
        urls: dict[str, bytes] = {}
        for url in config.derp.urls:
            try:
                with trio.fail_after(30):
                    urls[url] = await fetch_derp_map(url)
            except (DerpMapFetchError, trio.TooSlowError) as exc:
                raise ConfigError(f"derp.urls: cannot fetch {url}: {exc or 'timed out after 30 s'}") from None
        return cls(files, urls)

    def derp_map(self, config: Config, embedded: EmbeddedRegion) -> DERPMap:
        """The map of these sources and the embedded relay's region as it is now.

        Raises:
            ConfigError: a source is not a valid DERP map.
        """
        return assemble_derp_map(config, files=self.files, urls=self.urls, embedded=embedded.current)


class EmbeddedRegion:
    """The embedded relay's region as the DERP map shows it now: this relay alone, or,
    between replicas, every live replica's relay (:mod:`cli.relaymesh`).

    Before the control port is bound (port 0) a relay on it is named by the configured
    URL; :func:`serve_control_port` names it again by the bound one.
    """

    def __init__(self, config: Config, relay: RelayServer | None, *, replica_id: str | None) -> None:
        self.config = config
        self.relay = relay
        ds = config.derp.server
        #: This relay's node in the region; between replicas, one name each.
        self.node_name = ds.node_name or (f"{ds.region_id}-{replica_id}" if replica_id is not None else None)
        self.current: DERPRegion | None = None
        self.name_by(config.public_url)

    def name_by(self, control_url: str) -> None:
        """Name this relay by ``control_url`` when it is served on the control port."""
        if self.relay is not None:
            self.current = relay_region(self.config, self.relay, control_url=control_url, node_name=self.node_name)

    def set(self, nodes: list[DERPNode]) -> None:
        """The region's nodes are ``nodes`` (every live replica's relay)."""
        if self.current is not None:
            self.current = msgspec.structs.replace(self.current, nodes=nodes)


def replicas_of(side: SideTables) -> PostgresSideTables | None:
    """The side tables as the replicas' shared directory (``None`` on SQLite: one server)."""
    from eventlog.pgstore import PostgresSideTables

    return side if isinstance(side, PostgresSideTables) else None


async def start_presence(
    nursery: trio.Nursery, presence: PresenceTable, side: SideTables, tailnet: Tailnet, replica_id: str
) -> None:
    """Restore ``presence`` from the side tables and keep it there; between the replicas
    of one PostgreSQL log, share it. Restored before the control logic starts: its
    ephemeral-node clean-up reads it."""
    await nursery.start(persist_presence, presence, side, lambda: tailnet.clock(), tailnet.state.nodes)
    replicas = replicas_of(side)
    if replicas is not None:
        # Replicas on one PostgreSQL log: live presence travels between them.
        from projections.presence_share import share_presence

        await nursery.start(share_presence, presence, replicas, replica_id)


async def start_relay(
    nursery: trio.Nursery, config: Config, runner: ProjectionRunner, side: SideTables
) -> RelayServer | None:
    """Start the embedded relay of ``derp.server`` (``None`` when it is not enabled),
    served on the control port unless it has a ``listen_addr`` of its own. Between
    replicas it takes the region's shared mesh key (:func:`start_relay_mesh` meshes it).

    Its authorizer follows ``runner``, the server's own projection (already running):
    a runner of its own would fold every event a second time into a second copy of
    the tailnet (every node record decoded twice, issue 19: about 1 KiB per node).
    A separate ``tailledger relay`` process tails the log with its own runner."""
    from relay.logauth import LogAuthorizer
    from relay.serve import serve_relay

    ds = config.derp.server
    if not ds.enabled:
        return None
    replicas = replicas_of(side)
    mesh_key = None
    if replicas is not None:
        # The replicas' relays mesh into one region (cli/relaymesh.py): one mesh key,
        # a node name each (EmbeddedRegion).
        from .relaymesh import shared_mesh_key

        mesh_key = await shared_mesh_key(replicas, read_mesh_key(ds))
    rc = relay_config(config, on_control_port=not ds.listen_addr)
    if mesh_key is not None:  # the replicas' shared key
        rc = msgspec.structs.replace(rc, mesh_key=mesh_key)
    auth = LogAuthorizer(runner)
    auth.refresh()
    relay: RelayServer = await nursery.start(serve_relay, rc, auth)
    await nursery.start(auth.run, relay.revoke)
    return relay


def _on_control_port(relay: RelayServer | None) -> bool:
    return relay is not None and relay.config.listen_port is None


async def serve_control_port(
    nursery: trio.Nursery,
    config: Config,
    *,
    key: bytes,
    control: Control,
    app: QuartTrio,
    relay: RelayServer | None,
    derp: DerpSources,
    region: EmbeddedRegion,
    stats: ConnectionStats,
) -> int:
    """Serve the control port (the control protocol, ``app`` for the rest, the relay at
    ``/derp`` when it rides the control port); return the bound port.

    With port 0 and no ``server_url``, the server's URL (and the DERP map of a relay on
    the control port) then names the bound port.
    """
    ctx = None
    if config.tls.cert_file:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(config.tls.cert_file, config.tls.key_file)
    host, port = config.listen
    route = None
    if relay is not None and _on_control_port(relay):
        # Served at /derp; on a plain-HTTP control port also over the relay's own
        # (self-signed, pinned) TLS, since Tailscale clients dial DERP over https only.
        route = DerpRoute(
            serve_http=relay.serve_handed_off,
            serve_tls=relay.serve_handed_off_tls if relay.cert_name is not None else None,
        )
    options = serve_options(config)
    bound: int = await nursery.start(
        lambda task_status: serve_control(
            host=host, port=port, server_key=key, handler=control, asgi_app=app,
            ssl_context=ctx, options=options, stats=stats, derp=route, task_status=task_status,
        )
    )
    if port == 0 and not config.server_url:
        scheme = "https" if ctx is not None else "http"
        control.public_url = f"{scheme}://{host}:{bound}"
        if _on_control_port(relay):
            region.name_by(control.public_url)
            control.streams.set_derp_map(derp.derp_map(config, region))
    return bound


async def start_relay_mesh(
    nursery: trio.Nursery,
    config: Config,
    *,
    control: Control,
    relay: RelayServer | None,
    side: SideTables,
    replica_id: str,
    derp: DerpSources,
    region: EmbeddedRegion,
) -> None:
    """Between replicas, mesh the embedded relay with every live replica's relay and
    list them all as the nodes of the one embedded region (nothing on SQLite)."""
    replicas = replicas_of(side)
    embedded = region.current
    if replicas is None or relay is None or embedded is None or not embedded.nodes:
        return
    from .relaymesh import mesh_peer_of, mesh_replicas

    def on_nodes(nodes: list[DERPNode]) -> None:
        # Every live replica's relay is a node of the one embedded region.
        region.set(nodes)
        control.streams.set_derp_map(derp.derp_map(config, region))

    own = embedded.nodes[0]
    own_peer = mesh_peer_of(own)
    if relay.config.tls == "off" and relay.config.listen_port is not None and not config.derp.server.public_derp_port:
        # A plain-HTTP listener of its own with no TLS proxy in front: dialled as is.
        own_peer["url"] = str(own_peer["url"]).replace("https://", "http://", 1)
    await nursery.start(partial(mesh_replicas, own_peer=own_peer), relay, replicas, replica_id, own, on_nodes)


async def start_metrics(nursery: trio.Nursery, addr: str, sources: MetricSources) -> int:
    """Serve ``/metrics`` on ``addr``, ``metrics_listen_addr`` (not on the control port);
    return the bound port (0: not served).

    The default address being taken (another server on this machine) costs only the
    metrics, with a warning; an address the operator chose must be free.
    """
    if not addr:
        log.info("metrics are off (metrics_listen_addr is empty)")
        return 0
    host, port = split_host_port(addr, "metrics_listen_addr")
    try:
        bound: int = await nursery.start(serve_metrics, sources, host, port)
    except OSError as exc:
        if addr != DEFAULT_METRICS_LISTEN_ADDR:
            raise ConfigError(f"metrics_listen_addr: cannot listen on {addr}: {exc.strerror or exc}") from None
        log.warning(
            "metrics NOT served: the default metrics_listen_addr %s is taken (%s); "
            "set metrics_listen_addr to a free local address", addr, exc.strerror or exc,
        )
        return 0
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound


async def refresh_derp_map(config: Config, control: Control, region: EmbeddedRegion, interval: float) -> None:
    """Re-read the DERP map sources every ``interval`` seconds; push a changed map to
    every connected client. A source that fails keeps the map in force (logged)."""
    while True:
        await trio.sleep(interval)
        try:
            derp = (await DerpSources.read(config)).derp_map(config, region)
        except ConfigError as exc:
            log.warning("DERP map refresh failed, keeping the current map: %s", exc)
            continue
        if control.streams.set_derp_map(derp):
            log.info("DERP map changed: %d region(s) now", len(derp.regions or {}))


def relay_region(
    config: Config, relay: RelayServer, *, control_url: str | None = None, node_name: str | None = None
) -> DERPRegion:
    """The running relay as the one-node DERP region ``derp.server`` describes.

    HostName is ``derp.server.hostname``, by default the host of ``control_url`` when
    the relay is served on the control port (pass the server's URL then), else the
    listen host. The DERP port is ``public_derp_port``, else the URL's port (80 or 443
    by its scheme when it has none), else the bound one; the STUN port is
    ``public_stun_port`` or the bound one. CertName pins the self-signed certificate,
    if that is in use. The node is named ``node_name``, else ``derp.server.node_name``.
    """
    ds = config.derp.server
    host_name = ds.hostname or None
    derp_port = ds.public_derp_port or None
    if control_url is not None and relay.config.listen_port is None:
        url = urllib.parse.urlsplit(control_url)
        host_name = host_name or url.hostname
        derp_port = derp_port or url.port or (443 if url.scheme == "https" else 80)
    return relay.derp_region(
        region_id=ds.region_id, region_code=ds.region_code, region_name=ds.region_name,
        host_name=host_name, ipv4=ds.ipv4 or None, node_name=node_name or ds.node_name or None,
        public_derp_port=derp_port, public_stun_port=ds.public_stun_port or None,
    )
