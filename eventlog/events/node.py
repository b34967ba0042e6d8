"""Node events: the life of one machine in the tailnet.

Keys are stored as the lower-case hex of their 32 bytes, without the ``nodekey:``-style
prefixes of the wire format. Addresses are plain strings (``100.64.0.1``,
``fd7a:115c:a1e0::1``): the allocation decision was made once, when the command was
decided, and replay reads it back instead of deciding again.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from .base import Event

__all__ = [
    "NodeDeleted",
    "NodeExpirySet",
    "NodeHostnameChanged",
    "NodeKeyRotated",
    "NodeLoggedOut",
    "NodeRegistered",
    "NodeRegistrationRejected",
    "NodeRenamed",
    "NodeTagsSet",
]


class NodeRegistered(Event, frozen=True, kw_only=True, tag="node.registered"):
    """A machine joined the tailnet.

    ``user_id`` is the owner; a tagged node (``tags`` non-empty) is owned by its tags and
    has ``user_id`` set to the user who registered it, for the audit trail only.
    ``auth`` says how: ``"preauthkey"`` (with ``preauthkey_id``), ``"cli"`` (an admin
    approved an interactive request), ``"web"`` (an admin approved it on the
    registration page) or ``"oidc"`` (its user signed in with the identity provider).
    """

    node_id: int
    machine_key: str
    node_key: str
    user_id: int
    hostname: str
    given_name: str
    ipv4: str | None
    ipv6: str | None
    tags: tuple[str, ...] = ()
    ephemeral: bool = False
    expiry: datetime | None = None
    auth: str = "preauthkey"
    preauthkey_id: int | None = None
    os: str = ""


class NodeKeyRotated(Event, frozen=True, kw_only=True, tag="node.key_rotated"):
    """The node replaced its WireGuard key (``tailscale up --force-reauth``, expiry)."""

    node_id: int
    old_node_key: str
    node_key: str
    expiry: datetime | None = None


class NodeRenamed(Event, frozen=True, kw_only=True, tag="node.renamed"):
    """An admin gave the node a new MagicDNS name."""

    node_id: int
    given_name: str


class NodeHostnameChanged(Event, frozen=True, kw_only=True, tag="node.hostname_changed"):
    """The machine reported a new OS hostname (the given name is unaffected)."""

    node_id: int
    hostname: str


class NodeTagsSet(Event, frozen=True, kw_only=True, tag="node.tags_set"):
    """The node's tags were replaced. Empty tags return ownership to its user: to
    ``user_id`` when it is set (schema 2; a node registered with a tags-only key has no
    user to return to), else to the user who registered it."""

    SCHEMA: ClassVar[int] = 2

    node_id: int
    tags: tuple[str, ...]
    user_id: int | None = None


class NodeExpirySet(Event, frozen=True, kw_only=True, tag="node.expiry_set"):
    """The node key's expiry changed; ``None`` means it never expires."""

    node_id: int
    expiry: datetime | None


class NodeLoggedOut(Event, frozen=True, kw_only=True, tag="node.logged_out"):
    """The client logged out: its key expired at ``at``."""

    node_id: int
    at: datetime


class NodeDeleted(Event, frozen=True, kw_only=True, tag="node.deleted"):
    """The node left the tailnet for good. ``reason``: admin, ephemeral, logout."""

    node_id: int
    reason: str = "admin"


class NodeRegistrationRejected(Event, frozen=True, kw_only=True, tag="node.registration_rejected"):
    """An admin refused a machine's interactive registration request.

    The request itself was never an event (anyone who reaches the control port can
    make one; it waited in a side table, see :mod:`eventlog.sidetables`); its refusal
    is, with who refused it (the actor) and why (the envelope's reason, from
    ``--reason``). ``request_id`` is the id of its AuthURL, as ``tailledger nodes
    pending`` listed it; ``source`` is the address it came from. Nothing in the
    tailnet changes: no node exists for the machine.
    """

    request_id: str
    machine_key: str
    node_key: str
    hostname: str = ""
    source: str = ""
