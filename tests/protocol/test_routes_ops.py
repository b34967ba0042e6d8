"""``routes list|approve|reject`` and policy auto-approvals, against a real server.

Every approval is an event with its actor: an admin's, or ``system:policy-auto-approver``
when a policy change newly approves advertised routes. Bad input is refused with a
clear message and appends nothing. An admin can revoke an auto-approved route, and it
stays revoked (the compiled policy does not approve it again behind the log's back).
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from cli.server import Services
from eventlog import caused_by
from eventlog.events import PolicySet, RoutesApproved
from projections import CommandError
from projections.tailcfg import Hostinfo, NetInfo
from protocol import ControlClient
from tests.support.waits import wait_until

from .control_harness import ADMIN, SimNode, make_key, running

EXIT = ["0.0.0.0/0", "::/0"]


async def _advertise(client: ControlClient, node: SimNode, routes: list[str]) -> None:
    hi = Hostinfo(hostname=node.hostname, os="linux", net_info=NetInfo(preferred_derp=999), routable_ips=routes)
    request = msgspec.structs.replace(node.map_request(stream=False, omit_peers=True), hostinfo=hi)
    assert (await client.post_json("/machine/map", request)).status == 200


def _approvals(server: Services) -> list[tuple[tuple[str, ...], bool, str]]:
    return [
        (e.event.routes, e.event.auto, str(e.actor))
        for e in server.store.read()
        if isinstance(e.event, RoutesApproved)
    ]


async def _route_row(server: Services, node: str) -> dict[str, object]:
    rows = await server.ops.dispatch("routes.list", {}, ADMIN)
    assert isinstance(rows, list)
    (row,) = [r for r in rows if isinstance(r, dict) and r["node"] == node]
    return row


async def test_approve_and_reject_with_exit_nodes_and_clear_refusals(tmp_path: Path) -> None:
    async with running(tmp_path, derp={"server": {"enabled": False}}) as server:
        key = await make_key(server)
        gw = SimNode.new("gw")
        async with gw.connect(server) as client:
            await client.register(gw.register_request(key))
            await _advertise(client, gw, ["10.1.0.0/24", *EXIT])
        row = await _route_row(server, "gw")
        assert row["approved"] == [] and row["exit_node"] is False
        assert row["pending"] == sorted(["10.1.0.0/24", *EXIT])

        head = server.tailnet.state.seq
        for routes, message in (
            (["10.9.0.0/24"], "does not advertise 10.9.0.0/24"),
            (["10.1.0.1/24"], "invalid route '10.1.0.1/24'"),
            ([], "give at least one prefix"),
        ):
            with pytest.raises(CommandError, match=message):
                await server.ops.dispatch("routes.approve", {"node": "gw", "routes": routes}, ADMIN)
        with pytest.raises(CommandError, match="not approved"):
            await server.ops.dispatch("routes.reject", {"node": "gw", "routes": ["10.1.0.0/24"]}, ADMIN)
        assert server.tailnet.state.seq == head  # nothing appended

        got = await server.ops.dispatch("routes.approve", {"node": "gw", "routes": ["10.1.0.0/24"]}, ADMIN)
        assert isinstance(got, dict) and got["approved"] == ["10.1.0.0/24"]
        # One exit route approves the pair: the node becomes an exit node.
        got = await server.ops.dispatch("routes.approve", {"node": "gw", "routes": ["0.0.0.0/0"]}, ADMIN)
        assert isinstance(got, dict) and got["exit_node"] is True
        with pytest.raises(CommandError, match="already approved"):
            await server.ops.dispatch("routes.approve", {"node": "gw", "routes": ["::/0"]}, ADMIN)
        got = await server.ops.dispatch("routes.reject", {"node": "gw", "routes": ["::/0"]}, ADMIN)
        assert isinstance(got, dict) and got["approved"] == ["10.1.0.0/24"] and got["exit_node"] is False
        # The subnet's primary, recorded by route HA, shows in the list.
        await wait_until(lambda: dict(server.tailnet.state.route_primaries) == {"10.1.0.0/24": 1})
        assert (await _route_row(server, "gw"))["primary"] == ["10.1.0.0/24"]
        assert _approvals(server) == [
            (("10.1.0.0/24",), False, "admin:test"),
            (tuple(sorted(["10.1.0.0/24", *EXIT])), False, "admin:test"),
            (("10.1.0.0/24",), False, "admin:test"),
        ]


POLICY = """{
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
  "autoApprovers": {"routes": {"10.2.0.0/16": ["alice@"]}}%s
}"""


async def test_policy_change_auto_approves_and_an_admin_can_revoke(tmp_path: Path) -> None:
    async with running(tmp_path, derp={"server": {"enabled": False}}) as server:
        key = await make_key(server)
        gw = SimNode.new("gw")
        async with gw.connect(server) as client:
            await client.register(gw.register_request(key))
            await _advertise(client, gw, ["10.2.1.0/24"])
        assert _approvals(server) == []  # no autoApprovers yet

        await server.ops.dispatch("policy.set", {"text": POLICY % ""}, ADMIN)
        await wait_until(lambda: bool(_approvals(server)))
        assert _approvals(server) == [(("10.2.1.0/24",), True, "system:policy-auto-approver")]
        assert (await _route_row(server, "gw"))["approved"] == ["10.2.1.0/24"]

        # The admin revokes it: recorded, and no longer served.
        await server.ops.dispatch("routes.reject", {"node": "gw", "routes": ["10.2.1.0/24"]}, ADMIN)
        assert _approvals(server)[-1] == ((), False, "admin:test")
        compiled = server.control.policy.compiled(server.tailnet.state) if server.control else None
        assert compiled is not None and not compiled.primaries
        # Another policy change that approves the same routes does not undo the revocation.
        await server.ops.dispatch("policy.set", {"text": POLICY % ', "tagOwners": {}'}, ADMIN)
        approver = server.auto_approver
        assert approver is not None
        await wait_until(lambda: approver.policy_text == server.tailnet.state.policy_text)
        assert (await _route_row(server, "gw"))["approved"] == []
        assert len(_approvals(server)) == 2


async def test_a_readvertised_set_does_not_reapprove_a_revoked_route(tmp_path: Path) -> None:
    async with running(tmp_path, derp={"server": {"enabled": False}}) as server:
        await server.ops.dispatch("policy.set", {"text": POLICY % ""}, ADMIN)
        key = await make_key(server)
        gw = SimNode.new("gw")
        async with gw.connect(server) as client:
            await client.register(gw.register_request(key))
            await _advertise(client, gw, ["10.2.1.0/24"])  # auto-approved at once, with the login's facts
            assert (await _route_row(server, "gw"))["approved"] == ["10.2.1.0/24"]
            await server.ops.dispatch("routes.reject", {"node": "gw", "routes": ["10.2.1.0/24"]}, ADMIN)
            await _advertise(client, gw, ["10.2.1.0/24", "10.2.2.0/24"])
        # Only the newly advertised route is auto-approved.
        assert (await _route_row(server, "gw"))["approved"] == ["10.2.2.0/24"]


async def test_the_approvals_a_policy_change_triggers_share_its_correlation_id_and_reason(tmp_path: Path) -> None:
    async with running(tmp_path, derp={"server": {"enabled": False}}) as server:
        key = await make_key(server)
        gw = SimNode.new("gw")
        async with gw.connect(server) as client:
            await client.register(gw.register_request(key))
            await _advertise(client, gw, ["10.2.1.0/24"])
        with caused_by(reason="INC-7 let gw carry 10.2/16"):
            await server.ops.dispatch("policy.set", {"text": POLICY % ""}, ADMIN)
        await wait_until(lambda: bool(_approvals(server)))
        [policy] = [e for e in server.store.read() if isinstance(e.event, PolicySet)]
        [approval] = [e for e in server.store.read() if isinstance(e.event, RoutesApproved)]
        assert str(approval.actor) == "system:policy-auto-approver"
        assert approval.correlation_id == policy.correlation_id
        assert approval.reason == "INC-7 let gw carry 10.2/16"
