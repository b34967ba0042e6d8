"""The embedded DERP relay and STUN server of tailledger.

What it is
----------
A DERP relay (protocol version 2, the one every current Tailscale client
speaks) plus an RFC 5389 STUN server, served by its own trio listener.  It can
run inside ``tailledger serve`` or alone as ``tailledger relay``; both call
:func:`serve_relay`.  Only nodes the :class:`Authorizer` accepts may connect;
in production that is a consumer of the event log.

Layout (sans-I/O cores, thin trio adapters; style rule 2)::

    derp/frames.py   wire codec          derp/server.py  relay core (routing, queues)
    derp/client.py   client protocol     stun.py         STUN parse/build
    http_front.py    HTTP routing        keys.py         Curve25519 + NaCl box
    auth.py          Authorizer port     certs.py        key/cert files (sync I/O)
    serve/           trio adapter: listeners, TLS, DERP streams, STUN, mesh
    client.py        trio DERP client
    fetch.py         fetch a DERP map URL

Embedding::

    relay = await nursery.start(serve_relay, RelayConfig(data_dir=...), authorizer)
    region = relay.derp_region(host_name="derp.example.com")   # for the DERP map
    relay.revoke(node_key)                                      # authorization lost

Imports: ``relay`` may use ``projections`` (the DERP map types) and ``wire`` (the
stream helpers it shares with ``protocol``), never ``protocol``.
"""

from .auth import AllowAll, Authorizer, StaticAuthorizer
from .certs import cert_name_for
from .client import DerpClient, connect_derp
from .derp.frames import PROTOCOL_VERSION
from .derp.server import DropReason, RelayStats
from .errors import (
    ConfigError,
    ConnectionClosedError,
    ProtocolError,
    RelayError,
    RemoteProtocolError,
    UnauthorizedError,
)
from .fetch import DerpMapFetchError, fetch_derp_map
from .keys import format_node_key, generate_private_key, parse_node_key, public_key_of
from .serve import (
    HttpStats,
    IoStats,
    MeshPeer,
    RelayConfig,
    RelayServer,
    StunServer,
    StunStats,
    serve_relay,
    serve_stun,
)

__all__ = [
    "PROTOCOL_VERSION",
    "AllowAll",
    "Authorizer",
    "ConfigError",
    "ConnectionClosedError",
    "DerpClient",
    "DerpMapFetchError",
    "DropReason",
    "HttpStats",
    "IoStats",
    "MeshPeer",
    "ProtocolError",
    "RelayConfig",
    "RelayError",
    "RelayServer",
    "RelayStats",
    "RemoteProtocolError",
    "StaticAuthorizer",
    "StunServer",
    "StunStats",
    "UnauthorizedError",
    "cert_name_for",
    "connect_derp",
    "fetch_derp_map",
    "format_node_key",
    "generate_private_key",
    "parse_node_key",
    "public_key_of",
    "serve_relay",
    "serve_stun",
]
