"""What the transport keeps per idle connection, and that trimming it changed nothing.

The memory work of issue 7 (``cli/bench/conn_memory.py`` has the
figures) swapped storage under ``h2`` and ``hpack`` and restructured the trio
adapter. These tests pin the behaviour: the compact structures act exactly
like the stock ones (checked against them, with Hypothesis), an idle server
connection holds none of the large objects any more, and the adapter still
contains failures and survives accept errors.
"""

from __future__ import annotations

import errno
import gc
import types
from collections import deque
from collections.abc import Iterator
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    ConnectionStats,
    ControlServer,
    NoiseRequest,
    NoiseResponse,
    ServeOptions,
    compat,
    generate_private_key,
    h2flow,
    open_control_client,
)
from protocol import client_conn as cc
from protocol import h2_bridge as hb
from protocol.compat import CompactH2Connection, CompactSettings, compact_header_tables
from protocol.errors import RemoteProtocolError
from protocol.noise.handshake import SessionKeys, public_key
from protocol.noise.transport import NoiseTransport
from protocol.serve.accept import Admission, accept_loop
from protocol.upgrade import UPGRADE_RESPONSE, FrontConnection, Upgrade

SC = h2.settings.SettingCodes
SERVER_KEY = bytes(range(64, 96))
MACHINE_KEY = bytes(range(96, 128))

# -- CompactSettings against h2's Settings ---------------------------------------------

#: Known codes plus one unknown (peers may send codes h2 does not know).
_codes = st.sampled_from([*SC, 0x99])
_values = st.one_of(
    st.sampled_from([-1, 0, 1, 2, 16383, 16384, 2**24 - 1, 2**24, 2**31 - 1, 2**31]),
    st.integers(min_value=-5, max_value=2**32),
)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("set"), _codes, _values),
        st.tuples(st.just("ack"), st.none(), st.none()),
        st.tuples(st.just("del"), _codes, st.none()),
        st.tuples(st.just("update"), st.dictionaries(_codes, _values, max_size=3), st.none()),
    ),
    max_size=30,
)


def _outcome(call: Any) -> object:
    """The result of ``call()``, or the exception's type and error code."""
    try:
        return ("ok", call())
    except (KeyError, h2.exceptions.InvalidSettingsValueError) as exc:
        return ("raised", type(exc), getattr(exc, "error_code", None))


def _changes(changed: dict[Any, h2.settings.ChangedSetting]) -> list[tuple[Any, ...]]:
    return [(k, c.setting, c.original_value, c.new_value) for k, c in changed.items()]


def _apply(s: h2.settings.Settings, op: str, code: Any, value: Any) -> object:
    """One operation on ``s``; what it returned or raised."""
    if op == "set":
        return _outcome(lambda: s.__setitem__(code, value))
    if op == "ack":
        return _changes(s.acknowledge())
    if op == "del":
        return _outcome(lambda: s.__delitem__(code))
    return _outcome(lambda: s.update(code))


def _view(s: h2.settings.Settings) -> list[object]:
    """Everything observable: iteration order, each value or KeyError, len, properties."""
    return [
        [(code, _outcome(lambda code=code: s[code])) for code in s],
        len(s),
        _outcome(lambda: s.header_table_size),
        _outcome(lambda: s.enable_push),
        _outcome(lambda: s.initial_window_size),
        _outcome(lambda: s.max_frame_size),
        _outcome(lambda: s.max_concurrent_streams),
        _outcome(lambda: s.max_header_list_size),
        _outcome(lambda: s.enable_connect_protocol),
    ]


@pytest.mark.parametrize("client", [True, False])
@pytest.mark.parametrize(
    "initial",
    [None, {SC.MAX_CONCURRENT_STREAMS: 250, SC.MAX_HEADER_LIST_SIZE: 65536}],
)
def test_compact_settings_start_like_h2(client: bool, initial: dict[Any, int] | None) -> None:
    stock = h2.settings.Settings(client=client, initial_values=initial)
    compact = CompactSettings(client=client, initial_values=initial)
    assert _view(compact) == _view(stock)


@pytest.mark.parametrize(
    ("code", "value", "error"),
    [
        (SC.ENABLE_PUSH, 2, h2.errors.ErrorCodes.PROTOCOL_ERROR),
        (SC.INITIAL_WINDOW_SIZE, 2**31, h2.errors.ErrorCodes.FLOW_CONTROL_ERROR),
        (SC.MAX_FRAME_SIZE, 100, h2.errors.ErrorCodes.PROTOCOL_ERROR),
    ],
)
def test_compact_settings_reject_bad_initial_values(code: Any, value: int, error: int) -> None:
    with pytest.raises(h2.exceptions.InvalidSettingsValueError) as stock:
        h2.settings.Settings(initial_values={code: value})
    with pytest.raises(h2.exceptions.InvalidSettingsValueError) as compact:
        CompactSettings(initial_values={code: value})
    assert compact.value.error_code == stock.value.error_code == error


@settings(max_examples=300, deadline=None)
@given(client=st.booleans(), ops=_ops)
def test_compact_settings_behave_like_h2(client: bool, ops: list[tuple[str, Any, Any]]) -> None:
    stock = h2.settings.Settings(client=client)
    compact = CompactSettings(client=client)
    for op, code, value in ops:
        assert _apply(compact, op, code, value) == _apply(stock, op, code, value), op
        assert _view(compact) == _view(stock)


def test_compact_settings_make_the_same_settings_frame() -> None:
    """``initiate_connection`` serialises local settings in iteration order."""
    config = h2.config.H2Configuration(client_side=False)
    initial = {SC.MAX_CONCURRENT_STREAMS: 250, SC.MAX_HEADER_LIST_SIZE: 65536}
    wires = []
    for settings_class in (h2.settings.Settings, CompactSettings):
        conn = h2.connection.H2Connection(config=config)
        conn.local_settings = settings_class(client=False, initial_values=initial)
        conn.initiate_connection()
        wires.append(conn.data_to_send())
    assert wires[0] == wires[1]


def test_settled_settings_are_shared_and_copied_on_change() -> None:
    """Connections whose settings settled to the same values share one dict; a later
    change to one of them leaves the others alone."""
    a, b = CompactSettings(client=True), CompactSettings(client=True)
    for s in (a, b):
        s[SC.INITIAL_WINDOW_SIZE] = 4 * 2**20
        s[SC.MAX_HEADER_LIST_SIZE] = 10 * 2**20
        s.acknowledge()
    assert a._current is b._current
    a[SC.MAX_FRAME_SIZE] = 2**15
    a.acknowledge()
    assert a._current is not b._current
    assert (a.max_frame_size, b.max_frame_size) == (2**15, 2**14)
    assert b.initial_window_size == 4 * 2**20


# -- HPACK tables on lists --------------------------------------------------------------

_header_names = st.sampled_from([b"content-type", b"x-a", b"x-b", b"ts-lb", b"user-agent"])
_header_lists = st.lists(
    st.lists(
        st.tuples(_header_names, st.binary(min_size=0, max_size=900).map(bytes.hex)),
        min_size=1,
        max_size=6,
    ),
    min_size=1,
    max_size=25,
)


def _h2_pair() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    return (
        h2.connection.H2Connection(h2.config.H2Configuration(client_side=False)),
        h2.connection.H2Connection(h2.config.H2Configuration(client_side=False)),
    )


@settings(max_examples=100, deadline=None)
@given(blocks=_header_lists, resize=st.sampled_from([None, 0, 256, 1024]))
def test_compacted_hpack_tables_encode_and_decode_the_same(
    blocks: list[list[tuple[bytes, str]]], resize: int | None
) -> None:
    """Byte-identical encoding and correct decoding, evictions and resizes included."""
    stock, compact = _h2_pair()
    assert compact_header_tables(compact)
    for i, block in enumerate(blocks):
        headers = [(name, value.encode()) for name, value in block]
        if resize is not None and i == len(blocks) // 2:
            stock.encoder.header_table_size = compact.encoder.header_table_size = resize
            stock.decoder.header_table_size = compact.decoder.header_table_size = resize
        encoded = stock.encoder.encode(headers)
        assert compact.encoder.encode(headers) == encoded
        assert compact.decoder.decode(encoded, raw=True) == headers
        assert stock.decoder.decode(encoded, raw=True) == headers
    for side in ("encoder", "decoder"):
        stock_table = getattr(stock, side).header_table
        compact_table = getattr(compact, side).header_table
        assert list(compact_table.dynamic_entries) == list(stock_table.dynamic_entries)


def test_compact_header_tables_leaves_an_unknown_layout_alone() -> None:
    conn, _ = _h2_pair()
    conn.decoder.header_table.dynamic_entries = []  # type: ignore[assignment]
    assert not compact_header_tables(conn)
    assert type(conn.encoder.header_table.dynamic_entries) is deque


# -- an idle server connection ------------------------------------------------------------


class _Pair:
    """Client core and server core joined in memory (as in test_h2_bridge)."""

    def __init__(self) -> None:
        self.client = cc.ClientConnection(
            machine_private=MACHINE_KEY,
            server_public=public_key(SERVER_KEY),
            host="ctl.example",
            authority="unused",
        )
        front = FrontConnection(server_public=public_key(SERVER_KEY))
        front.receive_data(self.client.data_to_send())
        upgrade = front.next_event()
        assert isinstance(upgrade, Upgrade)
        self.server = hb.ServerConnection(
            server_private=SERVER_KEY, initiation=upgrade.initiation, challenge_public=b"c" * 32
        )
        self.client.receive_data(UPGRADE_RESPONSE + self.server.start())
        self.server_events: list[hb.ServerEvent] = []
        self.pump()

    def pump(self) -> None:
        for _ in range(1000):
            to_server = self.client.data_to_send()
            if to_server:
                self.server_events += self.server.receive_data(to_server)
            to_client = self.server.data_to_send()
            if to_client:
                self.client.receive_data(to_client)
            if not to_server and not to_client:
                return
        raise AssertionError("no quiescence")


#: Shared code and namespaces: reaching one leads to the whole interpreter.
_SHARED = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType)


def _reachable(root: object) -> Iterator[object]:
    """Every object reachable from ``root``, not crossing into code or namespaces."""
    seen = {id(root)}
    todo = [root]
    while todo:
        obj = todo.pop()
        yield obj
        for ref in gc.get_referents(obj):
            if id(ref) in seen or isinstance(ref, _SHARED):
                continue
            seen.add(id(ref))
            todo.append(ref)


def test_an_idle_long_poll_holds_no_deques_or_cipher_objects() -> None:
    """What made an idle tunnel cost 34 KiB: deques (h2 settings, HPACK), ciphers."""
    pair = _Pair()
    done = pair.client.send_request("POST", "/machine/register", body=b"{}")
    poll = pair.client.send_request(
        "POST", "/machine/map", headers=(("content-type", "application/json"),), body=b"{}"
    )
    pair.pump()
    received = {e.stream_id for e in pair.server_events if isinstance(e, hb.RequestReceived)}
    assert received == {done, poll}
    assert pair.server.send_headers(done, 200, (("content-length", "2"),))
    pair.server.send_data(done, b"{}", end_stream=True)
    assert pair.server.send_headers(poll, 200)
    pair.server.send_data(poll, b"first map")  # the long poll stays open
    pair.pump()
    assert pair.server.pending(poll) == 0
    found = [type(o).__name__ for o in _reachable(pair.server)]
    assert "deque" not in found
    assert "ChaCha20Poly1305" not in found
    # No HPACK dynamic tables (SETTINGS_HEADER_TABLE_SIZE 0 one way, our encoder's
    # choice the other): the requests' and responses' headers are not kept.
    assert len(pair.server._h2.decoder.header_table.dynamic_entries) == 0
    assert len(pair.server._h2.encoder.header_table.dynamic_entries) == 0
    # ... and the connection still works after idling.
    pair.server.send_data(poll, b"second map")
    pair.pump()


def test_reset_after_the_peers_goaway_is_a_no_op() -> None:
    """The adapter resets a failed stream from a task in the server's nursery:
    that must not raise, even when h2 already closed the connection."""
    pair = _Pair()
    poll = pair.client.send_request("POST", "/machine/map", body=b"{}")
    pair.pump()
    assert pair.server.send_headers(poll, 200)
    pair.client.close()  # GOAWAY
    pair.pump()
    assert any(isinstance(e, h2flow.ConnectionTerminated) for e in pair.server_events)
    pair.server.reset_stream(poll, h2.errors.ErrorCodes.INTERNAL_ERROR)  # no exception
    pair.server.reset_stream(poll + 100)  # an unknown stream: no exception either


def test_closed_streams_are_remembered_up_to_the_concurrency_limit() -> None:
    conn = CompactH2Connection(h2.config.H2Configuration(client_side=False), closed_streams=3)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    conn.initiate_connection()
    conn.receive_data(client.data_to_send())
    headers = [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "a")]
    for stream_id in range(1, 40, 2):
        client.send_headers(stream_id, headers, end_stream=True)
        conn.receive_data(client.data_to_send())
        conn.send_headers(stream_id, [(":status", "200")], end_stream=True)
    assert conn.MAX_CLOSED_STREAMS == 3
    assert len(conn._closed_streams) <= 3
    assert h2.connection.H2Connection.MAX_CLOSED_STREAMS == 2**16  # the class is untouched


def test_frame_dispatch_view_finds_the_same_handlers_as_h2() -> None:
    conn = CompactH2Connection(h2.config.H2Configuration(client_side=False), closed_streams=10)
    stock = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    view = conn._frame_dispatch_table
    assert isinstance(view, compat._FrameDispatch)  # the per-connection dict is gone
    for frame_type, method in stock._frame_dispatch_table.items():
        found = view[frame_type]
        assert getattr(found, "__self__", None) is conn
        assert getattr(found, "__func__", None) is getattr(method, "__func__", None)


def test_noise_transport_still_rejects_a_bad_key_up_front() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        NoiseTransport(SessionKeys(b"short", b"k" * 32, b"", b"", 130))


def test_noise_transport_keeps_keys_not_ciphers() -> None:
    a = NoiseTransport(SessionKeys(b"k" * 32, b"q" * 32, b"", b"", 130))
    b = NoiseTransport(SessionKeys(b"q" * 32, b"k" * 32, b"", b"", 130))
    for size in (1, 4077, 4078, 100_000):
        payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
        assert b.receive_data(a.send(payload)) == payload
    assert not any(isinstance(o, ChaCha20Poly1305) for t in (a, b) for o in _reachable(t))
    a.close()
    with pytest.raises(RemoteProtocolError):
        b.receive_data(b"\x04\x00\x10" + bytes(16))  # the next nonce does not open it


# -- the adapter ----------------------------------------------------------------------------


async def _lifespan_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            kind = (await receive())["type"].rsplit(".", 1)[-1]
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return


async def _buggy_handler(request: NoiseRequest) -> NoiseResponse:
    if request.path == "/bug":
        # A header value that is not a string: sending it fails inside the
        # adapter (not in the handler), which is "our bug" territory.
        return NoiseResponse(status=200, headers=(("x-bad", 5),))  # type: ignore[arg-type]
    return NoiseResponse(status=200, body=b"fine")


async def test_a_failure_while_answering_resets_only_that_stream(nursery: trio.Nursery) -> None:
    """Handler tasks live in the server's nursery: a bug there must stay contained."""
    server = ControlServer(server_key=SERVER_KEY, handler=_buggy_handler, asgi_app=_lifespan_app)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(server.serve, listeners)
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(10):
        async with open_control_client(
            "127.0.0.1",
            port,
            machine_key=generate_private_key(),
            server_public=server.server_public,
        ) as client:
            with pytest.raises(RemoteProtocolError):
                await client.request("GET", "/bug")
            response = await client.request("GET", "/ok")  # same connection
            assert (response.status, response.body) == (200, b"fine")


class _FlakyListener(trio.abc.Listener[trio.SocketStream]):
    """Fails ``accept`` with EMFILE once, then hands out one real connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream: trio.SocketStream | None = stream
        self.failed = False

    async def accept(self) -> trio.SocketStream:
        await trio.lowlevel.checkpoint()
        if not self.failed:
            self.failed = True
            raise OSError(errno.EMFILE, "Too many open files")
        if self.stream is None:
            await trio.sleep_forever()
        stream, self.stream = self.stream, None
        assert stream is not None
        return stream

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_accept_loop_retries_after_emfile(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    """The loop backs off (a timer: virtual time here) and accepts again."""
    served: list[trio.SocketStream] = []
    handed_on = trio.Event()
    admission = Admission(ServeOptions(), ConnectionStats())

    async def record(stream: trio.SocketStream, admitted: object = None) -> None:
        served.append(stream)
        handed_on.set()
        await stream.aclose()

    listener = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        client = await trio.open_tcp_stream("127.0.0.1", port)
        accepted = await listener[0].accept()
        flaky = _FlakyListener(accepted)
        nursery.start_soon(accept_loop, flaky, nursery, admission, record)  # type: ignore[arg-type]
        with trio.fail_after(5):
            await handed_on.wait()
        nursery.cancel_scope.cancel()
    await client.aclose()
    await listener[0].aclose()
    assert served == [accepted]
    assert "accept failed with EMFILE" in caplog.text


# -- hyperframe's DATA repr (h2 formats it for every received frame) ---------------------


@given(st.one_of(st.none(), st.binary(max_size=64), st.binary(min_size=1000, max_size=20000)))
def test_cheap_data_repr_is_hyperframes(data: bytes | None) -> None:
    assert compat._original_data_repr is not None
    assert compat._data_repr(data) == compat._original_data_repr(data)


def test_cheap_data_repr_is_installed() -> None:
    import hyperframe.frame

    import protocol.h2flow  # noqa: F401  (installs it)

    assert hyperframe.frame._raw_data_repr is compat._data_repr
    frame = hyperframe.frame.DataFrame(1, data=b"\x01" * 16384)
    assert repr(frame).endswith("<hex:01010101010101010101...>")
