"""Deltas applied in order equal a fresh full map (issue 7, item 3).

Several simulated clients hold long-polls while a random but valid history of changes
happens (joins, deletions, renames, tags, expiry, routes and approvals, policy
changes, endpoint updates). After every step, each client's netmap — built only by
applying the messages it received, the way tailscale's client does — must equal the
full map the same node receives at that moment (a one-shot map: a second long-poll
would end the first, since a node has one).
"""

from __future__ import annotations

import dataclasses
import functools
import random
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from projections.tailcfg import decode_map_response
from protocol import MapStream
from protocol.mapframe import MapFrameDecoder
from tests.support.netmap_model import ClientNetmap
from tests.support.waits import wait_until

from .control_harness import ADMIN, SimNode, make_key, running

# Each defines tag:web: nodes.tag refuses tags the policy in force does not define.
POLICIES = [
    '{"tagOwners": {"tag:web": ["alice@"]}, "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}',
    '{"tagOwners": {"tag:web": ["alice@"]}, "acls": [{"action": "accept", "src": ["alice@"], "dst": ["tag:web:80,443"]},'
    ' {"action": "accept", "src": ["bob@"], "dst": ["bob@:*"]}],'
    ' "autoApprovers": {"routes": {"10.0.0.0/8": ["alice@"]}}}',
    '{"tagOwners": {"tag:web": ["alice@"]},'
    ' "acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}]}',
]

#: Corp-shaped (issue 19): several classes (users, a group, tags), autogroup:self, a
#: team reaching tags, an admin reaching all, an app grant, auto-approved routes, and
#: SSH to self, to tags and in check mode. The second widens ports and moves the SSH
#: rules: every filter and SSH policy changes, few peers do.
CORP = [
    '{"groups": {"group:eng": ["alice@"], "group:adm": ["bob@"]},'
    ' "tagOwners": {"tag:web": ["alice@"], "tag:db": ["alice@"]},'
    ' "acls": [{"action": "accept", "src": ["group:eng"], "dst": ["tag:web:80,443", "tag:db:5432"]},'
    ' {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},'
    ' {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]},'
    ' {"action": "accept", "src": ["group:adm"], "dst": ["*:*"]}],'
    ' "grants": [{"src": ["group:eng"], "dst": ["tag:web"], "ip": ["443"], "app": {"example.com/cap/web": [{"r": 1}]}}],'
    ' "autoApprovers": {"routes": {"10.0.0.0/8": ["alice@"]}},'
    ' "ssh": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["autogroup:nonroot", "root"]},'
    ' {"action": "accept", "src": ["group:adm"], "dst": ["tag:web", "tag:db"], "users": ["root"]},'
    ' {"action": "check", "src": ["group:eng"], "dst": ["tag:web"], "users": ["autogroup:nonroot"]}]}',
    '{"groups": {"group:eng": ["alice@"], "group:adm": ["bob@"]},'
    ' "tagOwners": {"tag:web": ["alice@"], "tag:db": ["alice@"]},'
    ' "acls": [{"action": "accept", "src": ["group:eng"], "dst": ["tag:web:80-81,443", "tag:db:5432-5433"]},'
    ' {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:22,80"]},'
    ' {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432-5433"]},'
    ' {"action": "accept", "src": ["group:adm"], "dst": ["*:*"]}],'
    ' "grants": [{"src": ["group:eng"], "dst": ["tag:web"], "ip": ["443"], "app": {"example.com/cap/web": [{"r": 2}]}}],'
    ' "ssh": [{"action": "check", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["root"]},'
    ' {"action": "accept", "src": ["group:eng", "group:adm"], "dst": ["tag:db"], "users": ["autogroup:nonroot"]}]}',
]


PARTS = ("peers", "packet_filter", "ssh_policy")


class _Follower:
    """Applies every message of one stream to a model, in a task of its own (reads
    are never cancelled half-way, so no message is lost)."""

    def __init__(self) -> None:
        self.model = ClientNetmap()

    async def follow(self, stream: MapStream) -> None:
        async for msg in stream:
            self.model.apply(msg)



@pytest.mark.parametrize(("seed", "corp"), [(1, False), (2, False), (3, False), (4, False), (5, False),
                                            (6, True), (7, True), (8, True)])
async def test_deltas_equal_fresh_full_maps(tmp_path: Path, seed: int, corp: bool) -> None:
    """``corp``: the history starts under a corp-shaped policy and its policy
    changes switch between corp-shaped ones (issue 19)."""
    policies = CORP if corp else POLICIES
    rnd = random.Random(seed)
    async with running(tmp_path, **{"ephemeral_node_inactivity_timeout": "0"}) as server:
        assert server.control is not None
        # Presence-only changes are normally gathered for half a second; make that
        # short, so the checks below do not wait for them long.
        server.control.streams.settings = dataclasses.replace(server.control.streams.settings, presence_coalesce=0.05)
        keys = {u: await make_key(server, u, reusable=True) for u in ("alice", "bob")}
        if corp:
            await server.ops.dispatch("policy.set", {"text": CORP[0]}, ADMIN)
        await server.ops.dispatch("policy.set", {"text": POLICIES[0]}, ADMIN)
        watchers = [SimNode.new(f"watch-{i}") for i in range(3)]
        others: list[SimNode] = []
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            followers: list[_Follower] = []
            for i, w in enumerate(watchers):
                client = await stack.enter_async_context(w.connect(server))
                await client.register(w.register_request(keys["alice" if i != 1 else "bob"]))
                stream = await stack.enter_async_context(client.map_stream(w.map_request()))
                follower = _Follower()
                nursery.start_soon(follower.follow, stream)
                followers.append(follower)
            models = [f.model for f in followers]

            async def check(step: str) -> None:
                # Each stream must come to equal its node's full map of now; how long
                # it takes is not the question (no quiet period is guessed).
                for w, model in zip(watchers, models, strict=True):
                    if server.tailnet.state.node_by_machine(w.machine_key_hex) is None:
                        continue
                    fresh = ClientNetmap()
                    # The node's current endpoints: the one-shot map changes nothing others see.
                    node = server.tailnet.state.node_by_machine(w.machine_key_hex)
                    assert node is not None and server.presence is not None
                    seen = server.presence.get(node.id)
                    endpoints = list(seen.endpoints) if seen is not None else []
                    async with w.connect(server) as c2:
                        answer = await c2.post_json("/machine/map", w.map_request(stream=False, endpoints=endpoints))
                    assert answer.status == 200
                    [raw] = MapFrameDecoder(compressed=True).receive_data(answer.body)
                    fresh.apply(decode_map_response(raw))
                    want = fresh.comparable()
                    await wait_until(
                        functools.partial(_same, model, want),
                        what=f"{step}: {w.hostname}'s stream to equal its full map",
                        seconds=30,
                        detail=functools.partial(_differences, model, want),
                    )

            await check("start")
            for step in range(20):
                op = rnd.choice(["join", "join", "delete", "rename", "tag", "expire", "routes", "policy", "endpoints"])
                state = server.tailnet.state
                candidates = [n for n in state.nodes.values() if n.machine_key not in {w.machine_key_hex for w in watchers}]
                if op == "join" or not candidates:
                    n = SimNode.new(f"node-{step}")
                    user = rnd.choice(["alice", "bob"])
                    async with n.connect(server) as c:
                        await c.register(n.register_request(keys[user]))
                    others.append(n)
                elif op == "delete":
                    await server.ops.dispatch("nodes.delete", {"node": str(rnd.choice(candidates).id)}, ADMIN)
                elif op == "rename":
                    await server.ops.dispatch("nodes.rename", {"node": str(rnd.choice(candidates).id), "new_name": f"r{step}"}, ADMIN)
                elif op == "tag":
                    target = rnd.choice(candidates)
                    tags = [] if target.tags else ["tag:web"]
                    await server.ops.dispatch("nodes.tag", {"node": str(target.id), "tags": tags}, ADMIN)
                elif op == "expire":
                    await server.ops.dispatch("nodes.expire", {"node": str(rnd.choice(candidates).id)}, ADMIN)
                elif op == "routes":
                    target = rnd.choice(candidates)
                    await server.ops.dispatch("nodes.approve_routes", {"node": str(target.id), "routes": ["10.1.0.0/16"]}, ADMIN)
                elif op == "policy":
                    await server.ops.dispatch("policy.set", {"text": rnd.choice(policies)}, ADMIN)
                else:
                    w = rnd.choice(watchers)
                    async with w.connect(server) as c:
                        await c.post_json("/machine/map", w.map_request(stream=False, omit_peers=True, endpoints=[f"203.0.113.{step}:41641"]))
                await check(f"step {step} ({op})")
            nursery.cancel_scope.cancel()



def _same(model: ClientNetmap, want: dict[str, object]) -> bool:
    got = model.comparable()
    return all(got[part] == want[part] for part in PARTS)


def _differences(model: ClientNetmap, want: dict[str, object]) -> str:
    got = model.comparable()
    return "; ".join(f"{part} differs: {_diff(got[part], want[part])}" for part in PARTS if got[part] != want[part])


def _diff(got: object, want: object) -> str:
    if isinstance(got, dict) and isinstance(want, dict):
        out = []
        for k in sorted(set(got) | set(want), key=str):
            if got.get(k) != want.get(k):
                out.append(f"{k}: {_diff(got.get(k), want.get(k))}")
        return "; ".join(out)
    return f"got {got!r} want {want!r}"
