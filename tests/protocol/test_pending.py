"""Pending interactive registrations: capped, trimmed, expiring, beside the log."""

from __future__ import annotations

import gc
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
import trio.testing

from cli.main import build_parser
from eventlog import EventLog, EventLogError, SQLiteEventStore
from eventlog.sidetables import PendingRegistration, SideTables
from projections import ProjectionRunner, Tailnet
from projections.tailcfg import Hostinfo, RegisterRequest
from protocol import ControlClient
from protocol.registrations import (
    Expired,
    PendingLimits,
    PendingRegistrations,
    request_id,
    source_of,
)
from protocol.sshcheck import SshChecks
from tests.support.waits import wait_until

from .control_harness import ADMIN, SimNode, running

#: Nearly the 1 MiB body cap, in a Hostinfo field nobody needs to approve a machine.
BIG = 900_000
#: ``limits.max_hostinfo_bytes`` raised so that such a Hostinfo reaches the pending
#: registrations at all (the default refuses any above 16 KiB outright).
LARGE_HOSTINFO = {"max_hostinfo_bytes": 1 << 20}


def big_request(node: SimNode, **kw: object) -> RegisterRequest:
    return RegisterRequest(
        version=130,
        node_key=node.node_key,
        hostinfo=Hostinfo(hostname=node.hostname, os="linux", push_device_token="x" * BIG),
        **kw,  # type: ignore[arg-type]
    )


async def ask(client: ControlClient, node: SimNode) -> str:
    """Send an interactive register request; return its AuthURL (or fail with its error)."""
    resp = await client.register(node.register_request())
    assert not resp.error, resp.error
    return resp.auth_url


async def test_global_cap_refuses_new_requests_with_a_clear_error(tmp_path: Path) -> None:
    limits = {"pending_registrations_max": 3, "pending_registrations_per_address": 10}
    async with running(tmp_path, limits=limits) as server:
        nodes = [SimNode.new(f"box{i}") for i in range(4)]
        for n in nodes[:3]:
            async with n.connect(server) as client:
                assert await ask(client, n)
        async with nodes[3].connect(server) as client:
            resp = await client.register(nodes[3].register_request())
        assert not resp.auth_url and "too many machines are waiting for approval" in resp.error
        assert "from your address" not in resp.error
        pending = await server.ops.dispatch("nodes.pending", {}, ADMIN)
        assert isinstance(pending, list) and len(pending) == 3
        assert server.control is not None
        assert server.control.pending.stats.refused == {"global": 1, "per_source": 0}
        # A machine that asks again replaces its own request: no refusal.
        async with nodes[0].connect(server) as client:
            assert await ask(client, nodes[0])
        assert not server.tailnet.state.nodes and server.store.head().seq == 0  # no events


async def test_per_address_cap(tmp_path: Path) -> None:
    limits = {"pending_registrations_max": 100, "pending_registrations_per_address": 2}
    async with running(tmp_path, limits=limits) as server:
        nodes = [SimNode.new(f"box{i}") for i in range(3)]
        for n in nodes[:2]:
            async with n.connect(server) as client:
                assert await ask(client, n)
        async with nodes[2].connect(server) as client:
            resp = await client.register(nodes[2].register_request())
        assert "too many machines are waiting for approval from your address" in resp.error
        assert server.control is not None
        assert server.control.pending.stats.refused == {"global": 0, "per_source": 1}
        pending = await server.ops.dispatch("nodes.pending", {}, ADMIN)
        assert isinstance(pending, list) and {p["source"] for p in pending} == {"127.0.0.1"}


def test_ipv6_clients_count_by_their_64() -> None:
    assert source_of("2001:db8:1:2:aaaa::1") == source_of("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert source_of("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_of("") == "unknown"


async def test_only_what_the_approval_needs_is_kept(tmp_path: Path) -> None:
    async with running(tmp_path, limits=LARGE_HOSTINFO) as server:
        n = SimNode.new("laptop")
        hostinfo = Hostinfo(
            hostname="lap\x1b[31mtop" + "y" * 5000, os="linux", request_tags=["tag:web", "tag:db"],
            push_device_token="x" * BIG,
        )
        async with n.connect(server) as client:
            resp = await client.register(RegisterRequest(version=130, node_key=n.node_key, hostinfo=hostinfo))
        listed = await server.ops.dispatch("nodes.pending", {}, ADMIN)
        assert isinstance(listed, list) and len(listed) == 1
        p: dict[str, object] = listed[0]
        assert p["key"] == resp.auth_url.rsplit("/", 1)[-1]
        hostname = p["hostname"]
        assert isinstance(hostname, str) and hostname.startswith("lap[31mtopyyy")  # no ESC
        assert len(hostname) < 300
        assert p["os"] == "linux" and p["request_tags"] == ["tag:web", "tag:db"]
        assert p["machine_key"] == "mkey:" + n.machine_key_hex and p["node_key"] == n.node_key
        assert p["status"] == "waiting" and p["source"] == "127.0.0.1"


def _held(marker_len: int) -> list[object]:
    """Objects alive in this process that hold one of the big test payloads."""
    from protocol.handler import NoiseRequest

    gc.collect()
    return [
        obj
        for obj in gc.get_objects()
        if (isinstance(obj, Hostinfo) and len(obj.push_device_token) >= marker_len)
        or (isinstance(obj, NoiseRequest) and len(obj.body) >= marker_len)
    ]


async def test_many_megabyte_requests_and_waits_retain_nothing_of_them(tmp_path: Path) -> None:
    """Issue 14: 80 register requests with a 1 MiB Hostinfo took 78 MB that stayed."""
    limits = {"pending_registrations_per_address": 50, **LARGE_HOSTINFO}
    async with running(tmp_path, limits=limits) as server:
        nodes = [SimNode.new(f"box{i}") for i in range(12)]
        async with trio.open_nursery() as nursery:
            waiting = trio.CapacityLimiter(len(nodes))
            for n in nodes:
                async with n.connect(server) as client:
                    url = (await client.register(big_request(n))).auth_url
                    assert url
                # Each machine then waits with a follow-up, as big, on its own tunnel.

                async def follow(n: SimNode = n, url: str = url) -> None:
                    async with waiting, n.connect(server) as client:
                        await client.register(big_request(n, followup=url))

                nursery.start_soon(follow)
            await wait_until(lambda: waiting.borrowed_tokens == len(nodes), what="every follow-up sent", seconds=30)
            assert server.control is not None
            pending = server.control.pending
            await wait_until(lambda: len(pending._waiters) == len(nodes), what="every follow-up to wait", seconds=30)
            assert _held(BIG) == []
            nursery.cancel_scope.cancel()


async def test_reject_is_recorded_and_the_waiting_client_told(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        await server.ops.dispatch("users.create", {"name": "bob"}, ADMIN)
        n = SimNode.new("intruder")
        async with n.connect(server) as client:
            url = await ask(client, n)
            auth_id = url.rsplit("/", 1)[-1]
            answers: list[str] = []

            async def follow() -> None:
                answers.append((await client.register(n.register_request(followup=url))).error)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                assert server.control is not None
                table = server.control.pending
                await wait_until(lambda: auth_id in table._waiters, what="the follow-up to wait")
                result = await server.ops.dispatch(
                    "nodes.reject", {"key": auth_id, "reason": "not one of ours"}, ADMIN
                )
                assert result == {"rejected": auth_id, "hostname": "intruder", "reason": "not one of ours"}
            [error] = answers
            assert "rejected" in error and "not one of ours" in error
            # Asking again with the same follow-up: told again, not given a fresh URL.
            again = await client.register(n.register_request(followup=url))
            assert not again.auth_url and "not one of ours" in again.error
        [event] = [e for e in server.store.read() if e.type == "node.registration_rejected"]
        assert event.actor == ADMIN and event.reason == "not one of ours"
        assert msgspec_fields(event.event) == {
            "request_id": auth_id, "machine_key": n.machine_key_hex,
            "node_key": n.node_key.removeprefix("nodekey:"), "hostname": "intruder",
            "source": "127.0.0.1",
        }
        assert not server.tailnet.state.nodes
        with pytest.raises(Exception, match="was rejected by admin:test"):
            await server.ops.dispatch("nodes.register", {"key": auth_id, "user": "bob"}, ADMIN)
        with pytest.raises(Exception, match="already rejected"):
            await server.ops.dispatch("nodes.reject", {"key": auth_id}, ADMIN)
        with pytest.raises(Exception, match="no pending registration"):
            await server.ops.dispatch("nodes.reject", {"key": "nope"}, ADMIN)
        pending = await server.ops.dispatch("nodes.pending", {}, ADMIN)
        assert isinstance(pending, list) and pending[0]["status"] == "rejected"


def msgspec_fields(event: object) -> dict[str, object]:
    import msgspec

    raw = msgspec.to_builtins(event)
    assert isinstance(raw, dict)
    raw.pop("type")
    return raw


async def test_requests_expire_on_a_timer_without_other_requests(tmp_path: Path) -> None:
    """The server's wall clock moves past the expiry; no request arrives; the sweep
    (every few seconds) removes it. Before, only a new request pruned the table."""
    async with running(tmp_path) as server:
        offset = [timedelta(0)]
        server.tailnet.clock = lambda: datetime.now(UTC) + offset[0]
        n = SimNode.new("laptop")
        async with n.connect(server) as client:
            await ask(client, n)
        assert len(await server.ops.dispatch("nodes.pending", {}, ADMIN)) == 1  # type: ignore[arg-type]
        offset[0] = timedelta(minutes=31)  # past the default 30 minutes
        assert server.control is not None
        stats = server.control.pending.stats
        await wait_until(lambda: stats.expired, what="the sweep to expire the request", seconds=20)
        assert await trio.to_thread.run_sync(server.side.count_pending) == 0
        assert await server.ops.dispatch("nodes.pending", {}, ADMIN) == []


async def test_expiry_timer_and_waiting_client_on_virtual_time(
    mock_clock: trio.testing.MockClock,
) -> None:
    """The same with trio's virtual clock: nothing happens before the TTL, then the
    row goes and the waiting client hears it expired."""
    epoch = datetime(2026, 1, 1, tzinfo=UTC)
    log = EventLog(SQLiteEventStore(":memory:"))
    side = SideTables(":memory:")
    pending = PendingRegistrations(
        side, Tailnet(log, ProjectionRunner(log)), PendingLimits(ttl=timedelta(seconds=60)),
        clock=lambda: epoch + timedelta(seconds=trio.current_time()),
    )
    reg = await pending.start(
        machine_key="a" * 64, node_key="b" * 64, hostinfo=None, ephemeral=False, source="192.0.2.1"
    )
    assert isinstance(reg, PendingRegistration)
    outcomes: list[object] = []

    async def settle() -> None:
        """Every task blocked, and none in a database thread (virtual time stands still
        while one runs in real time)."""
        while True:
            await trio.testing.wait_all_tasks_blocked()
            if pending._limiter.borrowed_tokens == 0:
                return
            await trio.to_thread.run_sync(time.sleep, 0.001)

    async with trio.open_nursery() as nursery:
        await nursery.start(pending.run)

        async def wait() -> None:
            outcomes.append(await pending.wait(reg))

        nursery.start_soon(wait)
        await settle()
        mock_clock.jump(59)
        await settle()
        assert outcomes == [] and len(await pending.list()) == 1
        mock_clock.jump(2)
        await settle()
        assert outcomes == [Expired()]
        assert await trio.to_thread.run_sync(side.count_pending) == 0
        assert pending.stats.expired == 1 and pending.stats.current == 0
        nursery.cancel_scope.cancel()


async def test_a_failing_database_does_not_end_the_timer_or_crash_a_register(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """The side tables fail (here: closed): the sweep logs and goes on."""
    log = EventLog(SQLiteEventStore(":memory:"))
    side = SideTables(":memory:")
    pending = PendingRegistrations(side, Tailnet(log, ProjectionRunner(log)), PendingLimits(sweep_interval=5))
    async with trio.open_nursery() as nursery:
        await nursery.start(pending.run)
        side.close()
        for _ in range(3):
            mock_clock.jump(5)
            await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(EventLogError):
            await pending.start(machine_key="a" * 64, node_key="b" * 64, hostinfo=None, ephemeral=False, source="x")
        nursery.cancel_scope.cancel()  # the timer was still running: the nursery did not fail


async def test_a_register_the_database_cannot_store_gets_an_error(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        server.side.close()
        n = SimNode.new("laptop")
        async with n.connect(server) as client:
            resp = await client.register(n.register_request())
        assert not resp.auth_url and "cannot take interactive registrations right now" in resp.error


def test_request_ids_never_begin_with_a_dash() -> None:
    """The page prints ``tailledger nodes register --key ID``; argparse takes a word
    beginning with ``-`` after ``--key`` for an option, so an admin's pasted command
    failed for one id in 64 (base64url has ``-``). Every id is still 24 URL-safe
    characters, all different."""
    ids = [request_id() for _ in range(5000)]
    assert not [i for i in ids if i.startswith("-")]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 24 and re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in ids)


def test_ssh_check_ids_never_begin_with_a_dash(tmp_path: Path) -> None:
    """The same for the id of a held SSH connection: ``tailledger ssh approve ID``
    takes it as a positional argument, which argparse refuses when it begins with ``-``."""
    log = EventLog(SQLiteEventStore(tmp_path / "log.db"))
    checks = SshChecks(Tailnet(log, ProjectionRunner(log)), lambda: "https://control.example")
    ids = [checks._token() for _ in range(5000)]
    assert not [i for i in ids if i.startswith("-")]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 16 and re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in ids)
    # ... and argparse takes every one of them as the command's argument.
    parser = build_parser()
    for i in ids[:200]:
        assert parser.parse_args(["ssh", "approve", i]).id == i
