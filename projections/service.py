"""Running commands: decide against the current state, append, wait to see the result.

:meth:`Tailnet.execute` is the one path by which anything in tailledger changes state.
It decides with a pure command from :mod:`projections.commands`, appends the events
with ``expected_seq`` set to the state it decided against, and on a conflict (another
writer got in first, possibly another replica) waits for the projection to catch up and
decides again. It returns after the projection has folded the new events, so the caller
reads its own writes.

Commands of this process that lose such a race go on one at a time (a lock), so a
burst of concurrent registrations cannot keep conflicting with each other until they
run out of retries; only another replica can still make them decide again.

When the log cannot record a decision (the disk is full, the store failed), the command
fails with :class:`~projections.errors.UnavailableError`, a refusal whose message says
why and that nothing changed: the admin socket, the HTTP API and the control protocol
answer it like any other refusal instead of failing the request or the server.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

import trio

from eventlog import Actor, EventLog, EventLogError, ExpectedSequenceConflict, RecordedEvent

from .commands import Decision
from .errors import CommandError, UnavailableError
from .runner import ProjectionRunner
from .state import TailnetState

__all__ = ["Tailnet"]

T = TypeVar("T")


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Tailnet:
    """The command side of the server: a log, its projection and a clock."""

    def __init__(
        self,
        log: EventLog,
        runner: ProjectionRunner,
        *,
        clock: Callable[[], datetime] = _utcnow,
        max_retries: int = 20,
    ) -> None:
        self.log = log
        self.runner = runner
        self.clock = clock
        self._max_retries = max_retries
        self._serial = trio.Lock()

    @property
    def state(self) -> TailnetState:
        return self.runner.state

    async def execute(
        self, decide: Callable[[TailnetState], Decision[T]], *, actor: Actor
    ) -> tuple[T, tuple[RecordedEvent, ...]]:
        """Decide and append; retry on a concurrent append.

        Raises:
            CommandError: the command was refused (nothing appended), including
                :class:`UnavailableError` when the log could not record it.
        """
        if not self._serial.locked():
            try:
                return await self._attempt(decide, actor)
            except ExpectedSequenceConflict as conflict:
                await self.runner.wait_for(conflict.actual)
        async with self._serial:
            for _ in range(self._max_retries):
                try:
                    return await self._attempt(decide, actor)
                except ExpectedSequenceConflict as conflict:
                    await self.runner.wait_for(conflict.actual)
        raise CommandError("the tailnet is changing too fast; try again")

    async def _attempt(
        self, decide: Callable[[TailnetState], Decision[T]], actor: Actor
    ) -> tuple[T, tuple[RecordedEvent, ...]]:
        """Decide against the current state and append (raises on a conflict)."""
        state = self.runner.state
        decision = decide(state)
        if not decision.events:
            return decision.result, ()
        try:
            recorded = await self.log.append(decision.events, actor=actor, expected_seq=state.seq)
        except ExpectedSequenceConflict:
            raise
        except EventLogError as exc:
            raise UnavailableError(f"{exc}; nothing was changed") from exc
        await self.runner.wait_for(recorded[-1].seq)
        return decision.result, recorded
