"""A client login is one decision, appended in one transaction with one correlation id."""

from __future__ import annotations

from pathlib import Path

from projections.tailcfg import Hostinfo, NetInfo, RegisterRequest, RegisterResponseAuth

from .control_harness import ADMIN, SimNode, make_key, running

POLICY = """{
  "tagOwners": {"tag:router": ["alice@"]},
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
  "autoApprovers": {"routes": {"10.20.0.0/16": ["alice@"]}}
}"""


def _request(node: SimNode, key: str | None, *, hostname: str, routes: list[str]) -> RegisterRequest:
    return RegisterRequest(
        version=130,
        node_key=node.node_key,
        auth=RegisterResponseAuth(auth_key=key) if key else None,
        hostinfo=Hostinfo(
            hostname=hostname, os="linux", routable_ips=routes, net_info=NetInfo(preferred_derp=999)
        ),
    )


async def test_a_login_with_routes_is_one_transaction(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        await server.ops.dispatch("policy.set", {"text": POLICY}, ADMIN)
        key = await make_key(server, reusable=True)
        router = SimNode.new("router")
        before_seq = server.tailnet.state.seq
        commits = server.log.commits
        async with router.connect(server) as client:
            resp = await client.register(_request(router, key, hostname="router", routes=["10.20.0.0/16"]))
        assert resp.error == "" and resp.machine_authorized
        assert server.log.commits == commits + 1  # one transaction, not four
        events = server.store.read(before_seq)
        assert [e.type for e in events] == [
            "node.registered", "preauthkey.used", "node.routes_advertised", "node.routes_approved",
        ]
        assert len({e.correlation_id for e in events}) == 1
        assert {str(e.actor) for e in events} == {f"node:{router.machine_key_hex}"}
        approved = events[-1].event
        assert approved.routes == ("10.20.0.0/16",) and approved.auto  # type: ignore[union-attr]
        node = server.tailnet.state.node_by_machine(router.machine_key_hex)
        assert node is not None and node.approved_routes == ("10.20.0.0/16",)

        # Logging in again with a new host name and another route: one more transaction.
        seq, commits = server.tailnet.state.seq, server.log.commits
        async with router.connect(server) as client:
            await client.register(
                _request(router, None, hostname="router-2", routes=["10.20.0.0/16", "10.30.0.0/16"])
            )
        assert server.log.commits == commits + 1
        again = server.store.read(seq)
        assert [e.type for e in again] == ["node.routes_advertised", "node.hostname_changed"]
        assert len({e.correlation_id for e in again}) == 1


async def test_a_refused_login_appends_nothing(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        key = await make_key(server)
        seq = server.tailnet.state.seq
        node = SimNode.new("box")
        async with node.connect(server) as client:
            first = await client.register(_request(node, key, hostname="box", routes=[]))
            other = SimNode.new("box2")
            async with other.connect(server) as client2:
                refused = await client2.register(_request(other, key, hostname="box2", routes=["10.0.0.0/8"]))
        assert first.error == ""
        assert refused.error  # a one-shot key already used
        assert [e.type for e in server.store.read(seq)] == ["node.registered", "preauthkey.used"]
