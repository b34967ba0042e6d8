"""Route HA over the real protocol: two routers serve one subnet; the primary's map
stream ends; within moments the other router is primary in every peer's map, the
change is a ``route.primary_changed`` event by ``system:ha``, and the old primary,
back online, stays secondary."""

from __future__ import annotations

from pathlib import Path

import msgspec
import trio

from cli.server import Services
from eventlog.events import RoutePrimaryChanged
from projections.tailcfg import Hostinfo, MapResponse, NetInfo
from protocol import MapStream
from tests.support.waits import wait_until

from .control_harness import ADMIN, SimNode, make_key, running

NET = "10.77.0.0/24"


class View:
    """What one client knows of its peers, from the messages of its stream."""

    def __init__(self) -> None:
        #: node key -> (primary routes, allowed IPs), and node id -> node key
        self.peers: dict[str, tuple[list[str], list[str]]] = {}
        self._keys: dict[int, str] = {}

    def apply(self, msg: MapResponse) -> None:
        if msg.peers is not None:
            self.peers, self._keys = {}, {}
        for peer in [*(msg.peers or []), *(msg.peers_changed or [])]:
            assert peer.key is not None
            self._keys[peer.id] = peer.key
            self.peers[peer.key] = (list(peer.primary_routes or []), list(peer.allowed_ips or []))
        for removed in msg.peers_removed or []:
            self.peers.pop(self._keys.pop(removed, ""), None)

    def primary(self) -> set[str]:
        return {key for key, (primary, _) in self.peers.items() if NET in primary}


async def _until(stream: MapStream, view: View, done: object) -> None:
    assert callable(done)
    with trio.fail_after(20):
        while not done():
            view.apply(await stream.__anext__())


def _router_request(node: SimNode) -> object:
    hostinfo = Hostinfo(hostname=node.hostname, os="linux", net_info=NetInfo(preferred_derp=999), routable_ips=[NET])
    return msgspec.structs.replace(node.map_request(), hostinfo=hostinfo)


async def _serve_router(server: Services, node: SimNode, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
    """Hold a router's map stream open until the returned scope is cancelled."""
    with trio.CancelScope() as scope:
        async with node.connect(server) as client, client.map_stream(_router_request(node)) as stream:  # type: ignore[arg-type]
            task_status.started(scope)
            async for _ in stream:
                pass


async def test_primary_goes_offline_and_the_other_router_takes_over(tmp_path: Path) -> None:
    config = {"tuning": {"route_failover_grace": "0"}, "derp": {"server": {"enabled": False}}}
    async with running(tmp_path, **config) as server, trio.open_nursery() as nursery:
        key = await make_key(server, reusable=True)
        r1, r2, obs = SimNode.new("router1"), SimNode.new("router2"), SimNode.new("observer")
        for node in (r1, r2, obs):
            async with node.connect(server) as client:
                await client.register(node.register_request(key))
        scope1 = await nursery.start(_serve_router, server, r1)
        await nursery.start(_serve_router, server, r2)
        for node in (r1, r2):
            await server.ops.dispatch("nodes.approve_routes", {"node": node.hostname, "routes": [NET]}, ADMIN)
        async with obs.connect(server) as client, client.map_stream(obs.map_request()) as stream:
            view = View()
            await _until(stream, view, lambda: view.primary() == {r1.node_key})
            assert NET in view.peers[r1.node_key][1] and NET not in view.peers[r2.node_key][1]
            state = server.tailnet.state
            first = state.node_by_key(r1.node_key.removeprefix("nodekey:"))
            second = state.node_by_key(r2.node_key.removeprefix("nodekey:"))
            assert first is not None and second is not None
            await wait_until(lambda: dict(server.tailnet.state.route_primaries) == {NET: first.id})

            scope1.cancel()  # router1's map stream ends: it is offline
            await _until(stream, view, lambda: view.primary() == {r2.node_key})
            assert NET in view.peers[r2.node_key][1] and NET not in view.peers[r1.node_key][1]
            changes = [(e.event, str(e.actor)) for e in server.store.read() if isinstance(e.event, RoutePrimaryChanged)]
            assert [(ev.node_id, ev.previous_node_id, ev.reason, actor) for ev, actor in changes] == [
                (first.id, None, "elected", "system:ha"),
                (second.id, first.id, "offline", "system:ha"),
            ]

            # router1 comes back: it stays secondary (no flapping).
            await nursery.start(_serve_router, server, r1)
            presence = server.presence
            assert presence is not None
            await wait_until(lambda: (p := presence.get(first.id)) is not None and p.online)
            assert server.route_failover is not None
            assert await server.route_failover.check() == 0
            assert dict(server.tailnet.state.route_primaries) == {NET: second.id}
        nursery.cancel_scope.cancel()
