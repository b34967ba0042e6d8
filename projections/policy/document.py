"""The typed policy document: what :func:`parse_policy` produces.

Role in the pipeline: ``parse.py`` turns HuJSON into these frozen Structs;
``validate.py`` checks them against each other (every referenced group, tag
and host exists); ``compile.py`` resolves them against a tailnet. Nothing
here knows about nodes or users -- a :class:`Policy` is pure syntax plus the
:class:`~projections.policy.hujson.SourceMap` that lets later stages point at
the text.

Aliases. Every place a policy names machines (``src``, ``dst``, ``target``,
tag owners, auto-approvers) holds :class:`Alias` values. The kind is decided
by Tailscale's precedence, which headscale's ``parseAlias`` also follows: an
IP or CIDR first, then ``*``, then anything containing ``@`` is a user, then
the ``group:``, ``tag:`` and ``autogroup:`` prefixes, and whatever is left
(no colon) is a host alias from the ``hosts`` table.

ACLs are kept as written (an :class:`ACL` per entry) and converted to grants
at compile time, because validation messages differ between the two forms.
"""

from __future__ import annotations

import enum
from typing import Final

import msgspec

from .hujson import JSONPath, SourceMap

__all__ = [
    "ACL",
    "ALL_PORTS",
    "ACLDestination",
    "Alias",
    "AliasKind",
    "AutoApprovers",
    "CheckPeriod",
    "Grant",
    "IPSpec",
    "NodeAttr",
    "Policy",
    "PolicyTest",
    "PortRange",
    "SSHRule",
    "SSHTest",
]


class AliasKind(enum.Enum):
    """What an alias names."""

    WILDCARD = "*"
    USER = "user"  # odin@example.com (or a bare login ending in "@")
    USER_DOMAIN = "user-domain"  # user:*@example.com
    GROUP = "group"
    TAG = "tag"
    HOST = "host"  # a key of the hosts table
    PREFIX = "prefix"  # a literal IP or CIDR
    AUTOGROUP = "autogroup"


class Alias(msgspec.Struct, frozen=True):
    """One name for a set of machines.

    Attributes:
        kind: the alias kind.
        text: the alias as written, whitespace-trimmed. For
            :attr:`AliasKind.USER_DOMAIN` it is the domain only.
    """

    kind: AliasKind
    text: str

    def __str__(self) -> str:
        if self.kind is AliasKind.USER_DOMAIN:
            return f"user:*@{self.text}"
        return self.text


class PortRange(msgspec.Struct, frozen=True):
    """An inclusive port range; ``(0, 65535)`` means every port."""

    first: int
    last: int


#: The wildcard port range ``*``.
ALL_PORTS: Final = PortRange(0, 65535)


class ACLDestination(msgspec.Struct, frozen=True):
    """An ACL ``dst`` entry: ``alias:ports``."""

    alias: Alias
    ports: tuple[PortRange, ...]
    text: str


class IPSpec(msgspec.Struct, frozen=True):
    """A grant ``ip`` entry such as ``tcp:443`` or ``80-90``.

    Attributes:
        protocols: IANA protocol numbers; empty means Tailscale's default set
            (the client then allows TCP, UDP and ICMP).
        ports: the port ranges.
    """

    protocols: tuple[int, ...]
    ports: tuple[PortRange, ...]


class ACL(msgspec.Struct, frozen=True):
    """One ``acls`` entry (only ``action: accept`` survives parsing)."""

    protocols: tuple[int, ...]
    src: tuple[Alias, ...]
    dst: tuple[ACLDestination, ...]
    path: JSONPath


class Grant(msgspec.Struct, frozen=True):
    """One ``grants`` entry.

    Attributes:
        src: source aliases.
        dst: destination aliases.
        ip: network capabilities (may be empty when ``app`` is set).
        app: application capabilities, cap name to the JSON-encoded list of
            values, in policy order.
        via: tags of the routers traffic must go through (``via`` grants).
        path: where the entry is in the policy text.
    """

    src: tuple[Alias, ...]
    dst: tuple[Alias, ...]
    ip: tuple[IPSpec, ...]
    app: tuple[tuple[str, bytes], ...]
    via: tuple[str, ...]
    path: JSONPath


class CheckPeriod(msgspec.Struct, frozen=True):
    """An SSH ``checkPeriod``: ``always`` or a duration in nanoseconds."""

    always: bool
    nanoseconds: int


class SSHRule(msgspec.Struct, frozen=True):
    """One ``ssh`` entry."""

    action: str  # "accept" or "check"
    src: tuple[Alias, ...]
    dst: tuple[Alias, ...]
    users: tuple[str, ...]
    check_period: CheckPeriod | None
    accept_env: tuple[str, ...]
    path: JSONPath


class NodeAttr(msgspec.Struct, frozen=True):
    """One ``nodeAttrs`` entry."""

    target: tuple[Alias, ...]
    attrs: tuple[str, ...]
    ip_pool: tuple[str, ...]
    path: JSONPath


class AutoApprovers(msgspec.Struct, frozen=True):
    """The ``autoApprovers`` section.

    Attributes:
        routes: ``(prefix text, approvers)`` in policy order.
        exit_node: approvers of exit routes.
    """

    routes: tuple[tuple[str, tuple[Alias, ...]], ...] = ()
    exit_node: tuple[Alias, ...] = ()


class PolicyTest(msgspec.Struct, frozen=True):
    """One ``tests`` entry, kept as strings: a malformed entry fails the run.

    ``src`` is None when the key is missing; ``proto`` is "" when omitted.
    """

    src: str | None
    proto: str
    accept: tuple[str, ...]
    deny: tuple[str, ...]
    path: JSONPath


class SSHTest(msgspec.Struct, frozen=True):
    """One ``sshTests`` entry."""

    src: str | None
    dst: tuple[str, ...]
    accept: tuple[str, ...]
    deny: tuple[str, ...]
    check: tuple[str, ...]
    path: JSONPath


class Policy(msgspec.Struct, frozen=True):
    """A parsed tailnet policy file.

    Attributes:
        groups: group name to member logins, in policy order.
        hosts: host alias to prefix text.
        tag_owners: tag to owner aliases.
        acls: ``acls`` entries; None when the key is absent (absent *and*
            no ``grants`` means Tailscale's allow-all default).
        grants: ``grants`` entries; None when absent.
        ssh: ``ssh`` rules; None when absent.
        node_attrs: ``nodeAttrs`` entries.
        auto_approvers: the ``autoApprovers`` section.
        tests: the ``tests`` block.
        ssh_tests: the ``sshTests`` block.
        randomize_client_port: top-level ``randomizeClientPort``.
        source: the policy text's source map (for error locations).
    """

    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    hosts: tuple[tuple[str, str], ...] = ()
    tag_owners: tuple[tuple[str, tuple[Alias, ...]], ...] = ()
    acls: tuple[ACL, ...] | None = None
    grants: tuple[Grant, ...] | None = None
    ssh: tuple[SSHRule, ...] | None = None
    node_attrs: tuple[NodeAttr, ...] = ()
    auto_approvers: AutoApprovers = AutoApprovers()
    tests: tuple[PolicyTest, ...] = ()
    ssh_tests: tuple[SSHTest, ...] = ()
    randomize_client_port: bool = False
    source: SourceMap | None = None

    def group_map(self) -> dict[str, tuple[str, ...]]:
        """``groups`` as a dict."""
        return dict(self.groups)

    def host_map(self) -> dict[str, str]:
        """``hosts`` as a dict."""
        return dict(self.hosts)

    def tag_owner_map(self) -> dict[str, tuple[Alias, ...]]:
        """``tagOwners`` as a dict."""
        return dict(self.tag_owners)

    def allow_all(self) -> bool:
        """True when neither ``acls`` nor ``grants`` is present (default policy)."""
        return self.acls is None and self.grants is None
