"""The log as JSON Lines: export, verified reading, and import into a fresh store.

Format (the ``replay-fixtures`` format): one recorded event per line, a JSON object
``{"seq", "recorded_at_us", "actor", "type", "schema", "data", "prev_hash", "hash"}``
plus ``correlation_id`` and ``reason`` when the envelope has them, where ``data`` is the stored payload *byte for byte* (it is copied into the line as raw
JSON, never re-encoded), so every line can be checked against its hash with
:func:`~eventlog.envelope.chain_hash` by anyone, with any JSON library that keeps the
payload's bytes (or, as the fixture tests do, with msgspec, whose compact encoding
round-trips the payloads this log stores).

Theory of operation: :func:`export_lines` pages through the store (constant memory,
one page of rows at a time) and yields one encoded line per row. :func:`read_export`
is the inverse: it streams a file line by line, recomputes the chain as it goes and
raises :class:`~eventlog.errors.ChainError` naming the first line whose link or hash
fails, so a reader never sees an event it could not verify. :func:`import_export`
feeds those verified rows to :meth:`EventStore.import_rows`, which writes them
unchanged (same seq, time, actor and hashes) into an empty store; the result ends with
the export's head hash.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Final

import msgspec

from .envelope import GENESIS_HASH, Actor, chain_hash
from .errors import ChainError, EventLogError
from .rows import Head, StoredRow
from .store import EventStore

__all__ = ["ExportLine", "export_lines", "import_export", "read_export", "row_line"]


class ExportLine(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One line of an export (field order is the line's key order)."""

    seq: int
    recorded_at_us: int
    actor: str
    type: str
    schema: int
    data: msgspec.Raw
    prev_hash: str
    hash: str
    correlation_id: str = ""
    reason: str = ""


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(ExportLine)


def row_line(row: StoredRow) -> bytes:
    """The export line of one stored row (without the trailing newline)."""
    return _encoder.encode(
        ExportLine(
            seq=row.seq,
            recorded_at_us=row.recorded_at_us,
            actor=f"{row.actor_kind}:{row.actor_id}",
            type=row.type,
            schema=row.schema,
            data=msgspec.Raw(row.data),
            prev_hash=row.prev_hash,
            hash=row.hash,
            correlation_id=row.correlation_id,
            reason=row.reason,
        )
    )


def export_lines(
    store: EventStore, *, after_seq: int = 0, upto_seq: int | None = None, page: int = 5000
) -> Iterator[bytes]:
    """Lines (newline-terminated) for the events ``after_seq < seq <= upto_seq``."""
    for row in store.iter_rows(after_seq, page):
        if upto_seq is not None and row.seq > upto_seq:
            return
        yield row_line(row) + b"\n"


def read_export(
    lines: Iterable[bytes], *, start_hash: str | None = None
) -> Iterator[StoredRow]:
    """Verified rows from export lines.

    The first line may start anywhere (an export ``--from X``); its ``prev_hash`` is
    taken as given unless ``start_hash`` says what it must be (``GENESIS_HASH`` when the
    first line is seq 1). Every later line must link to the one before it.

    Raises:
        ChainError: a line does not parse, does not follow its predecessor, or its
            content does not match its hash (``seq`` names it; line numbers when the
            seq itself is unreadable).
    """
    prev: str | None = start_hash
    expected_seq: int | None = None
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            line = _decoder.decode(raw)
            actor = Actor.parse(line.actor)
        except (msgspec.DecodeError, ValueError) as exc:
            raise ChainError(expected_seq or number, f"line {number} is not an export line: {exc}") from None
        if expected_seq is None and prev is None:
            prev = line.prev_hash
        elif expected_seq is None and line.seq != 1 and prev == GENESIS_HASH:
            raise ChainError(line.seq, "the export does not start at seq 1")
        if expected_seq is not None and line.seq != expected_seq:
            raise ChainError(expected_seq, f"missing: expected seq {expected_seq}, found {line.seq}")
        if line.prev_hash != prev:
            raise ChainError(line.seq, "prev_hash does not match the previous event's hash")
        data = bytes(line.data)
        computed = chain_hash(
            line.prev_hash, seq=line.seq, recorded_at_us=line.recorded_at_us,
            actor_kind=actor.kind.value, actor_id=actor.id, type=line.type,
            schema=line.schema, data=data, correlation_id=line.correlation_id, reason=line.reason,
        )
        if computed != line.hash:
            raise ChainError(line.seq, "content does not match its hash (altered)")
        yield StoredRow(
            line.seq, line.recorded_at_us, actor.kind.value, actor.id, line.type,
            line.schema, data, line.prev_hash, line.hash, line.correlation_id, line.reason,
        )
        prev = line.hash
        expected_seq = line.seq + 1


def open_lines(path: Path) -> Iterator[bytes]:
    """The lines of an export file, read lazily (``-`` is not supported: seekless)."""
    with path.open("rb") as fh:
        yield from _lines(fh)


def _lines(fh: BinaryIO) -> Iterator[bytes]:
    yield from fh


def import_export(
    path: Path,
    store: EventStore,
    *,
    batch: int = 5000,
    progress: Callable[[int], None] | None = None,
) -> Head:
    """Write a verified export from seq 1 into the empty ``store``; return its head.

    Raises:
        ChainError: the export does not verify (nothing after the bad line is written;
            the caller discards the partial store; PostgreSQL keeps nothing at all).
        EventLogError: the store is not empty, or a write failed.
    """
    if store.head().seq != 0:
        raise EventLogError("the target event log is not empty")

    def counted(rows: Iterable[StoredRow]) -> Iterator[StoredRow]:
        for n, row in enumerate(rows, 1):
            yield row
            if progress is not None and n % batch == 0:
                progress(n)

    count = store.import_rows(counted(read_export(open_lines(path), start_hash=GENESIS_HASH)), batch=batch)
    if progress is not None and count:
        progress(count)
    return store.head()
