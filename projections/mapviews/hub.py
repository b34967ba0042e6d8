"""The hub: visibility classes and one peer set per class for the current state (pure).

**Visibility classes.** :func:`class_key` gives every node a key made of what the
policy can tell it apart by: its identity keys (user, the groups and domains that
follow from the user, member/tagged, tags), which address aliases of the policy
contain its addresses, and its ``nodeAttrs``. Nodes with equal keys are interchangeable
to the policy, so they see every *other* node the same way (same visibility, same
AllowedIPs). A subnet router or exit node (its routes change what it sees) and every
node under a policy with ``via`` grants get a class of their own.

**Advancing.** :class:`MapHub` folds (state, presence) changes into new peer sets
(:mod:`.peersets`), one per class:

* when only nodes changed (joins, leaves, renames, tags, keys, presence, expiry) and
  no subnet router was involved, a node's change can only change how others see
  *that* node (the policy's sets gain or lose only its addresses), so each class
  re-evaluates just the changed nodes through one representative member:
  cost is classes x changed nodes;
* a policy change alone (same nodes, users, routes, node attributes and address
  aliases, so every node keeps its class and its self node) rebuilds only the classes
  of nodes on either side of a matcher that one compile has and the other lacks
  (:meth:`~projections.policy.CompiledPolicy.reach_changes`; ports play no part in
  visibility), and of routers: a change of ports rebuilds none;
* any other policy change, a user change or a change involving routes (primary routes
  may move) rebuilds every class from the compiled policy (classes x peers), reusing
  the shared peer objects, so streams whose view did not change get nothing.

**Sharing between classes.** Classes are what the policy can tell apart, which is
more than what their members see: in a segmented tailnet every user is a class
(``autogroup:self``, SSH), yet the users of one team see the same peers. So a new
peer-set version is looked up by its content among the current ones and those made
in the same advance (:class:`_Versions`): classes that see the same peers share one
:class:`~.peersets.PeerSet` object, however they came to, and with it everything
kept per peer set (its map, the diffs and messages from it, and the transport's
full-map pieces and their compressed frames). A class whose peers change while
another stays is given a version of its own, which starts a lineage of its own when
its parent is still someone's current version. At 5,000 corp nodes this makes 520
classes about 41 distinct peer sets. Sharing changes no bytes: a stream is sent the
diff between the version it was on and its class's current one, whichever classes
share them.

Every advance bumps :attr:`MapHub.seq`. Beside the peer sets the hub records, per
node, the sequence number at which its self node or packet filter may have changed
(:meth:`MapHub.self_dirty_since`, :meth:`MapHub.filter_dirty_since`), so a stream
(:mod:`.cursor`) recomputes only those parts a change can affect:

* the self node only for nodes that changed (or after a rebuild);
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
from collections import Counter
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

import immutables
import msgspec

from ..delta import Delta
from ..netmap import NetmapSettings, PresenceOf, profiles_for, user_id_shown
from ..policy import CompiledPolicy
from ..policy.document import AliasKind
from ..policy.resolve import node_keys
from ..policy.ssh import SSHKey, SSHTable
from ..policystate import PolicyCompiler
from ..state import Node, TailnetState
from ..tailcfg import MapResponse, UserProfile
from .peersets import Lineage, MapMessage, Peer, PeerCache, PeerSet, changed_digest, content_digest

__all__ = ["HubStats", "MapHub", "SSHCache", "class_key"]

_encoder: Final = msgspec.json.Encoder()


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
    #: Classes an incremental advance looked at (those that see a changed node now or
    #: saw it before, and new ones; every class only with presence changes or via).
    class_updates: int = 0


class SSHCache:
    """SSH policy JSON per SSH key, kept across compiles of the same ``ssh`` section.

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
        call (None: every node, after a change of users or routes). A policy change
        that keeps the ``ssh`` section keeps the answers whose tokens are equal (and
        the nodes' keys, when the rules resolve to the same addresses)."""
        if compiled is self._compiled:
            return
        previous, before = self._table, self._compiled
        infos = None
        if changed is not None and before is not None:
            infos = [t.nodes[nid] for nid in changed for t in (before.tailnet, compiled.tailnet) if nid in t.nodes]
        if previous is None or (compiled.policy is not previous.policy and compiled.policy.ssh != previous.policy.ssh):
            previous = None
            self._keys.clear()
            self._canon.clear()
            self._entries.clear()
        elif changed is None:
            self._keys.clear()
        else:
            for nid in changed:
                self._keys.pop(nid, None)
        table = compiled.ssh_table(previous, infos)
        if previous is not None and compiled.policy is not previous.policy and not table.same_keys(previous):
            # A policy change that kept the ssh section but moved what its rules
            # resolve to: every key again (the answers stay while their tokens do).
            self._keys.clear()
        self._compiled, self._table = compiled, table
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
    #: This version's update messages by what they carry (see :meth:`shared`).
    _messages: dict[Hashable, MapMessage] = field(default_factory=dict)

    # -- reading -------------------------------------------------------------------

    def peer_set(self, node_id: int) -> PeerSet:
        return self._classes[self._key_of[node_id]]

    def classes(self) -> int:
        return len(self._classes)

    def class_of(self, node_id: int) -> Hashable:
        """The visibility class of ``node_id`` (its key, one object per class)."""
        return self._key_of[node_id]

    def peer_sets(self) -> int:
        """How many distinct peer sets the classes share (at most :meth:`classes`)."""
        return len({id(ps) for ps in self._classes.values()})

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

    def shared(self, key: Hashable, make: Callable[[], MapResponse]) -> MapMessage:
        """One :class:`MapMessage` per ``key`` within a hub version: ``make`` builds it
        for the first stream that asks, the others get the same object (and so the
        same bytes, encoded once).

        ``key`` must tell apart every content ``make`` may build in this version (the
        settings do not change within a version: changing them advances the hub).
        """
        msg = self._messages.get(key)
        if msg is None:
            msg = self._messages[key] = MapMessage(make())
        return msg

    def release_messages(self) -> None:
        """Forget this version's shared messages (see :meth:`shared`), once every
        stream has had its update: most carry one node's own parts (after a policy
        change, every node's new packet filter), which no other stream will ask for,
        and they would be held, with their bytes, until the next change. A stream
        that asks later gets an equal message of its own."""
        self._messages = {}

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
        changed = set(delta.nodes_changed) | set(delta.nodes_removed)
        compiled = self.policy.compiled(state, since=old_state, changed=changed)
        if self._ssh is None:
            self._ssh = SSHCache(self.stats)
        self.seq += 1
        self._messages = {}
        if old_state is None or old_now is None or self._needs_rebuild(old_state, state, delta, changed):
            if (
                old_now is not None
                and old_compiled is not None
                and self._same_views_but_filters(old_state, state, old_compiled, compiled, delta, changed)
            ):
                expired = self._expired_between(state, old_now, now)
                self.state, self.now, self.compiled = state, now, compiled
                self._policy_only(state, now, old_compiled, compiled, set(presence_changed) | expired)
                return
            self.state, self.now, self.compiled = state, now, compiled
            self._rebuild(state, now, compiled)
            return
        self._follow_expiries(old_state, state, changed)
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

    def _same_views_but_filters(
        self,
        old_state: TailnetState | None,
        state: TailnetState,
        old: CompiledPolicy,
        new: CompiledPolicy,
        delta: Delta,
        changed: set[int],
    ) -> bool:
        """Whether a change is a policy change alone that keeps every node's class and
        self node: the same nodes, users, routes, tailnet settings, node attributes
        and address aliases (:meth:`_policy_only` then follows the matchers)."""
        return (
            old_state is not None
            and not changed
            and not delta.users_changed
            and not delta.users_removed
            and state.nodes is old_state.nodes
            and state.users is old_state.users
            and state.route_primaries is old_state.route_primaries
            and old.tailnet.settings == new.tailnet.settings
            and old.node_attrs == new.node_attrs
            and old.primaries == new.primaries
            and _address_aliases(old) == _address_aliases(new)
        )

    def _policy_only(
        self, state: TailnetState, now: datetime, old: CompiledPolicy, compiled: CompiledPolicy, presence_only: set[int]
    ) -> None:
        """A policy change that :meth:`_same_views_but_filters` allows: every node keeps
        its class (class keys are made of what did not change) and its self node. Only
        the classes of nodes on either side of a matcher that one compile has and the
        other lacks (:meth:`~projections.policy.CompiledPolicy.reach_changes`), and
        of routers, can see different peers: those are rebuilt, every other class
        keeps its peer set (brought up to date for presence and expiry only). Every
        packet filter and SSH policy may have changed. Cost: the matchers, plus the
        peers of the classes rebuilt -- none for a change of ports alone."""
        self.stats.rebuilds += 1
        moved = compiled.reach_changes(old)
        if moved is None:
            rebuilt: set[Hashable] = set(self._members)
        else:
            # (An empty set asks nothing: a fresh tailnet's address index is not built.)
            rebuilt = {self._key_of[n] for n in compiled.tailnet.node_ids_in(moved) if n in self._key_of} if moved else set()
            rebuilt.update(self._key_of[r.id] for r in compiled.tailnet.routers() if r.id in self._key_of)
        classes: dict[Hashable, PeerSet] = {}
        versions = _Versions(self._classes.values())
        for key, mem in self._members.items():
            previous = self._classes[key]
            if key in rebuilt:
                entries = self._class_entries(state, now, compiled, mem, forget=True)
                classes[key] = versions.next_version(state, previous, entries)
            else:
                classes[key] = self._update_class(state, now, compiled, previous, mem, set(), presence_only, versions)
        self._classes = classes
        for nid in presence_only:
            self._dirty[nid] = self.seq
        self._filters_dirty = self.seq
        assert self._ssh is not None
        self._ssh.advance(compiled, ())

    def _expiry_times(self, state: TailnetState) -> list[datetime]:
        if self._expiries[0] is not state:
            self._expiries = (state, sorted(n.expiry for n in state.nodes.values() if n.expiry is not None))
        return self._expiries[1]

    def _follow_expiries(self, old: TailnetState, new: TailnetState, changed: set[int]) -> None:
        """Edit the sorted key expiries of ``old`` into those of ``new`` when only
        ``changed`` differ (instead of sorting every node's again on each change)."""
        if self._expiries[0] is not old:
            return
        times = list(self._expiries[1])
        for nid in changed:
            before, after = old.nodes.get(nid), new.nodes.get(nid)
            if before is not None and before.expiry is not None:
                del times[bisect.bisect_left(times, before.expiry)]
            if after is not None and after.expiry is not None:
                bisect.insort(times, after.expiry)
        self._expiries = (new, times)

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
        versions = _Versions(self._classes.values())
        for key, mem in members.items():
            entries = self._class_entries(state, now, compiled, mem, forget=True)
            classes[key] = versions.next_version(state, self._classes.get(key), entries)
        self._key_of, self._members, self._classes = keys, members, classes
        self._all_dirty = self.seq
        assert self._ssh is not None
        self._ssh.advance(compiled, None)

    def _class_entries(
        self, state: TailnetState, now: datetime, compiled: CompiledPolicy, members: set[int], *, forget: bool = False
    ) -> dict[int, Peer]:
        """Every peer the members see (each other included), from one representative.

        ``forget``: the compiled policy drops the representative's fold afterwards (a
        rebuild asks about each representative once; a join's new class may have the
        newcomer as its representative, whose fold the other classes ask about)."""
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
        if forget:
            compiled.forget_fold(rep)
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
        #: classes whose peer set held a changed node, and classes that lost a member
        held: set[Hashable] = set()
        emptied: set[Hashable] = set()
        #: newcomers that joined a class with an unchanged member -> that member
        twins: dict[int, int] = {}
        for nid in sorted(changed):
            old_key = self._key_of.pop(nid, None)
            if old_key is not None:
                self._members[old_key].discard(nid)
                if not self._members[old_key]:
                    emptied.add(old_key)
                held.update(k for k, ps in self._classes.items() if nid in ps.peers)
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
            if old_key is None and members:
                twin = _twin(state, now, members, changed)
                if twin is not None:
                    twins[nid] = twin
            members.add(nid)
        seen_by, sure = self._seen_by(state, now, compiled, changed, twins)
        classes = dict(self._classes)
        for key in emptied:
            if not self._members.get(key):
                self._members.pop(key, None)
                classes.pop(key, None)
        todo: Iterable[Hashable]
        if seen_by is None or presence_only:
            todo = list(self._members)
        else:
            # Only the classes that see a changed node now or saw it before (and new or
            # lone ones) can differ: the cost follows the change, not the classes.
            todo = held | new_keys | lone.keys()
            for nid in changed:
                todo |= seen_by[nid]
        #: classes on each version before this advance, and how many of them were looked at
        sharing = Counter(map(id, classes.values()))
        looked: dict[int, tuple[PeerSet, int]] = {}
        versions = _Versions(self._classes.values())
        #: (previous version, newcomers, the viewers' node attributes) -> the version
        #: made of them: classes on one version that gain the same known newcomers
        #: gain the same peers (plain peers' views depend on the viewer's attributes
        #: alone), so the first one's update serves the others.
        gained: dict[tuple[int, frozenset[int], tuple[str, ...]], PeerSet] = {}
        for key in todo:
            mem = self._members.get(key)
            if not mem:
                continue
            self.stats.class_updates += 1
            old = self._classes.get(key)
            if old is not None:
                looked[id(old)] = (old, looked.get(id(old), (old, 0))[1] + 1)
            if key in new_keys or old is None:
                entries = self._class_entries(state, now, compiled, mem)
                classes[key] = versions.next_version(state, old, entries)
                continue
            if seen_by is None:
                mine = set(changed)
            else:
                # Only the changed nodes the class sees now or saw before: for the
                # others, the answer would be "not a peer" both times.
                mine = {nid for nid in changed if key in seen_by[nid] or nid in old.peers}
            if key in lone:
                mine.add(lone[key])
            known = {nid for nid in mine if key in sure.get(nid, ())}
            if presence_only or key in lone or len(known) != len(mine):
                classes[key] = self._update_class(state, now, compiled, old, mem, mine, presence_only, versions, known)
                continue
            memo = (id(old), frozenset(mine), compiled.node_attrs.get(next(iter(mem)), ()))
            made = gained.get(memo)
            if made is None:
                made = gained[memo] = self._update_class(
                    state, now, compiled, old, mem, mine, presence_only, versions, known
                )
            classes[key] = made
        for old, count in looked.values():
            if sharing[id(old)] > count:
                versions.kept(old)  # classes not looked at stay on it (as if they kept it)
        if len(self._canon) > len(self._members):
            self._canon = {k: k for k in self._members}
        self._classes = classes
        for nid in changed | presence_only:
            self._dirty[nid] = self.seq

    def _seen_by(
        self, state: TailnetState, now: datetime, compiled: CompiledPolicy, changed: set[int], twins: dict[int, int]
    ) -> tuple[dict[int, set[Hashable]] | None, dict[int, set[Hashable]]]:
        """The classes that see each changed node, from its own peers (visibility is
        symmetric, and nodes of one class see every other node alike): the cost
        follows the peers of the changed nodes, not the number of classes. None
        with via grants, whose visibility is not symmetric.

        A newcomer with a twin (``twins``: an unchanged, unexpired member of the class
        it joined) is seen by the classes that see its twin, which the current peer
        sets tell: a join changes no visibility between other nodes, and the
        newcomer is interchangeable with its twin for every class but its own
        (:func:`_twin`). No fold of the newcomer's matchers, no walk over its peers:
        a lookup per distinct peer set. The second mapping holds, per newcomer, the
        classes known so to see it (their peer views need no visibility test).
        """
        sure: dict[int, set[Hashable]] = {}
        if compiled.via_grants:
            return None, sure
        out: dict[int, set[Hashable]] = {}
        key_of = self._key_of
        #: the classes on each current version (made at the first twin)
        versions: list[tuple[PeerSet, list[Hashable]]] | None = None
        for nid in changed:
            node = state.nodes.get(nid)
            if node is None or node.is_expired(now):
                out[nid] = set()
                continue
            twin = twins.get(nid)
            if twin is None:
                out[nid] = {key_of[p] for p in compiled.peer_id_set(nid) if p in key_of}
                continue
            own = key_of[nid]
            if versions is None:
                on: dict[int, tuple[PeerSet, list[Hashable]]] = {}
                for key, ps in self._classes.items():
                    on.setdefault(id(ps), (ps, []))[1].append(key)
                versions = list(on.values())
            seeing = {key for ps, keys in versions if twin in ps.peers for key in keys}
            seeing.discard(own)
            sure[nid] = seeing
            own_ps = self._classes.get(own)
            # The own class's peer set tells whether its members see each other only
            # when it was made with two unchanged members; else its representative
            # is asked (_update_class, with the visibility test).
            if own_ps is None or twin in own_ps.peers:
                out[nid] = seeing | {own}
                if own_ps is not None:
                    sure[nid] = seeing | {own}
            elif sum(1 for m in self._members[own] if m not in changed) >= 2:
                out[nid] = seeing
            else:
                out[nid] = seeing | {own}
        return out, sure

    def _update_class(
        self,
        state: TailnetState,
        now: datetime,
        compiled: CompiledPolicy,
        old: PeerSet,
        members: set[int],
        changed: set[int],
        presence_only: set[int],
        versions: _Versions,
        known: Collection[int] = (),
    ) -> PeerSet:
        """``known``: changed nodes known to be peers of the class (no visibility test)."""
        peers = old.peers.mutate()
        users = old.users
        touched: set[int] = set()
        for nid in changed:
            node = state.nodes.get(nid)
            rep = _representative(members, nid)
            view = None
            if node is not None and rep is not None and not node.is_expired(now):
                view = compiled.known_peer_view(rep, nid) if nid in known else compiled.peer_view(rep, nid)
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
            return versions.kept(old)
        return versions.child(old, peers, users, touched)

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


def _twin(state: TailnetState, now: datetime, members: set[int], changed: set[int]) -> int | None:
    """A member of a newcomer's class that stands for it in the current peer sets: not
    changed in this advance (so the peer sets hold it as they will hold the newcomer)
    and not expired (expired nodes are in no peer set)."""
    for m in members:
        if m not in changed:
            node = state.nodes.get(m)
            if node is not None and not node.is_expired(now):
                return m
    return None


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


class _Versions:
    """The new peer sets of one advance, one object per content: classes that see
    the same peers share one :class:`PeerSet` (see "Sharing between classes" in the
    module docstring).

    A new version is looked up by its content -- which peer objects under which ids,
    and the users shown -- among the current peer sets and those made in this advance
    (by :attr:`PeerSet.digest`, which follows from the parent's in the size of the
    change, then entry by entry), so a class that comes to see what another sees
    (a user's first device, a class that grows into its team's view) joins its
    peer set. Classes that shared a version and change it alike find each other by
    that version and the entries changed, without a lookup.
    """

    __slots__ = ("_by_content", "_made", "_next")

    def __init__(self, current: Iterable[PeerSet]) -> None:
        #: (digest, size) -> peer sets with that digest (current ones, then new ones)
        self._by_content: dict[tuple[int, int], list[PeerSet]] = {}
        for ps in {id(ps): ps for ps in current}.values():
            self._index(ps)
        #: (id of a previous version, its changed entries) -> the version made of them
        self._made: dict[Hashable, PeerSet] = {}
        #: id of a previous version -> what the first class on it went on with
        #: (itself when it kept it)
        self._next: dict[int, PeerSet] = {}

    def _index(self, ps: PeerSet) -> None:
        self._by_content.setdefault((ps.digest, len(ps.peers)), []).append(ps)

    def _same(
        self, digest: int, size: int, peers: Mapping[int, Peer], users: immutables.Map[int, UserProfile]
    ) -> PeerSet | None:
        for ps in self._by_content.get((digest, size), ()):
            if ps.users == users and all(ps.peers.get(nid) is peer for nid, peer in peers.items()):
                return ps
        return None

    def next_version(self, state: TailnetState, old: PeerSet | None, entries: dict[int, Peer]) -> PeerSet:
        """A peer set for ``entries``: an equal current or new one, else a child of
        ``old`` (a new set when there is none)."""
        users = _users(state, entries.values())
        same = self._same(content_digest(entries), len(entries), entries, users)
        if same is not None:
            return self.kept(same)
        if old is None:
            made = PeerSet(immutables.Map(entries), users)
        else:
            touched = {nid for nid, p in entries.items() if old.peers.get(nid) is not p}
            touched |= {nid for nid in old.peers if nid not in entries}
            made = self._child(old, immutables.Map(entries), users, touched)
        self._index(made)
        return made

    def kept(self, old: PeerSet) -> PeerSet:
        """``old``, which a class keeps: a class that changes it starts a lineage of
        its own (the transport keeps one set of full-map pieces per lineage)."""
        first = self._next.setdefault(id(old), old)
        if first is not old and first.lineage is old.lineage:
            first.lineage = Lineage()  # made in this advance: nobody keyed anything by it yet
        return old

    def child(
        self,
        old: PeerSet,
        peers: immutables.MapMutation[int, Peer],
        users: immutables.Map[int, UserProfile],
        touched: set[int],
    ) -> PeerSet:
        """``old`` with ``touched`` changed as in ``peers``: the version another class
        made from ``old`` with the same changes, else an equal one, else a new one."""
        change = (id(old), frozenset((nid, id(peers.get(nid))) for nid in touched))
        made = self._made.get(change)
        if made is None:
            finished = peers.finish()
            same = self._same(changed_digest(old, finished, touched), len(finished), finished, users)
            if same is not None:
                made = self.kept(same)
            else:
                made = self._child(old, finished, users, touched)
                self._index(made)
            self._made[change] = made
        return made

    def _child(
        self, old: PeerSet, peers: immutables.Map[int, Peer], users: immutables.Map[int, UserProfile], touched: set[int]
    ) -> PeerSet:
        made = PeerSet(peers, users, old, frozenset(touched), fork=id(old) in self._next)
        self._next.setdefault(id(old), made)
        return made
