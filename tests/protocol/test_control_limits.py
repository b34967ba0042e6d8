"""What a node can make the server hold or write is bounded (issue 14, Security 1, 4, 5).

Expired and logged-out nodes see nothing of the tailnet and write nothing; a node has
one long-poll; one-shot maps wait for a full-map turn; Hostinfo is capped and kept
only as peers see it; host names are cut; routes are counted; log-writing updates
are rate-limited per node. Each against a real in-process server over the protocol.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import trio

from cli.server import Services
from eventlog.events import NodeHostnameChanged
from projections.tailcfg import (
    Hostinfo,
    MapResponse,
    NetInfo,
    PeerHostinfo,
    Service,
    decode_map_response,
    parse_time,
)
from protocol import ControlClient, MapStream, RemoteProtocolError, open_control_client
from protocol.mapframe import MapFrameDecoder
from tests.support.waits import wait_until

from .control_harness import ADMIN, SimNode, make_key, running, two_registered

LOGOUT = parse_time("1970-01-01T01:02:03+01:00")


def hostnames_recorded(server: Services) -> list[str]:
    """The host names the log recorded changes to, in order."""
    return [e.event.hostname for e in server.store.read() if isinstance(e.event, NodeHostnameChanged)]


async def read_until_reset(stream: MapStream) -> None:
    """Read the stream until the server resets it (fails if it never does)."""
    with trio.fail_after(10):
        while True:
            await stream.__anext__()


async def next_update(stream: MapStream, wait: float = 10) -> MapResponse:
    with trio.fail_after(wait):
        while True:
            msg = await stream.__anext__()
            if not msg.keep_alive:
                return msg


async def lite_update(client: ControlClient, node: SimNode, **hostinfo: object) -> int:
    """Send a lite map update with this Hostinfo; return the HTTP status."""
    hi = Hostinfo(os="linux", net_info=NetInfo(preferred_derp=999), **hostinfo)  # type: ignore[arg-type]
    request = msgspec.structs.replace(node.map_request(stream=False, omit_peers=True), hostinfo=hi)
    return (await client.post_json("/machine/map", request)).status


def assert_expired_map(msg: MapResponse, node: SimNode, now: object) -> None:
    assert msg.node is not None and msg.node.key == node.node_key
    assert msg.node.expired is True
    assert msg.node.key_expiry is not None and msg.node.key_expiry <= now  # type: ignore[operator]
    assert not msg.peers and not msg.peers_changed
    assert msg.packet_filters is not None and bytes(msg.packet_filters["base"]) == b"[]"
    assert msg.ssh_policy is None and msg.dns_config is None


@pytest.mark.parametrize("how", ["admin-expire", "logout"])
async def test_an_expired_or_logged_out_node_sees_only_itself_and_writes_nothing(
    tmp_path: Path, how: str
) -> None:
    async with running(tmp_path) as server, two_registered(server) as (a, ca, b, cb):
        if how == "admin-expire":
            await server.ops.dispatch("nodes.expire", {"node": "alpha"}, ADMIN)
        else:
            assert (await ca.register(a.register_request(expiry=LOGOUT))).node_key_expired
        async with ca.map_stream(a.map_request()) as sa:
            assert_expired_map(await next_update(sa), a, server.tailnet.clock())
        # One-shot maps say the same.
        answer = await ca.post_json("/machine/map", a.map_request(stream=False))
        [raw] = MapFrameDecoder(compressed=True).receive_data(answer.body)
        assert_expired_map(decode_map_response(raw), a, server.tailnet.clock())
        # Its Hostinfo (host name, routes) appends nothing and is shown to nobody.
        head = server.store.head().seq
        assert await lite_update(ca, a, hostname="renamed", routable_ips=["10.9.0.0/16"]) == 200
        assert server.store.head().seq == head
        node = server.tailnet.state.node_by_machine(a.machine_key_hex)
        assert node is not None and node.hostname == "alpha" and not node.advertised_routes
        assert server.control is not None and server.control.stats.expired_updates_ignored >= 1
        # And the peer does not see it.
        async with cb.map_stream(b.map_request()) as sb:
            first = await next_update(sb)
            assert not first.peers


async def test_a_stream_stops_receiving_peer_data_when_its_node_expires(tmp_path: Path) -> None:
    async with (
        running(tmp_path) as server,
        two_registered(server) as (a, ca, b, _cb),
        ca.map_stream(a.map_request()) as sa,
    ):
        first = await next_update(sa)
        assert first.peers and [p.key for p in first.peers] == [b.node_key]
        bravo = first.peers[0].id
        await server.ops.dispatch("nodes.expire", {"node": "alpha"}, ADMIN)
        gone = await next_update(sa)
        assert gone.peers_removed == [bravo]
        assert gone.node is not None and gone.node.expired
        assert gone.packet_filters is not None and bytes(gone.packet_filters["base"]) == b"[]"
        # Later changes of the peer reach it no more: an admin renames bravo, then
        # alpha; the next message alpha gets is its own rename, with nothing of bravo.
        await server.ops.dispatch("nodes.rename", {"node": "bravo", "new_name": "b2"}, ADMIN)
        await server.ops.dispatch("nodes.rename", {"node": "alpha", "new_name": "a2"}, ADMIN)
        while True:
            msg = await next_update(sa)
            assert not (msg.peers or msg.peers_changed or msg.peers_changed_patch or msg.peers_removed)
            assert msg.user_profiles is None or all(p.login_name != "b2" for p in msg.user_profiles)
            if msg.node is not None and msg.node.name.startswith("a2."):
                break


async def test_a_newer_long_poll_ends_the_older_one(tmp_path: Path) -> None:
    async with running(tmp_path) as server, two_registered(server) as (a, ca, _b, _cb):
        control = server.control
        assert control is not None
        # The first poll reads its full map and parks; the second ends it.
        async with ca.map_stream(a.map_request()) as first:
            await next_update(first)
            async with a.connect(server) as again, again.map_stream(a.map_request()) as second:
                assert (await next_update(second)).node is not None
                with pytest.raises(RemoteProtocolError, match="reset"):
                    await read_until_reset(first)
                assert control.streams.streams_open == 1 and control.stats.streams_superseded == 1


async def test_a_newer_long_poll_ends_one_stuck_on_a_client_that_does_not_read(tmp_path: Path) -> None:
    async with running(tmp_path) as server, two_registered(server) as (a, _ca, _b, _cb):
        control = server.control
        assert control is not None
        async with open_control_client(
            "127.0.0.1", server.port, machine_key=a.machine_private, initial_window_size=64
        ) as stuck, stuck.map_stream(a.map_request()) as first:
            await wait_until(lambda: control.streams.streams_open >= 1, what="the first stream")
            async with a.connect(server) as again, again.map_stream(a.map_request()) as second:
                assert (await next_update(second)).node is not None
                await wait_until(lambda: control.streams.streams_open == 1, what="the second stream to end the first")
                with pytest.raises(RemoteProtocolError, match="reset"):
                    await read_until_reset(first)


async def test_one_shot_maps_wait_for_a_full_map_turn(tmp_path: Path) -> None:
    tuning = {"full_map_concurrency": 1, "full_map_turn_timeout": "60s"}
    async with running(tmp_path, tuning=tuning) as server:
        control = server.control
        assert control is not None
        key = await make_key(server, reusable=True)
        a, b = SimNode.new("alpha"), SimNode.new("bravo")
        async with (
            open_control_client(
                "127.0.0.1", server.port, machine_key=a.machine_private, initial_window_size=64
            ) as ca,
            b.connect(server) as cb,
        ):
            await ca.register(a.register_request(key))
            await cb.register(b.register_request(key))
            got: list[MapResponse] = []

            async def one_shot() -> None:
                answer = await cb.post_json("/machine/map", b.map_request(stream=False))
                [raw] = MapFrameDecoder(compressed=True).receive_data(answer.body)
                got.append(decode_map_response(raw))

            # a's full map stays in flight (a reads nothing) and holds the only turn;
            # once a gives its poll up (leaving the block), the one-shot map gets it.
            async with trio.open_nursery() as nursery, ca.map_stream(a.map_request()):
                await wait_until(lambda: control.streams._full_maps.value == 0, what="a's full map to hold the turn")
                nursery.start_soon(one_shot)
                await wait_until(
                    lambda: control.streams._full_maps.statistics().tasks_waiting == 1, what="the one-shot map to wait its turn"
                )
                assert not got
            [msg] = got
            assert msg.node is not None and msg.node.key == b.node_key
            assert [p.key for p in msg.peers or []] == [a.node_key]


async def test_hostinfo_is_capped_and_kept_only_as_peers_see_it(tmp_path: Path) -> None:
    async with running(tmp_path) as server, two_registered(server) as (a, ca, b, cb):
        control = server.control
        assert control is not None
        head = server.store.head().seq
        # Too large: refused with a clear error, and nothing of it is kept.
        huge = await ca.post_json(
            "/machine/map",
            msgspec.structs.replace(
                a.map_request(stream=False, omit_peers=True),
                hostinfo=Hostinfo(hostname="big", os="linux", os_version="x" * 900_000),
            ),
        )
        assert huge.status == 413 and b"Hostinfo is too large" in huge.body
        assert server.store.head().seq == head and control.stats.hostinfo_too_large == 1
        node = server.tailnet.state.node_by_machine(a.machine_key_hex)
        assert node is not None and node.hostname == "alpha"
        seen = control.presence.get(node.id)
        assert seen is None or seen.hostinfo is None or seen.hostinfo.hostname != "big"
        refused = await ca.register(
            msgspec.structs.replace(a.register_request(), hostinfo=Hostinfo(hostname="h", os_version="x" * 20000))
        )
        assert "Hostinfo is too large" in refused.error
        # Within the limit: kept trimmed to what peers get.
        assert (
            await lite_update(
                ca, a, hostname="alpha", backend_log_id="secret-log-id", push_device_token="secret-token",
                exit_node_id="n123", services=[Service(proto="peerapi4", port=12345)], ssh_host_keys=["ssh-ed25519 AAAA"],
            )
            == 200
        )
        # Trimmed before it is stored, not only when shown.
        kept = control.presence.get(node.id)
        assert kept is not None and kept.hostinfo is not None
        # Kept as a PeerHostinfo: a type with no field for the log ids, the push token,
        # the exit node or NetInfo (peers' maps are encoded from this value).
        assert type(kept.hostinfo) is PeerHostinfo
        for secret in ("backend_log_id", "push_device_token", "exit_node_id", "net_info"):
            assert not hasattr(kept.hostinfo, secret)
        assert kept.hostinfo.ssh_host_keys == ["ssh-ed25519 AAAA"]
        # The host name the log recorded is one string with the one kept here (issue 19).
        assert kept.hostinfo.hostname is server.tailnet.state.nodes[node.id].hostname
        async with cb.map_stream(b.map_request()) as sb:
            [peer] = (await next_update(sb)).peers or []
            # The Hostinfo comes with the full map, or with the presence publication
            # that follows it (within presence_coalesce).
            with trio.fail_after(10):
                while peer.hostinfo is None:
                    update = await next_update(sb)
                    peer = next((p for p in update.peers_changed or () if p.id == peer.id), peer)
        assert peer.hostinfo is not None
        assert peer.hostinfo.hostname == "alpha" and peer.hostinfo.services == [Service(proto="peerapi4", port=12345)]
        assert peer.hostinfo.ssh_host_keys == ["ssh-ed25519 AAAA"]
        assert peer.home_derp == 999  # the DERP home is kept apart from NetInfo


async def test_host_names_are_cut_and_routes_counted(tmp_path: Path) -> None:
    async with running(tmp_path) as server, two_registered(server) as (a, ca, _b, _cb):
        control = server.control
        assert control is not None
        assert await lite_update(ca, a, hostname="h" * 1000 + "\x1b[31m") == 200
        node = server.tailnet.state.node_by_machine(a.machine_key_hex)
        assert node is not None and node.hostname == "h" * 63
        assert hostnames_recorded(server) == ["h" * 63]
        head = server.store.head().seq
        routes = [f"10.{i // 256}.{i % 256}.0/24" for i in range(513)]  # the default limit is 512
        answer = await ca.post_json(
            "/machine/map",
            msgspec.structs.replace(
                a.map_request(stream=False, omit_peers=True), hostinfo=Hostinfo(hostname="h" * 63, routable_ips=routes)
            ),
        )
        assert answer.status == 413 and b"too many advertised routes: 513 (the limit is 512)" in answer.body
        assert server.store.head().seq == head and control.stats.too_many_routes == 1
        assert await lite_update(ca, a, hostname="h" * 63, routable_ips=routes[:512]) == 200
        node = server.tailnet.state.node_by_machine(a.machine_key_hex)
        assert node is not None and len(node.advertised_routes) == 512


async def test_log_writing_updates_are_rate_limited_per_node(tmp_path: Path) -> None:
    # The defaults: a burst of 10, one more every 30 s (far longer than this test).
    async with running(tmp_path) as server, two_registered(server) as (a, ca, b, cb):
        control = server.control
        assert control is not None
        statuses = [await lite_update(ca, a, hostname=f"name-{i}") for i in range(15)]
        assert statuses == [200] * 10 + [429] * 5
        assert hostnames_recorded(server) == [f"name-{i}" for i in range(10)]
        assert control.stats.updates_rate_limited == 5
        # Another node has its own bucket; updates that append nothing cost nothing.
        assert await lite_update(cb, b, hostname="bravo-2") == 200
        assert await lite_update(ca, a, hostname="name-9") == 200
        # A refused request changed nothing, not even what peers are shown.
        node = server.tailnet.state.node_by_machine(a.machine_key_hex)
        assert node is not None and node.hostname == "name-9"
        seen = control.presence.get(node.id)
        assert seen is not None and seen.hostinfo is not None and seen.hostinfo.hostname == "name-9"


async def test_a_stream_stops_receiving_peer_data_when_its_key_expires_by_time(tmp_path: Path) -> None:
    async with running(tmp_path, node_key_expiry="4s") as server:
        a, b = SimNode.new("alpha"), SimNode.new("bravo")
        key = await make_key(server)
        tagged = await make_key(server, tags=["tag:server"])  # tagged keys do not expire
        async with a.connect(server) as ca, b.connect(server) as cb:
            assert (await ca.register(a.register_request(key))).error == ""
            assert (await cb.register(b.register_request(tagged))).error == ""
            async with ca.map_stream(a.map_request()) as sa:
                msg = await next_update(sa)
                if not msg.node or not msg.node.expired:  # (unless it expired already)
                    assert [p.key for p in msg.peers or []] == [b.node_key]
                    bravo = (msg.peers or [])[0].id
                    while not (msg.node and msg.node.expired):
                        msg = await next_update(sa)
                    assert msg.peers_removed == [bravo]
                assert_expired_map_parts(msg)


def assert_expired_map_parts(msg: MapResponse) -> None:
    assert msg.node is not None and msg.node.expired and msg.node.key_expiry is not None
    assert msg.packet_filters is not None and bytes(msg.packet_filters["base"]) == b"[]"
    assert not msg.peers and not msg.peers_changed
