"""``wire_node``: what a peer's ``tailcfg.Node`` keeps (issue 19, memory)."""

from __future__ import annotations

from datetime import UTC, datetime

from projections.netmap import NetmapSettings, wire_node
from projections.state import Node
from projections.tailcfg import DERPMap, encode

SETTINGS = NetmapSettings(domain="example.ts.net", derp_map=DERPMap(regions={}))


def _node() -> Node:
    return Node(
        id=7, machine_key="a" * 64, node_key="b" * 64, user_id=1, hostname="h", given_name="h",
        ipv4="100.64.0.7", ipv6="fd7a:115c:a1e0::7", tags=(), ephemeral=False, expiry=None,
        created_at=datetime(2026, 1, 1, tzinfo=UTC), auth="test", preauthkey_id=None,
    )


def test_a_routeless_peer_keeps_one_address_list_of_the_views_strings() -> None:
    """A peer whose view allows exactly its addresses holds one list, of the view's
    strings, for ``Addresses`` and ``AllowedIPs``; with routes the two differ."""
    view = ("100.64.0.7/32", "fd7a:115c:a1e0::7/128")
    wire = wire_node(_node(), None, SETTINGS, allowed_ips=view, primary_routes=(), cap_map={}, is_self=False)
    assert wire.addresses is wire.allowed_ips
    assert wire.addresses is not None
    assert all(a is b for a, b in zip(wire.addresses, view, strict=True))
    routed = (*view, "10.0.0.0/24")
    other = wire_node(_node(), None, SETTINGS, allowed_ips=routed, primary_routes=(), cap_map={}, is_self=False)
    assert other.addresses == list(view) and other.allowed_ips == list(routed)
    assert other.addresses is not other.allowed_ips
    assert encode(wire) == encode(
        wire_node(_node(), None, SETTINGS, allowed_ips=(), primary_routes=(), cap_map={}, is_self=False)
    )
