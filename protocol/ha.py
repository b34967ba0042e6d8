"""Route high availability and policy auto-approvals (trio adapters).

:class:`PolicyAutoApprover`: when a policy change makes its autoApprovers approve routes
that nodes already advertise, the approvals are appended as events (actor
``system:policy-auto-approver``), not implied at compile time, so that the log says
when a route came into service and an admin can revoke one (``routes reject``).

:class:`RouteFailover`:

When several nodes serve one subnet prefix, one of them, the primary, carries it in
its peers' AllowedIPs and PrimaryRoutes. This task watches the log and the presence of
nodes; whenever the primary of a prefix is offline while another router of it is
online, or the election in force differs from what the log records, it appends
``route.primary_changed`` events (actor ``system:ha``), decided by
:func:`projections.commands.decide_route_primaries`. The fold and the route election
then move the prefix, and every map stream gets the new peers. A primary that comes
back stays secondary (no flapping), as in Tailscale and Headscale.

Right after start-up every node is offline until it reconnects, so for
``startup_grace`` seconds the election is recorded but nothing fails over for being
offline.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import trio

from eventlog import Actor, ActorKind, RecordedEvent, caused_by
from eventlog.events import PolicySet
from projections import commands as c
from projections.errors import CommandError
from projections.policy.ipset import prefix_str
from projections.policy.tailnet import Tailnet as PolicyTailnet
from projections.policystate import PolicyCompiler, auto_approvals
from projections.presence import PresenceTable
from projections.service import Tailnet
from projections.state import TailnetState

__all__ = ["AUTO_APPROVER_ACTOR", "HA_ACTOR", "PolicyAutoApprover", "RouteFailover", "subnet_routers"]

log = logging.getLogger(__name__)

#: Who records primary changes.
HA_ACTOR = Actor(kind=ActorKind.SYSTEM, id="ha")
#: Who records the approvals a policy change implies.
AUTO_APPROVER_ACTOR = Actor(kind=ActorKind.SYSTEM, id="policy-auto-approver")
#: How far back (events) the policy change that caused auto-approvals is looked for.
_CAUSE_LOOKBACK = 64


class PolicyAutoApprover:
    """Appends the route approvals each policy change newly implies."""

    def __init__(self, tailnet: Tailnet) -> None:
        self.tailnet = tailnet
        #: The policy whose approvals are recorded (the one in force at start-up).
        self.policy_text = tailnet.state.policy_text

    async def check(self) -> int:
        """If the policy changed, approve what it newly auto-approves; returns the
        number of nodes whose approvals grew."""
        state = self.tailnet.state
        if state.policy_text == self.policy_text:
            return 0
        old_text, new_text = self.policy_text, state.policy_text

        def decide(s: TailnetState) -> c.Decision[int]:
            old = auto_approvals(old_text, s)
            new = auto_approvals(new_text, s)
            newly = {nid: tuple(set(routes) - set(old.get(nid, ()))) for nid, routes in new.items()}
            return c.decide_policy_auto_approvals(s, newly)

        # The approvals are caused by the policy change: they share its correlation id
        # and reason, so the log (and replay diff) ties them to the change and its author.
        cause = await self._policy_event(state)
        try:
            with caused_by(correlation_id=cause.correlation_id, reason=cause.reason) if cause else nullcontext():
                count, _ = await self.tailnet.execute(decide, actor=AUTO_APPROVER_ACTOR)
        except CommandError as exc:  # retried on the next change
            log.warning("policy auto-approvals not recorded: %s", exc)
            return 0
        self.policy_text = new_text
        if count:
            log.info("policy change: routes auto-approved on %d node(s)", count)
        return count

    async def _policy_event(self, state: TailnetState) -> RecordedEvent | None:
        """The recent ``policy.set`` that put ``state``'s policy in force, if any (an older
        one, such as the policy in force at start-up, causes no approvals of its own)."""
        recent = await self.tailnet.log.read(max(0, state.seq - _CAUSE_LOOKBACK), _CAUSE_LOOKBACK)
        for rec in reversed(recent):
            if rec.seq <= state.seq and isinstance(rec.event, PolicySet):
                return rec if rec.event.text == state.policy_text else None
        return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Approve what each policy change newly auto-approves, until cancelled.

        A run-once job: on several replicas only the leader runs it
        (:func:`cli.leader.while_leading`). Each run starts from the policy in force
        then, as a server starting up does: a new leader does not redo its
        predecessor's approvals (which an admin may have revoked since).
        """
        self.policy_text = self.tailnet.state.policy_text
        wake = _Wake()
        with self.tailnet.runner.subscribe(wake.set) as subscription:
            task_status.started()
            while True:
                subscription.take()
                await self.check()
                await wake.wait()


def subnet_routers(tailnet: PolicyTailnet) -> dict[str, list[int]]:
    """Prefix -> the nodes serving it as a subnet route, in id order: from the
    tailnet's router list (kept across compiles), not from every node."""
    routers: dict[str, list[int]] = {}
    for info in tailnet.routers():
        for route in info.subnet_routes:
            routers.setdefault(prefix_str(route), []).append(info.id)
    return routers


class RouteFailover:
    """Keeps the recorded primary of every subnet prefix on an online router."""

    def __init__(
        self,
        tailnet: Tailnet,
        presence: PresenceTable,
        policy: PolicyCompiler,
        *,
        startup_grace: float = 10.0,
        debounce: float = 0.2,
    ) -> None:
        self.tailnet = tailnet
        self.presence = presence
        self.policy = policy
        self.startup_grace = startup_grace
        self.debounce = debounce
        #: Primary changes recorded by this process.
        self.changes = 0

    def _online(self, node_id: int) -> bool:
        p = self.presence.get(node_id)
        return p is not None and p.online

    def _decide(self, state: TailnetState, *, failover: bool) -> c.Decision[int]:
        compiled = self.policy.compiled(state)
        routers = subnet_routers(compiled.tailnet)
        elected = {prefix_str(p): n for p, n in compiled.primaries.items()}
        return c.decide_route_primaries(state, elected, routers, self._online, failover=failover)

    async def check(self, *, failover: bool = True) -> int:
        """Decide and record now; returns the number of primary changes."""
        try:
            count, recorded = await self.tailnet.execute(
                lambda s: self._decide(s, failover=failover), actor=HA_ACTOR
            )
        except CommandError as exc:  # the log cannot record it now: the next wake retries
            log.warning("route HA: primary changes not recorded: %s", exc)
            return 0
        for rec in recorded:
            ev = rec.event
            log.info(
                "route HA: %s primary %s -> %s (%s)",
                getattr(ev, "prefix", "?"), getattr(ev, "previous_node_id", None),
                getattr(ev, "node_id", None), getattr(ev, "reason", ""),
            )
        self.changes += count
        return count

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check on every change of the log or of a node's presence, until cancelled."""
        wake = _Wake()
        subscription = self.tailnet.runner.subscribe(wake.set)
        watcher = self.presence.watch(wake.set)
        grace_ends = trio.current_time() + self.startup_grace
        try:
            task_status.started()
            while True:
                subscription.take()
                watcher.take()
                in_grace = trio.current_time() < grace_ends
                await self.check(failover=not in_grace)
                with trio.move_on_at(grace_ends if in_grace else float("inf")):
                    await wake.wait()
                    # Changes come in bursts (a reconnect herd, a registration's events):
                    # decide once per burst.
                    await trio.sleep(self.debounce)
        finally:
            watcher.close()
            subscription.close()


class _Wake:
    """A level-triggered wake-up: set from synchronous callbacks, cleared on waking."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()
