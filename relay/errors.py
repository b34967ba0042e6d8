"""Error hierarchy of the ``relay`` package (DERP relay, STUN server, TLS setup).

Every error the relay raises derives from :class:`RelayError`, so an embedding
program can tell "the relay failed" apart from its own bugs with one ``except``.

The protocol errors follow h11's split (style rule 20):

* :class:`LocalProtocolError` — *we* were asked to do something the protocol
  forbids (encode an oversized packet, send before login). It is a bug in the
  caller and is never caused by a peer.
* :class:`RemoteProtocolError` — the peer sent bytes that break the protocol
  (a frame longer than the limit, a ClientInfo box that does not open, a short
  SendPacket). The adapter's answer is always the same: log the reason and close
  *that* connection; other connections are never affected.

STUN parsing has its own sentinel errors (as in Tailscale's ``net/stun``), all
subclasses of :class:`StunError`, so the UDP adapter can silently ignore
datagrams that are not STUN at all while still counting malformed ones.
"""

from __future__ import annotations

__all__ = [
    "BadFingerprintError",
    "ConfigError",
    "ConnectionClosedError",
    "LocalProtocolError",
    "MalformedAttributesError",
    "NotBindingRequestError",
    "NotStunError",
    "ProtocolError",
    "RelayError",
    "RemoteProtocolError",
    "StunError",
    "UnauthorizedError",
]


class RelayError(Exception):
    """Base class of every error raised by the ``relay`` package."""


class ConfigError(RelayError):
    """The relay configuration is unusable (bad key file, missing cert, bad mesh key)."""


class ProtocolError(RelayError):
    """A DERP protocol violation; abstract, use one of the two subclasses."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the DERP protocol does not allow (a caller bug)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that violate the DERP protocol; close that connection."""


class UnauthorizedError(RemoteProtocolError):
    """The client's node key is not authorized to use this relay.

    Raised on the *client* side when the server closes the connection during
    login instead of answering with a ServerInfo frame, and used on the server
    side as the close reason recorded for refused clients.
    """


class ConnectionClosedError(RelayError):
    """The DERP connection ended (EOF, reset, or closed by us) while a caller waited on it."""


class StunError(RelayError):
    """A datagram could not be handled as a STUN binding request or response."""


class NotStunError(StunError):
    """The datagram is not a STUN message (wrong magic cookie, too short, top bits set)."""


class NotBindingRequestError(StunError):
    """The datagram is STUN, but not a binding request (or, when parsing replies, not a success)."""


class MalformedAttributesError(StunError):
    """A STUN attribute runs past the end of the message or has an impossible length."""


class BadFingerprintError(StunError):
    """The FINGERPRINT attribute is present but does not match the message's CRC-32."""
