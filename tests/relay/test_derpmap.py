"""The DERP map projection (pure): parsing JSON/HuJSON, the embedded region, merging."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import msgspec
import pytest
import trio

from projections.derpmap import (
    MAX_REGION_ID,
    DERPHomeParams,
    DERPMap,
    DerpMapError,
    DERPNode,
    DERPRegion,
    embedded_region,
    merge_derp_maps,
    parse_derp_map,
    single_point_of_failure,
    source_from_map,
)
from projections.tailcfg import encode
from relay import DerpMapFetchError, fetch_derp_map

DEFAULT = b"""{
  "Regions": {
    "1": {"RegionID": 1, "RegionCode": "nyc", "RegionName": "New York City",
          "Nodes": [{"Name": "1a", "RegionID": 1, "HostName": "derp1.tailscale.com", "IPv4": "192.0.2.10"}]},
    "2": {"RegionID": 2, "RegionCode": "sfo", "RegionName": "San Francisco",
          "Nodes": [{"Name": "2a", "RegionID": 2, "HostName": "derp2.tailscale.com"}]}
  }
}"""

HUJSON = b"""// our own relays, HuJSON with comments and trailing commas
{
  "Regions": {
    /* Frankfurt */
    "900": {
      "regionid": 900,          // lower-case names, as in Headscale's YAML
      "regioncode": "fra",
      "nodes": [
        {"name": "900a", "hostname": "derp.example.com", "derpport": 8443, "stunport": 3479,},
      ],
    },
    "2": null,                  // drop San Francisco
  },
}"""


def test_parse_json_and_hujson() -> None:
    default = parse_derp_map(DEFAULT, name="default")
    assert sorted(default.regions) == [1, 2]
    region = default.regions[1]
    assert region is not None
    assert region.nodes == [
        DERPNode(name="1a", region_id=1, host_name="derp1.tailscale.com", ipv4="192.0.2.10")
    ]
    ours = parse_derp_map(HUJSON, name="ours.hujson")
    assert ours.regions[2] is None
    fra = ours.regions[900]
    assert fra == DERPRegion(
        region_id=900,
        region_code="fra",
        nodes=[
            DERPNode(
                name="900a",
                region_id=900,
                host_name="derp.example.com",
                derp_port=8443,
                stun_port=3479,
            )
        ],
    )


def test_missing_ids_are_filled_from_the_key() -> None:
    src = parse_derp_map(b'{"Regions": {"901": {"Nodes": [{"HostName": "h"}, {"HostName": "i"}]}}}')
    region = src.regions[901]
    assert region is not None
    assert region.region_id == 901
    assert region.nodes is not None
    assert [(n.name, n.region_id) for n in region.nodes] == [("901a", 901), ("901b", 901)]


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param(b'{"Regions": {"0": {"RegionID": 0}}}', id="zero"),
        pytest.param(b'{"Regions": {"-5": {}}}', id="negative"),
        pytest.param(b'{"Regions": {"%d": {}}}' % (MAX_REGION_ID + 1), id="over-2^53"),
        pytest.param(b'{"Regions": {"nyc": {}}}', id="not-integer"),
        pytest.param(b'{"Regions": {"5": {"RegionID": 6}}}', id="id-mismatch"),
        pytest.param(
            b'{"Regions": {"5": {"Nodes": [{"RegionID": 7, "HostName": "h"}]}}}',
            id="node-id-mismatch",
        ),
        pytest.param(b'{"Regions": {"5": {"Nodes": [{"Name": "x"}]}}}', id="node-without-host"),
        pytest.param(
            b'{"Regions": {"5": {"Nodes": [{"HostName": "h", "DERPPort": "443"}]}}}', id="bad-type"
        ),
        pytest.param(b'{"Regions": [1]}', id="regions-not-object"),
        pytest.param(b"[]", id="not-object"),
        pytest.param(b"{", id="syntax"),
        pytest.param(b'{"omitDefaultRegions": "yes"}', id="bad-omit"),
    ],
)
def test_invalid_sources_are_rejected(doc: bytes) -> None:
    with pytest.raises(DerpMapError):
        parse_derp_map(doc)


def test_largest_region_id_is_accepted() -> None:
    src = parse_derp_map(b'{"Regions": {"%d": {}}}' % MAX_REGION_ID)
    assert MAX_REGION_ID in src.regions


def test_later_sources_override_and_null_deletes() -> None:
    default = parse_derp_map(DEFAULT, name="default")
    ours = parse_derp_map(HUJSON)
    override = parse_derp_map(
        b'{"Regions": {"1": {"RegionCode": "jfk", "Nodes": [{"HostName": "mine"}]}}}'
    )
    merged = merge_derp_maps([ours, override], default_map=default)
    assert sorted(merged.regions or {}) == [1, 900]
    assert (merged.regions or {})[1].region_code == "jfk"
    assert b"null" not in encode(merged)


def test_deleted_then_readded() -> None:
    first = parse_derp_map(b'{"Regions": {"7": null}}')
    second = parse_derp_map(b'{"Regions": {"7": {"RegionCode": "back"}}}')
    merged = merge_derp_maps([first, second])
    assert (merged.regions or {})[7].region_code == "back"


def test_embedded_region_is_off_by_default_and_wins_when_on() -> None:
    default = parse_derp_map(DEFAULT)
    assert 999 not in (merge_derp_maps([], default_map=default).regions or {})
    ours = embedded_region(
        host_name="ctrl.example.com", derp_port=443, stun_port=3478, cert_name="sha256-raw:ab"
    )
    clash = parse_derp_map(b'{"Regions": {"999": {"RegionCode": "someone-else"}}}')
    merged = merge_derp_maps([clash], default_map=default, embedded=ours)
    assert (merged.regions or {})[999] == ours
    node = (ours.nodes or [])[0]
    # Default ports are written as 0 (tailcfg: 0 means 443 / 3478).
    assert (node.name, node.derp_port, node.stun_port, node.cert_name) == (
        "999a",
        0,
        0,
        "sha256-raw:ab",
    )


def test_embedded_region_json_matches_tailcfg() -> None:
    region = embedded_region(
        host_name="10.0.0.1", derp_port=8443, stun_port=-1, ipv4="10.0.0.1", region_id=900
    )
    doc = msgspec.json.decode(encode(DERPMap(regions={900: region})))
    assert doc == {
        "Regions": {
            "900": {
                "RegionID": 900,
                "RegionCode": "tailledger",
                "RegionName": "tailledger embedded DERP",
                "Nodes": [
                    {
                        "Name": "900a",
                        "RegionID": 900,
                        "HostName": "10.0.0.1",
                        "IPv4": "10.0.0.1",
                        "STUNPort": -1,
                        "DERPPort": 8443,
                    }
                ],
            }
        }
    }


@pytest.mark.parametrize(
    "kwargs",
    [{"region_id": 0}, {"region_id": MAX_REGION_ID + 1}, {"derp_port": 0}, {"stun_port": 70000}],
)
def test_embedded_region_validation(kwargs: dict[str, int]) -> None:
    args: dict[str, object] = {"host_name": "h", "derp_port": 443, **kwargs}
    with pytest.raises(DerpMapError):
        embedded_region(**args)  # type: ignore[arg-type]


def test_omit_default_regions() -> None:
    default = parse_derp_map(DEFAULT)
    ours = parse_derp_map(HUJSON)
    assert sorted(
        merge_derp_maps([ours], default_map=default, omit_default_regions=True).regions or {}
    ) == [900]
    asks = parse_derp_map(b'{"omitDefaultRegions": true, "Regions": {"950": {}}}')
    merged = merge_derp_maps([asks], default_map=default)
    assert sorted(merged.regions or {}) == [950]
    assert merged.omit_default_regions is False  # the map we send is complete


def test_nothing_configured_is_an_empty_map_not_an_absent_one() -> None:
    merged = merge_derp_maps([])
    assert merged.regions == {}
    assert encode(merged) == b'{"Regions":{}}'


def test_home_params_merge_key_by_key() -> None:
    a = parse_derp_map(
        b'{"HomeParams": {"RegionScore": {"1": 2.0, "2": 0.5}}, "Regions": {"1": {}, "2": {}}}'
    )
    b = parse_derp_map(
        b'{"HomeParams": {"RegionScore": {"2": 0.9, "3": 1.5}}, "Regions": {"2": null}}'
    )
    merged = merge_derp_maps([a, b])
    assert merged.home_params == DERPHomeParams(region_score={1: 2.0})


def test_source_from_typed_map() -> None:
    typed = DERPMap(regions={5: DERPRegion(region_id=5)}, omit_default_regions=True)
    src = source_from_map(typed, name="typed")
    assert src.omit_default_regions
    with pytest.raises(DerpMapError):
        source_from_map(DERPMap(regions={5: DERPRegion(region_id=6)}), name="bad")


def test_single_point_of_failure_detection() -> None:
    ours = embedded_region(host_name="h", derp_port=443)
    assert single_point_of_failure(merge_derp_maps([], embedded=ours))
    assert not single_point_of_failure(merge_derp_maps([parse_derp_map(DEFAULT)], embedded=ours))


async def test_fetch_derp_map_from_a_local_server(tmp_path: Path) -> None:
    async def serve(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(4096)
        if request.startswith(b"GET /derpmap.json "):
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(DEFAULT) + DEFAULT
            )
        else:
            await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        body = await fetch_derp_map(f"http://127.0.0.1:{port}/derpmap.json")
        assert sorted(parse_derp_map(body).regions) == [1, 2]
        with pytest.raises(DerpMapFetchError):
            await fetch_derp_map(f"http://127.0.0.1:{port}/missing")
        with pytest.raises(DerpMapFetchError):
            await fetch_derp_map(f"http://127.0.0.1:{port}/derpmap.json", max_bytes=10)
        nursery.cancel_scope.cancel()
