"""Unit tests for reading a tsnet client's view out of its log (no processes).

The logs below are written by hand in the two shapes a client produces: Caddy's
JSON lines (tsnet logf and redirected Go ``log``), and Go's raw ``log``
output where an indented dump spans many lines.
"""

from __future__ import annotations

import json
from typing import Any

from .tsnet_log import dumps, fold_map_responses, log_messages, short_name


def _zap(msg: str, logger: str = "tailscale") -> str:
    return json.dumps({"level": "debug", "ts": 1.5, "logger": logger, "msg": msg})


def _node(node_id: int, name: str, addr: str, **extra: Any) -> dict[str, Any]:
    return {
        "ID": node_id,
        "Name": f"{name}.tail.example.",
        "Addresses": [f"{addr}/32", "fd7a::1/128"],
        **extra,
    }


FIRST = {
    "Node": _node(1, "nodea", "100.64.0.1"),
    "DERPMap": {"Regions": {"900": {"RegionID": 900}}},
    "Peers": [_node(2, "nodeb", "100.64.0.2"), _node(3, "nodec", "100.64.0.3")],
}


def test_log_messages_unwraps_json_lines_and_keeps_raw_lines() -> None:
    text = "\n".join(
        [
            _zap("control: RegisterReq: got response"),
            "2026/11/25 11:00:00 raw go log line",
            '{"not": "a log entry"}',
            "",
        ]
    )
    assert log_messages(text).splitlines() == [
        "control: RegisterReq: got response",
        "2026/11/25 11:00:00 raw go log line",
        '{"not": "a log entry"}',
    ]


def test_dumps_from_json_lines_and_raw_multiline_output() -> None:
    indented = json.dumps(FIRST, indent=4)
    text = "\n".join(
        [
            _zap("MapResponse: " + indented, logger="stdlog"),
            _zap("control: netmap: got new map"),
            "2026/11/25 11:00:01 MapResponse: " + indented,  # raw, many lines
            _zap('MapResponse: {"KeepAlive": true}'),
            '2026/11/25 11:00:02 MapResponse: {\n    "Peers": [',  # killed mid-dump
        ]
    )
    found = dumps(log_messages(text), "MapResponse")
    assert found == [FIRST, FIRST, {"KeepAlive": True}]
    assert dumps(log_messages(text), "RegisterRequest") == []


def test_fold_applies_full_peers_then_deltas_in_order() -> None:
    responses: list[dict[str, Any]] = [
        FIRST,
        {"KeepAlive": True},
        {"PeersChanged": [_node(4, "noded", "100.64.0.4")], "PeersRemoved": [3]},
        {
            "PeersChangedPatch": [
                {"NodeID": 2, "DERPRegion": 900, "Endpoints": ["10.254.0.1:41641"]}
            ]
        },
        {"OnlineChange": {"4": True}},
    ]
    view = fold_map_responses(responses)
    assert view.responses == 5
    assert view.peer_names() == {"nodeb", "noded"}
    assert view.peer("nodeb")["HomeDERP"] == 900
    assert view.peer("nodeb")["Endpoints"] == ["10.254.0.1:41641"]
    assert view.peer("noded")["Online"] is True
    assert view.ipv4() == "100.64.0.1"
    assert view.ipv4("noded") == "100.64.0.4"
    assert view.addresses("nodeb") == ["100.64.0.2", "fd7a::1"]
    assert view.derp_region_ids() == {900}
    # nodeb got a home region and endpoints by patch; noded never did.
    assert view.routable_peer_names() == {"nodeb"}

    # A later full list replaces everything, including earlier deltas.
    view = fold_map_responses([*responses, {"Peers": [_node(3, "nodec", "100.64.0.3")]}])
    assert view.peer_names() == {"nodec"}


def test_fold_of_nothing_is_empty() -> None:
    view = fold_map_responses([])
    assert (view.self_node, view.peers, view.derp_map, view.responses) == (None, {}, None, 0)
    assert view.derp_region_ids() == set()


def test_short_name_falls_back_to_hostinfo() -> None:
    assert short_name({"Name": "web.tail.example."}) == "web"
    assert short_name({"Name": "", "Hostinfo": {"Hostname": "laptop"}}) == "laptop"
    assert short_name({}) == ""
