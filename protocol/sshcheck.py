"""Tailscale SSH check mode: ``/machine/ssh/action/…``, the hold-and-delegate flow.

An ``ssh`` rule with ``"action": "check"`` compiles to an SSHAction whose
``holdAndDelegate`` URL is ``<server>/machine/ssh/action/$SRC_NODE_ID/to/$DST_NODE_ID
?local_user=$LOCAL_USER``. When someone connects, the destination node (the SSH server)
holds the connection and asks that URL over its Noise tunnel:

1. If an earlier approval of that source node and local user (recorded in the log) is
   still within the ``checkPeriod`` of the rule holding this connection, the answer is
   *accept*: an approval is a check of the person, valid for each destination as long
   as that destination's rule says.
2. Otherwise a check is opened (beside the log, like a pending registration, for
   :data:`CHECK_TTL`) and the answer delegates again, with a message the SSH user sees:
   where to have it approved (``/ssh/check/<id>`` on the server, or
   ``tailledger ssh approve <id>``), and a URL that names the check.
3. The node asks that URL; the request is held until an admin approves or rejects
   the check (``ssh.check_approved`` / ``ssh.check_rejected`` events, with the admin as
   actor), or for :data:`HOLD_SECONDS`, after which it is told to ask again.

Only the destination node may ask about connections to itself.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final
from urllib.parse import parse_qs, quote, urlsplit

import msgspec
import trio

from eventlog import Actor
from projections import commands as c
from projections.admin import JSON, AdminOps
from projections.errors import CommandError, NotFoundError
from projections.policy.wire import SSHAction
from projections.service import Tailnet
from projections.state import TailnetState

from .handler import NoiseRequest, NoiseResponse
from .tokens import pasteable_token

__all__ = ["CHECK_TTL", "HOLD_SECONDS", "CheckPeriodOf", "PendingCheck", "SshChecks"]

log = logging.getLogger(__name__)

#: How long an open check waits for an admin.
CHECK_TTL: Final = timedelta(minutes=10)
#: How long one request of the node is held before it is told to ask again.
HOLD_SECONDS: Final = 25.0

#: The ``checkPeriod`` of the rule holding a connection: (state, source node id,
#: destination node id, local user) -> period (``PolicyCompiler.check_period``).
CheckPeriodOf = Callable[[TailnetState, int, int, str], timedelta]

_PATH = re.compile(r"/machine/ssh/action/(\d+)/to/(\d+)")
_ACCEPT: Final = SSHAction(
    accept=True, allow_agent_forwarding=True, allow_local_port_forwarding=True, allow_remote_port_forwarding=True
)


@dataclass
class PendingCheck:
    """A held SSH connection waiting for an admin."""

    check_id: str
    src_node_id: int
    dst_node_id: int
    local_user: str
    created: datetime
    decided: trio.Event = field(default_factory=trio.Event)
    outcome: SSHAction | None = None


def _json(action: SSHAction) -> NoiseResponse:
    return NoiseResponse(200, (("content-type", "application/json"),), msgspec.json.encode(action))


class SshChecks:
    """The check-mode callbacks of one server, and the admin operations deciding them."""

    def __init__(
        self,
        tailnet: Tailnet,
        public_url: Callable[[], str],
        *,
        token: Callable[[], str] | None = None,
        period: CheckPeriodOf | None = None,
    ) -> None:
        self.tailnet = tailnet
        self._public_url = public_url
        self._token = token or (lambda: pasteable_token(12))  # 'tailledger ssh approve ID'
        self._period = period or (lambda state, src, dst, user: c.ssh_check_period(state))
        self.pending: dict[str, PendingCheck] = {}

    def register_admin_ops(self, ops: AdminOps) -> None:
        ops.register("ssh.pending", self._admin_pending)
        ops.register("ssh.approve", self._admin_approve)
        ops.register("ssh.reject", self._admin_reject)

    def check_url(self, check_id: str) -> str:
        return f"{self._public_url()}/ssh/check/{check_id}"

    def _expire(self, now: datetime) -> None:
        for cid, check in list(self.pending.items()):
            if now - check.created > CHECK_TTL:
                del self.pending[cid]
                if check.outcome is None:
                    check.outcome = SSHAction(reject=True, message="The SSH check expired; connect again.\n")
                    check.decided.set()

    async def __call__(self, request: NoiseRequest) -> NoiseResponse:
        parts = urlsplit(request.path)
        match = _PATH.fullmatch(parts.path)
        if match is None or request.method != "GET":
            return NoiseResponse(404, (("content-type", "text/plain"),), b"not found\n")
        src, dst = int(match[1]), int(match[2])
        query = parse_qs(parts.query)
        local_user = (query.get("local_user") or query.get("ssh_user") or [""])[0]
        state = self.tailnet.state
        asker = state.node_by_machine(request.machine_key.hex())
        if asker is None or asker.id != dst or src not in state.nodes:
            return NoiseResponse(403, (("content-type", "text/plain"),), b"not your connection to check\n")
        now = self.tailnet.clock()
        self._expire(now)
        if c.ssh_check_approved(state, src, local_user, now, self._period(state, src, dst, local_user)):
            return _json(_ACCEPT)
        check_id = (query.get("auth_id") or [""])[0]
        check = self.pending.get(check_id)
        if check is not None and check.outcome is not None:  # decided before the node asked again
            return _json(check.outcome)
        if check is None or (check.src_node_id, check.dst_node_id, check.local_user) != (src, dst, local_user):
            check = PendingCheck(self._token(), src, dst, local_user, now)
            self.pending[check.check_id] = check
            who = state.nodes[src].given_name
            message = (
                "# Tailscale SSH requires an additional check.\n"
                f"# To authenticate, visit: {self.check_url(check.check_id)}\n"
                f"# (an admin approves SSH from {who} as {local_user}, or runs: "
                f"tailledger ssh approve {check.check_id})\n"
            )
            again = f"{self._public_url()}{parts.path}?local_user={quote(local_user)}&auth_id={check.check_id}"
            return _json(SSHAction(message=message, hold_and_delegate=again))
        with trio.move_on_after(HOLD_SECONDS):
            await check.decided.wait()
        if check.outcome is None:  # still open: ask again
            again = f"{self._public_url()}{parts.path}?local_user={quote(local_user)}&auth_id={check.check_id}"
            return _json(SSHAction(hold_and_delegate=again))
        return _json(check.outcome)

    # -- admin operations ------------------------------------------------------------

    def view(self, check: PendingCheck) -> dict[str, JSON]:
        state = self.tailnet.state
        src, dst = state.nodes.get(check.src_node_id), state.nodes.get(check.dst_node_id)
        return {
            "id": check.check_id,
            "from": src.given_name if src else str(check.src_node_id),
            "to": dst.given_name if dst else str(check.dst_node_id),
            "local_user": check.local_user,
            "created": check.created.isoformat().replace("+00:00", "Z"),
        }

    async def _admin_pending(self, raw: dict[str, object], actor: Actor) -> JSON:
        self._expire(self.tailnet.clock())
        return [self.view(p) for p in self.pending.values() if p.outcome is None]

    def _open(self, raw: dict[str, object]) -> PendingCheck:
        check_id = raw.get("id")
        if not isinstance(check_id, str):
            raise CommandError("give the check's id")
        self._expire(self.tailnet.clock())
        check = self.pending.get(check_id)
        if check is None or check.outcome is not None:
            raise NotFoundError(f"no open SSH check {check_id!r} (it may have expired)")
        return check

    async def decide(self, check: PendingCheck, *, approve: bool, actor: Actor, reason: str = "") -> JSON:
        """Record an admin's decision and release the held connection."""
        now = self.tailnet.clock()
        until, _ = await self.tailnet.execute(
            lambda s: c.decide_ssh_check(
                s, check_id=check.check_id, src_node_id=check.src_node_id, dst_node_id=check.dst_node_id,
                local_user=check.local_user, approve=approve, now=now, reason=reason,
                period=self._period(s, check.src_node_id, check.dst_node_id, check.local_user),
            ),
            actor=actor,
        )
        if approve:
            check.outcome = _ACCEPT
        else:
            message = f"SSH refused by an admin{': ' + reason if reason else ''}.\n"
            check.outcome = SSHAction(reject=True, message=message)
        check.decided.set()  # kept until it expires: the node may ask again after this
        out = self.view(check)
        out["approved"] = approve
        out["until"] = until.isoformat().replace("+00:00", "Z") if until is not None else None
        return out

    async def _admin_approve(self, raw: dict[str, object], actor: Actor) -> JSON:
        return await self.decide(self._open(raw), approve=True, actor=actor)

    async def _admin_reject(self, raw: dict[str, object], actor: Actor) -> JSON:
        reason = raw.get("reason", "")
        return await self.decide(self._open(raw), approve=False, actor=actor, reason=str(reason or ""))
