"""The Tailscale control-protocol ("ts2021") transport.

Role in the pipeline: everything between a TCP socket and the control logic
(the package ``protocol/control/``): the HTTP/1.1 front (``/key``, the ``/ts2021``
upgrade, hand-off of all other requests to hypercorn), the Noise IK handshake
and records, the early payload, HTTP/2 inside the tunnel, map-stream framing,
and a client for tests and load generation.

Layers, bottom-up (sans-I/O cores unless marked *adapter*):

* :mod:`.noise` -- controlbase messages, handshake, transport records.
* :mod:`.upgrade` -- HTTP/1.1 front and the client's upgrade request.
* :mod:`.early`, :mod:`.mapframe` -- early payload; ``[u32 LE][zstd]`` frames.
* :mod:`.mapwire` -- map messages (values from ``projections.mapviews``) to
  bytes, each shared message and full-map piece encoded and framed once.
* :mod:`.compat` -- every reliance on h2, hpack, hyperframe and hypercorn
  internals (compact HTTP/2 structures, the hypercorn hand-off), guarded and pinned.
* :mod:`.h2flow`, :mod:`.h2_bridge`, :mod:`.client_conn` -- HTTP/2 over Noise.
* :mod:`.handler` -- :class:`NoiseRequest`, :class:`NoiseResponse`,
  :class:`ControlHandler`: the interface the control logic implements.
* :mod:`.serve` (*adapter*) -- :func:`serve_control`.
* :mod:`.client` (*adapter*) -- :func:`open_control_client`.

Below them all, the bottom package :mod:`wire` carries ``/ts2021`` over
WebSocket (:class:`wire.wsstream.WebSocketStream`, shared with the relay).

Above the transport, the control logic that answers inside the tunnel (trio
adapters, except the token buckets):

* :mod:`.control` -- the :class:`ControlHandler` of ``/machine/register`` and
  ``/machine/map`` (its modules are listed in its own docstring).
* :mod:`.registrations` -- pending interactive registrations, kept beside the log.
* :mod:`.ha` -- route failover and the approvals a policy change implies.
* :mod:`.sshcheck` -- Tailscale SSH check mode; :mod:`.ratelimit` -- token buckets.

Other packages import only the names below (style rule 3).

References in this tree of the form "control-protocol.md §N" and "pitfall N"
point to ``docs/control-protocol.md`` (its sections and its numbered pitfalls, §12).
"""

from .client import (
    ClientResponse,
    ControlClient,
    MapStream,
    ResponseStream,
    fetch_server_key,
    open_control_client,
)
from .errors import HandshakeError, LocalProtocolError, ProtocolError, RemoteProtocolError
from .handler import ControlHandler, NoiseRequest, NoiseResponse, Park
from .mapframe import (
    KEEPALIVE_FRAME_RAW,
    KEEPALIVE_FRAME_ZSTD,
    KEEPALIVE_JSON,
    MapFrameDecoder,
    frame_map_response,
    keepalive_frame,
)
from .mapwire import MapWire
from .noise import Keypair, generate_private_key, public_key
from .serve import (
    ConnectionStats,
    ControlServer,
    DerpRoute,
    ServeOptions,
    load_ssl_context,
    serve_control,
    with_key_endpoint,
)

__all__ = [
    "KEEPALIVE_FRAME_RAW",
    "KEEPALIVE_FRAME_ZSTD",
    "KEEPALIVE_JSON",
    "ClientResponse",
    "ConnectionStats",
    "ControlClient",
    "ControlHandler",
    "ControlServer",
    "DerpRoute",
    "HandshakeError",
    "Keypair",
    "LocalProtocolError",
    "MapFrameDecoder",
    "MapStream",
    "MapWire",
    "NoiseRequest",
    "NoiseResponse",
    "Park",
    "ProtocolError",
    "RemoteProtocolError",
    "ResponseStream",
    "ServeOptions",
    "fetch_server_key",
    "frame_map_response",
    "generate_private_key",
    "keepalive_frame",
    "load_ssl_context",
    "open_control_client",
    "public_key",
    "serve_control",
    "with_key_endpoint",
]
