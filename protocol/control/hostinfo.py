"""Hostinfo: what a node says about itself, on its way to the presence table and the log.

A node sends its Hostinfo (host name, OS, advertised routes, requested tags, NetInfo)
with its registration and again with map requests whenever it changes. It is the one
thing a node can make the server keep at will, so every Hostinfo passes one gate here,
:class:`HostinfoGate`, in this order:

1. **Ignored** if the node's key expired or it logged out (:meth:`~HostinfoGate.from_map`):
   nothing is appended, nothing is shown to anyone, until it logs in again.
2. **Refused** if too large or with too many routes (:meth:`~HostinfoGate.check`):
   413 on a map request, ``Error`` on a registration.
3. **Rate-limited** if recording it would append events (:meth:`~HostinfoGate.spend`,
   costed by :meth:`~HostinfoGate.cost`): a token bucket per node, 429 on a map request.
4. **Kept**, trimmed as peers see it (:func:`~projections.tailcfg.peer_hostinfo`, the
   host name cleaned and cut), in the presence table with the request's endpoints and
   keys (:meth:`~HostinfoGate.update_presence`): this is what peers are shown.
5. **Recorded**: what decides reachability or is audited (routes, and the approvals the
   policy grants for them, and the host name; :func:`reported`) goes to the log through
   ``commands.decide_host_report`` (:meth:`~HostinfoGate.report`,
   :meth:`~HostinfoGate.apply`), one transaction.

Registration uses steps 2, 3 and :func:`reported` (the login's own decision records the
host); map requests use all of them. Every refusal is counted in
:class:`~protocol.control.settings.ControlStats`.
"""

from __future__ import annotations

import logging
import math

import trio

from eventlog import Actor
from projections import Tailnet
from projections import commands as c
from projections.presence import PresenceTable
from projections.state import Node, TailnetState, shared_with
from projections.tailcfg import Hostinfo, KeyPrefix, MapRequest, encode, parse_key, peer_hostinfo

from ..handler import NoiseResponse
from ..ratelimit import TokenBuckets
from .decisions import Decisions
from .messages import http_error
from .settings import ControlLimits, ControlStats

__all__ = ["HostinfoGate", "reported"]

log = logging.getLogger(__name__)


def reported(hostinfo: Hostinfo | None) -> c.ReportedHost | None:
    """What of a Hostinfo goes to the log (``None``: the client sent none)."""
    if hostinfo is None:
        return None
    return c.ReportedHost(
        hostname=hostinfo.hostname or "", os=hostinfo.os or "", routes=tuple(hostinfo.routable_ips or ()),
        request_tags=tuple(hostinfo.request_tags or ()),
    )


class HostinfoGate:
    """Checks, rate-limits, keeps and records what nodes report about themselves.

    Args:
        tailnet: commands and the current projection.
        presence: where the Hostinfo is kept as peers see it.
        limits: see :class:`~protocol.control.settings.ControlLimits`.
        decisions: appends what is recorded.
        stats: counts what is refused.
    """

    def __init__(
        self,
        tailnet: Tailnet,
        presence: PresenceTable,
        limits: ControlLimits,
        decisions: Decisions,
        stats: ControlStats,
    ) -> None:
        self._tailnet = tailnet
        self._presence = presence
        self._limits = limits
        self._decisions = decisions
        self._stats = stats
        #: Log-writing updates per node (see ControlLimits.node_update_burst).
        self._updates = TokenBuckets(limits.node_update_interval, limits.node_update_burst)

    def prune(self, now: float) -> None:
        """Forget the buckets of nodes that are full again (run now and then)."""
        self._updates.prune(now)

    async def from_map(self, node: Node, mr: MapRequest, actor: Actor) -> NoiseResponse | None:
        """Handle a map request's report (steps 1 to 5); an HTTP error if refused."""
        hostinfo = mr.hostinfo
        if hostinfo is not None and node.is_expired(self._tailnet.clock()):
            # Expired or logged out: what it says about itself is ignored until it
            # logs in again (nothing is appended, nothing is shown to anyone).
            self._stats.expired_updates_ignored += 1
            hostinfo = None
        if hostinfo is not None:
            refused = self.check(hostinfo)
            if refused is None:
                refused = self.spend(node, self.cost(node, hostinfo))
                status = 429
            else:
                status = 413
            if refused is not None:
                return http_error(status, refused)
        self.update_presence(node, mr, hostinfo)
        if hostinfo is not None:
            await self.apply(node.id, hostinfo, actor)
        return None

    def check(self, hostinfo: Hostinfo | None) -> str | None:
        """Why a Hostinfo is refused (too large, too many routes), or ``None``."""
        if hostinfo is None:
            return None
        limits = self._limits
        size = len(encode(hostinfo))
        if size > limits.max_hostinfo_bytes:
            self._stats.hostinfo_too_large += 1
            return f"the Hostinfo is too large: {size} bytes (the limit is {limits.max_hostinfo_bytes})"
        routes = len(hostinfo.routable_ips or ())
        if routes > limits.max_advertised_routes:
            self._stats.too_many_routes += 1
            return f"too many advertised routes: {routes} (the limit is {limits.max_advertised_routes})"
        return None

    def report(self, state: TailnetState, node_id: int, hostinfo: Hostinfo | None) -> c.Decision[int]:
        """The decision recording ``hostinfo`` for the node in ``state``."""
        return c.decide_host_report(
            state, state.nodes[node_id], reported(hostinfo), self._decisions.rules(), now=self._tailnet.clock()
        )

    def cost(self, node: Node, hostinfo: Hostinfo | None) -> int:
        """How many events applying ``hostinfo`` to ``node`` would append now."""
        return len(self.report(self._tailnet.state, node.id, hostinfo).events)

    def spend(self, node: Node, cost: int) -> str | None:
        """Take ``cost`` tokens from the node's update bucket; why not, if it can't."""
        wait = self._updates.take(node.id, cost, trio.current_time())
        if wait is None:
            return None
        self._stats.updates_rate_limited += 1
        log.info("node %d: update refused by the rate limit (%d event(s))", node.id, cost)
        if math.isinf(wait):
            return f"this update would append {cost} events; at most {self._updates.burst} are allowed at once"
        return f"too many updates from this node: try again in {math.ceil(wait)} s"

    async def apply(self, node_id: int, hostinfo: Hostinfo | None, actor: Actor) -> None:
        """Record what in a Hostinfo decides reachability or is audited: routes (and
        the approvals the policy grants for them) and host name, in one transaction."""
        if hostinfo is None or node_id not in self._tailnet.state.nodes:
            return
        await self._decisions.append(
            lambda s: self.report(s, node_id, hostinfo) if node_id in s.nodes else c.Decision((), node_id),
            actor,
            node_id,
        )

    def update_presence(self, node: Node, mr: MapRequest, hostinfo: Hostinfo | None) -> None:
        """Store what a map request says about the node's connection; ``hostinfo`` is
        the request's Hostinfo if it is to be kept (``None`` when ignored)."""
        changes: dict[str, object] = {"cap": mr.version}
        if mr.disco_key and parse_key(KeyPrefix.DISCO, mr.disco_key) is not None:
            changes["disco_key"] = mr.disco_key
        if mr.endpoints or not mr.stream:
            changes["endpoints"] = tuple(mr.endpoints or ())
        if hostinfo is not None:
            # Kept as peers see it: trimmed, the host name cleaned and cut. NetInfo is
            # not kept (clients resend it only when it changes, pitfall 12): its DERP
            # home is, as home_derp, until a NetInfo says otherwise.
            hostname = c.clean_hostname(hostinfo.hostname, self._limits.max_hostname_length)
            if hostname != hostinfo.hostname:
                self._stats.hostnames_cleaned += 1
            # The recorded host name's object when equal: one string per node, not two.
            changes["hostinfo"] = peer_hostinfo(hostinfo, hostname=shared_with(hostname, node.hostname))
            if hostinfo.net_info is not None and hostinfo.net_info.preferred_derp:
                changes["home_derp"] = hostinfo.net_info.preferred_derp
        self._presence.update(node.id, **changes)
