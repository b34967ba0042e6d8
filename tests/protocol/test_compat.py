"""Guards of :mod:`protocol.compat`: each fails when upstream changes an internal we rely on.

One test (or a few) per item of the table in the module docstring. They read the
libraries themselves (attributes, signatures, and where a behaviour hangs on how
upstream *uses* something, its source), so that an upgrade past the pinned
versions fails here, naming the item, instead of silently costing memory or
breaking a connection. The behaviour of the replacements is checked against the
stock objects in ``tests/protocol/test_transport_memory.py``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import pkgutil
import re
import tomllib
import types
from collections import deque
from pathlib import Path

import h2
import h2.config
import h2.connection
import h2.events
import h2.settings
import h2.utilities
import hpack
import hpack.huffman
import hpack.table
import hyperframe.frame
import pytest
import trio
from hypercorn.config import Config as HypercornConfig

from protocol import compat

ROOT = Path(__file__).resolve().parents[2]


def _package_sources(package: types.ModuleType) -> dict[str, str]:
    """Module name -> source, for every module of an installed package."""
    return {
        info.name: inspect.getsource(importlib.import_module(f"{package.__name__}.{info.name}"))
        for info in pkgutil.iter_modules(package.__path__)
    }


def _params(func: object) -> list[str]:
    return [p for p in inspect.signature(func).parameters if p != "self"]  # type: ignore[arg-type]


# -- item 1: h2's per-connection frame dispatch table -------------------------------------


def test_h2_dispatch_table_is_a_dict_of_the_connections_bound_methods() -> None:
    conn = h2.connection.H2Connection()
    table = conn._frame_dispatch_table
    assert type(table) is dict
    assert table, "h2 no longer fills _frame_dispatch_table"
    for frame_type, method in table.items():
        assert isinstance(frame_type, type)
        assert getattr(method, "__self__", None) is conn
    assert set(compat._DISPATCH_NAMES) == set(table)


def test_h2_only_indexes_its_dispatch_table_by_frame_class() -> None:
    uses = [
        line.strip()
        for source in _package_sources(h2).values()
        for line in source.splitlines()
        if "_frame_dispatch_table" in line
    ]
    assignments = [u for u in uses if re.match(r"self\._frame_dispatch_table\b.*=\s*\{", u)]
    lookups = [u for u in uses if "_frame_dispatch_table[frame.__class__]" in u]
    assert len(assignments) == 1 and len(lookups) == 1 and len(uses) == 2, uses


# -- item 2: h2's record of closed streams -------------------------------------------------


def test_h2_sizes_its_closed_stream_record_from_max_closed_streams() -> None:
    assert isinstance(h2.connection.H2Connection.MAX_CLOSED_STREAMS, int)
    init = inspect.getsource(h2.connection.H2Connection.__init__)
    assert re.search(r"size_limit=self\.MAX_CLOSED_STREAMS", init), "h2 no longer reads it"
    conn = compat.CompactH2Connection(h2.config.H2Configuration(client_side=False), closed_streams=7)
    stock = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    assert type(stock._closed_streams) is h2.utilities.SizeLimitDict
    # Ours is the slotted plain dict, with the same limit: the oldest goes first.
    record = conn._closed_streams
    assert type(record) is compat._ClosedStreams and record.limit == 7
    assert not hasattr(record, "__dict__")
    for stream_id in range(1, 20, 2):
        record[stream_id] = None
    assert list(record) == list(range(7, 20, 2))


def test_h2_uses_its_closed_stream_record_only_by_assigning_testing_and_indexing() -> None:
    source = inspect.getsource(h2.connection)
    uses = re.findall(r"self\._closed_streams\b.{0,3}", source)
    assert len(uses) == 4, uses
    assert re.search(r"self\._closed_streams: [^=]+= SizeLimitDict\(", source)
    assert re.search(r"self\._closed_streams\[stream_id\] = ", source)
    assert re.search(r"if stream_id in self\._closed_streams:", source)
    assert re.search(r"return self\._closed_streams\[stream_id\]", source)


# -- item 3: h2's settings -------------------------------------------------------------------

#: What h2 may use of a Settings object: the mapping interface and named properties.
_SETTINGS_INTERFACE = {
    "acknowledge",
    "enable_connect_protocol",
    "enable_push",
    "get",
    "header_table_size",
    "initial_window_size",
    "items",
    "keys",
    "max_concurrent_streams",
    "max_frame_size",
    "max_header_list_size",
    "update",
    "validate_received_setting",
    "values",
}


def test_h2_uses_settings_only_through_their_public_interface() -> None:
    used: set[str] = set()
    for source in _package_sources(h2).values():
        used |= set(re.findall(r"(?:local|remote)_settings\.(\w+)", source))
        used |= set(re.findall(r"old_settings\.(\w+)", source))  # RemoteSettingsChanged
    assert used, "h2 no longer names local_settings/remote_settings"
    assert used <= _SETTINGS_INTERFACE, used - _SETTINGS_INTERFACE
    for name in ("local_settings", "remote_settings"):  # plain attributes we can assign
        assert not hasattr(h2.connection.H2Connection, name)


def test_settings_methods_compact_settings_inherits_use_only_what_it_sets() -> None:
    """Whatever ``h2.settings.Settings`` defines and CompactSettings does not override
    must not need the base ``__init__`` (which CompactSettings skips)."""
    compact = compat.CompactSettings(client=True)
    private: set[str] = set()
    for name, value in vars(h2.settings.Settings).items():
        if name in vars(compat.CompactSettings):
            continue
        func = value.fget if isinstance(value, property) else value
        if inspect.isfunction(func):
            private |= set(re.findall(r"self\.(_\w+)", inspect.getsource(func)))
    assert all(hasattr(compact, attr) for attr in private), private
    assert _params(h2.settings.Settings.__init__) == ["client", "initial_values"]


# -- item 4: hpack's dynamic tables ------------------------------------------------------------


def test_hpack_dynamic_entries_are_a_deque_used_like_a_list() -> None:
    assert type(hpack.table.HeaderTable().dynamic_entries) is deque
    sources = _package_sources(hpack)
    users = [name for name, source in sources.items() if "dynamic_entries" in source]
    assert users == ["table"], users
    methods = set(re.findall(r"dynamic_entries\.(\w+)", sources["table"]))
    assert methods <= {"appendleft", "pop", "clear"}, methods
    assert "appendleft" in vars(compat._DynamicEntries)
    conn = h2.connection.H2Connection()
    assert compat.compact_header_tables(conn)
    assert isinstance(conn.decoder.header_table.dynamic_entries, compat._DynamicEntries)


def test_hpack_huffman_encoder_is_stateless_and_shared_by_connections() -> None:
    # hpack's HuffmanEncoder keeps the two code tables it was given and only reads
    # them: every connection's encoder takes the one shared encoder, which encodes
    # what a connection's own did.
    source = inspect.getsource(hpack.huffman.HuffmanEncoder.encode)
    assert not re.search(r"self\.\w+\s*(\[[^]]*\])?\s*[-+|&]?=(?!=)", source), "encode() writes state"
    shared = compat._SHARED_HUFFMAN
    assert shared is not None, "hpack's Encoder no longer holds a plain HuffmanEncoder"
    stock = h2.connection.H2Connection().encoder.huffman_coder
    one, two = h2.connection.H2Connection(), h2.connection.H2Connection()
    compat.compact_header_tables(one)
    compat.compact_header_tables(two)
    assert one.encoder.huffman_coder is two.encoder.huffman_coder is shared
    for text in (b"", b"/machine/map", b"application/json; charset=utf-8", bytes(range(256))):
        assert shared.encode(text) == stock.encode(text)
    headers = [(":status", "200"), ("content-type", "application/json")]
    assert one.encoder.encode(headers) == h2.connection.H2Connection().encoder.encode(headers)


# -- item 5: hyperframe's payload repr ----------------------------------------------------------


def test_hyperframe_reprs_go_through_raw_data_repr() -> None:
    original = compat._original_data_repr
    assert original is not None, "hyperframe.frame._raw_data_repr is gone"
    assert _params(original) == ["data"]
    data_frame_repr = inspect.getsource(hyperframe.frame.DataFrame._body_repr)
    assert "_raw_data_repr(" in data_frame_repr
    assert compat.install_cheap_data_repr()
    assert hyperframe.frame._raw_data_repr is compat._data_repr


# -- item 6: hypercorn's per-connection driver ------------------------------------------------


def test_hypercorn_tcp_server_takes_what_we_give_and_probes_what_we_provide() -> None:
    assert _params(compat.TCPServer.__init__) == ["app", "config", "context", "state", "stream"]
    assert inspect.iscoroutinefunction(compat.TCPServer.run)
    source = inspect.getsource(compat.TCPServer)
    for probe in ("do_handshake", "selected_alpn_protocol", "transport_stream", ".socket"):
        assert probe in source, probe


async def test_hypercorn_lifespan_worker_context_and_wrappers() -> None:
    assert _params(compat.Lifespan.__init__) == ["app", "config", "state"]
    for name in ("handle_lifespan", "wait_for_startup", "wait_for_shutdown"):
        assert inspect.iscoroutinefunction(getattr(compat.Lifespan, name)), name
    assert "task_status" in inspect.signature(compat.Lifespan.handle_lifespan).parameters
    assert _params(compat.WorkerContext.__init__) == ["max_requests"]
    context = compat.WorkerContext(None)
    await context.terminated.set()
    assert context.terminated.is_set()
    assert _params(compat.ASGIWrapper.__init__) == ["app"]
    assert compat.ConnectionState({"a": 1}) == {"a": 1}
    assert isinstance(HypercornConfig().shutdown_timeout, float | int)
    await trio.lowlevel.checkpoint()


def test_hypercorn_tcp_server_routes_its_protocols_events_through_protocol_send() -> None:
    """Item 6, :class:`compat.BusyAwareTCPServer`: the protocol gets the bound
    ``self.protocol_send`` as its send callback, and that method handles
    ``Updated`` (idle / busy) events."""
    run = inspect.getsource(compat.TCPServer.run)
    assert "self.protocol_send" in run
    assert inspect.iscoroutinefunction(compat.TCPServer.protocol_send)
    assert "Updated" in inspect.getsource(compat.TCPServer.protocol_send)
    assert _params(compat.BusyAwareTCPServer.__init__)[:5] == _params(compat.TCPServer.__init__)
    from hypercorn.protocol import h11 as hypercorn_h11

    source = inspect.getsource(hypercorn_h11)
    assert "Updated(idle=False)" in source and "Updated(idle=True)" in source


# -- item 7: h2's output buffer -----------------------------------------------------------------


def test_h2_keeps_unsent_frames_in_a_bytearray_that_data_to_send_drains() -> None:
    conn = h2.connection.H2Connection()
    assert type(conn._data_to_send) is bytearray
    conn.initiate_connection()
    conn.ping(b"12345678")
    pending = compat.unsent_bytes(conn)
    assert pending > 0
    assert len(conn.data_to_send()) == pending
    assert compat.unsent_bytes(conn) == 0
    conn.ping(b"abcdefgh")
    assert len(conn.data_to_send(5)) == 5  # a partial take leaves the rest counted
    assert compat.unsent_bytes(conn) == 17 - 5


# -- one place, pinned ---------------------------------------------------------------------------

#: Names of these libraries' internals; only protocol/compat.py may say them.
_INTERNALS = re.compile(
    # hypercorn's public API (hypercorn.config, ``from hypercorn.trio import serve``) is fine.
    r"^\s*(?:import|from)\s+(?:hpack|hyperframe|hypercorn\.(?:trio\.\w+|app_wrappers|typing|protocol))\b"
    r"|_frame_dispatch_table|MAX_CLOSED_STREAMS|_closed_streams|dynamic_entries|_raw_data_repr"
    r"|_data_to_send|protocol_send|^\s*(?:import|from)\s+hypercorn\.events\b"
    r"|\bheader_table\b",
    re.MULTILINE,
)


@pytest.mark.parametrize("package", ["wire", "eventlog", "projections", "protocol", "relay", "cli"])
def test_no_module_outside_compat_touches_the_internals(package: str) -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {match.group(0).strip()}"
        for path in sorted((ROOT / package).rglob("*.py"))
        if path != ROOT / "protocol" / "compat.py"
        for match in _INTERNALS.finditer(path.read_text())
    ]
    assert offenders == []


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


@pytest.mark.parametrize("library", ["h2", "hpack", "hyperframe", "hypercorn"])
def test_library_is_pinned_below_the_next_unverified_minor(library: str) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (spec,) = [d for d in project["dependencies"] if re.match(rf"{library}\b", d, re.IGNORECASE)]
    upper = re.search(r"<\s*([\d.]+)", spec)
    assert upper is not None, f"{spec}: no upper bound"
    assert _version(importlib.metadata.version(library)) < _version(upper.group(1))
