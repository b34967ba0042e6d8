"""Register and map over the real protocol (Noise, HTTP/2, zstd) against a real server."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import trio

from cli.server import Services
from eventlog.events import NodeRegistered, PreAuthKeyUsed
from projections.mapviews.cursor import StreamCursor
from projections.mapviews.hub import MapHub
from projections.mapviews.peersets import MapMessage
from projections.tailcfg import MapResponse, Node, RegisterRequest, parse_time
from protocol import ControlClient, MapStream, open_control_client
from protocol.control import streams as streams_module
from protocol.control.streams import WAKE_GROUPS
from protocol.serve.session import NoiseSession
from tests.support.waits import wait_until

from .control_harness import ADMIN, SimNode, make_key, running, two_registered


async def next_update(stream: MapStream, wait: float = 10) -> MapResponse:
    with trio.fail_after(wait):
        while True:
            msg = await stream.__anext__()
            if not msg.keep_alive or msg.node or msg.peers_changed or msg.peers_removed:
                return msg


@contextlib.asynccontextmanager
async def alpha_streaming(server: Services) -> AsyncIterator[tuple[MapStream, SimNode, ControlClient, str]]:
    """Alpha registered with its map stream open (its first map, with no peers, read);
    bravo connected, not registered yet; and the reusable key bravo may register with."""
    key = await make_key(server, reusable=True)
    a, b = SimNode.new("alpha"), SimNode.new("bravo")
    async with a.connect(server) as ca, b.connect(server) as cb:
        await ca.register(a.register_request(key))
        async with ca.map_stream(a.map_request()) as sa:
            assert not (await next_update(sa)).peers
            yield sa, b, cb, key


async def test_preauth_key_registration_and_full_map(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        key = await make_key(server)
        a = SimNode.new("alpha")
        async with a.connect(server) as client:
            resp = await client.register(a.register_request(key))
            assert resp.error == "" and resp.machine_authorized and not resp.auth_url
            assert resp.login.login_name == "alice"
            state = server.tailnet.state
            node = state.node_by_machine(a.machine_key_hex)
            assert node is not None and node.given_name == "alpha" and node.ipv4 == "100.64.0.1"
            async with client.map_stream(a.map_request()) as stream:
                first = await next_update(stream)
                assert first.node is not None
                assert first.node.key == a.node_key
                assert first.node.addresses == ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]
                assert first.node.machine_authorized
                assert first.node.name == "alpha.tailnet.internal."
                assert first.derp_map is not None
                assert first.packet_filters is not None and b"SrcIPs" in bytes(
                    first.packet_filters["base"]
                )
                assert first.user_profiles and first.user_profiles[0].login_name == "alice"
                assert first.debug is not None and first.debug.disable_log_tail
                assert not first.peers
        # The log says who did what.
        events = server.store.read()
        reg = [e for e in events if isinstance(e.event, NodeRegistered)]
        assert (
            len(reg) == 1
            and reg[0].actor.kind.value == "node"
            and reg[0].actor.id == a.machine_key_hex
        )
        assert any(isinstance(e.event, PreAuthKeyUsed) for e in events)


async def test_peers_join_change_and_leave_as_deltas(tmp_path: Path) -> None:
    async with running(tmp_path) as server, alpha_streaming(server) as (sa, b, cb, key):
        # b joins: a gets it in PeersChanged.
        await cb.register(b.register_request(key))
        joined = await next_update(sa)
        assert joined.peers_changed and [p.name for p in joined.peers_changed] == [
            "bravo.tailnet.internal."
        ]
        async with cb.map_stream(b.map_request(endpoints=["198.51.100.7:41641"])) as sb:
            b_first = await next_update(sb)
            assert b_first.peers and [p.name for p in b_first.peers] == [
                "alpha.tailnet.internal."
            ]
            # b came online with endpoints: a gets a patch, not a full node.
            online = await next_update(sa)
            patch = online.peers_changed_patch[0] if online.peers_changed_patch else None
            changed: list[Node] = online.peers_changed or []
            assert patch is not None or changed
            if patch is not None:
                assert patch.online is True
            # An admin renames b: a sees the new name.
            bnode = server.tailnet.state.node_by_machine(b.machine_key_hex)
            assert bnode is not None
            await server.ops.dispatch(
                "nodes.rename", {"node": str(bnode.id), "new_name": "b2"}, ADMIN
            )
            renamed = await next_update(sa)
            assert (
                renamed.peers_changed
                and renamed.peers_changed[0].name == "b2.tailnet.internal."
            )
        # An admin deletes b: it leaves a's map at once.
        await server.ops.dispatch("nodes.delete", {"node": "b2"}, ADMIN)
        gone = await next_update(sa)
        assert gone.peers_removed == [bnode.id]


async def test_expired_node_drops_out_of_peer_maps(tmp_path: Path) -> None:
    async with (
        running(tmp_path) as server,
        two_registered(server) as (a, ca, _b, _cb),
        ca.map_stream(a.map_request()) as sa,
    ):
        first = await next_update(sa)
        assert first.peers and len(first.peers) == 1
        await server.ops.dispatch("nodes.expire", {"node": "bravo"}, ADMIN)
        gone = await next_update(sa)
        assert gone.peers_removed == [first.peers[0].id]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda k: "tlkey-auth-000000000000-deadbeef", "invalid pre-auth key"),
        (lambda k: "not-a-key", "invalid pre-auth key"),
        (lambda k: k[:-2] + "00", "invalid pre-auth key"),
    ],
)
async def test_bad_keys_are_refused_and_nothing_is_created(
    tmp_path: Path, mutate: object, message: str
) -> None:
    async with running(tmp_path) as server:
        key = await make_key(server)
        before = server.tailnet.state.seq
        n = SimNode.new("mallory")
        async with n.connect(server) as client:
            resp = await client.register(n.register_request(mutate(key)))  # type: ignore[operator]
        assert resp.error == message
        assert server.tailnet.state.seq == before and not server.tailnet.state.nodes


async def test_used_and_expired_keys_are_refused(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        key = await make_key(server)
        first, second = SimNode.new("one"), SimNode.new("two")
        async with first.connect(server) as c1:
            assert (await c1.register(first.register_request(key))).error == ""
        async with second.connect(server) as c2:
            resp = await c2.register(second.register_request(key))
        assert resp.error == "the pre-auth key has already been used"
        assert len(server.tailnet.state.nodes) == 1
        key2 = await make_key(server)
        await server.ops.dispatch("preauthkeys.expire", {"key": key2}, ADMIN)
        third = SimNode.new("three")
        async with third.connect(server) as c3:
            resp = await c3.register(third.register_request(key2))
        assert "expired" in resp.error
        assert len(server.tailnet.state.nodes) == 1


async def test_restart_reregistration_keeps_state(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        key = await make_key(server)
        a = SimNode.new("alpha")
        async with a.connect(server) as client:
            await client.register(a.register_request(key))
            seq = server.tailnet.state.seq
            # The daemon restarts: same node key, no auth (or the spent key again).
            again = await client.register(a.register_request())
            assert again.machine_authorized and not again.error
            again = await client.register(a.register_request(key))
            assert again.machine_authorized and not again.error
        assert server.tailnet.state.seq == seq


async def test_logout_expires_and_ephemeral_logout_deletes(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        key = await make_key(server)
        ekey = await make_key(server, ephemeral=True)
        a, e = SimNode.new("alpha"), SimNode.new("eph")
        logout = parse_time("1970-01-01T01:02:03+01:00")
        async with a.connect(server) as ca, e.connect(server) as ce:
            await ca.register(a.register_request(key))
            await ce.register(e.register_request(ekey))
            assert len(server.tailnet.state.nodes) == 2
            r = await ca.register(a.register_request(expiry=logout))
            assert r.node_key_expired
            node = server.tailnet.state.node_by_machine(a.machine_key_hex)
            assert node is not None and node.logged_out and node.is_expired(server.tailnet.clock())
            await ce.register(e.register_request(expiry=logout))
            assert server.tailnet.state.node_by_machine(e.machine_key_hex) is None


async def test_key_rotation_with_old_node_key(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        key = await make_key(server, reusable=True)
        a = SimNode.new("alpha")
        async with a.connect(server) as client:
            await client.register(a.register_request(key))
            node = server.tailnet.state.node_by_machine(a.machine_key_hex)
            assert node is not None
            old = a.node_key
            a.node_private = SimNode.new("x").node_private
            resp = await client.register(
                RegisterRequest(
                    version=130,
                    node_key=a.node_key,
                    old_node_key=old,
                    auth=a.register_request(key).auth,
                    hostinfo=a.register_request().hostinfo,
                )
            )
            assert resp.machine_authorized and not resp.error
        rotated = server.tailnet.state.nodes[node.id]
        assert rotated.node_key == a.node_key.removeprefix("nodekey:")
        assert len(server.tailnet.state.nodes) == 1
        assert server.store.read()[-1].type in ("preauthkey.used", "node.key_rotated")


async def test_interactive_registration_approved_by_admin(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        await server.ops.dispatch("users.create", {"name": "bob"}, ADMIN)
        n = SimNode.new("laptop")
        async with n.connect(server) as client:
            first = await client.register(n.register_request())
            assert first.auth_url.startswith(f"http://127.0.0.1:{server.port}/register/")
            assert not server.tailnet.state.nodes
            auth_id = first.auth_url.rsplit("/", 1)[-1]
            result: list[object] = []

            async def follow() -> None:
                result.append(await client.register(n.register_request(followup=first.auth_url)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                assert server.control is not None
                pending = server.control.pending
                await wait_until(lambda: auth_id in pending._waiters, what="the follow-up to wait")
                assert not result  # it long-polls
                await server.ops.dispatch("nodes.register", {"key": auth_id, "user": "bob"}, ADMIN)
        [resp] = result
        assert resp.machine_authorized and resp.login.login_name == "bob"  # type: ignore[attr-defined]
        reg = [e for e in server.store.read() if e.type == "node.registered"]
        assert reg[0].actor == ADMIN  # the approving admin is the actor


async def test_map_for_unknown_node_is_an_explicit_error(tmp_path: Path) -> None:
    from protocol import RemoteProtocolError

    async with running(tmp_path) as server:
        n = SimNode.new("ghost")
        async with n.connect(server) as client:
            with pytest.raises(RemoteProtocolError) as excinfo:
                async with client.map_stream(n.map_request()):
                    pass
            assert excinfo.value.http_status == 404


async def test_node_key_bound_to_machine_key(tmp_path: Path) -> None:
    """Knowing another node's key is not enough: the Noise machine key must match."""
    from protocol import RemoteProtocolError

    async with running(tmp_path) as server:
        key = await make_key(server)
        a = SimNode.new("alpha")
        async with a.connect(server) as ca:
            await ca.register(a.register_request(key))
        thief = SimNode(
            machine_private=SimNode.new("t").machine_private,
            node_private=a.node_private,
            hostname="t",
        )
        async with thief.connect(server) as ct:
            resp = await ct.register(thief.register_request())
            assert "another machine" in resp.error
            with pytest.raises(RemoteProtocolError) as excinfo:
                async with ct.map_stream(thief.map_request()):
                    pass
            assert excinfo.value.http_status == 401


async def _http_get(port: int, path: str) -> tuple[int, str]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
            )
            while len(body) < length:
                body += await stream.receive_some(65536)
    return int(head.split()[1]), body.decode(errors="replace")


async def test_health_metrics_and_register_page(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        key = await make_key(server)
        status, body = await _http_get(server.port, "/health")
        assert status == 200 and '"status":"ok"' in body.replace(" ", "")
        n = SimNode.new("pending-box")
        async with n.connect(server) as client:
            await client.register(n.register_request(key))
            pend = SimNode.new("laptop")
            async with pend.connect(server) as pc:
                url = (await pc.register(pend.register_request())).auth_url
                status, body = await _http_get(server.port, url.split(str(server.port), 1)[1])
                assert (
                    status == 200 and "tailledger nodes register --key" in body and "laptop" in body
                )
            # Metrics are on their own (local) address, not on the public control port.
            status, body = await _http_get(server.port, "/metrics")
            assert status == 404
            assert server.metrics_port not in (0, server.port)
            status, body = await _http_get(server.metrics_port, "/metrics")
            assert status == 200
            assert "tailledger_nodes 1.0" in body
            assert "tailledger_log_head_seq" in body
        status, _ = await _http_get(server.port, "/register/nonexistent")
        assert status == 404


async def test_policy_change_updates_filters_and_visibility(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        akey = await make_key(server, "alice")
        bkey = await make_key(server, "bob")
        a, b = SimNode.new("alpha"), SimNode.new("bravo")
        async with a.connect(server) as ca, b.connect(server) as cb:
            await ca.register(a.register_request(akey))
            await cb.register(b.register_request(bkey))
            async with cb.map_stream(b.map_request()) as sb:
                first = await next_update(sb)
                assert first.peers and len(first.peers) == 1  # allow-all: a is visible
                alpha_ip = first.peers[0].addresses[0].split("/")[0]  # type: ignore[index]
                # alice may reach bob's port 80: bob's filter admits alice's address.
                policy = '{"acls": [{"action": "accept", "src": ["alice@"], "dst": ["bob@:80"]}]}'
                await server.ops.dispatch("policy.set", {"text": policy}, ADMIN)
                msg = await next_update(sb)
                while msg.packet_filters is None:
                    msg = await next_update(sb)
                rules = msgspec.json.decode(bytes(msg.packet_filters["base"]))
                assert len(rules) == 1
                assert alpha_ip in rules[0]["SrcIPs"]
                assert {d["IP"] for d in rules[0]["DstPorts"]} == {
                    a.split("/")[0] for a in first.node.addresses or []  # type: ignore[union-attr]
                }
                assert all(d["Ports"] == {"First": 80, "Last": 80} for d in rules[0]["DstPorts"])
                # A policy that lets nobody reach anybody hides the peers.
                await server.ops.dispatch("policy.set", {"text": '{"acls": []}'}, ADMIN)
                msg = await next_update(sb)
                while not msg.peers_removed:
                    msg = await next_update(sb)
                assert msg.peers_removed == [first.peers[0].id]


async def test_derp_map_changes_reach_connected_clients(tmp_path: Path) -> None:
    region = '{{"Regions": {{"{rid}": {{"RegionID": {rid}, "RegionCode": "r{rid}", "Nodes": [{{"Name": "{rid}a", "RegionID": {rid}, "HostName": "derp{rid}.example"}}]}}}}}}'
    derp_file = tmp_path / "derp.json"
    derp_file.write_text(region.format(rid=901))
    derp = {"paths": [str(derp_file)], "auto_update_interval": "1s", "server": {"enabled": False}}
    async with running(tmp_path / "data", derp=derp) as server:
        key = await make_key(server)
        a = SimNode.new("alpha")
        async with a.connect(server) as client:
            await client.register(a.register_request(key))
            async with client.map_stream(a.map_request()) as stream:
                first = await next_update(stream)
                assert first.derp_map is not None and set(first.derp_map.regions or {}) == {901}
                derp_file.write_text(region.format(rid=902))
                with trio.fail_after(10):
                    while True:
                        msg = await stream.__anext__()
                        if msg.derp_map is not None:
                            break
                assert set(msg.derp_map.regions or {}) == {902}


async def test_full_maps_take_turns_and_a_stalled_client_gives_its_turn_up(
    tmp_path: Path,
) -> None:
    # The turn is long enough for b to queue behind a even on a loaded machine.
    tuning = {"full_map_concurrency": 1, "full_map_turn_timeout": "3s"}
    async with running(tmp_path, tuning=tuning) as server:
        key = await make_key(server, reusable=True)
        a, b = SimNode.new("alpha"), SimNode.new("bravo")
        # a reads nothing and its window is far smaller than a full map: its full map
        # stays in flight and holds the only turn.
        async with (
            open_control_client(
                "127.0.0.1", server.port, machine_key=a.machine_private, initial_window_size=64
            ) as ca,
            b.connect(server) as cb,
        ):
            await ca.register(a.register_request(key))
            await cb.register(b.register_request(key))
            async with ca.map_stream(a.map_request()) as sa:
                control = server.control
                assert control is not None
                await wait_until(lambda: control.streams._full_maps.value == 0, what="a's full map to hold the turn")
                async with cb.map_stream(b.map_request()) as sb:
                    # b's full map does not go out during a's turn: it waits for it.
                    await wait_until(
                        lambda: control.streams._full_maps.statistics().tasks_waiting == 1, what="b to wait for the turn"
                    )
                    # a's turn ends after the timeout: b gets its full map, a still
                    # gets all of its own once it reads.
                    b_first = await next_update(sb, wait=10)
                    assert b_first.node is not None and b_first.node.key == b.node_key
                    a_first = await next_update(sa, wait=10)
                    assert a_first.node is not None and a_first.node.key == a.node_key
                    assert [p.key for p in a_first.peers or []] == [b.node_key]


async def test_many_streams_opened_at_once_all_get_full_maps(tmp_path: Path) -> None:
    async with running(tmp_path, tuning={"full_map_concurrency": 2}) as server:
        key = await make_key(server, reusable=True)
        nodes = [SimNode.new(f"n{i}") for i in range(8)]
        firsts: dict[str, MapResponse] = {}

        async def one(node: SimNode) -> None:
            async with node.connect(server) as client:
                await client.register(node.register_request(key))
                async with client.map_stream(node.map_request()) as stream:
                    firsts[node.node_key] = await next_update(stream)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for node in nodes:
                    nursery.start_soon(one, node)
        assert set(firsts) == {n.node_key for n in nodes}
        assert all(m.node is not None and m.node.key == k for k, m in firsts.items())


async def test_idle_streams_get_keepalives_within_the_interval(tmp_path: Path) -> None:
    interval = 1.0
    async with running(tmp_path, tuning={"map_keepalive_interval": "1s"}) as server:
        key = await make_key(server)
        a = SimNode.new("alpha")
        async with a.connect(server) as client:
            await client.register(a.register_request(key))
            async with client.map_stream(a.map_request()) as stream:
                first = await next_update(stream)
                assert first.node is not None
                last = trio.current_time()
                gaps: list[float] = []
                with trio.fail_after(10):
                    while len(gaps) < 4:
                        msg = await stream.__anext__()
                        assert msg.keep_alive and msg.node is None and not msg.peers_changed
                        now = trio.current_time()
                        gaps.append(now - last)
                        last = now
        # Never quieter than the interval (plus scheduling slack), never chatty.
        assert all(interval * 0.5 <= g <= interval * 1.5 for g in gaps), gaps
        # Sent to the parked stream by its transport (plain TCP), not by resuming it.
        assert server.control is not None and server.control.stats.keepalives_direct >= 3


async def test_shutdown_with_open_streams_is_quiet_and_marks_nodes_offline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    nodes = [SimNode.new(f"n{i}") for i in range(5)]
    ended = trio.Semaphore(0)

    async def follow(node: SimNode, server_port: Services, key: str, task_status: trio.TaskStatus[None]) -> None:
        async with node.connect(server_port) as client:
            await client.register(node.register_request(key))
            async with client.map_stream(node.map_request()) as stream:
                await next_update(stream)
                task_status.started()
                with contextlib.suppress(Exception):
                    async for _ in stream:
                        pass
        ended.release()

    async with trio.open_nursery() as clients:
        async with running(tmp_path) as server:
            key = await make_key(server, reusable=True)
            for node in nodes:
                await clients.start(follow, node, server, key)
            control = server.control
            assert control is not None and control.streams.streams_open == len(nodes)
        # The server is gone; its streams ended with it.
        with trio.fail_after(10):
            for _ in nodes:
                await ended.acquire()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert control.streams.streams_open == 0
    state = server.tailnet.state
    for node in nodes:
        n = state.node_by_machine(node.machine_key_hex)
        assert n is not None
        presence = control.presence.get(n.id)
        assert presence is not None and not presence.online


async def test_stream_clean_up_after_the_control_stopped_does_not_raise(tmp_path: Path) -> None:
    # At SIGTERM the whole task tree is cancelled at once: the control's own nursery
    # may close before a stream's clean-up asks it to mark the node offline later.
    # (Seen in a 2,000-node run: a logged traceback per stream, 40% of the shutdown.)
    async with running(tmp_path) as server:
        control = server.control
        assert control is not None
    assert control.streams._start_soon(trio.sleep, 0) is False  # closed: refused, no exception


async def test_presence_is_not_held_back_long_after_an_expensive_fan_out(tmp_path: Path) -> None:
    """Presence-only updates are paced by what the last fan-out cost, within a bound:
    an endpoint change reaches the peers within seconds even if a fan-out was slow."""
    async with (
        running(tmp_path) as server,
        two_registered(server) as (a, ca, b, cb),
        cb.map_stream(b.map_request()) as sb,
    ):
        await next_update(sb)
        async with ca.map_stream(a.map_request()) as sa:
            await next_update(sa)
            await next_update(sb)  # a came online
            assert server.control is not None
            # As if the last fan-out took 10 minutes: paced by that cost alone, the
            # change would wait 50 minutes; the bound (a few seconds) lets it out.
            # The deadline only tells the two apart: no duration is asserted.
            server.control.streams._fanout_cost = 600.0
            await ca.post_json(
                "/machine/map", a.map_request(stream=False, omit_peers=True, endpoints=["203.0.113.9:41641"])
            )
            with trio.fail_after(30):
                while True:
                    msg = await next_update(sb)
                    if any(p.endpoints == ["203.0.113.9:41641"] for p in msg.peers_changed_patch or []):
                        break


async def test_a_join_a_newcomers_full_map_took_into_the_hub_is_not_held_as_presence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A newcomer opens its map stream while its join is being coalesced: its full
    map brings the hub up to date with the join (it must see itself). The join is
    still a log change the other streams have not been sent: the publication is not
    held back as presence alone (paced by the last fan-out's cost). Seen at 10,000
    streams: joins waited 2.5 s for a presence hold."""
    monkeypatch.setattr(streams_module, "_PRESENCE_MAX_HOLD", 3600.0)
    async with running(tmp_path) as server:
        assert server.control is not None
        streams = server.control.streams
        # A coalesce window wide enough that the newcomer's stream surely opens in it.
        streams.settings = dataclasses.replace(streams.settings, coalesce=2.0)
        async with alpha_streaming(server) as (sa, b, cb, key):
            # As if the last fan-out took 10 minutes: a presence-only
            # publication would now be held for 50 minutes.
            streams._fanout_cost = 600.0
            published = streams._published_seq
            await cb.register(b.register_request(key))
            async with cb.map_stream(b.map_request()) as sb:
                first = await next_update(sb)
                assert [p.name for p in first.peers or ()] == ["alpha.tailnet.internal."]
                # The situation: no publication yet, and the newcomer's full map
                # took the join out of the pending log change into the hub.
                assert streams._published_seq == published
                assert streams._hub_sub.pending.is_empty()
                with trio.fail_after(30):
                    joined = await next_update(sa)
                assert "bravo.tailnet.internal." in [p.name for p in joined.peers_changed or ()]


async def test_streams_opened_between_publications_start_from_one_hub_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream's full map brings the hub up to the log, not to presence alone: the
    streams that open between two publications start from one hub version (after a
    restart, a version per reconnecting client cost a diff and an encoding each), and
    the next publication tells them one another's presence."""
    monkeypatch.setattr(streams_module, "_PRESENCE_MAX_HOLD", 3600.0)
    async with running(tmp_path) as server, two_registered(server) as (a, ca, b, cb):
        assert server.control is not None
        streams = server.control.streams
        await wait_until(
            lambda: streams.hub.state is server.tailnet.state and streams._hub_sub.pending.is_empty(),
            what="the registrations to be published",
        )
        # As if the last fan-out took 10 minutes: presence alone is held back.
        streams._fanout_cost = 600.0
        async with ca.map_stream(a.map_request()) as sa:
            first_a = await next_update(sa)
            version = streams.hub.seq
            async with cb.map_stream(b.map_request(endpoints=["198.51.100.7:41641"])) as sb:
                first_b = await next_update(sb)
                assert streams.hub.seq == version  # alpha's coming online made no version
                [alpha] = first_b.peers or []
                assert not alpha.online  # as of that version: the next publication tells
                assert first_a.control_time is not None and first_b.control_time is not None
                assert first_b.control_time >= first_a.control_time  # the clock's, not the hub's
                # A log change publishes, the presence held back with it.
                await server.ops.dispatch("nodes.rename", {"node": "alpha", "new_name": "a2"}, ADMIN)
                with trio.fail_after(30):
                    while True:
                        msg = await next_update(sb)
                        if any(p.online for p in msg.peers_changed_patch or ()) or any(
                            p.online for p in msg.peers_changed or ()
                        ):
                            break
                    while True:
                        msg = await next_update(sa)
                        if any(p.online for p in msg.peers_changed_patch or ()) or any(
                            p.online for p in msg.peers_changed or ()
                        ):
                            break


async def test_idle_map_streams_hold_no_task_and_still_get_changes(tmp_path: Path) -> None:
    """Between updates a map stream is parked (no task per idle node); a join wakes it."""
    from .test_serve import _tasks_running

    async with running(tmp_path) as server:
        key = await make_key(server, reusable=True)
        a, b = SimNode.new("alpha"), SimNode.new("bravo")
        async with a.connect(server) as ca:
            await ca.register(a.register_request(key))
            async with ca.map_stream(a.map_request()) as sa:
                await next_update(sa)
                await wait_until(lambda: not _tasks_running("_serve_request"), what="the stream to park")
                async with b.connect(server) as cb:
                    await cb.register(b.register_request(key))
                    msg = await next_update(sa)
                    assert [p.key for p in msg.peers_changed or []] == [b.node_key]
                await wait_until(lambda: not _tasks_running("_serve_request"), what="the stream to park again")


@pytest.mark.parametrize("transport_busy", [False, True])
async def test_a_publication_reaches_parked_streams_through_their_transport(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, transport_busy: bool
) -> None:
    """A parked stream is sent a publication's update by its transport at once (no
    task, no resumption); when the transport cannot send at once, the stream is
    resumed and sends the update it was handed first: either way it arrives, once."""
    if transport_busy:
        monkeypatch.setattr(NoiseSession, "_send_now", lambda self, stream_id, data: False)
    async with running(tmp_path) as server, alpha_streaming(server) as (sa, b, cb, key):
        assert server.control is not None
        await wait_until(lambda: any(server.control.streams._parked[g] for g in range(WAKE_GROUPS)))
        await cb.register(b.register_request(key))
        joined = await next_update(sa)
        assert [p.name for p in joined.peers_changed or ()] == ["bravo.tailnet.internal."]
        bnode = server.tailnet.state.node_by_machine(b.machine_key_hex)
        assert bnode is not None
        await server.ops.dispatch("nodes.rename", {"node": str(bnode.id), "new_name": "b2"}, ADMIN)
        renamed = await next_update(sa)
        assert [p.name for p in renamed.peers_changed or ()] == ["b2.tailnet.internal."]
        direct = server.control.stats.updates_direct
    assert (direct == 0) if transport_busy else (direct >= 2)


async def test_a_stream_that_ended_while_parked_is_not_served_by_the_next_publication(tmp_path: Path) -> None:
    """A stream that ends while parked leaves its park in its wake group until the next
    publication; that publication must not read the hub for it or count it among the
    streams that took the publication (it no longer listens)."""
    async with running(tmp_path) as server, two_registered(server) as (a, ca, b, cb):
        assert server.control is not None
        streams = server.control.streams
        async with ca.map_stream(a.map_request()) as sa:
            await next_update(sa)
            async with cb.map_stream(b.map_request()) as sb:
                await next_update(sb)
                await next_update(sa)  # b came online: that publication is over
                await wait_until(lambda: sum(len(g) for g in streams._parked) == 2)
            await wait_until(lambda: streams.streams_open == 1)  # b's park is stale now
            bnode = server.tailnet.state.node_by_machine(b.machine_key_hex)
            assert bnode is not None
            await server.ops.dispatch("nodes.rename", {"node": str(bnode.id), "new_name": "b2"}, ADMIN)
            while True:  # b's online patch may come first
                msg = await next_update(sa)
                if any(p.name == "b2.tailnet.internal." for p in msg.peers_changed or ()):
                    break
            await wait_until(lambda: sum(len(g) for g in streams._parked) == 1)
            assert streams._fanout_left == 0


async def test_a_publication_that_fails_for_one_parked_stream_ends_it_and_serves_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Served without resuming its stream, a publication reads the hub for a parked
    stream in the fan-out itself: a bug there (here: reading a's cursor raises) must
    end that stream alone -- its client reconnects for a full map -- and every other
    stream still gets the update."""
    async with running(tmp_path) as server, two_registered(server) as (a, ca, b, cb):
        assert server.control is not None
        streams = server.control.streams
        anode = server.tailnet.state.node_by_machine(a.machine_key_hex)
        assert anode is not None
        async with ca.map_stream(a.map_request()) as sa, cb.map_stream(b.map_request()) as sb:
            await next_update(sa)
            await next_update(sb)
            await wait_until(lambda: sum(len(g) for g in streams._parked) == 2 and streams._fanout_left <= 0)
            real = StreamCursor.update

            def update(self: StreamCursor, hub: MapHub) -> list[MapMessage]:
                if self.node_id == anode.id:
                    raise RuntimeError("a bug reading one stream's update")
                return real(self, hub)

            monkeypatch.setattr(StreamCursor, "update", update)
            await server.ops.dispatch("nodes.rename", {"node": str(anode.id), "new_name": "a2"}, ADMIN)
            while True:  # an online patch may come first
                msg = await next_update(sb)
                if any(p.name == "a2.tailnet.internal." for p in msg.peers_changed or ()):
                    break
            with trio.fail_after(10):  # a's stream ends
                async for _ in sa:
                    pass
        assert "serving a publication to a parked map stream failed" in caplog.text
        # The server goes on: a new poll gets a full map with the change.
        monkeypatch.setattr(StreamCursor, "update", real)
        async with ca.map_stream(a.map_request()) as sa2:
            full = await next_update(sa2)
            assert full.node is not None and full.node.name == "a2.tailnet.internal."
