"""A real control-port server with a trivial handler, plus raw-socket helpers.

Used by ``test_serve.py``: the server runs :func:`protocol.serve_control` on
127.0.0.1 port 0 with :class:`EchoHandler` (a stand-in for the control logic)
and :func:`asgi_app` (a stand-in for the Quart web app).
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trio
import trio.lowlevel

from projections import tailcfg
from protocol import (
    ConnectionStats,
    NoiseRequest,
    NoiseResponse,
    Park,
    ServeOptions,
    frame_map_response,
    keepalive_frame,
    serve_control,
)
from protocol import client_conn as cc
from protocol.noise import public_key
from protocol.upgrade import build_upgrade_request
from relay.certs import generate_self_signed


@dataclass
class EchoHandler:
    """Answers tunnel requests by path; records what happened for assertions."""

    requests: list[NoiseRequest] = field(default_factory=list)
    closed_streams: list[str] = field(default_factory=list)
    close_reasons: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    stream_closed: trio.Event = field(default_factory=trio.Event)
    handler_cancelled: trio.Event = field(default_factory=trio.Event)
    #: resume callables of streams parked by /park (see protocol.Park)
    parked: list[Callable[[], None]] = field(default_factory=list)
    #: the parks themselves (their ``send_now``)
    parks: list[Park] = field(default_factory=list)

    async def __call__(self, request: NoiseRequest) -> NoiseResponse:
        self.requests.append(request)
        path, _, query = request.path.partition("?")
        if path == "/echo":
            body = json.dumps(
                {
                    "method": request.method,
                    "path": request.path,
                    "headers": [list(h) for h in request.headers],
                    "body_len": len(request.body),
                    "machine": request.machine_key.hex(),
                    "version": request.protocol_version,
                }
            ).encode()
            return NoiseResponse(200, (("content-type", "application/json"),), body)
        if path == "/big":
            size = int(query.removeprefix("n="))
            return NoiseResponse(200, body=pattern(size))
        if path == "/stream":
            return NoiseResponse(200, stream=self._frames(int(query.removeprefix("n="))))
        if path == "/forever":
            return NoiseResponse(200, stream=self._forever(query))
        if path == "/blocked":
            return NoiseResponse(200, stream=self._blocked(query))
        if path == "/park":
            return NoiseResponse(200, stream=self._parking(query))
        if path == "/slow":
            try:
                await trio.sleep_forever()
            finally:
                self.cancelled.append(query)
                self.handler_cancelled.set()
        if path == "/sleep":
            await trio.sleep(float(query))
            return NoiseResponse(200, body=b"slept")
        if path == "/boom":
            raise RuntimeError("handler bug (expected by the test)")
        if path == "/bad-stream":
            return NoiseResponse(200, stream=self._failing())
        if path == "/machine/register":
            req = tailcfg.decode_register_request(request.body)
            hostname = req.hostinfo.hostname if req.hostinfo else ""
            resp = tailcfg.RegisterResponse(
                login=tailcfg.Login(id=1, login_name=hostname), machine_authorized=True
            )
            return NoiseResponse(200, (("content-type", "application/json"),), tailcfg.encode(resp))
        if path == "/machine/map":
            req_map = tailcfg.decode_map_request(request.body)
            return NoiseResponse(200, stream=self._map(req_map.compress == "zstd"))
        return NoiseResponse(404, body=b"not found\n")

    async def _frames(self, count: int) -> AsyncIterator[bytes]:
        for i in range(count):
            yield frame_map_response(tailcfg.encode(tailcfg.MapResponse(seq=i + 1)), compress=True)
            await trio.lowlevel.checkpoint()

    async def _forever(self, tag: str) -> AsyncIterator[bytes]:
        try:
            while True:
                yield keepalive_frame(True)
                await trio.sleep(0.01)
        except BaseException as exc:
            # Cancelled if the reset hit us inside ``await``; GeneratorExit if
            # we were parked at ``yield`` and the server called aclose().
            self.close_reasons.append(type(exc).__name__)
            raise
        finally:
            # Awaiting cleanup must shield itself: the task may be cancelled.
            with trio.CancelScope(shield=True):
                await trio.lowlevel.checkpoint()
            self.closed_streams.append(tag)
            self.stream_closed.set()

    async def _blocked(self, tag: str) -> AsyncIterator[bytes]:
        """Yields more than any client window: parks at ``yield`` on flow control."""
        try:
            while True:
                yield pattern(300_000)
        except BaseException as exc:
            self.close_reasons.append(type(exc).__name__)
            raise
        finally:
            self.closed_streams.append(tag)
            self.stream_closed.set()

    async def _parking(self, tag: str) -> AsyncIterator[bytes | Park]:
        """Parks after every chunk; each resume makes it send the next one."""
        def owner(park: Park, resume: Callable[[], None]) -> None:
            self.parked.append(resume)
            self.parks.append(park)

        try:
            for i in range(1_000_000):
                yield f"{tag}:{i};".encode()
                yield Park(owner)
        finally:
            self.closed_streams.append(tag)
            self.stream_closed.set()

    async def _failing(self) -> AsyncIterator[bytes]:
        yield b"partial"
        raise RuntimeError("stream bug (expected by the test)")

    async def _map(self, compress: bool) -> AsyncIterator[bytes]:
        node = tailcfg.Node(id=1, name="n1.example.", machine_authorized=True)
        yield frame_map_response(tailcfg.encode(tailcfg.MapResponse(node=node)), compress)
        while True:
            yield keepalive_frame(compress)
            await trio.sleep(0.05)


def pattern(size: int) -> bytes:
    """Deterministic, non-repeating-at-record-size test body."""
    block = bytes(range(251))
    return (block * (size // len(block) + 1))[:size]


@dataclass
class AppState:
    events: list[str] = field(default_factory=list)


def make_asgi_app(state: AppState) -> Any:
    """A minimal ASGI 3 app: lifespan plus an echo of the path and scheme."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    state.events.append("startup")
                    await send({"type": "lifespan.startup.complete"})
                else:
                    state.events.append("shutdown")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = f"asgi:{scope['path']}:{scope['scheme']}:{scope['http_version']}".encode()
        if scope["path"] == "/upload":  # reads the whole request body before answering
            size, more = 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return  # http.disconnect
                size += len(message.get("body", b""))
                more = message.get("more_body", False)
            body = f"uploaded:{size}".encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/plain"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


@dataclass
class RunningServer:
    port: int
    server_key: bytes
    handler: EchoHandler
    app_state: AppState
    stats: ConnectionStats = field(default_factory=ConnectionStats)

    @property
    def server_public(self) -> bytes:
        return public_key(self.server_key)


async def start_server(
    nursery: trio.Nursery,
    *,
    ssl_context: ssl.SSLContext | None = None,
    options: ServeOptions | None = None,
) -> RunningServer:
    server_key = bytes(range(7, 39))
    handler = EchoHandler()
    app_state = AppState()
    stats = ConnectionStats()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        await serve_control(
            host="127.0.0.1",
            port=0,
            server_key=server_key,
            handler=handler,
            asgi_app=make_asgi_app(app_state),
            ssl_context=ssl_context,
            options=options,
            stats=stats,
            task_status=task_status,
        )

    port = await nursery.start(run)
    return RunningServer(port, server_key, handler, app_state, stats)


class LogWaiter(logging.Handler):
    """Sets a trio.Event when a log record containing ``needle`` is emitted."""

    def __init__(self, needle: str, logger: str = "protocol") -> None:
        super().__init__(logging.DEBUG)
        self.needle = needle
        self.seen = trio.Event()
        self._logger = logging.getLogger(logger)

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.seen.set()

    def __enter__(self) -> LogWaiter:
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)


# -- raw HTTP/1.1 over a socket ------------------------------------------------------


async def http_exchange(
    stream: trio.abc.Stream, request: bytes, *, conn: h11.Connection | None = None
) -> tuple[int, dict[str, str], bytes, h11.Connection]:
    """Send raw request bytes and read one response with h11 (keep-alive aware)."""
    if conn is None:
        conn = h11.Connection(h11.CLIENT)
    else:
        conn.start_next_cycle()
    # Let h11 know what we sent so it can frame the response.
    req_conn = h11.Connection(h11.SERVER)
    req_conn.receive_data(request)
    event = req_conn.next_event()
    assert isinstance(event, h11.Request)
    conn.send(event)
    conn.send(h11.EndOfMessage())
    await stream.send_all(request)
    status, headers, body = 0, {}, b""
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
            continue
        if isinstance(ev, h11.Response):
            status = ev.status_code
            headers = {k.decode().lower(): v.decode() for k, v in ev.headers}
        elif isinstance(ev, h11.Data):
            body += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            return status, headers, body, conn


@dataclass
class RawTunnel:
    """A sans-I/O client core on a plain socket, for byte-level misbehaviour."""

    stream: trio.SocketStream
    conn: cc.ClientConnection

    async def pump_until(self, predicate: Any, limit: float = 5) -> list[cc.ClientEvent]:
        events: list[cc.ClientEvent] = []
        with trio.fail_after(limit):
            while not predicate(events):
                await self.stream.send_all(self.conn.data_to_send())
                data = bytes(await self.stream.receive_some(65536))
                events += self.conn.receive_data(data)
            await self.stream.send_all(self.conn.data_to_send())
        return events


async def open_raw_tunnel(
    port: int, server_public: bytes, machine: bytes, *, window: int | None = None
) -> RawTunnel:
    """A tunnel up to the early payload; ``window``: our stream and connection
    receive windows (default: HTTP/2's 65535)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = cc.ClientConnection(
        machine_private=machine,
        server_public=server_public,
        host=f"127.0.0.1:{port}",
        initial_window_size=window,
        connection_window_size=window,
    )
    tunnel = RawTunnel(stream, conn)
    await tunnel.pump_until(lambda evs: any(isinstance(e, cc.EarlyPayloadReceived) for e in evs))
    return tunnel


def upgrade_request_with(initiation: bytes, port: int) -> bytes:
    return build_upgrade_request(f"127.0.0.1:{port}", initiation)


def handshake_header(initiation: bytes) -> str:
    return base64.b64encode(initiation).decode()


# -- TLS --------------------------------------------------------------------------------


def make_tls_files(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1, made by the relay's own builder."""
    cert_pem, key_pem = generate_self_signed(["localhost"], valid_days=1)
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    return cert_path, key_path
