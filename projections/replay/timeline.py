"""One pair through history: the intervals during which SRC could reach DST.

Theory of operation
-------------------
The answer for a pair changes only when one of its inputs changes: the policy text,
the users, the two nodes (or, for an address destination, the routers) -- or when a key
expiry passes, which is a moment without an event. :func:`reach_timeline` therefore
walks the verified rows from the first event to ``--to`` and decodes and folds only the
rows that can touch those inputs (policy and user events, and node events naming one of
the pair by id, found by a byte search in the stored payload before any decoding). The
partial state this fold builds is exact for everything the pair depends on, and
:func:`~projections.replay.reach.pair_policy` compiles the policy against just those
nodes. The pair is re-evaluated after each such event (skipped when none of its inputs
changed: a memo keyed by the policy text, the users and what the policy can see of
each node -- user, tags, addresses, routes, expiry -- so a rename or a hostname change
costs a dictionary lookup) and at each key expiry between events.

Rows up to the latest snapshot that still matches the chain were verified when that
snapshot was made, so the store pre-filters them (:meth:`~eventlog.EventStore.scan`,
inside SQLite for the embedded store); the rows after it are verified one by one.

Every change of the answer opens or closes an interval and cites its cause: the event
(seq, time, type, actor, and the envelope's reason and correlation when present), or,
for an expiry, a ``node.key_expiry_reached`` marker at the expiry instant with the seq
of the last event before it. An interval also closes and a new one opens when the
traffic stays allowed but by a different rule, so each interval names exactly one rule.
Intervals are then clipped to ``[--from, --to]`` (an interval that opened earlier keeps
its true opening event).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from eventlog import RecordedEvent, StoredRow, from_micros, to_micros
from eventlog.events import NodeRegistered, NodeRenamed

from ..fold import apply
from ..state import Node, TailnetState
from .history import History, Point, ReplayError
from .reach import Hit, Target, explain, find_node, pair_policy, target_for

__all__ = ["Interval", "Timeline", "event_ref", "iso", "reach_timeline"]


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def event_ref(rec: RecordedEvent) -> dict[str, object]:
    """How an answer cites an event."""
    out: dict[str, object] = {
        "seq": rec.seq,
        "time": iso(rec.recorded_at),
        "type": rec.type,
        "actor": str(rec.actor),
    }
    for extra in ("reason", "correlation_id", "correlation"):
        value = getattr(rec, extra, None)
        if value:
            out[extra] = value
    return out


@dataclass
class Interval:
    opened: dict[str, object]
    rule: str
    via: str | None
    closed: dict[str, object] | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"from": self.opened, "to": self.closed, "rule": self.rule}
        if self.via is not None:
            out["via"] = self.via
        return out


@dataclass
class Timeline:
    src: str
    dst: str
    port: int | None
    proto: str | None
    start: Point
    end: Point
    intervals: list[Interval] = field(default_factory=list)
    #: Every event that touched the pair's inputs (ticks on the drawn timeline).
    events: list[dict[str, object]] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "src": self.src,
            "dst": self.dst,
            "port": self.port,
            "intervals": [i.to_json() for i in self.intervals],
        }


def _needles(ids: Iterable[int]) -> tuple[bytes, ...]:
    return tuple(n for i in ids for n in (b'"node_id":%d,' % i, b'"node_id":%d}' % i))


def _relevant_rows(history: History, end_seq: int, needles: tuple[bytes, ...], all_nodes: bool) -> Iterator[StoredRow]:
    """The rows that can change the pair's answer, in order, up to ``end_seq``.

    Rows up to the latest trusted snapshot were verified when it was made; they are
    pre-filtered inside the store. Rows after it are verified here, one by one.
    """
    anchor = history.trusted_upto(end_seq)
    prefixes = ("policy.set", "user.", "node.", "route.") if all_nodes else ("policy.set", "user.", "route.")
    yield from history.store.scan(
        0, anchor, type_prefixes=prefixes,
        types_containing=() if all_nodes else ("node.",), contains=needles,
    )
    for row in history.rows(anchor, end_seq):
        t = row.type
        if t.startswith(prefixes) or (t.startswith("node.") and any(n in row.data for n in needles)):
            yield row


def reach_timeline(
    history: History,
    src_ref: str,
    dst_ref: str,
    *,
    port: int | None,
    protocols: tuple[int, ...],
    proto_name: str | None,
    start: Point,
    end: Point,
) -> Timeline:
    """The intervals in ``[start, end]`` during which SRC could reach DST."""
    named = history.state_at(end.seq)
    src_id = _node_id(history, named, src_ref, end.seq)
    if src_id is None:
        raise ReplayError(f"no node {src_ref!r} (by id, name or IP) up to seq {end.seq}")
    dst_id = _node_id(history, named, dst_ref, end.seq)
    target = Target(node_id=dst_id) if dst_id is not None else target_for(named, dst_ref)
    ids = [src_id] if target.node_id is None else [src_id, target.node_id]
    needles = _needles(ids)
    by_address = target.node_id is None
    timeline = Timeline(
        _name(history, named, src_id, end.seq), _name(history, named, dst_id, end.seq) if dst_id else str(target.addr),
        port, proto_name, start, end,
    )

    state = TailnetState()
    current: tuple[Hit | None, str | None] = (None, None)
    open_interval: Interval | None = None
    memo: dict[tuple[object, ...], tuple[Hit | None, str | None]] = {}
    users_version = 0
    last_users: object = state.users

    def watched() -> list[datetime]:
        nodes = [state.nodes.get(i) for i in ids]
        if by_address:
            nodes.extend(n for n in state.nodes.values() if n.approved_routes)
        return [n.expiry for n in nodes if n is not None and n.expiry is not None]

    def answer(now: datetime) -> tuple[Hit | None, str | None]:
        nodes = [state.nodes.get(i) for i in ids]
        key: tuple[object, ...] = (
            state.policy_text, users_version,
            *((None if n is None else (_policy_key(n), n.is_expired(now)))
              for n in nodes),
        )
        if by_address:
            key += tuple(
                (_policy_key(n), n.is_expired(now)) for n in state.nodes.values() if n.approved_routes
            )
        cached = memo.get(key)
        if cached is None:
            compiled = pair_policy(state, ids, routers=by_address)
            hit = explain(compiled, state, src_id, target, port=port, protocols=protocols, now=now)
            cached = memo[key] = (hit, hit.rule(state.policy_text) if hit is not None else None)
        return cached

    def evaluate(now: datetime, cause: dict[str, object]) -> None:
        nonlocal current, open_interval
        result = answer(now)
        if result == current:
            return
        if open_interval is not None:
            open_interval.closed = cause
            open_interval = None
        hit, text = result
        if hit is not None and text is not None:
            open_interval = Interval(cause, text, hit.via)
            timeline.intervals.append(open_interval)
        current = result

    def expiries(after: datetime, upto: datetime) -> None:
        for expiry in sorted(e for e in watched() if after < e <= upto):
            marker: dict[str, object] = {
                "seq": history.store.seq_at_time(to_micros(expiry)), "time": iso(expiry),
                "type": "node.key_expiry_reached", "actor": "system:clock",
            }
            timeline.events.append(marker)
            evaluate(expiry, marker)

    last_time: datetime | None = None
    for row in _relevant_rows(history, end.seq, needles, by_address):
        at = from_micros(row.recorded_at_us)
        if last_time is not None:
            expiries(last_time, at)
        last_time = at
        rec = row.to_event()
        state, _ = apply(state, rec)
        if state.users is not last_users:
            users_version += 1
            last_users = state.users
        ref = event_ref(rec)
        timeline.events.append(ref)
        evaluate(at, ref)
    if last_time is not None:
        expiries(last_time, end.now)

    def seq_of(ref: dict[str, object] | None) -> int:
        value = ref.get("seq") if ref is not None else None
        return value if isinstance(value, int) else 0

    timeline.intervals = [
        i for i in timeline.intervals
        if seq_of(i.opened) <= end.seq and (i.closed is None or seq_of(i.closed) > start.seq)
    ]
    timeline.events = [e for e in timeline.events if start.seq <= seq_of(e) <= end.seq]
    return timeline


def _policy_key(node: Node) -> tuple[object, ...]:
    """What of a node the policy can see (not its names, hostname or keys)."""
    return (node.user_id, node.tags, node.ipv4, node.ipv6, node.advertised_routes, node.approved_routes)


def _node_id(history: History, state: TailnetState, ref: str, upto: int) -> int | None:
    """A node by id, name or IP at ``upto``; else the last node that ever had that
    name or address in the history (a node deleted since is still a valid question)."""
    node = find_node(state, ref)
    if node is not None:
        return node.id
    ref = ref.strip()
    found: int | None = None
    for row in history.store.scan(0, upto, type_prefixes=("node.registered", "node.renamed")):
        event = row.to_event().event
        if isinstance(event, NodeRegistered):
            if ref in (str(event.node_id), event.given_name, event.ipv4, event.ipv6):
                found = event.node_id
        elif isinstance(event, NodeRenamed) and event.given_name == ref:
            found = event.node_id
    return found


def _name(history: History, state: TailnetState, node_id: int, upto: int) -> str:
    node = state.nodes.get(node_id)
    if node is not None:
        return node.given_name
    name = str(node_id)
    for row in history.store.scan(0, upto, type_prefixes=("node.registered", "node.renamed")):
        event = row.to_event().event
        if isinstance(event, NodeRegistered | NodeRenamed) and event.node_id == node_id:
            name = event.given_name
    return name
