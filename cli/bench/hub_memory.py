"""``tailledger bench hub --memory``: what the map hub and its streams hold (issue 19).

::

    tailledger bench hub --scenario corp --nodes 2000 --memory

The in-process half of "memory per idle node": no connections, no transport, so what
grows with the peers a node sees can be told apart from what each connection costs
(``tailledger bench conn-memory`` measures that side). With ``--memory``,
:mod:`cli.bench.hub` runs under ``tracemalloc`` and, at each step, prints what the
step left allocated -- per node, by allocation site (the innermost frame outside the
standard library, and the innermost frame of this repository that led to it, as in
:mod:`cli.bench.conn_memory`) and by file:

1. the log and the state of ``n`` registered nodes;
2. the hub advanced once (a peer set per visibility class, the compiled policy);
3. every stream's full map, framed and compressed as the server does, and its cursor;
4. each change (join, tag, delete, policy) and every stream's update after it.

After the full maps it also prints a census of the structures whose count should
follow the classes, not the nodes x peers: the peer sets alive, the distinct
:class:`~projections.mapviews.peersets.Peer` objects and their JSON, the transport's
full-map pieces and their compressed frames, and the compiled policy's per-node
caches. It reads private attributes to count them: a benchmark looks inside.

Tracing slows the run several times; the CPU figures of a ``--memory`` run are not
comparable with a plain one.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections import Counter
from collections.abc import Iterable

from projections.mapviews.cursor import StreamCursor
from projections.mapviews.hub import MapHub
from projections.mapviews.peersets import Peer
from protocol import MapWire

from .conn_memory import SiteTable, allocation_sites

__all__ = ["MemoryProbe", "census"]


class MemoryProbe:
    """Traces allocations and prints, at each :meth:`mark`, what was left allocated
    since the previous mark, per node."""

    def __init__(self, nodes: int, *, frames: int = 6, top: int = 12) -> None:
        self.nodes = nodes
        self.top = top
        tracemalloc.start(frames)
        self._last = self._sample()
        self._first_total = self._total(self._last)

    @staticmethod
    def _sample() -> SiteTable:
        gc.collect()
        return allocation_sites(tracemalloc.take_snapshot())

    @staticmethod
    def _total(table: SiteTable) -> int:
        return sum(table.sizes.values())

    def mark(self, label: str, nodes: int | None = None) -> None:
        """Print what was allocated since the last mark (per ``nodes``, default the
        tailnet's size), by site and by file."""
        n = nodes or self.nodes
        now = self._sample()
        sizes = now.sizes.copy()
        sizes.subtract(self._last.sizes)
        counts = now.counts.copy()
        counts.subtract(self._last.counts)
        step = sum(sizes.values())
        total = self._total(now) - self._first_total
        print(
            f"  memory: {label}: {step / 2**20:+.1f} MiB ({step / n / 1024:+.2f} KiB per node); "
            f"since the start {total / 2**20:.1f} MiB ({total / self.nodes / 1024:.2f} KiB per node)",
            flush=True,
        )
        files: Counter[str] = Counter()
        for (site, _via), size in sizes.items():
            files[site.rsplit(":", 1)[0]] += size
        shown = [(name, size) for name, size in files.most_common(self.top // 2) if size > n]
        for name, size in shown:
            print(f"    {size / n / 1024:8.2f} KiB/node  {name}")
        print("    top sites (KiB and blocks per node):")
        for (site, via), size in sizes.most_common(self.top):
            if size <= n:
                break
            via_text = f"  via {via}" if via and via != site else ""
            print(f"    {size / n / 1024:8.2f} {counts[(site, via)] / n:8.1f}  {site}{via_text}")
        self._last = now

    def stop(self) -> None:
        tracemalloc.stop()


def census(hub: MapHub, wire: MapWire, cursors: Iterable[StreamCursor]) -> None:
    """Print how many of the structures that could grow with nodes x peers exist."""
    assert hub.state is not None and hub.compiled is not None
    nodes = list(hub.state.nodes)
    n = max(len(nodes), 1)
    current = {id(ps): ps for ps in (hub.peer_set(nid) for nid in nodes)}
    held = {id(c.peers): c.peers for c in cursors if c.peers is not None}
    pairs = sum(len(ps.peers) for ps in current.values())
    peers: dict[int, Peer] = {}
    for ps in (*current.values(), *held.values()):
        for peer in ps.peers.values():
            peers[id(peer)] = peer
    by_node = Counter(p.node.id for p in peers.values())
    views = {id(p.view) for p in peers.values()}
    print(
        f"  census: {len(current)} current peer sets (classes {hub.classes()}), "
        f"{len(set(held) - set(current))} older versions held by cursors, "
        f"{pairs} class x peer entries ({pairs / n:.0f} per node)"
    )
    print(
        f"    {len(peers)} distinct Peer objects for {len(by_node)} nodes "
        f"(max {max(by_node.values(), default=0)} per node), {len(views)} distinct views"
    )
    json_bytes = sum(len(b) for b in wire._peers.values())
    print(f"    transport: {len(wire._peers)} peer JSON ({json_bytes / 2**20:.1f} MiB), "
          f"{len(wire._messages)} encoded messages")
    chunks: dict[int, object] = {}
    frame_bytes = joined = 0
    for pieces in wire._pieces.values():
        for piece in pieces.chunks:
            if id(piece) not in chunks:
                chunks[id(piece)] = piece
                frame_bytes += len(piece._frame or b"")
                joined += sum(len(p) for p in piece.parts)
    print(f"    transport: {len(wire._pieces)} full-map piece sets, {len(chunks)} distinct pieces, "
          f"{frame_bytes / 2**20:.1f} MiB compressed frames of {joined / 2**20:.1f} MiB peer JSON")
    compiled = hub.compiled
    sizes = {
        "filters": len(compiled._filters),
        "peer_sets": len(compiled._peer_sets),
        "peer_set entries": sum(len(s) for s in compiled._peer_sets.values()),
        "reaches": len(compiled._reaches),
        "plain_views": len(compiled._plain_views),
        "netmaps": len(compiled._netmaps),
        "unreduced": len(compiled._unreduced),
        "matches": len(compiled._matches),
    }
    print("    compiled policy caches: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))

