"""Commands: validate a request against the current state and decide its events.

A command is a pure function ``decide_*(state, …) -> Decision``. It raises
:class:`~projections.errors.CommandError` with a message for the person who asked when
the request is invalid (unknown user, duplicate name, used key …); otherwise it returns
the events to append and a result for the caller. Nothing here appends: the service
(:mod:`projections.service`) appends the events with ``expected_seq=state.seq``, so a
decision made against a stale state is refused by the log and decided again.

Time and randomness are arguments (``now``, secrets, a ``randbelow`` source), never read
here, so a decision is reproducible.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Final, Generic, Literal, TypeVar

from eventlog import Actor, ActorKind, RecordedEvent
from eventlog.events import (
    ROLES,
    AnyEvent,
    ApiKeyCreated,
    ApiKeyDeleted,
    ApiKeyExpired,
    DnsExtraRecord,
    DnsExtraRecordsSet,
    DnsSet,
    NodeDeleted,
    NodeExpirySet,
    NodeHostnameChanged,
    NodeKeyRotated,
    NodeLoggedOut,
    NodeRegistered,
    NodeRegistrationRejected,
    NodeRenamed,
    NodeTagsSet,
    PolicyImpact,
    PolicySet,
    PreAuthKeyCreated,
    PreAuthKeyExpired,
    PreAuthKeyUsed,
    RoutePrimaryChanged,
    RoutesAdvertised,
    RoutesApproved,
    SshCheckApproved,
    SshCheckRejected,
    UserCreated,
    UserDeleted,
    UserProfileUpdated,
    UserRenamed,
    UserRoleSet,
)

from .errors import CommandError, ConflictError, NotFoundError
from .fold import apply
from .ipam import AllocationMode, Network, allocate
from .state import ApiKey, Node, PreAuthKey, TailnetState, User

if TYPE_CHECKING:
    from .policy.document import CheckPeriod

__all__ = [
    "MAX_HOSTNAME_LENGTH",
    "PREAUTH_KEY_PREFIX",
    "AddressPlan",
    "Decision",
    "LoginRules",
    "ReportedHost",
    "check_period",
    "check_preauth_key",
    "check_relogin_owner",
    "clean_hostname",
    "decide_advertise_routes",
    "decide_approve_node_routes",
    "decide_approve_routes",
    "decide_change_hostname",
    "decide_create_api_key",
    "decide_create_preauth_key",
    "decide_create_user",
    "decide_delete_api_key",
    "decide_delete_node",
    "decide_delete_user",
    "decide_expire_api_key",
    "decide_expire_node",
    "decide_expire_preauth_key",
    "decide_host_report",
    "decide_login_approved",
    "decide_login_known",
    "decide_login_with_key",
    "decide_policy_auto_approvals",
    "decide_register_node",
    "decide_reject_node_routes",
    "decide_reject_registration",
    "decide_rename_node",
    "decide_rename_user",
    "decide_requested_tags",
    "decide_rotate_node_key",
    "decide_route_primaries",
    "decide_set_dns",
    "decide_set_extra_records",
    "decide_set_role",
    "decide_set_tags",
    "decide_ssh_check",
    "decide_tag_node",
    "decide_update_user_profile",
    "find_api_key",
    "find_node",
    "find_preauth_key",
    "find_user",
    "hash_secret",
    "parse_api_key",
    "parse_extra_records",
    "parse_preauth_key",
    "sanitize_hostname",
    "scope_grants",
    "ssh_check_approved",
    "ssh_check_period",
    "tag_rules",
    "validate_tag",
]

T = TypeVar("T")

PREAUTH_KEY_PREFIX = "tlkey-auth-"
API_KEY_PREFIX = "tlkey-api-"

_USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,62}$")
_TAG = re.compile(r"^tag:[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
#: A DNS label's longest length (RFC 1035), which Tailscale holds host names and
#: MagicDNS names to (``dnsname.SanitizeHostname``).
MAX_HOSTNAME_LENGTH = 63
#: What a host name may not hold: C0 and C1 control characters (terminal escapes),
#: DEL, the Unicode line and paragraph separators, and the bidirectional controls
#: (which can make a name display as another).
_HOSTNAME_BAD = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")
#: Suffixes Tailscale trims from a host name before making it a DNS label.
_COMMON_SUFFIXES = (".local", ".localdomain", ".lan")
#: Characters Tailscale turns into "-" inside a label (others outside [a-z0-9-] go).
_LABEL_SEPARATORS = frozenset(" .@_")
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


@dataclass(frozen=True)
class Decision(Generic[T]):
    """The events a command decided, and what the caller gets back."""

    events: tuple[AnyEvent, ...]
    result: T
    meta: dict[str, str] = field(default_factory=dict)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# -- lookups --------------------------------------------------------------------------


def _numeric_id(ref: str) -> int | None:
    """``ref`` as a numeric id, if it is one (ASCII digits only: ``str.isdigit`` also
    accepts superscripts and other digits that ``int`` refuses)."""
    if ref.isascii() and ref.isdigit() and len(ref) <= 18:
        return int(ref)
    return None


def find_user(state: TailnetState, ref: str) -> User:
    """A user by name or by numeric id."""
    user = state.user_named(ref)
    uid = _numeric_id(ref)
    if user is None and uid is not None:
        user = state.users.get(uid)
    if user is None:
        raise NotFoundError(f"user {ref!r} not found")
    return user


def find_node(state: TailnetState, ref: str) -> Node:
    """A node by numeric id or by given (MagicDNS) name."""
    nid = _numeric_id(ref)
    node = state.nodes.get(nid) if nid is not None else None
    if node is None:
        node = state.node_named(ref)
    if node is None:
        raise NotFoundError(f"node {ref!r} not found")
    return node


def find_preauth_key(state: TailnetState, ref: str) -> PreAuthKey:
    """A pre-auth key by id, by public prefix, or by the full key."""
    if ref.startswith(PREAUTH_KEY_PREFIX):
        parsed = parse_preauth_key(ref)
        if parsed is not None:
            ref = parsed[0]
    kid = _numeric_id(ref)
    for key in state.preauth_keys.values():
        if key.prefix == ref or key.id == kid:
            return key
    raise NotFoundError(f"pre-auth key {ref!r} not found")


def parse_preauth_key(text: str) -> tuple[str, str] | None:
    """Split ``tlkey-auth-<prefix>-<secret>`` into ``(prefix, secret)``."""
    if not text.startswith(PREAUTH_KEY_PREFIX):
        return None
    prefix, sep, secret = text[len(PREAUTH_KEY_PREFIX) :].partition("-")
    if not sep or not prefix or not secret:
        return None
    return prefix, secret


# -- users ----------------------------------------------------------------------------


def _check_user_name(name: str) -> None:
    if not _USER_NAME.match(name):
        raise CommandError(
            f"invalid user name {name!r}: use 1-63 letters, digits and . _ @ + -, "
            "starting with a letter or digit"
        )


def decide_create_user(
    state: TailnetState,
    name: str,
    *,
    display_name: str = "",
    email: str = "",
    provider: str = "local",
    provider_id: str = "",
    role: str | None = None,
    profile_pic_url: str = "",
) -> Decision[int]:
    """Create a user. ``role`` ``None``: the first user of a tailnet without users
    becomes its owner, every later one a member."""
    _check_user_name(name)
    if role is not None:
        _check_role(role)
    if state.user_named(name) is not None:
        raise ConflictError(f"user {name!r} already exists")
    uid = state.next_user_id
    event = UserCreated(
        user_id=uid,
        name=name,
        display_name=display_name or name,
        email=email,
        provider=provider,
        provider_id=provider_id,
        role=role if role is not None else ("owner" if not state.users else "member"),
        profile_pic_url=profile_pic_url,
    )
    return Decision((event,), uid)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise CommandError(f"invalid role {role!r}: use one of {', '.join(ROLES)}")


def decide_set_role(state: TailnetState, ref: str, role: str) -> Decision[int]:
    """Give a user another role. The last owner stays one until another user is made
    owner: a tailnet always keeps someone who can manage everything."""
    user = find_user(state, ref)
    _check_role(role)
    if user.role == role:
        raise CommandError(f"user {user.name!r} already has the role {role}")
    if user.role == "owner" and not any(
        u.role == "owner" and u.id != user.id for u in state.users.values()
    ):
        raise CommandError(
            f"user {user.name!r} is the tailnet's only owner; make another user owner first"
        )
    return Decision((UserRoleSet(user_id=user.id, role=role),), user.id)
def decide_update_user_profile(
    state: TailnetState,
    user_id: int,
    *,
    display_name: str,
    email: str,
    provider: str,
    provider_id: str,
    profile_pic_url: str,
) -> Decision[int]:
    """Record a user's profile as an identity provider states it; nothing when it is
    already so (a login with unchanged claims appends nothing)."""
    user = state.users.get(user_id)
    if user is None:
        raise NotFoundError(f"user {user_id} not found")
    new = (display_name, email, provider, provider_id, profile_pic_url)
    if new == (user.display_name, user.email, user.provider, user.provider_id, user.profile_pic_url):
        return Decision((), user.id)
    event = UserProfileUpdated(
        user_id=user.id,
        display_name=display_name,
        email=email,
        provider=provider,
        provider_id=provider_id,
        profile_pic_url=profile_pic_url,
    )
    return Decision((event,), user.id)


def decide_rename_user(state: TailnetState, ref: str, new_name: str) -> Decision[int]:
    user = find_user(state, ref)
    _check_user_name(new_name)
    if new_name == user.name:
        raise CommandError(f"user {user.name!r} already has that name")
    if state.user_named(new_name) is not None:
        raise ConflictError(f"user {new_name!r} already exists")
    return Decision((UserRenamed(user_id=user.id, name=new_name),), user.id)


def decide_delete_user(state: TailnetState, ref: str) -> Decision[int]:
    user = find_user(state, ref)
    owned = [n.given_name for n in state.nodes.values() if n.user_id == user.id]
    if owned:
        raise CommandError(
            f"user {user.name!r} still owns {len(owned)} node(s) ({', '.join(sorted(owned))}); "
            "delete them first"
        )
    return Decision((UserDeleted(user_id=user.id),), user.id)


# -- pre-auth keys ------------------------------------------------------------------


def validate_tag(tag: str) -> None:
    if not _TAG.match(tag):
        raise CommandError(f"invalid tag {tag!r}: tags look like tag:name (letters, digits, - _)")


def decide_create_preauth_key(
    state: TailnetState,
    *,
    user: str | None,
    reusable: bool,
    ephemeral: bool,
    tags: tuple[str, ...],
    expires_at: datetime | None,
    now: datetime,
    prefix: str,
    secret: str,
) -> Decision[str]:
    """Issue a key; ``prefix`` and ``secret`` are fresh random strings from the adapter.

    Returns the full key (``tlkey-auth-<prefix>-<secret>``), shown once.
    """
    owner = find_user(state, user).id if user is not None else None
    if owner is None and not tags:
        raise CommandError("a pre-auth key needs a user, or tags for tagged nodes")
    for tag in tags:
        validate_tag(tag)
    if expires_at is not None and expires_at <= now:
        raise CommandError("the expiration must be in the future")
    if any(k.prefix == prefix for k in state.preauth_keys.values()):
        raise ConflictError("key prefix collision; try again")
    event = PreAuthKeyCreated(
        key_id=state.next_preauth_key_id,
        prefix=prefix,
        secret_sha256=hash_secret(secret),
        user_id=owner,
        reusable=reusable,
        ephemeral=ephemeral,
        tags=tuple(sorted(set(tags))),
        expires_at=expires_at,
    )
    return Decision((event,), f"{PREAUTH_KEY_PREFIX}{prefix}-{secret}")


def decide_expire_preauth_key(state: TailnetState, ref: str) -> Decision[int]:
    key = find_preauth_key(state, ref)
    if key.revoked:
        raise CommandError(f"pre-auth key {key.prefix} is already expired")
    return Decision((PreAuthKeyExpired(key_id=key.id),), key.id)


#: The scopes an OAuth client may hold (Tailscale's names). A write scope includes its
#: ``:read``; ``all`` includes every scope and ``all:read`` every ``:read`` one.
OAUTH_SCOPES: Final = (
    "all", "all:read",
    "devices:core", "devices:core:read",
    "devices:routes", "devices:routes:read",
    "auth_keys", "auth_keys:read",
    "policy_file", "policy_file:read",
    "dns", "dns:read",
    "users", "users:read",
    "oauth_keys", "oauth_keys:read",  # OAuth clients: making them through /api/v2 keys
)
API_KEY_ROLES: Final = ("admin", "member")
OAUTH_CLIENT_PREFIX = "tlkey-client-"


def scope_grants(held: tuple[str, ...], needed: str) -> bool:
    """Whether the scopes ``held`` include ``needed`` (see :data:`OAUTH_SCOPES`)."""
    if needed in held or "all" in held:
        return True
    if needed.endswith(":read"):
        return "all:read" in held or needed.removesuffix(":read") in held
    return False


def find_api_key(state: TailnetState, ref: str, *, kind: str = "apikey") -> ApiKey:
    """An API key (or OAuth client, by ``kind``) by id, by prefix, or by the full key."""
    parsed = parse_api_key(ref)
    if parsed is not None:
        ref = parsed[1]
    kid = _numeric_id(ref)
    for key in state.api_keys.values():
        if key.kind == kind and (key.prefix == ref or key.id == kid):
            return key
    what = "OAuth client" if kind == "oauth_client" else "API key"
    raise NotFoundError(f"{what} {ref!r} not found")


def parse_api_key(text: str) -> tuple[str, str, str] | None:
    """Split ``tlkey-api-<prefix>-<secret>`` (kind ``apikey``) or
    ``tlkey-client-<prefix>-<secret>`` (kind ``oauth_client``) into
    ``(kind, prefix, secret)``."""
    for kind, head in (("apikey", API_KEY_PREFIX), ("oauth_client", OAUTH_CLIENT_PREFIX)):
        if text.startswith(head):
            prefix, sep, secret = text[len(head) :].partition("-")
            if sep and prefix and secret:
                return kind, prefix, secret
            return None
    return None


def decide_create_api_key(
    state: TailnetState,
    *,
    expires_at: datetime | None,
    now: datetime,
    prefix: str,
    secret: str,
    user: str | None = None,
    role: str = "admin",
    kind: str = "apikey",
    scopes: tuple[str, ...] = (),
    description: str = "",
) -> Decision[str]:
    """Issue an API key or an OAuth client; ``prefix`` and ``secret`` are fresh random
    strings from the adapter. Returns the full secret, shown once.

    A member key needs its user; an admin key owned by a user needs that user to be an
    admin or owner. An OAuth client needs at least one known scope.
    """
    if role not in API_KEY_ROLES:
        raise CommandError(f"invalid key role {role!r}: use admin or member")
    owner = find_user(state, user) if user is not None else None
    if role == "member" and owner is None:
        raise CommandError("a member key acts for a user: give its user")
    if role == "admin" and owner is not None and not owner.is_admin:
        raise CommandError(
            f"user {owner.name!r} is a {owner.role}; an admin key needs an admin or owner (or use --role member)"
        )
    if kind == "oauth_client":
        if not scopes:
            raise CommandError(f"an OAuth client needs scopes, some of: {', '.join(OAUTH_SCOPES)}")
        for scope in scopes:
            if scope not in OAUTH_SCOPES:
                raise CommandError(f"unknown scope {scope!r}: use some of {', '.join(OAUTH_SCOPES)}")
    elif kind != "apikey":
        raise CommandError(f"unknown credential kind {kind!r}")
    elif scopes:
        raise CommandError("scopes apply to OAuth clients; an API key has its role's permissions")
    if expires_at is not None and expires_at <= now:
        raise CommandError("the expiration must be in the future")
    if any(k.prefix == prefix for k in state.api_keys.values()):
        raise ConflictError("key prefix collision; try again")
    event = ApiKeyCreated(
        key_id=state.next_api_key_id,
        prefix=prefix,
        secret_sha256=hash_secret(secret),
        expires_at=expires_at,
        kind=kind,
        user_id=owner.id if owner is not None else None,
        role=role,
        scopes=tuple(sorted(set(scopes))),
        description=description,
    )
    head = OAUTH_CLIENT_PREFIX if kind == "oauth_client" else API_KEY_PREFIX
    return Decision((event,), f"{head}{prefix}-{secret}")


def decide_expire_api_key(state: TailnetState, ref: str, *, kind: str = "apikey") -> Decision[int]:
    key = find_api_key(state, ref, kind=kind)
    if key.revoked:
        raise CommandError(f"key {key.prefix} is already expired")
    return Decision((ApiKeyExpired(key_id=key.id),), key.id)


def decide_delete_api_key(state: TailnetState, ref: str, *, kind: str = "apikey") -> Decision[int]:
    key = find_api_key(state, ref, kind=kind)
    return Decision((ApiKeyDeleted(key_id=key.id),), key.id)


# -- DNS --------------------------------------------------------------------------------

_DNS_NAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


def decide_set_dns(
    state: TailnetState,
    *,
    nameservers: tuple[str, ...] | None,
    search_paths: tuple[str, ...] | None,
    magic_dns: bool | None,
) -> Decision[None]:
    """Put DNS settings in force (``None``: as configured); nothing when unchanged.

    Raises:
        CommandError: a name server that is not an IP address, or a search path that is
            not a domain name.
    """
    if nameservers is not None:
        canonical: list[str] = []
        for ns in nameservers:
            try:
                canonical.append(str(ipaddress.ip_address(ns)))
            except ValueError:
                raise CommandError(f"invalid name server {ns!r}: give an IP address") from None
        nameservers = tuple(dict.fromkeys(canonical))
        if len(nameservers) > 32:
            raise CommandError("too many name servers (at most 32)")
    if search_paths is not None:
        for path in search_paths:
            if not _DNS_NAME.match(path):
                raise CommandError(f"invalid search path {path!r}: give a domain name")
        search_paths = tuple(dict.fromkeys(p.rstrip(".").lower() for p in search_paths))
        if len(search_paths) > 32:
            raise CommandError("too many search paths (at most 32)")
    current = (state.dns_nameservers, state.dns_search_paths, state.dns_magic_dns)
    if (nameservers, search_paths, magic_dns) == current:
        return Decision((), None)
    return Decision((DnsSet(nameservers=nameservers, search_paths=search_paths, magic_dns=magic_dns),), None)


# -- policy ---------------------------------------------------------------------------


def check_policy_text(state: TailnetState, text: str) -> str:
    """Parse, validate and test ``text`` against the tailnet; return its SHA-256.

    Raises:
        CommandError: the policy is invalid or one of its tests fails; the message
            carries Tailscale's wording and, where known, ``line:column``.
    """
    from .policy import PolicyError, PolicyTestFailure, check_policy_against, parse_policy
    from .policystate import policy_tailnet

    try:
        check_policy_against(parse_policy(text), policy_tailnet(state))
    except PolicyTestFailure as exc:
        detail = "; ".join(exc.failures)
        raise CommandError(f"{exc.located()}: {detail}" if detail else exc.located()) from None
    except PolicyError as exc:
        raise CommandError(exc.located()) from None
    return hashlib.sha256(text.encode()).hexdigest()


def decide_set_policy(
    state: TailnetState, text: str, *, source: str, impact: PolicyImpact | None = None
) -> Decision[str]:
    """Put ``text`` in force (after :func:`check_policy_text`); nothing if unchanged.
    ``impact`` is the summary to record with it (see ``projections.replay.impact_summary``)."""
    sha = check_policy_text(state, text)
    if state.policy_text == text and state.policy_source == source:
        return Decision((), sha)
    return Decision((PolicySet(text=text, sha256=sha, source=source, impact=impact),), sha)


# -- nodes ----------------------------------------------------------------------------


def clean_hostname(hostname: str, max_length: int = MAX_HOSTNAME_LENGTH) -> str:
    """The host name a node reports (``Hostinfo.Hostname``) as it is recorded and
    shown: without control characters and cut to ``max_length`` characters
    (Tailscale clients send the host name's first DNS label, at most 63 characters;
    anything longer is not a host name, and must not become a large event)."""
    if len(hostname) > 4 * max_length:
        hostname = hostname[: 4 * max_length]  # cleaning a huge text costs nothing then
    return _HOSTNAME_BAD.sub("", hostname)[:max_length].strip()


def sanitize_hostname(hostname: str) -> str:
    """A DNS label from a host name, the way Tailscale makes MagicDNS names
    (``dnsname.SanitizeHostname``): ``.local``, ``.localdomain`` or ``.lan`` trimmed,
    cut to 63 characters, leading and trailing characters that are not letters or
    digits dropped, space, dot, ``@`` and ``_`` inside turned into ``-``, other
    characters outside ``[a-z0-9-]`` dropped, lower case. ``node`` if nothing is left.
    """
    for suffix in _COMMON_SUFFIXES:
        hostname = hostname.removesuffix(suffix)
    label = hostname[:MAX_HOSTNAME_LENGTH]
    start, end = 0, len(label)
    while start < end and label[start] not in _ALNUM:
        start += 1
    while end > start and label[end - 1] not in _ALNUM:
        end -= 1
    out: list[str] = []
    for i in range(start, end):
        ch = label[i]
        if ch in _LABEL_SEPARATORS and start < i < end - 1:
            out.append("-")
        elif ch in _ALNUM or ch == "-":
            out.append(ch.lower())
    return "".join(out) or "node"


def _unique_given_name(state: TailnetState, wanted: str) -> str:
    taken = state.node_names  # the names in use, indexed (no scan of every node)
    if wanted not in taken:
        return wanted
    n = 1
    while True:
        suffix = f"-{n}"
        candidate = wanted[: 63 - len(suffix)] + suffix
        if candidate not in taken:
            return candidate
        n += 1


@dataclass(frozen=True)
class AddressPlan:
    """Where node addresses come from (configuration, not state)."""

    ipv4: Network | None
    ipv6: Network | None
    mode: AllocationMode = AllocationMode.SEQUENTIAL


def decide_register_node(
    state: TailnetState,
    *,
    machine_key: str,
    node_key: str,
    hostname: str,
    user_id: int,
    tags: tuple[str, ...],
    ephemeral: bool,
    expiry: datetime | None,
    auth: str,
    preauth_key: PreAuthKey | None,
    plan: AddressPlan,
    os: str = "",
    randbelow: Callable[[int], int] | None = None,
    max_hostname_length: int = MAX_HOSTNAME_LENGTH,
) -> Decision[int]:
    """Admit a new machine: allocate its addresses and a unique name (the host name
    is cleaned, see :func:`clean_hostname`)."""
    hostname = clean_hostname(hostname, max_hostname_length) or "node"
    if state.node_by_key(node_key) is not None:
        raise ConflictError("this node key is already registered to another machine")
    if user_id not in state.users and not (user_id == 0 and tags):
        raise NotFoundError(f"user {user_id} not found")
    in_use = state.node_by_ip
    ipv4 = (
        allocate(plan.ipv4, in_use, last=state.last_ipv4, mode=plan.mode, randbelow=randbelow)
        if plan.ipv4 is not None
        else None
    )
    ipv6 = (
        allocate(plan.ipv6, in_use, last=state.last_ipv6, mode=plan.mode, randbelow=randbelow)
        if plan.ipv6 is not None
        else None
    )
    node_id = state.next_node_id
    events: list[AnyEvent] = [
        NodeRegistered(
            node_id=node_id,
            machine_key=machine_key,
            node_key=node_key,
            user_id=user_id,
            hostname=hostname,
            given_name=_unique_given_name(state, sanitize_hostname(hostname)),
            ipv4=ipv4,
            ipv6=ipv6,
            tags=tuple(sorted(set(tags))),
            ephemeral=ephemeral,
            expiry=expiry,
            auth=auth,
            preauthkey_id=preauth_key.id if preauth_key else None,
            os=clean_hostname(os, MAX_HOSTNAME_LENGTH),
        )
    ]
    if preauth_key is not None:
        events.append(PreAuthKeyUsed(key_id=preauth_key.id, node_id=node_id))
    return Decision(tuple(events), node_id)


def check_relogin_owner(state: TailnetState, node: Node, user: User) -> None:
    """Refuse approving a machine's new login for ``user`` when the machine already has
    a node owned by another user.

    Approving it would re-key that node and leave it with its old owner -- silently
    not what the admin asked for. A tagged node is owned by its tags, whoever approves.

    Raises:
        ConflictError: with the node, its owner, and what to do instead.
    """
    if node.tags or node.user_id == user.id:
        return
    owner = state.users.get(node.user_id)
    owner_name = owner.name if owner is not None else f"#{node.user_id}"
    raise ConflictError(
        f"this machine is already registered as node {node.given_name!r} (id {node.id}) owned by "
        f"user {owner_name!r}, not {user.name!r}: approve it with --user {owner_name} to log it in "
        f"again, or delete node {node.id} first to register the machine anew for {user.name!r}"
    )


def decide_rotate_node_key(
    state: TailnetState,
    node: Node,
    *,
    node_key: str,
    expiry: datetime | None,
    preauth_key: PreAuthKey | None = None,
) -> Decision[int]:
    owner = state.node_by_key(node_key)
    if owner is not None and owner.id != node.id:
        raise ConflictError("this node key is already registered to another machine")
    events: list[AnyEvent] = [
        NodeKeyRotated(node_id=node.id, old_node_key=node.node_key, node_key=node_key, expiry=expiry)
    ]
    if preauth_key is not None:
        events.append(PreAuthKeyUsed(key_id=preauth_key.id, node_id=node.id))
    return Decision(tuple(events), node.id)


def decide_reject_registration(
    *, request_id: str, machine_key: str, node_key: str, hostname: str, source: str
) -> Decision[None]:
    """Record an admin's refusal of a pending interactive registration.

    The request is not part of the state (see :mod:`eventlog.sidetables`): the caller
    has looked it up. Why it was refused is the request's reason (the envelope's).
    """
    event = NodeRegistrationRejected(
        request_id=request_id, machine_key=machine_key, node_key=node_key,
        hostname=hostname, source=source,
    )
    return Decision((event,), None)


def decide_rename_node(state: TailnetState, ref: str, new_name: str) -> Decision[int]:
    node = find_node(state, ref)
    label = sanitize_hostname(new_name)
    if label != new_name:
        raise CommandError(
            f"invalid node name {new_name!r}: use a DNS label (lower-case letters, digits, -), "
            f"for example {label!r}"
        )
    other = state.node_named(new_name)
    if other is not None and other.id != node.id:
        raise ConflictError(f"another node is already named {new_name!r}")
    return Decision((NodeRenamed(node_id=node.id, given_name=new_name),), node.id)


def decide_delete_node(state: TailnetState, ref: str, *, reason: str = "admin") -> Decision[int]:
    node = find_node(state, ref)
    return Decision((NodeDeleted(node_id=node.id, reason=reason),), node.id)


def decide_expire_node(
    state: TailnetState, ref: str, *, now: datetime, at: datetime | None = None
) -> Decision[int]:
    """Expire a node's key now (or at ``at``, which may be in the future)."""
    node = find_node(state, ref)
    return Decision((NodeExpirySet(node_id=node.id, expiry=at or now),), node.id)


def decide_logout_node(state: TailnetState, node: Node, *, now: datetime) -> Decision[int]:
    if node.ephemeral:
        return Decision((NodeDeleted(node_id=node.id, reason="logout"),), node.id)
    return Decision((NodeLoggedOut(node_id=node.id, at=now),), node.id)


def decide_set_tags(
    state: TailnetState, ref: str, tags: tuple[str, ...], *, user: str | None = None
) -> Decision[int]:
    """Replace a node's tags (the command itself; an admin's request goes through
    :func:`decide_tag_node`, which also checks the policy's ``tagOwners``).

    Clearing the tags gives the node back to a user: ``user`` when given, else the
    one who registered it. A node registered with a tags-only key has none, so
    clearing its tags without ``user`` is refused.
    """
    node = find_node(state, ref)
    for tag in tags:
        validate_tag(tag)
    canonical = tuple(sorted(set(tags)))
    if canonical == node.tags:
        raise CommandError(f"node {node.given_name!r} already has exactly these tags")
    if user is not None:
        if canonical or not node.tags:
            raise CommandError(
                "--user only applies when clearing a node's tags: it names the user who will own it"
            )
        owner = find_user(state, user)
        return Decision((NodeTagsSet(node_id=node.id, tags=(), user_id=owner.id),), node.id)
    if not canonical and node.user_id not in state.users:
        raise CommandError(
            f"node {node.given_name!r} was registered with a tags-only key and belongs to no user: "
            "clearing its tags needs --user USER, the user who will own it"
        )
    return Decision((NodeTagsSet(node_id=node.id, tags=canonical),), node.id)


def tag_rules(state: TailnetState, tags: tuple[str, ...]) -> dict[str, str]:
    """For each tag, the ``tagOwners`` rule of the policy in force that defines it.

    The operator is an admin, so owning the tag is not required, but a tag the policy
    does not define is refused: Tailscale refuses such tags too, and no rule could
    refer to the node by it.

    Raises:
        CommandError: a tag is not in the policy's ``tagOwners`` (the message says so).
    """
    from .policy import parse_stored_policy

    policy = parse_stored_policy(state.policy_text) if state.policy_text else None
    owners = policy.tag_owner_map() if policy is not None else {}
    rules: dict[str, str] = {}
    for tag in sorted(set(tags)):
        validate_tag(tag)
        if tag not in owners:
            where = "the policy's tagOwners" if policy is not None else "a policy (none is set)"
            raise CommandError(
                f"tag {tag!r} is not defined in {where}: add it to tagOwners, with its owners, "
                "before tagging nodes with it"
            )
        assert policy is not None
        pos = policy.source.key(("tagOwners", tag)) if policy.source is not None else None
        line = f" (policy line {pos[0]})" if pos is not None else ""
        names = ", ".join(a.text for a in owners[tag]) or "nobody"
        rules[tag] = f'tagOwners["{tag}"]{line}: owned by {names}; set by an admin, who needs no ownership'
    return rules


def decide_tag_node(
    state: TailnetState, ref: str, tags: tuple[str, ...], *, user: str | None = None
) -> Decision[tuple[int, dict[str, str]]]:
    """An admin's ``nodes tag``: every tag must be defined in the policy's
    ``tagOwners`` (:func:`tag_rules`); the result names the rule that allows each."""
    rules = tag_rules(state, tags)
    decision = decide_set_tags(state, ref, tags, user=user)
    return Decision(decision.events, (decision.result, rules))


def _canonical_routes(routes: tuple[str, ...]) -> tuple[str, ...]:
    out: set[str] = set()
    for route in routes:
        try:
            out.add(str(ipaddress.ip_network(route, strict=True)))
        except ValueError as exc:
            raise CommandError(f"invalid route {route!r}: {exc}") from None
    return tuple(sorted(out))


def decide_change_hostname(
    state: TailnetState, node: Node, hostname: str, *, max_length: int = MAX_HOSTNAME_LENGTH
) -> Decision[int]:
    """Record the host name a node reports (cleaned, see :func:`clean_hostname`);
    nothing when it is empty or unchanged."""
    cleaned = clean_hostname(hostname, max_length)
    if not cleaned or cleaned == node.hostname:
        return Decision((), node.id)
    return Decision((NodeHostnameChanged(node_id=node.id, hostname=cleaned),), node.id)


def decide_advertise_routes(
    state: TailnetState, node: Node, routes: tuple[str, ...], *, max_routes: int | None = None
) -> Decision[int]:
    """Record the routes a node advertises (``Hostinfo.RoutableIPs``); nothing when
    unchanged. Refused when invalid or more than ``max_routes``."""
    if max_routes is not None and len(routes) > max_routes:
        raise CommandError(f"too many advertised routes: {len(routes)} (the limit is {max_routes})")
    canonical = _canonical_routes(routes)
    if canonical == node.advertised_routes:
        return Decision((), node.id)
    return Decision((RoutesAdvertised(node_id=node.id, routes=canonical),), node.id)


def decide_approve_routes(state: TailnetState, ref: str, routes: tuple[str, ...]) -> Decision[int]:
    node = find_node(state, ref)
    canonical = _canonical_routes(routes)
    return Decision((RoutesApproved(node_id=node.id, routes=canonical),), node.id)




# -- logins ---------------------------------------------------------------------------
#
# A client's login (or an admin approving an interactive one) causes up to four facts:
# the registration or key rotation, the routes the client advertises, the routes the
# policy's autoApprovers approve, and its host name. They are decided here together,
# against one state, and appended in one transaction: a login is all of it or none.


@dataclass(frozen=True)
class ReportedHost:
    """What a client's Hostinfo says that the log records."""

    hostname: str = ""
    os: str = ""
    routes: tuple[str, ...] = ()
    #: ``Hostinfo.RequestTags`` (``tailscale up --advertise-tags``); empty: none asked.
    request_tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoginRules:
    """The server's settings a login is decided with."""

    plan: AddressPlan
    node_key_expiry: timedelta | None = None
    max_hostname_length: int = MAX_HOSTNAME_LENGTH
    max_routes: int | None = None
    randbelow: Callable[[int], int] | None = None
    #: The routes the policy's autoApprovers approve for a node (none when ``None``).
    auto_approve: Callable[[TailnetState, Node], Iterable[str]] | None = None

    def new_expiry(self, now: datetime, tagged: bool) -> datetime | None:
        if tagged or self.node_key_expiry is None:
            return None
        return now + self.node_key_expiry


_DECIDING = Actor(kind=ActorKind.SYSTEM, id="decision")


def _then(state: TailnetState, events: tuple[AnyEvent, ...], now: datetime) -> TailnetState:
    """``state`` with ``events`` folded in, to decide what follows from them (the
    envelope here is provisional: the log records the real one)."""
    for event in events:
        recorded = RecordedEvent(
            seq=state.seq + 1, recorded_at=now, actor=_DECIDING, type=event.type_name(),
            schema=event.SCHEMA, event=event, prev_hash="", hash="",
        )
        state, _ = apply(state, recorded)
    return state


def check_preauth_key(state: TailnetState, text: str, now: datetime) -> PreAuthKey:
    """The pre-auth key ``text`` names, if its secret matches and it may be used now.

    Raises:
        CommandError: it is unknown, its secret is wrong (the same message, so a probe
            learns nothing), or it is expired, revoked or spent.
    """
    parsed = parse_preauth_key(text.strip())
    if parsed is None:
        raise CommandError("invalid pre-auth key")
    prefix, secret = parsed
    key = next((k for k in state.preauth_keys.values() if k.prefix == prefix), None)
    if key is None or not hmac.compare_digest(key.secret_sha256, hash_secret(secret)):
        raise CommandError("invalid pre-auth key")
    why = key.usable_at(now)
    if why is not None:
        raise CommandError(why)
    return key


def decide_host_report(
    state: TailnetState, node: Node, host: ReportedHost | None, rules: LoginRules, *, now: datetime
) -> Decision[int]:
    """What a node's Hostinfo changes in the log: its advertised routes (and the
    approvals the policy grants for them) and its host name. Invalid routes are not
    recorded (``meta["routes_refused"]`` says why); the rest still is."""
    if host is None:
        return Decision((), node.id)
    events: list[AnyEvent] = []
    meta: dict[str, str] = {}
    try:
        routes = decide_advertise_routes(state, node, host.routes, max_routes=rules.max_routes)
    except CommandError as exc:
        meta["routes_refused"] = str(exc)
        routes = Decision((), node.id)
    if routes.events:
        events.extend(routes.events)
        if rules.auto_approve is not None:
            after = _then(state, routes.events, now)
            current = after.nodes[node.id]
            # Only routes the node newly advertises: one an admin revoked stays revoked
            # when the node re-advertises its set.
            newly = set(current.advertised_routes) - set(node.advertised_routes)
            extra = set(rules.auto_approve(after, current)) & newly
            if extra:
                approved = _canonical_routes(tuple(set(current.approved_routes) | extra))
                if approved != current.approved_routes:
                    events.append(RoutesApproved(node_id=node.id, routes=approved, auto=True))
    events.extend(
        decide_change_hostname(state, node, host.hostname, max_length=rules.max_hostname_length).events
    )
    if host.request_tags:
        try:
            events.extend(decide_requested_tags(state, node, host.request_tags).events)
        except CommandError as exc:
            meta["tags_refused"] = str(exc)
    return Decision(tuple(events), node.id, meta)


def requested_tags_refusal(tags: Iterable[str]) -> str:
    """Tailscale's message for tags a node may not have."""
    return f"requested tags [{' '.join(tags)}] are invalid or not permitted"


def decide_requested_tags(state: TailnetState, node: Node, requested: Iterable[str]) -> Decision[int]:
    """The tags a node asks for (``tailscale up --advertise-tags``): applied when each is
    allowed, all or nothing. A tag is allowed when the pre-auth key the node used
    carries it, or the policy's ``tagOwners`` names the node's user (directly, by a
    group, or by role through ``autogroup:admin``/``owner``) or a tag the node already
    has. A node that becomes tagged belongs to its tags, not to a user (the policy no
    longer sees its user), and its key stops expiring, as in Tailscale.

    Raises:
        CommandError: Tailscale's "requested tags [...] are invalid or not permitted",
            naming the tags refused.
    """
    from .policy import parse_stored_policy
    from .policy.document import AliasKind
    from .policystate import policy_tailnet

    wanted = tuple(sorted(set(requested)))
    if wanted == node.tags:
        return Decision((), node.id)
    key = state.preauth_keys.get(node.preauthkey_id) if node.preauthkey_id is not None else None
    from_key = set(key.tags) if key is not None else set()
    policy = parse_stored_policy(state.policy_text) if state.policy_text else None
    owners = policy.tag_owner_map() if policy is not None else {}
    groups = policy.group_map() if policy is not None else {}
    tailnet = policy_tailnet(state)

    def allowed(tag: str) -> bool:
        try:
            validate_tag(tag)
        except CommandError:
            return False
        if tag in from_key:
            return True
        for alias in owners.get(tag, ()):
            if alias.kind is AliasKind.TAG and alias.text in node.tags:
                return True
            if alias.kind is not AliasKind.TAG and node.user_id in tailnet.user_ids_for_alias(alias, groups):
                return True
        return False

    refused = [t for t in wanted if not allowed(t)]
    if refused:
        raise CommandError(requested_tags_refusal(refused))
    events: list[AnyEvent] = [NodeTagsSet(node_id=node.id, tags=wanted)]
    if node.expiry is not None and not node.logged_out:
        events.append(NodeExpirySet(node_id=node.id, expiry=None))
    return Decision(tuple(events), node.id)


def _with_host_report(
    state: TailnetState, first: Decision[int], host: ReportedHost | None, rules: LoginRules, now: datetime
) -> Decision[int]:
    after = _then(state, first.events, now)
    report = decide_host_report(after, after.nodes[first.result], host, rules, now=now)
    if "tags_refused" in report.meta:
        # At login, tags the node may not have refuse the login (what
        # ``tailscale up --advertise-tags`` then prints); nothing is recorded.
        raise CommandError(report.meta["tags_refused"])
    return Decision(first.events + report.events, first.result, {**first.meta, **report.meta})


def decide_login_with_key(
    state: TailnetState,
    *,
    machine_key: str,
    node_key: str,
    auth_key: str,
    host: ReportedHost | None,
    now: datetime,
    rules: LoginRules,
) -> Decision[int]:
    """A client logs in with a pre-auth key: a new node, or a new key for its machine
    (same owner, or tagged), plus what its Hostinfo reports. One decision.

    Raises:
        CommandError: the key is invalid or unusable, or the node key is taken.
    """
    key = check_preauth_key(state, auth_key, now)
    reported = host or ReportedHost()
    current = state.node_by_machine(machine_key)
    tagged = bool(key.tags)
    first: Decision[int]
    if current is not None and (current.user_id == key.user_id or tagged or current.tags):
        first = decide_rotate_node_key(
            state, current, node_key=node_key,
            expiry=rules.new_expiry(now, tagged or bool(current.tags)), preauth_key=key,
        )
    else:
        first = decide_register_node(
            state, machine_key=machine_key, node_key=node_key,
            hostname=reported.hostname or "node",
            user_id=key.user_id if key.user_id is not None else 0,
            tags=key.tags, ephemeral=key.ephemeral, expiry=rules.new_expiry(now, tagged),
            auth="preauthkey", preauth_key=key, plan=rules.plan, os=reported.os,
            randbelow=rules.randbelow, max_hostname_length=rules.max_hostname_length,
        )
    return _with_host_report(state, first, host, rules, now)


def decide_login_approved(
    state: TailnetState,
    *,
    machine_key: str,
    node_key: str,
    user_ref: str,
    ephemeral: bool,
    host: ReportedHost | None,
    now: datetime,
    rules: LoginRules,
    auth: str = "cli",
    expiry: datetime | Literal["default"] | None = "default",
) -> Decision[int]:
    """An admin (or the user, signing in) approves an interactive login for
    ``user_ref``: a new node, or a new key for its machine, plus what its Hostinfo
    reported. One decision. ``auth`` is recorded on a new node (``cli``, ``web``,
    ``oidc``); ``expiry`` is the key's (``"default"``: ``rules.node_key_expiry``;
    a tagged node's key never expires).

    Raises:
        CommandError: unknown user, the machine's node belongs to another user (see
            :func:`check_relogin_owner`), or the node key is taken.
    """
    user = find_user(state, user_ref)
    reported = host or ReportedHost()
    current = state.node_by_machine(machine_key)
    first: Decision[int]

    def key_expiry(tagged: bool) -> datetime | None:
        if expiry == "default" or tagged:
            return rules.new_expiry(now, tagged)
        return expiry

    if current is not None:
        check_relogin_owner(state, current, user)
        first = decide_rotate_node_key(
            state, current, node_key=node_key, expiry=key_expiry(bool(current.tags))
        )
    else:
        first = decide_register_node(
            state, machine_key=machine_key, node_key=node_key,
            hostname=reported.hostname or "node", user_id=user.id, tags=(),
            ephemeral=ephemeral, expiry=key_expiry(False), auth=auth,
            preauth_key=None, plan=rules.plan, os=reported.os, randbelow=rules.randbelow,
            max_hostname_length=rules.max_hostname_length,
        )
    return _with_host_report(state, first, host, rules, now)


def decide_login_known(
    state: TailnetState,
    node: Node,
    *,
    shorten_expiry_to: datetime | None,
    host: ReportedHost | None,
    now: datetime,
    rules: LoginRules,
) -> Decision[int]:
    """A registered node logs in again with its key: maybe a shorter key expiry it
    asks for, plus what its Hostinfo reports. One decision."""
    first: Decision[int] = Decision((), node.id)
    if shorten_expiry_to is not None:
        first = Decision((NodeExpirySet(node_id=node.id, expiry=shorten_expiry_to),), node.id)
    return _with_host_report(state, first, host, rules, now)


def decide_route_primaries(
    state: TailnetState,
    elected: Mapping[str, int],
    routers: Mapping[str, Sequence[int]],
    online: Callable[[int], bool],
    *,
    failover: bool = True,
) -> Decision[int]:
    """Record every change of a subnet's primary router (route high availability).

    The one HA decision of the server (actor ``system:ha``). ``elected`` is the route
    election in force (prefix -> primary, which keeps each recorded primary while it
    serves its prefix), ``routers`` every node serving each prefix. A primary that is
    offline hands the prefix to the online router with the lowest id (``"offline"``);
    with none online it keeps it. A primary that comes back stays secondary: the
    recorded primary is kept while it serves and is online, so nothing flaps. Every
    difference between what is in force and what the log records becomes a
    ``route.primary_changed`` event; nothing changed, no event. ``failover`` false
    (just after start-up, before routers had time to reconnect) records the election
    without moving any prefix for being offline.

    Returns:
        The decision; its result is the number of primary changes.
    """
    events: list[AnyEvent] = []
    for prefix in sorted(routers):
        ids = sorted(set(routers[prefix]))
        if not ids:
            continue
        current = elected.get(prefix, ids[0])
        recorded = state.route_primaries.get(prefix)
        want, reason = current, "elected"
        if failover and not online(current):
            standby = [i for i in ids if i != current and online(i)]
            if standby:
                want, reason = standby[0], "offline"
        if want == recorded:
            continue
        if reason != "offline" and recorded is not None and recorded not in ids:
            reason = "no longer serves"
        events.append(RoutePrimaryChanged(prefix=prefix, node_id=want, previous_node_id=recorded, reason=reason))
    for prefix, recorded in sorted(state.route_primaries.items()):
        if prefix not in routers:
            events.append(
                RoutePrimaryChanged(prefix=prefix, node_id=None, previous_node_id=recorded, reason="no router")
            )
    return Decision(tuple(events), len(events))


# -- routes (``tailledger routes``) -------------------------------------------------------

#: The two routes of an exit node: approved and rejected together.
EXIT_ROUTES: tuple[str, ...] = ("0.0.0.0/0", "::/0")


def _route_operands(node: Node, prefixes: Iterable[str], have: tuple[str, ...]) -> set[str]:
    wanted = set(_canonical_routes(tuple(prefixes)))
    if not wanted:
        raise CommandError("give at least one prefix")
    if wanted & set(EXIT_ROUTES):
        wanted |= set(EXIT_ROUTES) & set(have)
    return wanted


def decide_approve_node_routes(state: TailnetState, ref: str, prefixes: Iterable[str]) -> Decision[int]:
    """Approve some of the routes a node advertises (an exit route approves both).

    Raises:
        CommandError: an invalid prefix, one the node does not advertise, or nothing new.
    """
    node = find_node(state, ref)
    wanted = _route_operands(node, prefixes, node.advertised_routes)
    missing = sorted(wanted - set(node.advertised_routes))
    if missing:
        advertised = ", ".join(node.advertised_routes) or "nothing"
        raise CommandError(
            f"node {node.given_name!r} does not advertise {', '.join(missing)} (it advertises {advertised})"
        )
    approved = tuple(sorted(set(node.approved_routes) | wanted))
    if approved == node.approved_routes:
        raise CommandError(f"{', '.join(sorted(wanted))} already approved for node {node.given_name!r}")
    return Decision((RoutesApproved(node_id=node.id, routes=approved),), node.id)


def decide_reject_node_routes(state: TailnetState, ref: str, prefixes: Iterable[str]) -> Decision[int]:
    """Withdraw the approval of some of a node's routes, also one the policy's
    autoApprovers approved (it stays withdrawn until approved again).

    Raises:
        CommandError: an invalid prefix or one that is not approved for the node.
    """
    node = find_node(state, ref)
    wanted = _route_operands(node, prefixes, node.approved_routes)
    missing = sorted(wanted - set(node.approved_routes))
    if missing:
        raise CommandError(f"{', '.join(missing)} is not approved for node {node.given_name!r}")
    approved = tuple(sorted(set(node.approved_routes) - wanted))
    return Decision((RoutesApproved(node_id=node.id, routes=approved),), node.id)


def decide_policy_auto_approvals(
    state: TailnetState, newly: Mapping[int, Iterable[str]]
) -> Decision[int]:
    """Approve, as ``auto`` approvals, routes a policy change newly auto-approves
    (``newly``: node id -> routes the new policy approves and the old one did not).
    Only advertised, not yet approved routes of existing nodes count.

    Returns:
        The decision; its result is the number of nodes whose approvals grew.
    """
    events: list[AnyEvent] = []
    for node_id in sorted(newly):
        node = state.nodes.get(node_id)
        if node is None:
            continue
        extra = set(newly[node_id]) & set(node.advertised_routes)
        approved = _canonical_routes(tuple(set(node.approved_routes) | extra))
        if approved != node.approved_routes:
            events.append(RoutesApproved(node_id=node.id, routes=approved, auto=True))
    return Decision(tuple(events), len(events))


# -- extra DNS records -----------------------------------------------------------------

_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def parse_extra_records(raw: object, *, where: str = "extra_records") -> tuple[DnsExtraRecord, ...]:
    """Extra DNS records from their JSON form (Headscale's): a list of ``{"name":
    "grafana.example.internal", "type": "A", "value": "100.64.0.3"}``. Names are
    lower-cased without a trailing dot; types are ``A`` or ``AAAA`` with an address of
    that family. Returned sorted, duplicates removed.

    Raises:
        CommandError: the first problem, with its position (``where[i]``).
    """
    if not isinstance(raw, list):
        raise CommandError(f"{where}: expected a list of {{name, type, value}} records")
    out: set[DnsExtraRecord] = set()
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(item, dict) or set(item) - {"name", "type", "value"}:
            raise CommandError(f"{at}: expected an object with name, type and value")
        name, rtype, value = item.get("name"), item.get("type"), item.get("value")
        if not (isinstance(name, str) and isinstance(rtype, str) and isinstance(value, str)):
            raise CommandError(f"{at}: name, type and value must be strings")
        name = name.strip().lower().rstrip(".")
        if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in name.split(".")):
            raise CommandError(f"{at}: {name!r} is not a DNS name")
        rtype = rtype.strip().upper()
        if rtype not in ("A", "AAAA"):
            raise CommandError(f"{at}: type {rtype!r} is not supported (A or AAAA)")
        try:
            addr = ipaddress.ip_address(value.strip())
        except ValueError:
            raise CommandError(f"{at}: {value!r} is not an IP address") from None
        if (addr.version == 4) != (rtype == "A"):
            raise CommandError(f"{at}: {value!r} is not an {'IPv4' if rtype == 'A' else 'IPv6'} address ({rtype})")
        out.add(DnsExtraRecord(name=name, type=rtype, value=str(addr)))
    return tuple(sorted(out, key=lambda r: (r.name, r.type, r.value)))


def decide_set_extra_records(
    state: TailnetState, records: tuple[DnsExtraRecord, ...], *, source: str
) -> Decision[bool]:
    """Record the tailnet's extra DNS records when they differ from the log's (an
    empty set is recorded only to clear records recorded before). Result: changed."""
    if records == (state.dns_extra_records or ()):
        return Decision((), False)
    return Decision((DnsExtraRecordsSet(records=records, source=source),), True)


# -- SSH check mode ----------------------------------------------------------------------

#: Tailscale's default checkPeriod of an SSH ``check`` rule.
DEFAULT_SSH_CHECK_PERIOD = timedelta(hours=12)


def check_period(period: CheckPeriod | None) -> timedelta:
    """A rule's ``checkPeriod`` (Tailscale's 12 h when it gives none; ``always``: zero,
    every connection is checked)."""
    if period is None:
        return DEFAULT_SSH_CHECK_PERIOD
    return timedelta(0) if period.always else timedelta(microseconds=period.nanoseconds // 1000)


def ssh_check_period(state: TailnetState) -> timedelta:
    """The shortest ``checkPeriod`` of the policy's ``check`` rules: the period of a
    connection no check rule holds any more (the policy changed since it was held).
    The period of a held connection is its rule's (``PolicyCompiler.check_period``)."""
    from .policy import parse_stored_policy

    if not state.policy_text:
        return DEFAULT_SSH_CHECK_PERIOD
    rules = parse_stored_policy(state.policy_text).ssh or ()
    return min((check_period(r.check_period) for r in rules if r.action == "check"), default=DEFAULT_SSH_CHECK_PERIOD)


def ssh_check_approved(
    state: TailnetState, src_node_id: int, local_user: str, now: datetime, period: timedelta
) -> bool:
    """Whether an earlier approval still covers SSH from this source as this user, for a
    connection held by a rule with this ``checkPeriod`` (an approval recorded before
    approvals carried their time covers any connection until its ``until``)."""
    approval = state.ssh_checks.get(f"{src_node_id}/{local_user}")
    if approval is None:
        return False
    if approval.approved_at is None:
        return now < approval.until
    return now < approval.approved_at + period


def decide_ssh_check(
    state: TailnetState,
    *,
    check_id: str,
    src_node_id: int,
    dst_node_id: int,
    local_user: str,
    approve: bool,
    now: datetime,
    reason: str = "",
    period: timedelta | None = None,
) -> Decision[datetime | None]:
    """An admin approves or rejects a held SSH connection. Result: until when an
    approval lets the source and user in unchecked through the rule holding this
    connection, whose ``checkPeriod`` is ``period`` (``None``: the policy's shortest);
    ``None`` for a rejection.

    Raises:
        NotFoundError: the source node no longer exists.
    """
    if src_node_id not in state.nodes:
        raise NotFoundError(f"node {src_node_id} no longer exists")
    if not approve:
        return Decision(
            (SshCheckRejected(check_id=check_id, src_node_id=src_node_id, dst_node_id=dst_node_id,
                              local_user=local_user, reason=reason),),
            None,
        )
    until = now + (ssh_check_period(state) if period is None else period)
    return Decision(
        (SshCheckApproved(check_id=check_id, src_node_id=src_node_id, dst_node_id=dst_node_id,
                          local_user=local_user, until=until, approved_at=now),),
        until,
    )
