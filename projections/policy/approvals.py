"""Route auto-approval (the ``autoApprovers`` section).

Role in the pipeline: runs before compilation. A node's advertised route is
served when an admin approved it *or* the policy auto-approves it:

* a subnet route is auto-approved when some ``autoApprovers.routes`` prefix
  contains it (equal or wider) and one of that prefix's approvers names the
  node -- a tag it carries, or (for untagged nodes) its user or a group the
  user belongs to;
* an exit route (``0.0.0.0/0`` or ``::/0``) is auto-approved only through
  ``autoApprovers.exitNode``; a ``routes`` entry for ``0.0.0.0/0`` does not
  make a node an exit node (the hosted plane and headscale agree).

Approval only ever adds: previously approved routes stay approved.

:func:`auto_approved_routes` is what the server records as approval events;
:func:`with_auto_approvals` applies them to a whole tailnet for evaluation.
"""

from __future__ import annotations

import msgspec

from .document import Alias, AliasKind, Policy
from .ipset import Prefix, is_exit_route, parse_prefix
from .model import PolicyNode
from .tailnet import NodeInfo, Tailnet

__all__ = ["approve", "auto_approved_routes", "with_auto_approvals"]


def _names(policy: Policy, tailnet: Tailnet, alias: Alias, node: NodeInfo) -> bool:
    """Report whether approver ``alias`` names ``node``."""
    groups = policy.group_map()
    if alias.kind is AliasKind.TAG:
        return alias.text in node.tags
    if alias.kind in (AliasKind.USER, AliasKind.USER_DOMAIN, AliasKind.GROUP):
        return node.owner is not None and node.owner in tailnet.user_ids_for_alias(alias, groups)
    if alias.kind is AliasKind.AUTOGROUP:
        ids = tailnet.node_ids_for_alias(alias, groups)
        return ids is not None and node.id in ids
    addresses = tailnet.addresses(alias, groups, policy.host_map())
    return addresses.contains_any(node.addrs)


def auto_approved_routes(policy: Policy, tailnet: Tailnet, node: PolicyNode) -> tuple[str, ...]:
    """Advertised routes of ``node`` that the policy approves and an admin has not.

    Args:
        policy: a validated policy.
        tailnet: the tailnet the node belongs to (for user and group lookups).
        node: the node.

    Returns:
        Route strings to add to ``node.approved_routes``, in advertisement order.
    """
    info = NodeInfo(node)
    already = {parse_prefix(r) for r in node.approved_routes}
    rules = [(parse_prefix(p), approvers) for p, approvers in policy.auto_approvers.routes]
    out: list[str] = []
    for text in node.routable_ips:
        route = parse_prefix(text)
        if route in already or text in out:
            continue
        if is_exit_route(route):
            approvers: tuple[Alias, ...] = policy.auto_approvers.exit_node
            approved = any(_names(policy, tailnet, a, info) for a in approvers)
        else:
            approved = any(
                _covers(prefix, route) and any(_names(policy, tailnet, a, info) for a in approvers)
                for prefix, approvers in rules
            )
        if approved:
            out.append(text)
    return tuple(out)


def _covers(outer: Prefix, inner: Prefix) -> bool:
    return outer.v4 == inner.v4 and outer.bits <= inner.bits and outer.lo <= inner.lo <= outer.hi


def with_auto_approvals(policy: Policy, tailnet: Tailnet) -> Tailnet:
    """The tailnet with every node's auto-approved routes added."""
    if not policy.auto_approvers.routes and not policy.auto_approvers.exit_node:
        return tailnet
    nodes = [approve(policy, tailnet, info.node) for info in tailnet.iter_nodes()]
    if all(new is info.node for new, info in zip(nodes, tailnet.iter_nodes(), strict=True)):
        return tailnet
    return Tailnet(tailnet.users.values(), nodes, tailnet.settings)


def approve(policy: Policy, tailnet: Tailnet, node: PolicyNode) -> PolicyNode:
    """``node`` with its auto-approved routes added (the same object if none)."""
    if not node.routable_ips:
        return node
    extra = auto_approved_routes(policy, tailnet, node)
    if not extra:
        return node
    return msgspec.structs.replace(node, approved_routes=node.approved_routes + extra)
