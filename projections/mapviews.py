"""Netmaps for many map streams at once: shared peer views per visibility class (pure).

A tailnet of *n* nodes whose streams each keep "what I sent about every peer" holds
n² peer records, and a change that every node must hear about (a node joining an
allow-all tailnet, a policy change) costs n² comparisons. Most nodes, though, see the
world identically: two laptops of the same user, or every node of an allow-all
tailnet, differ only in which of them is "self". This module exploits that.

**Visibility classes.** :func:`class_key` gives every node a key made of what the
policy can tell it apart by: its identity keys (user, the groups and domains that
follow from the user, member/tagged, tags), which address aliases of the policy
contain its addresses, and its ``nodeAttrs``. Nodes with equal keys are interchangeable
to the policy, so they see every *other* node the same way (same visibility, same
AllowedIPs). A subnet router or exit node (its routes change what it sees) and every
node under a policy with ``via`` grants get a class of their own.

**Peer sets.** Each class has one :class:`PeerSet`: an immutable map from node id to
the shared :class:`Peer` (wire node and its JSON) that members are shown, which
includes the members themselves; a stream leaves its own node out. A new version
records its parent and the ids that changed, so bringing a stream from any recent
version to the current one costs the size of the change (:func:`diff_peer_sets`), and
that diff, encoded once, is the same bytes for every member whose own node is not in
it.

**The hub.** :class:`MapHub` folds (state, presence) changes into new peer sets:

* when only nodes changed (joins, leaves, renames, tags, keys, presence, expiry) and
  no subnet router was involved, a node's change can only change how others see
  *that* node (the policy's sets gain or lose only its addresses), so each class
  re-evaluates just the changed nodes through one representative member:
  cost is classes x changed nodes;
* a policy change, a user change or a change involving routes (primary routes may
  move) rebuilds every class from the compiled policy (classes x peers), reusing the
  shared peer objects, so streams whose view did not change get nothing.

A :class:`StreamCursor` is all a stream keeps: the peer set it last sent, digests of
the self node and packet filter it last sent, the SSH policy's JSON (shared) and the
hub sequence number it has seen. Per-node parts follow what a change can affect:

* the self node is recomputed only for nodes that changed (or after a rebuild);
* the packet filter only for nodes whose filter the change may touch
  (:meth:`~projections.policy.CompiledPolicy.filters_changed_since`: destinations
  of rules that differ, the changed nodes and their owners' devices);
* the SSH policy comes from :class:`SSHCache`: one JSON per SSH key (nodes that are
  the destinations of the same rules share it), rebuilt only when a token it was
  built from changed, so a join re-encodes the SSH policy of the destinations of the
  rules whose sources gained its addresses, once per key.

Nothing here reads a clock or does I/O: time and state are arguments.
"""

from __future__ import annotations

import bisect
import hashlib
import weakref
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

import immutables
import msgspec

from .delta import Delta
from .netmap import (
    DENY_ALL,
    TAGGED_DEVICES_USER_ID,
    NetmapSettings,
    PresenceOf,
    expired_map,
    expired_self,
    profiles_for,
    user_id_shown,
    wire_node,
)
from .policy import CompiledPolicy, PeerView
from .policy.document import AliasKind
from .policy.resolve import node_keys
from .policy.ssh import SSHKey, SSHTable
from .policystate import PolicyCompiler
from .presence import NodePresence
from .state import Node, TailnetState
from .tailcfg import Debug, DNSConfig, MapResponse, PeerChange, UserProfile
from .tailcfg import Node as WireNode

__all__ = [
    "MapHub",
    "MapMessage",
    "Peer",
    "PeerSet",
    "StreamCursor",
    "class_key",
    "diff_peer_sets",
    "join_pieces",
]

_encoder: Final = msgspec.json.Encoder()
_NO_SSH: Final = b'{"rules":[]}'
#: How many versions back a peer set remembers its parents; a stream further behind
#: gets a full comparison (still computed once per pair of versions, not per stream).
JOURNAL_DEPTH: Final = 1024
#: Peers per shared piece of a full map (see :meth:`PeerSet.full_map_pieces`).
CHUNK: Final = 128


def _digest(data: bytes) -> bytes:
    """What a stream remembers of a part it sent: enough to tell a change (SHA-1 is
    the fastest hashlib digest here, with hardware support; not a security use)."""
    return hashlib.sha1(data, usedforsecurity=False).digest()


class Peer:
    """One peer as a class of viewers sees it: the wire node and its JSON, shared by
    every peer set and stream that shows this version.

    The wire node is kept beside the JSON: diffs compare and send wire nodes, and
    decoding them again from the JSON when needed churned the heap during connect
    storms (pymalloc arenas left half empty cost more than the wire nodes saved).
    """

    __slots__ = ("_json", "node", "presence", "view", "wire")

    def __init__(self, node: Node, presence: NodePresence | None, view: PeerView, wire: WireNode) -> None:
        self.node = node
        self.presence = presence
        self.view = view
        self.wire = wire
        self._json: bytes | None = None

    @property
    def json(self) -> bytes:
        if self._json is None:
            self._json = _encoder.encode(self.wire)
        return self._json


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
    """One encoded update, possibly shared by many streams.

    ``frames`` is a cache for the transport (e.g. the zstd-framed bytes), filled by the
    first stream that sends it.
    """

    __slots__ = ("_json", "frames")

    def __init__(self, json: bytes) -> None:
        self._json = json
        self.frames: dict[object, bytes] = {}

    @property
    def json(self) -> bytes:
        return self._json


class _Piece(MapMessage):
    """A shared piece of full maps: peers' JSON, joined only when asked for.

    Streams are compressed: the transport compresses a piece once and caches the
    frame, so the joined JSON (as large as the peers' JSON itself) would otherwise
    be a second copy of every peer kept for nothing.
    """

    __slots__ = ("_parts",)

    def __init__(self, parts: tuple[bytes, ...]) -> None:
        super().__init__(b"")
        self._parts = parts

    @property
    def json(self) -> bytes:
        return b"," + b",".join(self._parts)


#: The end of every full map's pieces (closes ``Peers`` and the message).
_TAIL: Final = MapMessage(b"]}")


class _Link:
    """One version's entry in its class's change journal: the ids that changed from
    the version before. Links hold no peers, so a chain of them is cheap and keeps no
    superseded :class:`Peer` alive; a peer set is freed once no stream is on it."""

    __slots__ = ("changed", "parent")

    def __init__(self, changed: frozenset[int], parent: _Link | None) -> None:
        self.changed = changed
        self.parent = parent


class PeerSet:
    """What the members of one visibility class are shown about their peers.

    Attributes:
        peers: node id -> shared peer (members included; a stream skips itself).
        users: user id -> profile, for every user shown.
        link: this version's journal entry (ids that changed from the version before,
            and that version's entry while it is within :data:`JOURNAL_DEPTH`).
        depth: how many versions this class went through before this one.
    """

    __slots__ = ("__weakref__", "_chunks", "_diff_to", "_older_chunks", "_sorted", "depth", "link", "peers", "users")

    def __init__(
        self,
        peers: immutables.Map[int, Peer],
        users: immutables.Map[int, UserProfile],
        parent: PeerSet | None = None,
        changed: frozenset[int] = frozenset(),
    ) -> None:
        self.peers = peers
        self.users = users
        self.link: _Link = _Link(changed, parent.link if parent is not None else None)
        self.depth: int = 0 if parent is None else parent.depth + 1
        # The diff from this version to the one its streams moved on to, with that
        # version held weakly: it lives as long as a stream is still on this version,
        # so a connect storm's many diffs go with the versions they start from.
        self._diff_to: tuple[weakref.ref[PeerSet], PeerDiff, MapMessage | None] | None = None
        self._sorted: tuple[list[int], list[bytes]] | None = None
        self._chunks: list[tuple[tuple[bytes, ...], MapMessage]] | None = None
        # The pieces of the newest older version that built any, to take over the
        # unchanged ones (see _build_chunks).
        self._older_chunks: list[tuple[tuple[bytes, ...], MapMessage]] | None = None
        if parent is not None:
            # Full maps are only built from current versions.
            self._older_chunks = parent._chunks if parent._chunks is not None else parent._older_chunks
            parent._sorted = parent._chunks = parent._older_chunks = None
            if self.depth % JOURNAL_DEPTH == 0:
                # Forget entries older than the journal keeps.
                old = self.link
                for _ in range(JOURNAL_DEPTH):
                    if old.parent is None:
                        break
                    old = old.parent
                old.parent = None

    def _order(self) -> tuple[list[int], list[bytes]]:
        if self._sorted is None:
            ids = sorted(self.peers)
            self._sorted = (ids, [self.peers[i].json for i in ids])
        return self._sorted

    def full_map_pieces(self, body: bytes, exclude: int) -> list[MapMessage | bytes]:
        """A full map as JSON pieces whose concatenation is ``body`` plus a ``Peers``
        array of every peer but ``exclude``.

        The peers are cut into pieces of :data:`CHUNK` in id order; a piece that does
        not hold ``exclude`` is a shared :class:`MapMessage` (so a transport compresses
        it once for every stream: zstd decoders read concatenated frames as one
        message), the others are this stream's own bytes.
        """
        ids, parts = self._order()
        if not ids or ids == [exclude]:
            return [body]
        if self._chunks is None:
            self._chunks = self._build_chunks(parts)
        out: list[MapMessage | bytes] = []
        head = [body[:-1], b',"Peers":[']
        first = True
        for k, (_, chunk) in enumerate(self._chunks):
            lo, hi = k * CHUNK, min((k + 1) * CHUNK, len(ids))
            mine = ids[lo] <= exclude <= ids[hi - 1]
            if not first and not mine:
                out.append(chunk)
                continue
            members = [parts[i] for i in range(lo, hi) if ids[i] != exclude]
            if not members:
                continue
            piece = b",".join(members)
            if first:
                head.append(piece)
                out.append(b"".join(head))
                first = False
            else:
                out.append(b"," + piece)
        out.append(_TAIL)
        return out

    def _build_chunks(self, parts: list[bytes]) -> list[tuple[tuple[bytes, ...], MapMessage]]:
        """The shared pieces; a piece whose peers are the very same objects as in the
        nearest older version that has pieces is taken over from it (with its cached
        compressed frame), so a version costs only the pieces it changed."""
        older: dict[int, list[tuple[tuple[bytes, ...], MapMessage]]] = {}
        for piece in self._older_chunks or ():
            older.setdefault(id(piece[0][0]), []).append(piece)
        self._older_chunks = None  # taken over by this version
        out: list[tuple[tuple[bytes, ...], MapMessage]] = []
        for i in range(0, len(parts), CHUNK):
            group = tuple(parts[i : i + CHUNK])
            for candidate in older.get(id(group[0]), ()):
                if len(candidate[0]) == len(group) and all(a is b for a, b in zip(candidate[0], group, strict=True)):
                    out.append(candidate)
                    break
            else:
                out.append((group, _Piece(group)))
        return out

    def diff(self, old: PeerSet) -> PeerDiff:
        """The diff from ``old`` to this version (cached per ``old``)."""
        return self.diff_message(old, None)[0]

    def diff_message(self, old: PeerSet, now: datetime | None) -> tuple[PeerDiff, MapMessage | None]:
        """The diff and its encoded message (when ``now`` is given), built once for
        every stream moving from ``old`` (and kept by ``old``)."""
        hit = old._diff_to
        if hit is None or hit[0]() is not self:
            hit = old._diff_to = (weakref.ref(self), diff_peer_sets(old, self), None)
        diff, msg = hit[1], hit[2]
        if msg is None and now is not None and not diff.is_empty():
            msg = MapMessage(_encode_update(now, {}, diff))
            old._diff_to = (hit[0], diff, msg)
        return diff, msg


def join_pieces(pieces: Iterable[MapMessage | bytes]) -> bytes:
    """The JSON of a message given as pieces (for uncompressed streams and tests)."""
    return b"".join(p.json if isinstance(p, MapMessage) else p for p in pieces)


def diff_peer_sets(old: PeerSet, new: PeerSet) -> PeerDiff:
    """Compare two peer sets: through the change journal when ``old`` is a recent
    ancestor of ``new`` (cost: the ids changed in between), else entry by entry."""
    ids: set[int] = set()
    cur: _Link | None = new.link
    while cur is not None and cur is not old.link:
        ids |= cur.changed
        cur = cur.parent
    if cur is None:
        ids = set(old.peers.keys()) | set(new.peers.keys())
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
    if cur is None or old.users is not new.users:
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


def _encode_update(now: datetime, parts: dict[str, object], diff: PeerDiff | None) -> bytes:
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
    return _encoder.encode(MapResponse(control_time=now, **msg))  # type: ignore[arg-type]


# -- visibility classes ------------------------------------------------------------------


def _address_aliases(compiled: CompiledPolicy) -> list[object]:
    """The address sets (hosts, CIDRs, IPs) the policy's grants name."""
    seen: dict[object, object] = {}
    for grant in compiled.sources:
        for alias in (*grant.src, *grant.dst):
            if alias.kind in (AliasKind.HOST, AliasKind.PREFIX) and alias not in seen:
                seen[alias] = compiled.resolver.addresses(alias)
    return list(seen.values())


def class_key(compiled: CompiledPolicy, node_id: int, address_sets: list[object] | None = None) -> Hashable:
    """What the policy can tell ``node_id`` apart by (see the module docstring).

    Nodes with equal keys see every other node identically.
    """
    info = compiled.tailnet.nodes[node_id]
    if compiled.via_grants or info.subnet_routes or info.exit_routes or info.node.routable_ips:
        return ("node", node_id)
    if address_sets is None:
        address_sets = _address_aliases(compiled)
    inside = tuple(s.contains_any(info.addrs) for s in address_sets)  # type: ignore[attr-defined]
    return (
        frozenset(node_keys(info, compiled.tailnet)),
        inside,
        compiled.node_attrs.get(node_id, ()),
    )


# -- the hub ---------------------------------------------------------------------------------


@dataclass
class HubStats:
    """How the hub advanced (for metrics and benchmarks)."""

    incremental: int = 0
    rebuilds: int = 0
    peer_evaluations: int = 0
    #: SSH policies rendered and encoded (once per SSH key whose tokens changed).
    ssh_renders: int = 0
    #: Packet filters recomputed by stream updates (only nodes a change may affect).
    filter_evaluations: int = 0


class SSHCache:
    """SSH policy JSON per SSH key, kept across compiles of the same policy text.

    A node's key (:meth:`SSHTable.key`) is kept until the node changes (or the
    users or the policy do); an answer is reused while the tokens it was built from
    (:meth:`SSHTable.deps`) are the same objects in the current table, checked once
    per key and table.
    """

    def __init__(self, stats: HubStats) -> None:
        self._stats = stats
        self._compiled: CompiledPolicy | None = None
        self._table: SSHTable | None = None
        self._keys: dict[int, SSHKey] = {}
        self._canon: dict[SSHKey, SSHKey] = {}
        #: key -> [deps, JSON, table generation it was last checked in]
        self._entries: dict[SSHKey, tuple[tuple[object, ...], bytes, int]] = {}
        self._gen = 0

    def advance(self, compiled: CompiledPolicy, changed: Iterable[int] | None) -> None:
        """Follow ``compiled``; ``changed`` are the nodes that changed since the last
        call (None: every node, after a change of users, routes or policy)."""
        if compiled is self._compiled:
            return
        previous, before = self._table, self._compiled
        infos = None
        if changed is not None and before is not None:
            infos = [t.nodes[nid] for nid in changed for t in (before.tailnet, compiled.tailnet) if nid in t.nodes]
        if previous is None or compiled.policy is not previous.policy:
            previous = None
            self._keys.clear()
            self._canon.clear()
            self._entries.clear()
        elif changed is None:
            self._keys.clear()
        else:
            for nid in changed:
                self._keys.pop(nid, None)
        self._compiled, self._table = compiled, compiled.ssh_table(previous, infos)
        self._gen += 1
        if len(self._entries) > 2 * len(self._keys) + 64:
            live = set(self._keys.values())
            self._entries = {k: v for k, v in self._entries.items() if k in live}
            self._canon = {k: k for k in live}

    def json(self, node_id: int) -> bytes | None:
        """The node's SSH policy as JSON (None when the policy has no ``ssh`` section)."""
        table, compiled = self._table, self._compiled
        assert table is not None and compiled is not None
        if table.policy.ssh is None:
            return None
        key = self._keys.get(node_id)
        if key is None:
            key = table.key(compiled.tailnet.nodes[node_id])
            key = self._keys[node_id] = self._canon.setdefault(key, key)
        entry = self._entries.get(key)
        if entry is not None and entry[2] != self._gen:
            deps = table.deps(key)
            if len(deps) == len(entry[0]) and all(a is b for a, b in zip(deps, entry[0], strict=True)):
                entry = self._entries[key] = (entry[0], entry[1], self._gen)
            else:
                entry = None
        if entry is None:
            self._stats.ssh_renders += 1
            entry = self._entries[key] = (table.deps(key), _encoder.encode(table.render(key)), self._gen)
        return entry[1]


@dataclass(eq=False)
class MapHub:
    """Peer sets for every class of the current state (see the module docstring).

    Drive it with :meth:`advance` (the log and presence changes since the last call);
    streams read it through :class:`StreamCursor`.
    """

    policy: PolicyCompiler
    settings: NetmapSettings
    presence: PresenceOf
    stats: HubStats = field(default_factory=HubStats)
    seq: int = 0
    state: TailnetState | None = None
    now: datetime | None = None
    compiled: CompiledPolicy | None = None
    _cache: PeerCache = field(default_factory=PeerCache)
    _key_of: dict[int, Hashable] = field(default_factory=dict)
    _members: dict[Hashable, set[int]] = field(default_factory=dict)
    #: class key -> the one object of it that _key_of uses (interned).
    _canon: dict[Hashable, Hashable] = field(default_factory=dict)
    _classes: dict[Hashable, PeerSet] = field(default_factory=dict)
    #: node id -> hub seq at which its self node (and filter) may have changed.
    _dirty: dict[int, int] = field(default_factory=dict)
    #: node id -> hub seq at which its packet filter may have changed.
    _filter_dirty: dict[int, int] = field(default_factory=dict)
    #: hub seq at which every node's self node and filter may have changed.
    _all_dirty: int = 0
    #: hub seq at which every node's filter may have changed.
    _filters_dirty: int = 0
    _ssh: SSHCache | None = None
    _expiries: tuple[TailnetState | None, list[datetime]] = (None, [])
    _messages: dict[bytes, MapMessage] = field(default_factory=dict)

    # -- reading -------------------------------------------------------------------

    def peer_set(self, node_id: int) -> PeerSet:
        return self._classes[self._key_of[node_id]]

    def classes(self) -> int:
        return len(self._classes)

    def next_expiry(self) -> datetime | None:
        """The next key expiry after :attr:`now` (the driver advances then)."""
        if self.state is None or self.now is None:
            return None
        times = self._expiry_times(self.state)
        i = bisect.bisect_right(times, self.now)
        return times[i] if i < len(times) else None

    def ssh_json(self, node_id: int) -> bytes | None:
        """The node's SSH policy JSON, shared by every node with the same SSH key."""
        assert self._ssh is not None
        return self._ssh.json(node_id)

    def shared(self, json: bytes) -> MapMessage:
        """One :class:`MapMessage` per distinct content within a hub version."""
        msg = self._messages.get(json)
        if msg is None:
            msg = self._messages[json] = MapMessage(json)
        return msg

    # -- advancing ---------------------------------------------------------------------

    def advance(self, state: TailnetState, now: datetime, delta: Delta, presence_changed: Iterable[int]) -> None:
        """Bring every class to ``state`` at ``now``.

        Args:
            state: the current projection.
            now: the time of this version (expired keys drop out of views).
            delta: the log changes since the previous call (merged).
            presence_changed: nodes whose presence changed since the previous call.
        """
        old_state, old_now, old_compiled = self.state, self.now, self.compiled
        compiled = self.policy.compiled(state)
        if self._ssh is None:
            self._ssh = SSHCache(self.stats)
        self.seq += 1
        self._messages = {}
        changed = set(delta.nodes_changed) | set(delta.nodes_removed)
        if old_state is None or old_now is None or self._needs_rebuild(old_state, state, delta, changed):
            self.state, self.now, self.compiled = state, now, compiled
            self._rebuild(state, now, compiled)
            return
        expired = self._expired_between(state, old_now, now)
        self.state, self.now, self.compiled = state, now, compiled
        self._incremental(state, now, compiled, changed, set(presence_changed) | expired, delta)
        if compiled is not old_compiled:
            assert old_compiled is not None
            self._ssh.advance(compiled, changed)
            affected = compiled.filters_changed_since(old_compiled, changed)
            if affected is None:
                self._filters_dirty = self.seq
            else:
                for nid in affected:
                    self._filter_dirty[nid] = self.seq

    def _needs_rebuild(self, old: TailnetState, new: TailnetState, delta: Delta, changed: set[int]) -> bool:
        if delta.policy or delta.users_changed or delta.users_removed:
            return True
        for nid in changed:
            for s in (old, new):
                n = s.nodes.get(nid)
                if n is not None and (n.advertised_routes or n.approved_routes):
                    return True  # a route can move a primary: others' views change
        return False

    def _expiry_times(self, state: TailnetState) -> list[datetime]:
        if self._expiries[0] is not state:
            self._expiries = (state, sorted(n.expiry for n in state.nodes.values() if n.expiry is not None))
        return self._expiries[1]

    def _expired_between(self, state: TailnetState, start: datetime, end: datetime) -> set[int]:
        times = self._expiry_times(state)
        if bisect.bisect_right(times, start) == bisect.bisect_right(times, end):
            return set()
        return {n.id for n in state.nodes.values() if n.expiry is not None and start < n.expiry <= end}

    def _rebuild(self, state: TailnetState, now: datetime, compiled: CompiledPolicy) -> None:
        self.stats.rebuilds += 1
        self._cache.rebuilt()
        aliases = _address_aliases(compiled)
        # One key object per class, not an equal copy per node.
        canon: dict[Hashable, Hashable] = {}
        keys: dict[int, Hashable] = {}
        for nid in state.nodes:
            key = class_key(compiled, nid, aliases)
            keys[nid] = canon.setdefault(key, key)
        self._canon = canon
        members: dict[Hashable, set[int]] = {}
        for nid, key in keys.items():
            members.setdefault(key, set()).add(nid)
        classes: dict[Hashable, PeerSet] = {}
        for key, mem in members.items():
            entries = self._class_entries(state, now, compiled, mem)
            classes[key] = _next_version(self._classes.get(key), entries, _users(state, entries.values()))
        self._key_of, self._members, self._classes = keys, members, classes
        self._all_dirty = self.seq
        assert self._ssh is not None
        self._ssh.advance(compiled, None)

    def _class_entries(
        self, state: TailnetState, now: datetime, compiled: CompiledPolicy, members: set[int]
    ) -> dict[int, Peer]:
        """Every peer the members see (each other included), from one representative."""
        rep = min(members)
        entries: dict[int, Peer] = {}
        for view in compiled.peers(rep):
            peer = state.nodes[view.node_id]
            if not peer.is_expired(now):
                entries[view.node_id] = self._cache.get(peer, self.presence(peer.id), view, self.settings)
        self.stats.peer_evaluations += len(entries)
        if len(members) > 1:
            other = min(members - {rep})
            view_of_rep = compiled.peer_view(other, rep)
            node = state.nodes[rep]
            if view_of_rep is not None and not node.is_expired(now):
                entries[rep] = self._cache.get(node, self.presence(rep), view_of_rep, self.settings)
        return entries

    def _incremental(
        self,
        state: TailnetState,
        now: datetime,
        compiled: CompiledPolicy,
        changed: set[int],
        presence_only: set[int],
        delta: Delta,
    ) -> None:
        self.stats.incremental += 1
        presence_only -= changed
        aliases: list[object] | None = None
        new_keys: set[Hashable] = set()
        lone: dict[Hashable, int] = {}
        for nid in sorted(changed):
            old_key = self._key_of.pop(nid, None)
            if old_key is not None:
                self._members[old_key].discard(nid)
            if nid not in state.nodes:
                continue
            if aliases is None:
                aliases = _address_aliases(compiled)
            key = class_key(compiled, nid, aliases)
            key = self._canon.setdefault(key, key)
            self._key_of[nid] = key
            members = self._members.setdefault(key, set())
            if not members:
                new_keys.add(key)
            elif len(members) == 1:
                # The lone member had nobody to be shown to: evaluate it now.
                lone[key] = next(iter(members))
            members.add(nid)
        classes: dict[Hashable, PeerSet] = {}
        for key, mem in self._members.items():
            if not mem:
                continue
            old = self._classes.get(key)
            if key in new_keys or old is None:
                entries = self._class_entries(state, now, compiled, mem)
                classes[key] = _next_version(old, entries, _users(state, entries.values()))
                continue
            extra = {lone[key]} if key in lone else set()
            classes[key] = self._update_class(state, now, compiled, old, mem, changed | extra, presence_only)
        self._members = {k: m for k, m in self._members.items() if m}
        if len(self._canon) > len(self._members):
            self._canon = {k: k for k in self._members}
        self._classes = classes
        for nid in changed | presence_only:
            self._dirty[nid] = self.seq

    def _update_class(
        self,
        state: TailnetState,
        now: datetime,
        compiled: CompiledPolicy,
        old: PeerSet,
        members: set[int],
        changed: set[int],
        presence_only: set[int],
    ) -> PeerSet:
        peers = old.peers.mutate()
        users = old.users
        touched: set[int] = set()
        for nid in changed:
            node = state.nodes.get(nid)
            rep = _representative(members, nid)
            view = None
            if node is not None and rep is not None and not node.is_expired(now):
                view = compiled.peer_view(rep, nid)
                self.stats.peer_evaluations += 1
            before = peers.get(nid)
            if view is None:
                if before is not None:
                    del peers[nid]
                    touched.add(nid)
                continue
            assert node is not None
            after = self._cache.get(node, self.presence(nid), view, self.settings)
            if after is not before:
                peers[nid] = after
                touched.add(nid)
                users = _with_user(state, users, node)
        for nid in presence_only:
            before = peers.get(nid)
            node = state.nodes.get(nid)
            if before is None or node is None:
                continue
            if node.is_expired(now):
                del peers[nid]
                touched.add(nid)
                continue
            after = self._cache.get(node, self.presence(nid), before.view, self.settings)
            if after is not before:
                peers[nid] = after
                touched.add(nid)
        if not touched and users is old.users:
            return old
        return PeerSet(peers.finish(), users, old, frozenset(touched))

    # -- per-stream dirtiness ----------------------------------------------------------

    def self_dirty_since(self, node_id: int, seq: int) -> bool:
        return self._all_dirty > seq or self._dirty.get(node_id, 0) > seq

    def filter_dirty_since(self, node_id: int, seq: int) -> bool:
        return (
            self._filters_dirty > seq
            or self._filter_dirty.get(node_id, 0) > seq
            or self.self_dirty_since(node_id, seq)
        )

    def forget(self, node_id: int) -> None:
        self._dirty.pop(node_id, None)
        self._filter_dirty.pop(node_id, None)


def _representative(members: set[int], exclude: int) -> int | None:
    for m in members:
        if m != exclude:
            return m
    return None


def _users(state: TailnetState, peers: Iterable[Peer]) -> immutables.Map[int, UserProfile]:
    return immutables.Map({p.id: p for p in profiles_for(state, (peer.node for peer in peers))})


def _with_user(
    state: TailnetState, users: immutables.Map[int, UserProfile], node: Node
) -> immutables.Map[int, UserProfile]:
    uid = user_id_shown(node)
    if uid in users:
        return users
    for p in profiles_for(state, [node]):
        users = users.set(p.id, p)
    return users


def _next_version(
    old: PeerSet | None, entries: dict[int, Peer], users: immutables.Map[int, UserProfile]
) -> PeerSet:
    """A peer set for ``entries``: ``old`` itself when nothing differs, else a child of it."""
    if old is None:
        return PeerSet(immutables.Map(entries), users)
    touched = {nid for nid, p in entries.items() if old.peers.get(nid) is not p}
    touched |= {nid for nid in old.peers if nid not in entries}
    if not touched and old.users == users:
        return old
    return PeerSet(immutables.Map(entries), users, old, frozenset(touched))


# -- one stream -----------------------------------------------------------------------------


class StreamCursor:
    """What one map stream has been sent: a peer set and a few digests.

    :meth:`full_map` makes the first message; :meth:`update` the next ones (zero, one
    or two messages: the peer diff shared with the class, then this node's own parts).

    A node whose key is out of use (expired or logged out) is sent only its own node,
    marked expired: when that happens on an open stream, one message removes every
    peer and clears the filter, SSH policy and DNS configuration (``expired`` is then
    set and ``peers`` is ``None``); if the key comes back into use (re-keyed), one
    message sends the whole netmap again.
    """

    __slots__ = ("derp_map", "dns", "expired", "filter", "node_id", "peers", "self_node", "seq", "ssh")

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.seq = 0
        self.peers: PeerSet | None = None
        self.expired = False
        self.self_node = b""
        self.filter = b""
        self.ssh = b""
        self.derp_map: object = None
        self.dns: object = None  # the DNS configuration last sent (by identity)

    def full_map(self, hub: MapHub) -> list[MapMessage | bytes]:
        """The complete first message (and the new baseline), as JSON pieces to be
        concatenated (see :meth:`PeerSet.full_map_pieces`)."""
        state, now, compiled = hub.state, hub.now, hub.compiled
        assert state is not None and now is not None and compiled is not None
        me = self.node_id
        node = state.nodes[me]
        if node.is_expired(now):
            msg = expired_map(state, node, hub.presence(me), hub.settings, now)
            self._now_expired(hub, msg.node)
            return [_encoder.encode(msg)]
        self.expired = False
        peers = hub.peer_set(me)
        self_wire = self._self_wire(hub, node)
        pf = _encoder.encode(compiled.packet_filter(me))
        ssh = hub.ssh_json(me)
        self.peers, self.seq, self.derp_map = peers, hub.seq, hub.settings.derp_map
        self.dns = hub.settings.dns
        self.self_node = _digest(_encoder.encode(self_wire))
        self.filter = _digest(pf)
        self.ssh = ssh or _NO_SSH
        own = profiles_for(state, [node])
        profiles = dict(peers.users)
        for p in own:
            profiles[p.id] = p
        body = _encoder.encode(
            MapResponse(
                node=self_wire,
                derp_map=hub.settings.derp_map,
                dns_config=hub.settings.dns,
                domain=hub.settings.domain,
                packet_filters={"base": msgspec.Raw(pf)},
                ssh_policy=msgspec.Raw(ssh) if ssh is not None else None,
                user_profiles=[profiles[k] for k in sorted(profiles)],
                collect_services=False,
                control_time=now,
                debug=Debug(disable_log_tail=True),
            )
        )
        return peers.full_map_pieces(body, exclude=me)

    def _self_wire(self, hub: MapHub, node: Node) -> WireNode:
        assert hub.compiled is not None
        allowed, primary, caps = hub.compiled.self_view(self.node_id)
        return wire_node(
            node, hub.presence(node.id), hub.settings, allowed_ips=allowed, primary_routes=primary,
            cap_map=caps, is_self=True,
        )

    def _now_expired(self, hub: MapHub, self_wire: WireNode | None) -> None:
        """Remember that the client was sent the expired map (or its transition)."""
        self.expired, self.peers, self.seq, self.derp_map = True, None, hub.seq, hub.settings.derp_map
        self.self_node = _digest(_encoder.encode(self_wire))
        self.filter = _digest(bytes(DENY_ALL))
        self.ssh = _NO_SSH

    def _expired_update(self, hub: MapHub, node: Node) -> list[MapMessage]:
        """The update of a stream whose node's key is out of use: at the transition,
        every peer removed and the filter, SSH policy and DNS configuration cleared;
        afterwards only its own node and the DERP map."""
        now = hub.now
        assert now is not None
        self_wire = expired_self(node, hub.presence(node.id), hub.settings)
        parts: dict[str, object] = {}
        digest = _digest(_encoder.encode(self_wire))
        if digest != self.self_node:
            parts["node"] = self_wire
        if not self.expired:
            assert self.peers is not None
            gone = sorted(nid for nid in self.peers.peers if nid != self.node_id)
            if gone:
                parts["peers_removed"] = gone
            if self.filter != _digest(bytes(DENY_ALL)):
                parts["packet_filters"] = {"base": DENY_ALL}
            if self.ssh != _NO_SSH:
                parts["ssh_policy"] = msgspec.Raw(_NO_SSH)
            if hub.settings.dns is not None:
                parts["dns_config"] = DNSConfig()
        if hub.settings.derp_map is not self.derp_map:
            parts["derp_map"] = hub.settings.derp_map
        self._now_expired(hub, self_wire)
        return [MapMessage(_encoder.encode(MapResponse(control_time=now, **parts)))] if parts else []  # type: ignore[arg-type]

    def _restored(self, hub: MapHub, node: Node) -> list[MapMessage]:
        """The update of a stream whose node's key is back in use: the whole netmap
        (every peer as changed, since the client holds none)."""
        state, now, compiled = hub.state, hub.now, hub.compiled
        assert state is not None and now is not None and compiled is not None
        me = self.node_id
        peers = hub.peer_set(me)
        self_wire = self._self_wire(hub, node)
        pf = _encoder.encode(compiled.packet_filter(me))
        ssh = hub.ssh_json(me) or _NO_SSH
        changed = [peers.peers[i].wire for i in sorted(peers.peers) if i != me]
        profiles = dict(peers.users)
        for p in profiles_for(state, [node]):
            profiles[p.id] = p
        parts: dict[str, object] = {
            "node": self_wire,
            "packet_filters": {"base": msgspec.Raw(pf)},
            "ssh_policy": msgspec.Raw(ssh),
            "user_profiles": [profiles[k] for k in sorted(profiles)],
        }
        if changed:
            parts["peers_changed"] = changed
        if hub.settings.dns is not None:
            parts["dns_config"] = hub.settings.dns
        if hub.settings.derp_map is not self.derp_map:
            parts["derp_map"] = hub.settings.derp_map
        self.expired, self.peers, self.seq, self.derp_map = False, peers, hub.seq, hub.settings.derp_map
        self.dns = hub.settings.dns
        self.self_node = _digest(_encoder.encode(self_wire))
        self.filter = _digest(pf)
        self.ssh = ssh
        return [MapMessage(_encoder.encode(MapResponse(control_time=now, **parts)))]  # type: ignore[arg-type]

    def update(self, hub: MapHub) -> list[MapMessage]:
        """Messages that bring the client from what it was sent to the hub's state."""
        state, now, compiled = hub.state, hub.now, hub.compiled
        assert state is not None and now is not None and compiled is not None
        me = self.node_id
        out: list[MapMessage] = []
        node = state.nodes.get(me)
        if node is None or hub.seq == self.seq:
            return out
        if node.is_expired(now):
            return self._expired_update(hub, node)
        if self.expired:
            return self._restored(hub, node)
        assert self.peers is not None
        peers = hub.peer_set(me)
        if peers is not self.peers:
            diff, shared = peers.diff_message(self.peers, now)
            if me in diff.ids:
                own = diff.without(me)
                if not own.is_empty():
                    out.append(MapMessage(_encode_update(now, {}, own)))
            elif shared is not None:
                out.append(shared)
            self.peers = peers
        parts: dict[str, object] = {}
        if hub.self_dirty_since(me, self.seq):
            self_wire = self._self_wire(hub, node)
            digest = _digest(_encoder.encode(self_wire))
            if digest != self.self_node:
                self.self_node = digest
                parts["node"] = self_wire
        if hub.filter_dirty_since(me, self.seq):
            hub.stats.filter_evaluations += 1
            pf = _encoder.encode(compiled.packet_filter(me))
            digest = _digest(pf)
            if digest != self.filter:
                self.filter = digest
                parts["packet_filters"] = {"base": msgspec.Raw(pf)}
        ssh = hub.ssh_json(me) or _NO_SSH
        if ssh is not self.ssh:
            # One object per SSH key: a different object is usually different bytes.
            if ssh != self.ssh:
                parts["ssh_policy"] = msgspec.Raw(ssh)
            self.ssh = ssh
        if hub.settings.derp_map is not self.derp_map:
            self.derp_map = hub.settings.derp_map
            parts["derp_map"] = hub.settings.derp_map
        if hub.settings.dns is not self.dns:
            # A DNS change made through the API (dns.set): every stream gets it.
            self.dns = hub.settings.dns
            parts["dns_config"] = hub.settings.dns if hub.settings.dns is not None else DNSConfig()
        if parts:
            out.append(hub.shared(_encode_update(now, parts, None)))
        self.seq = hub.seq
        return out


__all__ += ["JOURNAL_DEPTH", "TAGGED_DEVICES_USER_ID", "HubStats", "PeerCache", "PeerDiff", "SSHCache"]
