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
changed by identity) and at each key expiry between events.

Every change of the answer opens or closes an interval and cites its cause: the event
(seq, time, type, actor, and the envelope's reason and correlation when present), or,
for an expiry, a ``node.key_expiry_reached`` marker at the expiry instant with the seq
of the last event before it. An interval also closes and a new one opens when the
traffic stays allowed but by a different rule, so each interval names exactly one rule.
Intervals are then clipped to ``[--from, --to]`` (an interval that opened earlier keeps
its true opening event).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from eventlog import RecordedEvent, StoredRow, from_micros

from ..fold import apply
from ..state import TailnetState
from .history import History, Point, ReplayError
from .reach import Hit, explain, find_node, pair_policy, target_for

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


def _relevant(row: StoredRow, needles: tuple[bytes, ...], all_nodes: bool) -> bool:
    t = row.type
    if t == "policy.set" or t.startswith("user."):
        return True
    if not t.startswith("node."):
        return False
    return all_nodes or any(n in row.data for n in needles)


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
    src_node = find_node(named, src_ref)
    if src_node is None:
        raise ReplayError(f"no node {src_ref!r} (by id, name or IP) at seq {end.seq}")
    target = target_for(named, dst_ref)
    src_id = src_node.id
    ids = [src_id] if target.node_id is None else [src_id, target.node_id]
    needles = _needles(ids)
    by_address = target.node_id is None
    timeline = Timeline(src_node.given_name, target.label(named), port, proto_name, start, end)

    state = TailnetState()
    current: Hit | None = None
    current_text: str | None = None
    open_interval: Interval | None = None
    seen: tuple[object, ...] | None = None
    last_time: datetime | None = None

    def watched() -> list[datetime]:
        nodes = [state.nodes.get(i) for i in ids]
        if by_address:
            nodes.extend(n for n in state.nodes.values() if n.approved_routes)
        return [n.expiry for n in nodes if n is not None and n.expiry is not None]

    def evaluate(now: datetime, cause: dict[str, object]) -> None:
        nonlocal current, current_text, open_interval
        compiled = pair_policy(state, ids, routers=by_address)
        hit = explain(compiled, state, src_id, target, port=port, protocols=protocols, now=now)
        text = hit.rule(state.policy_text) if hit is not None else None
        if hit == current and text == current_text:
            return
        if open_interval is not None:
            open_interval.closed = cause
            open_interval = None
        if hit is not None and text is not None:
            open_interval = Interval(cause, text, hit.via)
            timeline.intervals.append(open_interval)
        current, current_text = hit, text

    for row in history.rows(0, end.seq):
        at = from_micros(row.recorded_at_us)
        if last_time is not None:
            for expiry in sorted(e for e in watched() if last_time < e <= at):
                marker: dict[str, object] = {
                    "seq": row.seq - 1, "time": iso(expiry), "type": "node.key_expiry_reached",
                    "actor": "system:clock",
                }
                timeline.events.append(marker)
                evaluate(expiry, marker)
        last_time = at
        if not _relevant(row, needles, by_address):
            continue
        rec = row.to_event()
        state, _ = apply(state, rec)
        key = (state.policy_text, state.users, *(state.nodes.get(i) for i in ids),
               state.nodes if by_address else None)
        if seen is not None and len(key) == len(seen) and all(a is b for a, b in zip(key, seen, strict=True)):
            continue
        seen = key
        ref = event_ref(rec)
        timeline.events.append(ref)
        evaluate(at, ref)
    # Expiries between the last event and the end point.
    if last_time is not None:
        for expiry in sorted(e for e in watched() if last_time < e <= end.now):
            marker = {"seq": end.seq, "time": iso(expiry), "type": "node.key_expiry_reached",
                      "actor": "system:clock"}
            timeline.events.append(marker)
            evaluate(expiry, marker)

    def seq_of(ref: dict[str, object] | None) -> int:
        value = ref.get("seq") if ref is not None else None
        return value if isinstance(value, int) else 0

    timeline.intervals = [
        i for i in timeline.intervals
        if seq_of(i.opened) <= end.seq and (i.closed is None or seq_of(i.closed) >= start.seq)
    ]
    timeline.events = [e for e in timeline.events if start.seq <= seq_of(e) <= end.seq]
    return timeline


