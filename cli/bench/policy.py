"""``bench_policy``: how the policy engine scales (figures only, no assertions).

Generates a synthetic tailnet -- by default 10,000 nodes, 500 users,
200 tags and a 1,000-rule policy -- and prints, with ``time.perf_counter``
and ``tracemalloc``:

1. a full compile (:func:`projections.policy.compile_policy`);
2. one node's netmap (packet filter, peers, SSH, caps) on that compile;
3. one node joining incrementally (:meth:`CompiledPolicy.with_node`)
   plus the new node's netmap;
4. the same join done as a full recompile plus the node's netmap;

each as seconds, peak MiB and a ratio to the full compile. The generator is
seeded, so runs are comparable; timings are whatever the machine gives.

Usage::

    python -m cli.bench.policy [--nodes N] [--users N] [--tags N] [--rules N] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import random
import time
import tracemalloc
from collections.abc import Callable
from typing import TypeVar

from projections.policy import (
    CompiledPolicy,
    PolicyNode,
    PolicyUser,
    Tailnet,
    check_policy,
    compile_policy,
    parse_policy,
)

__all__ = ["bench_policy_main", "synthetic_tailnet"]

_T = TypeVar("_T")
_P = TypeVar("_P")


def synthetic_tailnet(
    nodes: int, users: int, tags: int, rules: int, seed: int
) -> tuple[str, list[PolicyUser], list[PolicyNode]]:
    """A seeded synthetic policy text, users and nodes.

    Users own ~70% of the nodes; the rest are tagged (one or two tags). One
    node in 50 is a subnet router. Rules mix group, user, tag, autogroup and
    CIDR sources and destinations, a few ``autogroup:self`` and grant rules,
    and an SSH section.
    """
    rng = random.Random(seed)
    user_list = [
        PolicyUser(id=i + 1, login=f"user{i}@example.com", name=f"user{i}") for i in range(users)
    ]
    tag_names = [f"tag:t{i}" for i in range(tags)]
    groups = {
        f"group:g{i}": rng.sample([u.login for u in user_list], k=min(10, users)) for i in range(50)
    }
    node_list: list[PolicyNode] = []
    for i in range(nodes):
        v4 = f"100.{64 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"
        v6 = f"fd7a:115c:a1e0::{i:x}"
        routes: tuple[str, ...] = ()
        if i % 50 == 0:
            routes = (f"10.{(i // 50) % 256}.{(i // 12800) % 256}.0/24",)
        if rng.random() < 0.7:
            node_list.append(
                PolicyNode(
                    id=i + 1,
                    name=f"n{i}",
                    user_id=rng.randrange(users) + 1,
                    ipv4=v4,
                    ipv6=v6,
                    routable_ips=routes,
                    approved_routes=routes,
                )
            )
        else:
            node_list.append(
                PolicyNode(
                    id=i + 1,
                    name=f"n{i}",
                    tags=tuple(rng.sample(tag_names, k=rng.choice((1, 2)))),
                    ipv4=v4,
                    ipv6=v6,
                    routable_ips=routes,
                    approved_routes=routes,
                )
            )
    sources: list[Callable[[], str]] = [
        lambda: rng.choice(list(groups)),
        lambda: rng.choice(user_list).login,
        lambda: rng.choice(tag_names),
        lambda: "autogroup:member",
        lambda: f"10.{rng.randrange(256)}.0.0/16",
    ]
    acls = []
    for _ in range(rules * 9 // 10):
        src = [rng.choice(sources)() for _ in range(rng.choice((1, 2)))]
        dst = [f"{rng.choice(tag_names)}:{rng.choice(('22', '80,443', '5432', '*'))}"]
        acls.append({"action": "accept", "src": src, "dst": dst})
    for _ in range(rules // 20):
        acls.append({"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]})
    grants = [
        {
            "src": [rng.choice(list(groups))],
            "dst": [rng.choice(tag_names)],
            "ip": ["tcp:443"],
            "app": {"example.com/cap/web": [{"role": "reader"}]},
        }
        for _ in range(rules - len(acls))
    ]
    policy = {
        "groups": groups,
        "tagOwners": {t: ["group:g0"] for t in tag_names},
        "hosts": {"corp": "10.0.0.0/8"},
        "acls": acls,
        "grants": grants,
        "ssh": [
            {
                "action": "accept",
                "src": ["autogroup:member"],
                "dst": ["autogroup:self"],
                "users": ["root"],
            },
            {
                "action": "check",
                "src": ["group:g1"],
                "dst": [tag_names[0]],
                "users": ["autogroup:nonroot"],
            },
        ],
        "autoApprovers": {"routes": {"10.0.0.0/8": [tag_names[1]]}},
    }
    return json.dumps(policy, indent=1), user_list, node_list


def _measure(prepare: Callable[[], _P], run: Callable[[_P], _T]) -> tuple[_T, float, float]:
    """Time ``run(prepare())`` untraced, then trace a second run for its peak.

    Tracing slows Python down several times, so time and memory come from
    two runs on separately prepared inputs; ``prepare`` itself is neither
    timed nor traced. Returns (result of the timed run, seconds, peak MiB).
    """
    subject = prepare()
    start = time.perf_counter()
    result = run(subject)
    elapsed = time.perf_counter() - start
    subject = prepare()
    tracemalloc.start()
    run(subject)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, elapsed, peak / (1 << 20)


def bench_policy_main(argv: list[str]) -> int:
    """Run the benchmark and print its figures. Returns 0."""
    parser = argparse.ArgumentParser(prog="bench_policy", description=__doc__)
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--tags", type=int, default=200)
    parser.add_argument("--rules", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    text, users, nodes = synthetic_tailnet(args.nodes, args.users, args.tags, args.rules, args.seed)
    # The joining node is a user's device: it belongs to autogroup:member, a
    # user and that user's groups, the most widely referenced identities.
    joining = next(n for n in reversed(nodes) if n.user_id is not None and not n.routable_ips)
    existing = [n for n in nodes if n is not joining]
    policy = parse_policy(text)
    tailnet = Tailnet(users, existing)
    check_policy(policy, users, existing)
    print(
        f"synthetic tailnet: {len(existing)} nodes (+1 joining), {len(users)} users, "
        f"{args.tags} tags, {len(policy.acls or ()) + len(policy.grants or ())} rules"
    )

    def nothing() -> None:
        return None

    def warm() -> CompiledPolicy:
        # A running server has the shared per-compile state already built.
        compiled = compile_policy(policy, tailnet)
        _ = compiled.primaries, compiled.node_attrs, compiled.global_matches
        return compiled

    probe = existing[0].id
    _, full_s, full_mb = _measure(nothing, lambda _: compile_policy(policy, tailnet))
    _, map_s, map_mb = _measure(warm, lambda c: c.netmap(probe))
    _, join_s, join_mb = _measure(warm, lambda c: c.with_node(joining))
    _, join_map_s, join_map_mb = _measure(
        lambda: warm().with_node(joining), lambda c: c.netmap(joining.id)
    )
    _, re_s, re_mb = _measure(
        nothing, lambda _: compile_policy(policy, tailnet.with_node(joining)).netmap(joining.id)
    )

    def row(label: str, seconds: float, mib: float) -> None:
        ratio = seconds / full_s if full_s else float("nan")
        print(f"  {label:<38} {seconds * 1000:10.1f} ms  {mib:8.1f} MiB peak  {ratio:7.3f}x full")

    print("figures (ratio = time / full compile time):")
    row("full compile", full_s, full_mb)
    row("one node's netmap", map_s, map_mb)
    row("node joins: incremental compile", join_s, join_mb)
    row("node joins: its netmap", join_map_s, join_map_mb)
    row("node joins: incremental total", join_s + join_map_s, max(join_mb, join_map_mb))
    row("node joins: full recompile + netmap", re_s, re_mb)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(bench_policy_main(sys.argv[1:]))
