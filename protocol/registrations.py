"""Pending interactive registrations: bounded, expiring, and kept beside the log.

A machine that asks to join without a key (``tailscale up`` with no ``--authkey``) gets
an AuthURL and waits, with a follow-up register request, until an admin approves
(``tailledger nodes register --key ID --user U``) or rejects
(``tailledger nodes reject --key ID --reason TEXT``) it. Anyone who can reach the
control port can make such a request, so what the server keeps of one is bounded:

* only what the approval page and ``nodes pending`` show (hostname, OS, requested tags,
  machine and node key, source address, times), each field trimmed; never the request's
  Hostinfo, which may be a megabyte;
* at most :attr:`PendingLimits.max_total` requests at once, and at most
  :attr:`PendingLimits.max_per_source` from one address (an IPv6 client counts by its
  /64, which one host usually owns whole); a refused request is answered with an error
  the client shows, and counted;
* each expires after :attr:`PendingLimits.ttl`, on a timer (:meth:`PendingRegistrations.run`),
  whether or not other requests arrive.

Requests live in the ``pending_registrations`` side table of the log's database
(:mod:`eventlog.sidetables`), not in memory: a restart, or another replica on the same
database, finds them. They are not events: anyone could make the log grow with them.
An approval is a ``node.registered`` (or ``node.key_rotated``) event with the approving
admin as its actor; a rejection is a ``node.registration_rejected`` event, and the row
stays, marked, until it expires, so the client hears why whenever it asks again.

A waiting client holds a follow-up request open. Its wait (:meth:`PendingRegistrations.wait`)
keeps nothing of the request but the ids: the control handler answers it with a
streamed body that is written when the outcome is known (see ``protocol.control``).
A decision made here wakes the waiter at once; one made by another replica (or an
expiry) is found by the sweep every :attr:`PendingLimits.sweep_interval` seconds.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import TypeVar

import msgspec
import trio

from eventlog import Actor, EventLogError, caused_by, current_cause
from eventlog.sidetables import Admission, PendingRegistration, SideTables
from projections import CommandError, NotFoundError, Tailnet
from projections import commands as c
from projections.admin import AdminOps, BadRequest, decode_args
from projections.tailcfg import Hostinfo

from .tokens import pasteable_token

__all__ = [
    "Approved",
    "Expired",
    "Gone",
    "Outcome",
    "PendingLimits",
    "PendingRegistrations",
    "PendingStats",
    "Rejected",
    "Superseded",
    "request_id",
    "source_of",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Longest hostname kept (Tailscale's OS hostnames are short; this is generous).
MAX_HOSTNAME = 256
#: Longest OS name kept ("linux", "windows", "iOS" …).
MAX_OS = 64
#: Most requested tags kept, and the longest tag.
MAX_TAGS = 16
MAX_TAG = 128


def request_id() -> str:
    """An unguessable request id (the last part of the AuthURL), which an admin pastes
    after ``--key`` (the page prints the command)."""
    return pasteable_token(18)


@dataclass(frozen=True)
class PendingLimits:
    """Bounds on pending registrations (``[limits]`` in the configuration)."""

    max_total: int = 256
    max_per_source: int = 8
    ttl: timedelta = timedelta(minutes=30)
    #: How often expired requests are deleted at the latest, and how soon a waiting
    #: client hears of a decision taken by another replica.
    sweep_interval: float = 5.0


@dataclass
class PendingStats:
    """Counters since start (the ``tailledger_pending_registrations_*`` metrics)."""

    admitted: int = 0
    refused: dict[str, int] = field(default_factory=lambda: {"global": 0, "per_source": 0})
    expired: int = 0
    approved: int = 0
    rejected: int = 0
    #: Requests in the table (waiting or rejected) as of the last change seen here.
    current: int = 0


# -- outcomes of a wait ---------------------------------------------------------------


@dataclass(frozen=True)
class Approved:
    """An admin of this server approved the request: the node it became."""

    node_id: int


@dataclass(frozen=True)
class Rejected:
    reason: str


@dataclass(frozen=True)
class Expired:
    """Nobody decided before the request expired."""


@dataclass(frozen=True)
class Gone:
    """The request left the table, decided elsewhere (another replica approved it, most
    likely): the caller looks for the node in the state."""


@dataclass(frozen=True)
class Superseded:
    """A newer follow-up for the same request took over the wait."""


Outcome = Approved | Rejected | Expired | Gone | Superseded


class _Waiter:
    __slots__ = ("done", "outcome")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.outcome: Outcome | None = None

    def finish(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.done.set()


def source_of(addr: str) -> str:
    """The address a request counts against: the IP, or an IPv6 address's /64."""
    try:
        ip = ipaddress.ip_address(addr.strip("[]"))
    except ValueError:
        return addr[:64] or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _clean(text: str, limit: int) -> str:
    """At most ``limit`` printable characters of ``text`` (no terminal escapes)."""
    return "".join(ch for ch in text[:limit] if ch.isprintable())


class _RejectArgs(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    reason: str = ""


class PendingRegistrations:
    """The pending interactive registrations of one server.

    Args:
        side: the side tables of the log's database.
        tailnet: where rejections are recorded.
        limits: see :class:`PendingLimits`.
        clock: the wall clock (the tailnet's).
        token: makes request ids (the last part of the AuthURL); unguessable.
    """

    def __init__(
        self,
        side: SideTables,
        tailnet: Tailnet,
        limits: PendingLimits,
        *,
        clock: Callable[[], datetime] | None = None,
        token: Callable[[], str] = request_id,
    ) -> None:
        self._side = side
        self._tailnet = tailnet
        self.limits = limits
        self._clock = clock or (lambda: tailnet.clock())
        self._token = token
        self._limiter = trio.CapacityLimiter(1)
        #: The wait in progress per request id (at most one; see wait()).
        self._waiters: dict[str, _Waiter] = {}
        self.stats = PendingStats()

    async def _db(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(partial(fn, *args), limiter=self._limiter)

    def register_admin_ops(self, ops: AdminOps) -> None:
        ops.register("nodes.pending", self._admin_pending)
        ops.register("nodes.reject", self._admin_reject)

    # -- requests ------------------------------------------------------------------------

    async def start(
        self,
        *,
        machine_key: str,
        node_key: str,
        hostinfo: Hostinfo | None,
        ephemeral: bool,
        source: str,
    ) -> PendingRegistration | Admission:
        """Store a new request (replacing an earlier one of the same machine).

        Returns:
            The stored request, or the cap that refused it (counted in :attr:`stats`).
        """
        hi = hostinfo or Hostinfo()
        now = self._clock()
        reg = PendingRegistration(
            auth_id=self._token(),
            machine_key=machine_key,
            node_key=node_key,
            hostname=_clean(hi.hostname, MAX_HOSTNAME),
            os=_clean(hi.os, MAX_OS),
            request_tags=tuple(_clean(t, MAX_TAG) for t in (hi.request_tags or ())[:MAX_TAGS]),
            ephemeral=ephemeral,
            source=source_of(source),
            created=now,
            expires=now + self.limits.ttl,
        )
        admission = await self._db(
            partial(
                self._side.add_pending,
                max_total=self.limits.max_total,
                max_per_source=self.limits.max_per_source,
            ),
            reg,
        )
        if admission is Admission.ADMITTED:
            self.stats.admitted += 1
            self.stats.current += 1
            return reg
        key = "global" if admission is Admission.GLOBAL_CAP else "per_source"
        self.stats.refused[key] += 1
        log.info("pending registration from %s refused: %s cap", reg.source, key)
        return admission

    async def get(self, auth_id: str) -> PendingRegistration | None:
        """The request ``auth_id`` if it has not expired (rejected ones included)."""
        reg = await self._db(self._side.get_pending, auth_id)
        if reg is None or reg.expires <= self._clock():
            return None
        return reg

    async def list(self) -> list[PendingRegistration]:
        """Every request that has not expired, oldest first."""
        return await self._db(self._side.list_pending, self._clock())

    async def approved(self, auth_id: str, node_id: int) -> None:
        """The request became node ``node_id`` (its event is in the log): forget it and
        answer its waiting client."""
        if await self._db(self._side.delete_pending, auth_id):
            self.stats.current = max(self.stats.current - 1, 0)
        self.stats.approved += 1
        waiter = self._waiters.get(auth_id)
        if waiter is not None:
            waiter.finish(Approved(node_id))

    async def reject(self, auth_id: str, actor: Actor) -> PendingRegistration:
        """Refuse a request: record the refusal in the log, then mark the row and tell
        the waiting client. The reason is the request's (:func:`eventlog.caused_by`),
        recorded with the event and shown to the client.

        Raises:
            NotFoundError: no such request (or it expired).
            CommandError: it was already rejected.
        """
        reg = await self.get(auth_id)
        if reg is None:
            raise NotFoundError(f"no pending registration with key {auth_id!r} (it may have expired)")
        if reg.rejected:
            raise CommandError(f"the registration {auth_id!r} was already rejected by {reg.rejected_by}")
        # The event first: a crash in between leaves a recorded refusal and a row still
        # waiting (the admin can reject it again), never a refusal nobody recorded.
        await self._tailnet.execute(
            lambda _s: c.decide_reject_registration(
                request_id=reg.auth_id, machine_key=reg.machine_key, node_key=reg.node_key,
                hostname=reg.hostname, source=reg.source,
            ),
            actor=actor,
        )
        cause = current_cause()
        reason = cause.reason if cause is not None else ""
        await self._db(partial(self._side.reject_pending, reason=reason, by=str(actor)), auth_id)
        self.stats.rejected += 1
        waiter = self._waiters.get(auth_id)
        if waiter is not None:
            waiter.finish(Rejected(reason))
        return reg

    # -- waiting -------------------------------------------------------------------------

    async def wait(self, reg: PendingRegistration) -> Outcome:
        """Wait until the request ``reg`` (as read by :meth:`get`) is decided or expires.

        A second wait for the same request ends the first one (:class:`Superseded`):
        a client has one follow-up in flight, so that one is the newest.
        """
        waiter = _Waiter()
        old = self._waiters.get(reg.auth_id)
        if old is not None:
            old.finish(Superseded())
        self._waiters[reg.auth_id] = waiter
        try:
            # Registered before looking again: a decision taken while we look wakes us.
            current = await self.get(reg.auth_id)
            if current is None or current.machine_key != reg.machine_key:
                waiter.finish(Expired() if reg.expires <= self._clock() else Gone())
            elif current.rejected_reason is not None:
                waiter.finish(Rejected(current.rejected_reason))
            with trio.move_on_after((reg.expires - self._clock()).total_seconds()):
                await waiter.done.wait()
            outcome = waiter.outcome
            if outcome is None or (isinstance(outcome, Gone) and reg.expires <= self._clock()):
                return Expired()
            return outcome
        finally:
            if self._waiters.get(reg.auth_id) is waiter:
                del self._waiters[reg.auth_id]

    # -- the timer -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Delete expired requests on time and pass decisions taken elsewhere on to the
        waiting clients. Runs until cancelled."""
        task_status.started()
        while True:
            try:
                delay = await self.sweep()
            except EventLogError as exc:
                # The database is unwell (locked for too long, disk full…): waiting
                # clients keep their own deadlines; try again later.
                log.warning("expiring pending registrations failed: %s", exc)
                delay = self.limits.sweep_interval
            await trio.sleep(delay)

    async def sweep(self) -> float:
        """One pass of :meth:`run`; returns how long to sleep until the next."""
        watched = list(self._waiters)
        result = await self._db(self._side.sweep_pending, self._clock(), watched)
        self.stats.expired += result.expired
        self.stats.current = result.remaining
        if result.expired:
            log.info("%d pending registration(s) expired", result.expired)
        for auth_id in watched:
            waiter = self._waiters.get(auth_id)
            if waiter is None:
                continue
            if auth_id not in result.watched:
                waiter.finish(Gone())
            elif (reason := result.watched[auth_id]) is not None:
                waiter.finish(Rejected(reason))
        delay = self.limits.sweep_interval
        if result.next_expiry is not None:
            # A hair after the expiry, so the row is expired when we look.
            until = (result.next_expiry - self._clock()).total_seconds() + 0.001
            delay = min(delay, max(until, 0.0))
        return delay

    # -- admin operations ----------------------------------------------------------------

    async def _admin_pending(self, raw: dict[str, object], actor: Actor) -> object:
        """``tailledger nodes pending``."""
        if raw:
            raise BadRequest("bad arguments: nodes.pending takes none")
        return [self.view(reg) for reg in await self.list()]

    async def _admin_reject(self, raw: dict[str, object], actor: Actor) -> object:
        """``tailledger nodes reject --key ID [--reason TEXT]``: the reason is the
        request's (``--reason`` travels with every admin request), or ``reason`` here."""
        args = decode_args(_RejectArgs, raw)
        try:
            with caused_by(reason=args.reason) if args.reason else contextlib.nullcontext():
                reg = await self.reject(args.key, actor)
        except ValueError as exc:  # a reason that cannot be stored
            raise BadRequest(f"bad arguments: reason: {exc}") from None
        cause = current_cause()
        reason = args.reason or (cause.reason if cause is not None else "")
        return {"rejected": reg.auth_id, "hostname": reg.hostname, "reason": reason}

    @staticmethod
    def view(reg: PendingRegistration) -> dict[str, object]:
        """A request as the admin socket shows it."""
        return {
            "key": reg.auth_id,
            "hostname": reg.hostname,
            "os": reg.os,
            "request_tags": list(reg.request_tags),
            "machine_key": "mkey:" + reg.machine_key,
            "node_key": "nodekey:" + reg.node_key,
            "ephemeral": reg.ephemeral,
            "source": reg.source,
            "created": _iso(reg.created),
            "expires": _iso(reg.expires),
            "status": "rejected" if reg.rejected else "waiting",
            "rejected_by": reg.rejected_by,
            "reason": reg.rejected_reason,
        }


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds").replace("+00:00", "Z")
