"""Which replica runs the jobs that must run once: ephemeral-node clean-up, subnet-route
failover and signing the log head.

With SQLite there is one server and it always leads. On PostgreSQL the replicas elect
one through a session-level advisory lock (:class:`eventlog.pgstore.LeaderLock`),
polled every ``interval`` seconds; the jobs run under :func:`while_leading`, which
starts them when this replica becomes the leader and cancels them when it stops being
one (its database connection broke). A replica killed with -9 loses the lock with its
connection, and another takes over at its next poll.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from eventlog import EventLogError
from eventlog.pgstore import LeaderLock

__all__ = ["Leadership", "while_leading"]

log = logging.getLogger("tailledger.leader")


class Leadership:
    """This replica's standing: ``leading`` (always ``True`` without a lock)."""

    def __init__(self, lock: LeaderLock | None = None, *, interval: float = 1.0) -> None:
        self._lock = lock
        self._interval = interval
        self.leading = lock is None
        self._changed = trio.Event()
        #: How many times this replica became the leader.
        self.terms = 1 if lock is None else 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll the lock until cancelled (then release it)."""
        if self._lock is None:
            task_status.started()
            await trio.sleep_forever()
        lock = self._lock
        limiter = trio.CapacityLimiter(1)
        try:
            self._set(await trio.to_thread.run_sync(lock.poll, limiter=limiter))
            task_status.started()
            while True:
                await trio.sleep(self._interval)
                self._set(await trio.to_thread.run_sync(lock.poll, limiter=limiter))
        finally:
            self.leading = False
            lock.close()

    def _set(self, leading: bool) -> None:
        if leading == self.leading:
            return
        self.leading = leading
        if leading:
            self.terms += 1
        log.info("replica: %s the run-once jobs", "now runs" if leading else "no longer runs")
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def wait_changed(self) -> None:
        await self._changed.wait()


async def while_leading(
    leadership: Leadership,
    job: Callable[..., Awaitable[object]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``job`` (a task started with ``task_status``) whenever this replica leads.

    Reports started once the job has started, when this replica leads already (so a
    server that always leads, on SQLite, has its jobs running before it serves: a
    policy change made at once is seen by the auto-approver), or at once when it does
    not lead (or the job could not start: it is retried).
    """
    reported = False

    def report() -> None:
        nonlocal reported
        if not reported:
            reported = True
            task_status.started()

    while True:
        if not leadership.leading:
            report()
            await leadership.wait_changed()
            continue
        failed = False
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(job)
                report()

                async def stop_when_deposed() -> None:
                    while leadership.leading:
                        await leadership.wait_changed()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(stop_when_deposed)
        except* EventLogError as group:  # the database went away under the job
            log.warning("replica: a run-once job stopped (will restart): %s", group.exceptions[0])
            failed = True
            report()
        if failed:
            await trio.sleep(1.0)
