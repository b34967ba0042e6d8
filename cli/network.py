"""The network services of ``tailledger serve``: the control port and the relay.

The control port serves ``/key`` and ``/ts2021`` (the Tailscale control protocol) and
hands every other HTTP request to hypercorn running the Quart app (:mod:`cli.web`).
The embedded DERP relay (on by default) runs beside it with its own consumer of the log
and becomes region ``derp.server.region_id`` of the DERP map. Unless it is given a
listener of its own (``derp.server.listen_addr``) it is served on the control port at
``/derp``, as Headscale does, and the map names it by the server URL's host and port.

The DERP map is assembled at start-up (:func:`assemble_derp_map`) and again every
``derp.auto_update_interval`` when files or URLs are configured: ``derp.paths`` files,
then ``derp.urls`` documents, then the embedded region; a changed map is pushed to every
connected client; ``docs/derp.md`` explains
the options. :func:`relay_config` turns ``derp.server`` into the relay's settings for
``tailledger serve`` and ``tailledger relay`` alike.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import urllib.parse
from collections.abc import Mapping
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import msgspec
import trio

from projections import AddressPlan, AllocationMode, ProjectionRunner
from projections.derpmap import (
    DerpMapError,
    DerpMapSource,
    merge_derp_maps,
    parse_derp_map,
    single_point_of_failure,
)
from projections.netmap import NetmapSettings
from projections.policy import TailnetSettings
from projections.policystate import PolicyCompiler
from projections.presence import PresenceTable
from projections.presence_io import persist_presence
from projections.tailcfg import DERPMap, DERPNode, DERPRegion, DNSConfig, DNSResolver
from protocol import (
    ConnectionStats,
    DerpRoute,
    ServeOptions,
    generate_private_key,
    public_key,
    serve_control,
)
from protocol.control import Control, ControlLimits, ControlSettings
from protocol.ha import PolicyAutoApprover, RouteFailover
from protocol.registrations import PendingLimits, PendingRegistrations
from protocol.sshcheck import SshChecks

from .config import (
    DEFAULT_METRICS_LISTEN_ADDR,
    DEFAULT_RELAY_LISTEN_ADDR,
    DEFAULT_STUN_PORT,
    Config,
    ConfigError,
    read_mesh_key,
    split_host_port,
)
from .durations import parse_duration
from .leader import while_leading
from .web import make_app, serve_metrics

if TYPE_CHECKING:
    from relay.serve import RelayConfig, RelayServer

    from .server import Server

__all__ = [
    "TAILSCALE_DEFAULT_DERP_MAP_URL",
    "assemble_derp_map",
    "dns_config",
    "load_noise_key",
    "relay_config",
    "relay_region",
    "serve_options",
    "start_network",
]

log = logging.getLogger("tailledger")


def _seconds(text: str) -> float:
    """A positive duration from the configuration (checked by cli.config.validate)."""
    duration = parse_duration(text)
    assert duration is not None
    return duration.total_seconds()


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


def reverse_zones(*prefixes: ipaddress.IPv4Network | ipaddress.IPv6Network | None) -> list[str]:
    """The reverse-DNS zones (``in-addr.arpa.``, ``ip6.arpa.``) covering the tailnet's
    prefixes, as Tailscale and Headscale hand them out with MagicDNS: each prefix
    widened to its enclosing octet (IPv4) or nibble (IPv6) boundary, one zone per
    subnet of that size (``100.64.0.0/10`` gives ``64.100.in-addr.arpa.`` …
    ``127.100.in-addr.arpa.``), so that 100.100.100.100 answers PTR queries for
    tailnet addresses."""
    zones: list[str] = []
    for net in prefixes:
        if net is None:
            continue
        unit = 8 if net.version == 4 else 4
        bits = -(-net.prefixlen // unit) * unit  # rounded up to the boundary
        for sub in net.subnets(new_prefix=bits) if bits > net.prefixlen else (net,):
            # reverse_pointer names the whole address, most specific label first; the
            # zone is its last bits/unit labels before "in-addr.arpa" / "ip6.arpa".
            labels = sub.network_address.reverse_pointer.split(".")
            zones.append(".".join(labels[len(labels) - 2 - bits // unit :]) + ".")
    return zones


def dns_config(config: Config) -> DNSConfig:
    """The ``tailcfg.DNSConfig`` of ``[dns]``, with Headscale's semantics:
    ``override_local_dns`` makes the name servers the clients' resolvers for every
    query; without it they are fallback resolvers and clients keep their own DNS.
    ``split`` sends a suffix to its servers; MagicDNS adds the base domain to the
    search domains and answers the tailnet's reverse zones."""
    dns = config.dns
    resolvers = [DNSResolver(addr=ns) for ns in dns.nameservers] or None
    routes: dict[str, list[DNSResolver] | None] = {
        suffix: [DNSResolver(addr=ns) for ns in servers] for suffix, servers in dns.split.items()
    }
    if dns.magic_dns:
        plan = address_plan(config)
        for zone in reverse_zones(plan.ipv4, plan.ipv6):
            routes.setdefault(zone, [])  # [] = answered by 100.100.100.100
    domains = [*([dns.base_domain] if dns.magic_dns else []), *dns.search_domains]
    return DNSConfig(
        resolvers=resolvers if dns.override_local_dns else None,
        fallback_resolvers=None if dns.override_local_dns else resolvers,
        routes=routes or None,
        domains=domains or None,
        proxied=dns.magic_dns,
    )


def address_plan(config: Config) -> AddressPlan:
    v4 = ipaddress.IPv4Network(config.prefixes.v4) if config.prefixes.v4 else None
    v6 = ipaddress.IPv6Network(config.prefixes.v6) if config.prefixes.v6 else None
    return AddressPlan(v4, v6, AllocationMode(config.prefixes.allocation))


#: Tailscale's public DERP map. Listed in ``derp.urls`` it is the *default regions*
#: source of :func:`projections.derpmap.merge_derp_maps`: below every other source,
#: and dropped by ``derp.omit_default_regions`` or a source's ``omitDefaultRegions``.
TAILSCALE_DEFAULT_DERP_MAP_URL = "https://controlplane.tailscale.com/derpmap/default"


def assemble_derp_map(
    config: Config,
    *,
    files: Mapping[str, bytes],
    urls: Mapping[str, bytes],
    embedded: DERPRegion | None,
) -> DERPMap:
    """The DERP map clients get, from already-read sources (pure).

    Sources in order: ``derp.paths`` files, then ``derp.urls`` documents, then the
    embedded relay's region (which wins over a same-ID region). Tailscale's public
    map, if listed in ``derp.urls``, goes *below* everything as the default regions
    and is left out entirely when ``derp.omit_default_regions`` is true or any source
    says ``"omitDefaultRegions": true``.

    Args:
        config: The configuration (``derp.paths``, ``derp.urls``, ``omit_default_regions``).
        files: Contents of every ``derp.paths`` entry.
        urls: Body fetched from every ``derp.urls`` entry.
        embedded: The embedded relay's region, or ``None``.

    Raises:
        ConfigError: a source is not a valid DERP map (the message names it).
    """
    default: DerpMapSource | None = None
    sources: list[DerpMapSource] = []
    try:
        sources.extend(parse_derp_map(files[p], name=p) for p in config.derp.paths)
        for url in config.derp.urls:
            source = parse_derp_map(urls[url], name=url)
            if url.rstrip("/") == TAILSCALE_DEFAULT_DERP_MAP_URL:
                default = source
            else:
                sources.append(source)
        return merge_derp_maps(
            sources,
            default_map=default,
            embedded=embedded,
            omit_default_regions=config.derp.omit_default_regions,
        )
    except DerpMapError as exc:
        raise ConfigError(f"derp: {exc}") from None


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
    expiry = parse_duration(config.node_key_expiry)
    settings = ControlSettings(
        public_url=config.public_url,
        plan=address_plan(config),
        netmap=NetmapSettings(domain=config.dns.base_domain, derp_map=derp, dns=dns_config(config)),
        node_key_expiry=expiry,
        ephemeral_timeout=parse_duration(config.ephemeral_node_inactivity_timeout),
        full_map_concurrency=config.tuning.full_map_concurrency,
        full_map_turn=_seconds(config.tuning.full_map_turn_timeout),
        keepalive_interval=_seconds(config.tuning.map_keepalive_interval),
        limits=control_limits(config),
    )
    limits = config.limits
    pending = PendingRegistrations(
        server.side,
        server.tailnet,
        PendingLimits(
            max_total=limits.pending_registrations_max,
            max_per_source=limits.pending_registrations_per_address,
            ttl=timedelta(seconds=_seconds(limits.pending_registration_ttl)),
        ),
    )
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
    grace = parse_duration(config.tuning.route_failover_grace)
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
    interval = parse_duration(config.derp.auto_update_interval)
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


def tailnet_settings(config: Config) -> TailnetSettings:
    """The capabilities of ``[taildrop]`` and ``[capabilities]`` for every node's CapMap."""
    caps = config.capabilities
    return TailnetSettings(
        file_sharing=config.taildrop.enabled,
        ssh=caps.ssh,
        suggest_exit_nodes=caps.suggest_exit_nodes,
        auto_update_default=caps.auto_update_default,
    )


def control_limits(config: Config) -> ControlLimits:
    """The ``[limits]`` of map streams and node updates (checked by cli.config.validate)."""
    limits = config.limits
    return ControlLimits(
        max_hostinfo_bytes=limits.max_hostinfo_bytes,
        max_hostname_length=limits.max_hostname_length,
        max_advertised_routes=limits.max_advertised_routes,
        node_update_burst=limits.node_update_burst,
        node_update_interval=_seconds(limits.node_update_interval),
    )


def serve_options(config: Config) -> ServeOptions:
    """The control port's limits from ``[limits]`` (checked by cli.config.validate)."""
    limits = config.limits
    return ServeOptions(
        head_timeout=_seconds(limits.head_timeout),
        body_timeout=_seconds(limits.body_timeout),
        tunnel_idle_timeout=_seconds(limits.tunnel_idle_timeout),
        write_timeout=_seconds(limits.write_timeout),
        max_outgoing_buffer=limits.max_outgoing_buffer,
        max_connections=limits.max_connections,
        max_connections_per_address=limits.max_connections_per_address,
        cap_exempt=tuple(ipaddress.ip_network(n, strict=False) for n in limits.connection_cap_exempt),
        tls_handshake_timeout=_seconds(limits.tls_handshake_timeout),
    )


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


def relay_config(config: Config, *, on_control_port: bool = False) -> RelayConfig:
    """The relay's settings from ``derp.server`` (the same for ``serve`` and ``relay``).

    With ``on_control_port`` the relay has no listener of its own: the control port
    hands it ``/derp`` (see :func:`relay_region` for how the map names it). Its TLS is
    then the control port's when the server URL is ``https`` (the control port's own
    certificate, or a proxy in front), else its own self-signed certificate, which the
    control port serves to connections that open with a TLS ClientHello.

    Raises:
        ConfigError: a listen address is malformed or the mesh key file is unusable.
    """
    from relay.serve import MeshPeer, RelayConfig

    ds = config.derp.server
    listen_port: int | None
    if on_control_port:
        url = urllib.parse.urlsplit(config.public_url)
        host, port = config.listen
        listen_port = None
        url_host = url.hostname or host
        own_tls = url.scheme != "https"
    else:
        host, port = split_host_port(ds.listen_addr or DEFAULT_RELAY_LISTEN_ADDR, "derp.server.listen_addr")
        listen_port = port
        url_host = host
        own_tls = True
    if ds.stun_listen_addr:
        stun_host, stun_port = split_host_port(ds.stun_listen_addr, "derp.server.stun_listen_addr")
    else:
        stun_host, stun_port = host, DEFAULT_STUN_PORT
    tls: Literal["self-signed", "files", "off"] = (
        "off" if not (ds.tls and own_tls) else ("files" if ds.cert_file else "self-signed")
    )
    return RelayConfig(
        data_dir=str(config.data_path / "relay"),
        listen_host=host,
        listen_port=listen_port,
        tls=tls,
        cert_file=ds.cert_file or None,
        key_file=ds.key_file or None,
        hostnames=(ds.hostname or url_host,),
        stun=ds.stun,
        stun_host=stun_host,
        stun_port=stun_port,
        stun_required=bool(ds.stun_listen_addr),
        mesh_key=read_mesh_key(ds),
        rate_limit=ds.rate_limit,
        rate_burst=ds.rate_burst,
        max_conns_per_key=ds.max_conns_per_key,
        key_limit_policy="refuse_new" if ds.key_limit_policy == "refuse_new" else "close_oldest",
        mesh_with=tuple(
            MeshPeer(url=p.url, cert_name=p.cert_name or None, dial_host=p.dial_host or None)
            for p in ds.mesh_with
            if not _is_this_relay(
                p.url, p.dial_host, names={ds.hostname, host, url_host} - {""}, ports={port, ds.public_derp_port} - {0}
            )
        ),
    )


def _is_this_relay(url: str, dial_host: str, *, names: set[str], ports: set[int]) -> bool:
    """Whether a ``mesh_with`` URL names the relay being configured.

    Every relay of a region can then share one ``mesh_with`` list, as with
    derper's ``--mesh-with``. Skipping ourselves here matters: a relay refuses a
    client that presents the relay's own key, so a self-link would never come
    up and would be retried (and logged) forever.
    """
    parts = urllib.parse.urlsplit(url)
    try:
        peer_port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    hosts = {h for h in (parts.hostname, dial_host) if h}
    return peer_port in ports and bool(hosts & {n.strip("[]").lower() for n in names})


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
