"""``tailledger bench replay``: how fast the replay tool answers on a long history.

Builds a synthetic log (default 1,000,000 events: 100 users, 1,000 nodes, a policy
change every 1,000 events, the rest renames, hostname changes, retags, route
approvals, expiries and key rotations) in a temporary SQLite file, with a valid hash
chain, and measures against the targets of issue 13 (2 cores):

* full fold from zero, every row verified against the chain: >= 50,000 events/s;
* ``replay state`` and ``replay netmap`` at random past points from a fresh process
  view, using the periodic snapshots the full fold left (each verified against the
  chain before use): < 2 s each;
* ``replay reach`` for one pair over the whole history: < 10 s;
* ``log export``: >= 100,000 events/s.

It prints figures and their ratio to the targets and never fails on timing. Use
``--events`` for a quicker run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from eventlog import GENESIS_HASH, SQLiteEventStore, StoredRow, chain_hash, encode_event, to_micros
from eventlog.events import (
    AnyEvent,
    NodeExpirySet,
    NodeHostnameChanged,
    NodeKeyRotated,
    NodeRegistered,
    NodeRenamed,
    NodeTagsSet,
    PolicySet,
    RoutesAdvertised,
    RoutesApproved,
    UserCreated,
)
from eventlog.export import export_lines
from projections.replay import History, MemorySnapshots, netmap_bytes, reach_timeline

__all__ = ["bench_replay_main", "synthetic_events"]

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _policy(users: int, variant: int) -> str:
    groups = {f"group:g{g}": [f"user{u}@" for u in range(g, users, 10)] for g in range(10)}
    acls = [
        {"action": "accept", "src": [f"group:g{g}"], "dst": [f"tag:t{g}:22,443"]} for g in range(10)
    ]
    acls.append({"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]})
    # Each change opens or closes one port for one group: a realistic small edit.
    g = variant % 10
    acls[g]["dst"] = [f"tag:t{g}:22,443" + (",8080" if variant % 2 else "")]
    acls.append({"action": "accept", "src": ["group:g0"], "dst": ["10.0.0.0/8:*"]})
    return json.dumps({
        "groups": groups,
        "tagOwners": {f"tag:t{t}": ["group:g0"] for t in range(10)},
        "acls": acls,
        "autoApprovers": {"routes": {"10.0.0.0/8": ["tag:t0"]}},
    }, indent=1)


def synthetic_events(total: int, *, nodes: int = 1000, users: int = 100, seed: int = 1) -> Iterator[AnyEvent]:
    """A valid synthetic history of ``total`` events (see the module docstring)."""
    import hashlib

    rng = random.Random(seed)
    count = 0
    for u in range(users):
        if count >= total:
            return
        yield UserCreated(user_id=u + 1, name=f"user{u}")
        count += 1
    keys: dict[int, str] = {}
    for n in range(nodes):
        if count >= total:
            return
        keys[n + 1] = f"{rng.getrandbits(256):064x}"
        yield NodeRegistered(
            node_id=n + 1, machine_key=f"{rng.getrandbits(256):064x}", node_key=keys[n + 1],
            user_id=n % users + 1, hostname=f"host{n}", given_name=f"node{n}",
            ipv4=f"100.{64 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}", ipv6=f"fd7a:115c:a1e0::{n + 1:x}",
            tags=(f"tag:t{n % 10}",) if n % 3 == 0 else (), auth="cli",
        )
        count += 1
    variant = 0
    while count < total:
        count += 1
        if count % 1000 == 0:
            text = _policy(users, variant)
            variant += 1
            yield PolicySet(text=text, sha256=hashlib.sha256(text.encode()).hexdigest())
            continue
        nid = rng.randrange(nodes) + 1
        match rng.randrange(8):
            case 0 | 1:
                yield NodeHostnameChanged(node_id=nid, hostname=f"host{nid}-{count}")
            case 2:
                yield NodeRenamed(node_id=nid, given_name=f"node{nid - 1}" if rng.random() < 0.5 else f"n{nid}-{count % 97}")
            case 3:
                yield NodeTagsSet(node_id=nid, tags=(f"tag:t{rng.randrange(10)}",) if rng.random() < 0.4 else ())
            case 4:
                route = (f"10.{nid % 256}.0.0/24",)
                yield RoutesAdvertised(node_id=nid, routes=route)
            case 5:
                yield RoutesApproved(node_id=nid, routes=(f"10.{nid % 256}.0.0/24",) if rng.random() < 0.7 else ())
            case 6:
                yield NodeExpirySet(node_id=nid, expiry=T0 + timedelta(seconds=count // 10 + rng.randrange(50_000)))
            case _:
                old, keys[nid] = keys[nid], f"{rng.getrandbits(256):064x}"
                yield NodeKeyRotated(node_id=nid, old_node_key=old, node_key=keys[nid], expiry=None)


def build_log(path: Path, total: int) -> float:
    """Write the synthetic history to a new store; return the seconds it took."""
    start = time.perf_counter()
    store = SQLiteEventStore(path, synchronous="OFF")
    prev, batch = GENESIS_HASH, []
    at = to_micros(T0)
    for seq, event in enumerate(synthetic_events(total), 1):
        data = encode_event(event)
        type_ = event.type_name()
        at += 10_000  # 100 events a second
        h = chain_hash(prev, seq=seq, recorded_at_us=at, actor_kind="admin", actor_id="bench",
                       type=type_, schema=event.SCHEMA, data=data)
        batch.append(StoredRow(seq, at, "admin", "bench", type_, event.SCHEMA, data, prev, h))
        prev = h
        if len(batch) == 20_000:
            store.insert_rows(batch)
            batch = []
    if batch:
        store.insert_rows(batch)
    store.close()
    return time.perf_counter() - start


def bench_replay_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tailledger bench replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="length of the synthetic log")
    parser.add_argument("--points", type=int, default=5, help="random past points for state/netmap")
    parser.add_argument("--snapshot-every", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="tailledger-bench-replay-") as tmp:
        path = Path(tmp) / "ledger.db"
        print(f"building a synthetic log of {args.events:,} events …", flush=True)
        built = build_log(path, args.events)
        print(f"  built in {built:.1f} s")
        store = SQLiteEventStore(path, read_only=True, immutable=True)
        snapshots = MemorySnapshots()
        rows: list[tuple[str, str, str, str]] = []

        def row(label: str, value: str, target: str, ratio: float) -> None:
            rows.append((label, value, target, f"{ratio:.2f}x"))

        history = History(store, snapshots=snapshots, snapshot_every=args.snapshot_every)
        t, cpu = time.perf_counter(), time.process_time()
        history.state_at(history.head.seq, from_zero=True)
        fold_s, fold_cpu = time.perf_counter() - t, time.process_time() - cpu
        # Leave the periodic snapshots (a from-zero fold does not): one more pass does.
        history = History(store, snapshots=snapshots, snapshot_every=args.snapshot_every)
        history.state_at(history.head.seq)
        rate = args.events / fold_s
        row("full fold from zero (verified)",
            f"{rate:,.0f} events/s ({args.events / fold_cpu:,.0f} per CPU-s)", ">= 50,000 events/s", rate / 50_000)
        busy = [f"fold: {fold_cpu / fold_s:.0%} of one core"]

        state_times, netmap_times = [], []
        for _ in range(args.points):
            seq = rng.randrange(1, history.head.seq + 1)
            fresh = History(store, snapshots=snapshots, snapshot_every=args.snapshot_every)
            t = time.perf_counter()
            point = fresh.point_at_seq(seq)
            state = fresh.state_at(seq)
            state_times.append(time.perf_counter() - t)
            node = rng.choice(sorted(state.nodes))
            fresh = History(store, snapshots=snapshots, snapshot_every=args.snapshot_every)
            t = time.perf_counter()
            state = fresh.state_at(seq)
            netmap_bytes(state, node, point.now)
            netmap_times.append(time.perf_counter() - t)
        worst = max(state_times)
        row(f"state at a random point (worst of {args.points})", f"{worst:.2f} s (median {statistics.median(state_times):.2f})",
            "< 2 s", 2 / worst if worst else float("inf"))
        worst = max(netmap_times)
        row(f"netmap at a random point (worst of {args.points})", f"{worst:.2f} s (median {statistics.median(netmap_times):.2f})",
            "< 2 s", 2 / worst if worst else float("inf"))

        # node10 (user10, group:g0, untagged) -> node3 (retagged now and then; tag:t0 and
        # group:g0 on port 22 allowed): a pair whose answer changes over the history.
        src, dst = 11, 4
        fresh = History(store, snapshots=snapshots, snapshot_every=args.snapshot_every)
        t = time.perf_counter()
        timeline = reach_timeline(
            fresh, str(src), str(dst), port=22, protocols=(6,), proto_name="tcp",
            start=fresh.point_at_seq(0), end=fresh.point(None),
        )
        reach_s = time.perf_counter() - t
        row(f"reach for one pair, whole history ({len(timeline.intervals)} intervals)", f"{reach_s:.2f} s",
            "< 10 s", 10 / reach_s if reach_s else float("inf"))

        out = Path(tmp) / "export.jsonl"
        t, cpu = time.perf_counter(), time.process_time()
        with out.open("wb") as fh:
            for line in export_lines(store):
                fh.write(line)
        export_s, export_cpu = time.perf_counter() - t, time.process_time() - cpu
        busy.append(f"export: {export_cpu / export_s:.0%} of one core")
        rate = args.events / export_s
        row("log export", f"{rate:,.0f} events/s ({args.events / export_cpu:,.0f} per CPU-s)",
            ">= 100,000 events/s", rate / 100_000)
        store.close()

    width = [max(len(r[i]) for r in [*rows, ("Measure", "Figure", "Target", "Ratio")]) for i in range(4)]
    for r in [("Measure", "Figure", "Target", "Ratio"), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)).rstrip())
    print("(ratio > 1 meets the target; figures only, nothing is asserted)")
    # On a shared machine the wall clock includes waiting for a core: say how much of
    # one core the process got, so a low figure can be told apart from a slow replay.
    print("CPU share while measuring: " + ", ".join(busy))
    return 0
