"""The presence table's trio adapter: keeping ``last_seen`` and the online flag on disk.

:class:`projections.presence.PresenceTable` (sans-I/O) collects what changed;
:func:`persist_presence` runs beside the server, loads the table from the ``presence``
side table of the log's database (:mod:`eventlog.sidetables`) at start, and writes the
changes back on a timer and at shutdown. See :mod:`projections.presence` for what is
persisted and why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container
from datetime import datetime

import trio

from eventlog import EventLogError
from eventlog.sidetables import SideTables

from .presence import PresenceTable

__all__ = ["persist_presence"]

log = logging.getLogger(__name__)


async def persist_presence(
    table: PresenceTable,
    side: SideTables,
    clock: Callable[[], datetime],
    known: Container[int],
    *,
    interval: float = 5.0,
    refresh_every: float = 60.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep ``table``'s ``last_seen`` and online flags in the ``presence`` side table.

    Loads the table first (``known``: the node ids that exist; other rows are dropped)
    and reports readiness, then writes the changes every ``interval`` seconds and every
    online node every ``refresh_every`` seconds (so that after a crash an online node
    counts as seen at most that long before). On cancellation (shutdown) it writes
    every node as offline now, shielded.

    A failing write is logged and retried with the next changes: presence is not worth
    stopping the server for.
    """
    limiter = trio.CapacityLimiter(1)
    records = await trio.to_thread.run_sync(side.load_presence, limiter=limiter)
    table.restore(records, known)
    log.info("presence: %d node(s) restored from the presence table", len(records))
    task_status.started()
    next_refresh = trio.current_time() + refresh_every
    try:
        while True:
            await trio.sleep(interval)
            refresh = trio.current_time() >= next_refresh
            if refresh:
                next_refresh = trio.current_time() + refresh_every
            save, forget = table.take_changes(clock(), refresh_online=refresh)
            if not save and not forget:
                continue
            try:
                await trio.to_thread.run_sync(side.save_presence, save, forget, limiter=limiter)
            except EventLogError as exc:
                log.warning("presence: saving %d row(s) failed: %s", len(save), exc)
                table.requeue(save, forget)
    finally:
        with trio.CancelScope(shield=True):
            now = clock()
            changed, forget = table.take_changes(now, refresh_online=False)
            # The changes not yet written, then this server's nodes going offline now.
            final = list(({r.node_id: r for r in changed} | {r.node_id: r for r in table.final_records(now)}).values())
            try:
                await trio.to_thread.run_sync(side.save_presence, final, forget, limiter=limiter)
            except EventLogError as exc:
                log.warning("presence: saving at shutdown failed: %s", exc)
