"""Where the control logic's decisions become events: one transaction per login.

The control handler decides nothing itself. Every change a node makes (a login, a
re-key, a logout, routes and host name from its Hostinfo) is a pure decision of
:mod:`projections.commands` (``decide_login_*``, ``decide_host_report``), taken against
the current state with the server's :class:`~projections.commands.LoginRules`
(:meth:`Decisions.rules`) and appended to the log by
:meth:`~projections.service.Tailnet.execute` as one transaction
(:meth:`Decisions.append`), retried against the new state if another writer came
first. What a decision refused without failing (routes that are not prefixes, tags
the node may not claim) is only logged here: the node still logs in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from eventlog import Actor
from projections import Tailnet
from projections import commands as c
from projections.policystate import PolicyCompiler
from projections.state import TailnetState

from .settings import ControlSettings

__all__ = ["Decisions"]

log = logging.getLogger(__name__)


class Decisions:
    """Decides logins with the server's rules and appends them.

    Args:
        tailnet: commands and the current projection.
        settings: the address plan, key expiry and limits a login is decided with.
        policy: the routes its autoApprovers approve.
        randbelow: randomness for random address allocation.
    """

    def __init__(
        self,
        tailnet: Tailnet,
        settings: ControlSettings,
        policy: PolicyCompiler,
        randbelow: Callable[[int], int],
    ) -> None:
        self._tailnet = tailnet
        self._settings = settings
        self._policy = policy
        self._randbelow = randbelow

    def rules(self) -> c.LoginRules:
        """The settings a login is decided with (see ``commands.decide_login_*``)."""
        limits = self._settings.limits
        return c.LoginRules(
            plan=self._settings.plan,
            node_key_expiry=self._settings.node_key_expiry,
            max_hostname_length=limits.max_hostname_length,
            max_routes=limits.max_advertised_routes,
            randbelow=self._randbelow,
            auto_approve=self._policy.auto_approved,
        )

    async def append(self, decide: Callable[[TailnetState], c.Decision[int]], actor: Actor, node_id: int) -> int:
        """Append one login's decision (one transaction) and log what it refused."""
        decided: list[c.Decision[int]] = []

        def remember(state: TailnetState) -> c.Decision[int]:
            decided.append(decide(state))
            return decided[-1]

        result, _ = await self._tailnet.execute(remember, actor=actor)
        refused = decided[-1].meta.get("routes_refused") if decided else None
        if refused:
            log.info("node %d advertised invalid routes: %s", result or node_id, refused)
        refused = decided[-1].meta.get("tags_refused") if decided else None
        if refused:
            log.info("node %d: %s", result or node_id, refused)
        return result
