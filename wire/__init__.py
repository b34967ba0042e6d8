"""Byte-moving helpers that the control protocol and the relay share.

Role in the pipeline: :mod:`protocol` (the control port) and :mod:`relay`
(the DERP relay) are peers: neither may import the other
(``tests/test_packaging.py``). Yet both accept TCP connections, look through
TLS and WebSocket layers, and carry a byte-stream protocol over WebSocket
messages. What they would otherwise each write once lives here, below both::

    wire <- eventlog <- projections <- protocol, relay <- cli

``wire`` sits at the bottom: it imports nothing of ours, and any package may
import it (today the adapters of :mod:`protocol` and :mod:`relay` do).

Theory of operation
-------------------
Everything here works on *streams*, not on protocols: a module of ``wire``
knows trio's stream interface, sockets and WebSocket framing, and nothing
about Noise, HTTP/2, DERP or the event log. A helper joins ``wire`` when both
sides need the same thing and the layering rule leaves no lower common
home; a helper that only one side uses stays on that side, even when it is
about bytes on the wire (the HTTP/2 events shared by the control client and
server live in :mod:`protocol.h2flow`, because only the control protocol
speaks HTTP/2).

Modules (all thin trio adapters: each imports trio, so no sans-I/O core may
import them, and ``tests/test_packaging.py`` names each in ``IO_ADAPTERS``):

* :mod:`wire.wsstream` -- :class:`~wire.wsstream.WebSocketStream`, a
  :class:`trio.abc.Stream` whose bytes travel in binary WebSocket messages
  (``/ts2021`` over WebSocket; DERP over WebSocket).
* :mod:`wire.sockets` -- the socket under a stream:
  :func:`~wire.sockets.peer_address` (as data: the control port's
  per-address cap, the relay core's ``(ip, port)``),
  :func:`~wire.sockets.peer_name` (for log lines, both sides alike), and the
  direct-write fast path, :func:`~wire.sockets.plain_socket` and
  :func:`~wire.sockets.write_nowait` (one non-blocking ``write(2)`` when
  nobody else is writing; the rest goes to the caller's blocking path).

Import from the modules, not from this package: it re-exports nothing, so the
sans-I/O guard sees exactly which adapter a module uses.
"""
