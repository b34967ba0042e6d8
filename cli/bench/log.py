"""``tailledger bench log``: append throughput against plain inserts.

``--backend sqlite`` (the default) compares with plain sqlite3; ``--backend postgres
--dsn DSN`` runs the same against PostgreSQL (an empty database the bench may fill)
and compares with plain psycopg ``executemany`` of the same rows in transactions of
the same sizes (target: at least 50% of the plain rate).

Appends N events (default 100,000) through :class:`eventlog.EventLog` from many
concurrent tasks, durability on (WAL, ``synchronous=FULL``), so the writer group-commits.
Then inserts the very same rows (same columns, same bytes, hashes included) into a fresh
database with plain ``sqlite3`` ``executemany``, in transactions of the same sizes the
log's group commit produced, with the same pragmas. Prints both rates and their ratio,
of the median of ``--rounds`` rounds (a commit's fsync varies from run to run).
Target: the log reaches at least 30% of the plain rate.

Then where the log's time went: inside the store's append (on the event loop's thread
while it is otherwise idle, else in the writer's thread: how many commits ran where is
printed), split into encoding and chain-hashing the events (measured again on the same
events) and the database's part (insert and commit, the fsync); the rest is the trio
side (queueing the requests, handing a batch to the thread and back, waking each
appender).
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import trio

from eventlog import Actor, ActorKind, EventLog, EventStore, SQLiteEventStore
from eventlog.codec import encode_event
from eventlog.envelope import chain_hash
from eventlog.events import NodeRenamed

__all__ = ["bench_log_main"]


class _Timed:
    """The store, with the time spent in its appends summed."""

    def __init__(self, store: EventStore) -> None:
        self._store = store
        self.in_store = 0.0

    def append_batch(self, requests: Sequence[Any], now_us: int) -> Any:
        return self._timed(self._store.append_batch, requests, now_us)

    def try_append_batch(self, requests: Sequence[Any], now_us: int) -> Any:
        return self._timed(self._store.try_append_batch, requests, now_us)

    def _timed(self, append: Callable[[Sequence[Any], int], Any], requests: Sequence[Any], now_us: int) -> Any:
        start = time.perf_counter()
        try:
            return append(requests, now_us)
        finally:
            self.in_store += time.perf_counter() - start

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def _encode_and_hash(total: int, writers: int) -> float:
    """The CPU the store spends encoding and chain-hashing the bench's events."""
    per_writer = total // writers
    events = [NodeRenamed(node_id=w, given_name=f"node-{w}-{i}") for i in range(per_writer) for w in range(writers)]
    prev = "0" * 64
    start = time.perf_counter()
    for seq, event in enumerate(events, 1):
        data = encode_event(event)
        prev = chain_hash(
            prev, seq=seq, recorded_at_us=seq, actor_kind="system", actor_id="bench", type=event.type_name(),
            schema=event.SCHEMA, data=data, correlation_id="0" * 16, reason="",
        )
    return time.perf_counter() - start


def _where_the_time_goes(total_s: float, in_store_s: float, encode_s: float, database: str) -> None:
    encode_s = min(encode_s, in_store_s)
    parts = [
        (f"store: {database} insert + commit", in_store_s - encode_s),
        ("store: encode + chain hash", encode_s),
        ("trio: queue, hand-offs, wake-ups", max(0.0, total_s - in_store_s)),
    ]
    print("where the log's time goes")
    for label, seconds in parts:
        print(f"  {label:<38} {seconds:6.2f} s  {seconds / total_s:4.0%}")


async def _append_all(store: EventStore, total: int, writers: int) -> tuple[float, int, int]:
    log = EventLog(store)
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
    return elapsed, log.commits, log.commits_at_once


def _plain(src: Path, dst: Path, commits: int) -> float:
    # Every column the log stores, its envelope's correlation id and reason included
    # (the log's own index on recorded_at_us is left out: plain inserts).
    rows = sqlite3.connect(src).execute(
        "SELECT seq, recorded_at_us, actor_kind, actor_id, type, schema, data, prev_hash, hash, "
        "correlation_id, reason FROM events ORDER BY seq"
    ).fetchall()
    conn = sqlite3.connect(dst, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE events (seq INTEGER PRIMARY KEY, recorded_at_us INTEGER, actor_kind TEXT, "
        "actor_id TEXT, type TEXT, schema INTEGER, data BLOB, prev_hash TEXT, hash TEXT, "
        "correlation_id TEXT, reason TEXT)"
    )
    batch = max(1, len(rows) // max(commits, 1))
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows[i : i + batch])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


def _plain_postgres(dsn: str, commits: int) -> float:
    """Plain psycopg inserts of the log's rows into a table of the same shape."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT seq, recorded_at_us, actor_kind, actor_id, type, schema, data, prev_hash, hash, "
            "correlation_id, reason FROM events ORDER BY seq"
        ).fetchall()
        conn.execute("DROP TABLE IF EXISTS bench_plain_events")
        conn.execute("CREATE TABLE bench_plain_events (LIKE events INCLUDING ALL)")
        batch = max(1, len(rows) // max(commits, 1))
        start = time.perf_counter()
        try:
            for i in range(0, len(rows), batch):
                with conn.transaction(), conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO bench_plain_events VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        rows[i : i + batch],
                    )
            return time.perf_counter() - start
        finally:
            conn.execute("DROP TABLE bench_plain_events")


def _bench_postgres(dsn: str, total: int, writers: int) -> tuple[float, int, float, float]:
    from eventlog.pgstore import PostgresEventStore

    store = PostgresEventStore(dsn)
    if store.head().seq != 0:
        store.close()
        raise SystemExit("tailledger bench log: the database's event log is not empty (give an empty database)")
    timed = _Timed(store)
    ours, commits, _ = trio.run(_append_all, cast(EventStore, timed), total, writers)
    return ours, commits, _plain_postgres(dsn, commits), timed.in_store


def bench_log_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tailledger bench log", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--writers", type=int, default=100, help="concurrent appending tasks")
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--dsn", help="postgres: the connection string of an empty database")
    parser.add_argument("--rounds", type=int, default=3,
                        help="sqlite: rounds of both sides, alternating; the median ratio's figures are shown (default 3)")
    args = parser.parse_args(argv)
    total = args.events - args.events % args.writers
    if args.backend == "postgres":
        if not args.dsn:
            parser.error("--backend postgres needs --dsn (an empty database the bench may fill)")
        ours, commits, plain, in_store = _bench_postgres(args.dsn, total, args.writers)
        ours_rate, plain_rate = total / ours, total / plain
        print(f"events appended          {total}")
        print(f"group commits            {commits}  (avg {total / commits:.1f} events/commit)")
        print(f"tailledger log           {ours_rate:,.0f} events/s  ({ours:.2f} s, PostgreSQL)")
        print(f"plain psycopg inserts    {plain_rate:,.0f} events/s  ({plain:.2f} s, same rows, same batches)")
        print(f"ratio                    {ours_rate / plain_rate:.1%} of plain (target >= 50%)")
        _where_the_time_goes(ours, in_store, _encode_and_hash(total, args.writers), "PostgreSQL")
        return 0
    # A commit's fsync varies a lot from run to run on a shared VM's disk: the rounds
    # alternate the two sides and the figures are those of the round with the median
    # ratio (each round's ratio is printed too).
    rounds: list[tuple[float, int, float, float, int]] = []
    for _ in range(max(1, args.rounds)):
        with tempfile.TemporaryDirectory() as tmp:
            log_path, plain_path = Path(tmp) / "log.db", Path(tmp) / "plain.db"
            timed = _Timed(SQLiteEventStore(log_path, synchronous="FULL"))
            ours_s, commits_n, at_once = trio.run(_append_all, cast(EventStore, timed), total, args.writers)
            rounds.append((ours_s, commits_n, _plain(log_path, plain_path, commits_n), timed.in_store, at_once))
    ratios = [r[2] / r[0] for r in rounds]
    ours, commits, plain, in_store, at_once = rounds[sorted(range(len(rounds)), key=ratios.__getitem__)[len(rounds) // 2]]
    ours_rate, plain_rate = total / ours, total / plain
    print(f"rounds                   {len(rounds)}  (ratios {', '.join(f'{r:.1%}' for r in ratios)}; the median's figures below)")
    print(f"events appended          {total}")
    print(f"group commits            {commits}  (avg {total / commits:.1f} events/commit)")
    print(f"  on the loop's thread   {at_once}  (the rest through the writer's thread)")
    print(f"tailledger log           {ours_rate:,.0f} events/s  ({ours:.2f} s, durable: WAL + synchronous=FULL)")
    print(f"plain sqlite3 inserts    {plain_rate:,.0f} events/s  ({plain:.2f} s, same rows, same batches)")
    print(f"ratio                    {ours_rate / plain_rate:.1%} of plain (target >= 30%)")
    _where_the_time_goes(ours, in_store, _encode_and_hash(total, args.writers), "SQLite")
    return 0
