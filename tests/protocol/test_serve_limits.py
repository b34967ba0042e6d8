"""Connection limits of the control port (issue 14, Security 3 and 4).

Deadlines for a whole request head, for request bodies (inside the tunnel and on
hypercorn connections), an idle timeout for tunnels with nothing open, connection
caps (global and per address), and closing slow readers (outgoing buffer cap,
write and flow-control stalls). Timers run on trio's ``MockClock`` with autojump
(the ``autojump_clock`` fixture) against a real server on 127.0.0.1: loopback
delivers bytes before the sending call returns, so the clock only jumps when both
ends really wait. The core's part (408 for a stalled body, the buffered-bytes
count) is checked without I/O.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio
import trio.testing
from trio.testing import wait_all_tasks_blocked

from protocol import ConnectionStats, ServeOptions, h2flow, load_ssl_context
from protocol import client_conn as cc
from protocol.serve.accept import Admission
from protocol.serve.idle import idle_readers
from tests.support.net import read_until_eof

from .test_h2_bridge import Pair
from .test_serve import _tasks_running
from .transport_harness import (
    RawTunnel,
    RunningServer,
    http_exchange,
    make_tls_files,
    open_raw_tunnel,
    start_server,
)


async def _trickle(stream: trio.abc.SendStream, data: bytes, every: float) -> None:
    """Send ``data`` one byte every ``every`` seconds until the server is gone."""
    for byte in data:
        try:
            await stream.send_all(bytes([byte]))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        await trio.sleep(every)


async def _tunnel_events_until_closed(tunnel: RawTunnel, seconds: float) -> list[cc.ClientEvent]:
    """Read the tunnel (acknowledging nothing) until the server closes it."""
    events: list[cc.ClientEvent] = []
    async with tunnel.stream:
        await tunnel.stream.send_all(tunnel.conn.data_to_send())
        with trio.fail_after(seconds):
            while True:
                try:
                    data = bytes(await tunnel.stream.receive_some(65536))
                except trio.BrokenResourceError:
                    return events
                if not data:
                    return events
                events += tunnel.conn.receive_data(data)


# -- the whole request head ---------------------------------------------------------------


async def test_a_head_sent_one_byte_at_a_time_is_cut_at_the_head_deadline(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    srv = await start_server(nursery, options=ServeOptions(head_timeout=10))
    stream = await trio.open_tcp_stream("127.0.0.1", srv.port)
    head = b"GET /key?v=130 HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 200
    started = trio.current_time()
    async with stream, trio.open_nursery() as senders:
        # One byte every 3 s: each read comes well within any per-read timeout.
        senders.start_soon(_trickle, stream, head, 3.0)
        assert await read_until_eof(stream, 120) == b""
        senders.cancel_scope.cancel()
    assert trio.current_time() - started <= 10 + 3
    assert srv.stats.timeouts["head"] == 1


async def test_keepalive_key_connections_get_a_fresh_head_deadline_per_request(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    srv = await start_server(nursery, options=ServeOptions(head_timeout=10))
    stream = await trio.open_tcp_stream("127.0.0.1", srv.port)
    async with stream:
        conn = None
        for _ in range(3):  # 3 x 8 s: longer than one head deadline in all
            await trio.sleep(8)
            status, _, _, conn = await http_exchange(
                stream, b"GET /key?v=130 HTTP/1.1\r\nHost: x\r\n\r\n", conn=conn
            )
            assert status == 200
        assert await read_until_eof(stream, 20) == b""  # no next request: closed
    assert srv.stats.timeouts == {**srv.stats.timeouts, "head": 0, "keepalive": 1}


# -- request bodies -----------------------------------------------------------------------


async def test_a_tls_handshake_that_never_comes_is_cut_at_its_deadline(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    cert, key = make_tls_files(tmp_path)
    srv = await start_server(
        nursery, ssl_context=load_ssl_context(cert, key), options=ServeOptions(tls_handshake_timeout=10)
    )
    stream = await trio.open_tcp_stream("127.0.0.1", srv.port)
    started = trio.current_time()
    async with stream, trio.open_nursery() as senders:
        # A ClientHello's first bytes, then one byte every 3 s: the handshake never ends.
        senders.start_soon(_trickle, stream, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, 3.0)
        assert await read_until_eof(stream, 120) == b""
        senders.cancel_scope.cancel()
    assert trio.current_time() - started <= 10 + 3
    assert srv.stats.timeouts["tls_handshake"] == 1


async def test_a_stalled_body_in_the_tunnel_gets_408_and_the_tunnel_lives_on(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    srv = await start_server(nursery, options=ServeOptions(body_timeout=30))
    tunnel = await open_raw_tunnel(srv.port, srv.server_public, b"\x21" * 32)
    stalled = tunnel.conn.send_request(
        "POST", "/echo", headers=(("content-length", "100"),), body=b"abc", end_stream=False
    )
    started = trio.current_time()
    events = await tunnel.pump_until(
        lambda evs: any(isinstance(e, cc.ResponseReceived) for e in evs), limit=120
    )
    assert 30 <= trio.current_time() - started <= 31
    [response] = [e for e in events if isinstance(e, cc.ResponseReceived)]
    assert (response.stream_id, response.status) == (stalled, 408)
    assert srv.stats.timeouts["body"] == 1
    # The connection itself is fine: the next request is answered.
    ok = tunnel.conn.send_request("GET", "/echo")
    events = await tunnel.pump_until(
        lambda evs: any(isinstance(e, cc.StreamEnded) and e.stream_id == ok for e in evs)
    )
    assert [e.status for e in events if isinstance(e, cc.ResponseReceived)] == [200]
    assert srv.handler.requests[-1].path == "/echo"
    assert len(srv.handler.requests) == 1  # the stalled one never reached the handler
    await tunnel.stream.aclose()


async def test_a_body_trickled_on_a_hypercorn_connection_is_cut_at_the_body_deadline(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    srv = await start_server(nursery, options=ServeOptions(body_timeout=30))
    stream = await trio.open_tcp_stream("127.0.0.1", srv.port)
    head = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    async with stream, trio.open_nursery() as senders:
        await stream.send_all(head)  # a whole head: the front hands it to hypercorn
        started = trio.current_time()
        senders.start_soon(_trickle, stream, b"b" * 999, 2.0)  # never the 1000th byte
        answer = await read_until_eof(stream, 300)
        senders.cancel_scope.cancel()
    # The app waits for the whole body (hypercorn itself closes a connection
    # whose app answered early), so no answer comes.
    assert answer == b""
    assert trio.current_time() - started <= 30 + 2
    assert srv.stats.timeouts["http_body"] == 1


async def test_hypercorn_keepalive_requests_each_get_the_body_deadline(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The deadline covers one request, not the connection: slow but complete
    requests on one connection (each within the deadline) are all served."""
    srv = await start_server(nursery, options=ServeOptions(body_timeout=30))
    stream = await trio.open_tcp_stream("127.0.0.1", srv.port)
    async with stream:
        conn = None
        for _ in range(3):
            request = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n"
            await stream.send_all(request)
            for byte in b"body":  # 4 x 4 s
                await trio.sleep(4)
                await stream.send_all(bytes([byte]))
            status, _, body, conn = await _read_response(stream, request + b"body", conn)
            assert (status, body) == (200, b"uploaded:4")
    assert srv.stats.timeouts["http_body"] == 0


async def _read_response(
    stream: trio.abc.Stream, sent: bytes, conn: object
) -> tuple[int, dict[str, str], bytes, object]:
    """Read one response to the request ``sent`` (already written)."""
    import h11

    client = h11.Connection(h11.CLIENT) if conn is None else conn
    assert isinstance(client, h11.Connection)
    if conn is not None:
        client.start_next_cycle()
    parse = h11.Connection(h11.SERVER)
    parse.receive_data(sent)
    request = parse.next_event()
    assert isinstance(request, h11.Request)
    client.send(request)
    client.send(h11.Data(data=b"body"))
    client.send(h11.EndOfMessage())
    status, body = 0, b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, {}, body, client


# -- idle tunnels ----------------------------------------------------------------------------


async def test_a_tunnel_with_no_request_is_closed_after_the_idle_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    srv = await start_server(nursery, options=ServeOptions(tunnel_idle_timeout=120))
    started = trio.current_time()
    tunnel = await open_raw_tunnel(srv.port, srv.server_public, b"\x22" * 32)
    events = await _tunnel_events_until_closed(tunnel, 600)
    assert 120 <= trio.current_time() - started <= 121
    assert any(isinstance(e, h2flow.ConnectionTerminated) and e.error_code == 0 for e in events)
    assert srv.stats.timeouts["tunnel_idle"] == 1


async def test_a_tunnel_with_no_stream_waits_with_no_reader_task_until_its_idle_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A registered node's tunnel before its map poll opens: the idle timer runs, and
    the reader still waits in the server's shared set, not as a task (issue 19: a
    task per such tunnel cost ~2.5 KiB per node and left the heap fragmented once
    the map polls opened). The timer still closes the tunnel on time."""
    srv = await start_server(nursery, options=ServeOptions(tunnel_idle_timeout=120))
    started = trio.current_time()
    tunnel = await open_raw_tunnel(srv.port, srv.server_public, b"\x25" * 32)
    tunnel.conn.send_request("GET", "/echo")
    await tunnel.pump_until(lambda evs: any(isinstance(e, cc.StreamEnded) for e in evs))
    await wait_all_tasks_blocked()
    assert _tasks_running("NoiseSession.serve") == 0
    answered = trio.current_time()
    events = await _tunnel_events_until_closed(tunnel, 600)
    assert 120 <= trio.current_time() - answered <= 121 and answered - started < 1
    assert any(isinstance(e, h2flow.ConnectionTerminated) and e.error_code == 0 for e in events)
    assert srv.stats.timeouts["tunnel_idle"] == 1


class Reader:
    """A parked session as the shared idle set sees it: it notes each wake-up."""

    def __init__(self, name: str, woken: list[str]) -> None:
        self.name, self.woken = name, woken

    def resume_reading(self) -> None:
        self.woken.append(self.name)

    async def end(self, reason: str) -> None:
        self.woken.append(f"{self.name} ended: {reason}")


async def test_the_shared_set_resumes_a_parked_reader_at_its_deadline_once() -> None:
    """Parks with the same deadline on one socket (a reader woken by data that did not
    move its timer parks again) resume the reader once when the deadline passes; a
    park with no deadline is never resumed by time, also when an earlier park of the
    same session had one (its map poll opened since)."""
    woken: list[str] = []

    idle = idle_readers()
    assert idle is not None
    timed, untimed = trio.socket.socketpair(), trio.socket.socketpair()
    async with trio.open_nursery() as nursery:
        await nursery.start(idle.run)
        a, b = Reader("a", woken), Reader("b", woken)
        deadline = trio.current_time() + 0.05
        idle.park(timed[0].fileno(), a, deadline)
        assert idle.unpark(timed[0].fileno(), a)
        idle.park(timed[0].fileno(), a, deadline)
        idle.park(untimed[0].fileno(), b, deadline)
        assert idle.unpark(untimed[0].fileno(), b)
        idle.park(untimed[0].fileno(), b)
        await trio.sleep_until(deadline + 0.05)
        assert woken == ["a"]
        nursery.cancel_scope.cancel()
    assert woken == ["a", "b ended: server stopped"]
    for s in (*timed, *untimed):
        s.close()


async def test_idle_tunnels_leave_no_stale_timers_behind(autojump_clock: trio.testing.MockClock) -> None:
    """Issue 19, memory: each tunnel parks with its idle timer until its long poll
    opens, then parks with no timer for days. The timers of those first parks are
    swept once they outnumber the live ones (a few dozen at most), not kept while
    fewer than twice as many sessions are parked; a live timer survives the sweeps
    and still resumes its reader."""
    woken: list[str] = []

    idle = idle_readers()
    assert idle is not None
    pairs = [trio.socket.socketpair() for _ in range(81)]
    try:
        deadline = trio.current_time() + 60
        live = Reader("live", woken)
        idle.park(pairs[0][0].fileno(), live, deadline)
        for i, (sock, _) in enumerate(pairs[1:]):
            tunnel = Reader(str(i), woken)
            idle.park(sock.fileno(), tunnel, deadline)  # the idle timer: no stream yet
            assert idle.unpark(sock.fileno(), tunnel)  # its long poll opens
            idle.park(sock.fileno(), tunnel)  # parked with it, no timer
        # An untimed park is the session alone: no (session, park number) pair.
        assert all(idle._sessions[sock.fileno()] is not None for sock, _ in pairs)
        assert not any(isinstance(v, tuple) for v in idle._sessions.values())
        assert list(idle._timed) == [pairs[0][0].fileno()]
        stale = [t for t in idle._timers if not idle._is_parked(t[2], t[1])]
        assert len(stale) <= 64 < len(pairs) - 1
        assert any(fd == pairs[0][0].fileno() for _, _, fd in idle._timers)
        await trio.sleep_until(deadline)
        idle._resume_due()
        assert woken == ["live"]
        assert pairs[0][0].fileno() not in idle._sessions and idle._timed == {}
        assert sys.getsizeof(idle._timed) == sys.getsizeof({})  # no table left over
    finally:
        for pair in pairs:
            for s in pair:
                s.close()


async def test_the_idle_timer_starts_when_the_last_stream_ends_while_the_reader_is_parked(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A handler that outlives the reader's wait (the reader parks: a stream is
    open) and then ends: its end starts the idle timer from then."""
    srv = await start_server(nursery, options=ServeOptions(tunnel_idle_timeout=120))
    tunnel = await open_raw_tunnel(srv.port, srv.server_public, b"\x23" * 32)
    tunnel.conn.send_request("GET", "/sleep?500")  # longer than the idle timeout
    started = trio.current_time()
    events = await _tunnel_events_until_closed(tunnel, 1200)
    assert 500 + 120 <= trio.current_time() - started <= 500 + 121
    assert [e.status for e in events if isinstance(e, cc.ResponseReceived)] == [200]
    assert srv.stats.timeouts["tunnel_idle"] == 1


async def test_an_open_long_poll_keeps_a_quiet_tunnel_open(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A node's long poll counts as open however long it stays quiet (parked)."""
    srv = await start_server(nursery, options=ServeOptions(tunnel_idle_timeout=120))
    tunnel = await open_raw_tunnel(srv.port, srv.server_public, b"\x24" * 32)
    tunnel.conn.send_request("POST", "/park?quiet")
    await tunnel.pump_until(lambda evs: any(isinstance(e, cc.DataReceived) for e in evs))
    await trio.sleep(10 * 120)
    ok = tunnel.conn.send_request("GET", "/echo")
    events = await tunnel.pump_until(
        lambda evs: any(isinstance(e, cc.StreamEnded) and e.stream_id == ok for e in evs)
    )
    assert [e.status for e in events if isinstance(e, cc.ResponseReceived)] == [200]
    assert srv.stats.timeouts["tunnel_idle"] == 0
    await tunnel.stream.aclose()


# -- connection caps -------------------------------------------------------------------------


async def _key_connection(srv: RunningServer, local: str = "127.0.0.1") -> trio.SocketStream:
    """A connection the server has certainly admitted: it answered ``/key`` on it."""
    stream = await trio.open_tcp_stream("127.0.0.1", srv.port, local_address=local)
    status, _, _, _ = await http_exchange(stream, b"GET /key?v=130 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    return stream


async def _refused(srv: RunningServer, local: str = "127.0.0.1") -> bool:
    """Whether a new connection is closed without an answer to its request."""
    stream = await trio.open_tcp_stream("127.0.0.1", srv.port, local_address=local)
    async with stream:
        try:
            await stream.send_all(b"GET /key?v=130 HTTP/1.1\r\nHost: x\r\n\r\n")
        except trio.BrokenResourceError:
            return True
        return await read_until_eof(stream, limit=10) == b""


async def _until_open(srv: RunningServer, count: int) -> None:
    await wait_all_tasks_blocked()  # the server has seen every connect and close
    assert srv.stats.open == count


async def test_connections_over_the_global_cap_are_closed_at_once(nursery: trio.Nursery) -> None:
    srv = await start_server(nursery, options=ServeOptions(max_connections=3))
    held = [await _key_connection(srv) for _ in range(3)]
    assert await _refused(srv)
    assert srv.stats.refused["max_connections"] == 1
    await held.pop().aclose()
    await _until_open(srv, 2)
    held.append(await _key_connection(srv))  # a place came free
    for stream in held:
        await stream.aclose()
    await _until_open(srv, 0)
    assert srv.stats.accepted == 4


async def test_connections_over_the_per_address_cap_are_closed_at_once(nursery: trio.Nursery) -> None:
    srv = await start_server(
        nursery, options=ServeOptions(max_connections_per_address=2, cap_exempt=())
    )
    held = [await _key_connection(srv) for _ in range(2)]
    assert await _refused(srv)
    assert srv.stats.refused["max_connections_per_address"] == 1
    # Another address is counted on its own.
    other = await _key_connection(srv, local="127.0.0.2")
    await held.pop().aclose()
    await _until_open(srv, 2)
    held.append(await _key_connection(srv))
    for stream in [*held, other]:
        await stream.aclose()
    await _until_open(srv, 0)


async def test_tunnels_count_against_the_cap_until_they_close(nursery: trio.Nursery) -> None:
    srv = await start_server(
        nursery, options=ServeOptions(max_connections_per_address=1, cap_exempt=())
    )
    tunnel = await open_raw_tunnel(srv.port, srv.server_public, b"\x25" * 32)
    tunnel.conn.send_request("POST", "/park?held")  # parked: no task holds the tunnel
    await tunnel.pump_until(lambda evs: any(isinstance(e, cc.DataReceived) for e in evs))
    assert await _refused(srv)
    await tunnel.stream.aclose()
    await _until_open(srv, 0)
    stream = await _key_connection(srv)
    await stream.aclose()


async def test_loopback_is_exempt_from_the_per_address_cap_by_default(
    nursery: trio.Nursery,
) -> None:
    srv = await start_server(nursery, options=ServeOptions(max_connections_per_address=1))
    held = [await _key_connection(srv) for _ in range(3)]
    for stream in held:
        await stream.aclose()
    assert srv.stats.refused["max_connections_per_address"] == 0


# -- slow readers ----------------------------------------------------------------------------


async def test_a_connection_whose_outgoing_buffer_passes_the_cap_is_closed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Responses pile up behind a window the client never opens: the buffer cap
    closes the connection before the stall timer would."""
    srv = await start_server(
        nursery, options=ServeOptions(max_outgoing_buffer=256 * 1024, write_timeout=600)
    )
    tunnel = await open_raw_tunnel(srv.port, srv.server_public, b"\x26" * 32)
    for _ in range(5):  # 500 KB of answers; the client acknowledges nothing
        tunnel.conn.send_request("GET", "/big?n=100000")
    started = trio.current_time()
    await _tunnel_events_until_closed(tunnel, 300)
    assert trio.current_time() - started < 1
    assert srv.stats.slow_readers == {"buffer": 1, "write_stall": 0, "window_stall": 0}


async def test_a_client_that_opens_no_window_is_closed_after_the_write_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The reader of a full map that stops granting window: its memory is not
    held for ever (the full-map turn alone only gave the turn back)."""
    srv = await start_server(nursery, options=ServeOptions(write_timeout=30))
    tunnel = await open_raw_tunnel(srv.port, srv.server_public, b"\x27" * 32)
    tunnel.conn.send_request("GET", "/big?n=300000")
    started = trio.current_time()
    events = await _tunnel_events_until_closed(tunnel, 300)
    assert 30 <= trio.current_time() - started <= 31
    assert any(isinstance(e, cc.DataReceived) for e in events)  # the first window's worth
    assert srv.stats.slow_readers == {"buffer": 0, "write_stall": 0, "window_stall": 1}


async def test_a_client_that_does_not_read_its_socket_is_closed_after_the_write_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Window granted (huge), socket never read: the kernel buffers fill and the
    writes stall."""
    srv = await start_server(nursery, options=ServeOptions(write_timeout=30))
    tunnel = await open_raw_tunnel(srv.port, srv.server_public, b"\x28" * 32, window=2**31 - 1)
    tunnel.conn.send_request("POST", "/blocked?reader")  # 300 KB chunks for ever
    await tunnel.stream.send_all(tunnel.conn.data_to_send())
    with trio.fail_after(300):
        await srv.handler.stream_closed.wait()
    assert srv.stats.slow_readers["write_stall"] == 1
    assert srv.handler.closed_streams == ["reader"]
    await tunnel.stream.aclose()
    await _until_open(srv, 0)


async def test_a_reader_that_keeps_up_is_not_closed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A response far larger than the window, read and acknowledged as it comes."""
    srv = await start_server(
        nursery, options=ServeOptions(write_timeout=30, max_outgoing_buffer=1 << 20)
    )
    tunnel = await open_raw_tunnel(srv.port, srv.server_public, b"\x29" * 32)
    stream_id = tunnel.conn.send_request("GET", "/big?n=900000")
    received = 0
    with trio.fail_after(60):
        while True:
            await tunnel.stream.send_all(tunnel.conn.data_to_send())
            await trio.sleep(1)  # a slow but steady client
            events = tunnel.conn.receive_data(bytes(await tunnel.stream.receive_some(65536)))
            for event in events:
                if isinstance(event, cc.DataReceived):
                    received += len(event.data)
                    tunnel.conn.acknowledge(stream_id, event.flow_controlled_length)
            if any(isinstance(e, cc.StreamEnded) for e in events):
                break
    assert received == 900_000
    await tunnel.stream.aclose()
    assert srv.stats.slow_readers == {"buffer": 0, "write_stall": 0, "window_stall": 0}


# -- the core's part (no I/O) -----------------------------------------------------------------


def test_expire_request_answers_408_and_resets_the_stream() -> None:
    pair = Pair()
    stream_id = pair.client.send_request(
        "POST", "/machine/register", headers=(("content-length", "10"),), body=b"abc", end_stream=False
    )
    pair.pump()
    assert list(pair.server.partial_streams()) == [stream_id]
    assert pair.server.expire_request(stream_id)
    assert not pair.server.expire_request(stream_id)  # only once
    pair.pump()
    assert list(pair.server.partial_streams()) == []
    assert [
        (e.stream_id, e.status) for e in pair.client_events if isinstance(e, cc.ResponseReceived)
    ] == [(stream_id, 408)]
    assert pair.body(stream_id) == b"request body not received in time"


def test_buffered_outgoing_counts_queued_and_framed_bytes() -> None:
    """Frames not yet taken count too (``compat.unsent_bytes``, item 7)."""
    pair = Pair()
    stream_id = pair.client.send_request("GET", "/big")
    pair.pump()
    assert pair.server.buffered_outgoing() == 0
    assert pair.server.send_headers(stream_id, 200)
    framed = pair.server.buffered_outgoing()
    assert framed > 0  # the HEADERS frame, not taken yet
    pair.server.send_data(stream_id, b"x" * 100_000)
    # 65535 bytes fit the default window (framed), the rest waits for window.
    assert pair.server.buffered_outgoing() == framed + 100_000 + 9 * 4  # 4 DATA frame headers
    assert pair.server.data_to_send()
    assert pair.server.buffered_outgoing() == 100_000 - 65_535


@pytest.mark.parametrize("sockaddr", [("10.0.0.1", 1), ("::ffff:10.0.0.1", 1, 0, 0)])
def test_ipv4_and_mapped_ipv4_count_as_one_address(sockaddr: tuple[object, ...]) -> None:
    admission = Admission(ServeOptions(cap_exempt=()), ConnectionStats())
    assert admission.address_key(sockaddr) == "10.0.0.1"


def test_ipv6_addresses_count_per_64() -> None:
    admission = Admission(ServeOptions(), ConnectionStats())
    first = admission.address_key(("2001:db8:1:2::1", 1, 0, 0))
    assert first == admission.address_key(("2001:db8:1:2:ffff::9", 1, 0, 0)) == "2001:db8:1:2::/64"
    assert admission.address_key(("2001:db8:1:3::1", 1, 0, 0)) != first
    assert admission.address_key(("::1", 1, 0, 0)) is None  # exempt by default
    assert admission.address_key("/run/socket") is None


async def test_release_gives_the_place_back_once() -> None:
    stats = ConnectionStats()
    admission = Admission(
        ServeOptions(max_connections_per_address=1, cap_exempt=()), stats
    )
    first = admission.admit(("10.0.0.1", 1))
    assert not isinstance(first, str)
    assert admission.admit(("10.0.0.1", 2)) == "max_connections_per_address"
    first.release()
    first.release()
    assert stats.open == 0
    assert not isinstance(admission.admit(("10.0.0.1", 3)), str)
    assert stats.open == 1

