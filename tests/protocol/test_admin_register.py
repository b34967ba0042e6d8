"""``nodes register --user U`` for a machine that already has a node owned by another
user is refused with why (it used to re-key that node silently, keeping its owner)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from projections import ConflictError
from projections.admin import BadRequest
from tests.support.waits import wait_until

from .control_harness import ADMIN, SimNode, make_key, running


async def test_approving_a_relogin_for_another_user_is_refused(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        await server.ops.dispatch("users.create", {"name": "bob"}, ADMIN)
        first = SimNode.new("laptop")
        async with first.connect(server) as client:
            resp = await client.register(first.register_request(await make_key(server, "alice")))
            assert resp.machine_authorized
        [node] = server.tailnet.state.nodes.values()

        # The same machine logs in again interactively with a new node key.
        again = SimNode(first.machine_private, os.urandom(32), "laptop")
        async with again.connect(server) as client:
            pending = await client.register(again.register_request())
            auth_id = pending.auth_url.rsplit("/", 1)[-1]
            head = server.store.head().seq
            with pytest.raises(ConflictError) as info:
                await server.ops.dispatch("nodes.register", {"key": auth_id, "user": "bob"}, ADMIN)
            message = str(info.value)
            assert f"already registered as node 'laptop' (id {node.id}) owned by user 'alice', not 'bob'" in message
            assert "--user alice" in message and f"delete node {node.id}" in message
            assert server.store.head().seq == head
            assert server.tailnet.state.nodes[node.id].node_key == node.node_key

            # Approved for its owner, it logs in again (re-keyed, same node).
            result: list[object] = []

            async def follow() -> None:
                result.append(await client.register(again.register_request(followup=pending.auth_url)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                assert server.control is not None
                table = server.control.pending
                await wait_until(lambda: auth_id in table._waiters, what="the follow-up to wait")
                assert not result
                await server.ops.dispatch("nodes.register", {"key": auth_id, "user": "alice"}, ADMIN)
        [answer] = result
        assert answer.machine_authorized  # type: ignore[attr-defined]
        [rekeyed] = server.tailnet.state.nodes.values()
        assert rekeyed.id == node.id and rekeyed.node_key == again.node_key.removeprefix("nodekey:")


@pytest.mark.parametrize(
    ("args", "why"),
    [
        ({"user": "alice"}, "missing required field `key`"),
        ({"key": "{auth_id}"}, "missing required field `user`"),
        ({"key": "{auth_id}", "user": 7}, "Expected `str`, got `int` - at `$.user`"),
        ({"key": "{auth_id}", "user": "alice", "ephemeral": True}, "unknown field `ephemeral`"),
    ],
)
async def test_bad_register_arguments_are_refused_and_change_nothing(
    tmp_path: Path, args: dict[str, object], why: str
) -> None:
    async with running(tmp_path) as server:
        await server.ops.dispatch("users.create", {"name": "alice"}, ADMIN)
        node = SimNode.new("laptop")
        async with node.connect(server) as client:
            pending = await client.register(node.register_request())
        auth_id = pending.auth_url.rsplit("/", 1)[-1]
        args = {k: v.format(auth_id=auth_id) if isinstance(v, str) else v for k, v in args.items()}
        head = server.store.head().seq
        with pytest.raises(BadRequest) as info:
            await server.ops.dispatch("nodes.register", args, ADMIN)
        assert str(info.value).startswith("bad arguments: ") and why in str(info.value)
        assert server.store.head().seq == head and not server.tailnet.state.nodes
        assert server.control is not None and await server.control.pending.get(auth_id) is not None
        # The same request with good arguments registers the machine.
        result = await server.ops.dispatch("nodes.register", {"key": auth_id, "user": "alice"}, ADMIN)
        assert result == {"registered": 1, "name": "laptop"}
