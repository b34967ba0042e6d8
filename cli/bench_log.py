"""``tailledger bench log``: append throughput against plain sqlite3 inserts.

Appends N events (default 100,000) through :class:`eventlog.EventLog` from many
concurrent tasks, durability on (WAL, ``synchronous=FULL``), so the writer group-commits.
Then inserts the very same rows (same columns, same bytes, hashes included) into a fresh
database with plain ``sqlite3`` ``executemany``, in transactions of the same sizes the
log's group commit produced, with the same pragmas. Prints both rates and their ratio.
Target: the log reaches at least 30% of the plain rate.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

import trio

from eventlog import Actor, ActorKind, EventLog, SQLiteEventStore
from eventlog.events import NodeRenamed

__all__ = ["bench_log_main"]


async def _append_all(path: Path, total: int, writers: int) -> tuple[float, int]:
    log = EventLog(SQLiteEventStore(path, synchronous="FULL"))
    actor = Actor(kind=ActorKind.SYSTEM, id="bench")
    per_writer = total // writers
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        start = time.perf_counter()
        async with trio.open_nursery() as inner:
            for w in range(writers):

                async def writer(w: int = w) -> None:
                    for i in range(per_writer):
                        await log.append([NodeRenamed(node_id=w, given_name=f"node-{w}-{i}")], actor=actor)

                inner.start_soon(writer)
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    log.store.close()
    return elapsed, log.commits


def _plain(src: Path, dst: Path, commits: int) -> float:
    rows = sqlite3.connect(src).execute(
        "SELECT seq, recorded_at_us, actor_kind, actor_id, type, schema, data, prev_hash, hash FROM events ORDER BY seq"
    ).fetchall()
    conn = sqlite3.connect(dst, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE events (seq INTEGER PRIMARY KEY, recorded_at_us INTEGER, actor_kind TEXT, "
        "actor_id TEXT, type TEXT, schema INTEGER, data BLOB, prev_hash TEXT, hash TEXT)"
    )
    batch = max(1, len(rows) // max(commits, 1))
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows[i : i + batch])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


def bench_log_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tailledger bench log", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--writers", type=int, default=100, help="concurrent appending tasks")
    args = parser.parse_args(argv)
    total = args.events - args.events % args.writers
    with tempfile.TemporaryDirectory() as tmp:
        log_path, plain_path = Path(tmp) / "log.db", Path(tmp) / "plain.db"
        ours, commits = trio.run(_append_all, log_path, total, args.writers)
        plain = _plain(log_path, plain_path, commits)
    ours_rate, plain_rate = total / ours, total / plain
    print(f"events appended          {total}")
    print(f"group commits            {commits}  (avg {total / commits:.1f} events/commit)")
    print(f"tailledger log           {ours_rate:,.0f} events/s  ({ours:.2f} s, durable: WAL + synchronous=FULL)")
    print(f"plain sqlite3 inserts    {plain_rate:,.0f} events/s  ({plain:.2f} s, same rows, same batches)")
    print(f"ratio                    {ours_rate / plain_rate:.1%} of plain (target >= 30%)")
    return 0
