"""User events. Users own nodes and pre-auth keys; ids are never reused."""

from __future__ import annotations

from .base import Event

__all__ = ["UserCreated", "UserDeleted", "UserRenamed"]


class UserCreated(Event, frozen=True, kw_only=True, tag="user.created"):
    """A user came into being.

    ``name`` is the login name used in policies (``alice`` or ``alice@example.com``);
    ``provider`` is ``"local"`` for users made by an admin and ``"oidc"`` for users made
    by an OIDC login, with ``provider_id`` the issuer's subject.
    """

    user_id: int
    name: str
    display_name: str = ""
    email: str = ""
    provider: str = "local"
    provider_id: str = ""
    profile_pic_url: str = ""


class UserRenamed(Event, frozen=True, kw_only=True, tag="user.renamed"):
    user_id: int
    name: str


class UserDeleted(Event, frozen=True, kw_only=True, tag="user.deleted"):
    """A user was deleted. Only users without nodes can be deleted."""

    user_id: int
