"""The compiled policy: incremental updates, determinism, wire shape, routes."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli.policy_evaluate import build_tailnet
from projections.policy import (
    CompiledPolicy,
    FilterRule,
    NetPortRange,
    PolicyNode,
    PolicyUser,
    PortRangeWire,
    SSHAction,
    SSHPolicy,
    SSHPrincipal,
    SSHRuleWire,
    Tailnet,
    compile_policy,
    parse_policy,
)
from projections.policy.compile import GrantKind, self_rules
from projections.policy.ipset import Prefix
from projections.policy.resolve import Resolver, alias_dependencies, node_keys
from projections.policy.syntax import parse_alias
from projections.policy.tailnet import NodeInfo

from .compare import CONFORMANCE_DIR, case_paths


def snapshot(compiled: CompiledPolicy) -> dict[int, bytes]:
    """Every node's netmap, encoded."""
    return {i: msgspec.json.encode(compiled.netmap(i)) for i in sorted(compiled.tailnet.nodes)}


def _without(tailnet: Tailnet, node_id: int) -> Tailnet:
    return Tailnet(
        tailnet.users.values(), [n.node for n in tailnet.iter_nodes() if n.id != node_id]
    )


def _check_join_and_leave(policy_text: str, tailnet: Tailnet) -> None:
    policy = parse_policy(policy_text)
    everyone = compile_policy(policy, tailnet)
    for info in list(tailnet.iter_nodes()):
        base = compile_policy(policy, _without(tailnet, info.id))
        joined = base.with_node(info.node)
        full = compile_policy(policy, tailnet, previous_primaries=base.primaries)
        assert snapshot(joined) == snapshot(full), f"join of {info.node.name}"
        left = everyone.without_node(info.id)
        full_left = compile_policy(
            policy, _without(tailnet, info.id), previous_primaries=everyone.primaries
        )
        assert snapshot(left) == snapshot(full_left), f"leave of {info.node.name}"


_SAMPLE = [p for i, p in enumerate(case_paths()) if i % 12 == 0]


@pytest.mark.skipif(not CONFORMANCE_DIR.is_dir(), reason="conformance cases not available")
@pytest.mark.parametrize("path", _SAMPLE, ids=[p.stem for p in _SAMPLE])
def test_incremental_equals_full_compile_on_cases(path: Path) -> None:
    case = json.loads(path.read_text(encoding="utf-8"))
    policy = case["policy"] if case["accepted"] else "{}"  # rejected: default policy
    text = policy if isinstance(policy, str) else json.dumps(policy)
    _check_join_and_leave(text, build_tailnet(case))


# -- a synthetic tailnet for property tests -------------------------------------

USERS = [PolicyUser(id=i, login=f"u{i}@example.com", name=f"u{i}") for i in (1, 2, 3)]
POLICY = json.dumps(
    {
        "groups": {"group:ops": ["u1@example.com", "u2@example.com"]},
        "tagOwners": {"tag:web": ["group:ops"], "tag:db": ["group:ops"], "tag:gw": ["group:ops"]},
        "hosts": {"lan": "10.1.0.0/16"},
        "autoApprovers": {"routes": {"10.0.0.0/8": ["tag:gw"]}, "exitNode": ["tag:gw"]},
        "acls": [
            {"action": "accept", "src": ["group:ops"], "dst": ["tag:web:443", "tag:db:5432"]},
            {"action": "accept", "src": ["*"], "dst": ["autogroup:self:*"]},
            {"action": "accept", "src": ["tag:web"], "dst": ["lan:*"]},
        ],
        "grants": [
            {
                "src": ["autogroup:member"],
                "dst": ["tag:web"],
                "app": {"example.com/cap/web": [{"r": 1}]},
            },
            {"src": ["u3@example.com"], "dst": ["10.1.0.0/16"], "ip": ["*"], "via": ["tag:gw"]},
        ],
        "ssh": [{"action": "accept", "src": ["group:ops"], "dst": ["tag:db"], "users": ["root"]}],
        "nodeAttrs": [{"target": ["tag:gw"], "attr": ["randomize-client-port"]}],
    }
)


@st.composite
def synthetic_node(draw: st.DrawFn, node_id: int) -> PolicyNode:
    tags = draw(
        st.sampled_from([(), (), ("tag:web",), ("tag:db",), ("tag:gw",), ("tag:web", "tag:db")])
    )
    routes: tuple[str, ...] = ()
    if "tag:gw" in tags:
        routes = draw(st.sampled_from([("10.1.0.0/16",), ("10.1.0.0/16", "0.0.0.0/0"), ()]))
    return PolicyNode(
        id=node_id,
        name=f"n{node_id}",
        user_id=draw(st.sampled_from([1, 2, 3])),
        tags=tags,
        ipv4=f"100.64.0.{node_id}",
        ipv6=f"fd7a:115c:a1e0::{node_id:x}",
        routable_ips=routes,
    )


@st.composite
def operations(draw: st.DrawFn) -> tuple[list[PolicyNode], list[tuple[str, PolicyNode | int]]]:
    initial = [draw(synthetic_node(i)) for i in range(1, draw(st.integers(1, 6)) + 1)]
    ops: list[tuple[str, PolicyNode | int]] = []
    next_id = len(initial) + 1
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["join", "leave", "change"]))
        if kind == "join":
            ops.append(("join", draw(synthetic_node(next_id))))
            next_id += 1
        elif kind == "leave":
            ops.append(("leave", draw(st.integers(1, next_id))))
        else:
            ops.append(("change", draw(synthetic_node(draw(st.integers(1, next_id))))))
    return initial, ops


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations())
def test_incremental_updates_match_a_naive_recompute(
    scenario: tuple[list[PolicyNode], list[tuple[str, PolicyNode | int]]],
) -> None:
    initial, ops = scenario
    policy = parse_policy(POLICY)
    nodes = {n.id: n for n in initial}
    compiled = compile_policy(policy, Tailnet(USERS, nodes.values()))
    for kind, arg in ops:
        previous = compiled.primaries
        if isinstance(arg, PolicyNode):
            compiled = compiled.with_node(arg)
            nodes[arg.id] = arg
        else:
            compiled = compiled.without_node(arg)
            nodes.pop(arg, None)
        naive = compile_policy(policy, Tailnet(USERS, nodes.values()), previous_primaries=previous)
        assert snapshot(compiled) == snapshot(naive), kind


def test_a_join_reuses_the_merged_rules_it_does_not_change() -> None:
    """Issue 19: merged global rules made only of grants a join leaves alone are the
    earlier compile's objects (their matchers and signatures are computed once), and
    the merged rules still equal a fresh compile's."""
    policy = parse_policy(json.dumps({
        "groups": {"group:a": ["u1@example.com"], "group:b": ["u2@example.com"]},
        "tagOwners": {"tag:x": ["group:a"], "tag:y": ["group:a"]},
        "acls": [
            {"action": "accept", "src": ["group:a"], "dst": ["tag:x:22", "tag:y:80"]},
            {"action": "accept", "src": ["group:b"], "dst": ["tag:x:443", "tag:y:443"]},
        ],
    }))
    nodes = [
        PolicyNode(id=1, name="a", user_id=1, ipv4="100.64.0.1"),
        PolicyNode(id=2, name="b", user_id=2, ipv4="100.64.0.2"),
        PolicyNode(id=3, name="x", user_id=1, tags=("tag:x",), ipv4="100.64.0.3"),
        PolicyNode(id=4, name="y", user_id=1, tags=("tag:y",), ipv4="100.64.0.4"),
    ]
    before = compile_policy(policy, Tailnet(USERS, nodes))
    rules_before = before.global_rules
    assert len(rules_before) == 2 and all(len(r.dst) == 2 for r in rules_before)
    after = before.with_node(PolicyNode(id=5, name="a2", user_id=1, ipv4="100.64.0.5"))  # group:a
    fresh = compile_policy(policy, Tailnet(USERS, [*nodes, after.tailnet.nodes[5].node]))
    assert [r.wire() for r in after.global_rules] == [r.wire() for r in fresh.global_rules]
    a_before, b_before = rules_before
    a_after, b_after = after.global_rules
    assert b_after is b_before  # group:b's merged rule: its grants were not recompiled
    assert a_after is not a_before and "100.64.0.5" in a_after.src
    assert after.global_matches[1] is before.global_matches[1]


def test_a_join_takes_over_the_destination_entries_of_the_members_it_keeps() -> None:
    """Issue 19: a device joining a group that is a rule's destination recompiles that
    rule, but the DstPorts entries of the members already there are the earlier
    compile's objects (one lookup per address, not a new entry and set each); the
    rules equal a fresh compile's, and so do the entries of the newcomer."""
    policy = parse_policy(json.dumps({
        "groups": {"group:a": ["u1@example.com", "u2@example.com"]},
        "acls": [{"action": "accept", "src": ["group:a"], "dst": ["group:a:22,5900-5901"]}],
    }))
    nodes = [PolicyNode(id=i, name=f"n{i}", user_id=1 + i % 2, ipv4=f"100.64.0.{i}") for i in range(1, 5)]
    before = compile_policy(policy, Tailnet(USERS, nodes))
    [rule_before] = before.global_rules
    assert len(rule_before.dst) == 8  # 4 members x 2 port ranges
    after = before.with_node(PolicyNode(id=5, name="n5", user_id=2, ipv4="100.64.0.5"))
    fresh = compile_policy(policy, Tailnet(USERS, [*nodes, after.tailnet.nodes[5].node]))
    assert [r.wire() for r in after.global_rules] == [r.wire() for r in fresh.global_rules]
    [rule_after] = after.global_rules
    kept = [e for e in rule_after.dst if e.ip != "100.64.0.5"]
    assert len(kept) == 8 and all(a is b for a, b in zip(kept, rule_before.dst, strict=True))
    assert [e.ip for e in rule_after.dst if e not in kept] == ["100.64.0.5", "100.64.0.5"]
    assert after.filters_changed_since(before, {5}) == frozenset(range(1, 6))


def test_grants_naming_one_member_share_its_destination_entries() -> None:
    """Issue 19, memory: a tag several rules name on the same ports gets one entry tuple
    per member, and on other ports one text and one address set, shared by every grant
    rather than a copy each; the table that shared them is not kept with the compile
    (and a join drops the earlier one's), and the rules equal what they were."""
    policy = parse_policy(json.dumps({
        "groups": {"group:a": ["u1@example.com"], "group:b": ["u2@example.com"]},
        "tagOwners": {"tag:x": ["group:a"]},
        "acls": [
            {"action": "accept", "src": ["group:a"], "dst": ["tag:x:22,80"]},
            {"action": "accept", "src": ["group:b"], "dst": ["tag:x:22,80"]},
            {"action": "accept", "src": ["tag:x"], "dst": ["tag:x:5432"]},
        ],
    }))
    nodes = [
        PolicyNode(id=1, name="a", user_id=1, ipv4="100.64.0.1"),
        PolicyNode(id=2, name="b", user_id=2, ipv4="100.64.0.2"),
        PolicyNode(id=3, name="x", user_id=1, tags=("tag:x",), ipv4="100.64.0.3", ipv6="fd7a:115c:a1e0::3"),
    ]
    compiled = compile_policy(policy, Tailnet(USERS, nodes), auto_approve=False)
    a, b, c = compiled.global_rules
    assert [e.ip for e in a.dst] == ["100.64.0.3", "100.64.0.3", "fd7a:115c:a1e0::3", "fd7a:115c:a1e0::3"]
    assert all(x is y for x, y in zip(a.dst, b.dst, strict=True))
    v4_22, v4_80, v6_22, _ = a.dst
    [v4_5432, v6_5432] = c.dst
    assert v4_5432 is not v4_22 and (v4_5432.first, v4_22.first, v4_80.first) == (5432, 22, 80)
    assert v4_5432.addresses is v4_22.addresses is v4_80.addresses
    assert v4_5432.ip is v4_22.ip and v6_5432.addresses is v6_22.addresses
    assert all(type(v).__name__ != "_SharedEntries" for v in compiled.resolver.memo.values())
    joined = compiled.with_node(PolicyNode(id=4, name="y", user_id=1, tags=("tag:x",), ipv4="100.64.0.4"))
    assert all(type(v).__name__ != "_SharedEntries" for v in joined.resolver.memo.values())
    ja, jb, _ = joined.global_rules
    assert all(x is y for x, y in zip(ja.dst, jb.dst, strict=True))
    assert all(any(e is k for k in ja.dst) for e in a.dst)  # the members there keep theirs
    fresh = compile_policy(policy, Tailnet(USERS, [*nodes, joined.tailnet.nodes[4].node]), auto_approve=False)
    assert [r.wire() for r in joined.global_rules] == [r.wire() for r in fresh.global_rules]


def test_nodes_carrying_the_same_tags_share_one_tag_set() -> None:
    """Issue 19, memory: a node's tag set is shared by every node carrying the same
    tags (all untagged nodes share the empty one), not a frozenset each; it is still
    the set of its tags."""
    infos = [
        NodeInfo(PolicyNode(id=1, name="a", user_id=1, ipv4="100.64.0.1")),
        NodeInfo(PolicyNode(id=2, name="b", user_id=2, ipv4="100.64.0.2")),
        NodeInfo(PolicyNode(id=3, name="x", tags=("tag:x", "tag:y"), ipv4="100.64.0.3")),
        NodeInfo(PolicyNode(id=4, name="y", tags=("tag:x", "tag:y"), ipv4="100.64.0.4")),
        NodeInfo(PolicyNode(id=5, name="z", tags=("tag:x",), ipv4="100.64.0.5")),
    ]
    assert infos[0].tags is infos[1].tags and infos[0].tags == frozenset()
    assert infos[2].tags is infos[3].tags and infos[2].tags == frozenset({"tag:x", "tag:y"})
    assert infos[4].tags == frozenset({"tag:x"}) and infos[4].tags is not infos[2].tags


def test_a_map_streams_packet_filter_keeps_no_reduced_rules_per_node() -> None:
    """Issue 19, memory: the packet filter JSON a map stream asks for (once per compile
    for a node whose filter changed) leaves no reduced rules kept for the node in the
    compiled policy; it is byte for byte the encoding of :meth:`packet_filter`."""
    policy = parse_policy(json.dumps({
        "groups": {"group:a": ["u1@example.com", "u2@example.com"]},
        "acls": [
            {"action": "accept", "src": ["group:a"], "dst": ["group:a:22"]},
            {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
        ],
    }))
    nodes = [PolicyNode(id=i, name=f"n{i}", user_id=1 + i % 2, ipv4=f"100.64.0.{i}") for i in range(1, 5)]
    compiled = compile_policy(policy, Tailnet(USERS, nodes), auto_approve=False)
    texts = {n.id: compiled.packet_filter_json(n.id) for n in nodes}
    assert compiled._filters == {}
    for n in nodes:
        assert texts[n.id] == msgspec.json.encode(compiled.packet_filter(n.id))
        assert b"SrcIPs" in texts[n.id]
    assert set(compiled._filters) == {n.id for n in nodes}  # filter_rules still keeps them
    assert all(compiled.packet_filter_json(n.id) == texts[n.id] for n in nodes)


def test_devices_of_one_owner_share_their_rules_and_routeless_peers_one_view() -> None:
    """Issue 19: ``autogroup:self`` rules depend only on the owner, so an owner's
    devices share their unreduced rules (computed once), and a peer without routes is
    seen alike by every viewer (one view object); each filter and peer list still
    equals one computed for that node alone, on a fresh compile."""
    policy = parse_policy(json.dumps({
        "acls": [
            {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
            {"action": "accept", "src": ["u3@example.com"], "dst": ["*:443"]},
        ],
    }))
    nodes = [
        PolicyNode(id=i, name=f"n{i}", user_id=1 + (i - 1) // 2, ipv4=f"100.64.0.{i}")
        for i in range(1, 7)
    ]  # u1: 1, 2; u2: 3, 4; u3: 5, 6
    tailnet = Tailnet(USERS, nodes)
    compiled = compile_policy(policy, tailnet)
    assert compiled.unreduced_rules(1) is compiled.unreduced_rules(2)
    assert compiled.unreduced_rules(1) is not compiled.unreduced_rules(3)
    shared = {i: compiled.packet_filter(i) for i in range(1, 7)}
    views = {i: compiled.peers(i) for i in range(1, 7)}
    for i in range(1, 7):
        alone = compile_policy(policy, tailnet)
        assert alone.packet_filter(i) == shared[i], i
        assert alone.peers(i) == views[i], i
    [seen_by_2] = [v for v in views[2] if v.node_id == 5]
    [seen_by_3] = [v for v in views[3] if v.node_id == 5]
    assert seen_by_2 is seen_by_3


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations())
def test_an_identity_alias_edited_for_one_node_equals_resolving_it_afresh(
    scenario: tuple[list[PolicyNode], list[tuple[str, PolicyNode | int]]],
) -> None:
    """Issue 19: after a node change, the aliases it touched are edited from their
    previous answer (sorted addresses, set, strings, prefixes), not re-sorted from
    every member; each equals a fresh resolution."""
    initial, ops = scenario
    policy = parse_policy(POLICY)
    aliases = [
        parse_alias(a) for a in ("autogroup:member", "autogroup:tagged", "group:ops", "tag:web", "u3@example.com")
    ]
    resolver = Resolver(policy, Tailnet(USERS, initial))
    for alias in aliases:
        resolver.resolve(alias).strings()
    for _kind, arg in ops:
        tailnet = resolver.tailnet
        change: tuple[NodeInfo | None, NodeInfo | None]
        if isinstance(arg, PolicyNode):
            old, new_tailnet = tailnet.nodes.get(arg.id), tailnet.with_node(arg)
            change = (old, new_tailnet.nodes[arg.id])
        else:
            old, new_tailnet = tailnet.nodes.get(arg), tailnet.without_node(arg)
            change = (old, None)
        touched: set[str] = set()
        if change[0] is not None:
            touched |= node_keys(change[0], tailnet)
        if change[1] is not None:
            touched |= node_keys(change[1], new_tailnet)
        resolver = resolver.derive(new_tailnet, touched, change)
        fresh = Resolver(policy, new_tailnet)
        for i, alias in enumerate(aliases):
            got, want = resolver.resolve(alias), fresh.resolve(alias)
            assert (got.hosts, got.addresses, got.ids) == (want.hosts, want.addresses, want.ids), alias
            if i % 2 == 0:
                assert got.strings() == want.strings() and got.prefixes() == want.prefixes(), alias


def test_alias_dependencies_are_memoized_across_derived_resolvers() -> None:
    """Issue 19 (registration CPU): a join's derive asks every cached alias for its
    dependency keys; they follow from the policy alone, so they are computed once per
    alias and the memo goes on to the derived resolver (same answers as
    alias_dependencies, and a group alias still depends on its members)."""
    policy = parse_policy(POLICY)
    nodes = [PolicyNode(id=1, name="a", user_id=1, ipv4="100.64.0.1")]
    resolver = Resolver(policy, Tailnet(USERS, nodes))
    aliases = [parse_alias(a) for a in ("autogroup:member", "group:ops", "tag:web", "u3@example.com")]
    for alias in aliases:
        resolver.resolve(alias)
        assert resolver.dependencies([alias]) == alias_dependencies([alias], policy)
    assert resolver.dependencies(aliases) == alias_dependencies(aliases, policy)
    memo = dict(resolver._deps)
    tailnet = resolver.tailnet.with_node(PolicyNode(id=2, name="b", user_id=3, ipv4="100.64.0.2"))
    derived = resolver.derive(tailnet, node_keys(tailnet.nodes[2], tailnet), (None, tailnet.nodes[2]))
    assert derived._deps is resolver._deps and derived._deps == memo
    assert derived.resolve(aliases[3]).ids == frozenset({2})


def test_compile_is_deterministic() -> None:
    nodes = [
        PolicyNode(
            id=i,
            name=f"n{i}",
            user_id=1 + i % 3,
            tags=("tag:web",) if i % 4 == 0 else (),
            ipv4=f"100.64.0.{i}",
            ipv6=f"fd7a:115c:a1e0::{i:x}",
        )
        for i in range(1, 12)
    ]
    policy = parse_policy(POLICY)
    first = snapshot(compile_policy(policy, Tailnet(USERS, nodes)))
    second = snapshot(compile_policy(policy, Tailnet(USERS, list(reversed(nodes)))))
    assert first == second


def test_allow_all_is_a_full_mesh() -> None:
    nodes = [
        PolicyNode(
            id=i,
            name=f"n{i}",
            user_id=1,
            tags=("tag:x",) if i % 2 else (),
            ipv4=f"100.64.0.{i}",
            ipv6=f"fd7a:115c:a1e0::{i:x}",
        )
        for i in range(1, 7)
    ]
    compiled = compile_policy(parse_policy("{}"), Tailnet(USERS, nodes))
    for node in nodes:
        assert compiled.peer_ids(node.id) == [n.id for n in nodes if n.id != node.id]
        (rule,) = compiled.packet_filter(node.id)
        assert rule.dst_ports == (NetPortRange(ip="*", ports=PortRangeWire(first=0, last=65535)),)


def test_wire_encoding_matches_tailcfg() -> None:
    rule = FilterRule(
        src_ips=("100.64.0.1",),
        dst_ports=(NetPortRange(ip="*", ports=PortRangeWire(first=0, last=65535)),),
    )
    assert msgspec.json.encode(rule) == (
        b'{"SrcIPs":["100.64.0.1"],"DstPorts":[{"IP":"*","Ports":{"First":0,"Last":65535}}]}'
    )
    assert msgspec.json.encode(FilterRule(src_ips=())) == b'{"SrcIPs":[]}'
    ssh = SSHPolicy(
        rules=(
            SSHRuleWire(
                principals=(SSHPrincipal(node_ip="100.64.0.1"),),
                ssh_users={"root": ""},
                action=SSHAction(hold_and_delegate="https://x/check"),
            ),
        )
    )
    assert msgspec.json.encode(ssh) == (
        b'{"rules":[{"principals":[{"nodeIP":"100.64.0.1"}],"sshUsers":{"root":""},'
        b'"action":{"holdAndDelegate":"https://x/check"}}]}'
    )
    assert msgspec.json.encode(SSHPolicy()) == b'{"rules":[]}'


def _routers(*ids: int) -> list[PolicyNode]:
    return [
        PolicyNode(
            id=i,
            name=f"r{i}",
            tags=("tag:gw",),
            ipv4=f"100.64.0.{i}",
            routable_ips=("10.1.0.0/16",),
            approved_routes=("10.1.0.0/16",),
        )
        for i in ids
    ]


def test_lowest_id_router_is_primary_and_failover_is_sticky() -> None:
    policy = parse_policy(POLICY)
    compiled = compile_policy(policy, Tailnet(USERS, _routers(5, 7)))
    prefix = next(iter(compiled.primaries))
    assert compiled.primaries == {prefix: 5}
    assert compiled.netmap(5).primary_routes == ("10.1.0.0/16",)
    assert compiled.netmap(7).primary_routes == ()
    assert "10.1.0.0/16" in compiled.netmap(7).allowed_ips  # served, not primary
    failed_over = compiled.without_node(5)
    assert failed_over.primaries == {prefix: 7}
    rejoined = failed_over.with_node(_routers(5)[0])
    assert rejoined.primaries == {prefix: 7}  # the current primary keeps the route


def test_auto_approval_serves_routes_and_exit_nodes() -> None:
    policy = parse_policy(POLICY)
    gateway = PolicyNode(
        id=1,
        name="gw",
        tags=("tag:gw",),
        ipv4="100.64.0.1",
        routable_ips=("10.1.0.0/16", "0.0.0.0/0", "::/0"),
    )
    stranger = PolicyNode(
        id=2, name="x", tags=("tag:web",), ipv4="100.64.0.2", routable_ips=("10.2.0.0/16",)
    )
    compiled = compile_policy(policy, Tailnet(USERS, [gateway, stranger]))
    assert set(compiled.netmap(1).allowed_ips) >= {"10.1.0.0/16", "0.0.0.0/0", "::/0"}
    assert "10.2.0.0/16" not in compiled.netmap(2).allowed_ips
    assert compiled.primaries == {
        Prefix(compiled.tailnet.nodes[1].subnet_routes[0].lo, 16, True): 1
    }


def test_self_rules_take_the_address_sets_the_global_rules_made() -> None:
    """Issue 19, memory: an owner's ``autogroup:self`` destinations take the one-address
    set the grants of the compile made for the same node address, not a copy per
    address; their rules are what a self rule without that table makes."""
    policy = parse_policy(json.dumps({
        "acls": [
            {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:22"]},
            {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
        ],
    }))
    nodes = [
        PolicyNode(id=1, name="a", user_id=1, ipv4="100.64.0.1", ipv6="fd7a:115c:a1e0::1"),
        PolicyNode(id=2, name="b", user_id=1, ipv4="100.64.0.2"),
        PolicyNode(id=3, name="c", user_id=2, ipv4="100.64.0.3"),
    ]
    compiled = compile_policy(policy, Tailnet(USERS, nodes), auto_approve=False)
    [member] = compiled.global_rules
    by_ip = {e.ip: e for e in member.dst}
    own = [e for r in compiled.extra_rules(1) for e in r.dst]
    assert sorted(e.ip for e in own) == sorted(["100.64.0.1", "100.64.0.2", "fd7a:115c:a1e0::1"])
    for e in own:
        assert e.addresses is by_ip[e.ip].addresses
    [grant] = [g for g in compiled.grants if g.kind is GrantKind.SELF]
    node = compiled.tailnet.nodes[1]
    plain = self_rules(grant, node, compiled.tailnet)
    assert [r.wire() for r in compiled.extra_rules(1)] == [r.wire() for r in plain]
    assert all(e.addresses is not by_ip[e.ip].addresses for r in plain for e in r.dst)


def test_a_grant_naming_one_alias_takes_its_strings_as_src_ips() -> None:
    """Issue 19, memory: a grant whose one source is an identity alias takes the
    alias's resolved strings as its ``SrcIPs`` rather than an equal copy; a grant
    naming two aliases still renders them concatenated, and a join keeps both right."""
    policy = parse_policy(json.dumps({
        "groups": {"group:a": ["u1@example.com", "u2@example.com"]},
        "acls": [
            {"action": "accept", "src": ["group:a"], "dst": ["*:22"]},
            {"action": "accept", "src": ["group:a", "u3@example.com"], "dst": ["*:80"]},
        ],
    }))
    nodes = [
        PolicyNode(id=1, name="a", user_id=1, ipv4="100.64.0.1", ipv6="fd7a:115c:a1e0::1"),
        PolicyNode(id=2, name="b", user_id=2, ipv4="100.64.0.2"),
        PolicyNode(id=3, name="c", user_id=3, ipv4="100.64.0.3"),
    ]
    compiled = compile_policy(policy, Tailnet(USERS, nodes), auto_approve=False)
    group = compiled.resolver.resolve(parse_alias("group:a"))
    one, two = compiled.global_rules
    assert one.src is group.strings()
    assert one.src == ("100.64.0.1", "100.64.0.2", "fd7a:115c:a1e0::1")
    assert two.src == (*one.src, "100.64.0.3")
    joined = compiled.with_node(PolicyNode(id=4, name="d", user_id=2, ipv4="100.64.0.4"))
    fresh = compile_policy(policy, Tailnet(USERS, [*nodes, joined.tailnet.nodes[4].node]), auto_approve=False)
    assert [r.wire() for r in joined.global_rules] == [r.wire() for r in fresh.global_rules]
    assert joined.global_rules[0].src is joined.resolver.resolve(parse_alias("group:a")).strings()


def test_destination_entries_carry_no_gc_header() -> None:
    """Issue 19, memory: a compiled rule's ``DstPorts`` entries (several per node at
    corp) are not tracked by the garbage collector -- they cannot reach back to
    themselves -- and still compare by identity."""
    policy = parse_policy(json.dumps({
        "acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:22,80"]}],
    }))
    nodes = [PolicyNode(id=1, name="a", user_id=1, ipv4="100.64.0.1")]
    [rule] = compile_policy(policy, Tailnet(USERS, nodes), auto_approve=False).global_rules
    ssh, web = rule.dst
    assert (ssh.ip, ssh.first, web.first) == ("100.64.0.1", 22, 80)
    assert not gc.is_tracked(ssh) and not gc.is_tracked(web)
    again = type(ssh)(ssh.ip, ssh.first, ssh.last, ssh.addresses)
    assert again != ssh and again == again
