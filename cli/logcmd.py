"""``tailledger log show|tail|verify``: read the log file directly (read-only).

These commands open the database themselves instead of asking the server, so they work
whether or not a server is running, and an auditor can run them on a copy of the file.
"""

from __future__ import annotations

import sys
import time

import msgspec

from eventlog import EventLogError, RecordedEvent, SQLiteEventStore

from .config import Config
from .output import print_json, terminal_safe

__all__ = ["show", "tail", "verify"]


def _open(config: Config) -> SQLiteEventStore:
    path = config.database_path
    if not path.exists():
        raise SystemExit(f"tailledger: no event log at {path}")
    try:
        return SQLiteEventStore(path, read_only=True)
    except EventLogError as exc:
        raise SystemExit(f"tailledger: {exc}") from None


def _line(rec: RecordedEvent) -> str:
    payload = msgspec.to_builtins(rec.event)
    assert isinstance(payload, dict)
    payload.pop("type", None)
    fields = " ".join(f"{k}={msgspec.json.encode(v).decode()}" for k, v in payload.items())
    at = rec.recorded_at.isoformat(timespec="seconds").replace("+00:00", "Z")
    why = f"  reason={msgspec.json.encode(rec.reason).decode()}" if rec.reason else ""
    return terminal_safe(f"{rec.seq:>6}  {at}  {rec.actor!s:<20} {rec.type:<24} {fields}{why}")


def _json(rec: RecordedEvent) -> dict[str, object]:
    return {
        "seq": rec.seq,
        "recorded_at": rec.recorded_at.isoformat().replace("+00:00", "Z"),
        "actor": str(rec.actor),
        "correlation_id": rec.correlation_id,
        "reason": rec.reason,
        "type": rec.type,
        "schema": rec.schema,
        "event": msgspec.to_builtins(rec.event),
        "prev_hash": rec.prev_hash,
        "hash": rec.hash,
    }


def show(config: Config, output: str, *, after: int, limit: int, type_prefix: str | None) -> int:
    store = _open(config)
    events = [e for e in store.read(after, limit) if not type_prefix or e.type.startswith(type_prefix)]
    if output == "json":
        print_json([_json(e) for e in events])
    else:
        for e in events:
            print(_line(e))
    return 0


def tail(config: Config, output: str, *, after: int | None, type_prefix: str | None) -> int:
    store = _open(config)
    seq = store.head().seq if after is None else after
    try:
        while True:
            events = store.read(seq, 1000)
            for e in events:
                if not type_prefix or e.type.startswith(type_prefix):
                    if output == "json":
                        sys.stdout.write(msgspec.json.encode(_json(e)).decode() + "\n")
                    else:
                        print(_line(e))
                seq = e.seq
            sys.stdout.flush()
            if not events:
                time.sleep(0.5)
    except KeyboardInterrupt:
        return 0


def verify(config: Config, output: str) -> int:
    store = _open(config)
    report = store.verify()
    if output == "json":
        print_json(
            {
                "ok": report.ok,
                "events": report.count,
                "head_seq": report.head_seq,
                "head_hash": report.head_hash,
                "first_bad": report.first_bad,
                "reason": report.reason,
            }
        )
    elif report.ok:
        print(f"OK: {report.count} events, chain intact")
        print(f"head: seq {report.head_seq} hash {report.head_hash}")
        print("(keep this head hash elsewhere to detect a truncated log later)")
    else:
        print(f"BROKEN at event {report.first_bad}: {report.reason}")
        print(f"the {report.count} events before it verify; last good hash {report.head_hash}")
    return 0 if report.ok else 1
