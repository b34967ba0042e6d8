"""Presence: the fast-changing, compactable facts about connected nodes.

Online/offline, endpoints, DERP home, disco key, capability version and the full
Hostinfo change many times a minute and decide nothing about who may reach what, so
they are *not* events in the immutable log (see the README's design notes). They live
here, last value wins per node, and changes fan out to subscribers (map streams) as
sets of node ids, merged while a subscriber is busy, like the log's deltas.

Everything that *does* decide reachability (keys, tags, routes, approvals, expiry) is
taken from a client's requests and appended to the log by the control handler.

Multiple map streams of one node (reconnects, ``restartMap``) are tracked by a
generation number: only the newest stream's end marks the node offline (Headscale
pitfall 15).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime

from .tailcfg import Hostinfo

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
    hostinfo: Hostinfo | None = None
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

    def get(self, node_id: int) -> NodePresence | None:
        return self._nodes.get(node_id)

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
            self._changed(node_id)
        return new

    def connect(self, node_id: int, now: datetime) -> int:
        """A map stream opened; returns its generation."""
        old = self._nodes.get(node_id, NodePresence())
        gen = old.generation + 1
        self._nodes[node_id] = replace(old, online=True, last_seen=now, generation=gen)
        if not old.online:
            self._changed(node_id)
        return gen

    def disconnect(self, node_id: int, generation: int, now: datetime) -> bool:
        """A map stream ended; marks the node offline unless a newer stream exists."""
        old = self._nodes.get(node_id)
        if old is None or old.generation != generation:
            return False
        self._nodes[node_id] = replace(old, online=False, last_seen=now)
        self._changed(node_id)
        return True

    def forget(self, node_id: int) -> None:
        self._nodes.pop(node_id, None)

    def items(self) -> list[tuple[int, NodePresence]]:
        return list(self._nodes.items())
