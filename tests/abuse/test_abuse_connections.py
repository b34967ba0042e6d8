"""Abuse of the control port against a real ``tailledger serve`` (issue 14, Security 3, 4).

An attacker without any key: heads trickled byte by byte, tunnels opened and left
idle, request bodies never finished, more connections than allowed, and a client
that never takes what it is sent. Each is cut by the limit configured in
``[limits]`` (small values here, set through the environment) and counted in
``/metrics``; a well-behaved client is served throughout.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h11
import pytest
import trio

from protocol import client_conn as cc
from protocol import fetch_server_key, h2flow
from tests.support.net import read_until_eof, wait_listening
from tests.support.waits import wait_until

from ..cli.server_process import RunningServer, free_port, running_server

LIMITS = {
    "TAILLEDGER_LIMITS__HEAD_TIMEOUT": "1s",
    "TAILLEDGER_LIMITS__BODY_TIMEOUT": "1s",
    "TAILLEDGER_LIMITS__TUNNEL_IDLE_TIMEOUT": "2s",
    "TAILLEDGER_LIMITS__WRITE_TIMEOUT": "1s",
    "TAILLEDGER_LIMITS__MAX_OUTGOING_BUFFER": "4000",
    "TAILLEDGER_LIMITS__MAX_CONNECTIONS": "50",
    "TAILLEDGER_LIMITS__MAX_CONNECTIONS_PER_ADDRESS": "6",
    "TAILLEDGER_LIMITS__CONNECTION_CAP_EXEMPT": "[]",  # the test connects from loopback
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data: Path = tmp_path_factory.mktemp("abuse-conn") / "data"
    metrics_port = free_port()
    env = {**LIMITS, "TAILLEDGER_METRICS_LISTEN_ADDR": f"127.0.0.1:{metrics_port}"}
    with running_server(data, extra_env=env) as srv:
        wait_listening(srv.port)
        srv.metrics_port = metrics_port  # type: ignore[attr-defined]
        yield srv


async def _exchange(stream: trio.SocketStream, path: str) -> tuple[int, bytes]:
    """One GET on ``stream``, which stays open (keep-alive)."""
    conn = h11.Connection(h11.CLIENT)
    data = conn.send(h11.Request(method="GET", target=path, headers=[("Host", "x")]))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)
    status, body = 0, b""
    with trio.fail_after(10):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, body


async def _get(port: int, path: str, *, local: str | None = None) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=local)
    async with stream:
        return await _exchange(stream, path)


async def _admitted(port: int) -> trio.SocketStream:
    """A connection the server certainly admitted: it answered ``/key`` on it."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    assert (await _exchange(stream, "/key?v=130"))[0] == 200
    return stream


#: Scrapes come from another loopback address than the abuse, so that the
#: per-address cap of 127.0.0.1 never counts them.
SCRAPER = "127.0.0.2"


async def metrics(server: RunningServer) -> dict[str, float]:
    """The server's samples (from ``metrics_listen_addr`` where it is honoured,
    else from the control port). ``scrape_connections`` says how many of the
    open connections counted are the scrape's own."""
    port: int = server.metrics_port  # type: ignore[attr-defined]
    own = 0.0
    try:
        status, body = await _get(port, "/metrics", local=SCRAPER)
    except OSError:
        status, body = await _get(server.port, "/metrics", local=SCRAPER)
        own = 1.0
    assert status == 200
    samples: dict[str, float] = {"scrape_connections": own}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def _tunnel(server: RunningServer, *, window: int | None = None) -> tuple[trio.SocketStream, cc.ClientConnection]:
    """A Noise tunnel with a fresh machine key, up to the early payload."""
    server_public = await fetch_server_key("127.0.0.1", server.port)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    conn = cc.ClientConnection(
        machine_private=bytes(range(1, 33)),
        server_public=server_public,
        host=f"127.0.0.1:{server.port}",
        initial_window_size=window,
    )
    await stream.send_all(conn.data_to_send())
    with trio.fail_after(10):
        while not conn.early:
            conn.receive_data(bytes(await stream.receive_some(65536)))
    return stream, conn


async def _read_events(stream: trio.SocketStream, conn: cc.ClientConnection, seconds: float) -> list[cc.ClientEvent]:
    events: list[cc.ClientEvent] = []
    with trio.fail_after(seconds):
        while True:
            try:
                data = bytes(await stream.receive_some(65536))
            except trio.BrokenResourceError:
                return events
            if not data:
                return events
            events += conn.receive_data(data)


async def _still_serving(server: RunningServer) -> None:
    status, body = await _get(server.port, "/key?v=130")
    assert status == 200 and b"publicKey" in body


async def _until_open(server: RunningServer, count: int) -> None:
    """Wait until the server counts ``count`` connections besides the scrape's own."""

    async def open_now() -> bool:
        samples = await metrics(server)
        return samples["tailledger_connections_open"] - samples["scrape_connections"] == count

    await wait_until(open_now, what=f"{count} open connections")


async def _refused(server: RunningServer) -> bool:
    """Whether a new connection is closed without an answer to its request."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        try:
            await stream.send_all(b"GET /key?v=130 HTTP/1.1\r\nHost: x\r\n\r\n")
        except trio.BrokenResourceError:
            return True
        return await read_until_eof(stream, 10) == b""


async def test_a_trickled_request_head_is_cut(server: RunningServer) -> None:
    before = await metrics(server)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:

        async def trickle() -> None:
            for byte in b"GET /key?v=130 HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100:
                try:
                    await stream.send_all(bytes([byte]))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                await trio.sleep(0.3)  # far within any per-read timeout

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            assert await read_until_eof(stream, 10) == b""
            nursery.cancel_scope.cancel()
    after = await metrics(server)
    key = 'tailledger_connection_timeouts_total{kind="head"}'
    assert after[key] == before[key] + 1
    await _still_serving(server)


async def test_an_idle_tunnel_is_closed(server: RunningServer) -> None:
    before = await metrics(server)
    stream, conn = await _tunnel(server)
    async with stream:
        events = await _read_events(stream, conn, 10)
    assert any(isinstance(e, h2flow.ConnectionTerminated) for e in events)
    after = await metrics(server)
    key = 'tailledger_connection_timeouts_total{kind="tunnel_idle"}'
    assert after[key] == before[key] + 1


async def test_a_stalled_request_body_in_the_tunnel_gets_408(server: RunningServer) -> None:
    before = await metrics(server)
    stream, conn = await _tunnel(server)
    async with stream:
        stream_id = conn.send_request(
            "POST", "/machine/register", headers=(("content-length", "500"),), body=b"{", end_stream=False
        )
        await stream.send_all(conn.data_to_send())
        events = await _read_events(stream, conn, 10)  # 408, then idle: closed
    assert [(e.stream_id, e.status) for e in events if isinstance(e, cc.ResponseReceived)] == [(stream_id, 408)]
    after = await metrics(server)
    key = 'tailledger_connection_timeouts_total{kind="body"}'
    assert after[key] == before[key] + 1


async def test_a_client_that_opens_no_window_is_closed(server: RunningServer) -> None:
    before = await metrics(server)
    stream, conn = await _tunnel(server, window=0)  # no DATA can reach it
    async with stream:
        conn.send_request("POST", "/machine/register", body=b"not json")  # a 400 with a body
        await stream.send_all(conn.data_to_send())
        events = await _read_events(stream, conn, 10)
    assert not any(isinstance(e, cc.DataReceived) for e in events)
    after = await metrics(server)
    key = 'tailledger_slow_readers_closed_total{reason="window_stall"}'
    assert after[key] == before[key] + 1
    await _still_serving(server)


async def test_answers_piling_up_past_the_buffer_cap_close_the_connection(server: RunningServer) -> None:
    before = await metrics(server)
    stream, conn = await _tunnel(server, window=0)
    async with stream:
        for _ in range(100):  # 100 error answers of ~50 bytes: past the 4000-byte cap
            conn.send_request("POST", "/machine/register", body=b"not json")
        await stream.send_all(conn.data_to_send())
        await _read_events(stream, conn, 10)
    after = await metrics(server)
    key = 'tailledger_slow_readers_closed_total{reason="buffer"}'
    assert after[key] == before[key] + 1
    await _still_serving(server)


async def test_connections_past_the_per_address_cap_are_refused(server: RunningServer) -> None:
    before = await metrics(server)
    held = [await _admitted(server.port) for _ in range(6)]
    try:
        assert await _refused(server)
        assert (await _get(server.port, "/key?v=130", local="127.0.0.3"))[0] == 200
    finally:
        for stream in held:
            await stream.aclose()
    await _until_open(server, 0)
    assert not await _refused(server)  # the places came free
    after = await metrics(server)
    key = 'tailledger_connections_refused_total{reason="max_connections_per_address"}'
    assert after[key] == before[key] + 1
    await _still_serving(server)


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[RunningServer]:
    """A server that takes 4 connections at once (loopback: no per-address cap)."""
    metrics_port = free_port()
    env = {
        "TAILLEDGER_LIMITS__MAX_CONNECTIONS": "4",
        "TAILLEDGER_METRICS_LISTEN_ADDR": f"127.0.0.1:{metrics_port}",
    }
    with running_server(tmp_path / "data", extra_env=env) as srv:
        wait_listening(srv.port)
        srv.metrics_port = metrics_port  # type: ignore[attr-defined]
        yield srv


async def test_connections_past_the_global_cap_are_refused(small_server: RunningServer) -> None:
    srv = small_server
    held = [await _admitted(srv.port) for _ in range(4)]
    try:
        assert await _refused(srv)
    finally:
        for stream in held:
            await stream.aclose()
    await _until_open(srv, 0)
    after = await metrics(srv)
    assert after['tailledger_connections_refused_total{reason="max_connections"}'] == 1
    await _still_serving(srv)
