"""Pre-auth key and API key events.

Secrets never enter the log: a key is shown to the admin once, and the log keeps only its
public prefix and a SHA-256 hash of the secret part, which is enough to authenticate it.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from ..upcast import Payload, register_upcaster
from .base import Event

__all__ = [
    "ApiKeyCreated",
    "ApiKeyDeleted",
    "ApiKeyExpired",
    "PreAuthKeyCreated",
    "PreAuthKeyExpired",
    "PreAuthKeyUsed",
]


class PreAuthKeyCreated(Event, frozen=True, kw_only=True, tag="preauthkey.created"):
    """A pre-auth key was issued.

    ``user_id`` is ``None`` for a key that only registers tagged nodes. ``expires_at`` is
    ``None`` for a key that never expires.
    """

    key_id: int
    prefix: str
    secret_sha256: str
    user_id: int | None
    reusable: bool = False
    ephemeral: bool = False
    tags: tuple[str, ...] = ()
    expires_at: datetime | None = None


class PreAuthKeyUsed(Event, frozen=True, kw_only=True, tag="preauthkey.used"):
    """A node registered (or re-registered) with this key."""

    key_id: int
    node_id: int


class PreAuthKeyExpired(Event, frozen=True, kw_only=True, tag="preauthkey.expired"):
    """An admin expired the key; it authenticates nothing from now on."""

    key_id: int


class ApiKeyCreated(Event, frozen=True, kw_only=True, tag="apikey.created"):
    """A credential of the admin HTTP API was issued.

    Schema 2 adds who it acts for and how far: ``kind`` is ``"apikey"`` (a bearer key,
    ``tlkey-api-<prefix>-<secret>``) or ``"oauth_client"`` (client credentials, which
    only buy short-lived tokens limited to ``scopes``); ``user_id`` is the owner (``None``
    for a key an operator made for the whole tailnet); ``role`` is ``admin`` or
    ``member`` (a member key sees and changes only its owner's nodes and keys, and an
    owner's own role caps it at use).
    """

    SCHEMA: ClassVar[int] = 2

    key_id: int
    prefix: str
    secret_sha256: str
    expires_at: datetime | None = None
    kind: str = "apikey"
    user_id: int | None = None
    role: str = "admin"
    scopes: tuple[str, ...] = ()
    description: str = ""


@register_upcaster("apikey.created", 1)
def _apikey_v1_to_v2(payload: Payload) -> Payload:
    """Schema 1 keys were tailnet-wide admin keys."""
    return {**payload, "kind": "apikey", "user_id": None, "role": "admin", "scopes": [], "description": ""}


class ApiKeyExpired(Event, frozen=True, kw_only=True, tag="apikey.expired"):
    key_id: int


class ApiKeyDeleted(Event, frozen=True, kw_only=True, tag="apikey.deleted"):
    key_id: int
