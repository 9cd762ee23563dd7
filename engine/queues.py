"""Durable destination queues: every delivery is a row; a worker sends it and records the answer.

Retries with exponential backoff and jitter on connection failure, timeout, AR or CR; AE is not
retried (an application error needs a person) and goes to ERROR, as do exhausted retries (the
dead-letter state, visible and replayable). Order: one at a time in order of receipt (a failing
head blocks the queue, visibly), ``per_key``: in order per key (e.g. per patient), keys in
parallel, or ``none``. With ``parallel: N`` up to N deliveries are in flight at once (like
Mirth's queue threads); a key never has more than one. The rows are the truth: the worker polls
them, so a restart, or a replay written by another process, is picked up. Delivery is
at-least-once: a crash between sending and recording the answer sends the message again after
the restart.
"""

from __future__ import annotations

import time

import enum
import random
from collections import deque
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from twisted.internet import defer, task
from twisted.logger import Logger

from hl7relay.channels.destinations import QueueOptions
from hl7relay.errors import ParseError
from hl7relay.events import emit
from hl7relay.fhir.content import parse_content
from hl7relay.hl7.message import Message
from hl7relay.outcomes import DeliveryOutcome, DeliveryResult, DeliveryStatus
from hl7relay.store.database import DeliveryUpdate, DestinationStateUpdate, StoreError

__all__ = ["Queue", "DestinationQueue", "DeliveryResult", "DestinationHealth", "QueuedDelivery", "QueueState", "Pump",
           "retry_delay"]

log = Logger(namespace="hl7relay.queue")
# the statuses as plain str: what the store binds on the hot path (a StrEnum costs the driver an adapter lookup)
_SENT, _ERROR, _QUEUED, _WITHDRAWN = (s.value for s in (DeliveryStatus.SENT, DeliveryStatus.ERROR, DeliveryStatus.QUEUED,
                                                         DeliveryStatus.WITHDRAWN))
_FETCH = 200  # deliveries read per look
_MEMORY_LIMIT = 2000  # deliveries held in memory per destination; the rest are read back from the store
# first results of rows a poll found before the engine handed them over (see first_result): kept
# this long, and at most this many, for a waiter that comes late
_UNCLAIMED_SECONDS = 120.0
_UNCLAIMED_LIMIT = 10_000
# "failing": of the attempts of the last _RECENT_SECONDS (the last _RECENT_ATTEMPTS at most), at
# least half and at least _FAILING_AT_LEAST failed, the last one too
_RECENT_ATTEMPTS = 20
_RECENT_SECONDS = 600.0
_FAILING_AT_LEAST = 3
_RATE_LIMITED, _NOT_AUTHORISED = DeliveryOutcome.RATE_LIMITED, DeliveryOutcome.NOT_AUTHORISED
_RECORD_RETRY = 2.0  # seconds between tries to record a delivery's final result the store did not take


def retry_delay(attempts: int, options: QueueOptions, rng: random.Random) -> float:
    """Wait after ``attempts`` failed attempts: between half and all of min(max, initial * 2^(n-1))."""
    # the exponent capped: after 1,025 attempts (8.5 h of an outage at retry_max 30 s) 2 ** n was
    # no float, and the queue's bookkeeping raised at every attempt from then on
    ceiling = min(options.retry_max, options.retry_initial * 2 ** min(max(0, attempts - 1), 60))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


@runtime_checkable
class Queue(Protocol):
    """What the engine, its trips and its controls use of a destination's queue: this module's
    :class:`DestinationQueue` in the engine's process, or :class:`~hl7relay.forwarder.parent.RemoteQueue`
    standing in for one that runs in the forwarder process (``remote``)."""

    channel: str
    destination: str
    options: QueueOptions
    paused: bool
    remote: bool  # runs in the forwarder process: retired and counted there

    @property
    def stopped(self) -> bool:
        """Stopped for good (a new queue takes over)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def partition_of(self, order_key: str | None, content: bytes | None) -> int:
        """The partition a new delivery goes to (0 unless the queue is a cluster's, cluster.py)."""

    def enqueue(self, message_id: int, content: bytes, order_key: str | None, received_at: float,
                message: Message | None = None) -> None:
        """A delivery row was just committed: send it (``message``: its content parsed)."""

    def first_result(self, message_id: int) -> defer.Deferred:
        """after_delivery: fires with the DeliveryResult of the message's next attempt."""

    def release(self, message_id: int) -> None:
        """A held delivery goes back to its retries."""

    def withdraw(self, message_id: int, reason: str) -> defer.Deferred | None:
        """A held delivery is recorded WITHDRAWN and never sent."""

    def pause(self): ...

    def resume(self): ...

    def retry_now(self): ...

    def view(self) -> dict:
        """The queue as an operator sees it."""

    @property
    def in_flight(self):
        """Deliveries on the wire (sized)."""


class DestinationHealth(enum.Enum):
    """How a destination looks to the person on call (its queue's ``state``): paused by an
    operator; held (it refused the credentials); down (not reachable); failing (reachable, but most of its recent attempts failed:
    AE, AR/CR, no answer in time); ok; idle (nothing tried yet)."""

    PAUSED = "paused"
    HELD = "held"  # it refused our credentials (401/403): nothing is sent until an operator resumes it
    DOWN = "down"
    RATE_LIMITED = "rate_limited"  # it asked us to wait (429/503 with Retry-After): waiting
    FAILING = "failing"
    OK = "ok"
    IDLE = "idle"


class QueueState(enum.Enum):
    """A queue's life: made, running (polling and sending), stopped for good (a stop, a reload or
    a channel disabled: a new queue takes over). Pausing is an operator's switch beside it."""

    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


# the only moves a queue makes; anything else is a bug, said at once
_QUEUE_MOVES = {
    QueueState.NEW: {QueueState.RUNNING, QueueState.STOPPED},
    QueueState.RUNNING: {QueueState.STOPPED},
    QueueState.STOPPED: set(),
}


class Pump(enum.Enum):
    """What the loop that starts deliveries (``run``) is doing: idle, running, or running and
    asked meanwhile to look again (an answer, a nudge or a resume came in while it ran)."""

    IDLE = "idle"
    RUNNING = "running"
    RUNNING_AGAIN = "running_again"


@dataclass(slots=True)
class QueuedDelivery:
    """One QUEUED delivery as its queue holds it in memory: handed over by the engine right
    after its commit, or read back from the store by a poll."""

    message_id: int
    received_at: float
    order_key: str | None
    content: bytes | None  # what to send (its own stage, else the transformed message), or None: raw
    raw: bytes
    attempts: int = 0
    next_attempt_at: float | None = None
    message: Message | None = None  # the content parsed, when the engine handed it over (not parsed again)
    rejections: int = 0  # refusals by the peer, counted in memory (a restart gives a full count again)
    held: bool = False  # after_delivery: a failed first attempt waits for the engine's release or withdrawal
    polled: bool = False  # read by a poll, not handed over: a waiter may come after its first attempt


@dataclass(slots=True)
class _Waiter:
    message_id: int
    deferred: defer.Deferred


class DestinationQueue:
    """One destination's queue. New deliveries arrive in memory from the engine (``enqueue``)
    right after their commit; the delivery rows are read again every ``poll_interval`` to pick up
    what memory does not know (after a restart, or replays written by another process)."""

    remote = False  # runs in this process

    def __init__(self, channel: str, destination: str, deliver, options: QueueOptions, writer, reactor, clock,
                 poll_interval: float = 1.0, rng: random.Random | None = None, keyed: bool = False,
                 describe=None, partition: int | None = None, lease: tuple | None = None):
        """``keyed``: ``deliver`` takes the delivery's message id too (``deliver(message, message_id)``),
        e.g. for an idempotency key that stays the same however often the delivery is tried.
        ``partition``: only that partition of the destination's deliveries (a cluster's), whose
        results are written under ``lease`` (name, owner, epoch): fenced once it moved on. Other
        nodes write rows into it too, and their ids do not grow in commit order (a lower id may
        commit after a higher one is seen): such a queue takes rows only from its polls, each read
        from the oldest queued row, never "after the newest held" nor from memory first."""
        self.partition, self.lease = partition, lease
        self.shared = partition is not None
        self.on_report = None  # () -> None: a partition's state changed (cluster.PartitionedQueue reports)
        self.poller = None  # a cluster's destination, which reads the partitions it holds together (request(part))
        self.channel = channel
        self.keyed = keyed
        self.describe = describe  # the destination's own view (an API's token and rate limit), for sync status
        self.destination = destination
        self.deliver = deliver
        self.options = options
        self.writer = writer
        self.reactor = reactor
        self.clock = clock
        self.rng = rng or random.Random()
        self.poll_interval = poll_interval
        self.loop = task.LoopingCall(self._poll)
        self.loop.clock = reactor
        self.pending: dict[int, QueuedDelivery] = {}  # by message id, in order of receipt (dicts keep insertion order)
        self.known: set[int] = set()  # pending, in flight, or finished but not yet recorded
        self.state = QueueState.NEW
        self.pump = Pump.IDLE
        self._nudge_call = None  # the run a nudge scheduled for the next reactor turn, until it runs
        self._polling = False  # a read of the queued rows is under way (one at a time)
        self._poll_soon = None  # a shared queue's read scheduled by a row stored here (nudge_poll)
        self.in_flight: dict[int, QueuedDelivery] = {}  # by message id: being delivered
        self.connected: bool | None = None
        self.backlog = 0  # queued rows the last poll saw beyond what memory holds
        # True while queued rows may wait on disk that memory does not hold (always newer than
        # what memory holds); cleared by a poll that read all of them, including the newest row
        # sent to disk (ids grow in commit order). True at first: until the first poll, what a
        # restart left queued is unknown
        self.spilled = True
        self._spilled_max = 0  # the newest message id sent to disk instead of memory
        self._loaded_max = 0  # the newest message id ever taken into memory
        self.sent = self.failed = self.retried = 0
        self._waiters: dict[int, list[defer.Deferred]] = {}
        self._holding: set[int] = set()  # after_delivery: a failed first attempt waits for release/withdraw
        # message id -> (when, result) of a first attempt that nobody waited for, of a row a poll
        # loaded: a trip whose commit the poll saw before its callback ran asks for it late
        self._unclaimed: dict[int, tuple[float, DeliveryResult]] = {}
        self._wake = None
        self.paused = False  # an operator's pause: the queue keeps filling, nothing is sent
        # the last attempts (when, whether it was accepted): "failing" is read from them, since a
        # destination that answers AE to everything is connected, and not well
        self._recent: deque[tuple[float, bool]] = deque(maxlen=_RECENT_ATTEMPTS)
        self.last_error = ""
        self.last_error_at: float | None = None
        self.last_error_class: str | None = None  # auth, rate limited, refused, conflict, unreachable, timed out...
        self.last_sent_at: float | None = None
        # an API that refused our credentials (401/403): the queue holds, as if paused, until an
        # operator resumes it (the credentials are fixed); the reason is shown and alerted on
        self.hold_reason: str | None = None
        # an API that asked us to wait (429/503, Retry-After): nothing is sent before this time;
        # since when it has been asking (the rate-limited alert)
        self.waiting_until: float | None = None
        self.rate_limited_since: float | None = None

    @property
    def stopped(self) -> bool:
        return self.state is QueueState.STOPPED

    def _move(self, to: QueueState) -> None:
        if to not in _QUEUE_MOVES[self.state]:
            raise RuntimeError(f"queue {self.channel}/{self.destination}: cannot go from {self.state.value} to {to.value}")
        self.state = to

    def start(self) -> None:
        self._move(QueueState.RUNNING)
        self.loop.start(self.poll_interval, now=True)

    def stop(self) -> None:
        if self.state is QueueState.STOPPED:
            return
        self._move(QueueState.STOPPED)
        if self._nudge_call is not None and self._nudge_call.active():
            self._nudge_call.cancel()
        self._nudge_call = None
        if self._poll_soon is not None and self._poll_soon.active():
            self._poll_soon.cancel()
        self._poll_soon = None
        if self.loop.running:
            self.loop.stop()
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        # after_delivery: a trip waiting for the first attempt of a row this queue will not send
        # now hears so at once (it answers AR and withdraws the row; the sender sends it again):
        # otherwise it waits for an attempt that never comes, and its sender for an answer
        for message_id in [m for m in self._waiters if m not in self.in_flight]:
            row = self.pending.get(message_id)
            if row is not None:
                row.held = True
            for waiter in self._waiters.pop(message_id):
                waiter.callback(DeliveryResult(False, error="not sent: the destination's queue stopped (engine stopping "
                                                           "or channel reloaded)", outcome=DeliveryOutcome.FAILED))

    def partition_of(self, order_key: str | None, content: bytes | None) -> int:
        return self.partition or 0

    def enqueue(self, message_id: int, content: bytes, order_key: str | None, received_at: float,
                message: Message | None = None) -> None:
        """A delivery row was just committed: send it without reading it back (``message``: the
        content already parsed; nothing may change it afterwards)."""
        if message_id in self.known or self.stopped:
            return
        if self.shared:  # rows of other nodes may come before it: the poll reads them all in order
            self.nudge_poll()
            return
        if self.spilled or len(self.pending) >= _MEMORY_LIMIT:
            # a slow or down destination: the rest waits on disk, read back in order as memory
            # drains. Once anything waits there, newer rows wait there too: memory must hold the
            # oldest queued rows only, or a new message would overtake older ones of its key
            self.spilled = True
            self._spilled_max = max(self._spilled_max, message_id)
            self.backlog += 1
            return
        self.known.add(message_id)
        self._loaded_max = max(self._loaded_max, message_id)
        self.pending[message_id] = QueuedDelivery(message_id, received_at, order_key, content, content,
                                                  next_attempt_at=received_at, message=message)
        self.nudge()

    # -- operators' controls -----------------------------------------------------------------------
    def pause(self) -> None:
        """Send nothing more (deliveries in flight finish); new deliveries keep queueing."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.hold_reason = None
        self.nudge()

    def hold(self, reason: str) -> None:
        """The destination refused our credentials: send nothing more (nothing is dead-lettered:
        it is not the messages' fault) until an operator resumes the queue."""
        if self.hold_reason is None:
            log.error("queue {channel}/{destination}: held: {reason}; nothing is sent until the credentials are "
                      "fixed and the queue resumed (hl7relay destination resume {channel} {destination})",
                      channel=self.channel, destination=self.destination, reason=reason)
        self.hold_reason = reason
        self.paused = True

    def retry_now(self) -> int:
        """Skip the backoff of every delivery waiting for its next attempt; how many there were."""
        now = self.clock()
        waiting = [row for row in self.pending.values()
                   if (row.next_attempt_at or 0) > now and row.message_id not in self.in_flight]
        for row in waiting:
            row.next_attempt_at = now
        count = len(waiting)
        if self.waiting_until is not None and self.waiting_until > now:
            self.waiting_until = now  # the operator overrides the destination's Retry-After
            count = max(count, 1)
        if count:
            self.nudge()
        return count

    def view(self) -> dict:
        """The queue as an operator sees it (from memory: no store read)."""
        now = self.clock()
        head = next(iter(self.pending.values()), None)
        oldest = min((row.received_at for row in self.pending.values()), default=None)
        return {
            "channel": self.channel, "destination": self.destination, "paused": self.paused,
            "connected": self.connected, "state": self._health(now).value, "depth": len(self.pending) + self.backlog, "in_memory": len(self.pending),
            "on_disk": self.backlog, "in_flight": len(self.in_flight),
            "oldest_age": None if oldest is None else max(0.0, now - oldest),
            "head": None if head is None else {
                "message_id": head.message_id, "attempts": head.attempts,
                "next_attempt_in": max(0.0, (head.next_attempt_at or now) - now), "held": head.held,
            },
            "last_error": self.last_error, "last_error_at": self.last_error_at,
            "last_error_class": self.last_error_class, "last_sent_at": self.last_sent_at,
            "held": self.hold_reason,
            "rate_limited_since": self.rate_limited_since,
            "wait_left": None if self.waiting_until is None else max(0.0, self.waiting_until - now),
            "sent": self.sent, "failed": self.failed, "retried": self.retried,
            **({"api": self.describe()} if self.describe is not None else {}),
        }

    def _health(self, now: float) -> "DestinationHealth":
        if self.hold_reason is not None:
            return DestinationHealth.HELD
        if self.paused:
            return DestinationHealth.PAUSED
        if self.waiting_until is not None and self.waiting_until > now:
            return DestinationHealth.RATE_LIMITED
        recent = [ok for at, ok in self._recent if now - at <= _RECENT_SECONDS]
        if self.connected is False:
            return DestinationHealth.DOWN
        failed = recent.count(False)
        if recent and not recent[-1] and failed >= _FAILING_AT_LEAST and failed * 2 >= len(recent):
            return DestinationHealth.FAILING
        if self.connected or recent:
            return DestinationHealth.OK
        return DestinationHealth.IDLE

    def nudge_poll(self) -> None:
        """A row was just stored here for this (shared) queue: read the queue on the next turn
        (once, however many come meanwhile), rather than at the next poll_interval."""
        if self.state is QueueState.STOPPED or self._poll_soon is not None:
            return
        if self.poller is not None:  # its destination's reads come at most every 50 ms already
            self.poller.request(self)
            return
        self._poll_soon = self.reactor.callLater(0.05, self._poll_now)

    def _poll_now(self):
        self._poll_soon = None
        if self.state is not QueueState.STOPPED:
            return self._poll()

    def nudge(self) -> None:
        """Look for due deliveries: now if the pump is running (it looks again), else on the
        next reactor turn (once, however many nudges come meanwhile)."""
        if self.state is QueueState.STOPPED:
            return
        if self.pump is not Pump.IDLE:
            self.pump = Pump.RUNNING_AGAIN
        elif self._nudge_call is None:
            self._nudge_call = self.reactor.callLater(0, self._nudge_run)

    def _nudge_run(self):
        self._nudge_call = None
        self.run()

    def first_result(self, message_id: int) -> defer.Deferred:
        """Fires with the DeliveryResult of the message's next attempt (for response.when:
        after_delivery). A failed attempt is then *held*, not retried, until the caller says
        :meth:`release` (retry as usual) or :meth:`withdraw` (the sender was told to resend)."""
        early = self._unclaimed.pop(message_id, None)
        if early is not None and message_id not in self.in_flight:
            # a poll read the row as soon as it was committed, before the engine handed it over,
            # and its first attempt is over: that attempt is the answer; a failed one waits for
            # release/withdraw like any other (its retry has not started: it is not in flight)
            result = early[1]
            row = self.pending.get(message_id)
            if row is not None:
                row.held = True
                self._holding.add(message_id)
            return defer.succeed(result)
        d: defer.Deferred = defer.Deferred()
        self._waiters.setdefault(message_id, []).append(d)
        self._holding.add(message_id)
        return d

    def release(self, message_id: int) -> None:
        """A held delivery goes back to its retries."""
        self._holding.discard(message_id)
        row = self.pending.get(message_id)
        if row is not None and row.held:
            row.held = False
            self.nudge()

    def withdraw(self, message_id: int, reason: str) -> defer.Deferred | None:
        """A held delivery is taken out of the queue and recorded WITHDRAWN: the sender was
        answered with a request to send again, so this copy must never reach the peer too."""
        self._holding.discard(message_id)
        if message_id in self.in_flight:
            return None
        row = self.pending.get(message_id)
        if row is None:
            # only a stopped queue withdraws a row it does not hold (one left on disk, beyond
            # memory): it sends nothing more, and its successor must not send it either
            if not self.stopped:
                return None
        elif not row.held:
            return None
        else:
            del self.pending[message_id]
        update = self._record(message_id, {"status": _WITHDRAWN, "last_error": reason, "next_attempt_at": None,
                                           "updated_at": self.clock()}, lazy=False)
        self.nudge()
        return update

    @defer.inlineCallbacks
    def _poll(self, after_id: int | None = None):
        """Read QUEUED rows that memory does not hold: every poll_interval all of them from the
        oldest (restarts, replays, anything missed), and only those after what memory holds while
        rows wait on disk (``spilled``): memory then holds the oldest queued rows, the disk the
        newer ones, so reading after the newest in memory keeps the order of receipt (the rows
        just sent may still read as QUEUED until their results are committed, and must not fill
        the window)."""
        if self._polling:
            return
        if self.poller is not None and after_id is None:
            # a cluster's partition: its destination reads every partition that asks in one go
            self.poller.request(self)
            return
        if after_id is None and self.spilled and self.known and not self.shared:
            after_id = max(self.known)
        self._polling = True
        known_before = len(self.known)
        try:
            read = self.writer.read_aside if self.shared else self.writer.read
            rows = yield read(self.writer.store.queued_deliveries, self.channel, self.destination, _FETCH,
                              after_id, frozenset(self.known), self.partition)
        except StoreError as exc:
            log.error("queue {channel}/{destination}: cannot read the queue: {error}", channel=self.channel,
                      destination=self.destination, error=str(exc))
            return
        finally:
            self._polling = False
        yield self.take(rows, after_id, known_before)

    @defer.inlineCallbacks
    def take(self, rows: list[dict], after_id: int | None, known_before: int):
        """What a read of the queued rows found (``rows``: those memory did not know of the first
        _FETCH read; ``known_before``: how many memory knew when the read began), into memory."""
        room = max(0, _MEMORY_LIMIT - len(self.pending))
        unknown = [row for row in rows if row["message_id"] not in self.known]
        fresh = unknown[:room]
        for row in fresh:
            message_id = row["message_id"]
            self.known.add(message_id)
            self.pending[message_id] = QueuedDelivery(message_id, row["received_at"], row["order_key"], row["content"],
                                                      row["raw"], row["attempts"], row["next_attempt_at"], polled=True)
            self._loaded_max = max(self._loaded_max, message_id)
        if fresh:  # keep the order of receipt when older rows join newer ones
            self.pending = dict(sorted(self.pending.items()))
        # the read saw every queued row when its window was not full: after an id, the window
        # held only rows memory did not know; from the oldest, at most what memory knew besides
        window = len(rows) if after_id is not None else len(rows) + known_before
        complete = window < _FETCH and len(fresh) == len(unknown)
        self.backlog = 0
        if not complete:
            self._polling = True
            try:
                # a cluster's partition counts off the commit thread: after a take-over every
                # partition with a backlog counts at each read, and the commits (and the lease
                # renewals behind them) waited seconds for those counts
                read = self.writer.read_aside if self.shared else self.writer.read
                depth = yield read(self.writer.store.queue_depth, self.channel, self.destination, self.partition)
                # what memory holds (pending, in flight, sent but not yet recorded) is not backlog;
                # counting it would make every finished delivery poll again
                self.backlog = max(0, depth - len(self.known))
                complete = self.backlog == 0
                if not complete:
                    self.spilled = True  # e.g. a restart with more queued than memory holds
            except StoreError:
                pass
            finally:
                self._polling = False
        if complete and self._spilled_max <= self._loaded_max:
            # everything queued on disk is in memory, the newest row sent there included (one
            # sent there while this read ran is newer than what it loaded): new rows join memory
            self.spilled = False
        self._report()
        self.run()

    def run(self):
        """Start due deliveries until ``parallel`` are in flight; each finished one calls again."""
        if self.pump is not Pump.IDLE:
            self.pump = Pump.RUNNING_AGAIN
            return
        try:
            while self.state is not QueueState.STOPPED:
                self.pump = Pump.RUNNING
                while len(self.in_flight) < self.options.parallel:
                    row = self._next_due()
                    if row is None:
                        break
                    self._start(row)
                if self.pump is not Pump.RUNNING_AGAIN:
                    break
        finally:
            self.pump = Pump.IDLE
        if not self.stopped and len(self.in_flight) < self.options.parallel:
            self._sleep_until()  # a free slot and nothing due: wake for the next retry (a full queue wakes on answers)

    def _next_due(self) -> QueuedDelivery | None:
        if self.paused:
            return None
        now = self.clock()
        if self.waiting_until is not None and now < self.waiting_until:
            return None  # the destination asked for quiet (Retry-After): no key sends meanwhile
        order, in_flight = self.options.order, self.in_flight
        if order == "in_order":
            if in_flight or not self.pending:
                return None  # the head blocks: nothing overtakes it
            row = next(iter(self.pending.values()))
            return row if (row.next_attempt_at or 0) <= now and not row.held else None
        blocked = {row.order_key or "" for row in in_flight.values()} if order == "per_key" else None
        for message_id, row in self.pending.items():
            if message_id in in_flight:
                continue
            if blocked is not None:
                key = row.order_key or ""
                if key in blocked:
                    continue
                blocked.add(key)  # later rows of this key wait for this one
            if (row.next_attempt_at or 0) <= now and not row.held:
                return row
        return None

    def _start(self, row: QueuedDelivery) -> None:
        message_id = row.message_id
        self.in_flight[message_id] = row
        d = self._attempt(row)

        def finished(result):
            self.in_flight.pop(message_id, None)
            if self.spilled and not self.stopped and not self._polling and len(self.pending) <= _MEMORY_LIMIT // 2:
                self.reactor.callLater(0, self._poll)  # room again: read what waits on disk, after what memory holds
            if self.pending:
                self.run()
            return result

        d.addBoth(finished)
        d.addErrback(lambda f: log.failure("queue {channel}/{destination}: delivery bookkeeping failed", f,
                                           channel=self.channel, destination=self.destination))

    def _sleep_until(self) -> None:
        # rows that are due but wait behind one in flight are started when it finishes
        now = self.clock()
        later = [at for row in self.pending.values() if (at := row.next_attempt_at) and at > now]
        if self.waiting_until is not None and self.waiting_until > now and self.pending:
            later.append(self.waiting_until)
        if self._wake is not None and self._wake.active():
            if later and self._wake.getTime() - self.reactor.seconds() <= min(later) - now:
                return  # already set to wake in time
            self._wake.cancel()
        if later:
            self._wake = self.reactor.callLater(min(later) - now, self.run)

    def depth(self) -> tuple[int, float | None]:
        """(deliveries queued, when the oldest of them was received): what the metrics show."""
        return len(self.pending) + self.backlog, min((row.received_at for row in self.pending.values()), default=None)

    def _report(self) -> None:
        if self.on_report is not None:  # one partition of a cluster's queue: its destination reports the sum
            self.on_report()
            return
        depth, oldest = self.depth()
        emit("queue_state", channel=self.channel, destination=self.destination, depth=depth,
             oldest_age=None if oldest is None else max(0.0, self.clock() - oldest))

    def _attempt(self, row: QueuedDelivery) -> defer.Deferred:
        """Send one delivery; the Deferred fires once its result is handled (not yet recorded)."""
        data = row.content if row.content is not None else row.raw
        try:
            message = row.message or parse_content(data)
        except (ParseError, ValueError) as exc:
            self._handle_result(DeliveryResult(False, application_error=True,
                                               error=f"stored content is neither HL7 nor JSON: {exc}"),
                                row, None)
            return defer.succeed(None)
        started = time.perf_counter()
        d = (defer.maybeDeferred(self.deliver, message, row.message_id) if self.keyed
             else defer.maybeDeferred(self.deliver, message))
        d.addErrback(self._raised)
        return d.addCallback(self._handle_result, row, started)

    def _raised(self, failure) -> "DeliveryResult":
        # a destination bug must not stop the queue: it counts as a failed (retried) attempt
        log.failure("queue {channel}/{destination}: delivery raised", failure, channel=self.channel,
                    destination=self.destination)
        return DeliveryResult(False, error=f"{failure.type.__name__}: {failure.getErrorMessage()}")

    def _handle_result(self, result: "DeliveryResult", row: QueuedDelivery, started: float | None) -> None:
        message_id = row.message_id
        outcome = result.outcome
        # a destination that asked us to wait, or refused our credentials, says nothing about the
        # message: not a failed attempt (no backoff step, never a dead letter for it)
        counted = outcome is not _RATE_LIMITED and outcome is not _NOT_AUTHORISED
        attempts = row.attempts + 1 if counted else row.attempts
        now = self.clock()
        values = {"attempts": attempts, "updated_at": now, "last_ack": result.ack}
        # what the tracer and the performance analyzer see of the attempt (no content)
        labels = {"channel": self.channel, "destination": self.destination, "message_id": message_id,
                  "attempts": attempts, "seconds": None if started is None else time.perf_counter() - started,
                  "ack": _ack_code(result.ack), "error": result.error, "peer": _ack_peer(result.ack)}
        final = True
        if outcome is not _RATE_LIMITED and result.reached_peer:
            self.rate_limited_since = None
        if result.ok:
            values.update(status=_SENT, last_error="", next_attempt_at=None)
            self.sent += 1
            emit("delivery_sent", **labels)
        elif not counted:
            final = False
            if message_id in self._holding:
                row.held = True
            if outcome is _RATE_LIMITED:
                wait = result.wait if result.wait is not None else retry_delay(1, self.options, self.rng)
                row.next_attempt_at = now + wait
                self.waiting_until = max(self.waiting_until or 0.0, now + wait)
                if self.rate_limited_since is None:
                    self.rate_limited_since = now
                log.warn("queue {channel}/{destination}: message {message_id}: {error}", channel=self.channel,
                         destination=self.destination, message_id=message_id, error=result.error)
            else:
                row.next_attempt_at = now
                self.hold(result.error)
            values.update(status=_QUEUED, last_error=result.error, next_attempt_at=row.next_attempt_at)
            emit("delivery_retried", **labels)
            self.retried += 1
        elif result.application_error:
            values.update(status=_ERROR, last_error=result.error, next_attempt_at=None)
            self.failed += 1
            emit("delivery_failed", **labels)
        elif result.rejected and row.rejections + 1 >= self.options.max_attempts:
            values.update(status=_ERROR, last_error=f"gave up after {attempts} attempts "
                          f"({row.rejections + 1} refused by the peer): {result.error}", next_attempt_at=None)
            self.failed += 1
            emit("delivery_failed", **labels)
        elif (not result.rejected and self.options.give_up_after
              and now - row.received_at >= self.options.give_up_after):
            values.update(status=_ERROR, last_error=f"gave up after {attempts} attempts over "
                          f"{now - row.received_at:.0f}s (give_up_after): {result.error}", next_attempt_at=None)
            self.failed += 1
            emit("delivery_failed", **labels)
        else:
            final = False
            if message_id in self._holding:
                row.held = True  # the engine decides, from every destination's answer, what happens next
            if result.rejected:  # counted in memory: a restart gives a refused message its full count again
                row.rejections += 1
            emit("delivery_retried", **labels)
            delay = retry_delay(attempts, self.options, self.rng)
            values.update(status=_QUEUED, last_error=result.error, next_attempt_at=now + delay)
            row.attempts, row.next_attempt_at = attempts, now + delay
            self.retried += 1
            log.warn("queue {channel}/{destination}: message {message_id} attempt {n} failed ({error}); retry in {delay:.1f}s",
                     channel=self.channel, destination=self.destination, message_id=message_id, n=attempts,
                     error=result.error, delay=delay)
        if final:
            self.pending.pop(message_id, None)
            if not result.ok:
                # a dead letter needs a person: one line each, with what identifies it and why in
                # words of our own (the peer's error text may quote the patient: messages show has it)
                why = (f"answered {labels['ack']} (application error)" if result.application_error and labels["ack"] else
                       "not deliverable (application error)" if result.application_error else
                       f"refused {row.rejections + 1} time(s)" if result.rejected else
                       f"{result.outcome.value if result.outcome else 'failed'} until give_up_after")
                log.warn("queue {channel}/{destination}: message {message_id} is a dead letter after {n} attempt(s): "
                         "{why}; hl7relay messages show {message_id}, hl7relay replay {message_id}",
                         channel=self.channel, destination=self.destination, message_id=message_id, n=attempts, why=why)
        if not result.ok:
            self.last_error, self.last_error_at = result.error, now
            self.last_error_class = _error_class(result)
        else:
            self.last_sent_at = now
        self._recent.append((now, result.ok))
        self._state(result)
        # the attempt is over before anyone hears of it: a waiter may withdraw the row at once,
        # and its withdrawal must be recorded after this attempt's result, not overwritten by it
        self.in_flight.pop(message_id, None)
        # recorded through the group commit; the id stays "known" until then so a poll cannot resend it
        if final:
            update = self._record(message_id, values, lazy=True, extra=result.records)
        else:  # a retry's schedule: if it is lost, the row is still QUEUED and its next result is recorded
            update = self.writer.update(DeliveryUpdate(message_id, self.destination, values, self.lease), lazy=True)
        waiters = self._waiters.pop(message_id, None)
        if waiters:
            for waiter in waiters:
                waiter.callback(result)
        elif attempts == 1 and row.polled:
            self._remember_unclaimed(message_id, result, now)
        if not final:  # (a final result's failure is said by _record, which tries again)
            update.addErrback(lambda f: log.error("queue {channel}/{destination}: could not record attempt {n} of "
                                                  "{message_id}: {error}", channel=self.channel, n=attempts,
                                                  destination=self.destination, message_id=message_id,
                                                  error=f.getErrorMessage()))
        update.addErrback(lambda f: None)
        if not self.pending:
            self._report()

    def _record(self, message_id: int, values: dict, lazy: bool, extra: tuple = ()) -> defer.Deferred:
        """Commit a delivery's final values (SENT, ERROR, WITHDRAWN) through the group commit; the
        id stays "known" until they are, so no poll reads the row (still QUEUED in the store) and
        sends it again. While the store does not take them (a database outage) they are tried again
        every few seconds: before, the id was forgotten at the first failure and the delivery sent
        a second time once the store was back. The Deferred fails with the first failure (callers
        log it); the retries go on behind it until they succeed or the queue stops."""
        update = self.writer.update(DeliveryUpdate(message_id, self.destination, values, self.lease), *extra, lazy=lazy)

        def recorded(outcome):
            self.known.discard(message_id)
            return outcome

        def failed(failure):
            if self.state is not QueueState.STOPPED:
                log.error("queue {channel}/{destination}: could not record delivery of {message_id} ({error}); "
                          "trying again in {delay:g}s, and not sending it meanwhile", channel=self.channel,
                          destination=self.destination, message_id=message_id, error=failure.getErrorMessage(),
                          delay=_RECORD_RETRY)
                self.reactor.callLater(_RECORD_RETRY, self._record_again, message_id, values, extra)
            else:
                # stopped: the row stays QUEUED in the store, and the queue that takes over (or
                # the restart) sends it again: at-least-once, as after a crash
                log.error("queue {channel}/{destination}: could not record delivery of {message_id}: {error}",
                          channel=self.channel, destination=self.destination, message_id=message_id,
                          error=failure.getErrorMessage())
            return failure

        return update.addCallbacks(recorded, failed)

    def _record_again(self, message_id: int, values: dict, extra: tuple = ()) -> None:
        if self.state is QueueState.STOPPED:
            return
        self._record(message_id, values, lazy=False, extra=extra).addErrback(lambda f: None)  # it says so, and tries again

    def _remember_unclaimed(self, message_id: int, result: DeliveryResult, now: float) -> None:
        unclaimed = self._unclaimed
        unclaimed[message_id] = (now, result)
        while unclaimed:
            oldest_id, (at, _) = next(iter(unclaimed.items()))
            if len(unclaimed) <= _UNCLAIMED_LIMIT and now - at <= _UNCLAIMED_SECONDS:
                break
            del unclaimed[oldest_id]

    def _state(self, result) -> None:
        connected = result.reached_peer
        if connected != self.connected:
            self.connected = connected
            emit("destination_state", channel=self.channel, destination=self.destination, connected=connected)
            d = self.writer.update(DestinationStateUpdate(self.channel, self.destination, connected,
                                                          "" if connected else result.error, self.clock()))
            d.addErrback(lambda f: log.warn("could not record destination state: {e}", e=f.getErrorMessage()))


_CLASSES = {DeliveryOutcome.NOT_AUTHORISED: "auth", DeliveryOutcome.RATE_LIMITED: "rate limited",
            DeliveryOutcome.CONFLICT: "conflict", DeliveryOutcome.UNREACHABLE: "unreachable",
            DeliveryOutcome.TIMED_OUT: "timed out", DeliveryOutcome.FAILED: "failed",
            DeliveryOutcome.HELD_FOR_MATCHING: "held for matching"}


def _error_class(result: DeliveryResult) -> str:
    """What kind of failure, for the sync status: auth, rate limited, refused (AE, AR, a 4xx),
    conflict, unreachable, timed out, failed (a 5xx, a local failure)."""
    if result.outcome is not None:
        return _CLASSES.get(result.outcome, result.outcome.value)
    return "refused" if result.application_error or result.rejected else "failed"


def _ack_peer(ack: str) -> str | None:
    """Who answered, when the answer says it: "POST https://host/path" of an API's answer."""
    if not ack.startswith("HTTP "):
        return None
    head = ack.split("\n", 1)[0].split(" ")
    return " ".join(head[2:4]) if len(head) >= 4 else None


def _ack_code(ack: str) -> str:
    """MSA-1 of an ACK kept as text, "HTTP 201" of an API's answer ("" for what is neither: a
    file written, no answer)."""
    if ack.startswith("HTTP "):
        return ack[:8]
    at = ack.find("MSA|")
    return ack[at + 4:at + 6] if at >= 0 and (at == 0 or ack[at - 1] in "\r\n") else ""
