"""Helpers that drive real commands into a real (in-memory) log for projection tests."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from eventlog import AppendRequest, RecordedEvent, SQLiteEventStore
from projections import AddressPlan, CommandError, Decision, TailnetState, apply
from projections import commands as c
from projections.delta import EMPTY, Delta
from projections.ipam import DEFAULT_V4, DEFAULT_V6, AllocationMode
from tests.conftest import ADMIN

T = TypeVar("T")
PLAN = AddressPlan(DEFAULT_V4, DEFAULT_V6)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Recorder:
    """Decide commands against the folded state and record them in a real store."""

    def __init__(self) -> None:
        self.store = SQLiteEventStore(":memory:")
        self.state = TailnetState()
        self.events: list[RecordedEvent] = []
        self.now = T0
        #: What changed since a consumer last reset it to EMPTY (merged deltas).
        self.delta: Delta = EMPTY

    def run(self, decide: Callable[[TailnetState], Decision[T]]) -> T:
        decision = decide(self.state)
        if decision.events:
            self.now += timedelta(seconds=1)
            [result] = self.store.append_batch(
                [AppendRequest(events=decision.events, actor=ADMIN, expected_seq=self.state.seq)],
                int(self.now.timestamp() * 1_000_000),
            )
            assert isinstance(result, tuple)
            for rec in result:
                self.state, delta = apply(self.state, rec)
                self.delta = self.delta.merge(delta)
            self.events.extend(result)
        return decision.result

    def try_run(self, decide: Callable[[TailnetState], Decision[T]]) -> T | None:
        try:
            return self.run(decide)
        except CommandError:
            return None

    def user(self, name: str) -> int:
        return self.run(lambda s: c.decide_create_user(s, name))

    def node(self, user_id: int, hostname: str, *, tags: tuple[str, ...] = (), key: str | None = None) -> int:
        node_key = key or f"{random.getrandbits(256):064x}"
        return self.run(
            lambda s: c.decide_register_node(
                s, machine_key=f"{random.getrandbits(256):064x}", node_key=node_key,
                hostname=hostname, user_id=user_id, tags=tags, ephemeral=False, expiry=None,
                auth="cli", preauth_key=None, plan=PLAN,
            )
        )


def _routers(state: TailnetState) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for node in state.nodes.values():
        for route in node.approved_routes:
            out.setdefault(route, []).append(node.id)
    return out


def random_history(ops: list[tuple[int, int]], seed: int = 0) -> Recorder:
    """Interpret ``ops`` as a random but valid history of commands."""
    rnd = random.Random(seed)
    r = Recorder()
    random_plan = AddressPlan(DEFAULT_V4, DEFAULT_V6, AllocationMode.RANDOM)
    for op, arg in ops:
        users = sorted(r.state.users)
        nodes = sorted(r.state.nodes)
        pick_user = str(users[arg % len(users)]) if users else "0"
        pick_node = str(nodes[arg % len(nodes)]) if nodes else "0"
        match op:
            case 0:
                r.try_run(lambda s: c.decide_create_user(s, f"user{arg}"))
            case 1:
                r.try_run(lambda s: c.decide_rename_user(s, pick_user, f"renamed{arg}"))
            case 2:
                r.try_run(lambda s: c.decide_delete_user(s, pick_user))
            case 3 | 4:
                if users:
                    plan = random_plan if arg % 3 == 0 else PLAN
                    r.try_run(
                        lambda s: c.decide_register_node(
                            s, machine_key=f"{rnd.getrandbits(256):064x}",
                            node_key=f"{rnd.getrandbits(256):064x}", hostname=f"Host {arg % 7}",
                            user_id=users[arg % len(users)], tags=("tag:a",) if arg % 5 == 0 else (),
                            ephemeral=arg % 4 == 0, expiry=None, auth="cli", preauth_key=None,
                            plan=plan, randbelow=rnd.randrange,
                        )
                    )
            case 5:
                r.try_run(lambda s: c.decide_delete_node(s, pick_node))
            case 6:
                r.try_run(lambda s: c.decide_rename_node(s, pick_node, f"n{arg}"))
            case 7:
                r.try_run(lambda s: c.decide_set_tags(s, pick_node, (f"tag:t{arg % 3}",)))
            case 8:
                r.try_run(lambda s: c.decide_expire_node(s, pick_node, now=r.now))
            case 9:
                if nodes:
                    node = r.state.nodes[int(pick_node)]
                    r.try_run(
                        lambda s: c.decide_rotate_node_key(
                            s, node, node_key=f"{rnd.getrandbits(256):064x}", expiry=None
                        )
                    )
            case 10:
                r.try_run(lambda s: c.decide_approve_routes(s, pick_node, (f"10.{arg % 256}.0.0/16",)))
                # Route HA records primaries (by approvals alone here; the server uses
                # the policy's election) and moves them off "offline" routers.
                r.try_run(lambda s: c.decide_route_primaries(s, {}, _routers(s), lambda i: (i + arg) % 2 == 0))
            case 11:
                r.try_run(
                    lambda s: c.decide_create_preauth_key(
                        s, user=pick_user, reusable=arg % 2 == 0, ephemeral=False, tags=(),
                        expires_at=None, now=r.now, prefix=f"p{arg}", secret=f"s{arg}",
                    )
                )
            case _:
                if r.state.preauth_keys:
                    keys = sorted(r.state.preauth_keys)
                    r.try_run(lambda s: c.decide_expire_preauth_key(s, str(keys[arg % len(keys)])))
    return r
