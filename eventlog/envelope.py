"""The envelope every stored event travels in, and the hash chain that links them.

The envelope is not the payload. ``seq`` (the one gapless global order), the time it was
recorded, who caused it and the chain hashes live outside the event body, so an event
class never carries bookkeeping and the store can upcast payloads without touching the
chain.

Hash chain
----------
Each row stores ``hash = SHA-256(prev_hash ‖ "\\n" ‖ header ‖ "\\n" ‖ data)`` where

==========  ===========================================================================
prev_hash   the previous row's ``hash`` as 64 lower-case hex chars (``GENESIS_HASH``
            for seq 1)
header      compact JSON array ``[seq, recorded_at_us, actor_kind, actor_id, type,
            schema]``, followed by ``correlation_id, reason`` when either is not
            empty (rows written before those fields existed hash as they always did)
data        the event payload exactly as stored (JSON bytes, tag included)
==========  ===========================================================================

Hashing the *stored* bytes (not a re-encoding) keeps the chain independent of the
Python classes: upcasting an old payload at read time never changes its hash. Altering a
row breaks its own hash; removing one breaks the seq sequence and the next ``prev_hash``;
reordering breaks both. Truncating the tail, or re-hashing the whole history after an
edit, is only visible against a head kept elsewhere: the server signs its head
periodically (:mod:`eventlog.signing`) and ``tailledger log anchor`` prints it.

Cause
-----
Besides its actor, every event carries a *correlation id* shared by all the events one
request caused (a login's registration, routes and hostname; a policy change and the
approvals it triggered) and the operator's free-text *reason* (``--reason``), both
covered by the hash.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from enum import StrEnum
from typing import Final

import msgspec

from .events import AnyEvent

__all__ = [
    "GENESIS_HASH",
    "Actor",
    "ActorKind",
    "RecordedEvent",
    "chain_hash",
    "from_micros",
    "to_micros",
]

GENESIS_HASH: Final = "0" * 64


class ActorKind(StrEnum):
    """Who caused an event."""

    ADMIN = "admin"  # an operator through the local admin socket (id: unix user)
    API = "api"  # the admin HTTP API's key (id: the key's prefix, "/<owner user id>" if owned)
    #: What the API's key requests were recorded as before the kind was named ``api``
    #: (issue 17's spelling). Kept so that older logs still read and verify: the chain
    #: hash covers the stored kind, so those rows are never rewritten. Nothing new uses it.
    API_KEY = "apikey"
    OAUTH_CLIENT = "oauthclient"  # an OAuth access token of /api/v2 (id: the client id)
    NODE = "node"  # a client over the control protocol (id: its machine key hex)
    OIDC = "oidc"  # a person who logged in through OIDC (id: issuer subject)
    SYSTEM = "system"  # the server itself: policy file reload, ephemeral cleanup, expiry


class Actor(msgspec.Struct, frozen=True, kw_only=True):
    """Who caused an event: a kind and an identifier within that kind."""

    kind: ActorKind
    id: str

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.id}"

    @classmethod
    def parse(cls, text: str) -> Actor:
        """Parse ``kind:id`` as printed by ``str(actor)``."""
        kind, _, ident = text.partition(":")
        return cls(kind=ActorKind(kind), id=ident)


class RecordedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event as the log recorded it: the payload plus its envelope."""

    seq: int
    recorded_at: datetime
    actor: Actor
    type: str
    schema: int
    event: AnyEvent
    prev_hash: str
    hash: str
    #: Shared by the events one request caused ("" on events older than the field).
    correlation_id: str = ""
    #: Why, in the operator's words (``--reason``); "" when none was given.
    reason: str = ""


def to_micros(t: datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime (exact, no float)."""
    delta = t - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(us: int) -> datetime:
    """The UTC datetime ``us`` microseconds after the Unix epoch."""
    seconds, micros = divmod(us, 1_000_000)
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=micros)


_header_encoder = msgspec.json.Encoder()


def chain_hash(
    prev_hash: str,
    *,
    seq: int,
    recorded_at_us: int,
    actor_kind: str,
    actor_id: str,
    type: str,
    schema: int,
    data: bytes,
    correlation_id: str = "",
    reason: str = "",
) -> str:
    """The chain hash of one row (see the module docstring for the layout)."""
    header: tuple[object, ...] = (seq, recorded_at_us, actor_kind, actor_id, type, schema)
    if correlation_id or reason:
        header += (correlation_id, reason)
    return header_hash(prev_hash, header, data)


def header_hash(prev_hash: str, header: tuple[object, ...], data: bytes) -> str:
    """:func:`chain_hash` of a row whose header is already laid out (the store's append
    builds it once per row; keywords cost a tenth of staging a batch)."""
    # One buffer, one digest call (the same bytes as feeding the parts in turn).
    return hashlib.sha256(
        b"".join((prev_hash.encode("ascii"), b"\n", _header_encoder.encode(header), b"\n", data))
    ).hexdigest()
