"""Tailscale SSH check mode over the real protocol: the destination node asks
``/machine/ssh/action/…``; the connection is held until an admin approves (CLI op or
web page) or rejects; decisions are events; within the policy's checkPeriod the same
source and user are accepted at once."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from cli.server import Services
from eventlog.events import SshCheckApproved, SshCheckRejected
from projections import CommandError
from projections.state import Node
from protocol import ControlClient
from tests.support.waits import wait_until

from .control_harness import ADMIN, SimNode, make_key, running

POLICY = """{
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
  "ssh": [{"action": "check", "src": ["autogroup:member"], "dst": ["autogroup:self"],
           "users": ["root"], "checkPeriod": "1h"}]
}"""


async def _ask(client: ControlClient, path: str) -> dict[str, object]:
    resp = await client.request("GET", path)
    assert resp.status == 200, resp.body
    out = json.loads(resp.body)
    assert isinstance(out, dict)
    return out


async def _register(server: Services, client: ControlClient, sim: SimNode, key: str) -> Node:
    """Register ``sim`` with the pre-auth key; its node as the server folded it."""
    await client.register(sim.register_request(key))
    node = server.tailnet.state.node_by_key(sim.node_key.removeprefix("nodekey:"))
    assert node is not None
    return node


def _path(url: object) -> str:
    assert isinstance(url, str)
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


async def test_hold_approve_then_accepted_within_the_check_period(tmp_path: Path) -> None:
    async with running(tmp_path, derp={"server": {"enabled": False}}) as server:
        await server.ops.dispatch("policy.set", {"text": POLICY}, ADMIN)
        key = await make_key(server, reusable=True)
        laptop, box = SimNode.new("laptop"), SimNode.new("box")
        async with laptop.connect(server) as lc, box.connect(server) as bc:
            src = await _register(server, lc, laptop, key)
            dst = await _register(server, bc, box, key)
            path = f"/machine/ssh/action/{src.id}/to/{dst.id}?local_user=root"

            # Only the destination may ask about connections to itself.
            assert (await lc.request("GET", path)).status == 403

            first = await _ask(bc, path)
            assert "requires an additional check" in str(first["message"])
            assert "/ssh/check/" in str(first["message"])
            pending = await server.ops.dispatch("ssh.pending", {}, ADMIN)
            assert isinstance(pending, list) and len(pending) == 1
            check_id = pending[0]["id"]
            assert check_id in str(first["holdAndDelegate"])

            # The page the SSH user is sent to says what waits and how an admin approves.
            async with httpx.AsyncClient() as http:
                page = await http.get(f"http://127.0.0.1:{server.port}/ssh/check/{check_id}")
                assert page.status_code == 200 and f"tailledger ssh approve {check_id}" in page.text
                assert "laptop" in page.text and "root" in page.text
                assert (await http.get(f"http://127.0.0.1:{server.port}/ssh/check/nope")).status_code == 404

            head = server.tailnet.state.seq
            with pytest.raises(CommandError, match="no open SSH check"):
                await server.ops.dispatch("ssh.approve", {"id": "nope"}, ADMIN)
            assert server.tailnet.state.seq == head

            async with trio.open_nursery() as nursery:
                answers: list[dict[str, object]] = []

                async def held() -> None:
                    answers.append(await _ask(bc, _path(first["holdAndDelegate"])))

                nursery.start_soon(held)
                checks = server.ssh_checks
                assert checks is not None
                # Approve once the node's request is being held.
                held_now = checks.pending[check_id].decided
                await wait_until(lambda: held_now.statistics().tasks_waiting, what="the request to be held")
                await server.ops.dispatch("ssh.approve", {"id": check_id}, ADMIN)
            assert answers[0].get("accept") is True
            # Within the checkPeriod: accepted at once.
            assert (await _ask(bc, path)).get("accept") is True
        approved = [(e.event, str(e.actor)) for e in server.store.read() if isinstance(e.event, SshCheckApproved)]
        assert len(approved) == 1 and approved[0][1] == "admin:test"
        ev = approved[0][0]
        assert (ev.src_node_id, ev.dst_node_id, ev.local_user) == (src.id, dst.id, "root")
        assert 3590 <= (ev.until - server.store.read()[-1].recorded_at).total_seconds() <= 3610


async def test_a_rejected_check_refuses_the_connection(tmp_path: Path) -> None:
    async with running(tmp_path, derp={"server": {"enabled": False}}) as server:
        await server.ops.dispatch("policy.set", {"text": POLICY}, ADMIN)
        key = await make_key(server, reusable=True)
        laptop, box = SimNode.new("laptop"), SimNode.new("box")
        async with laptop.connect(server) as lc, box.connect(server) as bc:
            src = await _register(server, lc, laptop, key)
            dst = await _register(server, bc, box, key)
            first = await _ask(bc, f"/machine/ssh/action/{src.id}/to/{dst.id}?local_user=root")
            pending = await server.ops.dispatch("ssh.pending", {}, ADMIN)
            assert isinstance(pending, list)
            check_id = pending[0]["id"]
            await server.ops.dispatch("ssh.reject", {"id": check_id, "reason": "not now"}, ADMIN)
            answer = await _ask(bc, _path(first["holdAndDelegate"]))
        # Decided before the node asked again: it gets the refusal, with the reason.
        assert answer.get("reject") is True and "not now" in str(answer.get("message"))
        rejected = [e.event for e in server.store.read() if isinstance(e.event, SshCheckRejected)]
        assert len(rejected) == 1 and rejected[0].reason == "not now"


TWO_PERIODS = """{
  "tagOwners": {"tag:db": ["autogroup:member"], "tag:web": ["autogroup:member"]},
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
  "ssh": [
    {"action": "check", "src": ["autogroup:member"], "dst": ["tag:db"], "users": ["root"], "checkPeriod": "2h"},
    {"action": "check", "src": ["autogroup:member"], "dst": ["tag:web"], "users": ["root"], "checkPeriod": "30m"}
  ]
}"""


async def test_each_destination_keeps_its_own_rules_check_period(tmp_path: Path) -> None:
    """One approval of a person (source node and local user), then each destination lets
    them in for as long as *its* check rule says: 2 h for tag:db, 30 min for tag:web (the
    policy's shortest period must not cut the db rule's)."""
    async with running(tmp_path, derp={"server": {"enabled": False}}) as server:
        now = [server.tailnet.clock()]
        server.tailnet.clock = lambda: now[0]
        await server.ops.dispatch("policy.set", {"text": TWO_PERIODS}, ADMIN)
        key = await make_key(server, reusable=True)
        laptop, db, web = SimNode.new("laptop"), SimNode.new("db"), SimNode.new("web")
        async with laptop.connect(server) as lc, db.connect(server) as dc, web.connect(server) as wc:
            await lc.register(laptop.register_request(key))
            await dc.register(db.register_request(key))
            await wc.register(web.register_request(key))
            state = server.tailnet.state
            ids = {n.hostname: n.id for n in (
                state.node_by_key(s.node_key.removeprefix("nodekey:")) for s in (laptop, db, web)
            ) if n is not None}
            for name, tag in (("db", "tag:db"), ("web", "tag:web")):
                await server.ops.dispatch("nodes.tag", {"node": name, "tags": [tag]}, ADMIN)
            to_db = f"/machine/ssh/action/{ids['laptop']}/to/{ids['db']}?local_user=root"
            to_web = f"/machine/ssh/action/{ids['laptop']}/to/{ids['web']}?local_user=root"

            first = await _ask(dc, to_db)
            pending = await server.ops.dispatch("ssh.pending", {}, ADMIN)
            assert isinstance(pending, list) and len(pending) == 1 and isinstance(pending[0], dict)
            await server.ops.dispatch("ssh.approve", {"id": pending[0]["id"]}, ADMIN)
            assert "holdAndDelegate" in first
            # The approval records its time, and until when the db rule's 2 h run.
            (event,) = [e.event for e in server.store.read() if isinstance(e.event, SshCheckApproved)]
            assert event.approved_at == now[0]
            assert event.until == now[0] + timedelta(hours=2)

            now[0] += timedelta(hours=1)
            assert (await _ask(dc, to_db)).get("accept") is True  # within db's 2 h
            assert "holdAndDelegate" in await _ask(wc, to_web)  # past web's 30 min: checked again
            now[0] += timedelta(hours=1, minutes=1)
            assert "holdAndDelegate" in await _ask(dc, to_db)  # past db's 2 h too
