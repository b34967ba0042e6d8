"""DNS, complete: extra records (inline or a watched JSON file, every change an event),
reverse zones of the tailnet prefixes, and override_local_dns as Headscale documents it,
read from the DNSConfig a client receives."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
import trio

from cli.config import ConfigError, load_config
from cli.settings import reverse_zones
from eventlog.events import DnsExtraRecord, DnsExtraRecordsSet
from projections import CommandError
from projections import commands as c
from projections.tailcfg import DNSConfig
from protocol import MapStream

from .control_harness import SimNode, make_key, running


def test_reverse_zones_cover_the_prefixes_at_octet_and_nibble_boundaries() -> None:
    import ipaddress

    zones = reverse_zones(ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("fd7a:115c:a1e0::/48"))
    assert zones[0] == "64.100.in-addr.arpa." and zones[63] == "127.100.in-addr.arpa."
    assert zones[64:] == ["0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa."]
    assert reverse_zones(ipaddress.ip_network("10.1.2.0/23")) == ["2.1.10.in-addr.arpa.", "3.1.10.in-addr.arpa."]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"name": "x"}, "expected a list"),
        ([{"name": "bad name", "type": "A", "value": "1.2.3.4"}], "is not a DNS name"),
        ([{"name": "a.b", "type": "MX", "value": "1.2.3.4"}], "not supported"),
        ([{"name": "a.b", "type": "A", "value": "fd00::1"}], "is not an IPv4 address"),
        ([{"name": "a.b", "type": "AAAA", "value": "nope"}], "is not an IP address"),
    ],
)
def test_bad_records_are_explained(raw: object, message: str) -> None:
    with pytest.raises(CommandError, match=message):
        c.parse_extra_records(raw)


def test_config_checks_dns(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[dns]\noverride_local_dns = true\n")
    with pytest.raises(ConfigError, match=r"needs dns\.nameservers"):
        load_config(f, {})
    f.write_text('[dns]\nextra_records = [{name = "x.y", type = "A", value = "::1"}]\n')
    with pytest.raises(ConfigError, match=r"dns.extra_records\[0\]: '::1' is not an IPv4 address"):
        load_config(f, {})


async def test_a_bad_records_file_stops_the_start(tmp_path: Path) -> None:
    records = tmp_path / "records.json"
    records.write_text("[{")
    with pytest.raises(ExceptionGroup) as info:
        async with running(tmp_path / "data", dns={"extra_records_path": str(records)}):
            pass
    assert info.group_contains(ConfigError, match="is not JSON")


async def _next_dns(stream: MapStream) -> DNSConfig:
    with trio.fail_after(10):
        async for msg in stream:
            if msg.dns_config is not None:
                return msg.dns_config
    raise AssertionError("stream ended")


async def test_extra_records_file_is_followed_and_recorded(tmp_path: Path) -> None:
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"name": "grafana.example.internal", "type": "A", "value": "100.64.0.9"}]))
    dns = {"extra_records_path": str(records), "nameservers": ["9.9.9.9"]}
    async with running(tmp_path / "data", dns=dns, derp={"server": {"enabled": False}}) as server:
        key = await make_key(server)
        a = SimNode.new("alpha")
        async with a.connect(server) as client:
            await client.register(a.register_request(key))
            async with client.map_stream(a.map_request()) as stream:
                got = await _next_dns(stream)
                assert [(r.name, r.type, r.value) for r in got.extra_records or []] == [
                    ("grafana.example.internal", "A", "100.64.0.9")
                ]
                # Not overriding local DNS: the name servers are fallbacks (Headscale).
                assert got.resolvers is None and [r.addr for r in got.fallback_resolvers or []] == ["9.9.9.9"]
                assert (got.routes or {}).get("64.100.in-addr.arpa.") == []
                assert "0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa." in (got.routes or {})

                head = server.tailnet.state.seq
                records.write_text(json.dumps([{"name": "db.example.internal", "type": "AAAA", "value": "fd7a::5"}]))
                got = await _next_dns(stream)
                assert [(r.name, r.value) for r in got.extra_records or []] == [("db.example.internal", "fd7a::5")]
        events = [(e.event, str(e.actor)) for e in server.store.read() if isinstance(e.event, DnsExtraRecordsSet)]
        assert [(ev.records, actor) for ev, actor in events] == [
            ((DnsExtraRecord(name="grafana.example.internal", type="A", value="100.64.0.9"),), "system:dns-records"),
            ((DnsExtraRecord(name="db.example.internal", type="AAAA", value="fd7a::5"),), "system:dns-records"),
        ]
        assert server.tailnet.state.seq == head + 1


async def test_override_local_dns_makes_the_name_servers_the_resolvers(tmp_path: Path) -> None:
    dns = {"override_local_dns": True, "nameservers": ["9.9.9.9"], "extra_records": [
        {"name": "wiki.corp", "type": "A", "value": "100.64.0.7"}]}
    async with running(tmp_path, dns=dns, derp={"server": {"enabled": False}}) as server:
        key = await make_key(server)
        a = SimNode.new("alpha")
        async with a.connect(server) as client:
            await client.register(a.register_request(key))
            async with client.map_stream(a.map_request()) as stream:
                got = await _next_dns(stream)
        assert [r.addr for r in got.resolvers or []] == ["9.9.9.9"] and got.fallback_resolvers is None
        assert msgspec.to_builtins(got.extra_records) == [{"Name": "wiki.corp", "Type": "A", "Value": "100.64.0.7"}]
