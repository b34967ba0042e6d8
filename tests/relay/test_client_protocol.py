"""The sans-I/O DERP client protocol: login paths, events, sticky errors."""

from __future__ import annotations

import pytest

from relay.auth import AllowAll
from relay.derp import frames as f
from relay.derp.client import (
    _TRANSITIONS,
    ClientInput,
    ClientProtocol,
    ClientState,
    HealthReceived,
    PacketReceived,
    PeerGoneReceived,
    PingReceived,
    RestartingReceived,
    ServerInfoReceived,
)
from relay.derp.server import RelayCore
from relay.errors import LocalProtocolError, RemoteProtocolError
from relay.keys import generate_private_key, public_key_of, seal_to


def test_learns_the_server_key_then_sends_client_info() -> None:
    core = RelayCore(generate_private_key(), AllowAll())
    conn = core.accept()
    proto = ClientProtocol(generate_private_key())
    assert proto.data_to_send() == b""
    assert proto.receive_data(core.take_outgoing(conn)[0]) == []
    assert proto.server_public == core.public_key
    core.receive_data(conn, proto.data_to_send())
    events = proto.receive_data(core.take_outgoing(conn)[0])
    assert events == [ServerInfoReceived(info=f.ServerInfo(version=2))]
    assert proto.state is ClientState.ACTIVE


def test_fast_start_queues_client_info_immediately_and_checks_the_key() -> None:
    core = RelayCore(generate_private_key(), AllowAll())
    proto = ClientProtocol(generate_private_key(), server_public=core.public_key)
    assert proto.state is ClientState.AWAIT_SERVER_INFO
    first = proto.data_to_send()
    assert first[0] == f.FrameType.CLIENT_INFO
    conn = core.accept()
    core.receive_data(conn, first)
    events = proto.receive_data(core.take_outgoing(conn)[0])  # ServerKey + ServerInfo together
    assert events == [ServerInfoReceived(info=f.ServerInfo(version=2))]


def test_server_key_mismatch_is_fatal() -> None:
    proto = ClientProtocol(generate_private_key(), server_public=b"\x01" * 32)
    proto.data_to_send()
    with pytest.raises(RemoteProtocolError):
        proto.receive_data(f.encode_server_key(b"\x02" * 32))
    assert proto.state is ClientState.CLOSED
    with pytest.raises(LocalProtocolError):
        proto.receive_data(b"")


def test_first_frame_must_be_server_key() -> None:
    proto = ClientProtocol(generate_private_key())
    with pytest.raises(RemoteProtocolError):
        proto.receive_data(f.encode_keep_alive())


def test_events_and_automatic_pong() -> None:
    server_priv = generate_private_key()
    client_priv = generate_private_key()
    proto = ClientProtocol(client_priv, server_public=public_key_of(server_priv))
    proto.data_to_send()
    sealed = seal_to(
        server_priv, public_key_of(client_priv), b'{"version":2,"TokenBucketBytesPerSecond":5}'
    )
    stream = (
        f.encode_server_key(public_key_of(server_priv))
        + f.encode_server_info(sealed)
        + f.encode_recv_packet(b"\x03" * 32, b"data")
        + f.encode_frame(f.FrameType.RECV_PACKET, b"short")  # tolerated and skipped
        + f.encode_peer_gone(b"\x04" * 32, f.PeerGoneReason.NOT_HERE)
        + f.encode_ping(b"pingpong")
        + f.encode_health("duplicate key")
        + f.encode_restarting(10, 20)
        + f.encode_frame(0x7F, b"future frame")
    )
    events = proto.receive_data(stream)
    assert events == [
        ServerInfoReceived(info=f.ServerInfo(version=2, token_bucket_bytes_per_second=5)),
        PacketReceived(source=b"\x03" * 32, data=b"data"),
        PeerGoneReceived(peer=b"\x04" * 32, reason=1),
        PingReceived(data=b"pingpong"),
        HealthReceived(problem="duplicate key"),
        RestartingReceived(reconnect_in_ms=10, try_for_ms=20),
    ]
    assert proto.data_to_send() == f.encode_pong(b"pingpong")


def test_server_info_that_does_not_open_is_fatal() -> None:
    server_pub = public_key_of(generate_private_key())
    proto = ClientProtocol(generate_private_key(), server_public=server_pub)
    with pytest.raises(RemoteProtocolError):
        proto.receive_data(f.encode_server_info(b"\x00" * 60))


@pytest.mark.parametrize(("state", "event"), [(s, i) for s in ClientState for i in ClientInput])
def test_client_state_table_every_pair(state: ClientState, event: ClientInput) -> None:
    proto = ClientProtocol(generate_private_key())
    proto.state = state
    target = _TRANSITIONS.get((state, event))
    if target is None:
        with pytest.raises(RemoteProtocolError):
            proto._transition(event)
        assert proto.state is ClientState.CLOSED
    else:
        proto._transition(event)
        assert proto.state is target
