"""Helpers that drive real commands into a real (in-memory) log for projection tests."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from eventlog import Actor, AppendRequest, RecordedEvent, SQLiteEventStore
from projections import AddressPlan, CommandError, Decision, TailnetState, apply
from projections import commands as c
from projections.delta import EMPTY, Delta
from projections.ipam import DEFAULT_V4, DEFAULT_V6, AllocationMode
from projections.mapviews.hub import MapHub
from projections.presence import NodePresence
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

    def run(
        self,
        decide: Callable[[TailnetState], Decision[T]],
        *,
        actor: Actor = ADMIN,
        step: timedelta = timedelta(seconds=1),
    ) -> T:
        """Decide against the state; record the events (by ``actor``, ``step`` after the
        last ones) and fold them; return the decision's result."""
        decision = decide(self.state)
        if decision.events:
            self.now += step
            [result] = self.store.append_batch(
                [AppendRequest(events=decision.events, actor=actor, expected_seq=self.state.seq)],
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


#: How many operations :meth:`RandomHistory.step` knows: draw ``op`` from ``range(OPS)``.
OPS = 17
_ADVERTISED = [("10.1.0.0/16",), ("10.1.0.0/16", "10.2.0.0/16"), ("0.0.0.0/0", "::/0"), ()]


class RandomHistory:
    """Interpret ``(op, arg)`` pairs as a random but valid history of real commands.

    The one random-history builder of the tests (fold, replay, policy and map-hub
    tests all draw from it): each :meth:`step` decides one command against the folded
    state and records it in a real log (:class:`Recorder`); a command the state refuses
    is skipped, as the server would answer it with an error.  ``op`` picks the command
    (``0 <= op < OPS``), ``arg`` picks its target and arguments.  A caller can look at
    the recorder's state and delta between steps (the map-hub test advances its hub
    after each one).

    Besides commands, two steps change what is not in the log: op 15 toggles a node's
    presence (:attr:`presence`, :attr:`changed_presence`, for map tests) and op 16
    lets time pass (expiries come due).  Op 14 sets one of ``policies`` (none given:
    it does nothing).
    """

    def __init__(
        self, *, seed: int = 0, users: Sequence[str] = (), policies: Sequence[str | None] = ()
    ) -> None:
        self.recorder = Recorder()
        self.policies = policies
        self.presence: dict[int, NodePresence] = {}
        #: Nodes whose presence changed since a consumer last cleared it.
        self.changed_presence: set[int] = set()
        self._rnd = random.Random(seed)
        self._random_plan = AddressPlan(DEFAULT_V4, DEFAULT_V6, AllocationMode.RANDOM)
        for name in users:
            self.recorder.user(name)

    def _key(self) -> str:
        return f"{self._rnd.getrandbits(256):064x}"

    def advance(self, hub: MapHub) -> None:
        """Bring ``hub`` to the recorder's state: the log's changes and the presence
        changes since the last call (both then cleared), at the recorder's time."""
        r = self.recorder
        hub.advance(r.state, r.now, r.delta, set(self.changed_presence))
        r.delta = EMPTY
        self.changed_presence.clear()

    def step(self, op: int, arg: int) -> None:
        """Apply the operation ``op`` (see the class docstring) with ``arg``."""
        r = self.recorder
        users = sorted(r.state.users)
        nodes = sorted(r.state.nodes)
        pick_user = str(users[arg % len(users)]) if users else "0"
        pick_node = str(nodes[arg % len(nodes)]) if nodes else "0"
        match op:
            case 0:
                r.try_run(lambda s: c.decide_create_user(s, f"user{arg}"))
            case 1:
                r.try_run(lambda s: c.decide_rename_user(s, pick_user, f"user{arg % 5}"))
            case 2:
                r.try_run(lambda s: c.decide_delete_user(s, pick_user))
            case 3 | 4:
                if users:
                    plan = self._random_plan if arg % 3 == 0 else PLAN
                    tags = ((f"tag:t{arg % 3}",) if arg % 4 == 0 else ()) + (("tag:a",) if arg % 5 == 0 else ())
                    expiry = r.now + timedelta(seconds=5 + arg % 20) if arg % 6 == 0 else None
                    r.try_run(
                        lambda s: c.decide_register_node(
                            s, machine_key=self._key(), node_key=self._key(), hostname=f"Host {arg % 7}",
                            user_id=users[arg % len(users)], tags=tags, ephemeral=arg % 8 == 1,
                            expiry=expiry, auth="cli", preauth_key=None, plan=plan, randbelow=self._rnd.randrange,
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
                    r.try_run(lambda s: c.decide_rotate_node_key(s, node, node_key=self._key(), expiry=None))
            case 10:
                # Approve what the node advertises, or (as an admin may) a route it does not.
                if nodes:
                    advertised = r.state.nodes[int(pick_node)].advertised_routes
                    routes = advertised[: 1 + arg % 2] if advertised else (f"10.{arg % 256}.0.0/16",)
                    r.try_run(lambda s: c.decide_approve_routes(s, pick_node, tuple(routes)))
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
            case 12:
                if r.state.preauth_keys:
                    keys = sorted(r.state.preauth_keys)
                    r.try_run(lambda s: c.decide_expire_preauth_key(s, str(keys[arg % len(keys)])))
            case 13:
                if nodes:
                    node = r.state.nodes[int(pick_node)]
                    r.try_run(lambda s: c.decide_advertise_routes(s, node, _ADVERTISED[arg % len(_ADVERTISED)]))
            case 14:
                if self.policies:
                    text = self.policies[arg % len(self.policies)]
                    if text is not None:
                        r.try_run(lambda s: c.decide_set_policy(s, text, source="test"))
            case 15:
                if nodes:
                    old = self.presence.get(int(pick_node), NodePresence())
                    self.presence[int(pick_node)] = NodePresence(
                        online=not old.online, endpoints=(f"192.0.2.{arg % 200}:41641",),
                        home_derp=1 + arg % 3, last_seen=r.now, disco_key=old.disco_key,
                    )
                    self.changed_presence.add(int(pick_node))
            case 16:
                r.now += timedelta(seconds=arg % 30)
            case _:
                raise ValueError(f"no operation {op} (0 <= op < {OPS})")


def random_history(ops: Iterable[tuple[int, int]], seed: int = 0) -> Recorder:
    """The recorder of a :class:`RandomHistory` after all of ``ops``."""
    history = RandomHistory(seed=seed)
    for op, arg in ops:
        history.step(op, arg)
    return history.recorder
