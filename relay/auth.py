"""Who may use the relay: the :class:`Authorizer` port and two simple implementations.

The relay admits a client only if its node public key is authorized.  In
production the answer comes from the event log: the CLI glue runs a consumer
that tails the log, keeps the set of currently authorized node keys in memory,
and implements :class:`Authorizer` over that set.  When a node is deleted,
expired or has its key rotated, the consumer calls
:meth:`relay.RelayServer.revoke` (or :meth:`relay.RelayServer.reauthorize`
after a batch) so that connections already open are closed too.

Contract for implementations
----------------------------
* ``is_authorized`` is called synchronously on the relay's event loop during
  every login (and for every client on ``reauthorize``).  It must be a cheap,
  non-blocking lookup: no I/O, no awaiting.  An in-memory set is the intended
  shape.
* It is never called for mesh peers: a client that proves the region's mesh
  key is another relay of ours, not a tailnet node (Tailscale's derper does the
  same).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from .keys import KEY_LEN

__all__ = ["AllowAll", "Authorizer", "StaticAuthorizer"]


class Authorizer(Protocol):
    """Decides whether a node key may connect to (and stay on) the relay."""

    def is_authorized(self, node_key: bytes) -> bool:
        """Return ``True`` if the node with this 32-byte public key may use the relay."""
        ...


class AllowAll:
    """Admit every client.  For tests, benchmarks and a relay in front of an open tailnet."""

    def is_authorized(self, node_key: bytes) -> bool:
        """Always ``True``."""
        return True


class StaticAuthorizer:
    """Admit exactly the keys in a set; the set can change at run time.

    Changing the set does not disconnect anyone by itself: call
    :meth:`relay.RelayServer.revoke` or :meth:`relay.RelayServer.reauthorize`
    afterwards, exactly as the event-log consumer does.

    Args:
        keys: initial authorized 32-byte node public keys.

    Raises:
        ValueError: a key is not 32 bytes long.
    """

    def __init__(self, keys: Iterable[bytes] = ()) -> None:
        self._keys: set[bytes] = set()
        for key in keys:
            self.allow(key)

    def allow(self, node_key: bytes) -> None:
        """Add ``node_key`` to the authorized set."""
        if len(node_key) != KEY_LEN:
            raise ValueError(f"node key must be {KEY_LEN} bytes")
        self._keys.add(bytes(node_key))

    def deny(self, node_key: bytes) -> None:
        """Remove ``node_key`` from the authorized set (no error if absent)."""
        self._keys.discard(bytes(node_key))

    def is_authorized(self, node_key: bytes) -> bool:
        """Return whether ``node_key`` is in the set."""
        return node_key in self._keys

    def __len__(self) -> int:
        return len(self._keys)
