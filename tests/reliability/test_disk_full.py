"""Disk full: the data directory on a small filesystem that the test fills up.

The server runs with its data directory on a 4 MiB tmpfs mounted in a private mount
namespace (`smalldisk`); its admin socket stays outside, on the host's disk. The test
fills the tmpfs and checks that:

* appends fail with a clear error: the admin reply and the CLI say the disk is full and
  that nothing changed (no hang, no traceback, the server keeps running and serving
  reads); a client's registration, or its map poll reporting a new hostname, gets an
  error answer saying so, not a hang;
* nothing half-written stays, also when the disk fills up in the middle of a large
  append: the head does not move, the chain verifies, every row decodes;
* the server recovers when space returns: the next append succeeds without a restart,
  a clean stop while the disk is full still exits cleanly (the checkpoint is only a
  cache), and after a restart, or a kill -9 while appends were failing, every
  acknowledged change is there and the projections equal a fresh fold of the log.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import msgspec
import pytest
import trio

from protocol import open_control_client
from tests.protocol.control_harness import SimNode

from .harness import (
    ServerProcess,
    Signature,
    admin,
    admin_rows,
    check_log,
    require,
    signature,
    signing_key_path,
    start_server,
    wait_ready,
)
from .smalldisk import SmallDisk, open_small_disk

pytestmark = pytest.mark.reliability

DISK_SIZE = 4 << 20
#: How long a refused append may take to be answered: a hang fails the test.
ANSWER_DEADLINE = 20


def _policy(comment: str) -> str:
    return f'// {comment}\n{{"acls": [{{"action": "accept", "src": ["*"], "dst": ["*:*"]}}]}}\n'


async def _ok(server: ServerProcess, op: str, args: dict[str, object] | None = None) -> dict[str, object]:
    reply = await admin(server.admin_socket, op, args, within=ANSWER_DEADLINE)
    assert reply["ok"], reply
    result = reply["result"]
    assert isinstance(result, dict)
    return result


async def _refused_for_disk_full(server: ServerProcess, op: str, args: dict[str, object]) -> None:
    """The op gets an error answer that says the disk is full and that nothing changed."""
    reply = await admin(server.admin_socket, op, args, within=ANSWER_DEADLINE)
    assert reply["ok"] is False, reply
    error = str(reply["error"])
    assert "disk is full" in error and "nothing was changed" in error, error


async def _head(server: ServerProcess) -> int:
    head = (await _ok(server, "log.head"))["seq"]
    assert isinstance(head, int)
    return head


async def _register(server: ServerProcess, key: str, hostname: str) -> tuple[SimNode, str]:
    """Register a simulated node; return it and the register response's error."""
    node = SimNode.new(hostname)
    with trio.fail_after(ANSWER_DEADLINE):
        async with open_control_client("127.0.0.1", server.port, machine_key=node.machine_private) as client:
            resp = await client.register(node.register_request(key))
    assert resp.error or resp.machine_authorized, resp
    return node, resp.error


@asynccontextmanager
async def _serving(disk: SmallDisk, tmp_path: Path) -> AsyncIterator[ServerProcess]:
    server = start_server(
        disk.mountpoint / "data", admin_socket=tmp_path / "admin.sock",
        log_path=tmp_path / "serve.log", prefix=disk.command(),
    )
    try:
        await wait_ready(server)
        yield server
    finally:
        server.kill()


async def test_disk_full_refuses_clearly_leaves_nothing_half_written_and_recovers(tmp_path: Path) -> None:
    require("setpriv", "unshare", "nsenter", "mount")
    acked: list[Signature] = []
    with open_small_disk(tmp_path / "disk", DISK_SIZE) as disk:
        data = disk.mountpoint / "data"
        signing_key = disk.host_path(signing_key_path(data))  # the servers' signing key, outside data/
        async with _serving(disk, tmp_path) as server:
            alice = await _ok(server, "users.create", {"name": "alice"})
            acked.append(signature("user.created", {"user_id": alice["id"], "name": "alice"}))
            key = await _ok(server, "preauthkeys.create", {"user": "alice", "reusable": True})
            assert isinstance(key["key"], str)
            n1, error = await _register(server, key["key"], "n1")
            assert error == ""
            acked.append(signature("node.registered", {"machine_key": n1.machine_key_hex}))
            head = await _head(server)

            # -- full: every kind of append is refused, clearly, and nothing moves ----------
            disk.fill()
            await _refused_for_disk_full(server, "users.create", {"name": "bob"})
            await _refused_for_disk_full(server, "policy.set", {"text": _policy("x" * 1000)})
            await _refused_for_disk_full(server, "nodes.rename", {"node": "n1", "new_name": "web"})
            cli = await trio.to_thread.run_sync(server.cli, "users", "create", "bob")
            assert cli.returncode == 1, cli
            assert cli.stderr.startswith("tailledger: ") and "disk is full" in cli.stderr, cli.stderr
            assert "Traceback" not in cli.stderr
            _, error = await _register(server, key["key"], "n2")
            assert "disk is full" in error, error
            # Map polls reporting new routes or a new hostname cannot record them: an
            # error saying why, which the client retries (not a hang, not a 500, and the
            # change is not dropped).
            routes = n1.map_request(stream=False)
            assert routes.hostinfo is not None
            routes = msgspec.structs.replace(
                routes, hostinfo=msgspec.structs.replace(routes.hostinfo, routable_ips=["10.9.0.0/24"])
            )
            for poll_request in (routes, replace(n1, hostname="n1-new").map_request(stream=False)):
                with trio.fail_after(ANSWER_DEADLINE):
                    async with open_control_client(
                        "127.0.0.1", server.port, machine_key=n1.machine_private
                    ) as client:
                        poll = await client.post_json("/machine/map", poll_request)
                assert poll.status == 503 and b"disk is full" in poll.body, poll
            # Reads go on, and the server is still there.
            assert [u["name"] for u in await admin_rows(server.admin_socket, "users.list")] == ["alice"]
            assert server.proc.poll() is None
            assert await _head(server) == head

            # -- the disk fills up in the middle of a large append ---------------------------
            disk.free()
            disk.fill(leave=32 << 10)
            await _refused_for_disk_full(server, "policy.set", {"text": _policy("y" * (150 << 10))})
            assert await _head(server) == head
            verify = await trio.to_thread.run_sync(server.cli, "log", "verify")
            assert verify.returncode == 0 and f"OK: {head} events" in verify.stdout, verify

            # -- space returns: the next appends succeed without a restart -------------------
            disk.free()
            bob = await _ok(server, "users.create", {"name": "bob"})
            acked.append(signature("user.created", {"user_id": bob["id"], "name": "bob"}))
            big = await _ok(server, "policy.set", {"text": _policy("z" * (150 << 10))})
            assert isinstance(big["seq"], int)
            acked.append(signature("policy.set", {"sha256": big["sha256"]}, big["seq"]))
            n2, error = await _register(server, key["key"], "n2")
            assert error == ""
            acked.append(signature("node.registered", {"machine_key": n2.machine_key_hex}))

            # -- a clean stop while the disk is full still exits cleanly ---------------------
            disk.fill()
            await _refused_for_disk_full(server, "users.create", {"name": "carol"})
            status = await trio.to_thread.run_sync(server.stop)
            assert status == 0, server.log_text()[-4000:]
            assert "Traceback" not in server.log_text(), server.log_text()[-4000:]
        disk.free()
        check_log(disk.snapshot(data, tmp_path / f"copy{len(acked)}"), acked, signing_key=signing_key)

        # -- after a restart: everything acknowledged is there; then a kill -9 while full -----
        async with _serving(disk, tmp_path) as server:
            assert [u["name"] for u in await admin_rows(server.admin_socket, "users.list")] == ["alice", "bob"]
            carol = await _ok(server, "users.create", {"name": "carol"})
            acked.append(signature("user.created", {"user_id": carol["id"], "name": "carol"}))
            disk.fill(leave=16 << 10)
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    args: dict[str, object] = {"text": _policy(str(i) * (60 << 10))}
                    nursery.start_soon(_refused_for_disk_full, server, "policy.set", args)
            server.kill()
        disk.free()
        check_log(disk.snapshot(data, tmp_path / f"copy{len(acked)}"), acked, signing_key=signing_key)
        async with _serving(disk, tmp_path) as server:
            dave = await _ok(server, "users.create", {"name": "dave"})
            acked.append(signature("user.created", {"user_id": dave["id"], "name": "dave"}))
            assert server.stop() == 0
        final = check_log(disk.snapshot(data, tmp_path / f"copy{len(acked)}"), acked, signing_key=signing_key)
        assert sorted(u.name for u in final.state.users.values()) == ["alice", "bob", "carol", "dave"]
