"""The protocol's state machines, every (state, input) pair against its table.

Like the relay's connection table (tests/relay/test_server_core.py): each core keeps
an explicit ``_TRANSITIONS`` table and one ``advance`` step.  For every pair, a pair in
the table moves to its target, and a pair outside it raises without changing the
state: LocalProtocolError for a misuse, or the sticky peer error once the core has
failed.  Three machines: the HTTP/2-over-Noise server connection
(:mod:`protocol.h2_bridge`), the client connection (:mod:`protocol.client_conn`) and
one direction of the Noise transport (:mod:`protocol.noise.transport`).

Two smaller machines keep their state implicit, so their tables are written here,
from the outside, and every (state, input) pair is driven through the real object:
the initiator of the Noise handshake (:class:`protocol.noise.handshake.ClientHandshake`:
initiated, done, failed) and the HTTP/1.1 front of the control port
(:class:`protocol.upgrade.FrontConnection`: open between requests, or done).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, NamedTuple

import pytest

from protocol import client_conn as cc
from protocol import h2_bridge as hb
from protocol import upgrade as up
from protocol.errors import HandshakeError, LocalProtocolError, RemoteProtocolError
from protocol.noise import handshake as nh
from protocol.noise import transport as nt
from protocol.noise.handshake import ClientHandshake, public_key

SERVER_KEY = bytes(range(64, 96))
MACHINE_KEY = bytes(range(96, 128))


def _server() -> hb.ServerConnection:
    initiation = ClientHandshake(MACHINE_KEY, public_key(SERVER_KEY), 130).initiation
    return hb.ServerConnection(server_private=SERVER_KEY, initiation=initiation, challenge_public=None)


def _client() -> cc.ClientConnection:
    return cc.ClientConnection(
        machine_private=MACHINE_KEY, server_public=public_key(SERVER_KEY), host="ctl.example"
    )


class Machine(NamedTuple):
    make: Callable[[], Any]  # a fresh core in its first state
    states: type[Enum]
    inputs: type[Enum]
    table: Mapping[tuple[Any, Any], Any]
    step: str  # the name of the core's one transition method


MACHINES = {
    "server": Machine(_server, hb.ServerState, hb._Input, hb._TRANSITIONS, "_advance"),
    "client": Machine(_client, cc.ClientState, cc._Input, cc._TRANSITIONS, "_advance"),
    "channel": Machine(
        lambda: nt._Channel(bytes(32), 0), nt.ChannelState, nt.ChannelInput, nt._TRANSITIONS, "advance"
    ),
}
EVERY_PAIR = [
    pytest.param(name, state, event, id=f"{name}-{state.name}-{event.name}")
    for name, machine in MACHINES.items()
    for state in machine.states
    for event in machine.inputs
]


@pytest.mark.parametrize(("name", "state", "event"), EVERY_PAIR)
def test_table_every_pair(name: str, state: Enum, event: Enum) -> None:
    machine = MACHINES[name]
    core = machine.make()
    core.state = state
    expected = machine.table.get((state, event))
    if expected is None:
        with pytest.raises(LocalProtocolError):
            getattr(core, machine.step)(event)
        assert core.state is state
    else:
        getattr(core, machine.step)(event)
        assert core.state is expected
        if name == "channel":
            # Leaving OPEN drops the key (forward secrecy); staying OPEN keeps it.
            assert (core.key is not None) is (expected is nt.ChannelState.OPEN)


# -- the server connection ------------------------------------------------------------


@pytest.mark.parametrize("event", [e for e in hb._Input if (hb.ServerState.ERROR, e) not in hb._TRANSITIONS])
def test_server_after_a_failure_reraises_the_peer_error(event: hb._Input) -> None:
    conn = _server()
    conn.state = hb.ServerState.ERROR
    conn.error = RemoteProtocolError("bad frame")
    with pytest.raises(RemoteProtocolError, match="bad frame"):
        conn._advance(event)


def test_server_error_is_terminal_and_closed_never_reopens() -> None:
    for (state, _event), target in hb._TRANSITIONS.items():
        if state is hb.ServerState.ERROR:
            assert target is hb.ServerState.ERROR
        if state is hb.ServerState.CLOSED:
            assert target in (hb.ServerState.CLOSED, hb.ServerState.ERROR)
    assert hb._TRANSITIONS[(hb.ServerState.HANDSHAKEN, hb._Input.START)] is hb.ServerState.OPEN


# -- the client connection ------------------------------------------------------------


def test_client_after_a_failure_reraises_the_peer_error() -> None:
    conn = _client()
    conn.state = cc.ClientState.ERROR
    conn.error = RemoteProtocolError("bad record")
    with pytest.raises(RemoteProtocolError, match="bad record"):
        conn._advance(cc._Input.DATA)


def test_client_path_to_open_is_the_only_one() -> None:
    """Upgrade, handshake, early payload, open: each step only from the one before."""
    steps = [
        (cc.ClientState.AWAIT_UPGRADE, cc._Input.GOT_101, cc.ClientState.AWAIT_RESPONSE),
        (cc.ClientState.AWAIT_RESPONSE, cc._Input.HANDSHAKE_DONE, cc.ClientState.AWAIT_EARLY),
        (cc.ClientState.AWAIT_EARLY, cc._Input.EARLY_DONE, cc.ClientState.OPEN),
    ]
    for state, event, target in steps:
        assert cc._TRANSITIONS[(state, event)] is target
        others = [s for s in cc.ClientState if s is not state and (s, event) in cc._TRANSITIONS]
        assert others == [], (event, others)
    assert all(cc._TRANSITIONS[(s, cc._Input.FAIL)] is cc.ClientState.ERROR for s in cc.ClientState)


# -- one direction of the Noise transport ---------------------------------------------


def test_channel_failed_by_the_peer_reports_the_peer_error() -> None:
    channel = nt._Channel(bytes(32), 0)
    channel.fail(RemoteProtocolError("tag mismatch"))
    assert channel.state is nt.ChannelState.ERROR
    with pytest.raises(RemoteProtocolError, match="tag mismatch"):
        channel.advance(nt.ChannelInput.OK)


# -- the initiator of the Noise handshake ---------------------------------------------

# What ClientHandshake.finish does with each response, by phase: the next phase, and
# the error raised (None: it returns the session keys).
HANDSHAKE_TABLE: dict[tuple[str, str], tuple[str, type[Exception] | None]] = {
    ("INITIATED", "valid"): ("DONE", None),
    ("INITIATED", "malformed"): ("FAILED", HandshakeError),
    ("INITIATED", "forged"): ("FAILED", HandshakeError),
    # Consumed once: after the end, whatever comes is a misuse and changes nothing.
    **{(phase, given): (phase, LocalProtocolError) for phase in ("DONE", "FAILED")
       for given in ("valid", "malformed", "forged")},
}


def _responses(hs: ClientHandshake) -> tuple[dict[str, bytes], nh.SessionKeys]:
    valid, server_keys = nh.respond(SERVER_KEY, hs.initiation)
    # A well-formed response to another initiation: its tag does not authenticate.
    forged, _ = nh.respond(SERVER_KEY, ClientHandshake(MACHINE_KEY, public_key(SERVER_KEY), 130).initiation)
    return {"valid": valid, "malformed": valid[:10], "forged": forged}, server_keys


def _handshake_in(phase: str) -> tuple[ClientHandshake, dict[str, bytes], nh.SessionKeys]:
    hs = ClientHandshake(MACHINE_KEY, public_key(SERVER_KEY), 130)
    responses, server_keys = _responses(hs)
    if phase == "DONE":
        hs.finish(responses["valid"])
    elif phase == "FAILED":
        with pytest.raises(HandshakeError):
            hs.finish(responses["forged"])
    assert hs._phase is nh._ClientState[phase]
    return hs, responses, server_keys


def test_the_handshake_table_covers_every_pair() -> None:
    inputs = ("valid", "malformed", "forged")
    assert set(HANDSHAKE_TABLE) == {(p.name, i) for p in nh._ClientState for i in inputs}


@pytest.mark.parametrize(("phase", "given"), sorted(HANDSHAKE_TABLE), ids=[f"{p}-{g}" for p, g in sorted(HANDSHAKE_TABLE)])
def test_handshake_table_every_pair(phase: str, given: str) -> None:
    hs, responses, server_keys = _handshake_in(phase)
    target, error = HANDSHAKE_TABLE[(phase, given)]
    if error is None:
        keys = hs.finish(responses[given])
        assert keys.peer_static == public_key(SERVER_KEY)
        assert (keys.send_key, keys.receive_key) == (server_keys.receive_key, server_keys.send_key)
    else:
        with pytest.raises(error):
            hs.finish(responses[given])
    assert hs._phase is nh._ClientState[target]


# -- the HTTP/1.1 front of the control port --------------------------------------------

_INIT_B64 = base64.b64encode(bytes(range(101))).decode()
FRONT_INPUTS: dict[str, bytes] = {
    "key": b"GET /key?v=130 HTTP/1.1\r\nHost: x\r\n\r\n",
    "key-bad-v": b"GET /key?v=x HTTP/1.1\r\nHost: x\r\n\r\n",
    "key-close": b"GET /key?v=130 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "upgrade": (
        "POST /ts2021 HTTP/1.1\r\nHost: x\r\nUpgrade: tailscale-control-protocol\r\n"
        f"Connection: upgrade\r\nX-Tailscale-Handshake: {_INIT_B64}\r\nContent-Length: 0\r\n\r\n"
    ).encode(),
    "bad-upgrade": (
        "POST /ts2021 HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: upgrade\r\n"
        f"X-Tailscale-Handshake: {_INIT_B64}\r\nContent-Length: 0\r\n\r\n"
    ).encode(),
    "websocket": (
        "GET /ts2021?X-Tailscale-Handshake=" + _INIT_B64.replace("+", "%2B") + " HTTP/1.1\r\nHost: x\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: tailscale-control-protocol\r\n\r\n"
    ).encode(),
    "other-path": b"GET /api/v2/tailnet HTTP/1.1\r\nHost: x\r\n\r\n",
    "not-http": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),
    "eof": b"",
}
# (state, input) -> (the event, the state after).  "open": between requests (fresh, or
# after a keep-alive answer); "done": nothing more is read.
FRONT_TABLE: dict[tuple[str, str], tuple[type[up.FrontEvent], str]] = {
    ("open", "key"): (up.SendResponse, "open"),
    ("open", "key-bad-v"): (up.SendResponse, "open"),
    ("open", "key-close"): (up.SendResponse, "done"),
    ("open", "upgrade"): (up.Upgrade, "done"),
    ("open", "bad-upgrade"): (up.SendResponse, "done"),
    ("open", "websocket"): (up.WebSocketUpgrade, "done"),
    ("open", "other-path"): (up.HandOff, "done"),
    ("open", "not-http"): (up.HandOff, "done"),
    ("open", "eof"): (up.PeerClosed, "done"),
    **{("done", given): (up.PeerClosed, "done") for given in FRONT_INPUTS},
}
# How each state is reached from a fresh front (both kinds of "open", and "done" after
# a hand-off and after a closing answer; after an EOF the adapter reads no more).
FRONT_PATHS = {
    "fresh": ("open", ()),
    "after-a-key": ("open", ("key",)),
    "handed-off": ("done", ("other-path",)),
    "closed": ("done", ("key-close",)),
}


def _state_of(front: up.FrontConnection) -> str:
    """Open fronts wait for more bytes; done ones report the peer gone, for good."""
    return "open" if isinstance(front.next_event(), up.NeedData) else "done"


def test_the_front_table_covers_every_pair() -> None:
    assert set(FRONT_TABLE) == {(s, i) for s in ("open", "done") for i in FRONT_INPUTS}


@pytest.mark.parametrize(
    ("path", "given"), [(p, i) for p in FRONT_PATHS for i in FRONT_INPUTS],
    ids=[f"{p}-{i}" for p in FRONT_PATHS for i in FRONT_INPUTS],
)
def test_front_table_every_pair(path: str, given: str) -> None:
    state, prefix = FRONT_PATHS[path]
    front = up.FrontConnection(server_public=public_key(SERVER_KEY))
    for step in prefix:
        front.receive_data(FRONT_INPUTS[step])
        assert not isinstance(front.next_event(), up.NeedData)
    assert _state_of(front) == state
    expected, after = FRONT_TABLE[(state, given)]
    front.receive_data(FRONT_INPUTS[given])
    event = front.next_event()
    assert type(event) is expected, event
    if isinstance(event, up.SendResponse):
        assert event.close is (after == "done")
    assert _state_of(front) == after
