"""The policy engine's view of a state is reused while users and nodes are unchanged."""

from __future__ import annotations

from projections import commands as c
from projections.policy.tailnet import Tailnet
from projections.policystate import policy_tailnet
from tests.support.builders import random_history


def _summary(tailnet: Tailnet) -> list[tuple[object, ...]]:
    return sorted((n.id, n.addrs, n.owner, n.tags) for n in tailnet.nodes.values())


def test_policy_tailnet_is_reused_for_the_same_maps_only() -> None:
    r = random_history([(0, 1), (3, 1), (4, 2), (3, 3), (7, 1)], seed=3)
    first = policy_tailnet(r.state)
    assert policy_tailnet(r.state) is first
    # A policy change keeps users and nodes: same view.
    r.run(lambda s: c.decide_set_policy(s, '{"acls": []}', source="test"))
    assert policy_tailnet(r.state) is first
    # A node change does not: a new view, equal to one built from scratch.
    node_id = sorted(r.state.nodes)[0]
    r.run(lambda s: c.decide_set_tags(s, str(node_id), ("tag:changed",)))
    second = policy_tailnet(r.state)
    assert second is not first
    assert any("tag:changed" in info.tags for info in second.nodes.values())
    assert _summary(second) != _summary(first)
