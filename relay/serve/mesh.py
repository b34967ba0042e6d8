"""Mesh links: how the relays of one region learn each other's clients and forward to them.

Theory of operation
-------------------
Relays of a region that share a mesh key keep one link to each other relay
(``mesh_with`` in the :class:`~relay.serve.config.RelayConfig`, or
:meth:`relay.serve.server.RelayServer.add_mesh_peer` at run time).  A link is
an ordinary DERP client connection, logged in with the mesh key, that does two
things at once::

    peer relay ── PeerPresent / PeerGone ──▶ core.add_forwarder / remove_forwarder
    core ──▶ ForwardQueue ──▶ pump task ──▶ ForwardPacket frames ──▶ peer relay

* The **watch** side asks the peer for its connection list (``WatchConns``)
  and tells the core, key by key, which clients are reachable through this
  link; the core then routes packets for those keys to the link's
  :class:`~relay.derp.server.ForwardQueue` when the key is not connected
  locally.
* The **pump** task parks on a :class:`~relay.serve.derp_io.Wakeup` set by
  the queue and writes what it holds as ForwardPacket frames.

A link that cannot connect, or breaks, is retried every ``mesh_retry``
seconds, forever; on every break the core forgets all the keys it learnt
through it, so no packet waits on a dead link.  A link that turns out to lead
to this very relay (same public key) is dropped for good.

Cancellation: cancelling the task closes the link; the core forgets its keys.
"""

from __future__ import annotations

import logging

import trio

from ..client import DerpClient, connect_derp
from ..derp.client import PeerGoneReceived, PeerPresentReceived
from ..derp.server import ForwardQueue, RelayCore
from ..errors import RelayError
from .config import MeshPeer, RelayConfig
from .derp_io import Wakeup

__all__ = ["mesh_link"]

log = logging.getLogger("tailledger.relay")


async def _mesh_pump(client: DerpClient, fwd: ForwardQueue) -> None:
    """Write packets queued for a mesh peer as ForwardPacket frames."""
    wake = Wakeup()
    fwd.waker = wake.set
    while True:
        await wake.wait()
        data = fwd.take()
        if data:
            await client.send_raw(data)


async def mesh_link(core: RelayCore, config: RelayConfig, peer: MeshPeer, mesh_key: bytes) -> None:
    """Keep one watch+forward link to ``peer`` alive, forever.

    Args:
        core: the relay core that learns the peer's clients and queues packets for them.
        config: ``queue_depth``, ``handshake_timeout`` and ``mesh_retry`` are read from it.
        peer: the relay to link to.
        mesh_key: the region's mesh key.
    """
    while True:
        fwd = ForwardQueue(peer.url, depth=4 * config.queue_depth)
        try:
            client = await connect_derp(
                peer.url,
                core.private_key,
                cert_name=peer.cert_name,
                dial_host=peer.dial_host,
                mesh_key=mesh_key,
                connect_timeout=config.handshake_timeout,
            )
        except (OSError, RelayError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            # BrokenResourceError: the TLS handshake failed (trio wraps the SSL error),
            # e.g. the peer closed or reset the connection while it was restarting.
            log.warning("relay: mesh %s: connect failed: %r", peer.url, exc)
            await trio.sleep(config.mesh_retry)
            continue
        if client.server_public == core.public_key:
            log.info("relay: mesh %s is ourselves; not meshing with it", peer.url)
            await client.aclose()
            return
        log.info("relay: mesh link to %s up", peer.url)
        try:
            async with client, trio.open_nursery() as nursery:
                nursery.start_soon(_mesh_pump, client, fwd)
                await client.watch_conns()
                while True:
                    event = await client.recv()
                    if isinstance(event, PeerPresentReceived):
                        core.add_forwarder(event.present.key, fwd)
                    elif isinstance(event, PeerGoneReceived):
                        core.remove_forwarder(event.peer, fwd)
        except* (
            OSError,
            RelayError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ) as group:
            # The nursery wraps the reader's or the pump's error in a group.
            log.warning("relay: mesh link to %s broke: %r", peer.url, group.exceptions[0])
        finally:
            fwd.close()
            core.remove_forwarder_everywhere(fwd)
        await trio.sleep(config.mesh_retry)
