"""The projection runner: tail the log, fold, publish snapshots, wake subscribers.

The runner is the only writer of the current :class:`~projections.state.TailnetState`.
It loads a checkpoint, folds the backlog, reports readiness through
``task_status.started()``, then follows the log's tail forever. Each batch of events
produces a new immutable snapshot and one merged :class:`~projections.delta.Delta`.

Subscribers (map streams, the relay's authorizer, admin views) never receive events
from the request path: they learn about changes only from here, after the events are
durable, whichever process or replica appended them.

Backpressure: a subscriber that has not yet taken its previous update does not queue;
its pending delta is *merged* with the new one (deltas are associative), so a slow
consumer costs one slot, never a growing queue, and still sees every change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from eventlog import GENESIS_HASH, EventLog, RecordedEvent

from .checkpoint import CheckpointStore
from .delta import Delta
from .errors import CheckpointError
from .fold import fold
from .state import TailnetState

__all__ = ["ProjectionRunner", "Subscription"]

log = logging.getLogger(__name__)


class Subscription:
    """A consumer's view of the runner: the latest state and the merged change since it
    last looked. Close it with :meth:`close` (or ``with``) to stop receiving."""

    def __init__(self, runner: ProjectionRunner, notify: Callable[[], None] | None = None) -> None:
        self._runner = runner
        self._pending = Delta()
        self._wake = trio.Event()
        self._notify = notify
        self.closed = False

    def _offer(self, delta: Delta) -> None:
        self._pending = self._pending.merge(delta)
        self._wake.set()
        if self._notify is not None:
            self._notify()

    @property
    def pending(self) -> Delta:
        """The merged change not yet taken (without taking it)."""
        return self._pending

    def take(self) -> Delta:
        """The merged change since the last call (empty when nothing changed); no wait."""
        delta, self._pending = self._pending, Delta()
        return delta

    async def next(self) -> tuple[TailnetState, Delta]:
        """Wait for the next change; return the state now and everything that changed."""
        while self._pending.is_empty():
            await self._wake.wait()
            self._wake = trio.Event()
        delta, self._pending = self._pending, Delta()
        return self._runner.state, delta

    def close(self) -> None:
        self.closed = True
        self._runner._subscribers.discard(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProjectionRunner:
    """Folds the log into the current state and keeps it current.

    Args:
        log: the event log to tail.
        checkpoints: where to load and save checkpoints (``None``: always fold from 0).
        name: the checkpoint name (a stable name per projection).
        checkpoint_every: save a checkpoint after this many new events.
        on_batch: called synchronously after each batch is folded, before subscribers
            wake (metrics, logging).
        check_links: check every event's hash and its link to the one before it as it
            is folded (a :class:`~eventlog.ChainError` stops the runner); off only for
            ``serve --ignore-chain-errors``.
    """

    def __init__(
        self,
        log: EventLog,
        checkpoints: CheckpointStore | None = None,
        *,
        name: str = "tailnet",
        checkpoint_every: int = 1000,
        on_batch: Callable[[list[RecordedEvent], TailnetState, Delta], None] | None = None,
        check_links: bool = True,
    ) -> None:
        self.log = log
        self._checkpoints = checkpoints
        self._name = name
        self._checkpoint_every = checkpoint_every
        self._check_links = check_links
        self._on_batch = on_batch
        self.state = TailnetState()
        self._subscribers: set[Subscription] = set()
        self._advanced = trio.Event()
        self._last_hash = ""
        self._since_checkpoint = 0
        self.events_folded = 0

    def subscribe(self, notify: Callable[[], None] | None = None) -> Subscription:
        """A new subscription; ``notify`` is called (synchronously) on every change, for
        consumers that wait on several sources at once."""
        sub = Subscription(self, notify)
        self._subscribers.add(sub)
        return sub

    async def wait_for(self, seq: int) -> TailnetState:
        """Return once the state includes event ``seq`` (read-your-writes)."""
        while self.state.seq < seq:
            await self._advanced.wait()
        return self.state

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._checkpoints is not None:
            loaded = await trio.to_thread.run_sync(self._checkpoints.load, self._name, self.log.store)
            if loaded is not None:
                self.state = loaded
                log.info("projection %s: loaded checkpoint at seq %d", self._name, loaded.seq)
        # Every event folded is checked against the one before it (a ChainError stops
        # the runner: a server must not serve from a log that does not verify).
        if self.state.seq:
            found = await trio.to_thread.run_sync(self.log.store.hash_at, self.state.seq)
            self._last_hash = found or ""
        else:
            self._last_hash = GENESIS_HASH
        # Fold the backlog before declaring readiness, so a server never answers from a
        # state older than the log it found on start.
        while True:
            events = await self.log.read(self.state.seq, 5000, prev_hash=self._checked())
            if not events:
                break
            self._apply(events)
        await self._maybe_checkpoint(force=True)
        task_status.started()
        try:
            async for events in self.log.tail(self.state.seq, prev_hash=self._checked()):
                self._apply(events)
                await self._maybe_checkpoint()
        finally:
            # A clean shutdown saves what was folded, so the next start folds nothing.
            with trio.CancelScope(shield=True):
                await self._maybe_checkpoint(force=True)

    def _checked(self) -> str | None:
        return self._last_hash if self._check_links else None

    def _apply(self, events: list[RecordedEvent]) -> None:
        self.state, delta = fold(self.state, events)
        self._last_hash = events[-1].hash
        self.events_folded += len(events)
        self._since_checkpoint += len(events)
        if self._on_batch is not None:
            self._on_batch(events, self.state, delta)
        for sub in list(self._subscribers):
            sub._offer(delta)
        advanced, self._advanced = self._advanced, trio.Event()
        advanced.set()

    async def _maybe_checkpoint(self, *, force: bool = False) -> None:
        if self._checkpoints is None or not self._last_hash or self.state.seq == 0:
            return
        if not force and self._since_checkpoint < self._checkpoint_every:
            return
        if self._since_checkpoint == 0:
            return
        self._since_checkpoint = 0
        try:
            await trio.to_thread.run_sync(self._checkpoints.save, self._name, self.state, self._last_hash)
        except CheckpointError as exc:
            # Only a cache: keep folding, and try again after the next checkpoint_every
            # events (not on every batch: each try encodes the whole state).
            log.warning("projection %s: %s (the next start folds a longer tail)", self._name, exc)
