"""Tailscale ``controlbase``: Noise IK handshake and transport records (sans-I/O).

Submodules:

* :mod:`.messages` -- byte layouts of the four message types.
* :mod:`.handshake` -- the IK handshake, responder and initiator.
* :mod:`.transport` -- sealed records with the big-endian nonce.
"""

from .handshake import (
    PROLOGUE_PREFIX,
    PROTOCOL_NAME,
    ClientHandshake,
    Keypair,
    SessionKeys,
    generate_private_key,
    prologue,
    public_key,
    respond,
)
from .messages import (
    INITIATION_LEN,
    MAX_MESSAGE_SIZE,
    MAX_PLAINTEXT_SIZE,
    RESPONSE_LEN,
    MessageType,
    encode_error,
)
from .transport import NoiseTransport

__all__ = [
    "INITIATION_LEN",
    "MAX_MESSAGE_SIZE",
    "MAX_PLAINTEXT_SIZE",
    "PROLOGUE_PREFIX",
    "PROTOCOL_NAME",
    "RESPONSE_LEN",
    "ClientHandshake",
    "Keypair",
    "MessageType",
    "NoiseTransport",
    "SessionKeys",
    "encode_error",
    "generate_private_key",
    "prologue",
    "public_key",
    "respond",
]
