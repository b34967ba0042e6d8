"""``tailledger bench hub``: CPU of one change across every stream, in process (issue 19).

::

    tailledger bench hub --scenario flat,corp --nodes 1000,2000,5000
    tailledger bench hub --scenario corp --nodes 2000 --profile join

It prints figures and asserts nothing. It builds the scenario's tailnet through the real
commands into an in-memory log (:class:`~cli.bench.scenarios.BenchLog`), opens a
:class:`~projections.mapviews.cursor.StreamCursor` for every node (full maps), and then
times what the server's map fan-out does for one change -- ``MapHub.advance`` plus
every stream's ``update`` -- with ``time.process_time``:

* join: one more node of the scenario registers;
* tag: a device becomes a tagged server;
* delete: the newcomer is deleted;
* policy: the scenario's policy change.

It also prints how many streams got a message, the bytes encoded, the number of
visibility classes and the average/median/max peers per node.

**The curve.** With several sizes (or scenarios) it ends with one table: per scenario,
size and change, the CPU, the streams that got a message (the affected nodes), the CPU
per affected stream, and the growth factor of each from the previous size of the same
scenario. A change whose cost follows the nodes it affects has a CPU growth close to
its affected-streams growth and a flat CPU per affected stream; a cost growing with
N squared would show a CPU growth near the square of the nodes' growth. No network, no
encryption, no compression: the figures are the projection's own cost and the JSON
encoding of what it sends (``protocol.mapwire``, once per shared message).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import random
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from projections import EMPTY, AddressPlan
from projections import commands as c
from projections.ipam import DEFAULT_V4, DEFAULT_V6
from projections.mapviews.cursor import StreamCursor
from projections.mapviews.hub import MapHub
from projections.netmap import NetmapSettings
from projections.policystate import PolicyCompiler
from projections.tailcfg import DERPMap
from protocol import MapWire

from .hub_memory import MemoryProbe, census
from .scenarios import BenchLog, scenario

__all__ = ["bench_hub_main"]

PLAN = AddressPlan(DEFAULT_V4, DEFAULT_V6)


def _register(r: BenchLog, rnd: random.Random, user_id: int, tags: tuple[str, ...], name: str) -> int:
    return r.run(lambda s: c.decide_register_node(
        s, machine_key=f"{rnd.getrandbits(256):064x}", node_key=f"{rnd.getrandbits(256):064x}",
        hostname=name, user_id=user_id, tags=tags, ephemeral=False, expiry=None, auth="cli",
        preauth_key=None, plan=PLAN,
    ))


@dataclass(frozen=True)
class Figures:
    """One change at one size: its CPU (seconds), the streams messaged, the bytes sent."""

    cpu: float
    sent: int
    nbytes: int


def run(name: str, n: int, profile: str | None, memory: bool = False) -> dict[str, Figures]:
    """Build the scenario at ``n`` nodes and time each change; the figures by change.
    With ``memory``, also what each step leaves allocated (:mod:`.hub_memory`)."""
    sc = scenario(name, n)
    rnd = random.Random(n)
    r = BenchLog(now=datetime(2026, 1, 1, tzinfo=UTC))
    uids = [r.run(functools.partial(c.decide_create_user, name=u)) for u in sc.users]
    r.run(lambda s: c.decide_set_policy(s, sc.policy_a, source="bench"))
    probe = MemoryProbe(n) if memory else None
    t0 = time.perf_counter()
    for i in range(n):
        user, tags = sc.node(i)
        _register(r, rnd, uids[sc.users.index(user)], tags, f"n{i}")
    if probe:
        probe.mark("the log and the state")
    compiler = PolicyCompiler("https://control.example")
    settings = NetmapSettings(domain="example.ts.net", derp_map=DERPMap(regions={}))
    hub = MapHub(compiler, settings, lambda _nid: None)
    hub.advance(r.state, r.now, r.delta, ())
    r.delta = EMPTY
    if probe:
        probe.mark("the hub advanced once")
    wire = MapWire()
    cursors = {nid: StreamCursor(nid) for nid in r.state.nodes}
    full = 0
    for cur in cursors.values():
        fm = cur.full_map(hub)
        full += len(wire.full_map_json(fm))
        if probe:
            wire.frame_full(fm, compress=True)  # the server's zstd frames, kept per piece
        del fm
    peers = [len(hub.peer_set(nid).peers) - (nid in hub.peer_set(nid).peers) for nid in r.state.nodes]
    print(f"{name} {n}: built in {time.perf_counter() - t0:.1f} s; classes {hub.classes()}, "
          f"peers avg {statistics.mean(peers):.0f} median {statistics.median(peers):.0f} max {max(peers)}, "
          f"full maps {full / 2**20:.1f} MiB", flush=True)
    if probe:
        probe.mark("every stream's full map and cursor")
        census(hub, wire, cursors.values())

    figures: dict[str, Figures] = {}

    def change(label: str, act: object) -> None:
        assert callable(act)
        r.now += timedelta(seconds=1)
        act()
        prof = cProfile.Profile() if profile == label else None
        c0 = time.process_time()
        if prof:
            prof.enable()
        hub.advance(r.state, r.now, r.delta, ())
        r.delta = EMPTY
        sent = nbytes = 0
        for nid in list(cursors):
            if nid not in r.state.nodes:
                del cursors[nid]
                continue
            msgs = cursors[nid].update(hub)
            sent += bool(msgs)
            nbytes += sum(len(wire.message_json(m)) for m in msgs)
            if probe:
                for m in msgs:
                    wire.frame(m, compress=True)
        for nid in r.state.nodes:
            if nid not in cursors:
                cursors[nid] = StreamCursor(nid)
                fm = cursors[nid].full_map(hub)
                wire.full_map_json(fm)
                if probe:
                    wire.frame_full(fm, compress=True)
        cpu = time.process_time() - c0
        if prof:
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
        print(f"  {label:7} CPU {cpu:7.3f} s   streams messaged {sent:5}   bytes {nbytes / 1024:9.1f} KiB", flush=True)
        if probe:
            probe.mark(f"after the {label} and every stream's update")
        figures[label] = Figures(cpu, sent, nbytes)

    user, tags = sc.node(n + 5)  # a team member, not an admin (admins see everyone)
    newcomer: list[int] = []
    change("join", lambda: newcomer.append(_register(r, rnd, uids[sc.users.index(user)], tags, "newcomer")))
    device = next(nid for nid, node in r.state.nodes.items() if not node.tags)
    change("tag", lambda: r.run(lambda s: c.decide_set_tags(s, str(device), ("tag:svc1",))))
    change("delete", lambda: r.run(lambda s: c.decide_delete_node(s, str(newcomer[0]))))
    change("policy", lambda: r.run(lambda s: c.decide_set_policy(s, sc.policy_b, source="bench")))
    if probe:
        census(hub, wire, cursors.values())
        probe.stop()
    return figures


def curve(results: dict[tuple[str, int], dict[str, Figures]]) -> str:
    """The table of every (scenario, size)'s changes, with growth factors from the
    previous size of the same scenario (see the module docstring)."""
    lines = [
        f"{'scenario':8} {'nodes':>6} {'change':7} {'CPU s':>8} {'affected':>8} {'ms/affected':>11}"
        f" {'nodes x':>7} {'CPU x':>6} {'affected x':>10} {'ms/aff x':>8}"
    ]
    previous: dict[str, tuple[int, dict[str, Figures]]] = {}
    for (name, n), changes in results.items():
        before = previous.get(name)
        for label, f in changes.items():
            per = 1000 * f.cpu / f.sent if f.sent else float("nan")
            growth = f"{'':>7} {'':>6} {'':>10} {'':>8}"
            if before is not None and label in before[1]:
                b = before[1][label]
                bper = 1000 * b.cpu / b.sent if b.sent else float("nan")
                growth = (
                    f"{n / before[0]:7.2f} {_ratio(f.cpu, b.cpu):>6} {_ratio(f.sent, b.sent):>10}"
                    f" {_ratio(per, bper):>8}"
                )
            lines.append(f"{name:8} {n:6} {label:7} {f.cpu:8.3f} {f.sent:8} {per:11.3f} {growth}")
        previous[name] = (n, changes)
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and b == b and a == a else "-"


def bench_hub_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tailledger bench hub", description=__doc__)
    parser.add_argument("--scenario", default="corp", help="comma-separated scenarios: corp, flat")
    parser.add_argument("--nodes", default="1000", help="comma-separated tailnet sizes")
    parser.add_argument("--profile", default=None, help="profile this change (join, tag, delete, policy)")
    parser.add_argument("--memory", action="store_true",
                        help="trace allocations: what each step leaves allocated per node, by site, "
                             "and a census of the shared structures (cli/bench/hub_memory.py)")
    args = parser.parse_args(argv)
    names = args.scenario.split(",")
    for name in names:
        if name not in ("corp", "flat"):
            parser.error(f"unknown scenario {name!r} (choose corp or flat)")
    try:
        sizes = [int(x) for x in args.nodes.split(",")]
    except ValueError:
        parser.error(f"--nodes takes comma-separated whole numbers, not {args.nodes!r}")
    if any(n < 1 for n in sizes):
        parser.error("--nodes: every size must be at least 1")
    results = {(name, n): run(name, n, args.profile, args.memory) for name in names for n in sizes}
    if len(results) > 1:
        print()
        print(curve(results))
    return 0
