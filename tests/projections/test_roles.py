"""User roles (owner, admin, member): recorded in the log, folded into the state, and
matched by ``autogroup:admin`` / ``autogroup:owner`` in policies."""

from __future__ import annotations

import json

import msgspec
import pytest

from eventlog.codec import decode_event
from eventlog.events import UserCreated, UserRoleSet
from projections import CommandError
from projections import commands as c
from projections.policystate import PolicyCompiler
from tests.support.builders import Recorder


def test_the_first_user_becomes_owner_and_later_ones_members() -> None:
    r = Recorder()
    alice, bob = r.user("alice"), r.user("bob")
    assert (r.state.users[alice].role, r.state.users[bob].role) == ("owner", "member")
    carol = r.run(lambda s: c.decide_create_user(s, "carol", role="admin"))
    assert r.state.users[carol].role == "admin" and r.state.users[carol].is_admin
    created = [e.event for e in r.events if isinstance(e.event, UserCreated)]
    assert [e.role for e in created] == ["owner", "member", "admin"]


def test_the_first_user_may_be_created_with_another_role() -> None:
    r = Recorder()
    uid = r.run(lambda s: c.decide_create_user(s, "svc", role="member"))
    assert r.state.users[uid].role == "member"


def test_set_role_is_an_event_and_refuses_bad_changes() -> None:
    r = Recorder()
    alice, bob = r.user("alice"), r.user("bob")
    r.run(lambda s: c.decide_set_role(s, "bob", "admin"))
    assert r.state.users[bob].role == "admin"
    assert isinstance(r.events[-1].event, UserRoleSet)
    seq = r.state.seq
    for ref, role, message in [
        ("bob", "admin", "already has the role"),
        ("bob", "superuser", "invalid role"),
        ("alice", "member", "only owner"),
        ("ghost", "admin", "not found"),
    ]:
        with pytest.raises(CommandError, match=message):
            r.run(lambda s, ref=ref, role=role: c.decide_set_role(s, ref, role))  # type: ignore[misc]
    with pytest.raises(CommandError, match="invalid role"):
        r.run(lambda s: c.decide_create_user(s, "dave", role="root"))
    assert r.state.seq == seq
    # With a second owner, the first may step down.
    r.run(lambda s: c.decide_set_role(s, "bob", "owner"))
    r.run(lambda s: c.decide_set_role(s, "alice", "member"))
    assert r.state.users[alice].role == "member"


def test_users_recorded_before_roles_are_members() -> None:
    old = b'{"type":"user.created","user_id":1,"name":"alice"}'
    event = decode_event("user.created", 1, old)
    assert isinstance(event, UserCreated) and event.role == "member"


def _src_ips(r: Recorder, compiler: PolicyCompiler, node_id: int) -> set[str]:
    rules = msgspec.to_builtins(compiler.netmap(r.state, node_id).packet_filter)
    return {ip for rule in rules for ip in rule["SrcIPs"]}


@pytest.mark.parametrize("group", ["autogroup:admin", "autogroup:owner"])
def test_role_autogroups_follow_role_changes(group: str) -> None:
    r = Recorder()
    alice, bob = r.user("alice"), r.user("bob")
    na, nb = r.node(alice, "a"), r.node(bob, "b")
    policy = json.dumps({"acls": [{"action": "accept", "src": [group], "dst": ["*:*"]}]})
    r.run(lambda s: c.decide_set_policy(s, policy, source="db"))
    compiler = PolicyCompiler()
    a_ip, b_ip = r.state.nodes[na].ipv4, r.state.nodes[nb].ipv4
    assert a_ip in _src_ips(r, compiler, nb) and b_ip not in _src_ips(r, compiler, nb)
    r.run(lambda s: c.decide_set_role(s, "bob", "admin"))
    assert (b_ip in _src_ips(r, compiler, na)) == (group == "autogroup:admin")
    r.run(lambda s: c.decide_set_role(s, "bob", "owner"))
    assert b_ip in _src_ips(r, compiler, na)


def test_conformance_cases_carry_roles() -> None:
    """``policy evaluate`` builds the tailnet with each case user's ``role``."""
    from cli.policy_evaluate import evaluate_case

    case = {
        "id": "roles",
        "policy": '{"acls": [{"action": "accept", "src": ["autogroup:admin"], "dst": ["*:*"]}]}',
        "users": [
            {"id": 1, "name": "odin", "email": "odin@example.com", "role": "owner"},
            {"id": 2, "name": "thor", "email": "thor@example.org", "role": "admin"},
            {"id": 3, "name": "loki", "email": "loki@example.com", "role": "member"},
        ],
        "nodes": {
            name: {"ipv4": f"100.64.0.{i}", "ipv6": f"fd7a:115c:a1e0::{i}", "user": name}
            for i, name in enumerate(("odin", "thor", "loki"), start=1)
        },
    }
    result = evaluate_case(case)
    nodes = result["nodes"]
    assert isinstance(nodes, dict)
    src = {ip for rule in nodes["loki"]["packet_filter"] for ip in rule["SrcIPs"]}
    assert src == {"100.64.0.1", "fd7a:115c:a1e0::1", "100.64.0.2", "fd7a:115c:a1e0::2"}
