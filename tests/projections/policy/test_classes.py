"""Visibility classes are sound on every conformance tailnet.

:func:`projections.mapviews.hub.class_key` claims that nodes with equal keys see every
other node identically, which lets the server compute one peer view per class. Here
the claim is checked against the engine's per-node answers on all of Tailscale's
captured tailnets and policies: for any two nodes ``a`` and ``b`` of one class, the
peers ``a`` sees (leaving ``b`` out) and the peers ``b`` sees (leaving ``a`` out) are
the same, with the same AllowedIPs, routes and capabilities.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.policy_evaluate import build_tailnet
from projections.mapviews.hub import class_key
from projections.policy import PolicyError, check_policy_against, compile_policy, parse_policy

from .compare import CONFORMANCE_DIR, case_paths

pytestmark = pytest.mark.skipif(
    not CONFORMANCE_DIR.is_dir(), reason=f"conformance cases not found at {CONFORMANCE_DIR}"
)


@pytest.mark.parametrize("path", case_paths(), ids=lambda p: p.stem)
def test_members_of_a_class_see_the_same_peers(path: Path) -> None:
    case = json.loads(path.read_text(encoding="utf-8"))
    tailnet = build_tailnet(case)
    text = case["policy"] if isinstance(case["policy"], str) else json.dumps(case["policy"])
    try:
        policy = parse_policy(text)
        check_policy_against(policy, tailnet)
    except PolicyError:
        return  # a rejected policy is never compiled against a tailnet
    compiled = compile_policy(policy, tailnet, control_url="https://control.example")
    classes: dict[object, list[int]] = {}
    for nid in compiled.tailnet.nodes:
        classes.setdefault(class_key(compiled, nid), []).append(nid)
    for members in classes.values():
        first = members[0]
        for other in members[1:]:
            seen_by_first = {v.node_id: v for v in compiled.peers(first) if v.node_id != other}
            seen_by_other = {v.node_id: v for v in compiled.peers(other) if v.node_id != first}
            assert seen_by_first == seen_by_other, (first, other)
