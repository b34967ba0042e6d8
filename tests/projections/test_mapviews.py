"""Shared per-class views give every node exactly its own netmap.

The oracle is :func:`projections.netmap.full_map`, which asks the policy engine for one
node's netmap directly (the engine is checked against Tailscale's captures by the
conformance suite). A random but valid history runs (users, joins, deletes, renames,
tags, key rotation, expiry now and later, routes advertised and approved, policy
changes across groups, tags, hosts, IP aliases, autogroup:self, SSH, grants with via,
and presence changes); after every step the hub advances, and for every node

* a fresh stream's full map from the hub, and
* the netmap a client builds by applying every update its stream received so far

must both equal the reference map.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli.bench.scenarios import Scenario, corp
from projections import commands as c
from projections.delta import EMPTY
from projections.mapviews import peersets
from projections.mapviews.cursor import StreamCursor
from projections.mapviews.hub import HubStats, MapHub
from projections.netmap import NetmapSettings, full_map
from projections.policystate import PolicyCompiler
from projections.presence import NodePresence
from projections.state import TailnetState
from projections.tailcfg import DERPMap, MapResponse, decode, encode
from tests.support.builders import OPS, PLAN, RandomHistory, Recorder
from tests.support.netmap_model import ClientNetmap

T = TypeVar("T")

_TAGS = '"tagOwners": {"tag:a": ["autogroup:member"], "tag:t0": ["autogroup:member"], "tag:t1": ["autogroup:member"], "tag:t2": ["autogroup:member"]}'
POLICIES = [
    None,  # allow-all
    '{' + _TAGS + ', "groups": {"group:eng": ["user0@", "user1@"]},'
    ' "acls": [{"action": "accept", "src": ["group:eng"], "dst": ["tag:a:*", "tag:t0:22"]},'
    ' {"action": "accept", "src": ["tag:t1"], "dst": ["group:eng:443"]}],'
    ' "ssh": [{"action": "accept", "src": ["user2@"], "dst": ["tag:a"], "users": ["root"]}]}',
    '{' + _TAGS + ', "acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},'
    ' {"action": "accept", "src": ["tag:a"], "dst": ["autogroup:member:80"]}],'
    ' "ssh": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["root"]}]}',
    '{' + _TAGS + ', "hosts": {"h1": "100.64.0.2/32", "low": "100.64.0.0/29"},'
    ' "acls": [{"action": "accept", "src": ["h1"], "dst": ["low:*"]},'
    ' {"action": "accept", "src": ["100.64.0.5"], "dst": ["*:*"]},'
    ' {"action": "accept", "src": ["tag:t2"], "dst": ["10.0.0.0/8:*", "autogroup:internet:*"]}]}',
    '{' + _TAGS + ', "grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"]},'
    ' {"src": ["autogroup:member"], "dst": ["10.0.0.0/8"], "ip": ["*"], "via": ["tag:a"]}]}',
    '{' + _TAGS + ', "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],'
    ' "autoApprovers": {"routes": {"10.0.0.0/8": ["autogroup:member"]}, "exitNode": ["tag:t0"]}}',
    # Corp-shaped (issue 19): many classes, autogroup:self, team and tag rules, an
    # admin seeing all, an app grant, routes, SSH to self, to tags and in check mode.
    '{' + _TAGS + ', "groups": {"group:eng": ["user0@"], "group:ops": ["user1@", "user2@"], "group:adm": ["user2@"]},'
    ' "acls": [{"action": "accept", "src": ["group:eng"], "dst": ["tag:t0:22,80", "tag:a:443"]},'
    ' {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},'
    ' {"action": "accept", "src": ["group:ops"], "dst": ["group:ops:22,5900-5901"]},'
    ' {"action": "accept", "src": ["tag:t1"], "dst": ["tag:t2:5432", "tag:t0:5432"]},'
    ' {"action": "accept", "src": ["group:adm"], "dst": ["*:*"]}],'
    ' "grants": [{"src": ["group:eng"], "dst": ["tag:a"], "ip": ["443"], "app": {"example.com/cap/x": [{"r": 1}]}}],'
    ' "autoApprovers": {"routes": {"10.0.0.0/8": ["group:ops"]}, "exitNode": ["tag:t0"]},'
    ' "ssh": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["autogroup:nonroot", "root"]},'
    ' {"action": "accept", "src": ["group:adm"], "dst": ["tag:a", "tag:t0", "tag:t1"], "users": ["root"]},'
    ' {"action": "check", "src": ["group:eng"], "dst": ["tag:t0"], "users": ["autogroup:nonroot"]},'
    ' {"action": "check", "src": ["group:ops"], "dst": ["tag:t1"], "users": ["autogroup:nonroot"]}]}',
    # The same with wider ports and one team more on a tag (a policy change of the
    # corp benchmark's kind: filters change, peers mostly do not).
    '{' + _TAGS + ', "groups": {"group:eng": ["user0@"], "group:ops": ["user1@", "user2@"], "group:adm": ["user2@"]},'
    ' "acls": [{"action": "accept", "src": ["group:eng"], "dst": ["tag:t0:22-23,80", "tag:a:443"]},'
    ' {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},'
    ' {"action": "accept", "src": ["group:ops"], "dst": ["group:ops:22,5900-5901", "tag:t2:80"]},'
    ' {"action": "accept", "src": ["tag:t1"], "dst": ["tag:t2:5432-5433", "tag:t0:5432-5433"]},'
    ' {"action": "accept", "src": ["group:adm"], "dst": ["*:*"]}],'
    ' "grants": [{"src": ["group:eng"], "dst": ["tag:a"], "ip": ["443"], "app": {"example.com/cap/x": [{"r": 1}]}}],'
    ' "ssh": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["root"]},'
    ' {"action": "check", "src": ["group:eng", "group:ops"], "dst": ["tag:t0"], "users": ["autogroup:nonroot"]}]}',
]


def _comparable(msg: MapResponse) -> dict[str, object]:
    model = ClientNetmap()
    model.apply(msg)
    return model.comparable()


@pytest.mark.parametrize("policy_index", range(len(POLICIES)))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.integers(0, OPS - 1), st.integers(0, 1000)), min_size=5, max_size=45))
def test_hub_maps_equal_reference_maps(policy_index: int, ops: list[tuple[int, int]]) -> None:
    _check_history(policy_index, ops)


def _check_history(policy_index: int, ops: list[tuple[int, int]]) -> None:
    history = RandomHistory(seed=policy_index, users=("user0", "user1", "user2"), policies=POLICIES)
    r, presence = history.recorder, history.presence
    settings_ = NetmapSettings(domain="example.ts.net", derp_map=DERPMap(regions={}))
    compiler = PolicyCompiler("https://control.example")
    hub = MapHub(compiler, settings_, presence.get)
    cursors: dict[int, StreamCursor] = {}
    models: dict[int, ClientNetmap] = {}
    if POLICIES[policy_index] is not None:
        text = POLICIES[policy_index]
        assert text is not None
        r.run(lambda s: c.decide_set_policy(s, text, source="test"))

    for op, arg in ops:
        history.step(op, arg)
        history.advance(hub)
        # The hub edits its sorted expiries per change: the next one is still right.
        later = [n.expiry for n in r.state.nodes.values() if n.expiry is not None and n.expiry > r.now]
        assert hub.next_expiry() == min(later, default=None), (op, arg)
        for nid in list(cursors):
            if nid not in r.state.nodes:
                del cursors[nid], models[nid]
                continue
            for message in cursors[nid].update(hub):
                models[nid].apply(decode(encode(message.response), MapResponse))
        for nid in r.state.nodes:
            reference = full_map(
                r.state, nid, policy=compiler, settings=settings_, presence=presence.get, now=r.now
            )
            expected = _comparable(reference)
            fresh = StreamCursor(nid)
            first = decode(encode(fresh.full_map(hub).response()), MapResponse)
            assert _comparable(first) == expected, (nid, op, arg)
            if nid not in cursors:
                cursors[nid], models[nid] = fresh, ClientNetmap()
                models[nid].apply(first)
            assert models[nid].comparable() == expected, (nid, op, arg)


def test_lagging_streams_catch_up_and_superseded_versions_are_freed() -> None:
    """Streams that skip many versions still reach the reference map (through the
    change journal), and once no stream is on a superseded version, it and the peers
    only it showed are freed: the journal keeps ids, not peers."""
    import gc
    import weakref

    rnd = random.Random(7)
    r = Recorder()
    r.user("user0")
    owner = sorted(r.state.users)[0]
    def register(s: TailnetState, i: int, machine_key: str, node_key: str) -> c.Decision[int]:
        return c.decide_register_node(
            s, machine_key=machine_key, node_key=node_key, hostname=f"host{i}", user_id=owner, tags=(),
            ephemeral=False, expiry=None, auth="cli", preauth_key=None, plan=PLAN,
        )

    for i in range(6):
        r.run(functools.partial(
            register, i=i, machine_key=f"{rnd.getrandbits(256):064x}", node_key=f"{rnd.getrandbits(256):064x}"
        ))
    presence: dict[int, NodePresence] = {}
    settings_ = NetmapSettings(domain="example.ts.net", derp_map=DERPMap(regions={}))
    compiler = PolicyCompiler("https://control.example")
    hub = MapHub(compiler, settings_, presence.get)
    hub.advance(r.state, r.now, r.delta, set())
    nodes = sorted(r.state.nodes)
    cursors = {nid: StreamCursor(nid) for nid in nodes}
    models = {nid: ClientNetmap() for nid in nodes}
    for nid in nodes:
        models[nid].apply(decode(encode(cursors[nid].full_map(hub).response()), MapResponse))
    versions: list[weakref.ref[object]] = []
    for step in range(30):
        nid = nodes[step % len(nodes)]
        r.now += timedelta(seconds=1)
        presence[nid] = NodePresence(
            online=step % 2 == 0, endpoints=(f"192.0.2.{step}:41641",), home_derp=1 + step % 3,
            last_seen=r.now, disco_key=None,
        )
        hub.advance(r.state, r.now, EMPTY, {nid})
        versions.append(weakref.ref(hub.peer_set(nodes[0])))
        # Only the first node's stream keeps up; the others are 10 versions behind.
        for other in nodes if step % 10 == 9 else nodes[:1]:
            for message in cursors[other].update(hub):
                models[other].apply(decode(encode(message.response), MapResponse))
    for nid in nodes:
        reference = full_map(r.state, nid, policy=compiler, settings=settings_, presence=presence.get, now=r.now)
        assert models[nid].comparable() == _comparable(reference)
    gc.collect()
    current = hub.peer_set(nodes[0])
    assert [v() for v in versions if v() is not None] == [current]
    live_peers = [o for o in gc.get_objects() if isinstance(o, peersets.Peer)]
    assert len(live_peers) == len(current.peers)


@dataclasses.dataclass
class _CorpStreams:
    """A corp tailnet of the benchmark's shape, a hub over it and every node's stream
    (its cursor, and the netmap its messages built, the way a client builds it)."""

    recorder: Recorder
    users: list[int]
    register: Callable[[int], int]
    compiler: PolicyCompiler
    settings: NetmapSettings
    hub: MapHub
    cursors: dict[int, StreamCursor]
    models: dict[int, ClientNetmap]

    def update(self) -> list[MapResponse]:
        """Every stream's update, applied to its netmap; the messages."""
        sent = []
        for nid, cur in self.cursors.items():
            for message in cur.update(self.hub):
                sent.append(message.response)
                self.models[nid].apply(decode(encode(message.response), MapResponse))
        return sent

    def check(self) -> None:
        """Every stream's netmap is the reference map of its node."""
        r = self.recorder
        for nid in self.cursors:
            reference = full_map(
                r.state, nid, policy=self.compiler, settings=self.settings, presence=lambda _n: None, now=r.now
            )
            assert self.models[nid].comparable() == _comparable(reference), nid


def _corp_streams(sc: Scenario, seed: int) -> _CorpStreams:
    rnd = random.Random(seed)
    r = Recorder()
    uids = [r.user(u) for u in sc.users]
    r.run(lambda s: c.decide_set_policy(s, sc.policy_a, source="test"))

    def register(index: int) -> int:
        user, tags = sc.node(index)
        return r.run(lambda s: c.decide_register_node(
            s, machine_key=f"{rnd.getrandbits(256):064x}", node_key=f"{rnd.getrandbits(256):064x}",
            hostname=f"n{index}", user_id=uids[sc.users.index(user)], tags=tags, ephemeral=False,
            expiry=None, auth="cli", preauth_key=None, plan=PLAN,
        ))

    for i in range(len(sc.owners)):
        register(i)
    settings_ = NetmapSettings(domain="example.ts.net", derp_map=DERPMap(regions={}))
    compiler = PolicyCompiler("https://control.example")
    hub = MapHub(compiler, settings_, lambda _nid: None)
    hub.advance(r.state, r.now, r.delta, ())
    r.delta = EMPTY
    cursors = {nid: StreamCursor(nid) for nid in r.state.nodes}
    models = {nid: ClientNetmap() for nid in r.state.nodes}
    for nid, cur in cursors.items():
        models[nid].apply(decode(encode(cur.full_map(hub).response()), MapResponse))
    return _CorpStreams(r, uids, register, compiler, settings_, hub, cursors, models)


def test_a_join_costs_what_it_affects_in_a_segmented_tailnet() -> None:
    """Issue 19: in a corp-shaped tailnet, a team member's new device re-renders the
    SSH policy of the keys whose rules gained a source (its owner's devices, its
    team's servers), recomputes only the filters it may touch, and every stream
    still ends up with exactly the reference map."""
    sc = corp(60)
    t = _corp_streams(sc, 7)
    r, hub, compiler = t.recorder, t.hub, t.compiler
    before = dataclasses.replace(hub.stats)
    versions = {hub.class_of(m): hub.peer_set(m) for m in r.state.nodes}

    r.now += timedelta(seconds=1)
    newcomer = t.register(len(sc.owners))  # the scenario's next device: u3's (team 3, no admin)
    assert r.state.nodes[newcomer].user_id == t.users[3] and not r.state.nodes[newcomer].tags
    hub.advance(r.state, r.now, r.delta, ())
    t.update()
    StreamCursor(newcomer).full_map(hub)

    # Two SSH keys gained a source: u3's devices (autogroup:self) and the servers of
    # tag:svc3 (team 3's check rule); nobody else's SSH policy is rebuilt.
    assert hub.stats.ssh_renders - before.ssh_renders == 2
    # The newcomer is evaluated once per peer set that classes seeing it were on (they
    # are found from its twin's place in the peer sets), not once per class: the
    # others cannot have it as a peer, and classes that shared a version gain the
    # same peer.
    compiled = compiler.compiled(r.state)
    seeing = {hub.class_of(m) for m in r.state.nodes if compiled.visible(m, newcomer)}
    assert 0 < len(seeing) < hub.classes()
    shared = {id(versions[k]) for k in seeing}
    assert len(shared) < len(seeing)
    assert hub.stats.peer_evaluations - before.peer_evaluations == len(shared)
    # Only those classes (and the newcomer's own) are looked at: the cost of a join
    # does not grow with the number of classes.
    own = {hub.class_of(newcomer)}
    assert hub.stats.class_updates - before.class_updates == len(seeing | own)
    # Filters: team 3's destinations and u3's devices (the admins' "*" rule is
    # unchanged) -- far fewer than the 60 streams.
    assert 0 < hub.stats.filter_evaluations - before.filter_evaluations < 10
    t.check()


def test_a_policy_change_of_ports_keeps_peers_and_ssh_answers() -> None:
    """Issue 19: the corp benchmark's policy change widens ports only. Every node's
    packet filter is recomputed, but no peer is evaluated again (each class's matchers
    reach the same addresses), no self node changes, and no SSH policy is rendered
    again (the ``ssh`` section did not change) -- and every stream still ends up with
    exactly the reference map. A change that does move visibility rebuilds the
    classes it touches."""
    sc = corp(60)
    t = _corp_streams(sc, 11)
    r, hub = t.recorder, t.hub

    def change(text: str) -> tuple[HubStats, int]:
        before = dataclasses.replace(hub.stats)
        r.now += timedelta(seconds=1)
        r.run(lambda s: c.decide_set_policy(s, text, source="test"))
        hub.advance(r.state, r.now, r.delta, ())
        r.delta = EMPTY
        got_node = sum(m.node is not None for m in t.update())
        t.check()
        return before, got_node

    before, got_node = change(sc.policy_b)
    assert hub.stats.peer_evaluations == before.peer_evaluations
    assert hub.stats.ssh_renders == before.ssh_renders
    assert got_node == 0
    assert hub.stats.filter_evaluations - before.filter_evaluations == len(t.cursors)

    # Team 5 no longer reaches tag:svc5 (its only rule to it goes): the classes of
    # team 5's user and of tag:svc5 are evaluated again, not every class.
    team5 = '"src": ["group:team5"], "dst": ["tag:svc5:22,80,443"]'
    assert team5 in sc.policy_b
    narrowed = sc.policy_b.replace(team5, '"src": ["group:team5"], "dst": ["tag:svc6:22"]')
    views = {id(hub.peer_set(n)): hub.peer_set(n) for n in t.cursors}
    every_class = sum(len(v.peers) for v in views.values())
    before, _ = change(narrowed)
    assert 0 < hub.stats.peer_evaluations - before.peer_evaluations < every_class / 2
    assert hub.stats.ssh_renders == before.ssh_renders


_TEAM = (
    '{"groups": {"group:eng": ["user0@", "user1@"]}, "tagOwners": {"tag:db": ["group:eng"]},'
    ' "acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},'
    ' {"action": "accept", "src": ["group:eng"], "dst": ["group:eng:22", "tag:db:5432"]},'
    ' {"action": "accept", "src": ["user2@"], "dst": ["user0@:80", "tag:db:5432"]}],'
    ' "ssh": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["root"]}]}'
)


class _TeamStreams:
    """Streams of the ``_TEAM`` tailnet: register nodes, advance the hub, and check
    that every stream's netmap (built from its messages) is the reference map."""

    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.r = Recorder()
        self.uids = [self.r.user(u) for u in ("user0", "user1", "user2")]
        self.r.run(lambda s: c.decide_set_policy(s, _TEAM, source="test"))
        self.presence: dict[int, NodePresence] = {}
        self.settings = NetmapSettings(domain="example.ts.net", derp_map=DERPMap(regions={}))
        self.compiler = PolicyCompiler("https://control.example")
        self.hub = MapHub(self.compiler, self.settings, self.presence.get)
        self.cursors: dict[int, StreamCursor] = {}
        self.models: dict[int, ClientNetmap] = {}

    def register(self, user: int, tags: tuple[str, ...] = ()) -> int:
        rnd, uid = self.rnd, self.uids[user]
        return self.r.run(lambda s: c.decide_register_node(
            s, machine_key=f"{rnd.getrandbits(256):064x}", node_key=f"{rnd.getrandbits(256):064x}",
            hostname=f"h{rnd.getrandbits(16)}", user_id=uid, tags=tags, ephemeral=False,
            expiry=None, auth="cli", preauth_key=None, plan=PLAN,
        ))

    def advance(self, changed_presence: tuple[int, ...] = ()) -> None:
        r, hub, cursors, models = self.r, self.hub, self.cursors, self.models
        r.now += timedelta(seconds=1)
        hub.advance(r.state, r.now, r.delta, changed_presence)
        r.delta = EMPTY
        for nid in r.state.nodes:
            if nid in cursors:
                for message in cursors[nid].update(hub):
                    models[nid].apply(decode(encode(message.response), MapResponse))
            else:
                cursors[nid], models[nid] = StreamCursor(nid), ClientNetmap()
                models[nid].apply(decode(encode(cursors[nid].full_map(hub).response()), MapResponse))
        for nid in r.state.nodes:
            reference = full_map(
                r.state, nid, policy=self.compiler, settings=self.settings, presence=self.presence.get, now=r.now
            )
            assert models[nid].comparable() == _comparable(reference), nid


def test_classes_that_see_the_same_peers_share_one_peer_set() -> None:
    """Issue 19 (memory): two users of one team are two classes (``autogroup:self``,
    SSH) but see the same peers, so they share one peer set -- and with it its diffs
    and the transport's full-map pieces -- through joins, tag and presence changes;
    when a change shows one of them a peer the other does not see, they part, and
    every stream still has exactly the reference map."""
    t = _TeamStreams(3)
    r, hub = t.r, t.hub
    a, b, a2, _b2, db = t.register(0), t.register(1), t.register(0), t.register(1), t.register(0, ("tag:db",))
    t.advance()
    assert hub.class_of(a) is not hub.class_of(b)
    assert hub.peer_set(a) is hub.peer_set(b)
    assert (hub.classes(), hub.peer_sets()) == (3, 2)  # user0, user1, tag:db
    t.register(1)  # a new eng device: both see it
    t.advance()
    t.presence[db] = NodePresence(
        online=True, endpoints=("192.0.2.1:41641",), home_derp=1, last_seen=r.now, disco_key=None
    )
    t.advance((db,))
    r.run(lambda s: c.decide_set_tags(s, str(a2), ("tag:db",)))
    t.advance()
    assert hub.peer_set(a) is hub.peer_set(b)
    assert hub.peer_set(a) is not hub.peer_set(db)
    shared = hub.peer_set(a)
    other = t.register(2)  # user0 sees user2's device (user2 reaches user0 on 80), user1 does not
    t.advance()
    assert other in hub.peer_set(a).peers and other not in hub.peer_set(b).peers
    # user1 kept the version they shared; user0 went on from it, in a lineage of its
    # own (the transport keeps one set of full-map pieces per lineage).
    assert hub.peer_set(b) is shared
    assert hub.peer_set(a).link.parent is shared.link
    # Its journal entry names just the newcomer, as the id alone (no container): the
    # journal keeps thousands of these, most naming one node.
    assert type(hub.peer_set(a).link.changed) is int and hub.peer_set(a).link.changed == other
    assert hub.peer_set(a).changed_since(shared.link) == {other}
    assert hub.peer_set(a).lineage is not shared.lineage

def test_shared_messages_are_released_once_every_stream_had_its_update() -> None:
    """Idle memory: the hub keeps a version's shared messages (one per content: here a
    new DERP map every stream gets) only until :meth:`MapHub.release_messages`, which
    the server calls once the fan-out is done; a stream that asks later gets an equal
    message of its own."""
    import gc
    import weakref

    r = Recorder()
    uid = r.user("user0")
    nodes = [r.node(uid, f"host{i}") for i in range(3)]
    settings_ = NetmapSettings(domain="example.ts.net", derp_map=DERPMap(regions={}))
    hub = MapHub(PolicyCompiler("https://control.example"), settings_, lambda _nid: None)
    hub.advance(r.state, r.now, r.delta, ())
    cursors = {nid: StreamCursor(nid) for nid in nodes}
    for cur in cursors.values():
        cur.full_map(hub)
    hub.settings = dataclasses.replace(settings_, derp_map=DERPMap(regions={}, omit_default_regions=True))
    r.now += timedelta(seconds=1)
    hub.advance(r.state, r.now, EMPTY, ())
    [first] = cursors[nodes[0]].update(hub)
    [second] = cursors[nodes[1]].update(hub)
    assert first is second
    ref = weakref.ref(first)
    expected = encode(first.response)
    del first, second
    hub.release_messages()
    gc.collect()
    assert ref() is None
    [late] = cursors[nodes[2]].update(hub)
    assert encode(late.response) == expected


def test_a_rebuild_keeps_no_fold_per_class_in_the_compiled_policy() -> None:
    """Issue 19 (memory): rebuilding the classes folds each representative's matchers
    into an address set as large as its peers; the hub asks once per representative,
    so the compiled policy drops each fold after use instead of keeping one per class
    until the next compile. Streams still get exactly the reference maps, and a join
    afterwards into an existing class folds nothing (its twin in the class stands for
    it)."""
    sc = corp(60)
    t = _corp_streams(sc, 5)
    r, hub = t.recorder, t.hub
    assert hub.compiled is not None
    assert (hub.compiled._reaches, hub.compiled._peer_sets) == ({}, {})
    r.now += timedelta(seconds=1)
    r.run(lambda s: c.decide_set_policy(s, sc.policy_b, source="test"))
    hub.advance(r.state, r.now, r.delta, ())
    r.delta = EMPTY
    t.update()
    # (before check(): the reference maps fold every node through the same compile)
    assert (hub.compiled._reaches, hub.compiled._peer_sets) == ({}, {})
    t.check()
    r.now += timedelta(seconds=1)
    newcomer = t.register(len(sc.owners))
    hub.advance(r.state, r.now, r.delta, ())
    r.delta = EMPTY
    t.update()
    assert newcomer in r.state.nodes
    assert (hub.compiled._reaches, hub.compiled._peer_sets) == ({}, {})
    t.check()


def test_classes_that_come_to_see_the_same_peers_join_one_peer_set() -> None:
    """Issue 19 (memory): nodes that register one after another, the hub advancing
    after each (as the server does), end up sharing peer sets exactly as a rebuild
    would share them: a class whose new version equals another's current one (by
    content, not by history) joins it."""
    t = _TeamStreams(4)
    t.advance()
    for user, tags in [(0, ()), (1, ()), (0, ("tag:db",)), (1, ()), (0, ()), (1, ())]:
        t.register(user, tags)
        t.advance()
    hub = t.hub
    rebuilt = MapHub(t.compiler, t.settings, t.presence.get)
    rebuilt.advance(t.r.state, t.r.now, EMPTY, ())
    assert (hub.classes(), hub.peer_sets()) == (rebuilt.classes(), rebuilt.peer_sets())
    assert hub.peer_sets() < hub.classes()


def test_newcomers_in_known_classes_are_placed_by_their_twins_without_a_fold() -> None:
    """Issue 19 (registration CPU): a newcomer that joins a class with an unchanged
    member (its twin) is seen by exactly the classes that see the twin, which the peer
    sets already tell: the hub neither folds its matchers nor walks its peers. Several
    at once (team members, admins, tagged servers, two in one class), and every stream
    still ends up with exactly the reference map."""
    sc = corp(60)
    t = _corp_streams(sc, 11)
    r, hub = t.recorder, t.hub
    before = dataclasses.replace(hub.stats)
    r.now += timedelta(seconds=1)
    first = len(sc.owners)
    # u3's 4th device, an admin's 3rd, u7's 3rd, and two servers of tag:svc0 (whose
    # one server so far is a lone member: it cannot tell whether servers see each other)
    newcomers = [t.register(first + i) for i in (0, 18, 4, 9, 9 + len(sc.owners))]
    devices, servers = newcomers[:3], newcomers[3:]
    assert all(r.state.nodes[n].tags == ("tag:svc0",) for n in servers)
    hub.advance(r.state, r.now, r.delta, ())
    r.delta = EMPTY
    assert hub.compiled is not None
    folded = set(hub.compiled._reaches) | set(hub.compiled._peer_sets)
    assert folded <= set(servers) and not folded & set(devices)
    # Only the classes that see a newcomer (and the servers' own) were looked at.
    compiled = t.compiler.compiled(r.state)
    seeing = set().union(*({hub.class_of(m) for m in r.state.nodes if compiled.visible(m, n)} for n in newcomers))
    assert hub.stats.class_updates - before.class_updates == len(seeing | {hub.class_of(servers[0])})
    t.update()
    for n in newcomers:
        t.cursors[n] = StreamCursor(n)
        t.models[n] = ClientNetmap()
        t.models[n].apply(decode(encode(t.cursors[n].full_map(hub).response()), MapResponse))
    t.check()


def test_a_policy_change_moving_a_group_that_an_unchanged_ssh_section_names_reaches_ssh_policies() -> None:
    """Adding u2 to ``group:ops`` while the ``ssh`` section (ops -> tag:web) stays as it
    was: the tagged server's SSH policy must name u2's device both in its stream's
    update and in a fresh full map from the hub. (The SSH table regrouped only the
    changed nodes' owners, and a policy change changes no node: u2 stayed out.)"""

    def doc(ops: list[str]) -> str:
        return json.dumps({
            "groups": {"group:ops": ops},
            "tagOwners": {"tag:web": ["u1@"]},
            "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
            "ssh": [{"action": "accept", "src": ["group:ops"], "dst": ["tag:web"], "users": ["root"]}],
        })

    r = Recorder()
    u1, u2 = r.user("u1"), r.user("u2")
    r.run(lambda s: c.decide_set_policy(s, doc(["u1@"]), source="t"))
    rnd = random.Random(1)

    def register(uid: int, tags: tuple[str, ...]) -> int:
        return r.run(lambda s: c.decide_register_node(
            s, machine_key=f"{rnd.getrandbits(256):064x}", node_key=f"{rnd.getrandbits(256):064x}",
            hostname="h", user_id=uid, tags=tags, ephemeral=False, expiry=None, auth="cli", preauth_key=None,
            plan=PLAN,
        ))

    register(u1, ())
    b = register(u2, ())
    web = register(u1, ("tag:web",))
    settings_ = NetmapSettings(domain="example.ts.net", derp_map=DERPMap(regions={}))
    compiler = PolicyCompiler("https://control.example")
    hub = MapHub(compiler, settings_, lambda n: None)
    hub.advance(r.state, r.now, r.delta, ())
    r.delta = EMPTY
    cursor = StreamCursor(web)
    model = ClientNetmap()
    model.apply(decode(encode(cursor.full_map(hub).response()), MapResponse))
    b_ip = r.state.nodes[b].ipv4
    r.now += timedelta(seconds=1)
    r.run(lambda s: c.decide_set_policy(s, doc(["u1@", "u2@"]), source="t"))
    hub.advance(r.state, r.now, r.delta, ())
    for message in cursor.update(hub):
        model.apply(decode(encode(message.response), MapResponse))
    reference = full_map(r.state, web, policy=compiler, settings=settings_, presence=lambda n: None, now=r.now)
    ssh = json.loads(encode(reference))["SSHPolicy"]
    assert b_ip in [p.get("nodeIP") for rule in ssh["rules"] for p in rule["principals"]]
    fresh = json.loads(encode(StreamCursor(web).full_map(hub).response()))
    assert fresh["SSHPolicy"] == ssh
    assert model.comparable() == _comparable(reference)
