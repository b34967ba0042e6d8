"""Checkpoints: a folded state saved at a sequence number, so a restart does not refold
the whole log.

A checkpoint is ``(name, seq, event_hash, schema, state)``. It is a *cache*, not state:
deleting the file costs one refold and changes nothing else. It lives in its own SQLite
file (``checkpoints.db`` in the data directory), never in the log's database, so nothing
is ever written beside the log behind its back. With several server replicas each keeps
its own.

A checkpoint is used only when (a) its ``schema`` equals :data:`SNAPSHOT_SCHEMA` (a
change to the state's shape bumps it, and old checkpoints are simply ignored), and (b)
the log still holds the event at ``seq`` with the same chain hash (a log restored from a
backup or replaced by another one invalidates it), and (c) its MAC verifies: the
checkpoint is authenticated with HMAC-SHA256 under a key that does not live in the data
directory (derived from the log's signing key, see :mod:`eventlog.signing`), so someone
who can write the data directory cannot plant a state the log never produced (a
pre-auth key, an authorized node key for the relay). A checkpoint that fails any check
is discarded with a warning and the state is refolded from the log.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import sqlite3
import threading
from datetime import datetime
from pathlib import Path
from typing import Final

import msgspec
from immutables import Map

from eventlog import EventStore
from eventlog.events import DnsExtraRecord

from .errors import CheckpointError
from .state import (
    ApiKey,
    Node,
    PreAuthKey,
    SshApproval,
    TailnetState,
    User,
    rebuild_indexes,
    shared_node,
)

__all__ = ["SNAPSHOT_SCHEMA", "CheckpointStore", "decode_state", "encode_state"]

log = logging.getLogger(__name__)

SNAPSHOT_SCHEMA: Final = 2


class _Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    last_event_at: datetime | None
    users: list[User]
    nodes: list[Node]
    preauth_keys: list[PreAuthKey]
    api_keys: list[ApiKey]
    policy_text: str | None
    policy_sha256: str | None
    policy_source: str | None
    next_user_id: int
    next_node_id: int
    next_preauth_key_id: int
    next_api_key_id: int
    last_ipv4: str | None
    last_ipv6: str | None
    # Absent in checkpoints made before route.primary_changed existed (then empty).
    route_primaries: dict[str, int] = {}
    dns_nameservers: tuple[str, ...] | None = None
    dns_search_paths: tuple[str, ...] | None = None
    dns_magic_dns: bool | None = None
    policy_set_at: datetime | None = None
    dns_extra_records: tuple[DnsExtraRecord, ...] | None = None
    ssh_checks: dict[str, SshApproval] = {}


_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(_Snapshot)


def encode_state(state: TailnetState) -> bytes:
    """Serialise ``state`` (indexes are derived and not stored)."""
    return _encoder.encode(
        _Snapshot(
            seq=state.seq,
            last_event_at=state.last_event_at,
            users=list(state.users.values()),
            nodes=list(state.nodes.values()),
            preauth_keys=list(state.preauth_keys.values()),
            api_keys=list(state.api_keys.values()),
            policy_text=state.policy_text,
            policy_sha256=state.policy_sha256,
            policy_source=state.policy_source,
            next_user_id=state.next_user_id,
            next_node_id=state.next_node_id,
            next_preauth_key_id=state.next_preauth_key_id,
            next_api_key_id=state.next_api_key_id,
            last_ipv4=state.last_ipv4,
            last_ipv6=state.last_ipv6,
            route_primaries=dict(state.route_primaries),
            dns_nameservers=state.dns_nameservers,
            dns_search_paths=state.dns_search_paths,
            dns_magic_dns=state.dns_magic_dns,
            policy_set_at=state.policy_set_at,
            dns_extra_records=state.dns_extra_records,
            ssh_checks=dict(state.ssh_checks),
        )
    )


def decode_state(blob: bytes) -> TailnetState:
    snap = _decoder.decode(blob)
    keys = {k.id: k for k in snap.preauth_keys}
    state = TailnetState(
        seq=snap.seq,
        last_event_at=snap.last_event_at,
        users=Map({u.id: u for u in snap.users}),
        # Nodes share strings and tags as the fold's do.
        nodes=Map({n.id: shared_node(n, None if n.preauthkey_id is None else keys.get(n.preauthkey_id)) for n in snap.nodes}),
        preauth_keys=Map(keys),
        api_keys=Map({k.id: k for k in snap.api_keys}),
        policy_text=snap.policy_text,
        policy_sha256=snap.policy_sha256,
        policy_source=snap.policy_source,
        next_user_id=snap.next_user_id,
        next_node_id=snap.next_node_id,
        next_preauth_key_id=snap.next_preauth_key_id,
        next_api_key_id=snap.next_api_key_id,
        last_ipv4=snap.last_ipv4,
        last_ipv6=snap.last_ipv6,
        route_primaries=Map(snap.route_primaries),
        dns_nameservers=snap.dns_nameservers,
        dns_search_paths=snap.dns_search_paths,
        dns_magic_dns=snap.dns_magic_dns,
        policy_set_at=snap.policy_set_at,
        dns_extra_records=snap.dns_extra_records,
        ssh_checks=Map(snap.ssh_checks),
    )
    return rebuild_indexes(state)


def _mac(key: bytes, name: str, seq: int, event_hash: str, schema: int, blob: bytes) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256)
    h.update(f"{name}\n{seq}\n{event_hash}\n{schema}\n".encode())
    h.update(blob)
    return h.digest()


class CheckpointStore:
    """Checkpoints in a small SQLite file of their own (``":memory:"`` for tests).

    Args:
        mac_key: the key authenticating checkpoints: every checkpoint is written with
            a MAC and loaded only when it verifies. ``None`` writes and checks none
            (tests only: the server and the relay always pass one, or use no
            checkpoints at all).
    """

    def __init__(self, path: str | Path, *, mac_key: bytes | None = None) -> None:
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._mac_key = mac_key
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS checkpoints (name TEXT PRIMARY KEY, seq INTEGER NOT NULL, "
            "event_hash TEXT NOT NULL, schema INTEGER NOT NULL, state BLOB NOT NULL, mac BLOB)"
        )
        columns = {str(r[1]) for r in self._conn.execute("PRAGMA table_info(checkpoints)")}
        if "mac" not in columns:  # a file from before checkpoints were authenticated
            self._conn.execute("ALTER TABLE checkpoints ADD COLUMN mac BLOB")
        self.discarded = 0  # checkpoints refused by load (metrics, tests)

    def save(self, name: str, state: TailnetState, event_hash: str) -> None:
        """Replace the checkpoint called ``name`` (atomically: the old one or the new one).

        Raises:
            CheckpointError: it could not be written (a full disk); the previous
                checkpoint, if any, is still there and still valid.
        """
        blob = encode_state(state)
        mac = (
            _mac(self._mac_key, name, state.seq, event_hash, SNAPSHOT_SCHEMA, blob)
            if self._mac_key is not None
            else None
        )
        with self._lock:
            try:
                self._conn.execute(
                    "INSERT OR REPLACE INTO checkpoints (name, seq, event_hash, schema, state, mac) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (name, state.seq, event_hash, SNAPSHOT_SCHEMA, blob, mac),
                )
            except sqlite3.Error as exc:
                raise CheckpointError(f"checkpoint {name!r} at seq {state.seq} not saved: {exc}") from exc
            self._release_cache()

    def _release_cache(self) -> None:
        """Hand the pages a checkpoint went through back (the caller holds the lock).

        Writing or reading a checkpoint fills the connection's page cache with the
        snapshot's pages (up to SQLite's 2 MiB by default: 0.8 MiB at 2,000 corp nodes,
        issue 19), which nothing reads again before the next checkpoint rewrites them.
        """
        with contextlib.suppress(sqlite3.Error):  # only memory: a failure changes nothing
            self._conn.execute("PRAGMA shrink_memory")

    def load(self, name: str, store: EventStore) -> TailnetState | None:
        """The checkpoint called ``name`` if it is still valid against ``store``."""
        with self._lock:
            row = self._conn.execute(
                "SELECT seq, event_hash, schema, state, mac FROM checkpoints WHERE name = ?", (name,)
            ).fetchone()
            self._release_cache()
        if row is None:
            return None
        seq, event_hash, schema, blob = int(row[0]), str(row[1]), int(row[2]), bytes(row[3])
        if schema != SNAPSHOT_SCHEMA or seq == 0:
            return None
        if self._mac_key is not None:
            mac = bytes(row[4]) if row[4] is not None else b""
            want = _mac(self._mac_key, name, seq, event_hash, schema, blob)
            if not hmac.compare_digest(mac, want):
                self.discarded += 1
                log.warning(
                    "projection checkpoint %r at seq %d fails its MAC (forged, or written with "
                    "another key): discarded, refolding from the log",
                    name, seq,
                )
                return None
        rows = store.read_rows(seq - 1, 1)
        if not rows or rows[0].seq != seq or rows[0].hash != event_hash:
            return None
        try:
            return decode_state(blob)
        except msgspec.DecodeError:
            return None

    def close(self) -> None:
        with self._lock:
            self._conn.close()
