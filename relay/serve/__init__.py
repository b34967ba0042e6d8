"""The relay's trio adapter: listeners, TLS, HTTP front, DERP streams, STUN, mesh links.

Role in the pipeline
--------------------
This package owns every socket, deadline and task of the relay; all decisions
are delegated to the sans-I/O pieces (:mod:`relay.http_front`,
:mod:`relay.derp.server`, :mod:`relay.stun`).  Its one entry point, which the
CLI glue calls whether the relay runs embedded in ``tailledger serve`` or
alone as ``tailledger relay``, is :func:`serve_relay`::

    async with trio.open_nursery() as nursery:
        relay = await nursery.start(serve_relay, config, authorizer)
        region = relay.derp_region(host_name="derp.example.com")  # for the DERP map
        ...
        relay.revoke(node_key)          # a node lost its authorization
        nursery.cancel_scope.cancel()   # shut everything down

Modules (each opens with its theory of operation)::

    config.py    RelayConfig, MeshPeer: the frozen settings (no I/O)
    identity.py  DERP key, TLS certificate, mesh key, read at startup
    server.py    serve_relay, RelayServer, the HTTP front door (TLS + h11)
    derp_io.py   one DERP stream's reader and writer, the direct-write path,
                 the keep-alive ticker and the write-timeout watchdog
    mesh.py      links to the other relays of the region
    stun_io.py   the STUN server's UDP sockets

Task layout (structured concurrency, rule 19)::

    serve_relay ─┬─ TCP listener(s) ── one task per connection        (server.py)
                 │                      ├─ TLS handshake + HTTP request (deadline)
                 │                      └─ DERP: reader task + writer task (derp_io.py)
                 ├─ STUN (serve_stun) ── one UDP socket per address family (stun_io.py)
                 ├─ keep-alive ticker and write-timeout watchdog (one each, for all clients)
                 └─ one task per mesh peer (reconnects forever) + its ForwardPacket pump (mesh.py)

Cancellation: cancelling the nursery that started :func:`serve_relay` closes
all listeners and connections; nothing outlives it.
"""

from .config import MeshPeer, RelayConfig
from .derp_io import IoStats
from .server import HttpStats, RelayServer, serve_relay
from .stun_io import StunServer, StunStats, serve_stun

__all__ = [
    "HttpStats",
    "IoStats",
    "MeshPeer",
    "RelayConfig",
    "RelayServer",
    "StunServer",
    "StunStats",
    "serve_relay",
    "serve_stun",
]
