"""Shared per-key SSH policies and bounded filter recomputation equal the per-node
reference (issue 19, item 6).

For random policies (groups, tags, ``autogroup:self``, ``check`` mode, localpart
users, grants with app caps, CIDR hosts, routes) and random histories of joins,
leaves and changes, after every step:

* every node's SSH policy rendered from its :class:`SSHTable` key equals
  :func:`compile_ssh_policy` for that node;
* an answer kept from an earlier table because its tokens are the same objects
  (what :class:`~projections.mapviews.hub.SSHCache` relies on) still equals the
  reference;
* every node outside :meth:`CompiledPolicy.filters_changed_since` has the very same
  packet filter as before the step, and the filters equal a fresh compile's;
* one-candidate visibility on a fresh compile equals the peer sets.
"""

from __future__ import annotations

import json
from typing import Protocol, Self, TypeVar

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from projections.policy import (
    CompiledPolicy,
    PolicyNode,
    PolicyUser,
    Tailnet,
    compile_policy,
    parse_policy,
)
from projections.policy.filter import reduce_rules
from projections.policy.ipset import IPSet, parse_prefix
from projections.policy.ssh import SSHKey, compile_ssh_policy

USERS = [PolicyUser(id=i, login=f"u{i}@example.com", name=f"u{i}") for i in (1, 2, 3, 4)]
TAGS = ["tag:web", "tag:db", "tag:gw"]
ALIASES = [
    "*", "autogroup:member", "autogroup:tagged", "group:ops", "group:dev", "u1@example.com",
    "u3@example.com", "tag:web", "tag:db", "tag:gw", "lan", "100.64.0.0/29",
]
SSH_DSTS = ["autogroup:self", "autogroup:member", "autogroup:tagged", "tag:web", "tag:db", "group:ops", "u2@example.com"]
SSH_USERS = [["root"], ["autogroup:nonroot"], ["localpart:*@example.com"], ["root", "ubuntu"],
             ["autogroup:nonroot", "localpart:*@example.com"]]
CTRL = "https://control.example"


@st.composite
def policies(draw: st.DrawFn) -> str:
    acls = []
    for _ in range(draw(st.integers(0, 6))):
        src = draw(st.lists(st.sampled_from(ALIASES), min_size=1, max_size=2, unique=True))
        dst = draw(st.lists(st.sampled_from([*ALIASES, "autogroup:self"]), min_size=1, max_size=2, unique=True))
        if "autogroup:self" in dst and any(s not in ("autogroup:member", "group:ops", "group:dev", "u1@example.com") for s in src):
            dst = [d for d in dst if d != "autogroup:self"] or ["tag:web"]
        ports = draw(st.sampled_from(["*", "22", "80,443", "5432-5433"]))
        acls.append({"action": "accept", "src": src, "dst": [f"{d}:{ports}" for d in dst]})
    grants = []
    if draw(st.booleans()):
        grants.append({"src": [draw(st.sampled_from(ALIASES))], "dst": [draw(st.sampled_from(TAGS))], "ip": ["443"],
                       "app": {"example.com/cap/x": [{"v": 1}]}})
    ssh = []
    for _ in range(draw(st.integers(0, 5))):
        dst = draw(st.lists(st.sampled_from(SSH_DSTS), min_size=1, max_size=2, unique=True))
        src = draw(st.lists(st.sampled_from(["autogroup:member", "group:ops", "group:dev", "u1@example.com",
                                             "tag:web", "tag:db", "*"]), min_size=1, max_size=2, unique=True))
        if "autogroup:self" in dst:
            src = [s for s in src if s in ("autogroup:member", "group:ops", "group:dev", "u1@example.com")] or ["autogroup:member"]
        if any(d.startswith("autogroup:") and d != "autogroup:self" for d in dst) or "*" in src:
            src = [s for s in src if s != "*"] or ["autogroup:member"]
        ssh.append({"action": draw(st.sampled_from(["accept", "check"])), "src": src, "dst": dst,
                    "users": draw(st.sampled_from(SSH_USERS))})
    doc: dict[str, object] = {
        # Drawn members: a policy change may move a user in or out of a group that
        # an unchanged ``ssh`` section names.
        "groups": {
            g: draw(st.lists(st.sampled_from([u.login for u in USERS]), max_size=3, unique=True))
            for g in ("group:ops", "group:dev")
        },
        "tagOwners": {t: ["group:ops"] for t in TAGS},
        "hosts": {"lan": "10.1.0.0/16"},
        "autoApprovers": {"routes": {"10.0.0.0/8": ["tag:gw"]}, "exitNode": ["tag:gw"]},
        "acls": acls or [{"action": "accept", "src": ["group:ops"], "dst": ["*:*"]}],
        "grants": grants,
    }
    if ssh:
        doc["ssh"] = ssh
    return json.dumps(doc)


@st.composite
def node(draw: st.DrawFn, node_id: int) -> PolicyNode:
    tags = draw(st.sampled_from([(), (), (), ("tag:web",), ("tag:db",), ("tag:gw",), ("tag:web", "tag:db")]))
    routes: tuple[str, ...] = ()
    if "tag:gw" in tags:
        routes = draw(st.sampled_from([("10.1.0.0/16",), ("10.1.0.0/16", "0.0.0.0/0"), ()]))
    return PolicyNode(
        id=node_id, name=f"n{node_id}", user_id=draw(st.sampled_from([1, 2, 3, 4])), tags=tags,
        ipv4=f"100.64.0.{node_id}", ipv6=f"fd7a:115c:a1e0::{node_id:x}", routable_ips=routes,
    )


@st.composite
def histories(draw: st.DrawFn) -> tuple[str, list[PolicyNode], list[PolicyNode | int]]:
    initial = [draw(node(i)) for i in range(1, draw(st.integers(1, 8)) + 1)]
    ops: list[PolicyNode | int] = []
    next_id = len(initial) + 1
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["join", "join", "leave", "change"]))
        if kind == "join":
            ops.append(draw(node(next_id)))
            next_id += 1
        elif kind == "leave":
            ops.append(draw(st.integers(1, next_id)))
        else:
            ops.append(draw(node(draw(st.integers(1, next_id - 1)))))
    return draw(policies()), initial, ops


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_shared_ssh_policies_and_filters_equal_the_per_node_reference(
    history: tuple[str, list[PolicyNode], list[PolicyNode | int]],
) -> None:
    text, initial, ops = history
    policy = parse_policy(text)
    nodes = {n.id: n for n in initial}
    compiled = compile_policy(policy, Tailnet(USERS, nodes.values()), control_url=CTRL)
    table = compiled.ssh_table()
    # What SSHCache keeps: per node its key, per key the deps and the answer.
    keys: dict[int, SSHKey] = {}
    kept: dict[SSHKey, tuple[tuple[object, ...], object]] = {}

    def check(step: str) -> None:
        for nid, info in compiled.tailnet.nodes.items():
            reference = compile_ssh_policy(compiled.resolver, info, CTRL)
            key = table.key(info)
            assert keys.setdefault(nid, key) == key, f"{step}: key of an unchanged node {nid} moved"
            assert table.render(key) == reference, f"{step}: node {nid}"
            deps = table.deps(key)
            old = kept.get(key)
            if old is not None and len(old[0]) == len(deps) and all(a is b for a, b in zip(old[0], deps, strict=True)):
                assert old[1] == reference, f"{step}: a kept answer of node {nid} is stale"
            kept[key] = (deps, reference)

    check("start")
    for op in ops:
        before = compiled
        if isinstance(op, PolicyNode):
            compiled = compiled.with_node(op)
            nodes[op.id] = op
            changed = {op.id}
        else:
            compiled = compiled.without_node(op)
            nodes.pop(op, None)
            changed = {op}
        for nid in changed:
            keys.pop(nid, None)
        # Visibility asked one candidate at a time on a fresh compile (no fold cached
        # yet: the matcher-by-matcher test) equals the full peer sets.
        ids = sorted(compiled.tailnet.nodes)
        one = {(x, y) for x in ids for y in ids if compiled.visible_one(x, y)}
        assert one == {(x, y) for x in ids for y in compiled.peer_id_set(x)}
        moved = [t.nodes[nid] for t in (before.tailnet, compiled.tailnet) for nid in changed if nid in t.nodes]
        previous = table
        table = compiled.ssh_table(table, moved)
        check(f"after {op!r}")
        # A rule whose aliases resolve as before and none of whose sources changed is
        # the previous table's object (a join costs the rules it touches).
        addrs = [a for info in moved for a in info.addrs]
        for old_rule, new_rule in zip(previous.rules, table.rules, strict=True):
            same = all(
                compiled.resolver.resolve(a) is b
                for a, b in zip((*old_rule.rule.src, *old_rule._others()), old_rule._resolved, strict=True)
            )
            if same and not old_rule.src_ips.contains_any(addrs):
                assert new_rule is old_rule
        affected = compiled.filters_changed_since(before, changed)
        fresh = compile_policy(policy, Tailnet(USERS, nodes.values()), control_url=CTRL,
                               previous_primaries=before.primaries)
        for nid in compiled.tailnet.nodes:
            assert compiled.packet_filter(nid) == fresh.packet_filter(nid)
            if affected is not None and nid not in affected and nid in before.tailnet.nodes:
                assert compiled.packet_filter(nid) == before.packet_filter(nid), f"filter of {nid} changed unnoticed"


class _Editable(Protocol):
    def with_node(self, node: PolicyNode) -> Self: ...
    def without_node(self, node_id: int) -> Self: ...


E = TypeVar("E", bound=_Editable)


def _step(value: E, nodes: dict[int, PolicyNode], op: PolicyNode | int) -> E:
    """One step of a history on a tailnet or compiled policy (and on ``nodes``)."""
    if isinstance(op, PolicyNode):
        nodes[op.id] = op
        return value.with_node(op)
    nodes.pop(op, None)
    return value.without_node(op)


@settings(max_examples=60, deadline=None)
@given(histories())
def test_a_carried_address_index_equals_a_fresh_one(history: tuple[str, list[PolicyNode], list[PolicyNode | int]]) -> None:
    """Tailnet.with_node/without_node edit the parent's address index instead of
    re-sorting it: the edited one answers like a fresh tailnet's."""
    _, initial, ops = history
    nodes = {n.id: n for n in initial}
    tailnet = Tailnet(USERS, nodes.values())
    probes = [IPSet.of([parse_prefix(p)]) for p in ("100.64.0.0/10", "100.64.0.0/30", "100.64.0.4/31", "fd7a:115c:a1e0::/48")]
    for op in ops:
        tailnet.node_ids_in(probes[0])  # build the index, so that the next view carries it
        tailnet = _step(tailnet, nodes, op)
        fresh = Tailnet(USERS, nodes.values())
        for probe in probes:
            assert tailnet.node_ids_in(probe) == fresh.node_ids_in(probe)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories(), policies())
def test_a_policy_change_elsewhere_keeps_what_it_may(
    history: tuple[str, list[PolicyNode], list[PolicyNode | int]], other: str
) -> None:
    """A policy change on the same tailnet (what the hub's policy path relies on):

    * a policy with the same ``ssh`` section builds its SSH table from the earlier
      one; every render equals the per-node reference, a key the table says is kept
      (``same_keys``) is the node's key, and an answer whose tokens are the very
      same objects is still right;
    * every node's packet filter is the plain reduction of its unreduced rules, and
      its JSON (put together from pieces) is msgspec's encoding of it;
    * a node (not a router) outside the addresses whose peers may have changed
      (``reach_changes``) has the same peers, seen the same way.
    """
    text, initial, _ = history
    tailnet = Tailnet(USERS, initial)
    first = compile_policy(parse_policy(text), tailnet, control_url=CTRL)
    doc = json.loads(other)
    ssh = json.loads(text).get("ssh")
    if ssh is None:
        doc.pop("ssh", None)
    else:
        doc["ssh"] = ssh
    second = compile_policy(parse_policy(json.dumps(doc)), tailnet, control_url=CTRL)
    assert second.policy.ssh == first.policy.ssh
    before = first.ssh_table()
    after = second.ssh_table(before, [])
    kept = after.same_keys(before)
    for nid, info in second.tailnet.nodes.items():
        reference = compile_ssh_policy(second.resolver, info, CTRL)
        key = after.key(info)
        assert after.render(key) == reference, nid
        if kept:
            assert before.key(first.tailnet.nodes[nid]) == key, nid
        old_key = before.key(first.tailnet.nodes[nid])
        old_deps, deps = before.deps(old_key), after.deps(old_key)
        if len(old_deps) == len(deps) and all(a is b for a, b in zip(old_deps, deps, strict=True)):
            assert before.render(old_key) == after.render(old_key), nid
    for nid, info in second.tailnet.nodes.items():
        # Global rules through their index, then the node's own: the plain reduction.
        plain = reduce_rules(info, second.unreduced_rules(nid))
        assert [r.wire() for r in second.filter_rules(nid)] == [r.wire() for r in plain], nid
        # ...and its JSON, put together from pieces, is msgspec's encoding of it.
        assert second.packet_filter_json(nid) == msgspec.json.encode(second.packet_filter(nid)), nid
    moved = second.reach_changes(first)
    routers = {r.id for r in second.tailnet.routers()}
    for nid, info in second.tailnet.nodes.items():
        if moved is not None and nid not in routers and not moved.contains_any(info.addrs):
            assert first.peer_id_set(nid) == second.peer_id_set(nid), nid
            assert first.peers(nid) == second.peers(nid), nid


@settings(max_examples=60, deadline=None)
@given(histories())
def test_carried_member_and_tagged_sets_equal_fresh_ones(history: tuple[str, list[PolicyNode], list[PolicyNode | int]]) -> None:
    """Issue 19: Tailnet.with_node/without_node edit the parent's member and tagged sets
    (resolving ``autogroup:member`` on a join no longer scans every node), and
    sole_owner answers like grouping every node of the sets by owner."""
    _, initial, ops = history
    nodes = {n.id: n for n in initial}
    tailnet = Tailnet(USERS, nodes.values())
    probes = [IPSet.of([parse_prefix(p)]) for p in ("100.64.0.0/10", "100.64.0.0/30", "100.64.0.4/31", "fd7a:115c:a1e0::/48")]
    for op in ops:
        tailnet.member_ids(), tailnet.tagged_ids()  # so that the next view carries them
        tailnet = _step(tailnet, nodes, op)
        assert tailnet._members is not None and tailnet._tagged is not None  # carried, not rebuilt
        fresh = Tailnet(USERS, nodes.values())
        assert (tailnet.member_ids(), tailnet.tagged_ids()) == (fresh.member_ids(), fresh.tagged_ids())
        for probe in probes:
            owners = {fresh.nodes[i].owner for i in fresh.node_ids_in(probe)}
            expected = next(iter(owners)) if len(owners) == 1 and None not in owners else None
            assert tailnet.sole_owner([probe]) == expected


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories(), policies())
def test_a_compile_that_takes_over_grants_equals_a_fresh_one(
    history: tuple[str, list[PolicyNode], list[PolicyNode | int]], other: str
) -> None:
    """A policy edit compiled from the last compile (``compile_policy(previous=)``,
    what the server does when only the policy text changed) takes over the grants of
    equal shape whose aliases resolve alike; it answers like a fresh compile, also
    after the nodes change incrementally from there (the taken-over grants' dependency
    keys follow the new policy)."""
    text, initial, ops = history
    nodes = {n.id: n for n in initial}
    tailnet = Tailnet(USERS, initial)
    # The edit: the other policy's rules, with half of this one's kept (equal shape).
    mine, theirs = json.loads(text), json.loads(other)
    theirs["acls"] = mine["acls"][: len(mine["acls"]) // 2 + 1] + theirs["acls"]
    theirs["groups"] = {"group:ops": ["u1@example.com"], "group:dev": ["u3@example.com", "u4@example.com"]}
    edited = parse_policy(json.dumps(theirs))
    first = compile_policy(parse_policy(text), tailnet, control_url=CTRL, auto_approve=False)
    for nid in tailnet.nodes:
        first.packet_filter_json(nid)  # (so that its per-owner rules are there to take over)
    reused = compile_policy(edited, tailnet, control_url=CTRL, auto_approve=False, previous=first)
    taken = {id(g) for g in first.grants}
    assert not any(id(g) in taken for g in reused.grants)  # copies: the old compile is left as it was

    def same(a: CompiledPolicy, b: CompiledPolicy, step: str) -> None:
        for nid in b.tailnet.nodes:
            assert a.packet_filter_json(nid) == b.packet_filter_json(nid), f"{step}: filter of {nid}"
            assert a.peers(nid) == b.peers(nid), f"{step}: peers of {nid}"
            assert a.ssh_policy(nid) == b.ssh_policy(nid), f"{step}: ssh of {nid}"

    same(reused, compile_policy(edited, tailnet, control_url=CTRL, auto_approve=False), "edit")
    for op in ops:
        reused = _step(reused, nodes, op)
        fresh = compile_policy(edited, Tailnet(USERS, nodes.values()), control_url=CTRL, auto_approve=False)
        same(reused, fresh, f"after {op!r}")


def test_own_rules_are_taken_over_only_with_the_same_self_grants() -> None:
    """Each owner's ``autogroup:self`` rules come over from the last compile only when
    its self grants were all taken over, in order: a policy that adds one (or drops
    one) gets its own, and either way every filter is a fresh compile's."""
    nodes = [
        PolicyNode(id=i, name=f"n{i}", user_id=1 + i % 2, ipv4=f"100.64.0.{i}", ipv6=f"fd7a:115c:a1e0::{i:x}")
        for i in range(1, 7)
    ]
    tailnet = Tailnet(USERS, nodes)
    base = [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:22"]},
            {"action": "accept", "src": ["group:ops"], "dst": ["tag:web:80"]}]
    texts: list[dict[str, object]] = [
        {"acls": base},
        {"acls": [*base[:1], {"action": "accept", "src": ["group:ops"], "dst": ["tag:web:81"]}]},  # self kept
        {"acls": [*base, {"action": "accept", "src": ["u1@example.com"], "dst": ["autogroup:self:443"]}]},  # one more
        {"acls": base[1:]},  # none
    ]
    for doc in texts:
        doc["groups"] = {"group:ops": ["u1@example.com", "u2@example.com"]}
        doc["tagOwners"] = {"tag:web": ["group:ops"]}
    first = compile_policy(parse_policy(json.dumps(texts[0])), tailnet, control_url=CTRL, auto_approve=False)
    for nid in tailnet.nodes:
        first.packet_filter_json(nid)
    for doc in texts[1:]:
        edited = parse_policy(json.dumps(doc))
        reused = compile_policy(edited, tailnet, control_url=CTRL, auto_approve=False, previous=first)
        assert bool(reused._extra) == (doc is texts[1])  # taken over only with the same self grants
        fresh = compile_policy(edited, tailnet, control_url=CTRL, auto_approve=False)
        for nid in tailnet.nodes:
            assert reused.packet_filter_json(nid) == fresh.packet_filter_json(nid), (doc, nid)


def test_rules_naming_a_users_devices_share_one_principal_tuple() -> None:
    """Issue 19, memory: a user whose devices are all sources of several SSH rules
    (``autogroup:member`` and the user's group) has one principal tuple shared by
    those rules, in a table built afresh and in one built from it after a join; a rule
    holding only some of them has its own; what every node gets is the reference."""
    nodes = [
        PolicyNode(id=1, name="a", user_id=1, ipv4="100.64.0.1", ipv6="fd7a:115c:a1e0::1"),
        PolicyNode(id=2, name="b", user_id=1, ipv4="100.64.0.2"),
        PolicyNode(id=3, name="c", user_id=2, ipv4="100.64.0.3"),
        PolicyNode(id=4, name="w", tags=("tag:web",), ipv4="100.64.0.4"),
    ]
    doc = {
        "groups": {"group:ops": ["u1@example.com"]},
        "tagOwners": {"tag:web": ["group:ops"]},
        "ssh": [
            {"action": "accept", "src": ["autogroup:member"], "dst": ["tag:web"], "users": ["root"]},
            {"action": "check", "src": ["group:ops"], "dst": ["tag:web"], "users": ["admin"]},
            {"action": "accept", "src": ["100.64.0.1"], "dst": ["tag:web"], "users": ["ops"]},
        ],
    }
    policy = parse_policy(json.dumps(doc))
    compiled = compile_policy(policy, Tailnet(USERS, nodes), control_url=CTRL, auto_approve=False)
    table = compiled.ssh_table()
    member, ops, one = table.rules
    assert len(member.by_user[1]) == 3 and member.by_user[1] is ops.by_user[1]
    assert [p.node_ip for p in one.by_user[1]] == ["100.64.0.1", "fd7a:115c:a1e0::1"]  # node a only
    joined = compiled.with_node(PolicyNode(id=5, name="d", user_id=1, ipv4="100.64.0.5"))
    after = joined.ssh_table(table, [joined.tailnet.nodes[5]])
    member, ops, _ = after.rules
    assert len(member.by_user[1]) == 4 and member.by_user[1] is ops.by_user[1]
    assert member.by_user[2] is table.rules[0].by_user[2]  # unchanged: the earlier table's
    for nid in joined.tailnet.nodes:
        info = joined.tailnet.nodes[nid]
        assert after.render(after.key(info)) == compile_ssh_policy(joined.resolver, info, CTRL)


def test_a_tagged_node_that_is_no_source_keeps_the_tagged_principals() -> None:
    """Issue 19, registration CPU: a batch of changes with a member's new device (a
    source of the rule) and a new tagged server (not one) regroups the member's owner
    only; the rule's tagged principals are the earlier table's (no pass over every
    tagged node), and every node gets the reference policy. A tagged source that
    joins does regroup them."""
    nodes = [
        PolicyNode(id=1, name="a", user_id=1, ipv4="100.64.0.1"),
        PolicyNode(id=2, name="w", tags=("tag:web",), ipv4="100.64.0.2"),
        PolicyNode(id=3, name="d", tags=("tag:db",), ipv4="100.64.0.3"),
    ]
    doc = {
        "tagOwners": {"tag:web": ["u1@example.com"], "tag:db": ["u1@example.com"]},
        "ssh": [{"action": "accept", "src": ["autogroup:member", "tag:web"], "dst": ["tag:db"], "users": ["root"]}],
    }
    compiled = compile_policy(parse_policy(json.dumps(doc)), Tailnet(USERS, nodes), control_url=CTRL, auto_approve=False)
    table = compiled.ssh_table()
    assert [p.node_ip for p in table.rules[0].tagged] == ["100.64.0.2"]
    joined = compiled.with_node(PolicyNode(id=4, name="b", user_id=2, ipv4="100.64.0.4"))
    joined = joined.with_node(PolicyNode(id=5, name="d2", tags=("tag:db",), ipv4="100.64.0.5"))
    after = joined.ssh_table(table, [joined.tailnet.nodes[4], joined.tailnet.nodes[5]])
    assert after.rules[0].tagged is table.rules[0].tagged
    assert sorted(after.rules[0].by_user) == [1, 2]
    web = joined.with_node(PolicyNode(id=6, name="w2", tags=("tag:web",), ipv4="100.64.0.6"))
    again = web.ssh_table(after, [web.tailnet.nodes[6]])
    assert [p.node_ip for p in again.rules[0].tagged] == ["100.64.0.2", "100.64.0.6"]
    for compiled_, table_ in ((joined, after), (web, again)):
        for info in compiled_.tailnet.nodes.values():
            assert table_.render(table_.key(info)) == compile_ssh_policy(compiled_.resolver, info, CTRL)
