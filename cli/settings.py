"""Settings from the configuration: pure functions of a :class:`~cli.config.Config`.

Each turns a section of the validated configuration into the settings object of the
package that uses it: the control logic (:func:`control_settings`, with the DNS and
address plan of the netmap and the ``[limits]`` of map streams), the control port
(:func:`serve_options`), pending registrations (:func:`pending_limits`), the relay
(:func:`relay_config`, for ``tailledger serve`` and ``tailledger relay`` alike) and the
DERP map (:func:`assemble_derp_map`, from sources already read). Durations come parsed
from :attr:`Config.durations`. Nothing here starts, opens or fetches anything; the
composition of the running server is :mod:`cli.server` (with :mod:`cli.network`).
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Mapping
from datetime import timedelta
from typing import Literal

from projections import AddressPlan, AllocationMode
from projections.derpmap import DerpMapError, DerpMapSource, merge_derp_maps, parse_derp_map
from projections.netmap import NetmapSettings
from projections.policy import TailnetSettings
from projections.tailcfg import DERPMap, DERPRegion, DNSConfig, DNSResolver
from protocol import ServeOptions
from protocol.control import ControlLimits, ControlSettings
from protocol.registrations import PendingLimits
from relay.serve import MeshPeer, RelayConfig

from .config import (
    DEFAULT_RELAY_LISTEN_ADDR,
    DEFAULT_STUN_PORT,
    Config,
    ConfigError,
    read_mesh_key,
    split_host_port,
)

__all__ = [
    "TAILSCALE_DEFAULT_DERP_MAP_URL",
    "address_plan",
    "assemble_derp_map",
    "control_limits",
    "control_settings",
    "dns_config",
    "pending_limits",
    "relay_config",
    "reverse_zones",
    "serve_options",
    "tailnet_settings",
]


def control_settings(config: Config, derp_map: DERPMap) -> ControlSettings:
    """The control logic's settings: URL, address plan, netmap (DNS and ``derp_map``),
    key expiry, the map streams' tuning and ``[limits]``."""
    durations = config.durations
    return ControlSettings(
        public_url=config.public_url,
        plan=address_plan(config),
        netmap=NetmapSettings(domain=config.dns.base_domain, derp_map=derp_map, dns=dns_config(config)),
        node_key_expiry=durations.node_key_expiry,
        ephemeral_timeout=durations.ephemeral_node_inactivity_timeout,
        full_map_concurrency=config.tuning.full_map_concurrency,
        full_map_turn=durations.full_map_turn_timeout,
        keepalive_interval=durations.map_keepalive_interval,
        limits=control_limits(config),
    )


def pending_limits(config: Config) -> PendingLimits:
    """The bounds on pending interactive registrations (``[limits]``)."""
    limits = config.limits
    return PendingLimits(
        max_total=limits.pending_registrations_max,
        max_per_source=limits.pending_registrations_per_address,
        ttl=timedelta(seconds=config.durations.pending_registration_ttl),
    )


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
        node_update_interval=config.durations.node_update_interval,
    )


def serve_options(config: Config) -> ServeOptions:
    """The control port's limits from ``[limits]`` (checked by cli.config.validate)."""
    limits, d = config.limits, config.durations
    return ServeOptions(
        head_timeout=d.head_timeout, body_timeout=d.body_timeout, tunnel_idle_timeout=d.tunnel_idle_timeout,
        write_timeout=d.write_timeout, tls_handshake_timeout=d.tls_handshake_timeout,
        max_outgoing_buffer=limits.max_outgoing_buffer,
        max_connections=limits.max_connections,
        max_connections_per_address=limits.max_connections_per_address,
        cap_exempt=tuple(ipaddress.ip_network(n, strict=False) for n in limits.connection_cap_exempt),
    )


def relay_config(config: Config, *, on_control_port: bool = False) -> RelayConfig:
    """The relay's settings from ``derp.server`` (the same for ``serve`` and ``relay``).

    With ``on_control_port`` the relay has no listener of its own: the control port
    hands it ``/derp`` (see :func:`cli.network.relay_region` for how the map names it). Its TLS is
    then the control port's when the server URL is ``https`` (the control port's own
    certificate, or a proxy in front), else its own self-signed certificate, which the
    control port serves to connections that open with a TLS ClientHello.

    Raises:
        ConfigError: a listen address is malformed or the mesh key file is unusable.
    """
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
