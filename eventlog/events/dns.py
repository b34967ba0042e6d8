"""Tailnet DNS settings changed through the admin API (``/api/v2/tailnet/-/dns/...``)."""

from __future__ import annotations

from .base import Event

__all__ = ["DnsSet"]


class DnsSet(Event, frozen=True, kw_only=True, tag="dns.set"):
    """The tailnet's DNS settings are now these; ``None`` means "as configured"
    (``[dns]`` of the configuration file). Each field is the whole new value, so any
    past DNS setting reads back from one event."""

    nameservers: tuple[str, ...] | None = None
    search_paths: tuple[str, ...] | None = None
    magic_dns: bool | None = None
