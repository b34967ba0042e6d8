"""The trio adapter end to end: a real server on 127.0.0.1, our client, raw sockets."""

from __future__ import annotations

import gc
import json
import logging
import random
import ssl
import struct
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import hyperframe.frame
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from projections import tailcfg
from protocol import (
    ServeOptions,
    fetch_server_key,
    generate_private_key,
    load_ssl_context,
    open_control_client,
    serve_control,
)
from protocol import client_conn as cc
from protocol.client import ControlClient, MapStream, ResponseStream
from protocol.errors import HandshakeError, RemoteProtocolError
from protocol.handler import Park
from protocol.noise.handshake import ClientHandshake
from protocol.noise.transport import NoiseTransport
from protocol.serve.session import NoiseSession, _ParkedStreams
from protocol.upgrade import UPGRADE_RESPONSE
from tests.support.net import read_until_eof

from .transport_harness import (
    EchoHandler,
    LogWaiter,
    RunningServer,
    http_exchange,
    make_tls_files,
    open_raw_tunnel,
    pattern,
    start_server,
    upgrade_request_with,
)


@pytest.fixture
async def server(nursery: trio.Nursery) -> RunningServer:
    return await start_server(nursery)


async def assert_still_serving(srv: RunningServer) -> None:
    """A fresh, well-behaved client gets through (the server survived)."""
    with trio.fail_after(10):
        async with open_control_client(
            "127.0.0.1", srv.port, machine_key=generate_private_key()
        ) as client:
            response = await client.request("GET", "/echo")
    assert response.status == 200


# -- /key and the hypercorn hand-off ---------------------------------------------------


async def test_key_keepalive_then_asgi_on_same_connection(server: RunningServer) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        status, headers, body, conn = await http_exchange(
            stream, b"GET /key?v=130 HTTP/1.1\r\nHost: ctl\r\n\r\n"
        )
        assert status == 200
        assert headers["content-type"] == "application/json"
        assert json.loads(body) == {
            "legacyPublicKey": "mkey:" + "0" * 64,
            "publicKey": "mkey:" + server.server_public.hex(),
        }
        status, _, body2, conn = await http_exchange(
            stream, b"GET /key?v=145 HTTP/1.1\r\nHost: ctl\r\n\r\n", conn=conn
        )
        assert (status, body2) == (200, body)
        # Not ours: replayed into hypercorn, which serves the ASGI app.
        status, headers, body, conn = await http_exchange(
            stream, b"GET /healthz HTTP/1.1\r\nHost: ctl\r\n\r\n", conn=conn
        )
        assert (status, body) == (200, b"asgi:/healthz:http:1.1")
        assert headers["server"].startswith("hypercorn")
        # Hypercorn now owns the connection; /key still works there (ASGI shim).
        status, _, body3, conn = await http_exchange(
            stream, b"GET /key?v=130 HTTP/1.1\r\nHost: ctl\r\n\r\n", conn=conn
        )
        assert (status, body3) == (200, body2)
        status, _, _, _ = await http_exchange(
            stream, b"GET /key HTTP/1.1\r\nHost: ctl\r\n\r\n", conn=conn
        )
        assert status == 400


@pytest.mark.parametrize("target", ["/key", "/key?v=x"])
async def test_key_without_valid_version(server: RunningServer, target: str) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        status, _, body, _ = await http_exchange(
            stream, f"GET {target} HTTP/1.1\r\nHost: ctl\r\n\r\n".encode()
        )
    assert status == 400
    assert b"v parameter" in body


async def test_fetch_server_key_helper(server: RunningServer) -> None:
    assert await fetch_server_key("127.0.0.1", server.port) == server.server_public


async def test_h2c_prior_knowledge_is_served_by_hypercorn(server: RunningServer) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(
        sid,
        [(":method", "GET"), (":path", "/h2c"), (":scheme", "http"), (":authority", "ctl")],
        end_stream=True,
    )
    body = b""
    async with stream:
        await stream.send_all(conn.data_to_send())
        with trio.fail_after(5):
            done = False
            while not done:
                for event in conn.receive_data(await stream.receive_some(65536)):
                    if isinstance(event, h2.events.DataReceived):
                        body += event.data
                    if isinstance(event, h2.events.StreamEnded):
                        done = True
                await stream.send_all(conn.data_to_send())
    assert body == b"asgi:/h2c:http:2"


# -- the tunnel ---------------------------------------------------------------------------


async def test_register_and_map_stream(server: RunningServer) -> None:
    machine = generate_private_key()
    with trio.fail_after(10):
        async with open_control_client("127.0.0.1", server.port, machine_key=machine) as client:
            assert client.early is not None
            assert client.early.node_key_challenge.startswith("chalpub:")
            resp = await client.register(
                tailcfg.RegisterRequest(version=130, hostinfo=tailcfg.Hostinfo(hostname="box1"))
            )
            assert resp.machine_authorized
            assert resp.login.login_name == "box1"
            request = tailcfg.MapRequest(version=130, compress="zstd", stream=True)
            async with client.map_stream(request) as stream:
                first = await stream.__anext__()
                assert first.node is not None
                assert first.node.name == "n1.example."
                second = await stream.__anext__()
                assert second.keep_alive
            assert await client.ping() >= 0
    seen = server.handler.requests
    assert [r.path for r in seen] == ["/machine/register", "/machine/map"]
    assert all(r.machine_key == client.machine_public for r in seen)


async def test_echo_of_request_details(server: RunningServer) -> None:
    async with open_control_client("127.0.0.1", server.port, machine_key=b"\x05" * 32) as client:
        response = await client.request(
            "PATCH", "/echo?q=1", headers=(("X-Test", "yes"),), body=b"12345"
        )
    data = json.loads(response.body)
    assert data["method"] == "PATCH"
    assert data["path"] == "/echo?q=1"
    assert ["x-test", "yes"] in data["headers"]
    assert data["body_len"] == 5
    assert data["version"] == 130
    assert bytes.fromhex(data["machine"]) == client.machine_public
    assert response.header("content-length") == str(len(response.body))


async def test_concurrent_streams_on_one_connection(server: RunningServer) -> None:
    results: dict[int, bytes] = {}
    async with (
        open_control_client("127.0.0.1", server.port, machine_key=b"\x06" * 32) as client,
        client.open_stream("POST", "/forever?concurrent") as long_poll,
    ):
        await long_poll.__anext__()

        async def fetch(i: int) -> None:
            response = await client.request("GET", f"/big?n={1000 * i + 1}")
            results[i] = response.body

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(fetch, i)
        await long_poll.__anext__()  # the long poll is still alive
    assert results == {i: pattern(1000 * i + 1) for i in range(8)}


async def test_large_response_respects_small_client_window(server: RunningServer) -> None:
    size = 3_000_000
    with trio.fail_after(30):
        async with open_control_client(
            "127.0.0.1", server.port, machine_key=b"\x07" * 32, initial_window_size=4096
        ) as client:
            response = await client.request("GET", f"/big?n={size}")
    assert response.body == pattern(size)


async def test_stream_frames_arrive_in_order(server: RunningServer) -> None:
    async with (
        open_control_client("127.0.0.1", server.port, machine_key=b"\x08" * 32) as client,
        client.open_stream("POST", "/stream?n=50") as response,
    ):
        seqs = [m.seq async for m in MapStream(response, compressed=True)]
    assert seqs == list(range(1, 51))


async def test_reset_closes_the_response_iterator(server: RunningServer) -> None:
    async with open_control_client("127.0.0.1", server.port, machine_key=b"\x09" * 32) as client:
        async with client.open_stream("POST", "/forever?reset") as response:
            await response.__anext__()
        # Leaving the context reset the stream: the server closes the iterator.
        with trio.fail_after(5):
            await server.handler.stream_closed.wait()
        assert server.handler.closed_streams == ["reset"]
        assert server.handler.close_reasons in (["Cancelled"], ["GeneratorExit"])
        assert (await client.request("GET", "/echo")).status == 200  # connection lives on


async def test_reset_while_blocked_on_flow_control_calls_aclose(server: RunningServer) -> None:
    async with open_control_client(
        "127.0.0.1", server.port, machine_key=b"\x19" * 32, initial_window_size=1024
    ) as client:
        async with client.open_stream("POST", "/blocked?flow") as response:
            await response.__anext__()
            await wait_all_tasks_blocked()  # the server now waits for WINDOW_UPDATE
        with trio.fail_after(5):
            await server.handler.stream_closed.wait()
    assert server.handler.closed_streams == ["flow"]
    assert server.handler.close_reasons == ["GeneratorExit"]


async def test_reset_cancels_a_pending_handler(server: RunningServer) -> None:
    async with open_control_client("127.0.0.1", server.port, machine_key=b"\x0a" * 32) as client:
        stream_id = client._conn.send_request("POST", "/slow?reset")
        await client._flush()
        await wait_all_tasks_blocked()  # the handler runs and waits
        client._conn.reset_stream(stream_id)
        await client._flush()
        with trio.fail_after(5):
            await server.handler.handler_cancelled.wait()
    assert server.handler.cancelled == ["reset"]


async def test_disconnect_closes_iterators_and_cancels_handlers(server: RunningServer) -> None:
    tunnel = await open_raw_tunnel(server.port, server.server_public, b"\x0b" * 32)
    tunnel.conn.send_request("POST", "/forever?disconnect")
    tunnel.conn.send_request("POST", "/slow?disconnect")
    await tunnel.pump_until(lambda evs: any(isinstance(e, cc.DataReceived) for e in evs))
    await tunnel.stream.aclose()  # no GOAWAY: the TCP connection just goes away
    with trio.fail_after(5):
        await server.handler.stream_closed.wait()
        await server.handler.handler_cancelled.wait()
    assert server.handler.closed_streams == ["disconnect"]
    assert server.handler.cancelled == ["disconnect"]


async def test_handler_exception_is_500_and_connection_survives(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_control_client("127.0.0.1", server.port, machine_key=b"\x0c" * 32) as client:
        response = await client.request("GET", "/boom")
        assert response.status == 500
        with pytest.raises(RemoteProtocolError, match="reset"):
            async with client.open_stream("GET", "/bad-stream") as stream:
                await stream.read_all()
        assert (await client.request("GET", "/echo")).status == 200
    assert "handler failed for GET /boom" in caplog.text
    assert "response stream of stream" in caplog.text


async def test_unknown_path_is_the_handlers_404(server: RunningServer) -> None:
    async with open_control_client("127.0.0.1", server.port, machine_key=b"\x0d" * 32) as client:
        response = await client.request("POST", "/machine/whoami")
    assert response.status == 404


async def test_request_body_cap(nursery: trio.Nursery) -> None:
    srv = await start_server(nursery, options=ServeOptions(max_body_size=100_000))
    async with open_control_client("127.0.0.1", srv.port, machine_key=b"\x0e" * 32) as client:
        response = await client.request("POST", "/echo", body=b"x" * 100_001)
        assert response.status == 413
        ok = await client.request("POST", "/echo", body=b"x" * 100_000)
        assert json.loads(ok.body)["body_len"] == 100_000


async def test_many_clients_in_parallel(server: RunningServer) -> None:
    statuses: list[int] = []

    async def one(i: int) -> None:
        async with open_control_client(
            "127.0.0.1", server.port, machine_key=bytes([i + 1]) * 32
        ) as client:
            statuses.append((await client.request("GET", "/echo")).status)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(25):
                nursery.start_soon(one, i)
    assert statuses == [200] * 25


# -- bad input: the connection closes with a logged reason, the server stays up ------------


async def _upgraded_raw(srv: RunningServer) -> tuple[trio.SocketStream, NoiseTransport, bytes]:
    """Upgrade by hand; return the socket, our Noise transport, and leftover plaintext."""
    stream = await trio.open_tcp_stream("127.0.0.1", srv.port)
    handshake = ClientHandshake(generate_private_key(), srv.server_public, 130)
    await stream.send_all(upgrade_request_with(handshake.initiation, srv.port))
    data = b""
    with trio.fail_after(5):
        while len(data) < len(UPGRADE_RESPONSE) + 51 + 3:
            data += await stream.receive_some(65536)
    assert data.startswith(UPGRADE_RESPONSE)
    rest = data[len(UPGRADE_RESPONSE) :]
    transport = NoiseTransport(handshake.finish(rest[:51]))
    return stream, transport, transport.receive_data(rest[51:])


@pytest.mark.parametrize(
    ("payload", "logged"),
    [
        (b"\x04\x00\x20" + bytes(32), "record failed authentication"),  # garbage record
        (b"\x04\x0f\xfe", "exceeds max frame size"),  # oversized frame header
        (b"\x01\x00\x10" + bytes(16), "unexpected type 1"),  # wrong message type
        (b"\x03\x00\x02hi", "unexpected type 3"),
        (b"\x04\x00\x05" + bytes(5), "shorter than a tag"),
    ],
)
async def test_bad_noise_frames(
    server: RunningServer, caplog: pytest.LogCaptureFixture, payload: bytes, logged: str
) -> None:
    caplog.set_level(logging.INFO, logger="protocol")
    stream, _, _ = await _upgraded_raw(server)
    async with stream:
        await stream.send_all(payload)
        await read_until_eof(stream)  # the server hangs up
    assert "closed: protocol error: " in caplog.text
    assert logged in caplog.text
    await assert_still_serving(server)


async def test_truncated_noise_frame_then_close(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="protocol")
    with LogWaiter("closed: peer closed the connection") as waiter:
        stream, transport, _ = await _upgraded_raw(server)
        record = transport.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        await stream.send_all(record[:10])
        await stream.aclose()
        with trio.fail_after(5):
            await waiter.seen.wait()
    await assert_still_serving(server)


async def test_broken_http2_after_preface_gets_goaway(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="protocol")
    stream, transport, _ = await _upgraded_raw(server)
    async with stream:
        # Preface, then a PING frame of the wrong length (6, must be 8).
        await stream.send_all(
            transport.send(
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                + b"\x00\x00\x06\x06\x00\x00\x00\x00\x00"
                + bytes(6)
            )
        )
        tail = transport.receive_data(await read_until_eof(stream))
    frames = []
    while tail:
        frame, length = hyperframe.frame.Frame.parse_frame_header(memoryview(tail[:9]))
        frames.append(frame)
        tail = tail[9 + length :]
    assert any(isinstance(f, hyperframe.frame.GoAwayFrame) for f in frames)
    assert "protocol error: HTTP/2 error" in caplog.text
    await assert_still_serving(server)


async def test_short_handshake_header_gets_error_message(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="protocol")
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(upgrade_request_with(bytes(100), server.port))
        data = await read_until_eof(stream)
    assert data.startswith(UPGRADE_RESPONSE)
    message = data[len(UPGRADE_RESPONSE) :]
    assert message[0] == 3
    (length,) = struct.unpack(">H", message[1:3])
    assert message[3 : 3 + length] == b"wrong handshake initiation size"
    assert "noise handshake failed: wrong handshake initiation size" in caplog.text
    await assert_still_serving(server)


async def test_wrong_server_key_fails_handshake(server: RunningServer) -> None:
    with pytest.raises(HandshakeError, match="server error"):
        async with open_control_client(
            "127.0.0.1",
            server.port,
            machine_key=generate_private_key(),
            server_public=b"\x09" * 32,
        ):
            pass
    await assert_still_serving(server)


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"Upgrade": "h2c"}, b"unknown next protocol"),
        ({"X-Tailscale-Handshake": "***"}, b"invalid tailscale handshake header"),
    ],
)
async def test_invalid_upgrade_requests_get_400(
    server: RunningServer, extra: dict[str, str], reason: bytes
) -> None:
    headers = {
        "Host": "ctl",
        "Upgrade": "tailscale-control-protocol",
        "Connection": "upgrade",
        "X-Tailscale-Handshake": "AAAA",
        "Content-Length": "0",
    } | extra
    raw = "POST /ts2021 HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(raw.encode() + b"\r\n")
        data = await read_until_eof(stream)
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert reason in data


async def test_slow_request_head_times_out(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="protocol")
    srv = await start_server(nursery, options=ServeOptions(head_timeout=0.2))
    stream = await trio.open_tcp_stream("127.0.0.1", srv.port)
    async with stream:
        await stream.send_all(b"GET /key?v=130 HTTP/1.1\r\nHo")
        assert await read_until_eof(stream) == b""
    assert "no complete request head in time" in caplog.text


async def test_min_protocol_version(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="protocol")
    srv = await start_server(nursery, options=ServeOptions(min_protocol_version=113))
    with pytest.raises(RemoteProtocolError):
        async with open_control_client(
            "127.0.0.1", srv.port, machine_key=b"\x01" * 32, version=100
        ):
            pass
    assert "refusing client with protocol version 100 < 113" in caplog.text
    async with open_control_client("127.0.0.1", srv.port, machine_key=b"\x01" * 32) as client:
        assert (await client.request("GET", "/echo")).status == 200


# -- TLS, WebSocket, lifespan --------------------------------------------------------------


async def test_tls_key_tunnel_and_asgi(nursery: trio.Nursery, tmp_path: Path) -> None:
    cert, key = make_tls_files(tmp_path)
    srv = await start_server(nursery, ssl_context=load_ssl_context(cert, key))
    client_ctx = ssl.create_default_context(cafile=str(cert))  # offers no ALPN, like Go
    with trio.fail_after(10):
        async with open_control_client(
            "127.0.0.1",
            srv.port,
            machine_key=b"\x02" * 32,
            ssl_context=client_ctx,
            server_hostname="localhost",
        ) as client:
            assert (await client.request("GET", "/echo")).status == 200
        tcp = await trio.open_tcp_stream("127.0.0.1", srv.port)
        tls = trio.SSLStream(tcp, client_ctx, server_hostname="localhost")
        async with tls:
            status, _, body, _ = await http_exchange(tls, b"GET /web HTTP/1.1\r\nHost: ctl\r\n\r\n")
    assert (status, body) == (200, b"asgi:/web:https:1.1")


async def test_tls_alpn_h2_goes_straight_to_hypercorn(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    cert, key = make_tls_files(tmp_path)
    srv = await start_server(nursery, ssl_context=load_ssl_context(cert, key))
    client_ctx = ssl.create_default_context(cafile=str(cert))
    client_ctx.set_alpn_protocols(["h2"])
    tls = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", srv.port), client_ctx, server_hostname="localhost"
    )
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [(":method", "GET"), (":path", "/alpn"), (":scheme", "https"), (":authority", "ctl")],
        end_stream=True,
    )
    body = b""
    async with tls:
        await tls.do_handshake()
        assert tls.selected_alpn_protocol() == "h2"
        await tls.send_all(conn.data_to_send())
        with trio.fail_after(5):
            done = False
            while not done:
                for event in conn.receive_data(await tls.receive_some(65536)):
                    if isinstance(event, h2.events.DataReceived):
                        body += event.data
                    done = done or isinstance(event, h2.events.StreamEnded)
                await tls.send_all(conn.data_to_send())
    assert body == b"asgi:/alpn:https:2"


async def test_websocket_variant(server: RunningServer) -> None:
    with trio.fail_after(10):
        async with open_control_client(
            "127.0.0.1", server.port, machine_key=b"\x03" * 32, websocket=True
        ) as client:
            assert client.early is None  # Go sends no early payload on this path
            resp = await client.register(tailcfg.RegisterRequest(version=130))
            assert resp.machine_authorized
            big = await client.request("GET", "/big?n=200000")
            assert big.body == pattern(200_000)


async def test_quart_trio_app_behind_the_front(nursery: trio.Nursery) -> None:
    from quart_trio import QuartTrio

    app = QuartTrio("tailledger-test")
    started: list[str] = []

    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    async def on_start() -> None:
        started.append("before_serving")

    app.add_url_rule("/healthz", view_func=healthz)
    app.before_serving(on_start)

    async def run(task_status: trio.TaskStatus[int]) -> None:
        await serve_control(
            host="127.0.0.1",
            port=0,
            server_key=b"\x21" * 32,
            handler=EchoHandler(),
            asgi_app=app,
            task_status=task_status,
        )

    port = await nursery.start(run)
    assert started == ["before_serving"]
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        status, _headers, body, conn = await http_exchange(
            stream, b"GET /healthz HTTP/1.1\r\nHost: ctl\r\n\r\n"
        )
        assert status == 200
        assert json.loads(body) == {"status": "ok"}
        status, _, _, _ = await http_exchange(
            stream, b"GET /nope HTTP/1.1\r\nHost: ctl\r\n\r\n", conn=conn
        )
        assert status == 404
    async with open_control_client("127.0.0.1", port, machine_key=b"\x22" * 32) as client:
        assert (await client.request("GET", "/echo")).status == 200


async def test_lifespan_startup_and_shutdown() -> None:
    async with trio.open_nursery() as outer:
        srv = await start_server(outer)
        assert srv.app_state.events == ["startup"]
        outer.cancel_scope.cancel()
    assert srv.app_state.events == ["startup", "shutdown"]


async def test_a_stream_whose_client_said_goaway_ends_quietly(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A long poll still producing when its client closes the connection (GOAWAY,
    then the socket, with the stream never reset) is abandoned without an error in
    the log: the client left, nothing failed."""
    caplog.set_level(logging.DEBUG, logger="protocol")
    for _ in range(5):
        tunnel = await open_raw_tunnel(server.port, server.server_public, b"\x0d" * 32)
        tunnel.conn.send_request("POST", "/forever?goaway")
        await tunnel.pump_until(lambda evs: any(isinstance(e, cc.DataReceived) for e in evs))
        tunnel.conn.close()  # GOAWAY
        await tunnel.stream.send_all(tunnel.conn.data_to_send())
        await wait_all_tasks_blocked()  # the server has the GOAWAY; the stream keeps producing
        await tunnel.stream.aclose()
    await wait_all_tasks_blocked()  # the server has seen every connection go
    assert server.handler.closed_streams.count("goaway") == 5
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    await assert_still_serving(server)


def _tasks_running(name: str) -> int:
    """How many tasks of this trio run have a root coroutine called ``name``
    (a function name or a qualified one, ``Class.method``)."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    count, todo = 0, [root]
    while todo:
        task = todo.pop()
        code = task.coro.cr_code
        count += name in (code.co_name, code.co_qualname)
        todo.extend(t for n in task.child_nurseries for t in n.child_tasks)
    return count


async def test_a_parked_long_poll_has_no_task_and_resumes_from_a_new_one(server: RunningServer) -> None:
    async with open_control_client("127.0.0.1", server.port, machine_key=b"\x0e" * 32) as client:
        async with client.open_stream("POST", "/park?p") as stream:
            assert await stream.__anext__() == b"p:0;"
            await wait_all_tasks_blocked()
            assert server.handler.parked
            assert _tasks_running("_serve_request") == 0
            for i in range(1, 4):
                server.handler.parked.pop()()
                assert await stream.__anext__() == f"p:{i};".encode()
            await wait_all_tasks_blocked()
            assert server.handler.parked
            assert _tasks_running("_serve_request") == 0
        # The client reset the parked stream: its iterator is closed, and a late
        # resume does nothing.
        with trio.fail_after(5):
            await server.handler.stream_closed.wait()
        assert server.handler.closed_streams == ["p"]
        server.handler.parked.pop()()
        await wait_all_tasks_blocked()
        assert _tasks_running("_serve_request") == 0
    await assert_still_serving(server)


async def test_parked_long_polls_are_closed_when_the_connection_goes(server: RunningServer) -> None:
    tunnel = await open_raw_tunnel(server.port, server.server_public, b"\x0f" * 32)
    tunnel.conn.send_request("POST", "/park?gone")
    await tunnel.pump_until(lambda evs: any(isinstance(e, cc.DataReceived) for e in evs))
    await wait_all_tasks_blocked()
    assert server.handler.parked
    await tunnel.stream.aclose()  # no reset, no GOAWAY: the socket just goes
    with trio.fail_after(5):
        await server.handler.stream_closed.wait()
    assert server.handler.closed_streams == ["gone"]
    server.handler.parked.pop()()  # too late: nothing happens
    await wait_all_tasks_blocked()
    assert _tasks_running("_serve_request") == 0


async def test_send_now_writes_on_a_parked_long_poll_from_the_caller(server: RunningServer) -> None:
    """A parked stream's keep-alive: the transport's ``send_now`` seals and writes it
    at once, from the calling task, and the stream stays parked (no task started, the
    iterator not resumed); once the stream is gone it sends nothing."""
    async with open_control_client("127.0.0.1", server.port, machine_key=b"\x11" * 32) as client:
        async with client.open_stream("POST", "/park?n") as stream:
            assert await stream.__anext__() == b"n:0;"
            await wait_all_tasks_blocked()
            park = server.handler.parks[-1]
            assert park.send_now is not None
            assert park.send_now(b"now;") and park.send_now(b"again;")
            assert _tasks_running("_serve_request") == 0  # none started: written right here
            got = b""
            with trio.fail_after(5):
                while len(got) < len(b"now;again;"):
                    got += await stream.__anext__()
            assert got == b"now;again;"
            server.handler.parked.pop()()  # still parked where it was: resumed, it goes on
            assert await stream.__anext__() == b"n:1;"
        with trio.fail_after(5):
            await server.handler.stream_closed.wait()
        await wait_all_tasks_blocked()
        assert not park.send_now(b"late;")  # reset by the client: nothing is sent
    await assert_still_serving(server)


async def test_a_parked_long_polls_callbacks_hold_only_the_session_and_stream(server: RunningServer) -> None:
    """Issue 19, memory: an idle long poll keeps its request's ``cancel`` and its
    park's ``resume`` and ``send_now`` for as long as it stays connected; each is a
    two-slot object holding the session and the stream id (no partial with its bound
    method and argument tuple), and each still does its job."""
    async with (
        open_control_client("127.0.0.1", server.port, machine_key=b"\x13" * 32) as client,
        client.open_stream("POST", "/park?cb") as stream,
    ):
        assert await stream.__anext__() == b"cb:0;"
        await wait_all_tasks_blocked()
        park = server.handler.parks[-1]
        request = server.handler.requests[-1]
        callbacks = (park.resume, park.send_now, request.cancel)
        for callback in callbacks:
            assert not hasattr(callback, "__dict__")
            held = [r for r in gc.get_referents(callback) if not isinstance(r, type)]
            assert sorted(type(r).__name__ for r in held) == sorted(["int", NoiseSession.__name__])
        assert len({id(callback.session) for callback in callbacks}) == 1  # type: ignore[union-attr]
        assert park.send_now is not None and park.send_now(b"now;")
        assert await stream.__anext__() == b"now;"
        server.handler.parked.pop()()
        assert await stream.__anext__() == b"cb:1;"
        await wait_all_tasks_blocked()
        assert request.cancel is not None
        request.cancel()
        with trio.fail_after(5):
            await server.handler.stream_closed.wait()
        assert server.handler.closed_streams == ["cb"]
    await assert_still_serving(server)


@asynccontextmanager
async def _parked_tunnel(
    server: RunningServer, key_byte: bytes, name: str
) -> AsyncGenerator[tuple[ControlClient, ResponseStream], None]:
    """A tunnel whose long poll (``/park?<name>``) sent its first chunk and parked."""
    async with (
        open_control_client("127.0.0.1", server.port, machine_key=key_byte * 32) as client,
        client.open_stream("POST", f"/park?{name}") as stream,
    ):
        assert await stream.__anext__() == f"{name}:0;".encode()
        yield client, stream


async def _idle_after_requests(client: ControlClient, count: int = 3) -> AsyncGenerator[None, None]:
    """Run ``count`` requests on a parked tunnel; after each, once the server has gone
    idle again, yield to the caller's checks."""
    for _ in range(count):
        assert (await client.request("GET", "/echo")).status == 200
        await wait_all_tasks_blocked()
        yield


async def test_an_idle_tunnel_keeps_no_table_of_the_tasks_it_ran(server: RunningServer) -> None:
    """Issue 19, memory: once its requests are done and its long poll parked, a
    session keeps no map of running stream tasks, not one emptied with the table it
    grew kept (an idle tunnel holds it for days); requests still run."""
    async with _parked_tunnel(server, b"\x14", "tbl") as (client, stream):
        async for _ in _idle_after_requests(client):
            session = getattr(server.handler.parks[-1].resume, "session", None)
            assert isinstance(session, NoiseSession)
            assert session._scopes is None  # no dict, emptied or new
            # Its one parked long poll is held in slots, with no dict.
            parked = session._parked
            assert len(parked) == 1 and not hasattr(parked, "__dict__")
            assert parked._more is None and parked._stream is not None
        server.handler.parked.pop()()
        assert await stream.__anext__() == b"tbl:1;"
    await assert_still_serving(server)


def test_parked_streams_act_as_a_dict_of_them() -> None:
    """The session's parked-stream record (one in slots, more in a dict) answers as a
    dict would, through any sequence of parks, resumes, resets and the final sweep."""
    rng = random.Random(19)
    iterators = [_ParkedIterator() for _ in range(6)]
    for _ in range(200):
        parked, model = _ParkedStreams(), dict[int, AsyncIterator[bytes | Park]]()
        for _ in range(rng.randrange(1, 30)):
            sid = rng.choice((1, 3, 5, 7))
            op = rng.random()
            if op < 0.5:
                it = rng.choice(iterators)
                parked[sid] = it
                model[sid] = it
            elif op < 0.9:
                assert parked.pop(sid, None) is model.pop(sid, None)
            elif model:
                sid, taken = parked.popitem()
                assert model.pop(sid) is taken
            else:
                with pytest.raises(KeyError):
                    parked.popitem()
            assert len(parked) == len(model) and bool(parked) == bool(model)
            assert [sid in parked for sid in (1, 3, 5, 7)] == [sid in model for sid in (1, 3, 5, 7)]
        if not model:
            assert parked._more is None


class _ParkedIterator:
    def __aiter__(self) -> _ParkedIterator:
        return self

    async def __anext__(self) -> bytes | Park:
        raise StopAsyncIteration


async def test_send_now_keeps_the_records_in_order_when_the_socket_is_full(server: RunningServer) -> None:
    """A client that reads nothing for a while: the socket takes part of a task-less
    write, the rest waits (the backlog) and goes out before anything written later,
    by send_now or by a task; the client decrypts every record, in order."""
    tunnel = await open_raw_tunnel(server.port, server.server_public, b"\x12" * 32, window=2**31 - 1)
    stream_id = tunnel.conn.send_request("POST", "/park?full")
    events = await tunnel.pump_until(lambda evs: any(isinstance(e, cc.DataReceived) for e in evs))
    await wait_all_tasks_blocked()
    park = server.handler.parks[-1]
    assert park.send_now is not None
    chunk, sent = pattern(15000), []
    while not _tasks_running("NoiseSession._flush_quietly"):  # a write came back partial
        assert park.send_now(chunk)
        sent.append(chunk)
        assert len(sent) < 10_000, "the socket never filled"
    for tail in (b"after-1;", b"after-2;"):
        assert park.send_now(tail)  # the flush task has not run yet: onto the backlog
        sent.append(tail)
    server.handler.parked.pop()()  # and a write from a task, after all of it
    sent.append(b"full:1;")
    received = b"".join(e.data for e in events if isinstance(e, cc.DataReceived) and e.stream_id == stream_id)
    assert received == b"full:0;"
    expected = b"".join(sent)
    with trio.fail_after(30):
        while len(received) < len(b"full:0;") + len(expected):
            await tunnel.stream.send_all(tunnel.conn.data_to_send())
            for event in tunnel.conn.receive_data(bytes(await tunnel.stream.receive_some(1 << 20))):
                if isinstance(event, cc.DataReceived) and event.stream_id == stream_id:
                    received += event.data
    assert received == b"full:0;" + expected
    await tunnel.stream.aclose()
    await assert_still_serving(server)


async def test_an_idle_tunnel_has_no_reader_task_and_reads_on_when_data_comes(server: RunningServer) -> None:
    """A node's idle state: its long poll parked, nothing else going on. Then
    the session's reader is parked in the server's shared waiter, not a task;
    the next request (or the end) wakes it. (A tunnel with no long poll parks
    too, with its idle timer: see test_serve_limits.py.)"""
    async with _parked_tunnel(server, b"\x10", "idle") as (client, _):
        async for _ in _idle_after_requests(client):
            assert not (
                _tasks_running("NoiseSession.serve")
                + _tasks_running("handle_stream")
                + _tasks_running("_serve_request")
            )
    await assert_still_serving(server)
