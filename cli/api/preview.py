"""``acl/preview``: which rules of a policy apply to a user, or to an ``ip:port``.

Tailscale's shape: each match lists the rule's sources (``users``), its destinations
(``ports``) and its ``lineNumber`` in the policy text. For ``type=user`` a rule
matches when one of its sources names the user (``*``, the user, their domain, a group
they are in, ``autogroup:member``, or the role autogroups by their role); for
``type=ipport`` when one of its destinations covers the address and the port.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from projections.policy import parse_policy
from projections.policy.document import ACL, Alias, AliasKind, Policy
from projections.policy.ipset import addr_to_int
from projections.policy.resolve import Resolver
from projections.policy.tailnet import Tailnet
from projections.policystate import policy_tailnet
from projections.state import TailnetState

__all__ = ["preview_matches"]


def preview_matches(state: TailnetState, text: str, kind: str, target: str) -> list[dict[str, Any]]:
    """The matches of ``kind`` (``user`` or ``ipport``) for ``target``.

    Raises:
        PolicyError: the policy text does not parse.
        ValueError: ``target`` is not an ``ip:port`` (for ``ipport``).
    """
    policy = parse_policy(text)
    tailnet = policy_tailnet(state)
    acls = policy.acls or ()
    if kind == "user":
        users = {u.id for u in tailnet.users.values() if target in (u.login, u.name, f"{u.name}@")}
        hits = [acl for acl in acls if any(_names_user(a, users, tailnet, policy) for a in acl.src)]
    else:
        addr, port = _ip_port(target)
        resolver = Resolver(policy, tailnet)
        hits = [
            acl for acl in acls
            if any(resolver.addresses(d.alias).contains(addr) and any(p.first <= port <= p.last for p in d.ports)
                   for d in acl.dst)
        ]
    return [_match(policy, acl) for acl in hits]


def _names_user(alias: Alias, users: set[int], tailnet: Tailnet, policy: Policy) -> bool:
    if not users:
        return False
    if alias.kind is AliasKind.WILDCARD or alias.text in ("autogroup:member", "autogroup:members"):
        return True
    return bool(tailnet.user_ids_for_alias(alias, policy.group_map()) & users)


def _ip_port(target: str) -> tuple[int, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"previewFor must be ip:port, not {target!r}")
    ip = ipaddress.ip_address(host.strip("[]"))
    return addr_to_int(str(ip)), int(port)


def _match(policy: Policy, acl: ACL) -> dict[str, Any]:
    match: dict[str, Any] = {"users": [a.text for a in acl.src], "ports": [d.text for d in acl.dst]}
    if policy.source is not None:
        where = policy.source.value(acl.path)
        if where is not None:
            match["lineNumber"] = where[0]
    return match
