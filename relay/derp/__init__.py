"""DERP protocol pieces without I/O: the wire codec, the relay core, the client protocol.

``frames`` encodes and decodes frames, ``server`` is the relay core (login,
routing, bounded queues, mesh registry), ``client`` is the client-side login and
event decoder.  The trio adapters that drive them live one level up, in
:mod:`relay.serve` and :mod:`relay.client`.
"""

from .client import ClientEvent, ClientProtocol
from .frames import PROTOCOL_VERSION, FrameDecoder, FrameType, PeerGoneReason, PeerPresentFlags
from .server import DropReason, ForwardQueue, PacketForwarder, RelayCore, RelayStats, ServerConn

__all__ = [
    "PROTOCOL_VERSION",
    "ClientEvent",
    "ClientProtocol",
    "DropReason",
    "ForwardQueue",
    "FrameDecoder",
    "FrameType",
    "PacketForwarder",
    "PeerGoneReason",
    "PeerPresentFlags",
    "RelayCore",
    "RelayStats",
    "ServerConn",
]
