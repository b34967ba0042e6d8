"""Error hierarchy of the control-protocol transport (style rule 20).

Role in the pipeline: every sans-I/O core in :mod:`protocol` (Noise handshake,
Noise transport records, the HTTP/1.1 front, the HTTP/2 bridge, the client
connection) reports failures with exactly these classes, so that the trio
adapters can translate them at one boundary: "log the reason and close the
connection" for the peer's garbage, "log loudly, this is our bug" for local
misuse.

The split follows h11: :class:`LocalProtocolError` means *we* tried to do
something the protocol forbids (send on a poisoned transport, send a second
handshake, ...), :class:`RemoteProtocolError` means the *peer* sent bytes that
violate the protocol (bad tag, oversized frame, garbage HTTP/2, ...). Both
derive from :class:`ProtocolError` so that an adapter can catch the family.

Invariants:

* Cores raise only these classes (plus ``ValueError``/``TypeError`` for
  programming errors in arguments, never for peer input). A Hypothesis test
  drives the server core with random bytes and asserts exactly that.
* Errors are *sticky*: once a core raised a :class:`ProtocolError` it stays in a
  terminal state and raises again on further use, like Go's
  ``controlbase.Conn`` poisons itself after any read or write failure.
"""

from __future__ import annotations

__all__ = [
    "HandshakeError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
]


class ProtocolError(Exception):
    """Base class: the control-protocol transport cannot continue.

    Attributes:
        reason: Short human-readable reason, safe to log. It never contains
            attacker-controlled bytes verbatim beyond a short ``repr`` prefix.
        http_status: The HTTP status an adapter should answer with if it is
            still able to send an HTTP/1.1 response (the front, before the
            101), else ``None``. Mirrors h11's ``error_status_hint``.
    """

    def __init__(self, reason: str, *, http_status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.http_status = http_status

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r})"


class LocalProtocolError(ProtocolError):
    """We (the caller of a core) violated the protocol or used a dead core."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that violate the protocol; close the connection."""


class HandshakeError(RemoteProtocolError):
    """The Noise IK handshake failed (bad size, type, length or tag).

    A server may answer with a Noise error message (type ``0x03``) before
    closing; see :func:`protocol.noise.messages.encode_error`. Real clients do
    not depend on it (Go's server never flushes it, docs/control-protocol.md §4.2).
    """
