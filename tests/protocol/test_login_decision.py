"""A client login is one decision, appended in one transaction with one correlation id."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from cli.server import Services
from eventlog import RecordedEvent
from eventlog.events import AnyEvent
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


def _record_appends(server: Services, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[str, ...]]]:
    """Every append the log committed from now on, as (actor, event types): one append
    is one atomic request, whatever else the group commit put in its transaction."""
    appended: list[tuple[str, tuple[str, ...]]] = []
    append = server.log.append

    async def recording(events: Sequence[AnyEvent], **kw: Any) -> tuple[RecordedEvent, ...]:
        recorded = await append(events, **kw)  # a refused one (a conflict) raises: not counted
        appended.append((str(kw["actor"]), tuple(r.type for r in recorded)))
        return recorded

    monkeypatch.setattr(server.log, "append", recording)
    return appended


async def test_a_login_with_routes_is_one_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the login's own appends are counted: the route it gets approved makes the
    # HA job record the prefix's primary router (actor system:ha) in a transaction of
    # its own, which may land before or after the client has its answer.
    async with running(tmp_path) as server:
        await server.ops.dispatch("policy.set", {"text": POLICY}, ADMIN)
        key = await make_key(server, reusable=True)
        router = SimNode.new("router")
        who = f"node:{router.machine_key_hex}"
        before_seq = server.tailnet.state.seq
        appended = _record_appends(server, monkeypatch)
        async with router.connect(server) as client:
            resp = await client.register(_request(router, key, hostname="router", routes=["10.20.0.0/16"]))
        assert resp.error == "" and resp.machine_authorized
        login = ("node.registered", "preauthkey.used", "node.routes_advertised", "node.routes_approved")
        assert [types for actor, types in appended if actor == who] == [login]  # one transaction, not four
        events = [e for e in server.store.read(before_seq) if str(e.actor) == who]
        assert tuple(e.type for e in events) == login
        assert len({e.correlation_id for e in events}) == 1
        approved = events[-1].event
        assert approved.routes == ("10.20.0.0/16",) and approved.auto  # type: ignore[union-attr]
        node = server.tailnet.state.node_by_machine(router.machine_key_hex)
        assert node is not None and node.approved_routes == ("10.20.0.0/16",)
        # Nobody else appended anything but that primary router.
        others = {types for actor, types in appended if actor != who}
        assert others <= {("route.primary_changed",)}

        # Logging in again with a new host name and another route: one more transaction.
        seq = server.tailnet.state.seq
        appended.clear()
        async with router.connect(server) as client:
            await client.register(
                _request(router, None, hostname="router-2", routes=["10.20.0.0/16", "10.30.0.0/16"])
            )
        again = ("node.routes_advertised", "node.hostname_changed")
        assert [types for actor, types in appended if actor == who] == [again]
        events = [e for e in server.store.read(seq) if str(e.actor) == who]
        assert tuple(e.type for e in events) == again
        assert len({e.correlation_id for e in events}) == 1


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
