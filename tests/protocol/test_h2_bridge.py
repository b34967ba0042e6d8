"""The sans-I/O server connection driven by the sans-I/O client, in memory.

Like h11's ``ConnectionPair``: bytes move between the two cores with no
sockets, so flow control, resets and error paths are deterministic.
"""

from __future__ import annotations

import contextlib

import hyperframe.frame
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import client_conn as cc
from protocol import h2_bridge as hb
from protocol import h2flow
from protocol.errors import HandshakeError, ProtocolError, RemoteProtocolError
from protocol.noise.handshake import ClientHandshake, generate_private_key, public_key
from protocol.noise.transport import NoiseTransport
from protocol.upgrade import UPGRADE_RESPONSE, FrontConnection, Upgrade

SERVER_KEY = bytes(range(64, 96))
MACHINE_KEY = bytes(range(96, 128))
CHALLENGE = bytes(range(32))


class Pair:
    """A client core and a server core joined by an in-memory wire."""

    def __init__(
        self,
        *,
        window: int | None = None,
        connection_window: int | None = None,
        max_frame_size: int | None = None,
        max_body: int = 1 << 20,
        max_buffered: int = hb.DEFAULT_MAX_BUFFERED_BODIES,
    ) -> None:
        self.client = cc.ClientConnection(
            machine_private=MACHINE_KEY,
            server_public=public_key(SERVER_KEY),
            host="ctl.example",
            authority="unused",
            initial_window_size=window,
            connection_window_size=connection_window,
            max_frame_size=max_frame_size,
        )
        front = FrontConnection(server_public=public_key(SERVER_KEY))
        front.receive_data(self.client.data_to_send())
        upgrade = front.next_event()
        assert isinstance(upgrade, Upgrade)
        self.server = hb.ServerConnection(
            server_private=SERVER_KEY,
            initiation=upgrade.initiation,
            challenge_public=CHALLENGE,
            max_body_size=max_body,
            max_buffered_bodies=max_buffered,
        )
        self.client_events: list[cc.ClientEvent] = self.client.receive_data(
            UPGRADE_RESPONSE + self.server.start()
        )
        self.server_events: list[hb.ServerEvent] = []
        self.pump()

    def pump(self) -> None:
        """Move bytes both ways until neither side has anything to send."""
        for _ in range(10_000):
            to_server = self.client.data_to_send()
            if to_server:
                self.server_events += self.server.receive_data(to_server)
            to_client = self.server.data_to_send()
            if to_client:
                self.client_events += self.client.receive_data(to_client)
            if not to_server and not to_client:
                return
        raise AssertionError("no quiescence")

    def take_server(self) -> list[hb.ServerEvent]:
        events, self.server_events = self.server_events, []
        return events

    def take_client(self) -> list[cc.ClientEvent]:
        events, self.client_events = self.client_events, []
        return events

    def body(self, stream_id: int, *, ack: bool = True) -> bytes:
        out = b""
        for ev in self.client_events:
            if isinstance(ev, cc.DataReceived) and ev.stream_id == stream_id:
                out += ev.data
                if ack:
                    self.client.acknowledge(stream_id, ev.flow_controlled_length)
        return out


def requests(events: list[hb.ServerEvent]) -> list[hb.RequestReceived]:
    return [e for e in events if isinstance(e, hb.RequestReceived)]


def test_handshake_and_early_payload() -> None:
    pair = Pair()
    kinds = [type(e) for e in pair.take_client()]
    assert kinds[:2] == [cc.HandshakeComplete, cc.EarlyPayloadReceived]
    assert pair.client.early is not None
    assert pair.client.early.node_key_challenge == "chalpub:" + CHALLENGE.hex()
    assert pair.server.machine_key == public_key(MACHINE_KEY)
    assert pair.server.protocol_version == 130
    assert pair.client.state is cc.ClientState.OPEN


def test_first_server_bytes_order() -> None:
    """51-byte raw response, then records: early payload, then SETTINGS."""
    client = ClientHandshake(MACHINE_KEY, public_key(SERVER_KEY), 130)
    server = hb.ServerConnection(
        server_private=SERVER_KEY, initiation=client.initiation, challenge_public=CHALLENGE
    )
    first = server.start()
    keys = client.finish(first[:51])
    plaintext = NoiseTransport(keys).receive_data(first[51:])
    assert plaintext.startswith(b"\xff\xff\xffTS")
    rest = plaintext[9 + int.from_bytes(plaintext[5:9], "big") :]
    frame, _ = hyperframe.frame.Frame.parse_frame_header(memoryview(rest[:9]))
    assert isinstance(frame, hyperframe.frame.SettingsFrame)


def test_request_and_response() -> None:
    pair = Pair()
    sid = pair.client.send_request(
        "POST",
        "/machine/register?x=1",
        headers=(("Content-Type", "application/json"), ("Ts-Lb", "nodekey:ab")),
        body=b'{"Version":130}',
    )
    pair.pump()
    [req] = requests(pair.take_server())
    assert req.stream_id == sid
    r = req.request
    assert (r.method, r.path, r.body) == ("POST", "/machine/register?x=1", b'{"Version":130}')
    assert r.machine_key == public_key(MACHINE_KEY)
    assert r.protocol_version == 130
    assert r.header("content-type") == "application/json"
    assert r.header("TS-LB") == "nodekey:ab"
    assert all(not name.startswith(":") for name, _ in r.headers)
    pair.take_client()
    assert pair.server.send_headers(sid, 200, (("Content-Type", "application/json"),))
    pair.server.send_data(sid, b"{}", end_stream=True)
    pair.pump()
    events = pair.take_client()
    assert cc.ResponseReceived(sid, 200, (("content-type", "application/json"),)) in events
    assert [e.data for e in events if isinstance(e, cc.DataReceived)] == [b"{}"]
    assert cc.StreamEnded(sid) in events


def test_concurrent_streams_answered_out_of_order() -> None:
    pair = Pair()
    sids = [pair.client.send_request("GET", f"/r/{i}") for i in range(5)]
    pair.pump()
    got = requests(pair.take_server())
    assert [r.stream_id for r in got] == sids
    for sid in reversed(sids):
        pair.server.send_headers(sid, 200)
        pair.server.send_data(sid, b"stream %d" % sid, end_stream=True)
    pair.pump()
    for sid in sids:
        assert pair.body(sid) == b"stream %d" % sid


def test_flow_control_large_response() -> None:
    window = 1000
    pair = Pair(window=window)
    sid = pair.client.send_request("POST", "/machine/map", body=b"{}")
    pair.pump()
    pair.take_server()
    body = bytes(range(256)) * 800  # 204800 bytes
    pair.server.send_headers(sid, 200)
    pair.server.send_data(sid, body, end_stream=True)
    pair.pump()
    # Without acknowledgements the server may only send one window.
    first = pair.body(sid, ack=False)
    assert len(first) == window
    assert pair.server.pending(sid) == len(body) - window
    received = b""
    for _ in range(1000):
        received += pair.body(sid, ack=True)
        pair.take_client()
        pair.pump()
        if pair.server.pending(sid) == 0 and not pair.client_events:
            break
    received += pair.body(sid)
    assert received == body
    assert pair.server.pending(sid) == 0
    assert any(isinstance(e, h2flow.WindowUpdated) for e in pair.take_server())


@pytest.mark.parametrize("connection_window", [None, 1 << 30])
def test_go_sized_windows_let_a_large_body_through_unacknowledged(
    connection_window: int | None,
) -> None:
    # Go's transport: 4 MiB stream windows, and a connection window grown to 1 GiB
    # with the preface (a connection window starts at 65535 whatever SETTINGS say).
    pair = Pair(window=4 << 20, connection_window=connection_window)
    sid = pair.client.send_request("POST", "/machine/map", body=b"{}")
    pair.pump()
    pair.take_server()
    body = bytes(range(256)) * 4000  # 1,024,000 bytes
    pair.server.send_headers(sid, 200)
    pair.server.send_data(sid, body, end_stream=True)
    pair.pump()
    received = pair.body(sid, ack=False)
    if connection_window is None:
        assert len(received) == 65535  # stuck on the connection window
        assert pair.server.pending(sid) == len(body) - 65535
    else:
        assert received == body
        assert pair.server.pending(sid) == 0


@pytest.mark.parametrize(("max_frame_size", "largest"), [(None, 16384), (1 << 20, 768_000)])
def test_max_frame_size_sets_how_a_large_body_is_cut(max_frame_size: int | None, largest: int) -> None:
    # Go's transport advertises SETTINGS_MAX_FRAME_SIZE = its MaxReadFrameSize (1 MiB)
    # with the preface: the server then sends a large body in few DATA frames, and the
    # client accepts them (h2 takes initial settings as in force, so its inbound
    # limit must follow them). Without it, frames stay at the protocol's 16 KiB.
    pair = Pair(window=4 << 20, connection_window=1 << 30, max_frame_size=max_frame_size)
    sid = pair.client.send_request("POST", "/machine/map", body=b"{}")
    pair.pump()
    pair.take_server()
    body = bytes(range(256)) * 3000  # 768,000 bytes
    pair.server.send_headers(sid, 200)
    pair.server.send_data(sid, body, end_stream=True)
    pair.pump()
    chunks = [ev for ev in pair.client_events if isinstance(ev, cc.DataReceived)]
    assert b"".join(ev.data for ev in chunks) == body
    assert max(len(ev.data) for ev in chunks) == largest


def test_client_reset_reaches_server_and_drops_queued_data() -> None:
    pair = Pair(window=100)
    sid = pair.client.send_request("POST", "/machine/map", body=b"{}")
    pair.pump()
    pair.take_server()
    pair.server.send_headers(sid, 200)
    pair.server.send_data(sid, b"x" * 10_000)
    pair.pump()
    assert pair.server.pending(sid) > 0
    pair.client.reset_stream(sid)
    pair.pump()
    events = pair.take_server()
    assert h2flow.StreamReset(stream_id=sid, error_code=8) in events  # CANCEL
    assert pair.server.pending(sid) == 0
    assert pair.server.send_headers(sid, 200) is False  # stream is gone


def test_body_cap_by_content_length() -> None:
    pair = Pair(max_body=100)
    sid = pair.client.send_request("POST", "/machine/register", body=b"y" * 101)
    pair.pump()
    events = pair.take_server()
    assert hb.RequestRejected(stream_id=sid, status=413, reason="request body too large") in events
    assert not requests(events)
    assert (
        cc.ResponseReceived(
            sid, 413, (("content-type", "text/plain; charset=utf-8"), ("content-length", "22"))
        )
        in pair.client_events
    )


def test_large_body_within_cap_arrives_whole() -> None:
    pair = Pair()
    body = bytes(range(251)) * 4000  # ~1 MB in many DATA frames and records
    sid = pair.client.send_request("POST", "/machine/map", body=body)
    pair.pump()
    [req] = requests(pair.take_server())
    assert req.stream_id == sid
    assert req.request.body == body


def test_body_cap_while_streaming_body() -> None:
    pair = Pair(max_body=1000)
    sid = pair.client.send_request("POST", "/machine/register", body=b"", end_stream=False)
    pair.client.send_body(sid, b"z" * 600)
    pair.pump()
    pair.client.send_body(sid, b"z" * 600, end_stream=True)
    pair.pump()
    events = pair.take_server()
    assert [e.status for e in events if isinstance(e, hb.RequestRejected)] == [413]
    assert not requests(events)
    # The connection is still fine for the next request.
    sid2 = pair.client.send_request("GET", "/ok")
    pair.pump()
    assert [r.stream_id for r in requests(pair.take_server())] == [sid2]


def test_buffered_incomplete_bodies_are_capped_per_connection() -> None:
    pair = Pair(max_buffered=5000)
    sids = [
        pair.client.send_request("POST", f"/upload/{i}", body=b"", end_stream=False)
        for i in range(4)
    ]
    for sid in sids:
        pair.client.send_body(sid, b"u" * 2000)  # never finished
    pair.pump()
    rejected = [e for e in pair.take_server() if isinstance(e, hb.RequestRejected)]
    assert [(e.stream_id, e.status) for e in rejected] == [(sids[2], 503), (sids[3], 503)]
    # Finishing the admitted uploads releases the budget.
    for sid in sids[:2]:
        pair.client.send_body(sid, b"", end_stream=True)
    pair.pump()
    assert [r.request.path for r in requests(pair.take_server())] == ["/upload/0", "/upload/1"]
    # The budget is free again: a new 4000-byte upload is admitted whole.
    sid = pair.client.send_request("POST", "/upload/again", body=b"v" * 4000)
    pair.pump()
    assert [r.stream_id for r in requests(pair.take_server())] == [sid]


def test_ping_is_answered() -> None:
    pair = Pair()
    pair.take_client()
    pair.client.ping(b"12345678")
    pair.pump()
    assert cc.PingAcknowledged(b"12345678") in pair.take_client()


def test_forbidden_response_headers_are_dropped() -> None:
    pair = Pair()
    sid = pair.client.send_request("GET", "/")
    pair.pump()
    pair.take_client()
    pair.server.send_headers(
        sid,
        204,
        (
            ("Connection", "close"),
            ("Transfer-Encoding", "chunked"),
            ("X-Ok", "1"),
            ("Bad Name", "x"),
        ),
        end_stream=True,
    )
    pair.pump()
    assert cc.ResponseReceived(sid, 204, (("x-ok", "1"),)) in pair.take_client()


def test_goaway_from_client() -> None:
    pair = Pair()
    pair.client.close()
    pair.pump()
    ends = [e for e in pair.take_server() if isinstance(e, h2flow.ConnectionTerminated)]
    assert ends == [h2flow.ConnectionTerminated(error_code=0, last_stream_id=0, reason="")]



def test_both_ends_report_goaway_and_reset_with_the_shared_events() -> None:
    """Client and server translate GOAWAY and RST_STREAM into the same classes
    (protocol.h2flow), with every field the other end's frame carried."""
    pair = Pair(window=100)
    sid = pair.client.send_request("POST", "/machine/map", body=b"{}")
    pair.pump()
    pair.take_client()
    pair.server.send_headers(sid, 200)
    pair.server.send_data(sid, b"x" * 1_000)
    pair.pump()
    pair.server.reset_stream(sid)  # CANCEL
    pair.pump()
    assert h2flow.StreamReset(stream_id=sid, error_code=8) in pair.take_client()
    pair.server.close(error_code=2, reason="going away")  # INTERNAL_ERROR
    pair.pump()
    goaway = h2flow.ConnectionTerminated(error_code=2, last_stream_id=sid, reason="going away")
    assert goaway in pair.take_client()

def _raw_session() -> tuple[hb.ServerConnection, NoiseTransport]:
    """A server core plus a bare Noise client transport (to send anything)."""
    client = ClientHandshake(generate_private_key(), public_key(SERVER_KEY), 130)
    server = hb.ServerConnection(
        server_private=SERVER_KEY, initiation=client.initiation, challenge_public=None
    )
    first = server.start()
    transport = NoiseTransport(client.finish(first[:51]))
    transport.receive_data(first[51:])
    return server, transport


def test_garbage_after_preface_sends_goaway_and_fails() -> None:
    server, transport = _raw_session()
    wire = transport.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64)
    with pytest.raises(RemoteProtocolError, match="exceeds SETTINGS_MAX_FRAME_SIZE"):
        server.receive_data(wire)  # \xff\xff\xff = a 16 MiB frame: refused from its header
    assert server.state is hb.ServerState.ERROR
    goaway = transport.receive_data(server.data_to_send())
    frames = []
    while goaway:
        frame, length = hyperframe.frame.Frame.parse_frame_header(memoryview(goaway[:9]))
        frames.append(frame)
        goaway = goaway[9 + length :]
    assert any(isinstance(f, hyperframe.frame.GoAwayFrame) for f in frames)
    with pytest.raises(RemoteProtocolError, match="failed earlier"):
        server.receive_data(b"")


def test_garbage_frames_after_preface() -> None:
    server, transport = _raw_session()
    # A 4-byte frame of unknown type 0xee on stream 0, then a HEADERS frame on stream 0.
    wire = transport.send(
        _PREFACE
        + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        + b"\x00\x00\x04\x01\x04\x00\x00\x00\x00abcd"
    )
    with pytest.raises(RemoteProtocolError, match="HTTP/2 error"):
        server.receive_data(wire)


def test_oversized_frame_split_across_records() -> None:
    server, transport = _raw_session()
    server.receive_data(transport.send(_PREFACE + b"\x00\x40"))
    with pytest.raises(RemoteProtocolError, match="16385 bytes"):
        server.receive_data(transport.send(b"\x01\x00"))


def test_bad_preface() -> None:
    server, transport = _raw_session()
    with pytest.raises(RemoteProtocolError):
        server.receive_data(transport.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))


def test_bad_initiation_raises_before_anything_is_sent() -> None:
    with pytest.raises(HandshakeError):
        hb.ServerConnection(server_private=SERVER_KEY, initiation=b"short", challenge_public=None)


def test_use_before_start_is_local_error() -> None:
    client = ClientHandshake(MACHINE_KEY, public_key(SERVER_KEY), 130)
    server = hb.ServerConnection(
        server_private=SERVER_KEY, initiation=client.initiation, challenge_public=None
    )
    with pytest.raises(ProtocolError):
        server.receive_data(b"x")


_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@settings(max_examples=300)
@given(st.binary(max_size=4000))
def test_random_wire_bytes_raise_only_protocol_errors(data: bytes) -> None:
    server, _ = _raw_session()
    with contextlib.suppress(ProtocolError):
        server.receive_data(data)
    server.data_to_send()


@settings(max_examples=300)
@given(st.booleans(), st.lists(st.binary(max_size=600), max_size=6))
def test_random_http2_bytes_raise_only_protocol_errors(preface: bool, chunks: list[bytes]) -> None:
    server, transport = _raw_session()
    try:
        if preface:
            server.receive_data(transport.send(_PREFACE))
        for chunk in chunks:
            server.receive_data(transport.send(chunk))
            server.data_to_send()
    except ProtocolError:
        server.data_to_send()  # flushing after a failure must not raise either


@settings(max_examples=200)
@given(st.binary(min_size=1, max_size=2000), st.integers(0, 2000))
def test_truncated_and_mutated_valid_traffic(noise: bytes, cut: int) -> None:
    """A real request stream, truncated and with bytes flipped, sealed properly."""
    pair = Pair()
    pair.client.send_request("POST", "/machine/map", body=b'{"Stream":true}')
    valid = pair.client._h2.data_to_send()  # plaintext HTTP/2 of the request
    mutated = bytearray(valid[:cut] + noise)
    server = pair.server
    with contextlib.suppress(ProtocolError):
        server.receive_data(pair.client._noise.send(bytes(mutated)))  # type: ignore[union-attr]
