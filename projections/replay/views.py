"""The answers of ``replay state|netmap|who-can-reach|diff`` and ``policy impact``.

Each function takes folded states (from :class:`~projections.replay.history.History`)
and returns plain JSON-ready values; the CLI prints them as tables or JSON. All of them
judge key expiry at the point's instant (``Point.now``) and never look at presence.

* :func:`state_view`: users, nodes (with approved and primary routes, expiry), and the
  policy in force with the event that set it; each user and node cites the event that
  last changed it (``last_change``).
* :func:`netmap_view`: :func:`projections.netmap.full_map` for the node, exactly what
  the server computes, with no presence and no ``ControlTime``.
  :func:`netmap_citations` is kept apart from it: the policy.set in force and the last
  change of the node and of each of its peers (the map itself stays byte for byte the
  server's, as the golden fixtures require).
* :func:`who_can_reach`: every node that could reach a destination, with the rule;
  an address destination is reached through its primary subnet router or an exit
  node, and hosts behind a subnet router are listed under their router. Each source
  cites the policy.set that put its rule in force and the last change of the node.
* :func:`diff_view`: what changed between two points, each change citing the events in
  the range that caused it (events naming the node, user or policy; for a reachability
  pair, the events that touched either node, the users or the policy).
* :func:`impact`: pairs gained and lost and nodes whose netmap changes if the tailnet
  ran another policy text.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from datetime import datetime

import msgspec

from eventlog import RecordedEvent
from eventlog.events import PolicyImpact, PolicySet

from ..netmap import NetmapSettings, full_map
from ..policy.ipset import prefix_str
from ..policystate import PolicyCompiler
from ..state import Node, TailnetState
from ..tailcfg import DERPMap, encode
from .history import History, Point, ReplayError
from .reach import Target, explain, explain_subnet_source, find_node, reach_pairs
from .timeline import event_ref, iso

__all__ = [
    "Citations", "diff_view", "impact", "impact_summary", "netmap_citations", "netmap_view", "state_view",
    "who_can_reach",
]

DEFAULT_SETTINGS = NetmapSettings(domain="tailnet.internal", derp_map=DERPMap(regions={}))


class Citations:
    """The events that last changed each node and user of a state, read once.

    A node's or user's last change is its ``updated_seq`` (kept by the fold). A user
    from a snapshot made before users carried it has 0 there: then the ``user.`` rows
    up to the state are scanned once (pre-filtered by the store; verified already, the
    state was folded from them). Events are read by seq, each once.
    """

    def __init__(self, history: History, state: TailnetState) -> None:
        self._history = history
        self._state = state
        self._refs: dict[int, dict[str, object] | None] = {}
        self._user_seqs: dict[int, int] | None = None

    def event(self, seq: int) -> dict[str, object] | None:
        if seq <= 0 or seq > self._state.seq:
            return None
        if seq not in self._refs:
            rows = self._history.store.read_rows(seq - 1, 1)
            self._refs[seq] = event_ref(rows[0].to_event()) if rows and rows[0].seq == seq else None
        return self._refs[seq]

    def node(self, node: Node) -> dict[str, object] | None:
        return self.event(node.updated_seq)

    def user(self, user_id: int) -> dict[str, object] | None:
        user = self._state.users.get(user_id)
        if user is not None and user.updated_seq > 0:
            return self.event(user.updated_seq)
        if self._user_seqs is None:
            self._user_seqs = {}
            for row in self._history.store.scan(0, self._state.seq, type_prefixes=("user.",)):
                uid = getattr(row.to_event().event, "user_id", None)
                if isinstance(uid, int):
                    self._user_seqs[uid] = row.seq
        return self.event(self._user_seqs.get(user_id, 0))

    def policy(self) -> dict[str, object] | None:
        rec = _policy_event(self._history, self._state)
        return event_ref(rec) if rec is not None else None


def _node_row(state: TailnetState, node: Node, primaries: dict[int, list[str]], now: datetime,
              cites: Citations) -> dict[str, object]:
    user = state.users.get(node.user_id)
    return {
        "id": node.id,
        "name": node.given_name,
        "user": user.name if user is not None else str(node.user_id),
        "tags": list(node.tags),
        "ipv4": node.ipv4,
        "ipv6": node.ipv6,
        "approved_routes": list(node.approved_routes),
        "primary_routes": primaries.get(node.id, []),
        "key_expiry": iso(node.expiry) if node.expiry is not None else None,
        "expired": node.is_expired(now),
        "last_change": cites.node(node),
    }


def _primaries(state: TailnetState) -> dict[int, list[str]]:
    compiled = PolicyCompiler().compiled(state)
    return {nid: [prefix_str(p) for p in ps] for nid, ps in compiled.primaries_by_node.items()}


def _policy_event(history: History, state: TailnetState) -> RecordedEvent | None:
    if state.policy_text is None:
        return None
    seq = history.policy_seq(state.seq)
    if seq == 0:
        return None
    return next(iter(history.events(seq - 1, seq)))


def state_view(history: History, point: Point) -> dict[str, object]:
    state = history.state_at(point.seq)
    primaries = _primaries(state)
    cites = Citations(history, state)
    policy: dict[str, object] | None = None
    rec = _policy_event(history, state)
    if rec is not None:
        policy = {**event_ref(rec), "sha256": state.policy_sha256, "source": state.policy_source}
    return {
        "at_seq": point.seq,
        "at_time": iso(point.now),
        "users": [
            {"id": u.id, "name": u.name, "display_name": u.display_name, "email": u.email,
             "last_change": cites.user(u.id)}
            for u in sorted(state.users.values(), key=lambda u: u.id)
        ],
        "nodes": [
            _node_row(state, n, primaries, point.now, cites)
            for n in sorted(state.nodes.values(), key=lambda n: n.id)
        ],
        "policy": policy,
    }


def netmap_bytes(state: TailnetState, node_id: int, now: datetime,
                 settings: NetmapSettings = DEFAULT_SETTINGS,
                 compiler: PolicyCompiler | None = None) -> bytes:
    """The node's full map as canonical JSON (what the golden fixtures hold)."""
    msg = full_map(
        state, node_id, policy=compiler or PolicyCompiler("https://control.example"),
        settings=settings, presence=lambda _nid: None, now=now,
    )
    return encode(msgspec.structs.replace(msg, control_time=None))


def netmap_view(history: History, point: Point, ref: str,
                settings: NetmapSettings = DEFAULT_SETTINGS, control_url: str = "") -> object:
    state = history.state_at(point.seq)
    node = find_node(state, ref)
    if node is None:
        raise ReplayError(f"no node {ref!r} (by id, name or IP) at seq {point.seq}")
    return msgspec.json.decode(netmap_bytes(state, node.id, point.now, settings, PolicyCompiler(control_url)))


def netmap_citations(history: History, point: Point, ref: str, netmap: object) -> dict[str, object]:
    """The events a node's map at ``point`` rests on, kept outside the map: the
    policy.set in force, the last change of the node, and of each peer the map lists."""
    state = history.state_at(point.seq)
    node = find_node(state, ref)
    if node is None:
        raise ReplayError(f"no node {ref!r} (by id, name or IP) at seq {point.seq}")
    cites = Citations(history, state)
    peer_ids = [p.get("ID") for p in (netmap.get("Peers") or [])] if isinstance(netmap, dict) else []
    peers = []
    for pid in peer_ids:
        peer = state.nodes.get(pid) if isinstance(pid, int) else None
        if peer is not None:
            peers.append({"id": peer.id, "name": peer.given_name, "last_change": cites.node(peer)})
    return {
        "at_seq": point.seq,
        "node": {"id": node.id, "name": node.given_name, "last_change": cites.node(node)},
        "policy": cites.policy(),
        "peers": peers,
    }


def who_can_reach(
    history: History, point: Point, target: Target, *, port: int | None, protocols: tuple[int, ...]
) -> dict[str, object]:
    state = history.state_at(point.seq)
    compiled = PolicyCompiler().compiled(state)
    cites = Citations(history, state)
    policy = cites.policy()
    sources: list[dict[str, object]] = []
    for nid in sorted(state.nodes):
        hit = explain(compiled, state, nid, target, port=port, protocols=protocols, now=point.now)
        if hit is None:
            continue
        entry: dict[str, object] = {"node": state.nodes[nid].given_name, "rule": hit.rule(state.policy_text)}
        if hit.via is not None:
            entry["via"] = hit.via
        sources.append({**entry, "policy": policy, "last_change": cites.node(state.nodes[nid])})
    # Hosts behind subnet routers, which enter the tailnet through their router.
    for router_id in sorted(compiled.primaries_by_node):
        hit = explain_subnet_source(compiled, state, router_id, target, port=port, protocols=protocols, now=point.now)
        if hit is not None:
            router = state.nodes[router_id]
            sources.append({"node": router.given_name, "rule": hit.rule(state.policy_text), "via": hit.via,
                            "policy": policy, "last_change": cites.node(router)})
    label = target.label(state)
    if port is not None:
        label = f"[{label}]:{port}" if ":" in label else f"{label}:{port}"
    return {"at_seq": point.seq, "dst": label, "sources": sources}


# -- diff ------------------------------------------------------------------------------


def _pairs_json(
    pairs: Iterable[tuple[tuple[int, int], frozenset[str]]], names: dict[int, str]
) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for (src, dst), labels in sorted(pairs):
        for label in sorted(labels):
            proto, _, ports = label.partition(":")
            out.append({"src": names.get(src, str(src)), "dst": names.get(dst, str(dst)),
                        "proto": proto, "ports": ports})
    return out


def _pair_delta(
    before: dict[tuple[int, int], frozenset[str]], after: dict[tuple[int, int], frozenset[str]]
) -> tuple[dict[tuple[int, int], frozenset[str]], dict[tuple[int, int], frozenset[str]]]:
    gained: dict[tuple[int, int], frozenset[str]] = {}
    lost: dict[tuple[int, int], frozenset[str]] = {}
    for key in before.keys() | after.keys():
        b, a = before.get(key, frozenset()), after.get(key, frozenset())
        if a - b:
            gained[key] = a - b
        if b - a:
            lost[key] = b - a
    return gained, lost


def _when(t: datetime | None) -> str:
    return iso(t) if t is not None else "never"


def _node_changes(
    old: Node | None, new: Node | None, then: datetime, now: datetime,
    primaries: tuple[list[str], list[str]] = ([], []),
) -> list[str]:
    if old is None and new is not None:
        return ["added"]
    if new is None:
        return ["removed"]
    assert old is not None
    out = []
    if old.given_name != new.given_name:
        out.append(f"renamed {old.given_name} -> {new.given_name}")
    if old.tags != new.tags:
        out.append(f"retagged {list(old.tags)} -> {list(new.tags)}")
    if old.node_key != new.node_key:
        out.append("re-keyed")
    if old.advertised_routes != new.advertised_routes:
        out.append(f"advertised routes {list(old.advertised_routes)} -> {list(new.advertised_routes)}")
    if old.approved_routes != new.approved_routes:
        out.append(f"approved routes {list(old.approved_routes)} -> {list(new.approved_routes)}")
    if primaries[0] != primaries[1]:
        out.append(f"primary routes {primaries[0]} -> {primaries[1]}")
    if old.expiry != new.expiry:
        out.append(f"key expiry {_when(old.expiry)} -> {_when(new.expiry)}")
    if old.is_expired(then) != new.is_expired(now):
        out.append("key expired" if new.is_expired(now) else "key valid again")
    if old.user_id != new.user_id:
        out.append(f"user {old.user_id} -> {new.user_id}")
    return out


def diff_view(history: History, start: Point, end: Point) -> dict[str, object]:
    if end.seq < start.seq:
        raise ReplayError("--to is before --from")
    before = history.state_at(start.seq)
    after = history.state_at(end.seq)
    by_node: dict[int, list[dict[str, object]]] = {}
    by_user: dict[int, list[dict[str, object]]] = {}
    policy_events: list[dict[str, object]] = []
    wide: list[dict[str, object]] = []  # policy and user events touch every pair
    for rec in history.events(start.seq, end.seq):
        ref = event_ref(rec)
        node_id = getattr(rec.event, "node_id", None)
        user_id = getattr(rec.event, "user_id", None)
        if isinstance(node_id, int):
            by_node.setdefault(node_id, []).append(ref)
        elif isinstance(user_id, int):
            by_user.setdefault(user_id, []).append(ref)
            wide.append(ref)
        if isinstance(rec.event, PolicySet):
            policy_events.append(ref)
            wide.append(ref)
    names = {n.id: n.given_name for n in before.nodes.values()}
    names.update({n.id: n.given_name for n in after.nodes.values()})

    nodes = []
    primaries_before, primaries_after = _primaries(before), _primaries(after)
    for nid in sorted(set(before.nodes) | set(after.nodes)):
        changes = _node_changes(
            before.nodes.get(nid), after.nodes.get(nid), start.now, end.now,
            (primaries_before.get(nid, []), primaries_after.get(nid, [])),
        )
        if changes:
            nodes.append({"node": names[nid], "id": nid, "changes": changes, "events": by_node.get(nid, [])})
    users = []
    for uid in sorted(set(before.users) | set(after.users)):
        old, new = before.users.get(uid), after.users.get(uid)
        if old is not None and new is not None and msgspec.structs.replace(old, updated_seq=0) == \
                msgspec.structs.replace(new, updated_seq=0):
            continue  # a user's last-change mark is not a change
        change = "added" if old is None else "removed" if new is None else f"renamed {old.name} -> {new.name}"
        name = (new or old).name  # type: ignore[union-attr]
        users.append({"user": name, "id": uid, "change": change, "events": by_user.get(uid, [])})

    policy_diff = "".join(
        difflib.unified_diff(
            (before.policy_text or "").splitlines(keepends=True),
            (after.policy_text or "").splitlines(keepends=True),
            fromfile=f"policy@{start.seq}", tofile=f"policy@{end.seq}",
        )
    )
    gained, lost = _pair_delta(reach_pairs(before, start.now), reach_pairs(after, end.now))

    def caused(pairs: dict[tuple[int, int], frozenset[str]]) -> list[dict[str, object]]:
        out = []
        for (src, dst), labels in sorted(pairs.items()):
            events = sorted(by_node.get(src, []) + by_node.get(dst, []) + wide, key=lambda e: int(str(e["seq"])))
            for row in _pairs_json([((src, dst), labels)], names):
                row["events"] = events
                out.append(row)
        return out

    return {
        "from_seq": start.seq,
        "to_seq": end.seq,
        "nodes": nodes,
        "users": users,
        "policy": {"changed": before.policy_text != after.policy_text, "diff": policy_diff,
                   "events": policy_events},
        "reach_gained": caused(gained),
        "reach_lost": caused(lost),
    }


# -- policy impact ---------------------------------------------------------------------


def impact(state: TailnetState, new_text: str, now: datetime) -> dict[str, object]:
    """What putting ``new_text`` in force would change (the text must be checked)."""
    import hashlib

    proposed = msgspec.structs.replace(
        state, policy_text=new_text, policy_sha256=hashlib.sha256(new_text.encode()).hexdigest()
    )
    names = {n.id: n.given_name for n in state.nodes.values()}
    gained, lost = _pair_delta(reach_pairs(state, now), reach_pairs(proposed, now))
    old_c, new_c = PolicyCompiler(), PolicyCompiler()
    changed = [
        names[nid] for nid in sorted(state.nodes)
        if netmap_bytes(state, nid, now, compiler=old_c) != netmap_bytes(proposed, nid, now, compiler=new_c)
    ]
    return {
        "pairs_gained": _pairs_json(gained.items(), names),
        "pairs_lost": _pairs_json(lost.items(), names),
        "netmaps_changed": changed,
    }


def impact_summary(state: TailnetState, new_text: str, now: datetime) -> PolicyImpact:
    """The summary of :func:`impact` that ``policy set`` records in its event."""
    full = impact(state, new_text, now)
    changed = full["netmaps_changed"]
    gained, lost = full["pairs_gained"], full["pairs_lost"]
    assert isinstance(changed, list) and isinstance(gained, list) and isinstance(lost, list)
    return PolicyImpact(
        against_seq=state.seq, pairs_gained=len(gained), pairs_lost=len(lost),
        netmaps_changed=len(changed), nodes=tuple(str(n) for n in changed[:50]),
    )
