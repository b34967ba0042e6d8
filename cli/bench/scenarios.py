"""Seeded tailnet shapes for benchmarks and tests: ``flat`` and ``corp`` (issue 19).

A scenario says who the users are, what each node is (a user's device or a tagged
server) and which policy texts it runs; it is plain data, so the load generator,
the in-process benchmark and the correctness tests build the very same tailnet.

``corp`` models a segmented company tailnet of *n* nodes:

* ``max(20, n // 10)`` users in 20 team groups (user *i* is in team *i* mod 20),
  the first three also in ``group:admins``;
* every tenth node is a server tagged with one of 20 tags ``tag:svc<k>`` (owned by
  the admins, registered with a tagged key of ``u0``), the others are user devices
  handed out round robin, starting after the admins (so node *n* of an *n*-node
  run, the join phase's newcomer, is a team member's device);
* 166 ACL rules: each team reaches 2 or 3 service tags on ``22,80,443`` (50 rules),
  ``autogroup:member`` reaches ``autogroup:self:*``, each team reaches its own
  members on ``22,5900-5901`` (20), each tag reaches four others on ``5432`` (80),
  the admins reach ``*:*``, and 14 teams reach one more tag on ``8080``;
* 2 grants with an app capability (team *k* to ``tag:svc<k>``, *k* = 0, 1);
* 22 SSH rules: members to their own devices, the admins to every tag as root, and
  each team to its tag in ``check`` mode.

Its policy change (:attr:`Scenario.policy_b`) widens port ranges in 70 rules (each
team's ``5900-5901`` to its own members, and ``5432`` in 50 tag rules): nearly every
node's packet filter changes, nobody's peers do.

``flat`` is one user and an allow-all policy; its policy change narrows ``*:*`` to
``*:1-65535``, which changes every node's filter but no peers.

``churn`` is the ``corp`` tailnet under steady background change; the load generator
runs its churn phase on it (joins and deletes, tag changes, policy edits that switch
between :attr:`Scenario.policy_a` and :attr:`Scenario.policy_b`).

:class:`BenchLog` is where the in-process benchmarks decide such a tailnet: the real
commands, a throw-away log (no fsync), and the state folded as it goes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, TypeVar

from eventlog import Actor, ActorKind, AppendRequest, SQLiteEventStore, to_micros
from projections import EMPTY, Decision, Delta, TailnetState, apply

__all__ = ["SCENARIOS", "BenchLog", "Scenario", "churn", "corp", "flat", "scenario"]

T = TypeVar("T")

#: Who the benchmarks' decisions are recorded as.
BENCH_ACTOR: Final = Actor(kind=ActorKind.SYSTEM, id="bench")


class BenchLog:
    """A tailnet decided by the real commands into a throw-away log (``path``, in memory
    by default; no fsync), folded as it goes. ``delta`` merges what changed until a
    consumer resets it to ``EMPTY``; ``now`` is the time the next events are recorded at.
    """

    def __init__(self, path: str | Path = ":memory:", *, now: datetime | None = None) -> None:
        self.store = SQLiteEventStore(path, synchronous="OFF")
        self.state = TailnetState()
        self.now = now or datetime.now(UTC)
        self.delta: Delta = EMPTY

    def run(self, decide: Callable[[TailnetState], Decision[T]], *, step: timedelta = timedelta(0)) -> T:
        """Decide against the state, record the events ``step`` after the last ones and
        fold them; the decision's result."""
        decision = decide(self.state)
        if decision.events:
            self.now += step
            [recorded] = self.store.append_batch(
                [AppendRequest(events=decision.events, actor=BENCH_ACTOR, expected_seq=self.state.seq)],
                to_micros(self.now),
            )
            assert isinstance(recorded, tuple)
            for event in recorded:
                self.state, delta = apply(self.state, event)
                self.delta = self.delta.merge(delta)
        return decision.result

    def close(self) -> None:
        self.store.close()

TEAMS: Final = 20
TAGS: Final = 20
ADMINS: Final = 3


@dataclass(frozen=True)
class Scenario:
    """A tailnet shape.

    Attributes:
        name: ``flat``, ``corp`` or ``churn``.
        users: user names, in creation order.
        owners: per node, in registration order: the index of its user in ``users``.
        tags: per node: its tags (empty for a user's device).
        policy_a: the policy set before the nodes join.
        policy_b: the policy change the benchmark measures.
    """

    name: str
    users: tuple[str, ...]
    owners: tuple[int, ...]
    tags: tuple[tuple[str, ...], ...]
    policy_a: str
    policy_b: str

    def node(self, index: int) -> tuple[str, tuple[str, ...]]:
        """The user and tags of node ``index`` (any index: the pattern repeats)."""
        i = index % len(self.owners)
        return self.users[self.owners[i]], self.tags[i]


def flat(n: int) -> Scenario:
    """One user, allow-all; the change narrows ``*:*`` to ``*:1-65535``."""
    a = '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}'
    b = '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:1-65535"]}]}'
    return Scenario("flat", ("load",), (0,) * max(n, 1), ((),) * max(n, 1), a, b)


def _user(i: int) -> str:
    return f"u{i}"


def corp(n: int) -> Scenario:
    """The segmented tailnet described in the module docstring (deterministic)."""
    n = max(n, 1)
    nusers = max(TEAMS, n // 10)
    users = tuple(_user(i) for i in range(nusers))
    owners: list[int] = []
    tags: list[tuple[str, ...]] = []
    device = 0
    for i in range(n):
        if i % 10 == 9:
            owners.append(0)  # tagged: the key's user is an admin
            tags.append((f"tag:svc{(i // 10) % TAGS}",))
        else:
            owners.append((device + ADMINS) % nusers)  # devices start at a team member, not an admin
            tags.append(())
            device += 1
    return Scenario("corp", users, tuple(owners), tuple(tags), _corp_policy(users, False), _corp_policy(users, True))


def _corp_policy(users: tuple[str, ...], widened: bool) -> str:
    groups: dict[str, list[str]] = {f"group:team{t}": [] for t in range(TEAMS)}
    for i, name in enumerate(users):
        groups[f"group:team{i % TEAMS}"].append(f"{name}@")
    groups["group:admins"] = [f"{name}@" for name in users[:ADMINS]]
    tag_owners = {f"tag:svc{k}": ["group:admins"] for k in range(TAGS)}
    acls: list[dict[str, object]] = []

    def accept(src: str, dst: str) -> None:
        acls.append({"action": "accept", "src": [src], "dst": [dst]})

    for t in range(TEAMS):
        for k in range(3 if t % 2 == 0 else 2):
            accept(f"group:team{t}", f"tag:svc{(t + k) % TAGS}:22,80,443")
    accept("autogroup:member", "autogroup:self:*")
    for t in range(TEAMS):
        accept(f"group:team{t}", f"group:team{t}:22,{'5900-5902' if widened else '5900-5901'}")
    for k in range(TAGS):
        for j in range(1, 5):
            wide = widened and 4 * k + j <= 50  # the first 50 of these 80 rules
            accept(f"tag:svc{k}", f"tag:svc{(k + j) % TAGS}:{'5432-5433' if wide else '5432'}")
    accept("group:admins", "*:*")
    for t in range(14):
        accept(f"group:team{t}", f"tag:svc{(t + 3) % TAGS}:8080")
    grants = [
        {"src": [f"group:team{k}"], "dst": [f"tag:svc{k}"], "ip": ["443"],
         "app": {"example.com/cap/dashboard": [{"role": "viewer", "team": k}]}}
        for k in range(2)
    ]
    ssh: list[dict[str, object]] = [
        {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"],
         "users": ["autogroup:nonroot", "root"]},
        {"action": "accept", "src": ["group:admins"], "dst": [f"tag:svc{k}" for k in range(TAGS)], "users": ["root"]},
    ]
    ssh += [
        {"action": "check", "src": [f"group:team{t}"], "dst": [f"tag:svc{t}"], "users": ["autogroup:nonroot"]}
        for t in range(TEAMS)
    ]
    return json.dumps({"groups": groups, "tagOwners": tag_owners, "acls": acls, "grants": grants, "ssh": ssh})


def churn(n: int) -> Scenario:
    """The ``corp`` tailnet, named ``churn``: the load generator changes it steadily."""
    return dataclasses.replace(corp(n), name="churn")


SCENARIOS: Final = {"flat": flat, "corp": corp, "churn": churn}


def scenario(name: str, n: int) -> Scenario:
    """The scenario ``name`` for ``n`` nodes (``KeyError`` for an unknown name)."""
    return SCENARIOS[name](n)
