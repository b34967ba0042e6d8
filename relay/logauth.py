"""The relay's own consumer of the event log: who may connect, kept current.

The relay does not ask the control server who is authorized; it follows the log through
a :class:`~projections.ProjectionRunner`, so it works the same embedded in ``tailledger
serve`` (the server's own runner, whose projection it shares) or as a separate
``tailledger relay`` process on another machine reading the same database (a runner of
its own, with its own checkpoint name). A node key is authorized while the node
exists and its key has not expired; when a batch of events takes that away (deletion,
key rotation, expiry, logout) the keys are revoked and their open connections closed.
Key expiry that happens by the passage of time is caught by a periodic re-check.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

import trio

from projections import Delta, ProjectionRunner, TailnetState

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
        # Node id -> its authorized key, and how many authorized nodes hold each key
        # (a key stays authorized while any node holding it is). Keys are the state's
        # own hex strings: nothing is kept per node but the entries (issue 19).
        self._by_node: dict[int, str] = {}
        self._holders: dict[str, int] = {}

    def is_authorized(self, node_key: bytes) -> bool:
        return node_key.hex() in self._holders

    def refresh(self, state: TailnetState | None = None) -> set[bytes]:
        """Recompute the authorized set from every node of ``state`` (the runner's by
        default; at start and periodically, for keys that expire by the passage of
        time); return the keys that lost authorization."""
        if state is None:
            state = self.runner.state
        return self._recheck(state, {*state.nodes.keys(), *self._by_node})

    def apply(self, state: TailnetState, delta: Delta) -> set[bytes]:
        """Bring the authorized set to ``state`` after ``delta``, looking only at the
        nodes it changed or removed; return the keys that lost authorization."""
        return self._recheck(state, delta.nodes_changed | delta.nodes_removed)

    def _recheck(self, state: TailnetState, node_ids: Iterable[int]) -> set[bytes]:
        now = self._clock()
        dropped: set[str] = set()
        for nid in node_ids:
            node = state.nodes.get(nid)
            key = None if node is None or node.is_expired(now) else node.node_key
            old = self._by_node.get(nid)
            if old == key:
                continue
            if old is not None:
                del self._by_node[nid]
                self._holders[old] -= 1
                if not self._holders[old]:
                    del self._holders[old]
                    dropped.add(old)
            if key is not None:
                self._by_node[nid] = key
                self._holders[key] = self._holders.get(key, 0) + 1
        return {bytes.fromhex(k) for k in dropped - self._holders.keys()}

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
            due = trio.current_time() + recheck
            while True:
                lost: set[bytes] = set()
                with trio.move_on_at(due):
                    state, delta = await sub.next()
                    lost = self.apply(state, delta)
                if trio.current_time() >= due:
                    lost |= self.refresh()
                    due = trio.current_time() + recheck
                for key in lost:
                    closed = revoke(key)
                    log.info("relay: revoked %s… (%d connection(s) closed)", key.hex()[:16], closed)
