"""Hostile nodes on the control port (issue 14, Security 1, 4 and 5), against a real
running ``tailledger serve`` driven over the real protocol.

* An expired or logged-out node fetches nothing of the tailnet and writes nothing.
* A node cannot make the server hold what it never reads: a newer long-poll ends the
  older one, one-shot maps wait for a full-map turn, a 900 KB Hostinfo is refused and
  nothing of it reaches a peer's map.
* A node cannot grow the permanent log: a 200 KB host name appends nothing large,
  too many routes are refused, and only a bucket's worth of updates is appended.

Each finding is checked through what an attacker and an operator see: protocol
answers, ``tailledger log show``, ``nodes list`` and ``/metrics``.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import msgspec
import pytest
import trio

from projections.tailcfg import Hostinfo, MapResponse, NetInfo, decode_map_response, parse_time
from protocol import ControlClient, MapStream, RemoteProtocolError, open_control_client
from protocol.mapframe import MapFrameDecoder
from tests.cli.server_process import RunningServer, free_port, running_server
from tests.protocol.control_harness import SimNode

LOGOUT = parse_time("1970-01-01T01:02:03+01:00")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    metrics = free_port()
    env = {"TAILLEDGER_METRICS_LISTEN_ADDR": f"127.0.0.1:{metrics}"}
    with running_server(tmp_path_factory.mktemp("abuse-control") / "data", extra_env=env) as srv:
        srv.cli("users", "create", "alice", check=True)
        srv.metrics_port = metrics  # type: ignore[attr-defined]
        yield srv


def auth_key(server: RunningServer) -> str:
    return server.cli("preauthkeys", "create", "-u", "alice", "--reusable", check=True).stdout.strip()


@asynccontextmanager
async def registered(server: RunningServer, key: str, hostname: str) -> AsyncIterator[tuple[SimNode, ControlClient]]:
    node = SimNode.new(hostname)
    async with open_control_client("127.0.0.1", server.port, machine_key=node.machine_private) as client:
        resp = await client.register(node.register_request(key))
        assert resp.error == "", resp.error
        yield node, client


def nodes(server: RunningServer) -> dict[str, dict[str, object]]:
    listed = json.loads(server.cli("nodes", "list", "-o", "json", check=True).stdout)
    return {str(n["node_key"]): n for n in listed}


def node_of(server: RunningServer, sim: SimNode) -> dict[str, object]:
    return nodes(server)[sim.node_key.removeprefix("nodekey:")]


def log_events(server: RunningServer) -> list[dict[str, object]]:
    out = server.cli("log", "show", "--limit", "1000000", "-o", "json", check=True).stdout
    events = json.loads(out)
    assert isinstance(events, list)
    return events


def events_of(server: RunningServer, node_id: object, kind: str) -> list[dict[str, object]]:
    return [
        e for e in log_events(server)
        if e["type"] == kind and isinstance(e["event"], dict) and e["event"].get("node_id") == node_id
    ]


def _http_get(port: int, path: str) -> tuple[int, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")),
            None,
        )
        while length is None or len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(head.split()[1]), body.decode(errors="replace")


def metric(server: RunningServer, name: str, labels: str = "") -> float:
    """A sample from ``/metrics``: on ``metrics_listen_addr``, or (where that is not
    honoured yet) on the control port."""
    try:
        status, text = _http_get(server.metrics_port, "/metrics")  # type: ignore[attr-defined]
    except OSError:
        status, text = _http_get(server.port, "/metrics")
    assert status == 200, text[:200]
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == wanted:
            return float(value)
    raise AssertionError(f"{wanted} not in /metrics")


async def next_update(stream: MapStream, wait: float = 10) -> MapResponse:
    with trio.fail_after(wait):
        while True:
            msg = await stream.__anext__()
            if not msg.keep_alive:
                return msg


async def read_until_reset(stream: MapStream) -> None:
    with trio.fail_after(10):
        while True:
            await stream.__anext__()


async def post_hostinfo(client: ControlClient, node: SimNode, hostinfo: Hostinfo) -> tuple[int, bytes]:
    request = msgspec.structs.replace(node.map_request(stream=False, omit_peers=True), hostinfo=hostinfo)
    answer = await client.post_json("/machine/map", request)
    return answer.status, answer.body


def assert_sees_nothing(msg: MapResponse) -> None:
    assert msg.node is not None and msg.node.expired
    assert not msg.peers and not msg.peers_changed and msg.dns_config is None and msg.ssh_policy is None
    assert msg.packet_filters is not None and bytes(msg.packet_filters["base"]) == b"[]"


# -- Security 1: expired and logged-out nodes -------------------------------------------


@pytest.mark.parametrize("how", ["admin-expire", "logout"])
async def test_an_expired_or_logged_out_node_gets_no_peers_no_filter_and_writes_nothing(
    server: RunningServer, how: str
) -> None:
    key = auth_key(server)
    async with registered(server, key, f"victim-{how}") as (victim, _vc), registered(server, key, f"x-{how}") as (x, cx):
        if how == "admin-expire":
            server.cli("nodes", "expire", f"x-{how}", check=True)
        else:
            assert (await cx.register(x.register_request(expiry=LOGOUT))).node_key_expired
        me = node_of(server, x)
        assert me["expired"] is True
        async with cx.map_stream(x.map_request()) as stream:
            first = await next_update(stream)
        assert_sees_nothing(first)
        assert victim.node_key.encode() not in msgspec.json.encode(first)
        refused_before = metric(server, "tailledger_control_refused_total", 'reason="expired_node"')
        # Lite updates (host name, routes) are ignored: nothing is appended.
        head = len(log_events(server))
        for i in range(5):
            status, _ = await post_hostinfo(
                cx, x, Hostinfo(hostname=f"evil-{i}", routable_ips=[f"10.{i}.0.0/16"], net_info=NetInfo(preferred_derp=1))
            )
            assert status == 200
        assert len(log_events(server)) == head
        after = node_of(server, x)
        assert after["hostname"] == f"x-{how}" and after["advertised_routes"] == []
        assert metric(server, "tailledger_control_refused_total", 'reason="expired_node"') == refused_before + 5


async def test_a_node_expired_while_connected_stops_receiving_peer_data(server: RunningServer) -> None:
    key = auth_key(server)
    async with (
        registered(server, key, "watched") as (_w, _wc),
        registered(server, key, "leaver") as (x, cx),
        cx.map_stream(x.map_request()) as stream,
    ):
        first = await next_update(stream)
        assert first.peers  # it sees the tailnet while its key is good
        server.cli("nodes", "expire", "leaver", check=True)
        while True:
            msg = await next_update(stream)
            if msg.node is not None and msg.node.expired:
                break
        assert sorted(msg.peers_removed or []) == sorted(p.id for p in first.peers)
        assert msg.packet_filters is not None and bytes(msg.packet_filters["base"]) == b"[]"
        # A peer changes, then the node itself: only the latter reaches it.
        server.cli("nodes", "rename", "watched", "watched-2", check=True)
        server.cli("nodes", "rename", "leaver", "leaver-2", check=True)
        while True:
            msg = await next_update(stream)
            assert not (msg.peers or msg.peers_changed or msg.peers_changed_patch or msg.peers_removed)
            if msg.node is not None and msg.node.name.startswith("leaver-2."):
                break


# -- Security 4: memory a node makes the server hold ---------------------------------------


async def test_a_newer_long_poll_ends_an_older_one_that_never_reads(server: RunningServer) -> None:
    key = auth_key(server)
    before = metric(server, "tailledger_map_streams_superseded_total")
    async with (
        registered(server, key, "hoarder") as (node, _c),
        open_control_client(
            "127.0.0.1", server.port, machine_key=node.machine_private, initial_window_size=64
        ) as stuck,
        stuck.map_stream(node.map_request()) as old,  # its full map waits for window never opened
        open_control_client("127.0.0.1", server.port, machine_key=node.machine_private) as fresh,
        fresh.map_stream(node.map_request()) as new,
    ):
        assert (await next_update(new)).node is not None
        with pytest.raises(RemoteProtocolError, match="reset"):
            await read_until_reset(old)
    assert metric(server, "tailledger_map_streams_superseded_total") == before + 1


async def test_a_900_kb_hostinfo_is_refused_and_reaches_no_peer(server: RunningServer) -> None:
    key = auth_key(server)
    async with registered(server, key, "bloat") as (x, cx), registered(server, key, "reader") as (r, rc):
        head = len(log_events(server))
        big = Hostinfo(hostname="bloat", os="linux", os_version="v" * 900_000)
        status, body = await post_hostinfo(cx, x, big)
        assert status == 413 and b"Hostinfo is too large" in body
        refused = await cx.register(msgspec.structs.replace(x.register_request(), hostinfo=big))
        assert "Hostinfo is too large" in refused.error
        assert len(log_events(server)) == head
        async with rc.map_stream(r.map_request()) as stream:
            first = await next_update(stream)
        [peer] = [p for p in first.peers or [] if p.key == x.node_key]
        assert peer.hostinfo is None or len(msgspec.json.encode(peer.hostinfo)) < 1024
        assert metric(server, "tailledger_control_refused_total", 'reason="hostinfo_too_large"') >= 2


# -- Security 5: growing the permanent log ----------------------------------------------


async def test_a_200_kb_host_name_appends_nothing_large(server: RunningServer) -> None:
    key = auth_key(server)
    async with registered(server, key, "longname") as (x, cx):
        head = len(log_events(server))
        status, _ = await post_hostinfo(cx, x, Hostinfo(hostname="h" * 200_000, os="linux"))
        assert status == 413
        assert len(log_events(server)) == head
        # Below the Hostinfo limit, a long name is cut to a DNS label's 63 characters.
        status, _ = await post_hostinfo(cx, x, Hostinfo(hostname="n" * 10_000 + "\x1b]0;pwned\x07", os="linux"))
        assert status == 200
        node = node_of(server, x)
        assert node["hostname"] == "n" * 63
        largest = max(len(json.dumps(e["event"])) for e in log_events(server)[head:])
        assert largest < 1024
        # A new machine with such a name is registered under a cut name too.
        big = SimNode.new("m" * 10_000)
        async with open_control_client("127.0.0.1", server.port, machine_key=big.machine_private) as bc:
            assert (await bc.register(big.register_request(key))).error == ""
        fresh = node_of(server, big)
        assert fresh["hostname"] == "m" * 63 and len(str(fresh["name"])) <= 63


async def test_too_many_routes_are_refused(server: RunningServer) -> None:
    key = auth_key(server)
    async with registered(server, key, "router") as (x, cx):
        head = len(log_events(server))
        routes = [f"10.{i // 256}.{i % 256}.0/24" for i in range(600)]
        status, body = await post_hostinfo(cx, x, Hostinfo(hostname="router", routable_ips=routes))
        assert status == 413 and re.search(rb"too many advertised routes: 600 \(the limit is \d+\)", body)
        assert len(log_events(server)) == head and node_of(server, x)["advertised_routes"] == []


async def test_many_host_name_changes_append_only_a_bucket_s_worth(server: RunningServer) -> None:
    key = auth_key(server)
    async with registered(server, key, "flapper") as (x, cx):
        node_id = node_of(server, x)["id"]
        before = metric(server, "tailledger_control_refused_total", 'reason="rate_limited"')
        statuses = [(await post_hostinfo(cx, x, Hostinfo(hostname=f"flap-{i}", os="linux")))[0] for i in range(40)]
        # The defaults: a burst of 10, one more every 30 s (far longer than this loop).
        assert statuses.count(200) == 10 and statuses.count(429) == 30, statuses
        changed = events_of(server, node_id, "node.hostname_changed")
        assert [e["event"]["hostname"] for e in changed] == [f"flap-{i}" for i in range(10)]  # type: ignore[index]
        assert metric(server, "tailledger_control_refused_total", 'reason="rate_limited"') == before + 30


async def test_one_shot_maps_wait_for_the_full_map_limit(tmp_path_factory: pytest.TempPathFactory) -> None:
    env = {
        "TAILLEDGER_TUNING__FULL_MAP_CONCURRENCY": "1",
        "TAILLEDGER_TUNING__FULL_MAP_TURN_TIMEOUT": '"60s"',
    }
    with running_server(tmp_path_factory.mktemp("abuse-oneshot") / "data", extra_env=env) as srv:
        srv.cli("users", "create", "alice", check=True)
        key = auth_key(srv)
        a, b = SimNode.new("holder"), SimNode.new("asker")
        async with (
            open_control_client("127.0.0.1", srv.port, machine_key=a.machine_private, initial_window_size=64) as ca,
            open_control_client("127.0.0.1", srv.port, machine_key=b.machine_private) as cb,
        ):
            assert (await ca.register(a.register_request(key))).error == ""
            assert (await cb.register(b.register_request(key))).error == ""
            order: list[str] = []

            async def one_shot() -> None:
                answer = await cb.post_json("/machine/map", b.map_request(stream=False))
                [raw] = MapFrameDecoder(compressed=True).receive_data(answer.body)
                assert decode_map_response(raw).node is not None
                order.append("one-shot answered")

            async with trio.open_nursery() as nursery, ca.map_stream(a.map_request()) as held:
                # a's full map holds the only turn while a reads nothing...
                await trio.sleep(0.5)
                nursery.start_soon(one_shot)
                await trio.sleep(1)
                # ...until a reads it all; only then may the one-shot map be built.
                order.append("holder read its map")
                assert (await next_update(held)).node is not None
            assert order == ["holder read its map", "one-shot answered"]
