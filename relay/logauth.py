"""The relay's own consumer of the event log: who may connect, kept current.

The relay does not ask the control server who is authorized; it tails the log itself
(its own :class:`~projections.ProjectionRunner`, its own checkpoint name), so it works
the same embedded in ``tailledger serve`` or as a separate ``tailledger relay`` process
on another machine reading the same database. A node key is authorized while the node
exists and its key has not expired; when a batch of events takes that away (deletion,
key rotation, expiry, logout) the keys are revoked and their open connections closed.
Key expiry that happens by the passage of time is caught by a periodic re-check.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

import trio

from projections import ProjectionRunner, TailnetState

__all__ = ["LogAuthorizer"]

log = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class LogAuthorizer:
    """An :class:`~relay.auth.Authorizer` fed by the event log.

    Args:
        runner: a projection runner over the log (started by the caller or by :meth:`run`).
        clock: wall clock for key expiry (the adapter's; folds never read it).
    """

    def __init__(self, runner: ProjectionRunner, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self.runner = runner
        self._clock = clock
        self._keys: set[bytes] = set()

    def _authorized(self, state: TailnetState) -> set[bytes]:
        now = self._clock()
        return {bytes.fromhex(n.node_key) for n in state.nodes.values() if not n.is_expired(now)}

    def is_authorized(self, node_key: bytes) -> bool:
        return node_key in self._keys

    def refresh(self) -> set[bytes]:
        """Recompute the authorized set; return the keys that lost authorization."""
        new = self._authorized(self.runner.state)
        lost = self._keys - new
        self._keys = new
        return lost

    async def run(
        self,
        revoke: Callable[[bytes], int],
        *,
        recheck: float = 5.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Follow the projection and revoke keys that lose authorization, until cancelled."""
        with self.runner.subscribe() as sub:
            self.refresh()
            task_status.started()
            while True:
                with trio.move_on_after(recheck):
                    await sub.next()
                for key in self.refresh():
                    closed = revoke(key)
                    log.info("relay: revoked %s… (%d connection(s) closed)", key.hex()[:16], closed)
