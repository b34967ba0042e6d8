"""Values that many nodes repeat are kept once, not once per node (issue 19, memory):
the fold and the stored peer Hostinfo share equal short strings (and a node keeps its
pre-auth key's tags tuple), whatever the decoder made of them."""

from __future__ import annotations

import gc
import random

from projections import TailnetState, decode_state, encode_state, fold
from projections import commands as c
from projections.state import SHARED_STR_MAX, Node, shared_str
from projections.tailcfg import Hostinfo, peer_hostinfo
from tests.support.builders import PLAN, Recorder


def fresh(text: str) -> str:
    """An equal string that is not the same object (as a decoder makes them)."""
    made = "".join(list(text))
    assert made == text and (len(text) < 2 or made is not text)
    return made


def test_nodes_folded_from_the_stored_log_share_repeated_strings() -> None:
    r = Recorder()
    uid = r.user("alice")
    r.run(lambda s: c.decide_create_preauth_key(
        s, user="alice", reusable=True, ephemeral=False, tags=(fresh("tag:web"),), expires_at=None, now=r.now,
        prefix="0123456789ab", secret="s" * 32,
    ))
    [pak] = r.state.preauth_keys.values()
    def register(hostname: str, tag: str, key: int | None) -> None:
        r.run(lambda s: c.decide_register_node(
            s, machine_key=f"{random.getrandbits(256):064x}", node_key=f"{random.getrandbits(256):064x}",
            hostname=hostname, user_id=uid, tags=(fresh(tag),), ephemeral=False, expiry=None,
            auth=fresh("preauth"), preauth_key=None if key is None else s.preauth_keys[key], plan=PLAN,
            os=fresh("linux"),
        ))

    for host in ("a", "b", "c"):
        register(host, "tag:web", pak.id)
    register("d", "tag:db", None)
    # Decoded from the stored rows: every string is the decoder's own copy.
    state, _ = fold(TailnetState(), r.store.read())
    assert state == r.state
    key_tags = state.preauth_keys[pak.id].tags
    nodes = sorted(state.nodes.values(), key=lambda n: n.hostname)
    a, b, c3, d = nodes
    assert [n.tags for n in nodes] == [("tag:web",)] * 3 + [("tag:db",)]
    assert a.tags is key_tags and b.tags is key_tags and c3.tags is key_tags
    assert a.os == "linux" and a.os is b.os is c3.os is d.os
    assert a.auth is b.auth is d.auth
    assert d.tags[0] is shared_str(fresh("tag:db"))


def test_peer_hostinfo_shares_repeated_values_and_keeps_everything() -> None:
    def sent(host: str) -> Hostinfo:
        return Hostinfo(
            hostname=host, os=fresh("linux"), ipn_version=fresh("1.80.3-t1234567"), os_version=fresh("6.8.0"),
            distro=fresh("ubuntu"), app=fresh("tailscale"), device_model=fresh("x" * (SHARED_STR_MAX + 1)),
        )

    one, two = peer_hostinfo(sent("one")), peer_hostinfo(sent("two"))
    assert one == peer_hostinfo(sent("one"))
    assert (one.hostname, two.hostname) == ("one", "two")
    for name in ("os", "ipn_version", "os_version", "distro", "app"):
        assert getattr(one, name) == getattr(sent("x"), name)
        assert getattr(one, name) is getattr(two, name), name
    # A long value is someone's own: kept as it came, not interned.
    assert one.device_model == two.device_model and one.device_model is not two.device_model


def _registered(r: Recorder, uid: int, hostname: str) -> int:
    return r.run(lambda s: c.decide_register_node(
        s, machine_key=f"{random.getrandbits(256):064x}", node_key=f"{random.getrandbits(256):064x}",
        hostname=fresh(hostname), user_id=uid, tags=(), ephemeral=False, expiry=None,
        auth="preauth", preauth_key=None, plan=PLAN, os="linux",
    ))


def test_a_node_keeps_one_string_for_equal_host_and_given_names() -> None:
    r = Recorder()
    uid = r.user("alice")
    nid = _registered(r, uid, "laptop")
    other = _registered(r, uid, "laptop")  # given name "laptop-1": two strings
    # Decoded from the stored rows: the decoder makes the two names two objects.
    state, _ = fold(TailnetState(), r.store.read())
    assert state == r.state
    node = state.nodes[nid]
    assert node.given_name == node.hostname == "laptop" and node.given_name is node.hostname
    assert state.nodes[other].given_name == "laptop-1"

    # A rename away and back, and a host name change to the given name, share again.
    r.run(lambda s: c.decide_rename_node(s, str(nid), "desk"))
    r.run(lambda s: c.decide_rename_node(s, str(nid), "laptop"))
    r.run(lambda s: c.decide_change_hostname(s, s.nodes[other], fresh("laptop-1")))
    state, _ = fold(TailnetState(), r.store.read())
    assert state == r.state
    assert state.nodes[nid].given_name is state.nodes[nid].hostname
    assert state.nodes[other].hostname == "laptop-1" and state.nodes[other].hostname is state.nodes[other].given_name


def test_nodes_from_a_checkpoint_share_as_folded_ones_do() -> None:
    r = Recorder()
    uid = r.user("alice")
    r.run(lambda s: c.decide_create_preauth_key(
        s, user="alice", reusable=True, ephemeral=False, tags=("tag:web",), expires_at=None, now=r.now,
        prefix="0123456789ab", secret="s" * 32,
    ))
    [pak] = r.state.preauth_keys.values()
    def register(host: str) -> None:
        r.run(lambda s: c.decide_register_node(
            s, machine_key=f"{random.getrandbits(256):064x}", node_key=f"{random.getrandbits(256):064x}",
            hostname=host, user_id=uid, tags=("tag:web",), ephemeral=False, expiry=None,
            auth="preauth", preauth_key=s.preauth_keys[pak.id], plan=PLAN, os="linux",
        ))

    register("a")
    register("b")
    state = decode_state(encode_state(r.state))
    assert encode_state(state) == encode_state(r.state)
    a, b = sorted(state.nodes.values(), key=lambda n: n.hostname)
    assert a.given_name is a.hostname and b.given_name is b.hostname
    assert a.tags is b.tags is state.preauth_keys[pak.id].tags
    assert a.os is b.os and a.auth is b.auth


def test_a_node_record_carries_no_garbage_collector_header() -> None:
    # Issue 19: its fields cannot form a cycle, so it is left out of the collector.
    assert Node.__struct_config__.gc is False
    node = next(iter(_one_node_state().nodes.values()))
    assert not gc.is_tracked(node)


def _one_node_state() -> TailnetState:
    r = Recorder()
    _registered(r, r.user("alice"), "laptop")
    return r.state
