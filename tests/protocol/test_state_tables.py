"""The protocol's state machines, every (state, input) pair against its table.

Like the relay's connection table (tests/relay/test_server_core.py): each core keeps
an explicit ``_TRANSITIONS`` table and one ``advance`` step.  For every pair, a pair in
the table moves to its target, and a pair outside it raises without changing the
state: LocalProtocolError for a misuse, or the sticky peer error once the core has
failed.  Three machines: the HTTP/2-over-Noise server connection
(:mod:`protocol.h2_bridge`), the client connection (:mod:`protocol.client_conn`) and
one direction of the Noise transport (:mod:`protocol.noise.transport`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, NamedTuple

import pytest

from protocol import client_conn as cc
from protocol import h2_bridge as hb
from protocol.errors import LocalProtocolError, RemoteProtocolError
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
