"""The churn phase: steady background change, each change timed to its receivers.

Theory of operation
-------------------
For ``--duration`` seconds, :func:`run_churn` makes a join or a delete
(alternately), a tag change and a policy edit at their rates. Before each change it
asks the policy engine, on a model of the live tailnet (``_ChurnModel``: the live
clients' users and tags), who must hear of it: who sees the newcomer, who saw the
deleted node, who sees the retagged node before or after, whose packet filter the
edit changes. Each change is a :class:`~cli.bench.loadgen.client.ChurnWatch` on the
hub; a receiver's latency is taken from the first update that carries it, and a node
outside the receivers that gets it counts as unexpected. Deliveries overlap, except
a policy edit's, which waits for the changes under way and holds the next ones back
(joins and tag changes change filters, too). The server's RSS is sampled every
second and its slope after the first minute reported.
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import trio

from projections.policy import (
    CompiledPolicy,
    PolicyNode,
    PolicyUser,
    Tailnet,
    compile_policy,
    parse_policy,
)

from ..scenarios import Scenario
from .client import ChurnWatch, Client, Hub
from .options import CHURN_KINDS, LoadgenOptions, Results
from .report import pct
from .server import Server, Span, proc_memory
from .workers import ParentHub

__all__ = ["rss_slope", "run_churn"]


#: How long a churn change may take to reach its receivers before it counts as missed.
_CHURN_TIMEOUT: Final = 30.0
#: A change stays watched this long after its last receiver, to catch late strays.
_CHURN_GRACE: Final = 0.5


@dataclass(eq=False)
class _ChurnModel:
    """The tailnet as the policy engine sees it: the live clients' users and tags.

    Node ids in the compiled policy are client index + 1, with synthetic addresses
    (the scenarios name no addresses, so who sees whom does not depend on them).
    """

    users: tuple[str, ...]
    live: dict[int, tuple[str, tuple[str, ...]]]
    policy: str

    def _compiled(self, text: str, live: Mapping[int, tuple[str, tuple[str, ...]]]) -> CompiledPolicy:
        users = [PolicyUser(id=i + 1, login=name, name=name) for i, name in enumerate(self.users)]
        uid = {name: i + 1 for i, name in enumerate(self.users)}
        nodes = [
            PolicyNode(id=i + 1, name=f"sim-{i}", user_id=uid[user], tags=tags,
                       ipv4=f"100.{64 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}", ipv6=f"fd7a:115c:a1e0::{i + 1:x}")
            for i, (user, tags) in sorted(live.items())
        ]
        return compile_policy(parse_policy(text), Tailnet(users, nodes))

    def peers(self, index: int, live: Mapping[int, tuple[str, tuple[str, ...]]] | None = None) -> frozenset[int]:
        """The clients that see client ``index`` (in ``live``, default the model's)."""
        compiled = self._compiled(self.policy, self.live if live is None else live)
        return frozenset(i - 1 for i in compiled.peer_id_set(index + 1))

    def filter_changes(self, text: str) -> frozenset[int]:
        """The live clients whose packet filter changes when the policy becomes ``text``."""
        a, b = self._compiled(self.policy, self.live), self._compiled(text, self.live)
        return frozenset(i for i in self.live if a.packet_filter(i + 1) != b.packet_filter(i + 1))


def rss_slope(samples: Sequence[tuple[float, float]], after: float) -> float | None:
    """Least-squares slope of (seconds, MiB) samples taken at or after ``after``, in
    MiB per minute (``None`` with fewer than 3 samples)."""
    pts = [(t, m) for t, m in samples if t >= after]
    if len(pts) < 3:
        return None
    mt = sum(t for t, _ in pts) / len(pts)
    mm = sum(m for _, m in pts) / len(pts)
    var = sum((t - mt) ** 2 for t, _ in pts)
    return None if var == 0 else 60 * sum((t - mt) * (m - mm) for t, m in pts) / var


async def _sample_rss(server: Server, t0: float, samples: list[tuple[float, float]]) -> None:
    """Append (seconds since ``t0``, server RSS MiB) every second until cancelled."""
    while True:
        samples.append((trio.current_time() - t0, proc_memory(server.pid)[0] / 2**20))
        await trio.sleep(1.0)


async def run_churn(
    server: Server, opts: LoadgenOptions, hub: Hub, clients: list[Client], n: int, updaters: set[int],
    nursery: trio.Nursery,
    results: Results, sc: Scenario, auth_keys: Mapping[int, str],
) -> None:
    """Steady background change for ``opts.duration`` seconds, each change timed to
    every node the policy engine says it concerns.

    The changes are made one at a time, in order (a join waits for the newcomer's own
    map, so it hears of later changes as updates); their deliveries overlap, except a
    policy edit's: it waits for the changes under way and nothing starts until it has
    reached its receivers (nearly every change also changes some packet filters, so
    a policy edit overlapping them could not tell whose filter it is).

    Clients 0 to n-1 were connected before (``clients`` here, or in ``--workers``
    processes); the newcomers run here. The sentinel (client 0) and the updaters never change.
    """
    rng = random.Random(opts.seed)
    base = len(sc.owners)
    live = {i: sc.node(i) for i in range(n)}
    model = _ChurnModel(sc.users, live, sc.policy_a)
    local = {c.index: c for c in clients}  # the clients of this process
    ids: dict[str, tuple[int, bytes]] = {}  # host name -> (node id, node key)
    done: dict[str, list[ChurnWatch]] = {k: [] for k in CHURN_KINDS}
    next_index = n
    busy: set[int] = set()  # targets of changes under way
    workers = hub.workers if isinstance(hub, ParentHub) else None

    async def node_id(index: int) -> tuple[int, bytes]:
        """The server's id and the node key of client ``index`` (host name ``sim-<index>``)."""
        if f"sim-{index}" not in ids:
            listed = await trio.to_thread.run_sync(server.admin, "nodes.list", {})
            assert isinstance(listed, list)
            # The admin view shows the key's hex, the protocol its "nodekey:" form.
            ids.update({str(v["hostname"]): (int(v["id"]), b"nodekey:" + str(v["node_key"]).encode())
                        for v in listed})
        return ids[f"sim-{index}"]

    async def follow(watch: ChurnWatch) -> None:
        with trio.move_on_after(_CHURN_TIMEOUT * opts.timeout_scale):
            await watch.done.wait()
            await trio.sleep(_CHURN_GRACE)
        hub.churn.remove(watch)
        if workers is not None:
            workers.send(("unchurn", id(watch)))
        if watch.exclude is not None:
            busy.discard(watch.exclude)
        done[watch.kind].append(watch)

    def start(watch: ChurnWatch, watchers: trio.Nursery) -> None:
        if watch.t0 != math.inf:
            return  # a registration retried after "try again": the clock runs already
        watch.t0 = trio.current_time()
        hub.churn.append(watch)
        if workers is not None:
            workers.publish_churn(watch)
        watchers.start_soon(follow, watch)

    def candidates(tagged: bool) -> list[int]:
        return [i for i in live
                if i not in busy and i != 0 and i not in updaters
                and (i not in local or local[i].has_map.is_set()) and bool(live[i][1]) == tagged]

    async def join(watchers: trio.Nursery) -> None:
        nonlocal next_index
        index, next_index = next_index, next_index + 1
        hub.auth_keys[index] = auth_keys[index % base]
        newcomer = Client(index, hub)
        after = {**live, index: sc.node(index)}
        receivers = await trio.to_thread.run_sync(functools.partial(model.peers, index, after))
        watch = ChurnWatch("join", receivers & set(live), key=newcomer.marker, exclude=index)
        newcomer.on_register = lambda: start(watch, watchers)
        hub.register_target = hub.registered + 1
        busy.add(index)
        nursery.start_soon(newcomer.run)
        with trio.move_on_after(10 * opts.timeout_scale):
            await newcomer.has_map.wait()
        live[index] = sc.node(index)
        local[index] = newcomer

    async def delete(watchers: trio.Nursery) -> None:
        pool = candidates(False) + candidates(True)
        if not pool:
            return
        victim = rng.choice(pool)
        nid, _ = await node_id(victim)
        receivers = await trio.to_thread.run_sync(model.peers, victim)
        if victim in local:
            local[victim].scope.cancel()
        elif workers is not None:
            workers.send(("cancel", victim))
        del live[victim]
        busy.add(victim)
        watch = ChurnWatch("delete", receivers, node_id=nid, exclude=victim)
        start(watch, watchers)
        await trio.to_thread.run_sync(server.admin, "nodes.delete", {"node": str(nid)})

    async def retag(watchers: trio.Nursery) -> None:
        pool = candidates(True)
        if not pool:
            return
        target = rng.choice(pool)
        user, (tag,) = live[target][0], live[target][1][:1]
        new = f"tag:svc{(int(tag.removeprefix('tag:svc')) + 1) % 20}"
        nid, key = await node_id(target)
        before = await trio.to_thread.run_sync(model.peers, target)
        live[target] = (user, (new,))
        after = await trio.to_thread.run_sync(model.peers, target)
        busy.add(target)
        watch = ChurnWatch("tag", before | after, key=key, node_id=nid, exclude=target)
        start(watch, watchers)
        await trio.to_thread.run_sync(server.admin, "nodes.tag", {"node": str(nid), "tags": [new]})

    async def edit(watchers: trio.Nursery) -> None:
        text = sc.policy_b if model.policy == sc.policy_a else sc.policy_a
        while hub.churn:  # let the changes under way finish (or time out)
            await trio.sleep(0.05)
        receivers = await trio.to_thread.run_sync(model.filter_changes, text)
        model.policy = text
        watch = ChurnWatch("policy", receivers)
        start(watch, watchers)
        await trio.to_thread.run_sync(server.admin, "policy.set", {"text": text})
        while watch in hub.churn:
            await trio.sleep(0.05)

    results["last_phase"] = "churn"
    samples: list[tuple[float, float]] = []
    span = Span(server)
    t0 = trio.current_time()
    due = {"join_delete": t0 + opts.join_delete_every, "tag": t0 + opts.tag_every, "policy": t0 + opts.policy_every}
    every = {"join_delete": opts.join_delete_every, "tag": opts.tag_every, "policy": opts.policy_every}
    joining = True
    async with trio.open_nursery() as watchers:
        watchers.start_soon(_sample_rss, server, t0, samples)
        while True:
            pending = {k: t for k, t in due.items() if every[k] > 0}
            if not pending:
                break
            kind = min(pending, key=pending.__getitem__)
            if pending[kind] >= t0 + opts.duration:
                break
            await trio.sleep_until(pending[kind])
            if kind == "join_delete":
                await (join if joining else delete)(watchers)
                joining = not joining
            elif kind == "tag":
                await retag(watchers)
            else:
                await edit(watchers)
            # A late change does not make the next ones burst to catch up.
            due[kind] = max(due[kind] + every[kind], trio.current_time())
        while hub.churn:
            await trio.sleep(0.05)
        watchers.cancel_scope.cancel()
    if workers is not None:
        await workers.collect()  # their churn_bytes
    results["churn_loadgen_cpu_s"] = time.process_time() - span.own0
    results["churn_duration_s"] = span.close(results, "churn")
    after = min(60.0, opts.duration / 2)
    results["churn_rss_samples"] = len(samples)
    results["churn_rss_first_mib"] = samples[0][1] if samples else None
    results["churn_rss_last_mib"] = samples[-1][1] if samples else None
    results["churn_rss_slope_from_s"] = after
    results["churn_rss_slope_mib_per_min"] = rss_slope(samples, after)
    changes = sum(len(w) for w in done.values())
    results["churn_changes"] = changes
    results["churn_kib_per_change"] = hub.churn_bytes / 1024 / max(changes, 1)
    everything: list[float] = []
    expected_all = 0
    for kind, watches in done.items():
        lat = [x for w in watches for x in w.latencies]
        expected = sum(len(w.receivers) for w in watches)
        everything += lat
        expected_all += expected
        results[f"churn_{kind}_count"] = len(watches)
        results[f"churn_{kind}_expected"] = expected
        results[f"churn_{kind}_reached"] = len(lat)
        results[f"churn_{kind}_unexpected"] = sum(w.unexpected for w in watches)
        results[f"churn_{kind}_p50_ms"] = pct(lat, expected, 0.5)
        results[f"churn_{kind}_p99_ms"] = pct(lat, expected, 0.99)
        results[f"churn_{kind}_max_ms"] = pct(lat, expected, 1.0)
    results["churn_expected"] = expected_all
    results["churn_reached"] = len(everything)
    results["churn_unexpected"] = sum(w.unexpected for ws in done.values() for w in ws)
    results["churn_p50_ms"] = pct(everything, expected_all, 0.5)
    results["churn_p99_ms"] = pct(everything, expected_all, 0.99)
    results["churn_max_ms"] = pct(everything, expected_all, 1.0)
