"""Compile the ``ssh`` section into one node's tailcfg.SSHPolicy.

Role in the pipeline: per-node stage. Only nodes that are SSH destinations
get rules. For each policy rule the node is a destination of, the rule's
sources become principals (one per source address) and ``users`` becomes
the ``sshUsers`` map:

* ``root`` maps to ``root`` when listed, else to ``""`` (explicitly denied);
* ``autogroup:nonroot`` adds ``"*": "="`` (any non-root user, as themselves);
* every other entry maps to itself;
* ``localpart:*@<domain>`` adds, per source user whose login is in that
  domain, a separate rule mapping the login's local part to itself.

Ordering is meaning -- the client takes the first matching rule -- and
follows the hosted control plane (as captured by headscale's
``compileSSHPolicy``): policy order, one rule per source user when
localpart entries are present (users by id, tagged sources last), and
finally every ``check`` rule moved before every ``accept`` rule (stable).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from .document import Alias, SSHRule
from .ipset import IPSet, format_addr
from .resolve import Resolver
from .tailnet import NodeInfo, Tailnet
from .wire import SSHAction, SSHPolicy, SSHPrincipal, SSHRuleWire

__all__ = ["CHECK_URL_TEMPLATE", "compile_ssh_policy", "localpart_domain"]

#: Path of the check-mode callback; the client substitutes the variables.
CHECK_URL_TEMPLATE: Final = (
    "/machine/ssh/action/$SRC_NODE_ID/to/$DST_NODE_ID?local_user=$LOCAL_USER"
)

_ACCEPT: Final = SSHAction(
    accept=True,
    allow_agent_forwarding=True,
    allow_local_port_forwarding=True,
    allow_remote_port_forwarding=True,
)


def localpart_domain(user: str) -> str | None:
    """The domain of a canonical ``localpart:*@<domain>`` entry, else None.

    Non-canonical shapes (``localpart:foo``, ``localpart:*@``) are plain
    literal user names, as the hosted plane treats them.
    """
    if not user.startswith("localpart:"):
        return None
    local, at, domain = user[len("localpart:") :].rpartition("@")
    if not at or local != "*" or not domain:
        return None
    return domain


def compile_ssh_policy(
    resolver: Resolver,
    node: NodeInfo,
    control_url: str,
) -> SSHPolicy | None:
    """Build the SSH policy ``node`` receives.

    Args:
        resolver: the validated policy and the tailnet it is evaluated against.
        node: the destination node.
        control_url: the server's URL, prefix of check-mode callbacks.

    Returns:
        The policy (possibly with no rules), or None when the policy has no
        ``ssh`` section at all.
    """
    if resolver.policy.ssh is None:
        return None
    rules: list[SSHRuleWire] = []
    for rule in resolver.policy.ssh:
        rules.extend(_rules_for(rule, resolver, node, control_url))
    checks = [r for r in rules if r.action.hold_and_delegate]
    accepts = [r for r in rules if not r.action.hold_and_delegate]
    return SSHPolicy(rules=tuple(checks + accepts))


def _rules_for(
    rule: SSHRule,
    resolver: Resolver,
    node: NodeInfo,
    control_url: str,
) -> list[SSHRuleWire]:
    tailnet = resolver.tailnet
    src_ips = resolver.union(rule.src)
    if not src_ips:
        return []
    action = (
        SSHAction(hold_and_delegate=control_url + CHECK_URL_TEMPLATE)
        if rule.action == "check"
        else _ACCEPT
    )
    env = rule.accept_env
    users = _user_map(rule.users)
    localparts = _localparts(rule.users, tailnet)
    user_ids, by_user, tagged = _group_sources(tailnet, src_ips)
    out: list[SSHRuleWire] = []

    def emit(principals: Sequence[SSHPrincipal], uid: int | None) -> None:
        out.append(
            SSHRuleWire(
                principals=tuple(principals), ssh_users=users, action=action, accept_env=env
            )
        )
        if uid is not None and uid in localparts:
            local = localparts[uid]
            out.append(
                SSHRuleWire(
                    principals=tuple(principals),
                    ssh_users={local: local},
                    action=action,
                    accept_env=env,
                )
            )

    self_dst = any(a.text == "autogroup:self" for a in rule.dst)
    others: list[Alias] = [a for a in rule.dst if a.text != "autogroup:self"]
    if self_dst and node.owner is not None and by_user.get(node.owner):
        emit(by_user[node.owner], node.owner)
    if not others:
        return out
    if resolver.union(others).contains_any(node.addrs):
        if localparts:
            for uid in user_ids:
                emit(by_user[uid], uid)
            if tagged:
                emit(tagged, None)
        else:
            merged = [p for uid in user_ids for p in by_user[uid]] + tagged
            if merged:
                emit(merged, None)
    elif localparts and src_ips.contains_any(node.addrs):
        # A source that is not a destination still gets rules scoped to
        # itself when localpart mapping is in play.
        if node.owner is None:
            emit([SSHPrincipal(node_ip=format_addr(a)) for a in sorted(node.addrs)], None)
        elif by_user.get(node.owner):
            emit(by_user[node.owner], node.owner)
    return out


def _user_map(users: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    if "autogroup:nonroot" in users:
        out["*"] = "="
    out["root"] = "root" if "root" in users else ""
    for user in users:
        if user in ("root", "autogroup:nonroot") or localpart_domain(user) is not None:
            continue
        out[user] = user
    return out


def _localparts(users: Sequence[str], tailnet: Tailnet) -> dict[int, str]:
    """User id -> local part, for users matched by a ``localpart:*@domain`` entry."""
    out: dict[int, str] = {}
    for entry in users:
        domain = localpart_domain(entry)
        if domain is None:
            continue
        for user in tailnet.users.values():
            if user.domain and user.domain.lower() == domain.lower():
                out[user.id] = user.localpart
    return out


def _group_sources(
    tailnet: Tailnet, src_ips: IPSet
) -> tuple[list[int], dict[int, list[SSHPrincipal]], list[SSHPrincipal]]:
    """Principals per source user (ids sorted) and for tagged sources.

    A tagged node appears once per tag it carries: the hosted plane expands
    ``autogroup:tagged`` through tag membership lists, and the wire format
    shows the repetition.
    """
    per_user: dict[int, set[int]] = {}
    tagged: list[SSHPrincipal] = []
    for info in tailnet.nodes_in(src_ips):
        if info.owner is None:
            for _ in info.tags:
                tagged.extend(SSHPrincipal(node_ip=format_addr(a)) for a in info.addrs)
            continue
        per_user.setdefault(info.owner, set()).update(info.addrs)
    by_user = {
        uid: [SSHPrincipal(node_ip=format_addr(a)) for a in sorted(addrs)]
        for uid, addrs in per_user.items()
    }
    return sorted(by_user), by_user, tagged
