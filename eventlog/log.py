"""The trio face of the event log: one serialized writer with group commit, and tailing.

:class:`EventLog` owns a writer task (start it with ``await nursery.start(log.run)``).
``append`` hands a request to that task and waits for the commit; the writer drains
every request that queued up while the previous transaction ran and commits them
together, so many concurrent appenders share one fsync (group commit) while each still
gets its own optimistic-concurrency check and its own answer.

``tail`` yields every event after a sequence number and then waits for new ones. New
events are announced in-process the moment they commit; events appended by *other*
processes (another replica on the same SQLite file or PostgreSQL database) are found
by reading again every ``poll_interval`` seconds, or at once when the store announces
them (PostgreSQL's LISTEN/NOTIFY), so a tailer never misses an event whoever wrote it.

Events this process committed are not read back: the writer keeps them as a read would
return them (the payload decoded from its stored encoding) until every running tail has
passed them (at most :data:`RECENT`), and ``tail`` takes the next ones from there when
they follow its position and link to the hash it holds; anything else (another
process's events, a tailer further behind) is read from the store as before.

The store blocks, so the writer task hands each batch to a thread of its own (started
and stopped with the task) and parks until that thread posts the result back: one
thread-safe queue put and one ``run_sync_soon`` per commit, about half the CPU of a
``trio.to_thread.run_sync`` round trip, paid once per group commit. When the loop has
nothing else to run and recent commits took less than :data:`AT_ONCE_BUDGET`, the
writer commits on the loop's own thread instead, if the store can begin at once
(:meth:`~eventlog.store.EventStore.try_append_batch`: a local SQLite file whose write
lock nobody else holds): blocking a loop that is idle anyway for a fraction of a
millisecond costs nothing, while the hop to the thread and back costs a quarter of
``tailledger bench log``'s time on a virtual machine, whose sleeping threads wake slowly.

Cancellation: ``append`` may be cancelled while waiting; the request may still commit
(the caller cannot know), exactly as with a dropped network connection to a database.
A commit the thread has taken is never abandoned: the writer waits for its result.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Callable, Sequence
from datetime import UTC, datetime

import msgspec
import outcome
import trio

from .cause import check_reason, current_cause, new_correlation_id
from .codec import decode_event, encode_event
from .envelope import Actor, RecordedEvent, to_micros
from .errors import EventLogError, StoreUnavailableError
from .events import AnyEvent
from .rows import AppendRequest, AppendResult, Head
from .store import EventStore

__all__ = ["Clock", "EventLog"]

Clock = Callable[[], datetime]


#: At most this many events committed by this process are kept for ``tail`` (see the
#: module docstring); fewer once every running tail has passed them.
RECENT = 4096

#: The writer commits on the event loop's own thread (when that loop is otherwise idle)
#: only while its recent commits took less than this (seconds; a moving average): a
#: slow disk's fsync goes to the writer's thread and the loop stays responsive.
AT_ONCE_BUDGET = 0.002


#: A batch for the commit thread: the requests, the time to record, whether to keep the
#: events as read (see _recent), and the writer task waiting for the outcome.
_Job = tuple[list[AppendRequest], int, bool, trio.lowlevel.Task]


def _not_abandoned(_: object) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


def _stopped() -> EventLogError:
    return EventLogError("the event log writer stopped before this append was committed")


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _Pending:
    """One append waiting for the writer task.

    The appending task parks itself (``trio.lowlevel``) and the writer reschedules it
    with the result: a ``trio.Event`` per append cost a third of the appending side
    of ``tailledger bench log`` (its parking lot, set and wait)."""

    __slots__ = ("request", "result", "task")

    def __init__(self, request: AppendRequest) -> None:
        self.request = request
        self.result: tuple[RecordedEvent, ...] | BaseException | None = None
        #: The task waiting for the result; ``None`` once told, or when it was cancelled.
        self.task: trio.lowlevel.Task | None = None

    def finish(self, result: tuple[RecordedEvent, ...] | BaseException) -> None:
        """Hand the result over and wake the appender (if it still waits)."""
        self.result = result
        task, self.task = self.task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def abort(self, _: object) -> trio.lowlevel.Abort:
        """The appender was cancelled: it stops waiting (the append goes on)."""
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED


class EventLog:
    """Asynchronous access to an :class:`~eventlog.store.EventStore`.

    Args:
        store: the backend.
        clock: where recorded times come from (the adapter is the only place that reads
            the wall clock; folds read ``recorded_at`` from the envelope).
        poll_interval: how often tailers look for events written by other processes.
        max_batch: the most append requests committed in one transaction.
    """

    def __init__(
        self,
        store: EventStore,
        *,
        clock: Clock = _utcnow,
        poll_interval: float = 0.5,
        max_batch: int = 512,
    ) -> None:
        self.store = store
        self._clock = clock
        self._poll_interval = poll_interval
        self._max_batch = max_batch
        #: Appends waiting for the writer, oldest first; the writer parks when it is
        #: empty (``_writer_parked``) and the next append wakes it. (A deque and a
        #: parked task, not a memory channel: its send and receive cost more than the
        #: rest of an append's trio side in ``tailledger bench log``.)
        self._queue: deque[_Pending] = deque()
        self._writer_parked: trio.lowlevel.Task | None = None
        self._read_limiter = trio.CapacityLimiter(4)
        self._committed = trio.Event()
        self._running = False
        #: The newest seq this process committed (the store's head is at least that).
        self._committed_seq = 0
        #: How many appends by other processes the store has announced (LISTEN/NOTIFY):
        #: a waiter woken by one must ask the store, which its own commits need not.
        self._announced = 0
        self.commits = 0  # transactions committed (group-commit statistics)
        self.commits_at_once = 0  # of them, committed on the event loop's thread
        #: A moving average of how long a commit took (seconds).
        self._commit_seconds = 0.0
        self.appended = 0  # requests appended
        #: seq -> the event as a read returns it, for the events this process
        #: committed that a running tail has yet to pass (at most RECENT; oldest first)
        self._recent: OrderedDict[int, RecordedEvent] = OrderedDict()
        #: Each running tail's position (see _passed).
        self._tails: dict[object, int] = {}

    # -- writing -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task. Runs until cancelled; start it with ``nursery.start``."""
        self._running = True
        # The commit thread's work (a batch and the writer task to wake), ``None`` to stop;
        # a queue per run: a thread still finishing an earlier run takes only its own stop.
        commits: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        token = trio.lowlevel.current_trio_token()
        committer = threading.Thread(
            target=self._commit_thread, args=(commits, token), name="tailledger event log writer",
            daemon=True,
        )
        committer.start()
        try:
            async with trio.open_nursery() as nursery:
                if self.store.notifies_appends:
                    nursery.start_soon(self._listen)
                task_status.started()
                waiting, popleft = self._queue, self._queue.popleft
                while True:
                    if not waiting:
                        self._writer_parked = trio.lowlevel.current_task()
                        await trio.lowlevel.wait_task_rescheduled(self._unpark_writer)
                        continue
                    await self._commit([popleft() for _ in range(min(len(waiting), self._max_batch))], commits)
        finally:
            commits.put(None)
            self._running = False
            self._writer_parked = None
            # Nobody will commit these: their appenders get an error, not a wait forever.
            while self._queue:
                self._queue.popleft().finish(_stopped())

    def _unpark_writer(self, _: object) -> trio.lowlevel.Abort:
        """The parked writer was cancelled: it stops waiting for appends."""
        self._writer_parked = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def _listen(self) -> None:
        """Wake the tailers when the store announces an append by another process
        (PostgreSQL's LISTEN/NOTIFY); polling stays the fallback."""
        limiter = trio.CapacityLimiter(1)
        while True:
            announced = await trio.to_thread.run_sync(
                self.store.wait_for_append, 1.0, limiter=limiter, abandon_on_cancel=True
            )
            if announced:
                self._announced += 1
                self._notify()

    async def _commit(self, batch: list[_Pending], commits: queue.SimpleQueue[_Job | None]) -> None:
        requests = [p.request for p in batch]
        now_us = to_micros(self._clock())
        # With no tail running nothing would take the events kept (see _recent).
        keep = bool(self._tails)
        at_once = (
            self._commit_seconds < AT_ONCE_BUDGET and trio.lowlevel.current_statistics().tasks_runnable == 0
        )
        try:
            done = self._append_batch(requests, now_us, keep, at_once=True) if at_once else None
            if done is None:
                at_once = False
                await trio.lowlevel.checkpoint_if_cancelled()
                commits.put((requests, now_us, keep, trio.lowlevel.current_task()))
                # Once the thread may have taken it, a commit is waited for even when
                # cancelled (Abort.FAILED): the appenders learn what became of it.
                done = await trio.lowlevel.wait_task_rescheduled(_not_abandoned)
            results, as_read = done
        except EventLogError as exc:
            for p in batch:
                p.finish(exc)
            return
        except BaseException:
            # Cancelled before the thread took the batch, or a bug the store rolled
            # back: not committed.
            for p in batch:
                p.finish(_stopped())
            raise
        self.commits += 1
        # Sequence numbers grow through the batch: the last request that appended
        # something holds the newest.
        for result in reversed(results):
            if isinstance(result, tuple) and result:
                self._committed_seq = max(self._committed_seq, result[-1].seq)
                break
        recent = self._recent
        if self._tails:  # (a tail that started during the commit reads them from the store)
            for event in as_read:
                recent[event.seq] = event
        while len(recent) > RECENT:
            recent.popitem(last=False)
        appended = 0
        for p, result in zip(batch, results, strict=True):
            if isinstance(result, tuple):  # (else its ExpectedSequenceConflict)
                appended += 1
            p.finish(result)
        self.appended += appended
        self._notify()
        if at_once:
            self.commits_at_once += 1
            await trio.lowlevel.checkpoint()  # (nothing else ran while it committed)

    def _commit_thread(self, commits: queue.SimpleQueue[_Job | None], token: trio.lowlevel.TrioToken) -> None:
        """The commit thread: each batch's store append, its outcome posted to the writer
        task that waits for it."""
        while (job := commits.get()) is not None:
            requests, now_us, keep, writer = job
            result = outcome.capture(self._append_batch, requests, now_us, keep)
            token.run_sync_soon(trio.lowlevel.reschedule, writer, result)

    def _append_batch(
        self, requests: list[AppendRequest], now_us: int, keep: bool, *, at_once: bool = False
    ) -> tuple[list[AppendResult], list[RecordedEvent]] | None:
        """The store's append (in the writer thread, or ``at_once`` on the loop's thread
        if the store can begin at once, else ``None``), and, to ``keep`` for the tails,
        the committed events as a read would return them: each payload decoded from its
        encoding, as stored."""
        start = time.perf_counter()
        if at_once:
            begun = self.store.try_append_batch(requests, now_us)
            if begun is None:
                return None
            results = begun
        else:
            results = self.store.append_batch(requests, now_us)
        self._commit_seconds += (time.perf_counter() - start - self._commit_seconds) / 8
        if not keep:
            return results, []
        as_read = [
            msgspec.structs.replace(e, event=decode_event(e.type, e.schema, encode_event(e.event)))
            for result in results
            if not isinstance(result, BaseException)
            for e in result
        ]
        return results, as_read

    def _recent_after(self, after_seq: int, limit: int, prev_hash: str | None) -> list[RecordedEvent]:
        """The events after ``after_seq`` that this process committed and still keeps,
        in order and without gaps, each linking to the one before it (the first to
        ``prev_hash`` when given); empty when the next one is not kept."""
        out: list[RecordedEvent] = []
        recent = self._recent
        link = prev_hash
        seq = after_seq + 1
        while len(out) < limit:
            event = recent.get(seq)
            if event is None or (link is not None and event.prev_hash != link):
                break
            out.append(event)
            link = event.hash
            seq += 1
        return out

    def _passed(self, tail: object, seq: int) -> None:
        """``tail`` is at ``seq``: forget the kept events every running tail has passed
        (idle memory: nothing is kept once the tailers are level with the log)."""
        self._tails[tail] = seq
        low = min(self._tails.values())
        recent = self._recent
        while recent and next(iter(recent)) <= low:
            recent.popitem(last=False)

    def _notify(self) -> None:
        committed, self._committed = self._committed, trio.Event()
        committed.set()

    async def append(
        self,
        events: Sequence[AnyEvent],
        *,
        actor: Actor,
        expected_seq: int | None = None,
        correlation_id: str | None = None,
        reason: str | None = None,
    ) -> tuple[RecordedEvent, ...]:
        """Append ``events`` atomically and return them as recorded.

        Args:
            events: what happened, in order.
            actor: who caused it.
            expected_seq: the head the caller decided against (optimistic concurrency);
                ``None`` to append unconditionally.
            correlation_id: shared with the other events of the same request; by
                default the open :func:`~eventlog.cause.caused_by` block's, else new.
            reason: why (``--reason``); by default the open cause's.

        Raises:
            ExpectedSequenceConflict: the head moved since ``expected_seq``.
            EventLogError: the store failed; nothing was appended.
        """
        if not self._running:
            raise EventLogError("the event log writer is not running")
        cause = current_cause()
        if correlation_id is None:
            correlation_id = cause.correlation_id if cause else new_correlation_id()
        reason = check_reason(reason) if reason is not None else (cause.reason if cause else "")
        pending = _Pending(
            AppendRequest(
                events=tuple(events), actor=actor, expected_seq=expected_seq,
                correlation_id=correlation_id, reason=reason,
            )
        )
        # Nothing is awaited between queueing it and parking: the writer cannot
        # finish it before this task waits.
        pending.task = trio.lowlevel.current_task()
        self._queue.append(pending)
        writer, self._writer_parked = self._writer_parked, None
        if writer is not None:
            trio.lowlevel.reschedule(writer)
        await trio.lowlevel.wait_task_rescheduled(pending.abort)
        result = pending.result
        if isinstance(result, BaseException):
            raise result
        assert result is not None
        return result

    # -- reading -------------------------------------------------------------------

    async def head(self) -> Head:
        return await trio.to_thread.run_sync(self.store.head, limiter=self._read_limiter)

    async def read(
        self, after_seq: int = 0, limit: int = 1000, *, prev_hash: str | None = None
    ) -> list[RecordedEvent]:
        """Events after ``after_seq``; with ``prev_hash`` (the hash of event
        ``after_seq``) each one's link and hash are checked too.

        Raises:
            ChainError: (with ``prev_hash``) an event that does not verify.
        """
        if prev_hash is None:
            return await trio.to_thread.run_sync(
                self.store.read, after_seq, limit, limiter=self._read_limiter
            )
        return await trio.to_thread.run_sync(
            self.store.read_checked, after_seq, limit, prev_hash, limiter=self._read_limiter
        )

    async def wait_for_new(self, after_seq: int) -> None:
        """Return once the head is past ``after_seq`` (in-process wake-up or polling).

        A commit of this process that wakes it tells its own seq: the store is asked
        for its head only at first, on each poll and when the store announces another
        process's append, not after every commit of this one (a thread hop per
        registration in a storm)."""
        ask_store = True
        seen = self._announced  # the announcements the last look at the head covered
        while True:
            waiter = self._committed
            if self._committed_seq > after_seq:
                return
            if ask_store or self._announced != seen:
                seen = self._announced
                try:
                    if (await self.head()).seq > after_seq:
                        return
                except StoreUnavailableError:
                    pass  # the database is down: wait for it like for an append
            with trio.move_on_after(self._poll_interval) as poll:
                await waiter.wait()
            ask_store = poll.cancelled_caught

    async def tail(
        self, after_seq: int = 0, *, batch: int = 1000, prev_hash: str | None = None
    ) -> AsyncGenerator[list[RecordedEvent], None]:
        """Yield batches of events after ``after_seq`` forever, in order, without gaps.

        With ``prev_hash`` (the hash of event ``after_seq``) every event's link and hash
        are checked before it is yielded (:class:`~eventlog.errors.ChainError`).

        While the store is unreachable (:class:`StoreUnavailableError`) the tail waits
        and tries again, with back-off, instead of failing: the server keeps serving
        what it has folded and catches up when the database returns.
        """
        backoff = 0.0
        me = object()
        self._passed(me, after_seq)
        # Whether to read the store when nothing kept follows: at first, after a read
        # that found events (there may be more), after each poll, when the store is
        # back, when another process's append was announced since the last read, and
        # when this process committed past what was kept; not after every commit of
        # this process, whose events are kept (a thread hop and an empty read per
        # commit in a registration storm).
        ask_store = True
        seen = self._announced  # the announcements the last read covered
        try:
            while True:
                # Taken before the read: a commit of this process after the read sets
                # it, so an empty read waits for it without asking the store for its head.
                waiter = self._committed
                try:
                    events = self._recent_after(after_seq, batch, prev_hash)
                    if not events and (
                        ask_store or self._announced != seen or self._committed_seq > after_seq
                    ):
                        seen = self._announced
                        events = await self.read(after_seq, batch, prev_hash=prev_hash)
                        ask_store = bool(events)
                    if not events:
                        with trio.move_on_after(self._poll_interval) as poll:
                            await waiter.wait()
                        ask_store = poll.cancelled_caught
                    backoff = 0.0
                except StoreUnavailableError:
                    backoff = min(5.0, max(0.1, backoff * 2))
                    ask_store = True
                    await trio.sleep(backoff)
                    continue
                if events:
                    yield events
                    after_seq = events[-1].seq
                    self._passed(me, after_seq)
                    if prev_hash is not None:
                        prev_hash = events[-1].hash
        finally:
            del self._tails[me]



