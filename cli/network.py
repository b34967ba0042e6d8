"""The network services of ``tailledger serve``: the control port and the relay.

The control port serves ``/key`` and ``/ts2021`` (the Tailscale control protocol) and
hands every other HTTP request to hypercorn running the Quart app (:mod:`cli.web`).
The embedded DERP relay, when enabled, runs beside it with its own consumer of the log
and becomes region ``derp.server.region_id`` of the DERP map.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import trio

from projections import AddressPlan, AllocationMode, ProjectionRunner
from projections.derpmap import (
    DerpMapSource,
    merge_derp_maps,
    parse_derp_map,
    single_point_of_failure,
)
from projections.netmap import NetmapSettings
from projections.presence import PresenceTable
from projections.tailcfg import DERPMap, DNSConfig, DNSResolver
from protocol import generate_private_key, public_key, serve_control
from protocol.control import Control, ControlSettings

from .config import Config, split_host_port
from .durations import parse_duration
from .web import make_app

if TYPE_CHECKING:
    from relay.serve import RelayConfig

    from .server import Server

__all__ = ["dns_config", "load_noise_key", "start_network"]

log = logging.getLogger("tailledger")


def load_noise_key(data_dir: Path) -> bytes:
    """The server's Noise private key, made on first start (``noise_private.key``).

    Clients do not pin it, but a changed key makes every client re-fetch ``/key``;
    keep the file with the data.
    """
    path = data_dir / "noise_private.key"
    if path.exists():
        text = path.read_text().strip()
        return bytes.fromhex(text.removeprefix("privkey:"))
    key = generate_private_key()
    path.touch(mode=0o600)
    path.write_text(f"privkey:{key.hex()}\n")
    return key


def dns_config(config: Config) -> DNSConfig:
    dns = config.dns
    resolvers = [DNSResolver(addr=ns) for ns in dns.nameservers] or None
    routes: dict[str, list[DNSResolver] | None] = {
        suffix: [DNSResolver(addr=ns) for ns in servers] for suffix, servers in dns.split.items()
    }
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


def _file_sources(config: Config) -> list[DerpMapSource]:
    return [parse_derp_map(Path(p).read_bytes(), name=p) for p in config.derp.paths]


async def start_network(server: Server, nursery: trio.Nursery) -> None:
    config = server.config
    presence = PresenceTable()
    server.presence = presence
    derp = DERPMap(regions={})
    if config.derp.server.enabled:
        derp = await _start_relay(server, nursery)
    sources = _file_sources(config)
    for url in config.derp.urls:
        from relay.fetch import fetch_derp_map

        with trio.fail_after(30):
            sources.append(parse_derp_map(await fetch_derp_map(url), name=url))
    if sources:
        derp = merge_derp_maps([*sources], embedded=(derp.regions or {}).get(config.derp.server.region_id) if config.derp.server.enabled else None, omit_default_regions=config.derp.omit_default_regions)
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
    )
    control = Control(server.tailnet, presence, settings)
    server.control = control
    control.register_admin_ops(server.ops)
    await nursery.start(control.run)
    key = await trio.to_thread.run_sync(load_noise_key, config.data_path)
    server.noise_public = public_key(key)
    ctx = None
    if config.tls.cert_file:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(config.tls.cert_file, config.tls.key_file)
    host, port = config.listen
    server.port = await nursery.start(
        lambda task_status: serve_control(
            host=host, port=port, server_key=key, handler=control, asgi_app=make_app(server),
            ssl_context=ctx, task_status=task_status,
        )
    )
    if port == 0 and not config.server_url:
        scheme = "https" if ctx is not None else "http"
        control.public_url = f"{scheme}://{host}:{server.port}"


def relay_config(config: Config) -> RelayConfig:
    """The relay's settings from ``derp.server``."""
    from relay.serve import RelayConfig

    ds = config.derp.server
    host, port = split_host_port(ds.listen_addr, "derp.server.listen_addr")
    stun_host, stun_port = split_host_port(ds.stun_listen_addr, "derp.server.stun_listen_addr")
    tls: Literal["self-signed", "files", "off"] = (
        "off" if not ds.tls else ("files" if ds.cert_file else "self-signed")
    )
    return RelayConfig(
        data_dir=str(config.data_path / "relay"),
        listen_host=host,
        listen_port=port,
        tls=tls,
        cert_file=ds.cert_file or None,
        key_file=ds.key_file or None,
        hostnames=(ds.hostname or host,),
        stun_host=stun_host,
        stun_port=stun_port,
    )


async def _start_relay(server: Server, nursery: trio.Nursery) -> DERPMap:
    from relay.logauth import LogAuthorizer
    from relay.serve import serve_relay

    config = server.config
    ds = config.derp.server
    rc = relay_config(config)
    public_host = rc.hostnames[0]
    # The relay is its own consumer of the log: its own runner and checkpoint.
    runner = ProjectionRunner(server.log, server.checkpoints, name="relay")
    await nursery.start(runner.run)
    auth = LogAuthorizer(runner)
    auth.refresh()
    relay = await nursery.start(serve_relay, rc, auth)
    server.relay = relay
    await nursery.start(auth.run, relay.revoke)
    region = relay.derp_region(
        region_id=ds.region_id, region_code=ds.region_code, region_name=ds.region_name,
        host_name=public_host, ipv4=ds.ipv4 or None,
    )
    return merge_derp_maps([], embedded=region)
