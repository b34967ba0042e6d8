"""The churn phase: steady background change, each change timed to its receivers.

Theory of operation
-------------------
For ``--duration`` seconds, :func:`run_churn` makes a join or a delete
(alternately), a tag change and a policy edit at their rates. Before each change it
asks the policy engine, on a model of the live tailnet (:class:`ReceiverModel`: the live
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

import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import trio

from projections.policy import (
    CompiledPolicy,
    Policy,
    PolicyNode,
    PolicyUser,
    Tailnet,
    compile_policy,
    parse_policy,
)

from ...adminsock import AdminError
from ..scenarios import Scenario
from .client import ChurnWatch, Client, Hub
from .options import CHURN_KINDS, LoadgenOptions, Results
from .report import pct
from .server import Server, Span, proc_memory
from .workers import ParentHub

__all__ = ["RSS_WARM_UP", "Kind", "ReceiverModel", "deletable", "planned_changes", "policy_tailnet", "rss_slope", "rss_summary", "run_churn"]


#: How long a churn change may take to reach its receivers before it counts as missed.
_CHURN_TIMEOUT: Final = 30.0
#: A change stays watched this long after its last receiver, to catch late strays.
_CHURN_GRACE: Final = 0.5


#: What the policy can tell a scenario's node by: its user and its tags.
Kind = tuple[str, tuple[str, ...]]


def policy_tailnet(users: Sequence[str], nodes: Mapping[int, Kind]) -> Tailnet:
    """The policy engine's tailnet of ``nodes`` (client index -> kind): node id =
    index + 1, with synthetic addresses (the scenarios name no addresses, so who sees
    whom does not depend on them)."""
    policy_users = [PolicyUser(id=i + 1, login=name, name=name) for i, name in enumerate(users)]
    uid = {name: i + 1 for i, name in enumerate(users)}
    return Tailnet(policy_users, [
        PolicyNode(id=i + 1, name=f"sim-{i}", user_id=uid[user], tags=tags,
                   ipv4=f"100.{64 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}", ipv6=f"fd7a:115c:a1e0::{i + 1:x}")
        for i, (user, tags) in sorted(nodes.items())
    ])


@dataclass(eq=False)
class ReceiverModel:
    """The live tailnet as the policy engine sees it: who must hear of a change.

    The scenarios' policies tell nodes apart only by user and tags (no addresses, no
    routes), so whether two nodes see each other depends on their :data:`Kind` alone.
    Compiling the whole live tailnet for every change (thousands of nodes, once a
    second, in the load generator that shares the cores with the server) would cost
    more than the change; instead each policy text is compiled once on a *template*:
    two nodes of every kind met so far (two, so that a kind that sees itself, as with
    ``autogroup:self``, shows it). A node of kind K is then seen by every live node
    whose kind a template node of K sees. A text's answers are only good for the
    kinds its template had: a live kind its template lacks (met since, maybe under
    the other text) recompiles it. ``tests/cli/test_loadgen.py`` checks this against
    compiling the live tailnet after random joins, deletes, tag changes and policy
    edits.

    :meth:`filter_changes` (once per policy edit) compiles the live tailnet itself:
    a packet filter lists addresses, so it is no function of the kinds alone.

    Attributes:
        users: the scenario's user names.
        live: client index -> kind, for the nodes that exist now.
        policy: the policy text in force.
    """

    users: tuple[str, ...]
    live: dict[int, Kind]
    policy: str
    #: policy text -> kind -> the kinds whose nodes see a node of that kind, for the
    #: kinds of the template it was compiled on (its keys).
    _seen_by: dict[str, dict[Kind, frozenset[Kind]]] = field(default_factory=dict)
    _kinds: set[Kind] = field(default_factory=set)
    #: Each text parsed once (a template recompiles when a kind is met).
    _parsed: dict[str, Policy] = field(default_factory=dict)

    def _compile(self, text: str, nodes: Mapping[int, Kind]) -> CompiledPolicy:
        if text not in self._parsed:
            self._parsed[text] = parse_policy(text)
        return compile_policy(self._parsed[text], policy_tailnet(self.users, nodes))

    def _table(self, text: str, kinds: Iterable[Kind]) -> dict[Kind, frozenset[Kind]]:
        """``text``'s seers per kind, from a template that has every kind of ``kinds``
        (recompiled, with every kind met so far, if the last one lacks any: its
        answers would not name the nodes of the kinds it lacks)."""
        wanted = set(kinds)
        table = self._seen_by.get(text)
        if table is None or not table.keys() >= wanted:
            self._kinds |= wanted
            ordered = sorted(self._kinds)
            template = {2 * j + side: k for j, k in enumerate(ordered) for side in (0, 1)}
            compiled = self._compile(text, template)
            table = {k: frozenset(template[p - 1] for p in compiled.peer_id_set(2 * j + 1))
                     for j, k in enumerate(ordered)}
            self._seen_by[text] = table
        return table

    def seen_by(self, kind: Kind, text: str | None = None) -> frozenset[Kind]:
        """The kinds whose nodes see a node of ``kind`` under ``text`` (default: the
        policy in force), among ``kind`` and the live kinds. Visibility is symmetric:
        these are also the kinds it sees."""
        text = self.policy if text is None else text
        return self._table(text, [kind, *self.live.values()])[kind]

    def peers(self, index: int, live: Mapping[int, Kind] | None = None) -> frozenset[int]:
        """The clients that see client ``index`` (in ``live``, default the model's)."""
        live = self.live if live is None else live
        seers = self._table(self.policy, live.values())[live[index]]
        return frozenset(i for i, k in live.items() if k in seers and i != index)

    def filter_changes(self, text: str) -> frozenset[int]:
        """The live clients whose packet filter changes when the policy becomes ``text``."""
        a, b = self._compile(self.policy, self.live), self._compile(text, self.live)
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


#: The RSS slope is taken after this warm-up (the first minute), or after the first
#: half of a shorter run.
RSS_WARM_UP: Final = 60.0


def rss_summary(samples: Sequence[tuple[float, float]], duration: float) -> Results:
    """The churn phase's memory figures from (seconds since it began, server RSS MiB)
    samples: the first and last RSS, the RSS when the warm-up ended, and the
    least-squares slope after it (MiB per minute; ``None`` with too few samples)."""
    after = min(RSS_WARM_UP, duration / 2)
    warm = [m for t, m in samples if t >= after]
    return {
        "churn_rss_samples": len(samples),
        "churn_rss_first_mib": samples[0][1] if samples else None,
        "churn_rss_warm_mib": warm[0] if warm else None,
        "churn_rss_last_mib": samples[-1][1] if samples else None,
        "churn_rss_slope_from_s": after,
        "churn_rss_slope_mib_per_min": rss_slope(samples, after),
    }


def planned_changes(opts: LoadgenOptions) -> dict[str, int]:
    """How many changes of each kind the churn phase's rates ask for in its duration
    (the first of each one period after the start; joins and deletes alternate,
    joins first). Fewer done means the load generator or the server fell behind."""

    def due(every: float) -> int:
        return max(0, math.ceil(opts.duration / every) - 1) if every > 0 else 0

    joins_deletes = due(opts.join_delete_every)
    return {"join": (joins_deletes + 1) // 2, "delete": joins_deletes // 2,
            "tag": due(opts.tag_every), "policy": due(opts.policy_every)}


async def _sample_rss(server: Server, t0: float, samples: list[tuple[float, float]]) -> None:
    """Append (seconds since ``t0``, server RSS MiB) every second until cancelled."""
    while True:
        samples.append((trio.current_time() - t0, proc_memory(server.pid)[0] / 2**20))
        await trio.sleep(1.0)


def deletable(pool: Sequence[int], flipping: Iterable[frozenset[int]]) -> list[int]:
    """The nodes of ``pool`` that may be deleted now: none that a tag change under way
    makes its target start or stop seeing.

    The target learns that from its own update (its new view: peers added and
    removed), which the load generator does not wait for. Deleting such a node before
    that update arrives makes what the target gets a matter of timing, and either is
    right (a removal goes to a node that had the peer, nothing to one that never
    had it): a node the target stops seeing is removed from its view by the tag
    change or by the deletion, and one it starts seeing is either shown and then
    removed or never shown. The receiver model, which has the target's new tags
    already, cannot tell which: it would count the first as unexpected and the
    second, when never shown, as missing. Sparing those nodes keeps every
    delete's receivers exact (the nodes that have it as a peer).
    """
    changing = frozenset().union(*flipping)
    return [i for i in pool if i not in changing]


async def _all_nodes(server: Server) -> list[object]:
    """The admin views of every node of the server."""
    listed = await trio.to_thread.run_sync(server.admin, "nodes.list", {})
    assert isinstance(listed, list)
    return listed


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
    model = ReceiverModel(sc.users, live, sc.policy_a)
    local = {c.index: c for c in clients}  # the clients of this process
    ids: dict[str, tuple[int, bytes]] = {}  # host name -> (node id, node key)
    done: dict[str, list[ChurnWatch]] = {k: [] for k in CHURN_KINDS}
    next_index = n
    busy: set[int] = set()  # targets of changes under way
    # Per tag change under way, its target's index -> the nodes it starts or stops
    # seeing: the target's own update (its new view) adds or removes them. Kept
    # until the change's watch ends (its receivers reached, then the grace).
    flipping: dict[int, frozenset[int]] = {}
    skipped: dict[str, int] = dict.fromkeys(CHURN_KINDS, 0)  # due, but no node was free to change
    held = 0.0  # seconds the policy edits held the other changes back
    workers = hub.workers if isinstance(hub, ParentHub) else None

    def learn(view: object) -> None:
        assert isinstance(view, dict)
        # The admin view shows the key's hex, the protocol its "nodekey:" form.
        ids[str(view["hostname"])] = (int(view["id"]), b"nodekey:" + str(view["node_key"]).encode())

    async def node_id(index: int) -> tuple[int, bytes]:
        """The server's id and the node key of client ``index`` (host name and given
        name ``sim-<index>``): the nodes of the run were listed before the churn began,
        a newcomer is looked up alone (listing thousands of nodes would be server CPU
        measured as churn)."""
        if f"sim-{index}" not in ids:
            try:
                learn(await trio.to_thread.run_sync(server.admin, "nodes.show", {"node": f"sim-{index}"}))
            except AdminError:  # its given name is not its host name after all
                for view in await _all_nodes(server):
                    learn(view)
        return ids[f"sim-{index}"]

    def pending_receivers() -> set[int]:
        """The receivers that changes under way still wait for: deleting one, or
        changing what it sees, would make it miss them."""
        return {i for w in hub.churn for i in w.receivers if i not in w.seen}

    async def follow(watch: ChurnWatch) -> None:
        with trio.move_on_after(_CHURN_TIMEOUT * opts.timeout_scale):
            await watch.done.wait()
            await trio.sleep(_CHURN_GRACE)
        hub.churn.remove(watch)
        if workers is not None:
            workers.send(("unchurn", id(watch)))
        if watch.exclude is not None:
            busy.discard(watch.exclude)
            if watch.kind == "tag":
                flipping.pop(watch.exclude, None)
        done[watch.kind].append(watch)

    async def install(watch: ChurnWatch, watchers: trio.Nursery) -> None:
        """Watch for ``watch`` here and in every worker; the change may be made once
        this returns (a worker told later could get its update before the watch, and
        its receivers would count as missing though the server sent it). Its clock
        starts at :func:`start`."""
        hub.churn.append(watch)
        if workers is not None:
            await workers.publish_churn(watch)
        watchers.start_soon(follow, watch)

    def start(watch: ChurnWatch) -> None:
        """The change is being made now (the watch is installed)."""
        if watch.t0 == math.inf:  # else a registration retried after "try again": the clock runs already
            watch.t0 = trio.current_time()

    def candidates(tagged: bool) -> list[int]:
        waited_for = pending_receivers()
        return [i for i in live
                if i not in busy and i not in waited_for and i != 0 and i not in updaters
                and (i not in local or local[i].has_map.is_set()) and bool(live[i][1]) == tagged]

    async def join(watchers: trio.Nursery) -> None:
        nonlocal next_index
        index, next_index = next_index, next_index + 1
        hub.auth_keys[index] = auth_keys[index % base]
        newcomer = Client(index, hub)
        after = {**live, index: sc.node(index)}
        receivers = await trio.to_thread.run_sync(model.peers, index, after)
        watch = ChurnWatch("join", receivers & set(live), key=newcomer.marker, exclude=index)
        await install(watch, watchers)
        newcomer.on_register = lambda: start(watch)
        hub.register_target = hub.registered + 1
        busy.add(index)
        nursery.start_soon(newcomer.run)
        with trio.move_on_after(10 * opts.timeout_scale):
            await newcomer.has_map.wait()
        live[index] = sc.node(index)
        local[index] = newcomer

    async def delete(watchers: trio.Nursery) -> None:
        pool = deletable(candidates(False) + candidates(True), flipping.values())
        if not pool:
            skipped["delete"] += 1
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
        await install(watch, watchers)
        start(watch)
        await trio.to_thread.run_sync(server.admin, "nodes.delete", {"node": str(nid)})

    async def retag(watchers: trio.Nursery) -> None:
        pool = candidates(True)
        if not pool:
            skipped["tag"] += 1
            return
        target = rng.choice(pool)
        user, (tag,) = live[target][0], live[target][1][:1]
        new = f"tag:svc{(int(tag.removeprefix('tag:svc')) + 1) % 20}"
        busy.add(target)
        nid, key = await node_id(target)
        before = await trio.to_thread.run_sync(model.peers, target)
        after = await trio.to_thread.run_sync(model.peers, target, {**live, target: (user, (new,))})
        # A node it starts or stops seeing would get that node's pending join or tag
        # change as an update it should not (or a removal instead): let those land first.
        while any(w.kind in ("join", "tag") and w.exclude in before ^ after for w in hub.churn):
            await trio.sleep(0.05)
        live[target] = (user, (new,))
        flipping[target] = before ^ after
        watch = ChurnWatch("tag", before | after, key=key, node_id=nid, exclude=target)
        await install(watch, watchers)
        start(watch)
        await trio.to_thread.run_sync(server.admin, "nodes.tag", {"node": str(nid), "tags": [new]})

    async def edit(watchers: trio.Nursery) -> None:
        nonlocal held
        began = trio.current_time()
        text = sc.policy_b if model.policy == sc.policy_a else sc.policy_a
        while hub.churn:  # let the changes under way finish (or time out)
            await trio.sleep(0.05)
        receivers = await trio.to_thread.run_sync(model.filter_changes, text)
        model.policy = text
        watch = ChurnWatch("policy", receivers)
        await install(watch, watchers)
        start(watch)
        await trio.to_thread.run_sync(server.admin, "policy.set", {"text": text})
        while watch in hub.churn:
            await trio.sleep(0.05)
        held += trio.current_time() - began

    results["last_phase"] = "churn"
    # Before the clock starts: the nodes' ids, and each policy's template compiled.
    for view in await _all_nodes(server):
        learn(view)
    for text in (sc.policy_a, sc.policy_b):
        await trio.to_thread.run_sync(model.seen_by, sc.node(0), text)
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
    results.update(rss_summary(samples, opts.duration))
    changes = sum(len(w) for w in done.values())
    results["churn_changes"] = changes
    results["churn_kib_per_change"] = hub.churn_bytes / 1024 / max(changes, 1)
    planned = planned_changes(opts)
    everything: list[float] = []
    expected_all = 0
    for kind, watches in done.items():
        lat = [x for w in watches for x in w.latencies]
        expected = sum(len(w.receivers) for w in watches)
        everything += lat
        expected_all += expected
        results[f"churn_{kind}_planned"] = planned[kind]
        results[f"churn_{kind}_count"] = len(watches)
        results[f"churn_{kind}_skipped"] = skipped[kind]
        results[f"churn_{kind}_expected"] = expected
        results[f"churn_{kind}_reached"] = len(lat)
        results[f"churn_{kind}_missing"] = expected - len(lat)
        results[f"churn_{kind}_unexpected"] = sum(w.unexpected for w in watches)
        results[f"churn_{kind}_p50_ms"] = pct(lat, expected, 0.5)
        results[f"churn_{kind}_p99_ms"] = pct(lat, expected, 0.99)
        results[f"churn_{kind}_max_ms"] = pct(lat, expected, 1.0)
        # The updates that brought it (to receivers and strays alike), per change.
        results[f"churn_{kind}_kib_per_change"] = sum(w.delivered_bytes for w in watches) / 1024 / max(len(watches), 1)
    results["churn_policy_held_s"] = held
    results["churn_expected"] = expected_all
    results["churn_reached"] = len(everything)
    results["churn_missing"] = expected_all - len(everything)
    results["churn_unexpected"] = sum(w.unexpected for ws in done.values() for w in ws)
    # Each stray, for telling a server fault from a receiver-model gap: the change,
    # the node it changed, the client that got it, and when.
    results["churn_strays"] = [
        {"kind": w.kind, "node": w.exclude, "node_id": w.node_id, "client": index, "after_ms": after * 1000}
        for ws in done.values() for w in ws for index, after in w.strays
    ][:20]
    results["churn_p50_ms"] = pct(everything, expected_all, 0.5)
    results["churn_p99_ms"] = pct(everything, expected_all, 0.99)
    results["churn_max_ms"] = pct(everything, expected_all, 1.0)
