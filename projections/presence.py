"""Presence: the fast-changing, compactable facts about connected nodes.

Online/offline, endpoints, DERP home, disco key, capability version and the full
Hostinfo change many times a minute and decide nothing about who may reach what, so
they are *not* events in the immutable log (see the README's design notes). They live
here, last value wins per node, and changes fan out to subscribers (map streams) as
sets of node ids, merged while a subscriber is busy, like the log's deltas.

Everything that *does* decide reachability (keys, tags, routes, approvals, expiry) is
taken from a client's requests and appended to the log by the control handler.

What must survive a restart, ``last_seen`` and the online flag, is written to the
``presence`` side table of the log's database (:mod:`eventlog.sidetables`) by
:func:`projections.presence_io.persist_presence`, the trio adapter of this table: changed nodes every few seconds, online nodes' ``last_seen``
refreshed every minute, everything at shutdown. A restart loads it back (as offline:
no stream survives a restart), so an ephemeral node's inactivity counts from when it
was last seen, not from when the server came back. Endpoints, disco keys and Hostinfo
are resent by every client when it reconnects and are not persisted.

Multiple map streams of one node (reconnects, ``restartMap``) are tracked by a
generation number: only the newest stream's end marks the node offline (Headscale
pitfall 15).

With several replicas (:mod:`projections.presence_share`) the table also holds what
the other replicas' clients report. The nodes whose newest stream is open *here* are
this replica's own (:meth:`PresenceTable.is_local`): only those are written to the
``presence`` side table by this replica, refreshed while online, and marked offline
when it stops; another replica's nodes are that replica's to write.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime

from eventlog.sidetables import PresenceRecord

from .tailcfg import PeerHostinfo

__all__ = ["NodePresence", "PresenceTable", "PresenceWatcher"]


@dataclass(frozen=True, slots=True)
class NodePresence:
    """What a node last told us about its connection."""

    online: bool = False
    last_seen: datetime | None = None
    endpoints: tuple[str, ...] = ()
    disco_key: str | None = None  # wire form "discokey:<hex>"
    home_derp: int = 0
    cap: int = 0
    hostinfo: PeerHostinfo | None = None
    generation: int = 0  # of the newest map stream


@dataclass(eq=False)
class PresenceWatcher:
    """A subscriber: node ids whose presence changed since it last looked."""

    table: PresenceTable
    notify: Callable[[], None] | None = None
    pending: set[int] = field(default_factory=set)

    def take(self) -> set[int]:
        out, self.pending = self.pending, set()
        return out

    def close(self) -> None:
        self.table._watchers.discard(self)


class PresenceTable:
    """In-memory presence for this server (one replica's view)."""

    def __init__(self) -> None:
        self._nodes: dict[int, NodePresence] = {}
        self._watchers: set[PresenceWatcher] = set()
        #: Nodes whose online flag or last_seen changed since persist_presence looked,
        #: and nodes forgotten since (their rows are deleted).
        self._dirty: set[int] = set()
        self._forgotten: set[int] = set()
        #: Nodes whose newest map stream is open on this server.
        self._local: set[int] = set()
        #: Grows with every change of any node's presence (what a reader that keeps
        #: something derived from it compares, e.g. the admin API's device lists).
        self.version = 0

    def get(self, node_id: int) -> NodePresence | None:
        return self._nodes.get(node_id)

    def is_local(self, node_id: int) -> bool:
        """Whether the node's newest map stream is open on this server."""
        return node_id in self._local

    def watch(self, notify: Callable[[], None] | None = None) -> PresenceWatcher:
        w = PresenceWatcher(self, notify)
        self._watchers.add(w)
        return w

    def _changed(self, node_id: int) -> None:
        for w in list(self._watchers):
            w.pending.add(node_id)
            if w.notify is not None:
                w.notify()

    def update(self, node_id: int, /, **changes: object) -> NodePresence:
        """Set fields of a node's presence; notify watchers if anything changed."""
        old = self._nodes.get(node_id, NodePresence())
        new = replace(old, **changes)  # type: ignore[arg-type]
        if new != old:
            self._nodes[node_id] = new
            self.version += 1
            self._changed(node_id)
        return new

    def connect(self, node_id: int, now: datetime) -> int:
        """A map stream opened; returns its generation."""
        old = self._nodes.get(node_id, NodePresence())
        gen = old.generation + 1
        self._nodes[node_id] = replace(old, online=True, last_seen=now, generation=gen)
        self.version += 1
        self._dirty.add(node_id)
        self._local.add(node_id)
        if not old.online:
            self._changed(node_id)
        return gen

    def disconnect(self, node_id: int, generation: int, now: datetime) -> bool:
        """A map stream ended; marks the node offline unless a newer stream exists."""
        old = self._nodes.get(node_id)
        if old is None or old.generation != generation:
            return False
        self._nodes[node_id] = replace(old, online=False, last_seen=now)
        self.version += 1
        self._dirty.add(node_id)
        self._local.discard(node_id)
        self._changed(node_id)
        return True

    def forget(self, node_id: int) -> None:
        self._nodes.pop(node_id, None)
        self.version += 1
        self._dirty.discard(node_id)
        self._local.discard(node_id)
        self._forgotten.add(node_id)

    # -- persistence (see persist_presence) ------------------------------------------------

    def restore(self, records: Iterable[PresenceRecord], known: Container[int]) -> None:
        """Load persisted presence: each known node offline, last seen as recorded
        (a node already present here is left alone); rows of nodes that no longer
        exist are deleted at the next save."""
        for r in records:
            if r.node_id not in known:
                self._forgotten.add(r.node_id)
            elif r.node_id not in self._nodes:
                self._nodes[r.node_id] = NodePresence(online=False, last_seen=r.last_seen)
                self.version += 1

    def take_changes(self, now: datetime, *, refresh_online: bool) -> tuple[list[PresenceRecord], list[int]]:
        """What to write: the changed nodes (and, with ``refresh_online``, every online
        node of this server, last seen ``now``), and the forgotten ones to delete."""
        ids = set(self._dirty)
        if refresh_online:
            ids.update(n for n in self._local if self._nodes[n].online)
        self._dirty.clear()
        forgotten, self._forgotten = sorted(self._forgotten), set()
        records = []
        for node_id in sorted(ids):
            p = self._nodes.get(node_id)
            if p is None or p.last_seen is None:
                continue
            records.append(PresenceRecord(node_id, now if p.online else p.last_seen, p.online))
        return records, forgotten

    def requeue(self, records: Iterable[PresenceRecord], forgotten: Iterable[int]) -> None:
        """Changes taken by :meth:`take_changes` whose write failed: take them again."""
        self._dirty.update(r.node_id for r in records if r.node_id in self._nodes)
        self._forgotten.update(forgotten)

    def final_records(self, now: datetime) -> list[PresenceRecord]:
        """This server's nodes as they are when it stops: online ones go offline ``now``
        (another replica's nodes are left as that replica wrote them)."""
        return [
            PresenceRecord(node_id, now if p.online else p.last_seen, False)
            for node_id, p in sorted(self._nodes.items())
            if p.last_seen is not None and node_id in self._local
        ]

    def items(self) -> list[tuple[int, NodePresence]]:
        return list(self._nodes.items())
