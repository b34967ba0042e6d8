"""The sans-I/O relay core: login, routing, drops by reason, peer gone, dups, mesh, revocation."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.auth import AllowAll, StaticAuthorizer
from relay.derp import frames as f
from relay.derp.client import (
    ClientEvent,
    KeepAliveReceived,
    PacketReceived,
    PeerGoneReceived,
    PeerPresentReceived,
    PongReceived,
    ServerInfoReceived,
)
from relay.derp.server import (
    _TRANSITIONS,
    MIN_RATE_BURST,
    ConnInput,
    ConnState,
    DupPolicy,
    ForwardQueue,
    KeyLimitPolicy,
    RelayCore,
)
from relay.errors import LocalProtocolError
from relay.keys import generate_private_key, public_key_of, seal_to
from tests.support.relay_helpers import CoreClient, FakeClock, login_all

DISCO = f.DISCO_MAGIC + b"\x11" * 32 + b"\x22" * 24 + b"payload"


def make_core(**kwargs: object) -> RelayCore:
    kwargs.setdefault("authorizer", AllowAll())
    return RelayCore(generate_private_key(), **kwargs)  # type: ignore[arg-type]


def packets(events: Sequence[object]) -> list[PacketReceived]:
    return [e for e in events if isinstance(e, PacketReceived)]


def drops(core: RelayCore) -> dict[str, int]:
    return {k: v for k, v in core.stats().drops.items() if v}


# -- login ---------------------------------------------------------------------


def test_server_key_frame_is_first_and_login_completes() -> None:
    core = make_core()
    c = CoreClient(core)
    data, npk = core.take_outgoing(c.conn)
    assert npk == 0
    assert data == b"\x01\x00\x00\x00\x28" + f.MAGIC + core.public_key
    c.protocol.receive_data(data)
    c.pump_out()
    assert c.conn.state is ConnState.ACTIVE
    assert c.conn.key == c.key
    events = c.pump_in()
    assert events == [ServerInfoReceived(info=f.ServerInfo(version=2))]
    assert core.is_connected(c.key)


def test_unauthorized_key_is_closed_before_server_info() -> None:
    auth = StaticAuthorizer()
    core = make_core(authorizer=auth)
    good = CoreClient(core)
    auth.allow(good.key)
    bad = CoreClient(core)
    assert isinstance(good.login()[0], ServerInfoReceived)
    assert bad.login() == []  # nothing but the ServerKey, then silence
    assert bad.conn.closed
    assert bad.conn.close_reason == "not authorized"
    assert core.stats().refused_unauthorized == 1
    assert not core.is_connected(bad.key)
    assert core.is_connected(good.key)


def test_first_frame_must_be_client_info() -> None:
    core = make_core()
    c = CoreClient(core)
    c.send_raw(f.encode_send_packet(b"\x01" * 32, b"early"))
    assert c.conn.closed
    assert "ClientInfo" in (c.conn.close_reason or "")
    assert core.stats().refused_protocol == 1


def test_client_info_that_does_not_open_closes_the_connection() -> None:
    core = make_core()
    c = CoreClient(core)
    priv = generate_private_key()
    wrong_server = public_key_of(generate_private_key())
    sealed = seal_to(priv, wrong_server, b'{"version":2}')
    c.send_raw(f.encode_client_info(public_key_of(priv), sealed))
    assert c.conn.closed
    assert "does not open" in (c.conn.close_reason or "")


def test_client_info_with_garbage_json_closes_the_connection() -> None:
    core = make_core()
    c = CoreClient(core)
    priv = generate_private_key()
    sealed = seal_to(priv, core.public_key, b"[not an object]")
    c.send_raw(f.encode_client_info(public_key_of(priv), sealed))
    assert c.conn.closed


def test_frames_pipelined_after_client_info_are_processed() -> None:
    core = make_core()
    (b,) = login_all(core, 1)
    a = CoreClient(core)
    a.protocol.receive_data(core.take_outgoing(a.conn)[0])
    # ClientInfo and a packet in one chunk, as a fast-start client sends them.
    a.send_raw(a.protocol.data_to_send() + f.encode_send_packet(b.key, b"pipelined"))
    assert packets(b.pump_in()) == [PacketReceived(source=a.key, data=b"pipelined")]


# -- routing and drops -----------------------------------------------------------


def test_packet_is_relayed_with_source_key() -> None:
    core = make_core()
    a, b = login_all(core, 2)
    a.send_raw(f.encode_send_packet(b.key, b"wireguard bytes"))
    assert packets(b.pump_in()) == [PacketReceived(source=a.key, data=b"wireguard bytes")]
    s = core.stats()
    assert (s.packets_received, s.bytes_received) == (1, 15)
    assert (s.packets_sent, s.bytes_sent) == (1, 15)


def test_unknown_destination_is_dropped_and_counted() -> None:
    core = make_core()
    (a,) = login_all(core, 1)
    a.send_raw(f.encode_send_packet(b"\x09" * 32, b"nobody"))
    assert drops(core) == {"unknown_dest": 1}
    assert core.stats().bytes_dropped["unknown_dest"] == 6
    assert a.pump_in() == []  # not disco: no PeerGone(NOT_HERE)


def test_disco_to_unknown_destination_gets_rate_limited_not_here() -> None:
    clock = FakeClock()
    core = make_core(clock=clock)
    (a,) = login_all(core, 1)
    ghost = b"\x09" * 32
    for _ in range(5):
        a.send_raw(f.encode_send_packet(ghost, DISCO))
    gone = [e for e in a.pump_in() if isinstance(e, PeerGoneReceived)]
    assert gone == [PeerGoneReceived(peer=ghost, reason=f.PeerGoneReason.NOT_HERE)] * 3
    clock.now += 1.0  # one token back
    for _ in range(3):
        a.send_raw(f.encode_send_packet(ghost, DISCO))
    assert len([e for e in a.pump_in() if isinstance(e, PeerGoneReceived)]) == 1
    assert drops(core) == {"unknown_dest": 8}
    assert core.stats().peer_gone_not_here_sent == 4


def test_full_queue_drops_oldest_and_counts() -> None:
    core = make_core(queue_depth=4)
    a, b = login_all(core, 2)
    for i in range(10):
        a.send_raw(f.encode_send_packet(b.key, b"p%d" % i))
    got = packets(b.pump_in())
    assert [p.data for p in got] == [b"p6", b"p7", b"p8", b"p9"]
    assert drops(core) == {"queue_full": 6}


def test_disco_has_its_own_queue_and_goes_first() -> None:
    core = make_core(queue_depth=2)
    a, b = login_all(core, 2)
    for i in range(5):
        a.send_raw(f.encode_send_packet(b.key, b"bulk%d" % i))
    a.send_raw(f.encode_send_packet(b.key, DISCO))
    got = [p.data for p in packets(b.pump_in())]
    assert got == [DISCO, b"bulk3", b"bulk4"]
    assert drops(core) == {"queue_full": 3}


def test_queued_packets_of_a_leaving_client_count_as_gone_disconnected() -> None:
    core = make_core()
    a, b = login_all(core, 2)
    for _ in range(3):
        a.send_raw(f.encode_send_packet(b.key, b"xyz"))
    core.connection_lost(b.conn, "EOF")
    assert drops(core) == {"gone_disconnected": 3}
    assert core.stats().bytes_dropped["gone_disconnected"] == 9


def test_write_failure_counts_the_batch_as_write_errors() -> None:
    core = make_core()
    a, b = login_all(core, 2)
    for _ in range(2):
        a.send_raw(f.encode_send_packet(b.key, b"abcd"))
    _data, npk = core.take_outgoing(b.conn)
    assert npk == 2
    core.write_failed(b.conn, npk, 8)
    assert b.conn.closed
    s = core.stats()
    assert s.drops["write_error"] == 2
    assert s.packets_sent == 0


def test_writer_is_woken_once_per_batch() -> None:
    core = make_core()
    a, b = login_all(core, 2)
    before = b.wakes
    for _ in range(50):
        a.send_raw(f.encode_send_packet(b.key, b"x"))
    assert b.wakes == before + 1
    b.pump_in()
    a.send_raw(f.encode_send_packet(b.key, b"x"))
    assert b.wakes == before + 2


def test_protocol_errors_close_only_the_offender() -> None:
    core = make_core()
    a, b, c = login_all(core, 3)
    a.send_raw(b"\x04\x00\x00\x00\x03abc")  # SendPacket shorter than a key
    assert a.conn.closed
    c.send_raw(b"\x04\xff\xff\xff\xff")  # 4 GiB frame header
    assert c.conn.closed
    b.send_raw(f.encode_send_packet(b.key, b"to myself"))
    assert packets(b.pump_in()) == [PacketReceived(source=b.key, data=b"to myself")]
    assert core.stats().refused_protocol == 2


def test_unknown_frame_types_are_skipped() -> None:
    core = make_core()
    a, b = login_all(core, 2)
    a.send_raw(f.encode_frame(0x7E, b"from the future") + f.encode_send_packet(b.key, b"ok"))
    assert not a.conn.closed
    assert packets(b.pump_in())[0].data == b"ok"
    assert core.stats().unknown_frames == 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_escapes_and_never_hurts_others(garbage: bytes) -> None:
    core = make_core()
    a, b, c = login_all(core, 3)
    a.send_raw(garbage)  # must not raise, whatever it is
    c.send_raw(f.encode_send_packet(b.key, b"still fine"))
    assert PacketReceived(source=c.key, data=b"still fine") in packets(b.pump_in())


# -- ping, preferred, keepalive ------------------------------------------------------


def test_ping_gets_one_pong_per_flush() -> None:
    core = make_core()
    (a,) = login_all(core, 1)
    a.send_raw(f.encode_ping(b"AAAAAAAA") + f.encode_ping(b"BBBBBBBB"))
    assert a.pump_in() == [PongReceived(data=b"AAAAAAAA")]  # pinging too fast: extra ignored
    a.send_raw(f.encode_ping(b"CCCCCCCC"))
    assert a.pump_in() == [PongReceived(data=b"CCCCCCCC")]
    assert core.stats().pings_received == 3


def test_note_preferred_and_keepalive() -> None:
    core = make_core()
    a, _b = login_all(core, 2)
    a.send_raw(f.encode_note_preferred(True))
    assert core.stats().home_connections == 1
    a.send_raw(f.encode_note_preferred(False))
    assert core.stats().home_connections == 0
    assert core.keepalive() == 2
    assert a.pump_in() == [KeepAliveReceived()]


# -- peer gone ---------------------------------------------------------------------


def test_peer_gone_goes_to_those_who_heard_from_the_leaver() -> None:
    core = make_core()
    a, b, c = login_all(core, 3)
    a.send_raw(f.encode_send_packet(b.key, b"hi b"))
    b.pump_in()
    core.connection_lost(a.conn)
    assert b.pump_in() == [PeerGoneReceived(peer=a.key, reason=f.PeerGoneReason.DISCONNECTED)]
    assert c.pump_in() == []
    assert core.stats().peer_gone_disconnected_sent == 1


def test_no_peer_gone_while_another_connection_of_the_key_remains() -> None:
    core = make_core()
    a1, b = login_all(core, 2)
    a2 = CoreClient(core, private_key=a1.private_key)
    a2.login()
    a1.send_raw(f.encode_send_packet(b.key, b"x"))
    b.pump_in()
    core.connection_lost(a1.conn)
    assert b.pump_in() == []
    core.connection_lost(a2.conn)
    assert b.pump_in() == [PeerGoneReceived(peer=a1.key, reason=0)]


# -- duplicate connections ------------------------------------------------------------


def test_duplicate_key_last_connection_then_last_writer_is_active() -> None:
    core = make_core()
    (b,) = login_all(core, 1)
    priv = generate_private_key()
    first = CoreClient(core, private_key=priv)
    first.login()
    second = CoreClient(core, private_key=priv)
    second.login()
    assert core.stats().dup_keys == 1
    b.send_raw(f.encode_send_packet(first.key, b"to newest"))
    assert packets(second.pump_in())[0].data == b"to newest"
    assert packets(first.pump_in()) == []
    first.send_raw(f.encode_note_preferred(True))  # activity: first becomes active
    b.send_raw(f.encode_send_packet(first.key, b"to writer"))
    assert packets(first.pump_in())[0].data == b"to writer"
    core.connection_lost(first.conn)
    b.send_raw(f.encode_send_packet(first.key, b"to the survivor"))
    assert packets(second.pump_in())[0].data == b"to the survivor"
    assert core.stats().dup_keys == 0


def test_duplicate_key_with_no_speaker_left_drops_as_dup_client() -> None:
    core = make_core()
    (b,) = login_all(core, 1)
    priv = generate_private_key()
    conns = [CoreClient(core, private_key=priv) for _ in range(4)]
    for c in conns:
        c.login()
    core.connection_lost(conns[0].conn)  # the only one in the send history
    core.connection_lost(conns[3].conn)  # the active one; conns[1] and [2] never spoke
    b.send_raw(f.encode_send_packet(conns[1].key, b"x"))
    assert drops(core) == {"dup_client": 1}
    conns[1].send_raw(f.encode_note_preferred(True))  # it speaks: active again
    b.send_raw(f.encode_send_packet(conns[1].key, b"y"))
    assert packets(conns[1].pump_in())[-1].data == b"y"


def test_fighting_connections_are_disabled_under_disable_fighters() -> None:
    core = make_core(dup_policy=DupPolicy.DISABLE_FIGHTERS)
    (b,) = login_all(core, 1)
    priv = generate_private_key()
    one, two = CoreClient(core, private_key=priv), CoreClient(core, private_key=priv)
    one.login()
    two.login()
    two.send_raw(f.encode_note_preferred(True))
    b.send_raw(f.encode_send_packet(one.key, b"before"))
    assert packets(two.pump_in())[-1].data == b"before"
    one.send_raw(f.encode_note_preferred(True))  # one spoke before two: fighting
    b.send_raw(f.encode_send_packet(one.key, b"during"))
    assert drops(core) == {"dup_client": 1}
    assert packets(one.pump_in()) == packets(two.pump_in()) == []
    core.connection_lost(two.conn)  # back to a single connection: enabled again
    b.send_raw(f.encode_send_packet(one.key, b"after"))
    assert packets(one.pump_in())[-1].data == b"after"


def test_last_writer_policy_never_disables() -> None:
    core = make_core()
    (b,) = login_all(core, 1)
    priv = generate_private_key()
    one, two = CoreClient(core, private_key=priv), CoreClient(core, private_key=priv)
    one.login()
    two.login()
    for speaker in (two, one, two, one):
        speaker.send_raw(f.encode_note_preferred(True))
        b.send_raw(f.encode_send_packet(one.key, b"p"))
        assert packets(speaker.pump_in())[-1].data == b"p"
    assert drops(core) == {}


# -- authorization changes --------------------------------------------------------------


def test_revoke_closes_every_connection_of_the_key() -> None:
    core = make_core()
    a, b = login_all(core, 2)
    a2 = CoreClient(core, private_key=a.private_key)
    a2.login()
    closed = core.revoke(a.key)
    assert {c.conn_id for c in closed} == {a.conn.conn_id, a2.conn.conn_id}
    assert a.conn.close_reason == "authorization revoked"
    assert not core.is_connected(a.key)
    assert core.stats().revoked == 2
    assert core.revoke(a.key) == []
    assert not b.conn.closed


def test_reauthorize_asks_the_authorizer_again() -> None:
    auth = StaticAuthorizer()
    core = make_core(authorizer=auth)
    a, b = CoreClient(core), CoreClient(core)
    auth.allow(a.key)
    auth.allow(b.key)
    a.login()
    b.login()
    auth.deny(b.key)
    assert [c.key for c in core.reauthorize()] == [b.key]
    assert b.conn.closed
    assert not a.conn.closed


# -- mesh --------------------------------------------------------------------------------

MESH = b"\x42" * 32


def test_mesh_frames_need_the_mesh_key() -> None:
    core = make_core(mesh_key=MESH)
    a, b = login_all(core, 2)
    a.send_raw(f.encode_watch_conns())
    assert a.conn.closed
    assert "insufficient permissions" in (a.conn.close_reason or "")
    b.send_raw(f.encode_forward_packet(b.key, b.key, b"x"))
    assert b.conn.closed


def test_mesh_key_skips_the_authorizer() -> None:
    core = make_core(mesh_key=MESH, authorizer=StaticAuthorizer())
    peer = CoreClient(core, mesh_key=MESH)
    assert isinstance(peer.login()[0], ServerInfoReceived)
    assert peer.conn.can_mesh
    wrong = CoreClient(core, mesh_key=b"\x43" * 32)
    assert wrong.login() == []
    assert wrong.conn.closed


def test_watch_conns_floods_then_streams_presence() -> None:
    core = make_core(mesh_key=MESH)
    a = CoreClient(core, remote=("192.0.2.1", 1000))
    a.login()
    watcher = CoreClient(core, mesh_key=MESH)
    watcher.login()
    watcher.send_raw(f.encode_watch_conns())
    assert watcher.pump_in() == [
        PeerPresentReceived(
            present=f.PeerPresent(
                key=a.key, ip="192.0.2.1", port=1000, flags=f.PeerPresentFlags.IS_REGULAR
            )
        )
    ]
    b = CoreClient(core, remote=("2001:db8::9", 2000), ideal_node="900b")
    b.login()
    (present,) = watcher.pump_in()
    assert isinstance(present, PeerPresentReceived)
    assert present.present.key == b.key
    assert present.present.flags == f.PeerPresentFlags.NOT_IDEAL
    core.connection_lost(b.conn)
    assert watcher.pump_in() == [PeerGoneReceived(peer=b.key, reason=0)]
    assert core.stats().watchers == 1


def test_forward_packet_from_mesh_peer_is_delivered() -> None:
    core = make_core(mesh_key=MESH)
    (b,) = login_all(core, 1)
    peer = CoreClient(core, mesh_key=MESH)
    peer.login()
    remote_src = b"\x55" * 32
    peer.send_raw(f.encode_forward_packet(remote_src, b.key, b"from afar"))
    assert packets(b.pump_in()) == [PacketReceived(source=remote_src, data=b"from afar")]
    peer.send_raw(f.encode_forward_packet(remote_src, b"\x66" * 32, b"lost"))
    assert drops(core) == {"unknown_dest_on_fwd": 1}
    assert core.stats().packets_forwarded_in == 2


def test_packets_for_remote_keys_go_to_the_forwarder() -> None:
    core = make_core(mesh_key=MESH, queue_depth=2)
    (a,) = login_all(core, 1)
    remote = b"\x77" * 32
    fwd = ForwardQueue("peer", depth=2)
    core.add_forwarder(remote, fwd)
    for i in range(3):
        a.send_raw(f.encode_send_packet(remote, b"f%d" % i))
    data = fwd.take()
    dec = f.FrameDecoder()
    frames = dec.feed(data)
    assert [f.parse_forward_packet(p) for _, p in frames] == [
        (a.key, remote, b"f0"),
        (a.key, remote, b"f1"),
    ]
    assert drops(core) == {"mesh_queue_full": 1}
    assert core.stats().packets_forwarded_out == 3


def test_removing_the_last_forwarder_sends_peer_gone() -> None:
    core = make_core(mesh_key=MESH)
    (b,) = login_all(core, 1)
    peer = CoreClient(core, mesh_key=MESH)
    peer.login()
    remote = b"\x77" * 32
    fwd = ForwardQueue("peer")
    core.add_forwarder(remote, fwd)
    peer.send_raw(f.encode_forward_packet(remote, b.key, b"hello"))
    b.pump_in()
    assert core.remove_forwarder_everywhere(fwd) == 1
    assert b.pump_in() == [PeerGoneReceived(peer=remote, reason=0)]
    assert core.stats().forwarded_keys == 0


def test_local_connection_wins_over_forwarder() -> None:
    core = make_core(mesh_key=MESH)
    a, b = login_all(core, 2)
    fwd = ForwardQueue("peer")
    core.add_forwarder(b.key, fwd)
    a.send_raw(f.encode_send_packet(b.key, b"local"))
    assert packets(b.pump_in())[0].data == b"local"
    assert fwd.take() == b""


def test_close_peer_disconnects_the_target() -> None:
    core = make_core(mesh_key=MESH)
    (a,) = login_all(core, 1)
    peer = CoreClient(core, mesh_key=MESH)
    peer.login()
    peer.send_raw(f.encode_close_peer(a.key))
    assert a.conn.closed
    assert a.conn.close_reason == "closed by mesh peer"
    assert not peer.conn.closed


# -- abuse bounds: per-key rate bucket and connection cap -----------------------------

#: A SendPacket frame of a 16 KiB packet costs header + key + packet.
BIG = b"\xee" * (16 << 10)
BIG_COST = f.FRAME_HEADER_LEN + 32 + len(BIG)
#: How many BIG packets a full bucket of MIN_RATE_BURST bytes pays for (3).
BIG_PER_BURST = MIN_RATE_BURST // BIG_COST


def limited_core(clock: FakeClock, **kwargs: object) -> RelayCore:
    kwargs.setdefault("rate_limit", 10_000)
    kwargs.setdefault("rate_burst", MIN_RATE_BURST)
    return make_core(clock=clock, **kwargs)


def test_rate_limit_drops_what_the_bucket_cannot_pay_and_refills_with_time() -> None:
    clock = FakeClock()
    core = limited_core(clock, queue_depth=100)
    a, b = login_all(core, 2)
    a.send_raw(b"".join(f.encode_send_packet(b.key, BIG) for _ in range(10)))
    assert len(packets(b.pump_in())) == BIG_PER_BURST
    limited = 10 - BIG_PER_BURST
    assert drops(core) == {"rate_limited": limited}
    assert core.stats().bytes_dropped["rate_limited"] == limited * len(BIG)
    assert core.stats().packets_received == 10  # received, then dropped: counted once each
    # 10 000 bytes/s: one more BIG packet is paid for after the rest of its cost accrues.
    left = MIN_RATE_BURST - BIG_PER_BURST * BIG_COST
    clock.now += (BIG_COST - left) / 10_000 - 0.01  # 100 bytes short
    a.send_raw(f.encode_send_packet(b.key, BIG))
    assert packets(b.pump_in()) == []
    clock.now += 0.02  # 100 bytes over
    a.send_raw(f.encode_send_packet(b.key, BIG))
    assert len(packets(b.pump_in())) == 1
    # A long idle time refills the bucket to the burst, no more.
    clock.now += 3600
    a.send_raw(b"".join(f.encode_send_packet(b.key, BIG) for _ in range(10)))
    assert len(packets(b.pump_in())) == BIG_PER_BURST


def test_a_rate_limited_flooder_cannot_crowd_out_a_victims_queue() -> None:
    # The victim reads slowly (its queue holds 8); a peer sends it 4 packets, then a
    # flooder sends 100.  Without the bucket the flood pushes the peer's packets out
    # of the queue (oldest dropped first); with it, the flood stops at the burst.
    for rate_limit, peer_packets_kept in ((0, 0), (10_000, 4)):
        core = make_core(
            clock=FakeClock(),
            queue_depth=8,
            rate_limit=rate_limit,
            rate_burst=MIN_RATE_BURST if rate_limit else 0,
        )
        victim, peer, flooder = login_all(core, 3)
        for i in range(4):
            peer.send_raw(f.encode_send_packet(victim.key, b"peer %d" % i))
        flooder.send_raw(b"".join(f.encode_send_packet(victim.key, BIG) for _ in range(100)))
        got = packets(victim.pump_in())
        assert [p.data for p in got if p.source == peer.key] == [
            b"peer %d" % i for i in range(4)
        ][:peer_packets_kept]
        if rate_limit:
            assert len(got) == 4 + BIG_PER_BURST
            assert drops(core) == {"rate_limited": 100 - BIG_PER_BURST}
        else:
            assert len(got) == 8
            assert drops(core) == {"queue_full": 96}


def test_a_keys_connections_share_one_bucket() -> None:
    clock = FakeClock()
    core = limited_core(clock, queue_depth=100)
    (b,) = login_all(core, 1)
    key = generate_private_key()
    first, second = CoreClient(core, private_key=key), CoreClient(core, private_key=key)
    first.login()
    second.login()
    for _ in range(BIG_PER_BURST):
        first.send_raw(f.encode_send_packet(b.key, BIG))
        second.send_raw(f.encode_send_packet(b.key, BIG))
    assert len(packets(b.pump_in())) == BIG_PER_BURST
    assert drops(core) == {"rate_limited": BIG_PER_BURST}


def test_reconnecting_does_not_refill_the_bucket() -> None:
    clock = FakeClock()
    core = limited_core(clock, queue_depth=100)
    (b,) = login_all(core, 1)
    key = generate_private_key()
    for _ in range(3):  # each time: the burst is spent, leave, come back at once
        flooder = CoreClient(core, private_key=key)
        flooder.login()
        flooder.send_raw(b"".join(f.encode_send_packet(b.key, BIG) for _ in range(10)))
        core.connection_lost(flooder.conn)
    assert len(packets(b.pump_in())) == BIG_PER_BURST
    # Once the bucket would have refilled, the key starts afresh (and is forgotten).
    clock.now += MIN_RATE_BURST / 10_000
    flooder = CoreClient(core, private_key=key)
    flooder.login()
    flooder.send_raw(b"".join(f.encode_send_packet(b.key, BIG) for _ in range(10)))
    assert len(packets(b.pump_in())) == BIG_PER_BURST
    core.connection_lost(flooder.conn)
    clock.now += MIN_RATE_BURST / 10_000
    other = CoreClient(core)
    other.login()
    core.connection_lost(other.conn)  # its leaving prunes the refilled entries
    assert core._left_buckets == {}


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 3), st.integers(0, f.MAX_PACKET_SIZE), st.booleans()), min_size=1, max_size=40
    )
)
def test_admitted_bytes_never_exceed_burst_plus_rate_times_time(
    steps: list[tuple[float, int, bool]],
) -> None:
    clock = FakeClock()
    core = limited_core(clock, queue_depth=10_000)
    (b,) = login_all(core, 1)
    key = generate_private_key()
    sender = CoreClient(core, private_key=key)
    sender.login()
    start, admitted = clock.now, 0
    for seconds, size, reconnect in steps:
        clock.now += seconds
        if reconnect:
            core.connection_lost(sender.conn)
            sender = CoreClient(core, private_key=key)
            sender.login()
        sender.send_raw(f.encode_send_packet(b.key, b"\x01" * size))
        admitted += sum(f.FRAME_HEADER_LEN + 32 + len(p.data) for p in packets(b.pump_in()))
        assert admitted <= MIN_RATE_BURST + 10_000 * (clock.now - start) + 1e-6


def test_rate_limit_is_announced_in_server_info_and_spares_mesh_peers() -> None:
    core = limited_core(FakeClock(), mesh_key=MESH, queue_depth=100)
    (b,) = login_all(core, 1)
    peer = CoreClient(core, mesh_key=MESH)
    assert peer.login()[0] == ServerInfoReceived(
        info=f.ServerInfo(
            version=2, token_bucket_bytes_per_second=10_000, token_bucket_bytes_burst=MIN_RATE_BURST
        )
    )
    src = b"\x55" * 32
    peer.send_raw(b"".join(f.encode_forward_packet(src, b.key, BIG) for _ in range(20)))
    peer.send_raw(b"".join(f.encode_send_packet(b.key, BIG) for _ in range(20)))
    assert len(packets(b.pump_in())) == 40
    assert drops(core) == {}


def test_rate_limits_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="rate_burst must be at least"):
        make_core(rate_limit=1000, rate_burst=MIN_RATE_BURST - 1)
    with pytest.raises(ValueError, match="must not be negative"):
        make_core(max_conns_per_key=-1)
    with pytest.raises(ValueError, match="must not be negative"):
        make_core(rate_limit=-5)


def _limited_deliveries(cuts: list[int]) -> tuple[list[bytes], dict[str, int]]:
    """One fixed stream from A under a bucket that admits only part of it, cut at ``cuts``."""
    core = limited_core(FakeClock(), queue_depth=1000)
    a, b = login_all(core, 2)
    sizes = [30_000, 100, 30_000, 20_000, 1, 16_000, 5_000, 0, 64 << 10, 7]
    stream = b"".join(f.encode_send_packet(b.key, bytes([i]) * n) for i, n in enumerate(sizes))
    points = sorted({c % (len(stream) + 1) for c in cuts})
    for lo, hi in zip([0, *points], [*points, len(stream)], strict=True):
        a.send_raw(stream[lo:hi])
    return [p.data[:1] for p in packets(b.pump_in())], drops(core)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0), max_size=12))
def test_chunking_never_changes_what_the_bucket_admits(cuts: list[int]) -> None:
    whole = _limited_deliveries([])
    # 30 000 + 100 + 30 000 fit (plus 37 bytes of framing each), leaving 5 366 bytes:
    # 20 000, 16 000 and 64 KiB do not fit; 1, 5 000, 0 and 7 do.
    assert whole == (
        [b"\x00", b"\x01", b"\x02", b"\x04", b"\x06", b"", b"\x09"],
        {"rate_limited": 3},
    )
    assert _limited_deliveries(cuts) == whole


def test_key_cap_closes_the_oldest_connection_and_the_key_stays_present() -> None:
    core = make_core(max_conns_per_key=2, mesh_key=MESH)
    (b,) = login_all(core, 1)
    watcher = CoreClient(core, mesh_key=MESH)
    watcher.login()
    watcher.send_raw(f.encode_watch_conns())
    key = generate_private_key()
    conns = [CoreClient(core, private_key=key) for _ in range(3)]
    conns[0].login()
    conns[0].send_raw(f.encode_send_packet(b.key, b"hello"))  # b now watches the key
    b.pump_in()
    conns[1].login()
    watcher.pump_in()
    assert isinstance(conns[2].login()[0], ServerInfoReceived)
    assert conns[0].conn.closed
    assert conns[0].conn.close_reason == "replaced: too many connections for this node key"
    assert not conns[1].conn.closed and not conns[2].conn.closed
    stats = core.stats()
    assert (stats.closed_key_limit, stats.refused_key_limit) == (1, 0)
    # The key never left the region: nobody was told it was gone.
    assert not [e for e in b.pump_in() if isinstance(e, PeerGoneReceived)]
    assert not [e for e in watcher.pump_in() if isinstance(e, PeerGoneReceived)]
    # The newest connection gets the key's packets.
    b.send_raw(f.encode_send_packet(conns[0].key, b"to the newest"))
    assert packets(conns[2].pump_in()) == [PacketReceived(source=b.key, data=b"to the newest")]


def test_key_cap_refuse_new_keeps_the_existing_connections() -> None:
    core = make_core(max_conns_per_key=2, key_limit_policy=KeyLimitPolicy.REFUSE_NEW)
    key = generate_private_key()
    conns = [CoreClient(core, private_key=key) for _ in range(3)]
    assert isinstance(conns[0].login()[0], ServerInfoReceived)
    assert isinstance(conns[1].login()[0], ServerInfoReceived)
    assert conns[2].login() == []  # the ServerKey, then silence, as for an unauthorised key
    assert conns[2].conn.closed
    assert conns[2].conn.close_reason == "too many connections for this node key"
    assert not conns[0].conn.closed and not conns[1].conn.closed
    assert (core.stats().refused_key_limit, core.stats().closed_key_limit) == (1, 0)
    # Once one leaves, the key may connect again; other keys were never affected.
    core.connection_lost(conns[0].conn)
    assert isinstance(CoreClient(core, private_key=key).login()[0], ServerInfoReceived)
    assert len(login_all(core, 3)) == 3


def test_key_cap_spares_mesh_peers() -> None:
    core = make_core(
        max_conns_per_key=1, key_limit_policy=KeyLimitPolicy.REFUSE_NEW, mesh_key=MESH
    )
    key = generate_private_key()
    peers = [CoreClient(core, private_key=key, mesh_key=MESH) for _ in range(3)]
    for peer in peers:
        assert isinstance(peer.login()[0], ServerInfoReceived)
    assert core.stats().refused_key_limit == 0


# -- the connection state machine (every pair) ------------------------------------------

ALL_PAIRS = [(s, i) for s in ConnState for i in ConnInput]


@pytest.mark.parametrize(("state", "event"), ALL_PAIRS)
def test_state_table_every_pair(state: ConnState, event: ConnInput) -> None:
    core = make_core()
    c = CoreClient(core)
    c.conn.state = state
    expected = _TRANSITIONS.get((state, event))
    if expected is None:
        with pytest.raises(LocalProtocolError):
            core._transition(c.conn, event)
        assert c.conn.state is ConnState.CLOSED
    else:
        core._transition(c.conn, event)
        assert c.conn.state is expected


def test_closed_is_terminal() -> None:
    for (state, _event), target in _TRANSITIONS.items():
        if state is ConnState.CLOSED:
            assert target is ConnState.CLOSED


# -- chunking: the in-place hot path and the decoder must agree ---------------------


def _deliveries(cuts: list[int]) -> tuple[list[bytes], list[ClientEvent], dict[str, int], int]:
    """Feed one fixed stream from A, cut at ``cuts``; return what B and A got, drops, home count."""
    core = make_core(queue_depth=1000)
    a, b = login_all(core, 2)
    stream = b"".join(
        [
            f.encode_send_packet(b.key, b"first"),
            f.encode_ping(b"pingpong"),
            f.encode_send_packet(b"\x09" * 32, b"to nobody"),
            f.encode_send_packet(b.key, DISCO),
            f.encode_frame(0x7E, b"unknown frame type"),
            f.encode_note_preferred(True),
            f.encode_send_packet(b.key, bytes(range(256)) * 8),
            f.encode_send_packet(b.key, b""),
        ]
    )
    points = sorted({c % (len(stream) + 1) for c in cuts})
    for lo, hi in zip([0, *points], [*points, len(stream)], strict=True):
        a.send_raw(stream[lo:hi])
    assert not a.conn.closed
    got = packets(b.pump_in())
    assert all(p.source == a.key for p in got)
    return [p.data for p in got], a.pump_in(), drops(core), core.stats().home_connections


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0), max_size=12))
def test_chunking_never_changes_what_is_delivered(cuts: list[int]) -> None:
    whole = _deliveries([])
    # disco first (its own queue), then the others in order
    assert whole[0] == [DISCO, b"first", bytes(range(256)) * 8, b""]
    assert whole[1:] == ([PongReceived(data=b"pingpong")], {"unknown_dest": 1}, 1)
    assert _deliveries(cuts) == whole
