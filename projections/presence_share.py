"""Live presence shared by the replicas of one PostgreSQL log.

Each replica's :class:`~projections.presence.PresenceTable` holds what its own clients
report (online, endpoints, disco key, DERP home, Hostinfo, capability version). So that
a client on one replica learns them for a peer on another, :func:`share_presence`:

* publishes the nodes whose shared fields changed in this replica's table, coalesced
  (one write and one notification per ``coalesce`` seconds at most), into the
  ``presence_live`` table;
* applies what the other replicas published, woken by their notification (and polling
  every ``poll`` seconds as a fallback), to this replica's table, whose watchers then
  fan the change out to this replica's clients as if it were local.

A value applied from another replica is remembered as exchanged, so it is not sent back
(no echo between replicas). Presence is not an event: nothing here touches the log.

A replica that dies (``kill -9``, a lost machine, a cut from the database) says nothing,
so each replica holds a *liveness lock* on its listener's database session while it
runs; every ``poll`` seconds each replica looks for nodes published online by a replica
whose lock is gone and marks them offline for everyone (a compare-and-set on the row's
version, so a node that reconnected elsewhere meanwhile is left alone, and several
replicas sweeping at once change a row once). If this replica's own nodes are marked
offline while they are still connected here (its session was cut and came back), it
publishes them again rather than believing it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

import msgspec
import trio

from eventlog import EventLogError, from_micros, to_micros

from .presence import NodePresence, PresenceTable, PresenceWatcher
from .tailcfg import PeerHostinfo

__all__ = ["SharedPresenceStore", "share_presence"]

log = logging.getLogger("tailledger.presence")


class SharedPresenceStore(Protocol):
    def publish_presence(self, replica: str, states: list[tuple[int, bool, bytes]]) -> None: ...
    def presence_since(self, replica: str, version: int) -> tuple[list[tuple[int, bytes]], int]: ...
    def wait_presence(self, timeout: float) -> bool: ...
    def hold_liveness(self, replica: str) -> None: ...
    def stale_presence(self, replica: str) -> list[tuple[int, str, int, bytes]]: ...
    def expire_presence(self, states: list[tuple[int, int, bytes]]) -> int: ...


class _Shared(msgspec.Struct, frozen=True, array_like=True):
    online: bool
    last_seen_us: int | None
    endpoints: tuple[str, ...]
    disco_key: str | None
    home_derp: int
    cap: int
    hostinfo: PeerHostinfo | None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Shared)


def _shared(p: NodePresence) -> _Shared:
    return _Shared(
        online=p.online, last_seen_us=to_micros(p.last_seen) if p.last_seen else None,
        endpoints=p.endpoints, disco_key=p.disco_key, home_derp=p.home_derp, cap=p.cap,
        hostinfo=p.hostinfo,
    )


def _key(s: _Shared) -> tuple[object, ...]:
    """What counts as a change worth sending (not last_seen alone)."""
    return (s.online, s.endpoints, s.disco_key, s.home_derp, s.cap, s.hostinfo)


async def share_presence(
    table: PresenceTable,
    store: SharedPresenceStore,
    replica: str,
    *,
    coalesce: float = 0.05,
    poll: float = 1.0,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Exchange live presence with the other replicas until cancelled."""
    exchanged: dict[int, tuple[object, ...]] = {}
    wake = trio.Event()

    def changed() -> None:
        wake.set()

    watcher = table.watch(changed)
    out_limiter, in_limiter, listen_limiter = (trio.CapacityLimiter(1) for _ in range(3))
    version = 0
    try:
        await trio.to_thread.run_sync(store.hold_liveness, replica, limiter=listen_limiter)
    except EventLogError as exc:
        log.warning("presence: cannot announce this replica yet (retried on reconnection): %s", exc)
    # Start from what the others published already (a replica joining a running cluster).
    try:
        states, version = await trio.to_thread.run_sync(store.presence_since, replica, 0, limiter=in_limiter)
        _apply(table, states, exchanged, watcher)
    except EventLogError as exc:
        log.warning("presence: cannot read the shared presence yet: %s", exc)

    async def publish() -> None:
        nonlocal wake
        while True:
            await wake.wait()
            await trio.sleep(coalesce)  # coalesce a burst into one write
            wake = trio.Event()
            batch: list[tuple[int, bool, bytes]] = []
            for node_id in sorted(watcher.take()):
                p = table.get(node_id)
                if p is None:
                    continue
                shared = _shared(p)
                if exchanged.get(node_id) == _key(shared):
                    continue
                exchanged[node_id] = _key(shared)
                batch.append((node_id, shared.online, _encoder.encode(shared)))
            if batch:
                try:
                    await trio.to_thread.run_sync(store.publish_presence, replica, batch, limiter=out_limiter)
                except EventLogError as exc:
                    log.warning("presence: publishing %d node(s) failed (will resend): %s", len(batch), exc)
                    for node_id, _, _ in batch:
                        exchanged.pop(node_id, None)
                        watcher.pending.add(node_id)
                    wake.set()
                    await trio.sleep(1.0)

    async def receive() -> None:
        nonlocal version
        while True:
            await trio.to_thread.run_sync(
                store.wait_presence, poll, limiter=listen_limiter, abandon_on_cancel=True
            )
            try:
                states, version = await trio.to_thread.run_sync(
                    store.presence_since, replica, version, limiter=in_limiter
                )
            except EventLogError:
                await trio.sleep(poll)
                continue
            _apply(table, states, exchanged, watcher)

    async def sweep() -> None:
        while True:
            await trio.sleep(poll)
            try:
                stale = await trio.to_thread.run_sync(store.stale_presence, replica, limiter=in_limiter)
                offline = _offline(stale, to_micros(clock()))
                if offline:
                    n = await trio.to_thread.run_sync(store.expire_presence, offline, limiter=out_limiter)
                    if n:
                        gone = sorted({r for _, r, _, _ in stale})
                        log.info("presence: %d node(s) of gone replica(s) %s marked offline", n, gone)
            except EventLogError as exc:
                log.warning("presence: looking for gone replicas failed: %s", exc)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish)
            nursery.start_soon(receive)
            nursery.start_soon(sweep)
            task_status.started()
    finally:
        watcher.close()


def _offline(stale: list[tuple[int, str, int, bytes]], now_us: int) -> list[tuple[int, int, bytes]]:
    """The offline states replacing the rows of gone replicas, last seen now."""
    out = []
    for node_id, _, version, raw in stale:
        try:
            s = _decoder.decode(raw)
        except msgspec.DecodeError:
            continue
        gone = msgspec.structs.replace(s, online=False, last_seen_us=now_us)
        out.append((node_id, version, _encoder.encode(gone)))
    return out


def _apply(
    table: PresenceTable,
    states: list[tuple[int, bytes]],
    exchanged: dict[int, tuple[object, ...]],
    watcher: PresenceWatcher,
) -> None:
    for node_id, raw in states:
        try:
            s = _decoder.decode(raw)
        except msgspec.DecodeError:
            log.warning("presence: an unreadable shared state for node %d was skipped", node_id)
            continue
        if not s.online and table.is_local(node_id) and (p := table.get(node_id)) is not None and p.online:
            # Marked offline by a replica that took us for gone, yet connected here: say so again.
            exchanged.pop(node_id, None)
            watcher.pending.add(node_id)
            if watcher.notify is not None:
                watcher.notify()
            continue
        exchanged[node_id] = _key(s)
        table.update(
            node_id, online=s.online, endpoints=s.endpoints, disco_key=s.disco_key,
            home_derp=s.home_derp, cap=s.cap, hostinfo=s.hostinfo,
            last_seen=from_micros(s.last_seen_us) if s.last_seen_us is not None else None,
        )
