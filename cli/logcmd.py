"""``tailledger log show|tail|verify|pubkey|anchor``: read the log directly (read-only),
from its SQLite file or its PostgreSQL database.

These commands open the database themselves instead of asking the server, so they work
whether or not a server is running, and an auditor can run them on a copy of the file.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import msgspec

from eventlog import EventLogError, EventStore, RecordedEvent, SQLiteEventStore
from eventlog.audit import audit_log
from eventlog.signing import SignedCheckpoint, parse_anchor, read_anchor

from .audit import SigningKeyError, anchor_file, trusted_public_key
from .config import Config, ConfigError
from .output import print_json, terminal_safe
from .storage import open_store

__all__ = ["anchor", "pubkey", "show", "tail", "verify"]


def _open(config: Config, *, follow: bool = False) -> EventStore:
    """The log, read-only. A SQLite log without a WAL file has no server writing it: it is
    opened immutable, so reading it creates nothing in the data directory (as ``replay``);
    ``follow`` (``log tail``) reads through the WAL to see what is appended."""
    try:
        path = config.database_path
        if not follow and config.database.type == "sqlite" and path.exists() and not Path(f"{path}-wal").exists():
            return SQLiteEventStore(path, read_only=True, immutable=True)
        return open_store(config, read_only=True)
    except (EventLogError, ConfigError) as exc:
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
    with contextlib.closing(_open(config)) as store:
        return _show(store, output, after=after, limit=limit, type_prefix=type_prefix)


def _show(store: EventStore, output: str, *, after: int, limit: int, type_prefix: str | None) -> int:
    events = [e for e in store.read(after, limit) if not type_prefix or e.type.startswith(type_prefix)]
    if output == "json":
        print_json([_json(e) for e in events])
    else:
        for e in events:
            print(_line(e))
    return 0


def tail(config: Config, output: str, *, after: int | None, type_prefix: str | None) -> int:
    with contextlib.closing(_open(config, follow=True)) as store:
        return _tail(store, output, after=after, type_prefix=type_prefix)


def _tail(store: EventStore, output: str, *, after: int | None, type_prefix: str | None) -> int:
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


def _anchors(files: list[str]) -> list[SignedCheckpoint]:
    anchors: list[SignedCheckpoint] = []
    for name in files:
        try:
            text = Path(name).read_text()
        except OSError as exc:
            raise SystemExit(f"tailledger: --anchor: cannot read {name}: {exc.strerror}") from None
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                anchors.append(parse_anchor(line))
            except ValueError as exc:
                raise SystemExit(f"tailledger: --anchor: {name}:{number}: {exc}") from None
    return anchors


def _public_key(config: Config, override: str | None) -> str | None:
    try:
        return trusted_public_key(config, override)
    except SigningKeyError as exc:
        raise SystemExit(f"tailledger: {exc}") from None


def verify(config: Config, output: str, *, pubkey: str | None = None, anchor_files: list[str] | None = None) -> int:
    with contextlib.closing(_open(config)) as store:
        return _verify(store, config, output, pubkey=pubkey, anchor_files=anchor_files)


def _verify(
    store: EventStore, config: Config, output: str, *, pubkey: str | None, anchor_files: list[str] | None
) -> int:
    public_key = _public_key(config, pubkey)
    anchors = _anchors(anchor_files or [])
    kept = read_anchor(anchor_file(config))  # the server keeps its newest one beside the key
    if kept is not None:
        anchors.append(kept)
    report = audit_log(store, public_key=public_key, anchors=anchors)
    latest = report.latest
    if output == "json":
        print_json(
            {
                "ok": report.ok,
                "events": report.events,
                "head_seq": report.head_seq,
                "head_hash": report.head_hash,
                "signed_checkpoints": report.checkpoints,
                "anchors": report.anchors,
                "signatures_checked": report.signatures_checked,
                "public_key": public_key,
                "latest_signed_seq": latest.seq if latest else None,
                "first_bad": report.first_bad,
                "reason": report.reason,
                "problems": [{"seq": p.seq, "reason": p.reason} for p in report.problems],
            }
        )
    elif report.ok:
        print(f"OK: {report.events} events, chain intact")
        print(f"head: seq {report.head_seq} hash {report.head_hash}")
        if not report.signatures_checked:
            print("signatures NOT checked: no public key (give --pubkey or set audit.public_key)")
        elif latest is None:
            print("no signed checkpoint yet: a re-hashed or truncated log would not be detected")
        else:
            print(
                f"{report.checkpoints} signed checkpoints verify (key {public_key}); the newest "
                f"covers seq {latest.seq}, {report.head_seq - latest.seq} events after it are unsigned"
            )
        if report.anchors:
            print(f"{report.anchors} anchors match")
    else:
        print(f"BROKEN at event {report.first_bad}: {report.reason}")
        for problem in report.problems[1:]:
            print(f"  also from event {problem.seq}: {problem.reason}")
    return 0 if report.ok else 1


def pubkey(config: Config, output: str) -> int:
    key = _public_key(config, None)
    if key is None:
        raise SystemExit(
            f"tailledger: no public key: {config.audit.signing_key_file} cannot be read and "
            "audit.public_key is not set"
        )
    if output == "json":
        print_json({"public_key": key, "signing_key_file": config.audit.signing_key_file})
    else:
        print(key)
    return 0


def anchor(config: Config, output: str) -> int:
    with contextlib.closing(_open(config)) as store:
        latest = store.last_signed_checkpoint()
    if latest is None:
        raise SystemExit("tailledger: the log has no signed checkpoint yet (try 'tailledger log checkpoint')")
    key = _public_key(config, None)
    if key is not None and not latest.verifies(key):
        raise SystemExit(
            f"tailledger: the newest signed checkpoint ({latest.n}) does not verify against {key}; "
            "run 'tailledger log verify'"
        )
    if output == "json":
        print_json(msgspec.to_builtins(latest) | {"anchor": latest.anchor_line()})
    else:
        print(latest.anchor_line())
    return 0
