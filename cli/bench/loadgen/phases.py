"""The measurement of one tailnet size: the phases in order.

Theory of operation
-------------------
:func:`measure` starts a fresh :class:`~cli.bench.loadgen.server.Server`, sets the
scenario's tailnet up through the admin socket (users, one reusable pre-auth key per
kind of node, the first policy) and runs the phases, each filling the results as it
ends:

* register: every client registers, before any stream exists;
* connect: every client opens its map stream (at most ``--concurrency`` waiting for
  a full map at once), then the server settles and its idle memory is taken;
* join, policy, restart (``--phases``), or the churn phase of ``--scenario churn``
  (:mod:`cli.bench.loadgen.churn`).

Before the run, :func:`expectations` compiles the scenario's policies with the
policy engine on the same users and tags, so each change waits only for the nodes
it concerns and a node that gets a change it should not is counted. A phase that
times out records how far it got; the figures are never assertions.
"""

from __future__ import annotations

import functools
import gc
import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

import trio

from projections.mapviews.hub import class_key
from projections.policy import compile_policy, parse_policy
from protocol import ProtocolError, fetch_server_key

from ...adminsock import AdminError
from ...fdlimit import FD_MARGIN
from ...gcpolicy import manage_gc
from ...spawn import free_port
from ..scenarios import Scenario, scenario
from .churn import policy_tailnet, run_churn
from .client import Client, FatalClientError, Hub, Watch
from .options import LoadgenOptions, Results
from .report import pct, sec
from .scanner import FILTER_MARKER, make_decompressor
from .server import Server, Span, memory_guard, proc_memory, settle
from .workers import ParentHub, Workers, pin

__all__ = ["Expectations", "expectations", "measure"]


@dataclass(frozen=True)
class Expectations:
    """What the policy engine says about a scenario's tailnet of ``n`` nodes plus the
    newcomer (client indexes; node ``n`` is the newcomer).

    Attributes:
        join: the clients that can see the newcomer.
        policy: the clients whose packet filter the scenario's policy change changes.
        classes: visibility classes (:func:`projections.mapviews.hub.class_key`).
        peers_avg, peers_median, peers_max: peers per node.
        presence: the clients that see node 0 (whose endpoint the presence phase moves).
    """

    join: frozenset[int]
    policy: frozenset[int]
    classes: int
    peers_avg: float
    peers_median: float
    peers_max: int
    presence: frozenset[int] = frozenset()


def expectations(sc: Scenario, n: int) -> Expectations:
    """Compile the scenario's policies on its users and nodes (synthetic addresses:
    the scenarios name no addresses) and derive each change's receivers."""
    tailnet = policy_tailnet(sc.users, {i: sc.node(i) for i in range(n + 1)})
    a = compile_policy(parse_policy(sc.policy_a), tailnet)
    b = compile_policy(parse_policy(sc.policy_b), tailnet)
    join = frozenset(i - 1 for i in a.peer_id_set(n + 1))
    policy = frozenset(i for i in range(n + 1) if a.packet_filter(i + 1) != b.packet_filter(i + 1))
    # Nodes of one class see alike, so they have as many peers: one peer set per class
    # (per node, 10,000 flat nodes would hold 10,000 sets of 10,000 peers at once).
    per_class: dict[Hashable, int] = {}
    peers = []
    for i in range(n):
        key = class_key(a, i + 1)
        if key not in per_class:
            per_class[key] = len(a.peer_id_set(i + 1))
        peers.append(per_class[key])
    peers.sort()
    classes = len(per_class)
    presence = frozenset(i - 1 for i in a.peer_id_set(1))
    return Expectations(join, policy, classes, sum(peers) / max(n, 1), float(peers[n // 2]) if n else 0.0,
                        peers[-1] if n else 0, presence)


async def measure(n: int, workdir: Path, options: LoadgenOptions | None = None) -> Results:
    """Run every selected phase with ``n`` simulated clients against a fresh server.

    Args:
        n: tailnet size (simulated nodes besides the join phase's newcomer).
        workdir: scratch space; the server's data and log go in ``workdir/n<N>``.
        options: see :class:`LoadgenOptions`.

    Returns:
        The figures (see the module docstring); a phase that timed out records how
        many clients made it (``registered``, ``connected``, ``*_reached``,
        ``reconnected``) and ``None`` for quantiles it could not reach.

    Raises:
        RuntimeError: the server did not start, or refused a registration.

    Cancellation: the server is stopped either way.
    """
    opts = options or LoadgenOptions()
    servers = _servers(n, workdir, opts)
    server = servers[0]
    results: Results = {"nodes": n}
    if opts.backend != "sqlite" or opts.replicas > 1:
        results.update(backend=opts.backend, replicas=opts.replicas)
    if opts.workers:
        results["pinning"] = pin(server, opts.workers)
        print(f"  {results['pinning']}", flush=True)
    try:
        for i, replica in enumerate(servers):
            if i:  # one Noise key behind one URL: a client may move between replicas
                shutil.copyfile(server.data / "noise_private.key", replica.data / "noise_private.key")
            await trio.to_thread.run_sync(replica.start, opts.timeout(60, 0.01, n))
        async with trio.open_nursery() as guarded:
            for replica in servers:
                guarded.start_soon(memory_guard, replica, opts, results, guarded.cancel_scope)
            await _run_phases(n, servers, opts, results)
            guarded.cancel_scope.cancel()
    except* FatalClientError as group:
        raise RuntimeError(str(group.exceptions[0])) from None
    finally:
        for replica in servers:
            await trio.to_thread.run_sync(replica.stop)
    return results


def _servers(n: int, workdir: Path, opts: LoadgenOptions) -> list[Server]:
    """The servers of a run: one on its own SQLite log, or ``opts.replicas`` on the
    PostgreSQL log of ``opts.dsn``, each with its own data directory and port and one
    signing key for all (their checkpoints verify against one key)."""
    servers: list[Server] = []
    for i in range(opts.replicas):
        data = workdir / (f"n{n}" if i == 0 else f"n{n}-replica{i}")
        data.mkdir(parents=True)
        # The server's connection cap (10,000 by default) would refuse clients of a
        # 10,000-node run; it takes as many as its file limit allows (main.py raised it).
        env = {"TAILLEDGER_LIMITS__MAX_CONNECTIONS": str(max(10_000, opts.sockets(n) + FD_MARGIN))}
        if opts.backend == "postgres":
            env |= {
                "TAILLEDGER_DATABASE__TYPE": "postgres",
                "TAILLEDGER_DATABASE__DSN": opts.dsn,
                "TAILLEDGER_AUDIT__SIGNING_KEY_FILE": str(workdir / f"n{n}-signing.key"),
            }
        env |= dict(opts.server_settings)
        servers.append(Server(data, free_port(), extra_env=env))
    return servers


def _health(server: Server) -> dict[str, object]:
    """The server's ``/health`` body, whatever its status (blocking)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=5) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    value = json.loads(body)
    return value if isinstance(value, dict) else {}


async def _catch_up(servers: list[Server], within: float) -> None:
    """Wait until every replica has folded the first one's log head (the users and keys
    the clients register with), at most ``within`` seconds."""
    head = (await trio.to_thread.run_sync(_health, servers[0])).get("log_seq")
    assert isinstance(head, int)
    with trio.move_on_after(within):
        for replica in servers[1:]:
            while True:
                folded = (await trio.to_thread.run_sync(_health, replica)).get("folded_seq")
                if isinstance(folded, int) and folded >= head:
                    break
                await trio.sleep(0.1)


async def _run_phases(n: int, servers: list[Server], opts: LoadgenOptions, results: Results) -> None:
    """Set the tailnet up (user, reusable key, policy A) through the first server, start
    the clients (spread over the replicas) and run the phases in order, filling
    ``results`` as each one ends."""
    server = servers[0]
    admin = trio.to_thread.run_sync
    sc = scenario(opts.scenario, n + 1)  # the join phase's newcomer is node n
    expect = await trio.to_thread.run_sync(expectations, sc, n)
    results.update(scenario=sc.name, classes=expect.classes, peers_avg=expect.peers_avg,
                   peers_median=expect.peers_median, peers_max=expect.peers_max)
    for name in sc.users:
        await admin(server.admin, "users.create", {"name": name})
    has_policy = True
    try:
        await admin(server.admin, "policy.set", {"text": sc.policy_a})
    except AdminError:
        has_policy = False
    keys: dict[tuple[str, tuple[str, ...]], str] = {}
    for i in range(n + 1):
        kind = sc.node(i)
        if kind not in keys:
            created = await admin(server.admin, "preauthkeys.create", {
                "user": kind[0], "reusable": True, "tags": list(kind[1]), "expiration_seconds": None,
            })
            assert isinstance(created, dict)
            keys[kind] = str(created["key"])
    auth_keys = {i: keys[sc.node(i)] for i in range(n + 1)}
    await _catch_up(servers, opts.timeout(30, 0.01, n))
    rss0, _ = proc_memory(server.pid)

    updaters = min(n // 10, 20) if opts.updaters is None else min(opts.updaters, n)
    decompress = make_decompressor()  # one for all: this is one thread
    hub = (ParentHub if opts.workers else Hub)(
        port=server.port,
        auth_key=auth_keys[0],
        auth_keys=auth_keys,
        server_key=await fetch_server_key("127.0.0.1", server.port),
        decompress=decompress,
        update_interval=opts.update_interval,
        register_slots=trio.Semaphore(opts.register_concurrency),
        connect_slots=trio.Semaphore(opts.concurrency),
        register_target=n,
        population=n,
        ports=tuple(s.port for s in servers) if len(servers) > 1 else (),
    )
    spread = {i * n // updaters for i in range(updaters)} if updaters else set()
    workers = Workers(opts, hub, server, spread) if isinstance(hub, ParentHub) else None
    clients = [] if workers else [Client(i, hub, updater=i in spread, sentinel=i == 0) for i in range(n)]
    results["updaters"] = len(spread)

    try:
        async with trio.open_nursery() as nursery:
            # Thousands of clients are a large, long-lived heap: without this, the
            # oldest-generation collections of the load generator itself (a second or
            # more at 5,000 clients) would be measured as server latency.
            await nursery.start(functools.partial(manage_gc, interval=5.0, full_interval=600.0))
            if workers:
                await workers.start(nursery, n, results)
            # -- register: everybody, before any stream exists ---------------------------
            results["last_phase"] = "register"
            span = Span(server)
            for c in clients:
                nursery.start_soon(c.run)
            if workers:
                workers.send(("register",))
            await _wait(hub.registered_all, opts.timeout(60, 0.05, n), "register", lambda: hub.registered, n)
            span.close(results, "register", wall_key="register_all_s")
            results["registered"] = hub.registered
            results["rss_registered_mib"] = proc_memory(server.pid)[0] / 2**20
            gc.freeze()  # the clients' long-lived objects: keep them out of GC passes

            # -- connect: open the streams, at most `concurrency` waiting for a full map --
            results["last_phase"] = "connect"
            span = Span(server)
            hub.begin_round(n, trio.current_time())
            hub.streams_go.set()
            if workers:
                workers.send(("go",))
            await _wait(hub.ready_all, opts.timeout(60, 0.1, n), "connect", lambda: hub.ready, n)
            span.close(results, "connect", wall_key="connect_all_s")
            results["connected"] = hub.ready
            results["connect_p50_s"] = sec(pct(hub.ready_times, n, 0.5))
            results["connect_p99_s"] = sec(pct(hub.ready_times, n, 0.99))
            if workers:
                await workers.collect()  # the full-map sizes are the workers' to tell
            results["full_map_kib"] = hub.full_map_max / 1024
            results["full_map_json_kib"] = hub.full_map_json / 1024
            results["full_map_peers"] = hub.full_map_peers
            # The sentinel's peers as the policy engine computes them: a check that
            # the receivers every change waits for match what the server sends.
            results["full_map_peers_expected"] = len(expect.presence - {n})
            hub.connect_slots = None  # from now on clients reconnect like real ones: at once
            if workers:
                workers.send(("unslot",))
            gc.freeze()

            # -- memory once idle ----------------------------------------------------------
            # At least one of the server's 10-second memory steps (cli/gcpolicy.py):
            # idle memory is what an idle server holds, not the ramp's leftovers.
            settle_s, idle_pct = await settle(server, min_s=11, max_s=opts.timeout(20, 0.01, n))
            rss1, peak = proc_memory(server.pid)
            results["settle_s"] = settle_s
            results["idle_cpu_pct"] = idle_pct
            results["rss_before_mib"] = rss0 / 2**20
            results["rss_mib"] = rss1 / 2**20
            results["peak_rss_mib"] = peak / 2**20
            results["mem_per_node_kib"] = (rss1 - rss0) / max(n, 1) / 1024

            if sc.name == "churn":
                await run_churn(server, opts, hub, clients, n, spread, nursery, results, sc, auth_keys)
                nursery.cancel_scope.cancel()
                return
            if "join" in opts.phases:
                await _join(n, server, opts, hub, clients, nursery, results, expect.join)
            if "presence" in opts.phases and len(servers) > 1:
                await settle(server, min_s=1, max_s=opts.timeout(5, 0.005, n))
                receivers = expect.presence if hub.population > n else expect.presence - {n}
                await _presence(n, servers, opts, hub, clients, results, receivers)
            if "policy" in opts.phases and has_policy:
                await settle(server, min_s=1, max_s=opts.timeout(5, 0.005, n))
                receivers = expect.policy if hub.population > n else expect.policy - {n}
                await _policy(n, server, opts, hub, clients, results, sc, receivers)
            if "restart" in opts.phases and len(servers) == 1:
                await settle(server, min_s=1, max_s=opts.timeout(5, 0.005, n))
                await _restart(n, server, opts, hub, clients, results)
            if workers:
                await workers.collect()
            nursery.cancel_scope.cancel()
    finally:  # also when the memory guard cut the run short
        if workers:
            workers.stop()
        if "aborted" in results:
            results["ready_at_abort"] = hub.ready  # in the round that was under way
        results["keepalives"] = hub.keepalives
        results["lite_updates"] = hub.lite_updates
        results["updates_read"] = hub.updates_read
        results["marker_mismatches"] = hub.marker_mismatches
        results["client_errors"] = dict(hub.errors.most_common(8))


async def _wait(
    done: trio.Event, within: float, label: str, progress: Callable[[], int], total: int,
    *, every: float = 30.0,
) -> None:
    """Wait for ``done`` at most ``within`` seconds; print how far the phase got every
    ``every`` seconds (a 5,000-node phase can take minutes) and when it ends."""
    t0 = trio.current_time()
    with trio.move_on_after(within):
        while not done.is_set():
            with trio.move_on_after(every):
                await done.wait()
            if not done.is_set():
                print(f"  {label}: {progress()}/{total} after {trio.current_time() - t0:.0f} s", flush=True)
    state = "done" if done.is_set() else "TIMED OUT"
    print(f"  {label}: {progress()}/{total} {state} in {trio.current_time() - t0:.1f} s", flush=True)


async def _join(
    n: int, server: Server, opts: LoadgenOptions, hub: Hub, clients: list[Client],
    nursery: trio.Nursery, results: Results, receivers: frozenset[int],
) -> None:
    """One more node registers and streams; it stays for the later phases. Only the
    ``receivers`` (the nodes that can see it) are waited for."""
    newcomer = Client(hub.population, hub)
    watch = Watch("join", newcomer.marker, expected=len(receivers), exclude=newcomer.index, receivers=receivers)

    def begin() -> None:  # just before the register request leaves
        watch.t0 = trio.current_time()
        hub.watch = watch

    newcomer.on_register = begin
    results["last_phase"] = "join"
    hub.register_target = hub.registered + 1
    hub.registered_all = trio.Event()
    span = Span(server)
    nursery.start_soon(newcomer.run)
    with trio.move_on_after(opts.timeout(30, 0.01, n)):
        await watch.done.wait()
        await newcomer.has_map.wait()  # its register call has returned by then, too
    print(f"  join: {len(watch.latencies)}/{watch.expected} saw it", flush=True)
    span.close(results, "join")
    hub.watch = None
    clients.append(newcomer)
    hub.population += 1
    results["register_ms"] = None if newcomer.register_s is None else newcomer.register_s * 1000
    results["join_self_map_ms"] = (
        None if newcomer.first_map_at is None else (newcomer.first_map_at - watch.t0) * 1000
    )
    _record_latencies(results, "join", watch)


def _record_latencies(results: Results, phase: str, watch: Watch) -> None:
    """``<phase>_reached`` and the p50, p99 and max latencies of a watched change."""
    results[f"{phase}_reached"] = len(watch.latencies)
    results[f"{phase}_p50_ms"] = pct(watch.latencies, watch.expected, 0.5)
    results[f"{phase}_p99_ms"] = pct(watch.latencies, watch.expected, 0.99)
    results[f"{phase}_max_ms"] = pct(watch.latencies, watch.expected, 1.0)
    results[f"{phase}_expected"] = watch.expected
    results[f"{phase}_unexpected"] = watch.unexpected
    results[f"{phase}_kib"] = watch.bytes / 1024


async def _policy(
    n: int, server: Server, opts: LoadgenOptions, hub: Hub, clients: list[Client], results: Results,
    sc: Scenario, receivers: frozenset[int],
) -> None:
    """Change the policy; time until each stream whose filter changes carried one."""
    watch = Watch("policy", FILTER_MARKER, expected=len(receivers), receivers=receivers)
    results["last_phase"] = "policy"
    span = Span(server)
    watch.t0 = trio.current_time()
    hub.watch = watch
    await trio.to_thread.run_sync(server.admin, "policy.set", {"text": sc.policy_b})
    results["policy_set_ms"] = (trio.current_time() - watch.t0) * 1000
    await _wait(watch.done, opts.timeout(30, 0.02, n), "policy", lambda: len(watch.latencies), watch.expected)
    span.close(results, "policy")
    hub.watch = None
    _record_latencies(results, "policy", watch)


#: The endpoint port the presence phase moves node 0 to (updaters count up from
#: 41641 and never get there in a run).
_PRESENCE_PORT = 65000


async def _presence(
    n: int, servers: list[Server], opts: LoadgenOptions, hub: Hub, clients: list[Client], results: Results,
    receivers: frozenset[int],
) -> None:
    """Node 0 (on the first replica) reports a new endpoint; time until each of its
    peers on the other replicas got it (through the shared presence table). Its peers
    on its own replica get it too, untimed."""
    replicas = len(servers)
    mover = clients[0]
    others = frozenset(i for i in receivers if hub.port_of(i) != hub.port_of(mover.index))
    mover.port = _PRESENCE_PORT
    endpoints = mover.map_request(stream=False).endpoints or []
    marker = "".join(f'"{e}"' for e in endpoints).encode()  # the JSON of the one endpoint
    watch = Watch("presence", marker, expected=len(others), exclude=mover.index, receivers=others,
                  ignored=receivers - others)
    results["last_phase"] = "presence"
    span = Span(servers[1 % replicas])  # the replica that has to learn of it
    watch.t0 = trio.current_time()
    hub.watch = watch
    try:
        await mover.move_endpoint(_PRESENCE_PORT)
    except ProtocolError as exc:
        hub.note_error(exc)
    await _wait(watch.done, opts.timeout(30, 0.01, n), "presence", lambda: len(watch.latencies), watch.expected)
    span.close(results, "presence")
    hub.watch = None
    _record_latencies(results, "presence", watch)


async def _restart(
    n: int, server: Server, opts: LoadgenOptions, hub: Hub, clients: list[Client], results: Results
) -> None:
    """Stop the server, start it on the same data, wait for every client's full map."""
    results["peak_rss_mib"] = proc_memory(server.pid)[1] / 2**20
    results["last_phase"] = "restart"
    t0 = trio.current_time()
    await trio.to_thread.run_sync(server.stop)
    results["stop_s"] = trio.current_time() - t0
    t_start = trio.current_time()
    # The round begins before the new server exists, so that no full map from the
    # old one can count; latencies are then taken from when the port accepts.
    hub.begin_round(hub.population, t_start)
    await trio.to_thread.run_sync(server.start, opts.timeout(60, 0.01, n))
    t_up = trio.current_time()
    results["server_start_s"] = t_up - t_start
    span = Span(server)
    # Every full map again, all at once: as many bytes as the connect phase, so as long
    # a timeout (at 6,000 flat nodes on a busy machine that phase took 371 s).
    await _wait(hub.ready_all, opts.timeout(60, 0.1, n), "reconnect", lambda: hub.ready, hub.population)
    span.close(results, "reconnect")
    now = trio.current_time()
    results["reconnected"] = hub.ready
    results["reconnect_all_s"] = now - t_up if hub.ready >= hub.ready_target else None
    results["restart_total_s"] = now - t0 if hub.ready >= hub.ready_target else None
    shifted = [t - (t_up - t_start) for t in hub.ready_times]
    results["reconnect_p50_s"] = sec(pct(shifted, hub.population, 0.5))
    results["reconnect_p99_s"] = sec(pct(shifted, hub.population, 0.99))
    rss, peak = proc_memory(server.pid)
    results["rss_after_restart_mib"] = rss / 2**20
    results["restart_peak_rss_mib"] = peak / 2**20
