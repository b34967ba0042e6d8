"""Peer sets and their change journal: what one visibility class is shown (pure).

Every visibility class (see :mod:`.hub`) has one :class:`PeerSet`: an immutable map
from node id to the shared :class:`Peer` (its wire node) that members are shown,
which includes the members themselves; a stream leaves its own node out.

**Sharing.** A :class:`Peer` is made once per node and viewer-dependent view
(:class:`PeerCache`) and shared by every class and version that shows it; a stream
that did not see a peer change is handed the very same object, so "did it change"
is an identity test.

Classes that see the same peers share one :class:`PeerSet` (the hub makes one per
content in each advance): a peer set is a version of what some classes see, not of
one class.

**The journal.** A new version records its parent's journal entry (:class:`_Link`)
and the ids that changed, so bringing a stream from any recent version to the current
one costs the size of the change (:func:`diff_peer_sets`); a stream more than
:data:`JOURNAL_DEPTH` versions behind gets an entry-by-entry comparison. Links hold
ids, not peers, so a superseded version (and the peers only it showed) is freed once
no stream is on it. The diff from a version to its successor is computed once and
kept by the older version, with its message (:class:`MapMessage`): one object for
every member whose own node is not in it.

**No bytes here.** What a stream is sent is decided here as values (wire nodes,
diffs, ``MapResponse`` structs); the transport (``protocol.mapwire``) turns them into
bytes. It keys its caches by the identities this module keeps stable: a
:class:`Peer` (its JSON, encoded once for every class that shows it), a
:class:`MapMessage` (encoded and framed once for every stream given it) and a peer
set's :class:`Lineage` (the full-map pieces a version takes over from the one before).

Invariant: a :class:`PeerSet`'s ``peers`` and ``users`` never change after
construction; its cache (the diff to its successor) is derived from them alone.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import immutables
import msgspec

from ..netmap import NetmapSettings, wire_node
from ..policy import PeerView
from ..presence import NodePresence
from ..state import Node
from ..tailcfg import MapResponse, PeerChange, UserProfile
from ..tailcfg import Node as WireNode

__all__ = [
    "JOURNAL_DEPTH",
    "Lineage",
    "Link",
    "MapMessage",
    "Peer",
    "PeerCache",
    "PeerDiff",
    "PeerSet",
    "diff_peer_sets",
    "update_response",
]

#: How many versions back a peer set remembers its parents; a stream further behind
#: gets a full comparison (still computed once per pair of versions, not per stream).
JOURNAL_DEPTH: Final = 1024


class Peer:
    """One peer as a class of viewers sees it: the wire node, shared by every peer
    set and stream that shows this version.

    The wire node is kept (the transport keeps its JSON beside it, weakly): diffs
    compare and send wire nodes, and decoding them again from the JSON when needed
    churned the heap during connect storms (pymalloc arenas left half empty cost more
    than the wire nodes saved).
    """

    __slots__ = ("__weakref__", "node", "presence", "view", "wire")

    def __init__(self, node: Node, presence: NodePresence | None, view: PeerView, wire: WireNode) -> None:
        self.node = node
        self.presence = presence
        self.view = view
        self.wire = wire


class PeerCache:
    """Shared :class:`Peer` objects, keyed by node and the viewer-dependent view.

    An entry is reused while the node record and its presence are the same objects.
    :meth:`rebuilt` starts a new generation that keeps only entries used since, so
    views that no longer exist do not pile up.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[object, ...], Peer] = {}
        self._previous: dict[tuple[object, ...], Peer] = {}

    @staticmethod
    def _key(view: PeerView) -> tuple[object, ...]:
        caps = tuple((k, bytes(v) if v is not None else None) for k, v in view.cap_map.items())
        return (view.node_id, view.allowed_ips, view.primary_routes, caps)

    def get(self, node: Node, presence: NodePresence | None, view: PeerView, settings: NetmapSettings) -> Peer:
        key = self._key(view)
        hit = self._entries.get(key) or self._previous.get(key)
        if hit is not None and hit.node is node and hit.presence is presence:
            self._entries[key] = hit
            return hit
        wire = wire_node(
            node, presence, settings, allowed_ips=view.allowed_ips, primary_routes=view.primary_routes,
            cap_map=view.cap_map, is_self=False,
        )
        peer = Peer(node, presence, view, wire)
        self._entries[key] = peer
        return peer

    def rebuilt(self) -> None:
        """Begin a rebuild: entries not used by it are dropped at the next one."""
        self._previous, self._entries = self._entries, {}


@dataclass(frozen=True, slots=True)
class PeerDiff:
    """What changed between two versions of a peer set, in wire form."""

    changed: tuple[WireNode, ...]
    removed: tuple[int, ...]
    patches: tuple[PeerChange, ...]
    profiles: tuple[UserProfile, ...]
    #: Every node id the diff mentions (a stream whose own id is here gets its own copy).
    ids: frozenset[int]

    def without(self, node_id: int) -> PeerDiff:
        return PeerDiff(
            tuple(n for n in self.changed if n.id != node_id),
            tuple(i for i in self.removed if i != node_id),
            tuple(p for p in self.patches if p.node_id != node_id),
            self.profiles,
            self.ids - {node_id},
        )

    def is_empty(self) -> bool:
        return not (self.changed or self.removed or self.patches)


class MapMessage:
    """One update message as a value, possibly shared by many streams.

    Streams handed the same object are sent the same bytes: the transport encodes and
    frames it once, keyed by this object (so it must not be copied on the way).
    """

    __slots__ = ("__weakref__", "response")

    def __init__(self, response: MapResponse) -> None:
        self.response = response


class Lineage:
    """The identity the successive versions of a peer set share (a new version
    inherits its parent's, unless another class already went on from that parent:
    then it starts its own): caches that carry over from a version to the next, like
    the transport's full-map pieces, are keyed by it."""

    __slots__ = ("__weakref__",)


class _Link:
    """One version's entry in its class's change journal: the ids that changed from
    the version before. Links hold no peers, so a chain of them is cheap and keeps no
    superseded :class:`Peer` alive; a peer set is freed once no stream is on it."""

    __slots__ = ("changed", "parent")

    def __init__(self, changed: Iterable[int], parent: _Link | None) -> None:
        # Most links name one node (a registration, a presence change): that id alone,
        # with no container (a one-id tuple is 64 bytes more, a one-id frozenset four
        # times that; the journal keeps thousands, about four per node). More ids are a
        # tuple.
        ids = tuple(changed)
        self.changed: int | tuple[int, ...] = ids[0] if len(ids) == 1 else ids
        self.parent = parent


#: A version's journal entry (:attr:`PeerSet.link`), for :meth:`PeerSet.changed_since`.
Link = _Link


class PeerSet:
    """What the members of one visibility class (or of several that see the same
    peers) are shown about their peers.

    Attributes:
        peers: node id -> shared peer (members included; a stream skips itself).
        users: user id -> profile, for every user shown.
        link: this version's journal entry (ids that changed from the version before,
            and that version's entry while it is within :data:`JOURNAL_DEPTH`).
        depth: how many versions this class went through before this one.
        lineage: shared by the versions that descend from one another, until classes
            that shared a version part (see :class:`Lineage`).
    """

    __slots__ = ("__weakref__", "_diff_to", "depth", "digest", "lineage", "link", "peers", "users")

    def __init__(
        self,
        peers: immutables.Map[int, Peer],
        users: immutables.Map[int, UserProfile],
        parent: PeerSet | None = None,
        changed: frozenset[int] = frozenset(),
        *,
        fork: bool = False,
    ) -> None:
        """``fork``: this version is not the first child of ``parent`` (classes that
        shared ``parent`` went different ways): it starts a lineage of its own.
        ``changed`` must hold every id whose entry differs from ``parent``'s."""
        self.peers = peers
        self.users = users
        #: :func:`content_digest` of ``peers`` (from the parent's, in the size of the change)
        self.digest: int = content_digest(peers) if parent is None else changed_digest(parent, peers, changed)
        self.link: _Link = _Link(changed, parent.link if parent is not None else None)
        self.depth: int = 0 if parent is None else parent.depth + 1
        self.lineage: Lineage = Lineage() if parent is None or fork else parent.lineage
        # The diffs from this version to the ones its streams moved on to (usually
        # one; one per class when classes that shared it went different ways), with
        # those versions held weakly: they live as long as a stream is still on this
        # version, so a connect storm's many diffs go with the versions they start from.
        self._diff_to: tuple[tuple[weakref.ref[PeerSet], PeerDiff, MapMessage | None], ...] = ()
        if parent is not None and self.depth % JOURNAL_DEPTH == 0:
            # Forget entries older than the journal keeps.
            old = self.link
            for _ in range(JOURNAL_DEPTH):
                if old.parent is None:
                    break
                old = old.parent
            old.parent = None

    def changed_since(self, old: Link) -> set[int] | None:
        """The ids whose entry may differ between the version whose :attr:`link` is
        ``old`` and this one, read from the change journal (cost: the size of the
        change); ``None`` when that version is not a recent ancestor (then only an
        entry-by-entry comparison tells). Holding a link keeps no peer alive."""
        ids: set[int] = set()
        cur: _Link | None = self.link
        while cur is not None and cur is not old:
            changed = cur.changed
            if isinstance(changed, int):
                ids.add(changed)
            else:
                ids.update(changed)
            cur = cur.parent
        return ids if cur is not None else None

    def diff(self, old: PeerSet) -> PeerDiff:
        """The diff from ``old`` to this version (cached per ``old``)."""
        return self.diff_message(old, None)[0]

    def diff_message(self, old: PeerSet, now: datetime | None) -> tuple[PeerDiff, MapMessage | None]:
        """The diff and its message (when ``now`` is given), built once for every
        stream moving from ``old`` (and kept by ``old``)."""
        entries = old._diff_to
        at = next((i for i, entry in enumerate(entries) if entry[0]() is self), -1)
        if at < 0:
            # Forget the successors no stream is on any more.
            entries = (*(e for e in entries if e[0]() is not None), (weakref.ref(self), diff_peer_sets(old, self), None))
            at = len(entries) - 1
            old._diff_to = entries
        ref, diff, msg = entries[at]
        if msg is None and now is not None and not diff.is_empty():
            msg = MapMessage(update_response(now, {}, diff))
            old._diff_to = (*entries[:at], (ref, diff, msg), *entries[at + 1 :])
        return diff, msg


_DIGEST_MASK: Final = (1 << 64) - 1


def content_digest(peers: immutables.Map[int, Peer] | dict[int, Peer]) -> int:
    """A digest of which peer objects a peer set holds under which ids (a sum, so a
    version's follows from its parent's by the entries that changed). Equal contents
    have equal digests; equal digests are checked entry by entry before sharing."""
    return sum(hash((nid, id(peer))) for nid, peer in peers.items()) & _DIGEST_MASK


def changed_digest(
    old: PeerSet, peers: immutables.Map[int, Peer] | immutables.MapMutation[int, Peer], changed: Iterable[int]
) -> int:
    """The :func:`content_digest` of ``peers``, which differ from ``old.peers`` at most
    in ``changed``."""
    digest = old.digest
    for nid in changed:
        before, after = old.peers.get(nid), peers.get(nid)
        if before is not None:
            digest -= hash((nid, id(before)))
        if after is not None:
            digest += hash((nid, id(after)))
    return digest & _DIGEST_MASK


def diff_peer_sets(old: PeerSet, new: PeerSet) -> PeerDiff:
    """Compare two peer sets: through the change journal when ``old`` is a recent
    ancestor of ``new`` (cost: the ids changed in between), else entry by entry."""
    journal = new.changed_since(old.link)
    ids = journal if journal is not None else set(old.peers.keys()) | set(new.peers.keys())
    changed: list[WireNode] = []
    removed: list[int] = []
    patches: list[PeerChange] = []
    profiles: dict[int, UserProfile] = {}
    for nid in sorted(ids):
        before, after = old.peers.get(nid), new.peers.get(nid)
        if before is after:
            continue
        if after is None:
            removed.append(nid)
            continue
        new_wire = after.wire
        old_wire = before.wire if before is not None else None
        if old_wire is not None and old_wire == new_wire:
            continue
        if old_wire is None or _structural(old_wire) != _structural(new_wire) or _clears(old_wire, new_wire):
            changed.append(new_wire)
            uid = new_wire.user
            profile = new.users.get(uid)
            if profile is not None and old.users.get(uid) != profile:
                profiles[uid] = profile
        else:
            patches.append(_patch(old_wire, new_wire))
    if journal is None or old.users is not new.users:
        for uid, profile in new.users.items():
            if old.users.get(uid) != profile:
                profiles[uid] = profile
    return PeerDiff(
        tuple(changed), tuple(removed), tuple(patches),
        tuple(profiles[k] for k in sorted(profiles)),
        frozenset(n.id for n in changed) | frozenset(removed) | frozenset(p.node_id for p in patches),
    )


def _structural(node: WireNode) -> WireNode:
    return msgspec.structs.replace(
        node, endpoints=None, home_derp=0, disco_key=None, online=None, last_seen=None, cap=0
    )


def _clears(old: WireNode, new: WireNode) -> bool:
    """Whether a presence field went back to empty, which a patch cannot say (an
    absent patch field means "unchanged"): such a peer is sent whole."""
    return bool(
        (old.endpoints and not new.endpoints)
        or (old.disco_key and not new.disco_key)
        or (old.home_derp and not new.home_derp)
        or (old.last_seen is not None and new.last_seen is None)
        or (old.cap and not new.cap)
        or (old.online is not None and new.online is None)
    )


def _patch(old: WireNode, new: WireNode) -> PeerChange:
    return PeerChange(
        node_id=new.id,
        derp_region=new.home_derp if new.home_derp != old.home_derp else 0,
        endpoints=new.endpoints if new.endpoints != old.endpoints else None,
        disco_key=new.disco_key if new.disco_key != old.disco_key else None,
        online=new.online if new.online != old.online else None,
        last_seen=new.last_seen if new.last_seen != old.last_seen else None,
        cap=new.cap if new.cap != old.cap else 0,
    )


def update_response(now: datetime, parts: dict[str, object], diff: PeerDiff | None) -> MapResponse:
    """An update carrying ``parts`` (``MapResponse`` fields) and the peer changes of ``diff``."""
    msg = dict(parts)
    if diff is not None:
        if diff.changed:
            msg["peers_changed"] = list(diff.changed)
        if diff.removed:
            msg["peers_removed"] = list(diff.removed)
        if diff.patches:
            msg["peers_changed_patch"] = list(diff.patches)
        if diff.profiles:
            msg["user_profiles"] = list(diff.profiles)
    return MapResponse(control_time=now, **msg)  # type: ignore[arg-type]
