"""Tailnet DNS settings changed through the admin API (``/api/v2/tailnet/-/dns/...``)."""

from __future__ import annotations

import msgspec

from .base import Event

__all__ = ["DnsExtraRecord", "DnsExtraRecordsSet", "DnsSet"]


class DnsSet(Event, frozen=True, kw_only=True, tag="dns.set"):
    """The tailnet's DNS settings are now these; ``None`` means "as configured"
    (``[dns]`` of the configuration file). Each field is the whole new value, so any
    past DNS setting reads back from one event."""

    nameservers: tuple[str, ...] | None = None
    search_paths: tuple[str, ...] | None = None
    magic_dns: bool | None = None


class DnsExtraRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One extra MagicDNS record: ``name`` resolves to ``value`` (an A or AAAA record)."""

    name: str
    type: str
    value: str


class DnsExtraRecordsSet(Event, frozen=True, kw_only=True, tag="dns.extra_records_set"):
    """The tailnet's extra DNS records (``dns.extra_records`` or the watched
    ``dns.extra_records_path`` file) are now ``records``, all of them, so the replay
    knows which names resolved where at any time. ``source`` says where they came from
    (``config`` or the file's path)."""

    records: tuple[DnsExtraRecord, ...]
    source: str
