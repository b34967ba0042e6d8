"""Map streams and their fan-out: one hub computes what changed, every stream reads it.

A node's map long-poll (``/machine/map`` with ``Stream``) first gets the full netmap,
then the smallest update whenever the log or the presence of a visible peer changes,
and a keep-alive when nothing happened for :attr:`ControlSettings.keepalive_interval`
seconds. :class:`MapStreams` serves all of them from one :class:`~projections.mapviews.hub.MapHub`
(peer sets shared per visibility class, see :mod:`projections.mapviews`); what a stream
keeps is its :class:`~projections.mapviews.cursor.StreamCursor`.

**The hub driver** (:meth:`MapStreams._drive_hub`, one task) is the only writer of the
hub. The log subscription and the presence watcher wake it (:meth:`~MapStreams._on_log_change`);
it coalesces a burst (:attr:`ControlSettings.coalesce` seconds for the log,
``presence_coalesce`` for presence alone, and presence is further paced by what the
last fan-out cost), then publishes (:meth:`~MapStreams._publish`: ``MapHub.advance``)
and wakes the streams. It also wakes at the next key expiry the hub knows of.

**Parking and wake groups.** An idle stream is no task: it yields a
:class:`~protocol.handler.Park` that carries the time its keep-alive falls due
(``Park.due``); the transport keeps only the suspended iterator and hands back a
``resume`` callable, kept with that time in one of :data:`WAKE_GROUPS` groups (by
node id, :meth:`~MapStreams._park_in`). A publication wakes the groups one after another
(:meth:`~MapStreams._wake_streams`), letting other tasks run between groups, so a
request that arrives during a fan-out waits for one group's sends, not every stream's.
A woken stream is served where it parked (:meth:`~MapStreams._publish_direct`): its
park carries its cursor, which reads the hub, and the transport's ``send_now`` sends
what it got, with no task and no resumption; the stream stays parked. Only a stream
that must decide itself (superseded, deleted), whose transport cannot send at once
(then it sends the update first), or whose update is large is resumed, reads the hub
through its cursor, sends what it got, and parks again.

**Keep-alives** (:meth:`~MapStreams._tick_keepalives`, one task) visit each group
:data:`KEEPALIVE_TICKS` times per interval, and only the parked streams whose
keep-alive falls due by then (:meth:`~MapStreams._wake_group`): each gets the shared,
pre-framed keep-alive through its transport's ``send_now`` (:class:`_MapPark`), right
there, and stays parked: no task, no resumption of the stream, nothing allocated. Only
when the transport cannot send at once (a write in progress, no flow-control window,
TLS) is the stream resumed, and sends its keep-alive itself once it was quiet for
:meth:`~MapStreams._keepalive_due`. No timer per stream.

**Full-map turns** (:class:`_Turn`): a full map is built only when the stream's turn
comes, at most :attr:`ControlSettings.full_map_concurrency` at once, and held until the
client took all of it (or :attr:`ControlSettings.full_map_turn` seconds): a restart's
reconnect herd does not buffer one full map per client at the same time. One-shot maps
(``/machine/map`` without ``Stream`` or ``OmitPeers``) wait for a turn too.

**One long-poll per node** (:class:`_Poll`): a newer one ends the older, even one stuck
sending to a client that stopped reading. A stream's end marks its node offline
``offline_grace`` seconds later, unless a newer stream came (pitfall 14).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import trio
import trio.lowlevel

from projections import Tailnet
from projections.mapviews.cursor import StreamCursor
from projections.mapviews.hub import MapHub
from projections.netmap import NetmapSettings
from projections.policystate import PolicyCompiler
from projections.presence import PresenceTable
from projections.tailcfg import DERPMap, DNSConfig

from ..handler import Park
from ..mapframe import keepalive_frame
from ..mapwire import MapWire
from .settings import ControlSettings, ControlStats

__all__ = ["KEEPALIVE_TICKS", "WAKE_GROUPS", "MapStreams"]

log = logging.getLogger(__name__)

#: Stream groups woken one after another by a publication (see MapStreams._wake_streams).
WAKE_GROUPS = 64
#: A presence-only fan-out may use at most 1/_PRESENCE_PACING of the time...
_PRESENCE_PACING = 5
#: ...but presence is never held back longer than this many seconds.
_PRESENCE_MAX_HOLD = 3.0
#: Keep-alive ticks per keep-alive interval (see MapStreams._tick_keepalives).
KEEPALIVE_TICKS = 4
#: Updates up to this many bytes are sent to a parked stream by its transport at once
#: (MapStreams._publish_direct); a larger one resumes the stream, which sends it under
#: flow control like a full map.
_DIRECT_MAX = 64 << 10


class _Turn:
    """One held unit of a semaphore, given back once: by its holder or by a timer."""

    __slots__ = ("_done", "_semaphore")

    def __init__(self, semaphore: trio.Semaphore) -> None:
        self._semaphore = semaphore
        self._done = trio.Event()

    def release(self) -> None:
        if not self._done.is_set():
            self._done.set()
            self._semaphore.release()

    async def expire(self, after: float) -> None:
        with trio.move_on_after(after):
            await self._done.wait()
        self.release()


class _Poll:
    """The long-poll a node has open (there is one: a newer one ends it). ``ended``:
    its stream is over (a park it left in a wake group is stale)."""

    __slots__ = ("cancel", "ended", "superseded")

    def __init__(self, cancel: Callable[[], None] | None) -> None:
        self.cancel = cancel
        self.superseded = False
        self.ended = False


class _MapPark(Park):
    """What a parked map stream leaves in its wake group: its :class:`Park` (due time,
    the transport's ``resume`` and ``send_now``), the compression of its frames, and
    when it last sent something, which the keep-alive ticker moves on when it sends
    the stream a keep-alive (:meth:`MapStreams._wake_group`) and the stream reads
    when it is resumed.

    It also carries what a publication needs to serve the stream without resuming it
    (:meth:`MapStreams._publish_direct`): the stream's cursor, its poll, and the
    publication it began listening at; and, when the transport could not send an
    update computed so, the bytes (``pending``) the resumed stream sends first."""

    __slots__ = ("compress", "cursor", "last_sent", "pending", "poll", "since")

    def __init__(
        self,
        owner: Callable[[Park, Callable[[], None]], None],
        due: float,
        *,
        compress: bool,
        last_sent: float,
        cursor: StreamCursor | None = None,
        poll: _Poll | None = None,
        since: int = 0,
    ) -> None:
        super().__init__(owner, due)
        self.compress = compress
        self.last_sent = last_sent
        self.cursor = cursor
        self.poll = poll
        self.since = since
        #: bytes the resumed stream sends first; ``None``: serving a publication to it
        #: failed, and the stream ends (its client reconnects and gets a full map).
        self.pending: bytes | None = b""


class _Wake:
    """One event many sources can set; re-armed after each wait."""

    def __init__(self) -> None:
        self.event = trio.Event()

    def set(self) -> None:
        self.event.set()

    async def wait(self) -> None:
        await self.event.wait()
        self.event = trio.Event()


class MapStreams:
    """Every map stream of this server, fed by one hub.

    Args:
        tailnet: the current projection and its log subscription.
        presence: this server's presence table (watched; streams connect and
            disconnect their node in it).
        settings: see :class:`ControlSettings` (its ``netmap`` part is replaced by
            :meth:`set_derp_map` and :meth:`set_dns`).
        policy: compiles the policy in force for each state.
        stats: counts superseded streams.
    """

    def __init__(
        self,
        tailnet: Tailnet,
        presence: PresenceTable,
        settings: ControlSettings,
        policy: PolicyCompiler,
        stats: ControlStats,
    ) -> None:
        self._tailnet = tailnet
        self._presence = presence
        self.settings = settings
        self._stats = stats
        self._nursery: trio.Nursery | None = None
        self.streams_open = 0
        #: Each node's open long-poll (see stream).
        self._polls: dict[int, _Poll] = {}
        #: Shared peer views of every stream (see :mod:`projections.mapviews`), advanced
        #: by :meth:`_drive_hub` and read by the streams.
        self.hub = MapHub(policy, settings.netmap, presence.get)
        #: The bytes of what the hub's streams are sent, each shared message and
        #: full-map piece encoded and framed once (see protocol.mapwire).
        self.wire = MapWire()
        #: Parked streams per group (by node id): their parks (an idle stream is no
        #: task, see protocol.handler.Park), with the transport's resume and send_now
        #: and the time the stream's keep-alive falls due, so that the keep-alive
        #: ticker visits only those due. A publication resumes the groups one after
        #: another, so requests that arrive meanwhile wait for one group's sends, not
        #: for every stream's.
        self._parked: list[list[_MapPark]] = [[] for _ in range(WAKE_GROUPS)]
        #: The owner of each group's parks (see _park_in).
        self._park_owners = [functools.partial(self._park_in, g) for g in range(WAKE_GROUPS)]
        #: Bounds the full maps in flight (see ControlSettings.full_map_concurrency).
        self._full_maps = trio.Semaphore(settings.full_map_concurrency)
        self._hub_wake, self._hub_log_wake = _Wake(), _Wake()
        self._hub_sub = tailnet.runner.subscribe(self._on_log_change)
        self._hub_watch = presence.watch(self._hub_wake.set)
        #: Streams past their full map, reading publications (streams still waiting
        #: for a full-map turn do not count in a fan-out's cost).
        self._listening = 0
        #: Streams yet to handle the latest publication, when it started, and how long
        #: the last complete fan-out took (paces publications, see _drive_hub).
        self._fanout_left = 0
        self._fanout_started = 0.0
        self._fanout_cost = 0.0
        self._wake_pending = False
        self._published_seq = 0
        #: A full map's :meth:`_sync_hub` took a log change into the hub that no
        #: publication has sent yet: the next one is not presence alone.
        self._log_synced = False

    def close(self) -> None:
        """End the log subscription and the presence watcher (idempotent); streams
        still open see no further change."""
        self._hub_sub.close()
        self._hub_watch.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The hub driver, the keep-alive ticker, and the streams' timers (until cancelled)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._drive_hub)
            nursery.start_soon(self._tick_keepalives)
            task_status.started()
            await trio.sleep_forever()

    def _start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> bool:
        """Start a background task; ``False`` when :meth:`run` is not running (or ending)."""
        if self._nursery is None:
            return False
        try:
            self._nursery.start_soon(fn, *args)
        except RuntimeError:  # "Nursery is closed to new arrivals": shutting down
            return False
        return True

    # -- what the transport drives -------------------------------------------------------

    async def one_shot(self, node_id: int, compress: bool) -> AsyncIterator[bytes | Park]:
        """A one-shot (non-streaming) full map: it waits for a full-map turn like a
        stream's first map, and holds it until the client took it all."""
        turn = await self._full_map_turn()
        try:
            self._sync_hub()
            if self.hub.state is None or node_id not in self.hub.state.nodes:
                return
            yield self.wire.frame_full(
                StreamCursor(node_id).full_map(self.hub, self._tailnet.clock()), compress
            )
        finally:
            turn.release()

    async def stream(
        self, node_id: int, compress: bool, cancel: Callable[[], None] | None = None
    ) -> AsyncIterator[bytes | Park]:
        """A node's map long-poll: the full map, then updates and keep-alives."""
        clock = self._tailnet.clock
        generation = self._presence.connect(node_id, clock())
        self.streams_open += 1
        listening_since: int | None = None  # the publication seq when it began listening
        cursor: StreamCursor | None = None
        poll = self._open_poll(node_id, cancel)
        del cancel
        try:
            # The full map is built only once this stream's turn comes, and the turn
            # ends when the client has taken all of it (the generator resumes only
            # after the transport sent the bytes, flow control included): at most
            # full_map_concurrency full maps are in memory at once, however many
            # clients reconnect together. Later changes arrive as deltas from it.
            # A client that stops reading gives its turn up after full_map_turn seconds.
            turn = await self._full_map_turn()
            try:
                self._sync_hub()
                if self.hub.state is None or node_id not in self.hub.state.nodes:
                    return
                cursor = StreamCursor(node_id)
                yield self.wire.frame_full(cursor.full_map(self.hub, clock()), compress)
            finally:
                turn.release()
            del turn  # an idle stream keeps nothing of its turn
            last_sent = trio.current_time()
            group = node_id % WAKE_GROUPS
            self._listening += 1
            listening_since = self._published_seq
            while True:
                # Parked (no task) until a publication or the keep-alive ticker
                # wakes the group (no timer per stream). No wait if something was
                # published while this stream was sending.
                if cursor.seq >= self._published_seq:
                    park = _MapPark(self._park_owners[group], last_sent + self._keepalive_due(),
                                    compress=compress, last_sent=last_sent, cursor=cursor, poll=poll,
                                    since=listening_since)
                    yield park
                    # The ticker may have sent keep-alives meanwhile, and a publication
                    # updates (_publish_direct) that the transport could not send at once.
                    last_sent, pending = park.last_sent, park.pending
                    del park
                    if pending is None:
                        return
                    if pending:
                        yield pending
                        last_sent = trio.current_time()
                    del pending
                if poll.superseded:
                    return
                assert self.hub.state is not None
                if node_id not in self.hub.state.nodes:
                    return  # deleted: the client re-registers or gives up
                seen = cursor.seq
                messages = cursor.update(self.hub)
                sent = bool(messages)
                while messages:  # not a for loop: nothing stays bound while idle
                    yield self.wire.frame(messages.pop(0), compress)
                del messages
                if cursor.seq != seen and seen >= listening_since:
                    self._fanned_out()
                now = trio.current_time()
                if sent:
                    last_sent = now
                elif now - last_sent >= self._keepalive_due():
                    self._stats.keepalives_resumed += 1
                    yield keepalive_frame(compress)
                    last_sent = trio.current_time()
        finally:
            poll.ended = True
            self.streams_open -= 1
            if self._polls.get(node_id) is poll:
                del self._polls[node_id]
            if listening_since is not None and cursor is not None:
                self._listening -= 1
                if cursor.seq < self._published_seq and self._published_seq > listening_since:
                    self._fanned_out()  # one the latest fan-out no longer waits for
            if not self._start_soon(self._offline_later, node_id, generation):
                # Not running, or shutting down (the streams end after us): at once.
                self._presence.disconnect(node_id, generation, clock())

    def _open_poll(self, node_id: int, cancel: Callable[[], None] | None) -> _Poll:
        """Make this the node's long-poll; the older one, if any, ends (the newest
        wins: a client opens a new poll when it lost or gave up the old one)."""
        poll = _Poll(cancel)
        previous = self._polls.get(node_id)
        self._polls[node_id] = poll
        if previous is not None:
            previous.superseded = True
            self._stats.streams_superseded += 1
            if previous.cancel is not None:
                previous.cancel()  # even one stuck sending to a client that stopped reading
            else:
                self._wake_group(node_id % WAKE_GROUPS)  # it sees superseded and ends
        return poll

    async def _full_map_turn(self) -> _Turn:
        """Wait for a full-map turn; it ends at ``release()`` or after ``full_map_turn``."""
        await self._full_maps.acquire()
        turn = _Turn(self._full_maps)
        self._start_soon(turn.expire, self.settings.full_map_turn)
        return turn

    async def _offline_later(self, node_id: int, generation: int) -> None:
        """Mark a node offline once its stream has been gone a little while (pitfall 14)."""
        try:
            await trio.sleep(self.settings.offline_grace)
        finally:  # at once when the server shuts down meanwhile
            self._presence.disconnect(node_id, generation, self._tailnet.clock())

    # -- settings every stream sends -----------------------------------------------------

    def set_derp_map(self, derp_map: DERPMap) -> bool:
        """Put a new DERP map in force; every open stream sends it. Returns whether it changed."""
        if derp_map == self.settings.netmap.derp_map:
            return False
        self._put_netmap(dataclasses.replace(self.settings.netmap, derp_map=derp_map))
        return True

    def set_dns(self, dns: DNSConfig | None) -> bool:
        """Put a new DNS configuration in force (made through the admin API and recorded
        in the log); every open stream sends it. Returns whether it changed."""
        if dns == self.settings.netmap.dns:
            return False
        self._put_netmap(dataclasses.replace(self.settings.netmap, dns=dns))
        return True

    def _put_netmap(self, netmap: NetmapSettings) -> None:
        """Publish new tailnet-wide map settings at once and wake every stream."""
        self.settings = dataclasses.replace(self.settings, netmap=netmap)
        self.hub.settings = netmap
        self._publish()
        for group in range(WAKE_GROUPS):
            self._wake_group(group)
        self._wake_pending = False

    # -- the hub: one place computes what changed, every stream reads it ---------------

    def _on_log_change(self) -> None:
        self._hub_wake.set()
        self._hub_log_wake.set()

    def _sync_hub(self) -> None:
        """Bring the hub up to the log's state at once (a stream about to send a full
        map must see its own node); streams are woken by :meth:`_drive_hub` only.

        Presence alone (a node online, an endpoint moved) waits for the next
        publication, which is when the other streams learn it too: the streams that
        begin between two publications then start from one hub version and are sent
        one shared update (after a restart, thousands of clients reconnect with
        their presence changing all the while; a version each cost a diff, an
        encoding and a compression per stream). Their full map's ``ControlTime`` is
        the clock's, not the hub's.
        """
        if self.hub.state is self._tailnet.state:
            return
        if not self._hub_sub.pending.is_empty():
            self._log_synced = True
        self.hub.advance(self._tailnet.state, self._tailnet.clock(), self._hub_sub.take(), self._hub_watch.take())

    def _publish(self) -> None:
        """Advance the hub and wake every stream to read it."""
        self.hub.advance(self._tailnet.state, self._tailnet.clock(), self._hub_sub.take(), self._hub_watch.take())
        self._log_synced = False
        self._fanout_left = self._listening
        self._fanout_started = trio.current_time()
        self._published_seq = self.hub.seq
        self._wake_pending = True

    def _park_in(self, group: int, park: Park, resume: Callable[[], None]) -> None:
        """Where a stream of ``group`` waits, with the time its keep-alive is due."""
        assert isinstance(park, _MapPark)
        self._parked[group].append(park)

    def _wake_group(self, group: int, *, due_by: float | None = None) -> None:
        """Resume the group's parked streams; with ``due_by`` (the keep-alive ticker),
        only those whose keep-alive is due by then, and those only if their transport
        cannot send them the keep-alive at once (``send_now``): the others get it and
        stay parked, due again a keep-alive interval later."""
        parked = self._parked[group]
        if due_by is None:
            kept: list[_MapPark] = []
            self._parked[group] = kept
            for park in parked:
                if self._publish_direct(park):
                    kept.append(park)
                    continue
                assert park.resume is not None
                park.resume()
            return
        kept = []
        woken: list[_MapPark] = []
        for park in parked:
            send_now = park.send_now
            if park.due > due_by or (send_now is not None and self._send_keepalive(park, send_now)):
                kept.append(park)
            else:
                woken.append(park)
        if not woken:
            return
        self._parked[group] = kept
        for park in woken:
            assert park.resume is not None
            park.resume()

    def _publish_direct(self, park: _MapPark) -> bool:
        """Serve a publication to a parked stream without resuming it: read the hub
        through its cursor and hand what it gets to the transport's ``send_now``, as
        the keep-alive ticker does. Returns whether the stream stays parked (served,
        or nothing for it).

        ``False`` (resume it) when the stream must end or decide itself (superseded,
        node deleted), has no ``send_now`` (TLS), or the update is large; and when the
        transport could not send at once, with the update's bytes left in
        ``park.pending``, which the resumed stream sends first: an update read from
        the hub is never dropped. If reading or encoding it raises, ``park.pending``
        is ``None`` and the resumed stream ends; the fan-out goes on."""
        cursor, poll, send_now = park.cursor, park.poll, park.send_now
        if cursor is None or poll is None or send_now is None or poll.superseded or poll.ended:
            return False
        state = self.hub.state
        if state is None or cursor.node_id not in state.nodes:
            return False
        if cursor.seq >= self._published_seq:
            return True  # already read it (it was resumed meanwhile)
        seen = cursor.seq
        try:
            messages = cursor.update(self.hub)
            data = b"".join(self.wire.frame(msg, park.compress) for msg in messages)
        except Exception:
            # A bug reading or encoding one stream's update must not stop the fan-out
            # (in the stream's own task it ended that stream alone). Its cursor may
            # have moved past what it was sent, so the stream ends: its client
            # reconnects and gets a full map rather than miss an update.
            log.exception("serving a publication to a parked map stream failed; the stream ends")
            if cursor.seq != seen and seen >= park.since:
                self._fanned_out()  # (else the ending stream counts itself out)
            park.pending = None
            return False
        if cursor.seq != seen and seen >= park.since:
            self._fanned_out()
        if not messages:
            return True  # nothing for this stream: its keep-alive stays due as it was
        del messages
        try:
            sent = len(data) <= _DIRECT_MAX and send_now(data)
        except Exception:  # a transport bug must not stop the fan-out: the stream sends it
            log.exception("sending an update to a parked map stream failed")
            sent = False
        if not sent:
            park.pending = data
            return False
        now = trio.current_time()
        park.last_sent = now
        park.due = now + self._keepalive_due()
        self._stats.updates_direct += 1
        return True

    def _send_keepalive(self, park: _MapPark, send_now: Callable[[bytes], bool]) -> bool:
        """Send a parked stream its keep-alive through its transport, which leaves it
        parked; ``False`` if the transport could not (then it must be resumed)."""
        try:
            sent = send_now(keepalive_frame(park.compress))
        except Exception:  # a transport bug must not stop the ticker: resume it instead
            log.exception("sending a keep-alive to a parked map stream failed")
            return False
        if sent:
            now = trio.current_time()
            park.last_sent = now
            park.due = now + self._keepalive_due()
            self._stats.keepalives_direct += 1
        return sent

    async def _wake_streams(self) -> None:
        """Wake the stream groups in turn, letting other tasks run in between."""
        if not self._wake_pending:
            return
        self._wake_pending = False
        for group in range(WAKE_GROUPS):
            self._wake_group(group)
            await trio.lowlevel.checkpoint()

    async def _drive_hub(self) -> None:
        """Coalesce log and presence changes and publish them (and wake at key expiries).

        A log change is published :attr:`ControlSettings.coalesce` seconds after it
        arrives (a burst becomes one update per stream); presence alone (endpoints,
        online) is not urgent and is gathered for ``presence_coalesce`` seconds unless a
        log change comes meanwhile.
        """
        clock = self._tailnet.clock
        while True:
            timeout = float("inf")
            expiry = self.hub.next_expiry()
            if expiry is not None:
                timeout = max((expiry - clock()).total_seconds() + 0.01, 0)
            with trio.move_on_after(timeout):
                await self._hub_wake.wait()
                await trio.sleep(self.settings.coalesce)
                if self._presence_alone():
                    with trio.move_on_after(self.settings.presence_coalesce):
                        await self._hub_log_wake.wait()
            self._hub_log_wake.event = trio.Event()
            if self._presence_alone():
                # Presence alone: a fan-out to every stream costs CPU in proportion to
                # the streams; leave _PRESENCE_PACING - 1 times as much to everything
                # else (registrations, handshakes, full maps), so that a storm of
                # endpoint and online changes becomes fewer, larger updates. A log
                # change (a join, a policy) ends the wait: it is not held back.
                hold = min(_PRESENCE_PACING * self._fanout_cost, _PRESENCE_MAX_HOLD)
                with trio.move_on_at(self._fanout_started + hold):
                    await self._hub_log_wake.wait()
            self._publish()
            await self._wake_streams()

    def _presence_alone(self) -> bool:
        """Whether the next publication carries presence changes only: no log change
        is pending, and none was taken into the hub by a full map since the last
        publication (a newcomer's full map syncs the hub with its own join, which the
        other streams have yet to be sent)."""
        return self._hub_sub.pending.is_empty() and not self._log_synced

    def _fanned_out(self) -> None:
        """One stream handled the latest publication; the last one times the fan-out."""
        self._fanout_left -= 1
        if self._fanout_left == 0:  # (and not below: streams that came later do not count)
            self._fanout_cost = trio.current_time() - self._fanout_started
            # Idle memory: the per-node messages of this publication are sent.
            self.hub.release_messages()

    def _keepalive_due(self) -> float:
        """Idle time after which a woken stream sends a keep-alive (see _tick_keepalives)."""
        interval = self.settings.keepalive_interval
        return interval - interval / KEEPALIVE_TICKS

    async def _tick_keepalives(self) -> None:
        """Wake every stream group ``KEEPALIVE_TICKS`` times per keep-alive interval.

        A woken stream with nothing to send sends a keep-alive once it has been
        quiet for ``_keepalive_due()``: every idle stream hears from the server at
        least once per ``keepalive_interval``. The groups are spread over the tick.
        """
        while True:
            step = self.settings.keepalive_interval / KEEPALIVE_TICKS / WAKE_GROUPS
            for group in range(WAKE_GROUPS):
                await trio.sleep(step)
                self._wake_group(group, due_by=trio.current_time())
