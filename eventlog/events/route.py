"""Route events: subnet routes and exit nodes, with double opt-in.

A route is usable when the node advertises it *and* it is approved (by an admin or by the
policy's autoApprovers). The two halves are separate events so that the log shows who
did which.
"""

from __future__ import annotations

from .base import Event

__all__ = ["RoutePrimaryChanged", "RoutesAdvertised", "RoutesApproved"]


class RoutesAdvertised(Event, frozen=True, kw_only=True, tag="node.routes_advertised"):
    """The node's set of advertised routes (``Hostinfo.RoutableIPs``) is now ``routes``."""

    node_id: int
    routes: tuple[str, ...]


class RoutesApproved(Event, frozen=True, kw_only=True, tag="node.routes_approved", omit_defaults=True):
    """The node's set of approved routes is now ``routes``.

    ``auto``: approved by the policy's autoApprovers as part of the node's own login or
    Hostinfo update (recorded with the node as actor, in the same transaction as the
    advertisement); not written when false, so older payloads are unchanged.
    """

    node_id: int
    routes: tuple[str, ...]
    auto: bool = False


class RoutePrimaryChanged(Event, frozen=True, kw_only=True, tag="route.primary_changed"):
    """The primary router of subnet ``prefix`` is now node ``node_id`` (``None``: no router
    serves it any more), instead of ``previous_node_id``.

    Of the routers that serve (advertise and have approved) a subnet, one, the primary,
    carries it in its peers' AllowedIPs. Which one depends on which routers are online,
    which the log does not otherwise know, so every change is recorded (by the server,
    actor ``system:ha``), with ``reason``: ``"elected"`` (the prefix's first router),
    ``"offline"`` (the primary went offline and an online router took over),
    ``"no longer serves"`` (the primary stopped advertising the prefix, lost its
    approval or was deleted), ``"no router"``.
    """

    prefix: str
    node_id: int | None
    previous_node_id: int | None = None
    reason: str
