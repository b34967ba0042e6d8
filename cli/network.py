"""The network services of ``tailledger serve``: the control port and the relay.

The control port serves ``/key`` and ``/ts2021`` (the Tailscale control protocol) and
hands every other HTTP request to hypercorn running the Quart app (:mod:`cli.web`).
The embedded DERP relay (on by default) runs beside it with its own consumer of the log
and becomes region ``derp.server.region_id`` of the DERP map. Unless it is given a
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
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import trio

from projections import ProjectionRunner
from projections.derpmap import (
    single_point_of_failure,
)
from projections.policystate import PolicyCompiler
from projections.presence import PresenceTable
from projections.presence_io import persist_presence
from projections.tailcfg import DERPNode, DERPRegion
from protocol import (
    ConnectionStats,
    DerpRoute,
    generate_private_key,
    public_key,
    serve_control,
)
from protocol.control import Control
from protocol.ha import PolicyAutoApprover, RouteFailover
from protocol.registrations import PendingRegistrations
from protocol.sshcheck import SshChecks

from .config import (
    DEFAULT_METRICS_LISTEN_ADDR,
    Config,
    ConfigError,
    read_mesh_key,
    split_host_port,
)
from .leader import while_leading
from .settings import (
    assemble_derp_map,
    control_settings,
    pending_limits,
    relay_config,
    serve_options,
    tailnet_settings,
)
from .web import make_app, serve_metrics

if TYPE_CHECKING:
    from relay.serve import RelayServer

    from .server import Server

__all__ = ["load_noise_key", "relay_region", "start_network"]

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


async def _read_derp_sources(config: Config) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Read the ``derp.paths`` files and fetch the ``derp.urls`` (once, at start-up)."""
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
    return files, urls


async def start_network(server: Server, nursery: trio.Nursery) -> None:
    config = server.config
    presence = PresenceTable()
    server.presence = presence
    # Restored before the control logic starts: its ephemeral-node clean-up reads it.
    await nursery.start(
        persist_presence, presence, server.side, lambda: server.tailnet.clock(), server.tailnet.state.nodes
    )
    from eventlog.pgstore import PostgresSideTables

    replicas = server.side if isinstance(server.side, PostgresSideTables) else None
    if replicas is not None:
        # Replicas on one PostgreSQL log: live presence travels between them.
        from projections.presence_share import share_presence

        await nursery.start(share_presence, presence, replicas, server.replica_id)
    ds = config.derp.server
    on_control_port = ds.enabled and not ds.listen_addr
    node_name = ds.node_name or None
    mesh_key = None
    if replicas is not None and ds.enabled:
        # The replicas' relays mesh into one region (cli/relaymesh.py): one mesh key,
        # a node name each.
        from .relaymesh import shared_mesh_key

        mesh_key = await shared_mesh_key(replicas, read_mesh_key(ds))
        node_name = node_name or f"{ds.region_id}-{server.replica_id}"
    relay = (
        await _start_relay(server, nursery, on_control_port=on_control_port, mesh_key=mesh_key)
        if ds.enabled
        else None
    )
    # Before the control port is bound (port 0) its URL names the configured port; the
    # map is made again below with the bound one.
    embedded = (
        relay_region(config, relay, control_url=config.public_url, node_name=node_name)
        if relay is not None
        else None
    )
    files, urls = await _read_derp_sources(config)
    derp = assemble_derp_map(config, files=files, urls=urls, embedded=embedded)
    if single_point_of_failure(derp):
        log.warning(
            "the DERP map has a single relay: it is a single point of failure for NAT traversal; "
            "add regions or mesh relays for production"
        )
    settings = control_settings(config, derp)
    pending = PendingRegistrations(server.side, server.tailnet, pending_limits(config))
    policy = PolicyCompiler(settings.public_url, tailnet_settings(config))
    control = Control(server.tailnet, presence, settings, pending=pending, policy=policy)
    server.control = control
    control.register_admin_ops(server.ops)
    ssh_checks = SshChecks(server.tailnet, lambda: control.public_url, period=policy.check_period)
    ssh_checks.register_admin_ops(server.ops)
    control.ssh_action = ssh_checks
    server.ssh_checks = ssh_checks
    await nursery.start(control.run)
    # Subnet routers fail over when their primary goes offline (recorded as events).
    grace = config.durations.route_failover_grace
    failover = RouteFailover(
        server.tailnet, presence, control.policy, startup_grace=grace.total_seconds() if grace is not None else 0.0
    )
    server.route_failover = failover
    # Run-once jobs: only the elected replica fails routes over and collects ephemeral
    # nodes (every server on SQLite).
    control.leads = lambda: server.leadership.leading
    await nursery.start(while_leading, server.leadership, failover.run)
    # So is recording the route approvals a policy change implies (an approval an admin
    # revoked meanwhile must not come back from a replica that saw the change late).
    server.auto_approver = PolicyAutoApprover(server.tailnet)
    await nursery.start(while_leading, server.leadership, server.auto_approver.run)
    # Every replica follows the extra DNS records file and the policy file (each
    # machine has its own copy): safe, since each appends only what makes the log
    # match the file, decided against the head with optimistic concurrency, so a
    # change of the file is appended once (tests/cli/test_replica_jobs.py).
    from .dnsrecords import sync_extra_records  # extra DNS records (config or file) into the log

    await nursery.start(sync_extra_records, config, server.tailnet)
    from .dnsapply import follow_dns  # DNS set through the admin API, from the log

    await nursery.start(lambda task_status: follow_dns(config, server.runner, control, task_status=task_status))
    key = await trio.to_thread.run_sync(load_noise_key, config.data_path)
    server.noise_public = public_key(key)
    ctx = None
    if config.tls.cert_file:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(config.tls.cert_file, config.tls.key_file)
    host, port = config.listen
    server.connection_stats = stats = ConnectionStats()
    options = serve_options(config)
    route = None
    if relay is not None and on_control_port:
        # Served at /derp; on a plain-HTTP control port also over the relay's own
        # (self-signed, pinned) TLS, since Tailscale clients dial DERP over https only.
        route = DerpRoute(
            serve_http=relay.serve_handed_off,
            serve_tls=relay.serve_handed_off_tls if relay.cert_name is not None else None,
        )
    server.port = await nursery.start(
        lambda task_status: serve_control(
            host=host, port=port, server_key=key, handler=control, asgi_app=make_app(server),
            ssl_context=ctx, options=options, stats=stats, derp=route, task_status=task_status,
        )
    )
    if port == 0 and not config.server_url:
        scheme = "https" if ctx is not None else "http"
        control.public_url = f"{scheme}://{host}:{server.port}"
        if relay is not None and on_control_port:
            embedded = relay_region(config, relay, control_url=control.public_url, node_name=node_name)
            control.streams.set_derp_map(assemble_derp_map(config, files=files, urls=urls, embedded=embedded))
    region = _EmbeddedRegion(embedded)
    if replicas is not None and relay is not None and embedded is not None and embedded.nodes:
        from .relaymesh import mesh_peer_of, mesh_replicas

        def on_nodes(nodes: list[DERPNode]) -> None:
            # Every live replica's relay is a node of the one embedded region.
            region.set(nodes)
            control.streams.set_derp_map(assemble_derp_map(config, files=files, urls=urls, embedded=region.current))

        own = embedded.nodes[0]
        own_peer = mesh_peer_of(own)
        if relay.config.tls == "off" and relay.config.listen_port is not None and not ds.public_derp_port:
            # A plain-HTTP listener of its own with no TLS proxy in front: dialled as is.
            own_peer["url"] = str(own_peer["url"]).replace("https://", "http://", 1)
        await nursery.start(
            partial(mesh_replicas, own_peer=own_peer), relay, replicas, server.replica_id, own, on_nodes
        )
    interval = config.durations.derp_auto_update_interval
    if interval is not None and (config.derp.paths or config.derp.urls):
        nursery.start_soon(_refresh_derp_map, config, control, region, interval.total_seconds())
    await _start_metrics(server, nursery)


async def _start_metrics(server: Server, nursery: trio.Nursery) -> None:
    """Serve ``/metrics`` on ``metrics_listen_addr`` (not on the control port).

    The default address being taken (another server on this machine) costs only the
    metrics, with a warning; an address the operator chose must be free.
    """
    addr = server.config.metrics_listen_addr
    if not addr:
        log.info("metrics are off (metrics_listen_addr is empty)")
        return
    host, port = split_host_port(addr, "metrics_listen_addr")
    try:
        server.metrics_port = await nursery.start(serve_metrics, server, host, port)
    except OSError as exc:
        if addr != DEFAULT_METRICS_LISTEN_ADDR:
            raise ConfigError(f"metrics_listen_addr: cannot listen on {addr}: {exc.strerror or exc}") from None
        log.warning(
            "metrics NOT served: the default metrics_listen_addr %s is taken (%s); "
            "set metrics_listen_addr to a free local address", addr, exc.strerror or exc,
        )
        return
    log.info("metrics on http://%s:%d/metrics", host, server.metrics_port)


class _EmbeddedRegion:
    """The embedded relay's region as the DERP map shows it now: this relay alone, or,
    between replicas, every live replica's relay (:mod:`cli.relaymesh`)."""

    def __init__(self, region: DERPRegion | None) -> None:
        self.current = region

    def set(self, nodes: list[DERPNode]) -> None:
        if self.current is not None:
            self.current = msgspec.structs.replace(self.current, nodes=nodes)


async def _refresh_derp_map(
    config: Config, control: Control, embedded: _EmbeddedRegion, interval: float
) -> None:
    """Re-read the DERP map sources every ``interval`` seconds; push a changed map to
    every connected client. A source that fails keeps the map in force (logged)."""
    while True:
        await trio.sleep(interval)
        try:
            files, urls = await _read_derp_sources(config)
            derp = assemble_derp_map(config, files=files, urls=urls, embedded=embedded.current)
        except ConfigError as exc:
            log.warning("DERP map refresh failed, keeping the current map: %s", exc)
            continue
        if control.streams.set_derp_map(derp):
            log.info("DERP map changed: %d region(s) now", len(derp.regions or {}))


async def _start_relay(
    server: Server, nursery: trio.Nursery, *, on_control_port: bool, mesh_key: str | None = None
) -> RelayServer:
    from relay.logauth import LogAuthorizer
    from relay.serve import serve_relay

    config = server.config
    rc = relay_config(config, on_control_port=on_control_port)
    if mesh_key is not None:  # the replicas' shared key
        rc = msgspec.structs.replace(rc, mesh_key=mesh_key)
    # The relay is its own consumer of the log: its own runner and checkpoint.
    runner = ProjectionRunner(server.log, server.checkpoints, name="relay")
    await nursery.start(runner.run)
    auth = LogAuthorizer(runner)
    auth.refresh()
    relay: RelayServer = await nursery.start(serve_relay, rc, auth)
    server.relay = relay
    await nursery.start(auth.run, relay.revoke)
    return relay


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
