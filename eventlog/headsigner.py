"""The server's signing task: sign the head every N events, every T, at shutdown, on demand.

Each signature is stored beside the log (:meth:`EventStore.add_signed_checkpoint`) and
the newest is also written as an anchor line beside the signing key, outside the data
directory (see :mod:`eventlog.signing`). A head that was already signed is not signed
again, so an idle server adds nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import trio

from .errors import EventLogError
from .log import EventLog
from .signing import SignedCheckpoint, Signer, write_anchor

__all__ = ["HeadSigner"]

log = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class HeadSigner:
    """Signs the head of ``log`` with ``signer``.

    Args:
        every_events: sign once the head is this many events past the last signature.
        every_seconds: sign at least this often while new events arrive.
        anchor_file: where the newest anchor line is written, beside the signing key
            (:func:`~eventlog.signing.anchor_path`; ``None``: nowhere, for tests).
    """

    def __init__(
        self,
        log: EventLog,
        signer: Signer,
        *,
        every_events: int = 1000,
        every_seconds: float = 600.0,
        anchor_file: Path | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.log = log
        self.signer = signer
        self._every_events = every_events
        self._every_seconds = every_seconds
        self._anchor_file = anchor_file
        self._clock = clock
        self._lock = trio.Lock()
        self.last: SignedCheckpoint | None = None
        self.signed = 0  # signatures made by this process
        self.failures = 0  # signatures that could not be stored

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sign on the schedule until cancelled, then sign the head once more."""
        self.last = await trio.to_thread.run_sync(self.log.store.last_signed_checkpoint)
        task_status.started()
        try:
            while True:
                base = self.last.seq if self.last is not None else 0
                with trio.move_on_after(self._every_seconds):
                    await self.log.wait_for_new(base + self._every_events - 1)
                try:
                    await self.sign_head()
                except EventLogError as exc:  # e.g. a full disk: try again later
                    self.failures += 1
                    log.warning("could not sign the log head (will retry): %s", exc)
                    await trio.sleep(min(self._every_seconds, 30.0))
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self.sign_head()
                except EventLogError as exc:  # the store may already be failing
                    log.warning("could not sign the log head at shutdown: %s", exc)

    async def sign_head(self) -> SignedCheckpoint | None:
        """Sign the current head unless it is already signed; return the newest signature."""
        async with self._lock:
            head = await self.log.head()
            if head.seq == 0:
                return self.last
            if self.last is not None and self.last.seq == head.seq and self.last.hash == head.hash:
                return self.last
            n = self.last.n + 1 if self.last is not None else 1
            prev = self.last.digest() if self.last is not None else ""
            checkpoint = self.signer.sign(n=n, seq=head.seq, hash=head.hash, at=self._clock(), prev=prev)
            await trio.to_thread.run_sync(self.log.store.add_signed_checkpoint, checkpoint)
            if self._anchor_file is not None:
                try:
                    await trio.to_thread.run_sync(write_anchor, self._anchor_file, checkpoint)
                except OSError as exc:
                    log.warning("cannot write the anchor %s: %s", self._anchor_file, exc)
            self.last = checkpoint
            self.signed += 1
            log.debug("signed the log head: seq %d (checkpoint %d)", head.seq, n)
            return checkpoint
