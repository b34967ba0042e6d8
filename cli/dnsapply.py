"""The tailnet's DNS settings: the configuration's ``[dns]``, overridden by what was
set through the admin API and recorded in the log (``dns.set``).

:func:`effective_dns` merges the two; :func:`follow_dns` keeps the control server's
DNS configuration equal to it, so a change made through the API reaches every open map
stream at once (and a restart reads it back from the log).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from projections.state import TailnetState
from projections.tailcfg import DNSConfig, DNSRecord

from .config import Config
from .config import DNSConfig as DNSSettings
from .settings import dns_config

if TYPE_CHECKING:
    import trio

    from projections import ProjectionRunner
    from protocol.control import Control

__all__ = ["effective_dns", "effective_dns_settings", "follow_dns"]


def effective_dns_settings(config: Config, state: TailnetState) -> DNSSettings:
    """``[dns]`` of the configuration with the log's settings in place of its own."""
    dns = config.dns
    return msgspec.structs.replace(
        dns,
        nameservers=list(state.dns_nameservers) if state.dns_nameservers is not None else dns.nameservers,
        search_domains=list(state.dns_search_paths) if state.dns_search_paths is not None else dns.search_domains,
        magic_dns=state.dns_magic_dns if state.dns_magic_dns is not None else dns.magic_dns,
    )


def effective_dns(config: Config, state: TailnetState) -> DNSConfig:
    """The DNS configuration clients get for ``state`` (with the log's extra records)."""
    merged = msgspec.structs.replace(config, dns=effective_dns_settings(config, state))
    out = dns_config(merged)
    if state.dns_extra_records:
        records = [DNSRecord(name=r.name, type=r.type, value=r.value) for r in state.dns_extra_records]
        out = msgspec.structs.replace(out, extra_records=records)
    return out


def _key(state: TailnetState) -> tuple[object, ...]:
    return (state.dns_nameservers, state.dns_search_paths, state.dns_magic_dns, state.dns_extra_records)


async def follow_dns(
    config: Config, runner: ProjectionRunner, control: Control,
    *, task_status: trio.TaskStatus[None],
) -> None:
    """Apply the log's DNS settings now and after every change, until cancelled."""
    with runner.subscribe() as sub:
        state = runner.state
        last = _key(state)
        control.streams.set_dns(effective_dns(config, state))
        task_status.started()
        while True:
            state, delta = await sub.next()
            if delta.dns or _key(state) != last:
                last = _key(state)
                control.streams.set_dns(effective_dns(config, state))
