"""Role autogroups as nodeAttrs targets, SSH sources and rule sources.

``autogroup:admin`` is every user whose role is admin or owner (an owner is an
admin too), ``autogroup:owner`` the owner alone; tagged devices have no user and
so no role. The other Tailscale roles (it-admin, network-admin, billing-admin,
auditor) are valid wherever a role is, and name nobody in a tailnet that only
has owners, admins and members.
"""

from __future__ import annotations

import json

import pytest

from cli.policy_evaluate import evaluate_case

USERS = [
    {"id": 1, "name": "odin", "email": "odin@example.com", "role": "owner"},
    {"id": 2, "name": "thor", "email": "thor@example.org", "role": "admin"},
    {"id": 3, "name": "loki", "email": "loki@example.com", "role": "member"},
]
NODES: dict[str, object] = {
    **{
        name: {"ipv4": f"100.64.0.{i}", "ipv6": f"fd7a:115c:a1e0::{i}", "user": name}
        for i, name in enumerate(("odin", "thor", "loki"), start=1)
    },
    "srv": {"ipv4": "100.64.0.9", "ipv6": "fd7a:115c:a1e0::9", "tags": ["tag:srv"]},
}


def evaluate(policy: dict[str, object]) -> dict[str, object]:
    policy = {"tagOwners": {"tag:srv": ["odin@example.com"]}, **policy}
    return evaluate_case(
        {"id": "roles", "users": USERS, "nodes": NODES, "policy": json.dumps(policy)}
    )


@pytest.mark.parametrize(
    ("target", "holders"),
    [
        ("autogroup:admin", {"odin", "thor"}),
        ("autogroup:owner", {"odin"}),
        ("autogroup:member", {"odin", "thor", "loki"}),
        ("autogroup:tagged", {"srv"}),
        ("autogroup:network-admin", set()),
    ],
)
def test_node_attrs_target_roles(target: str, holders: set[str]) -> None:
    result = evaluate({"nodeAttrs": [{"target": [target], "attr": ["example.com/cap/x"]}]})
    assert result["accepted"] is True, result["error"]
    nodes = result["nodes"]
    assert isinstance(nodes, dict)
    assert {
        name for name, view in nodes.items() if "example.com/cap/x" in view["cap_map"]
    } == holders


def test_ssh_from_admins_lists_admin_devices_only() -> None:
    result = evaluate(
        {
            "grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"]}],
            "ssh": [
                {
                    "action": "accept",
                    "src": ["autogroup:admin"],
                    "dst": ["tag:srv"],
                    "users": ["root"],
                }
            ],
        }
    )
    assert result["accepted"] is True, result["error"]
    nodes = result["nodes"]
    assert isinstance(nodes, dict)
    (rule,) = nodes["srv"]["ssh_policy"]["rules"]
    principals = {p["nodeIP"] for p in rule["principals"]}
    assert principals == {"100.64.0.1", "fd7a:115c:a1e0::1", "100.64.0.2", "fd7a:115c:a1e0::2"}


@pytest.mark.parametrize(
    "group",
    [
        "autogroup:it-admin",
        "autogroup:network-admin",
        "autogroup:billing-admin",
        "autogroup:auditor",
    ],
)
def test_other_roles_are_valid_sources_naming_nobody(group: str) -> None:
    result = evaluate(
        {"acls": [{"action": "accept", "src": [group, "loki@example.com"], "dst": ["*:*"]}]}
    )
    assert result["accepted"] is True, result["error"]
    nodes = result["nodes"]
    assert isinstance(nodes, dict)
    src = {ip for rule in nodes["srv"]["packet_filter"] for ip in rule["SrcIPs"]}
    assert src == {"100.64.0.3", "fd7a:115c:a1e0::3"}

