"""The election of the replica that runs the run-once jobs (PostgreSQL advisory lock)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from cli.leader import Leadership, while_leading
from eventlog.pgstore import LeaderLock
from tests.pgserver import PgServer
from tests.support.waits import wait_until, wait_until_sync


def _eventually(poll: Callable[[], bool]) -> bool:
    """Poll as a replica does (for at most a minute)."""
    return wait_until_sync(poll, what="the lock", seconds=60)


def test_one_leader_at_a_time_and_failover(pg_dsn: str) -> None:
    a, b = LeaderLock(pg_dsn), LeaderLock(pg_dsn)
    assert a.poll() is True
    assert b.poll() is False  # held by a
    assert a.poll() is True and b.poll() is False  # a keeps it
    a.close()  # a dies: its session's lock goes with it (once the server notices)
    assert _eventually(b.poll)
    b.close()


def test_the_leader_losing_its_database_steps_down(pg_server: PgServer, pg_dsn: str) -> None:
    a = LeaderLock(pg_dsn)
    assert a.poll()
    pg_server.kill()
    try:
        assert a.poll() is False
    finally:
        pg_server.start()
    assert _eventually(a.poll)  # the back-off lets it reconnect within a few seconds
    a.close()


async def test_jobs_run_only_on_the_leader_and_move_with_it(pg_dsn: str) -> None:
    a = Leadership(LeaderLock(pg_dsn), interval=0.05)
    b = Leadership(LeaderLock(pg_dsn), interval=0.05)
    running: list[str] = []

    def job(name: str) -> Callable[..., Awaitable[None]]:
        async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            running.append(name)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                running.remove(name)

        return run

    with trio.fail_after(60):  # a guard against hanging, not a timing assertion
        async with trio.open_nursery() as nursery:
            a_scope = trio.CancelScope()

            async def run_a() -> None:
                with a_scope:
                    async with trio.open_nursery() as inner:
                        await inner.start(a.run)
                        await inner.start(while_leading, a, job("a"))

            nursery.start_soon(run_a)
            await wait_until(lambda: running == ["a"], what="a, alone, to be elected")
            await nursery.start(b.run)
            await nursery.start(while_leading, b, job("b"))
            assert a.leading and not b.leading
            a_scope.cancel()  # replica a stops: its lock is released, b takes over
            await wait_until(lambda: running == ["b"], what="b to take over")
            assert b.leading and b.terms == 1
            nursery.cancel_scope.cancel()


def test_without_a_lock_the_only_server_leads() -> None:
    assert Leadership(None).leading


async def test_a_replica_that_leads_has_its_job_running_when_started_returns() -> None:
    """With SQLite a server always leads: its run-once jobs must be running before it
    serves, or a change made at once (a policy set right after start-up) is missed by
    a job that reads its starting point later (the policy auto-approver)."""
    for _ in range(20):  # trio schedules runnable tasks in random order: try many times
        began: list[str] = []

        async def job(
            *, began: list[str] = began, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            began.append("job")
            task_status.started()
            await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            await nursery.start(while_leading, Leadership(), job)
            assert began == ["job"]
            nursery.cancel_scope.cancel()
