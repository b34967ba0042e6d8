"""User events. Users own nodes and pre-auth keys; ids are never reused."""

from __future__ import annotations

from typing import ClassVar, Final

from ..upcast import Payload, register_upcaster
from .base import Event

__all__ = ["ROLES", "UserCreated", "UserDeleted", "UserProfileUpdated", "UserRenamed", "UserRoleSet"]

#: The tailnet roles, most powerful first. An owner is an admin too (``autogroup:admin``
#: matches both); a member sees and changes only what is their own.
ROLES: Final = ("owner", "admin", "member")


class UserCreated(Event, frozen=True, kw_only=True, tag="user.created"):
    """A user came into being.

    ``name`` is the login name used in policies (``alice`` or ``alice@example.com``);
    ``provider`` is ``"local"`` for users made by an admin and ``"oidc"`` for users made
    by an OIDC login, with ``provider_id`` the issuer's subject.

    ``role`` (schema 2): ``owner``, ``admin`` or ``member`` (see :data:`ROLES`); users
    recorded before roles existed are members.
    """

    SCHEMA: ClassVar[int] = 2

    user_id: int
    name: str
    display_name: str = ""
    email: str = ""
    provider: str = "local"
    provider_id: str = ""
    profile_pic_url: str = ""
    role: str = "member"


@register_upcaster("user.created", 1)
def _v1_to_v2(payload: Payload) -> Payload:
    """Schema 1 had no role: every user was a member."""
    return {**payload, "role": "member"}


class UserRenamed(Event, frozen=True, kw_only=True, tag="user.renamed"):
    user_id: int
    name: str


class UserDeleted(Event, frozen=True, kw_only=True, tag="user.deleted"):
    """A user was deleted. Only users without nodes can be deleted."""

    user_id: int


class UserRoleSet(Event, frozen=True, kw_only=True, tag="user.role_set"):
    """The user's role is now ``role`` (one of :data:`ROLES`)."""

    user_id: int
    role: str


class UserProfileUpdated(Event, frozen=True, kw_only=True, tag="user.profile_updated"):
    """The user's profile, as an identity provider states it, changed: an OIDC login
    whose claims (``email``, ``name``, ``picture``) differ from what the log holds, or
    the first OIDC login of a user an admin made beforehand, which links that user to
    the provider's subject (``provider``, ``provider_id``). The name is unchanged
    (``user.renamed``). Every field holds the new value."""

    user_id: int
    display_name: str
    email: str
    provider: str
    provider_id: str
    profile_pic_url: str
