"""The background jobs that append to the log, with two replicas on one PostgreSQL log:
each change is appended once.

Two in-process servers share one database. The policy auto-approver is a run-once job
(only the leader runs it); the policy file and the extra DNS records file are followed
by every replica, which is safe because each appends only what makes the log match the
file, decided against the head under optimistic concurrency.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio

from cli.server import Services
from eventlog.events import DnsExtraRecordsSet, PolicySet, RoutesApproved
from tests.protocol.control_harness import ADMIN, SimNode, make_key, running
from tests.protocol.test_routes_ops import POLICY, _advertise
from tests.support.waits import wait_until


def _events(server: Services, kind: type) -> list[object]:
    return [e.event for e in server.store.read(0, 100_000) if isinstance(e.event, kind)]


def _replica(tmp_path: Path, pg_dsn: str, **overrides: object) -> dict[str, object]:
    return {
        "database": {"type": "postgres", "dsn": pg_dsn},
        # One signing key for the deployment.
        "audit": {"signing_key_file": str(tmp_path / "signing.key")},
        "derp": {"server": {"enabled": False}},
        **overrides,
    }


async def test_auto_approvals_are_appended_once_and_a_new_leader_does_not_redo_them(
    pg_dsn: str, tmp_path: Path
) -> None:
    a_scope = trio.CancelScope()

    async def run_a(*, task_status: trio.TaskStatus[Services] = trio.TASK_STATUS_IGNORED) -> None:
        with a_scope:
            async with running(tmp_path / "a", **_replica(tmp_path, pg_dsn)) as a:
                task_status.started(a)
                await trio.sleep_forever()

    with trio.fail_after(120):  # a guard against hanging, not a timing assertion
        async with trio.open_nursery() as nursery:
            a: Services = await nursery.start(run_a)
            await wait_until(lambda: a.leadership.leading, what="a leads")
            async with running(tmp_path / "b", **_replica(tmp_path, pg_dsn)) as b:
                assert not b.leadership.leading
                key = await make_key(a)
                gw = SimNode.new("gw")
                async with gw.connect(a) as client:
                    await client.register(gw.register_request(key))
                    await _advertise(client, gw, ["10.2.1.0/24"])
                # Set through the follower: the leader approves, once.
                await b.ops.dispatch("policy.set", {"text": POLICY % ""}, ADMIN)
                await wait_until(lambda: bool(_events(b, RoutesApproved)), what="the approval")
                await wait_until(lambda: a.tailnet.state.seq == b.tailnet.state.seq == b.store.head().seq)
                approved = _events(b, RoutesApproved)
                assert len(approved) == 1

                # An admin revokes it; then the leader goes away and b takes over.
                await b.ops.dispatch("routes.reject", {"node": "gw", "routes": ["10.2.1.0/24"]}, ADMIN)
                a_scope.cancel()
                await wait_until(lambda: b.leadership.leading, what="b takes over", seconds=60)
                # Another policy change approving the same route: b's approver has
                # seen it once its policy is the one in force.
                await b.ops.dispatch("policy.set", {"text": POLICY % ', "tagOwners": {}'}, ADMIN)
                approver = b.auto_approver
                assert approver is not None
                await wait_until(lambda: approver.policy_text == b.tailnet.state.policy_text)
                # The revoked route stays revoked: b did not redo a's approval.
                assert [e.routes for e in _events(b, RoutesApproved)] == [("10.2.1.0/24",), ()]  # type: ignore[attr-defined]


async def test_a_changed_policy_file_and_records_file_are_appended_once(pg_dsn: str, tmp_path: Path) -> None:
    policy = tmp_path / "policy.hujson"
    records = tmp_path / "records.json"
    policy.write_text(POLICY % "")
    records.write_text(json.dumps([{"name": "grafana.example.internal", "type": "A", "value": "100.64.0.3"}]))
    files = {
        "policy": {"mode": "file", "path": str(policy)},
        "dns": {"extra_records_path": str(records)},
    }
    with trio.fail_after(120):  # a guard against hanging, not a timing assertion
        async with (
            running(tmp_path / "a", **_replica(tmp_path, pg_dsn, **files)) as a,
            running(tmp_path / "b", **_replica(tmp_path, pg_dsn, **files)) as b,
        ):
            assert (len(_events(a, PolicySet)), len(_events(a, DnsExtraRecordsSet))) == (1, 1)
            # Both replicas see the files change (each polls them).
            policy.write_text(POLICY % ', "tagOwners": {}')
            records.write_text(json.dumps([{"name": "grafana.example.internal", "type": "A", "value": "100.64.0.4"}]))
            def in_force(server: Services) -> bool:
                state = server.tailnet.state
                records = state.dns_extra_records or ()
                return state.policy_text == policy.read_text() and [r.value for r in records] == ["100.64.0.4"]

            await wait_until(lambda: in_force(a) and in_force(b), what="the new files in force")
            assert (len(_events(b, PolicySet)), len(_events(b, DnsExtraRecordsSet))) == (2, 2)
