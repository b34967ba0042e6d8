"""Trio adapter of the control port: ``/key``, ``/ts2021``, DERP and hypercorn on one socket.

Role in the pipeline
--------------------
This package owns the listening sockets, the per-connection tasks, the
deadlines and the hypercorn hand-off of the control port.  Every protocol
decision is made by the sans-I/O cores: :class:`protocol.upgrade.FrontConnection`
(the HTTP/1.1 front) and :class:`protocol.h2_bridge.ServerConnection` (Noise +
HTTP/2); requests inside the tunnel go to a :class:`~protocol.handler.ControlHandler`.
Its entry point, which the CLI calls, is :func:`serve_control`::

    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(
            serve_control, host="0.0.0.0", port=443, server_key=key,
            handler=control, asgi_app=web_app, options=ServeOptions(...),
        ))
        ...
        nursery.cancel_scope.cancel()   # stop: connections, then the ASGI shutdown

One registration's bytes, from socket to handler::

    accept.py   accept_loop ─ Admission (connection caps) ─▶ handle_stream
    server.py   TLS? ─ front door (FrontConnection) ─ /ts2021 upgrade
    session.py  open_session (Noise handshake) ─▶ NoiseSession: reader ─ core ─ handler task
    idle.py     (while idle) the reader parks in the shared IdleReaders set

Modules (each opens with its theory of operation)::

    config.py   ServeOptions, ConnectionStats and the names of its counters (no I/O)
    accept.py   the accept loop, the connection caps, the peer's name
    server.py   serve_control, ControlServer, DerpRoute, the front door of a connection
    handoff.py  hypercorn (lifespan, per-connection driver, /key shim) and the
                replay streams that give it, or the DERP relay, the bytes already read
    session.py  the Noise session: handshake, reader, writes, handler tasks, deadlines
    idle.py     the idle-reader set: one epoll task for every idle tunnel

Task layout (structured concurrency)::

    ControlServer.serve ─┬─ hypercorn lifespan (shielded; shut down last)     (handoff.py)
                         └─ connection nursery
                              ├─ IdleReaders.run (one, Linux)                   (idle.py)
                              ├─ accept_loop (one per listener)                 (accept.py)
                              ├─ handle_stream (one per connection being set up,
                              │    or served by hypercorn or the DERP relay)    (server.py)
                              ├─ NoiseSession.serve (one per tunnel, unless parked)
                              └─ NoiseSession._serve_request (one per stream
                                   being answered; none for a parked long poll) (session.py)

Cancellation: cancelling :meth:`ControlServer.serve` closes the listeners and
every connection; nothing outlives it.
"""

from .config import (
    LOOPBACK_NETWORKS,
    REFUSAL_REASONS,
    SLOW_READER_KINDS,
    TIMEOUT_KINDS,
    ConnectionStats,
    ServeOptions,
)
from .handoff import ASGIApp, with_key_endpoint
from .server import ControlServer, DerpRoute, load_ssl_context, serve_control

__all__ = [
    "LOOPBACK_NETWORKS",
    "REFUSAL_REASONS",
    "SLOW_READER_KINDS",
    "TIMEOUT_KINDS",
    "ASGIApp",
    "ConnectionStats",
    "ControlServer",
    "DerpRoute",
    "ServeOptions",
    "load_ssl_context",
    "serve_control",
    "with_key_endpoint",
]
