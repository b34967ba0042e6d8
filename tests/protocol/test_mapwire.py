"""The bytes of map messages: what :mod:`protocol.mapwire` frames decodes to exactly
the values projections decided, and every shared value is encoded and framed once.

The tailnet: ten devices of one user under the allow-all policy (one visibility
class), so a full map shares pieces between streams; pieces are three peers, so the
ten ids make four pieces: [1 2 3] [4 5 6] [7 8 9] [10].
"""

from __future__ import annotations

import dataclasses
import tracemalloc
from datetime import timedelta

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from projections.delta import EMPTY
from projections.mapviews.cursor import FullMap, StreamCursor
from projections.mapviews.hub import MapHub
from projections.mapviews.peersets import Peer
from projections.netmap import NetmapSettings
from projections.policystate import PolicyCompiler
from projections.presence import NodePresence
from projections.tailcfg import DERPMap, DERPRegion, MapResponse, decode, encode
from protocol import mapframe, mapwire
from protocol.mapframe import MapFrameDecoder
from protocol.mapwire import MapWire
from tests.support.builders import OPS, RandomHistory, Recorder


@dataclasses.dataclass
class Tailnet:
    r: Recorder
    hub: MapHub
    presence: dict[int, NodePresence]
    nodes: list[int]

    def advance(self, presence_changed: frozenset[int] = frozenset()) -> None:
        self.r.now += timedelta(seconds=1)
        self.hub.advance(self.r.state, self.r.now, self.r.delta, presence_changed)
        self.r.delta = EMPTY


@pytest.fixture
def net() -> Tailnet:
    r = Recorder()
    owner = r.user("alice")
    nodes = [r.node(owner, f"host{i}") for i in range(10)]
    assert nodes == list(range(1, 11))
    presence: dict[int, NodePresence] = {}
    settings = NetmapSettings(domain="example.ts.net", derp_map=DERPMap(regions={}))
    hub = MapHub(PolicyCompiler("https://control.example"), settings, presence.get)
    net = Tailnet(r, hub, presence, nodes)
    net.advance()
    assert hub.classes() == 1
    return net


def _decoded(frame: bytes, compress: bool) -> MapResponse:
    [json] = MapFrameDecoder(compressed=compress).receive_data(frame)
    return decode(json, MapResponse)


def _expected(full: FullMap) -> MapResponse:
    return decode(encode(full.response()), MapResponse)


class CountingCompress:
    """The real ``compress_piece``, counting its calls (of shared pieces in
    :mod:`protocol.mapwire`, of a stream's own in :mod:`protocol.mapframe`)."""

    def __init__(self) -> None:
        self.calls = 0
        self._real = mapframe.compress_piece

    def __call__(self, data: bytes) -> bytes:
        self.calls += 1
        return self._real(data)


@pytest.mark.parametrize("compress", [True, False])
def test_full_maps_decode_to_the_values_decided(net: Tailnet, compress: bool) -> None:
    wire = MapWire(chunk=3)
    for step in range(3):
        for nid in net.nodes:
            full = StreamCursor(nid).full_map(net.hub)
            assert len(full.peer_ids()) == len(net.nodes) - 1
            got = _decoded(wire.frame_full(full, compress), compress)
            assert got == _expected(full), (step, nid)
            assert decode(wire.full_map_json(full), MapResponse) == got
        # A peer's endpoints change (a new version reusing the other pieces), then one
        # more device joins (a piece grows).
        if step == 0:
            net.presence[5] = NodePresence(online=True, endpoints=("192.0.2.5:41641",), home_derp=1)
            net.advance(frozenset({5}))
        elif step == 1:
            net.nodes.append(net.r.node(net.r.state.nodes[1].user_id, f"host{len(net.nodes)}"))
            net.advance()


def test_a_node_without_peers_gets_the_body_alone() -> None:
    r = Recorder()
    only = r.node(r.user("alice"), "lonely")
    hub = MapHub(
        PolicyCompiler("https://control.example"),
        NetmapSettings(domain="example.ts.net", derp_map=DERPMap(regions={})), lambda _n: None,
    )
    hub.advance(r.state, r.now, r.delta, ())
    full = StreamCursor(only).full_map(hub)
    json = MapWire(chunk=3).full_map_json(full)
    assert b'"Peers"' not in json
    assert decode(json, MapResponse) == _expected(full)


def test_shared_pieces_are_compressed_once_and_taken_over_by_the_next_version(
    net: Tailnet, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = CountingCompress()
    monkeypatch.setattr(mapwire, "compress_piece", counter)
    monkeypatch.setattr(mapframe, "compress_piece", counter)
    wire = MapWire(chunk=3)
    wire.frame_full(StreamCursor(1).full_map(net.hub), True)
    assert counter.calls == 4  # its head, and the three pieces after it
    # Node 2's head is its own; pieces [4 5 6] [7 8 9] [10] are node 1's.
    counter.calls = 0
    wire.frame_full(StreamCursor(2).full_map(net.hub), True)
    assert counter.calls == 1
    # Node 5 is in a piece of node 1's: it gets [4 6] of its own, after its head (one
    # frame: its own bytes in a row are compressed together).
    counter.calls = 0
    full = StreamCursor(5).full_map(net.hub)
    assert _decoded(wire.frame_full(full, True), True) == _expected(full)
    assert counter.calls == 1
    # Node 8's endpoints change: the next version reuses [4 5 6] and [10].
    net.presence[8] = NodePresence(online=True, endpoints=("192.0.2.8:41641",), home_derp=1)
    net.advance(frozenset({8}))
    counter.calls = 0
    full = StreamCursor(1).full_map(net.hub)
    frame = wire.frame_full(full, True)
    assert counter.calls == 2  # the head, and [7 8 9] for every stream
    assert _decoded(frame, True) == _expected(full)


class CountingWire(MapWire):
    """A MapWire that counts the peers it looks up (their JSON, cached or not)."""

    looked_up = 0

    def _peer_json(self, peer: Peer) -> bytes:
        self.looked_up += 1
        return super()._peer_json(peer)


def test_a_version_that_changed_some_peers_costs_those_peers_not_the_class(net: Tailnet) -> None:
    # A reconnect herd makes a new version per publication (peers come online): the
    # next full map must not look up every peer of the class again, only those that
    # changed, and the chunks without them are the very same objects.
    wire = CountingWire(chunk=3)
    first = wire.frame_full(StreamCursor(1).full_map(net.hub), True)
    assert wire.looked_up == len(net.nodes)
    for nid in (4, 8):
        net.presence[nid] = NodePresence(online=True, endpoints=(f"192.0.2.{nid}:41641",), home_derp=1)
    net.advance(frozenset({4, 8}))
    wire.looked_up = 0
    full = StreamCursor(1).full_map(net.hub)
    frame = wire.frame_full(full, True)
    assert wire.looked_up == 2
    assert frame != first
    assert _decoded(frame, True) == _expected(full)
    # A peer joining shifts the chunks: everything is looked up again, and still right.
    net.nodes.append(net.r.node(net.r.state.nodes[1].user_id, "late"))
    net.advance()
    wire.looked_up = 0
    full = StreamCursor(1).full_map(net.hub)
    assert _decoded(wire.frame_full(full, True), True) == _expected(full)
    assert wire.looked_up == len(net.nodes)


def test_streams_given_one_message_are_sent_the_same_bytes(net: Tailnet) -> None:
    wire = MapWire(chunk=3)
    cursors = {nid: StreamCursor(nid) for nid in net.nodes}
    for cur in cursors.values():
        cur.full_map(net.hub)
    # A peer diff: every stream but node 3's (its own node is in it) shares one.
    net.presence[3] = NodePresence(online=True, endpoints=("192.0.2.3:41641",), home_derp=1)
    net.advance(frozenset({3}))
    frames = {nid: [wire.frame(m, True) for m in cur.update(net.hub)] for nid, cur in cursors.items()}
    diff = frames[1][0]
    assert all(f == [diff] for nid, f in frames.items() if nid != 3)
    assert all(f[0] is diff for nid, f in frames.items() if nid != 3)
    # Node 3 is told of its own node in a message of its own, not the shared diff.
    assert frames[3] and all(f is not diff for f in frames[3])
    # Own parts: a new DERP map is the same message, and bytes, for every stream.
    region = DERPRegion(region_id=1, region_code="x", region_name="x", nodes=[])
    net.hub.settings = dataclasses.replace(net.hub.settings, derp_map=DERPMap(regions={1: region}))
    net.advance()
    updates = {nid: cur.update(net.hub) for nid, cur in cursors.items()}
    msg = updates[1][0]
    assert all(msgs == [msg] for msgs in updates.values())
    raw = wire.frame(msg, False)
    assert all(wire.frame(msgs[0], False) is raw for msgs in updates.values())
    assert _decoded(wire.frame(msg, True), True) == decode(encode(msg.response), MapResponse)
    assert _decoded(raw, False).derp_map == net.hub.settings.derp_map
    assert wire.message_json(msg) == encode(msg.response)


#: Allow-all, and a policy of several classes (tags, a group, autogroup:self, SSH).
_POLICIES = [
    None,
    '{"tagOwners": {"tag:t0": ["autogroup:member"], "tag:t1": ["autogroup:member"], "tag:t2": ["autogroup:member"],'
    ' "tag:a": ["autogroup:member"]}, "groups": {"group:eng": ["user0@"]},'
    ' "acls": [{"action": "accept", "src": ["group:eng"], "dst": ["tag:t0:*", "tag:a:22"]},'
    ' {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}],'
    ' "ssh": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["root"]}]}',
]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.integers(0, OPS - 1), st.integers(0, 1000)), min_size=5, max_size=40))
def test_random_histories_frame_to_the_values_decided(ops: list[tuple[int, int]]) -> None:
    """Every full map (in pieces of three peers, shared across streams and versions)
    and every update, framed, decodes to the value projections decided."""
    history = RandomHistory(seed=1, users=("user0", "user1", "user2"), policies=_POLICIES)
    r = history.recorder
    settings_ = NetmapSettings(domain="example.ts.net", derp_map=DERPMap(regions={}))
    hub = MapHub(PolicyCompiler("https://control.example"), settings_, history.presence.get)
    wire = MapWire(chunk=3)
    cursors: dict[int, StreamCursor] = {}
    for op, arg in ops:
        history.step(op, arg)
        history.advance(hub)
        for nid in list(cursors):
            if nid not in r.state.nodes:
                del cursors[nid]
                continue
            for msg in cursors[nid].update(hub):
                compress = nid % 2 == 0
                assert _decoded(wire.frame(msg, compress), compress) == decode(encode(msg.response), MapResponse)
        for nid in r.state.nodes:
            cursor = StreamCursor(nid)
            full = cursor.full_map(hub)
            compress = (nid + op) % 2 == 0
            assert _decoded(wire.frame_full(full, compress), compress) == _expected(full), (nid, op, arg)
            cursors.setdefault(nid, cursor)


def test_chunk_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        MapWire(chunk=0)


def test_a_kept_compressed_piece_holds_only_its_own_bytes() -> None:
    # python-zstandard hands a frame back in a buffer of the input's worst-case
    # compressed size; a shared piece keeps its frame as long as its class, so it
    # keeps a copy of the frame's own size, with the same bytes.
    json = b",".join(b'{"ID":%d,"Name":"host.example.ts.net.","Tags":[]}' % i for i in range(2000))
    tracemalloc.start()
    try:
        piece = mapwire._Piece((json,))
        before = tracemalloc.get_traced_memory()[0]
        frame = piece.compressed()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(frame) < len(json) // 20  # the JSON is repetitive: the frame is small
    assert kept < len(frame) + 1024, (kept, len(frame))  # not the ~100 KiB buffer
    assert piece.compressed() is frame
    assert zstandard.ZstdDecompressor().decompress(frame) == b"," + json


def test_a_peers_kept_json_holds_only_its_own_bytes(net: Tailnet) -> None:
    # msgspec hands its output back in a buffer half as large again as the JSON; a
    # peer's JSON is kept as long as the peer, so it is kept at its own size.
    net.presence[2] = NodePresence(
        online=True, endpoints=tuple(f"192.0.2.{i}:41641" for i in range(80)), home_derp=1
    )
    net.advance(frozenset({2}))
    peers = net.hub.peer_set(1).peers
    wire = MapWire()
    wire._peer_json(peers[3])  # the cache's table exists: the next entry adds no table
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        json = wire._peer_json(peers[2])
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(json) > 1500
    assert kept < len(json) + 400, (kept, len(json))  # not the encoder's buffer (+50%)
    assert json == encode(peers[2].wire) and wire._peer_json(peers[2]) is json


def test_a_full_map_tells_the_clock_it_is_given_not_an_older_hub_time(net: Tailnet) -> None:
    """ControlTime is the server's clock (clients correct peer key expiry by it): a hub
    last advanced a while ago must not make a newcomer's clock look skewed."""
    hub_time = net.hub.now
    assert hub_time is not None
    later = hub_time + timedelta(minutes=40)
    assert StreamCursor(1).full_map(net.hub).response().control_time == hub_time
    assert StreamCursor(1).full_map(net.hub, later).response().control_time == later
    # A clock behind the hub's (it never is) does not move ControlTime back.
    earlier = hub_time - timedelta(minutes=1)
    assert StreamCursor(1).full_map(net.hub, earlier).response().control_time == hub_time
