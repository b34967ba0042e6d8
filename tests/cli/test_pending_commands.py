"""``nodes pending``, ``nodes reject`` and ``nodes register`` against a real server
process, across a restart: pending registrations live beside the log, not in memory."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from projections.tailcfg import RegisterResponse
from protocol import RemoteProtocolError, open_control_client
from tests.protocol.control_harness import SimNode
from tests.support.net import wait_until_serving
from tests.support.waits import wait_until

from .server_process import running_server


async def _register(port: int, node: SimNode, followup: str = "") -> RegisterResponse:
    """One register request over a fresh tunnel (retried while the port comes up)."""

    async def attempt() -> RegisterResponse | None:
        try:
            async with open_control_client("127.0.0.1", port, machine_key=node.machine_private) as client:
                return await client.register(node.register_request(followup=followup))
        except (OSError, RemoteProtocolError):
            return None  # the port is not up yet

    return await wait_until(attempt, what=f"{node.hostname} to register", seconds=30)


def test_pending_requests_survive_a_restart_and_are_decided_from_the_cli(tmp_path: Path) -> None:
    data = tmp_path / "data"
    keeper, stranger = SimNode.new("keeper"), SimNode.new("stranger")
    with running_server(data) as server:
        server.cli("users", "create", "bob", check=True)
        url_keep = trio.run(_register, server.port, keeper).auth_url
        url_stranger = trio.run(_register, server.port, stranger).auth_url
        assert url_keep and url_stranger
    keep_id, stranger_id = url_keep.rsplit("/", 1)[-1], url_stranger.rsplit("/", 1)[-1]

    with running_server(data) as server:  # a new process: nothing of the old one in memory
        # The admin socket comes up before the control logic registers its operations.
        trio.run(wait_until_serving, server.port)
        table = server.cli("nodes", "pending", check=True).stdout
        assert "keeper" in table and "stranger" in table and keep_id in table and "waiting" in table
        listed = json.loads(server.cli("nodes", "pending", "-o", "json", check=True).stdout)
        assert {p["key"]: p["hostname"] for p in listed} == {keep_id: "keeper", stranger_id: "stranger"}

        out = server.cli("nodes", "reject", "--key", stranger_id, "--reason", "not one of ours", check=True)
        assert f"registration {stranger_id} rejected" in out.stdout
        again = server.cli("nodes", "reject", "--key", stranger_id)
        assert again.returncode != 0 and "already rejected" in again.stderr
        server.cli("nodes", "register", "--key", keep_id, "--user", "bob", check=True)

        # The approved machine's follow-up gets its node; the rejected one hears why.
        approved = trio.run(_register, server.port, keeper, url_keep)
        assert approved.machine_authorized and approved.login.login_name == "bob"
        rejected = trio.run(_register, server.port, stranger, url_stranger)
        assert not rejected.machine_authorized and "not one of ours" in rejected.error

        events = json.loads(
            server.cli("log", "show", "--type", "node.registration_rejected", "-o", "json", check=True).stdout
        )
        [event] = events
        assert event["actor"].startswith("admin:") and event["reason"] == "not one of ours"
        assert event["event"]["request_id"] == stranger_id and event["event"]["hostname"] == "stranger"
        left = json.loads(server.cli("nodes", "pending", "-o", "json", check=True).stdout)
        assert [(p["key"], p["status"]) for p in left] == [(stranger_id, "rejected")]
