"""Durable destination queues: every delivery is a row; a worker sends it and records the answer.

Retries with exponential backoff and jitter on connection failure, timeout, AR or CR; AE is not
retried (an application error needs a person) and goes to ERROR, as do exhausted retries (the
dead-letter state, visible and replayable). Order: one at a time in order of receipt (a failing
head blocks the queue, visibly), or ``per_key``: in order per key (e.g. per patient), keys in
parallel. The rows are the truth: the worker polls them, so a restart, or a replay written by
another process, is picked up. Delivery is at-least-once: a crash between sending and recording
the answer sends the message again after the restart.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from twisted.internet import defer, task
from twisted.logger import Logger

from hl7relay.channels.destinations import QueueOptions
from hl7relay.errors import ParseError
from hl7relay.events import emit
from hl7relay.message import Message
from hl7relay.store import StoreError

__all__ = ["DestinationQueue", "DeliveryResult", "retry_delay"]

log = Logger(namespace="hl7relay.queue")
_FETCH = 200  # deliveries read per look


def retry_delay(attempts: int, options: QueueOptions, rng: random.Random) -> float:
    """Wait after ``attempts`` failed attempts: between half and all of min(max, initial * 2^(n-1))."""
    ceiling = min(options.retry_max, options.retry_initial * 2 ** max(0, attempts - 1))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


@dataclass(slots=True)
class _Waiter:
    message_id: int
    deferred: defer.Deferred


class DestinationQueue:
    """One destination's queue. New deliveries arrive in memory from the engine (``enqueue``)
    right after their commit; the delivery rows are read again every ``poll_interval`` to pick up
    what memory does not know (after a restart, or replays written by another process)."""

    def __init__(self, channel: str, destination: str, deliver, options: QueueOptions, writer, reactor, clock,
                 poll_interval: float = 1.0, rng: random.Random | None = None):
        self.channel = channel
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
        self.pending: dict[int, dict] = {}  # message id -> row, in order of receipt (dicts keep insertion order)
        self.known: set[int] = set()  # pending, in flight, or finished but not yet recorded
        self.busy = False
        self.again = False
        self.stopped = False
        self.connected: bool | None = None
        self.backlog = 0  # queued rows the last poll saw beyond what memory holds
        self.sent = self.failed = self.retried = 0
        self._waiters: dict[int, list[defer.Deferred]] = {}
        self._wake = None

    def start(self) -> None:
        self.loop.start(self.poll_interval, now=True)

    def stop(self) -> None:
        self.stopped = True
        if self.loop.running:
            self.loop.stop()
        if self._wake is not None and self._wake.active():
            self._wake.cancel()

    def enqueue(self, message_id: int, content: bytes, order_key: str | None, received_at: float) -> None:
        """A delivery row was just committed: send it without reading it back."""
        if message_id in self.known or self.stopped:
            return
        self.known.add(message_id)
        self.pending[message_id] = {"message_id": message_id, "attempts": 0, "next_attempt_at": received_at,
                                    "order_key": order_key, "content": content, "raw": content, "received_at": received_at}
        self.nudge()

    def nudge(self) -> None:
        if not self.stopped and not self.busy:
            self.reactor.callLater(0, self.run)
        else:
            self.again = True

    def first_result(self, message_id: int) -> defer.Deferred:
        """Fires with the DeliveryResult of the message's next attempt (for response.when: after_delivery)."""
        d = defer.Deferred()
        self._waiters.setdefault(message_id, []).append(d)
        return d

    @defer.inlineCallbacks
    def _poll(self):
        try:
            rows = yield self.writer.read(self.writer.store.queued_deliveries, self.channel, self.destination, _FETCH)
        except StoreError as exc:
            log.error("queue {channel}/{destination}: cannot read the queue: {error}", channel=self.channel,
                      destination=self.destination, error=str(exc))
            return
        fresh = [row for row in rows if row["message_id"] not in self.known]
        for row in fresh:
            self.known.add(row["message_id"])
            self.pending[row["message_id"]] = row
        if fresh:  # keep the order of receipt when older rows join newer ones
            self.pending = dict(sorted(self.pending.items()))
        self.backlog = 0
        if len(rows) >= _FETCH:
            self.backlog = max(0, (yield self.writer.read(self.writer.store.queue_depth, self.channel, self.destination))
                               - len(self.pending))
        self._report()
        self.run()

    @defer.inlineCallbacks
    def run(self):
        if self.busy:
            self.again = True
            return
        self.busy = True
        try:
            while not self.stopped:
                self.again = False
                due = self._due(list(self.pending.values()))
                for row in due:
                    if self.stopped:
                        return
                    yield self._attempt(row)
                if not due and not self.again:
                    self._sleep_until()
                    return
        finally:
            self.busy = False

    def _due(self, rows: list[dict]) -> list[dict]:
        now = self.clock()
        if self.options.order == "in_order":
            heads = rows[:1]  # the head blocks: nothing overtakes it
        else:
            seen, heads = set(), []
            for row in rows:
                key = row["order_key"] or ""
                if key not in seen:
                    seen.add(key)
                    heads.append(row)
        return [row for row in heads if (row["next_attempt_at"] or 0) <= now]

    def _sleep_until(self) -> None:
        pending = [row["next_attempt_at"] for row in self.pending.values() if row["next_attempt_at"]]
        if not pending:
            return
        delay = max(0.0, min(pending) - self.clock())
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        self._wake = self.reactor.callLater(delay, self.run)

    def _report(self) -> None:
        oldest = min((row["received_at"] for row in self.pending.values()), default=None)
        emit("queue_state", channel=self.channel, destination=self.destination, depth=len(self.pending) + self.backlog,
             oldest_age=None if oldest is None else max(0.0, self.clock() - oldest))

    @defer.inlineCallbacks
    def _attempt(self, row: dict):
        message_id = row["message_id"]
        data = row["content"] if row["content"] is not None else row["raw"]
        try:
            message = Message.from_bytes(data)
        except ParseError as exc:
            result = DeliveryResult(False, application_error=True, error=f"stored content is not HL7: {exc}")
        else:
            try:
                result = yield defer.maybeDeferred(self.deliver, message)
            except Exception as exc:  # noqa: BLE001 - a destination bug must not stop the queue
                log.failure("queue {channel}/{destination}: delivery raised", channel=self.channel, destination=self.destination)
                result = DeliveryResult(False, error=f"{type(exc).__name__}: {exc}")
        attempts = row["attempts"] + 1
        now = self.clock()
        values = {"attempts": attempts, "updated_at": now, "last_ack": result.ack}
        labels = {"channel": self.channel, "destination": self.destination}
        final = True
        if result.ok:
            values.update(status="SENT", last_error="", next_attempt_at=None)
            self.sent += 1
            emit("delivery_sent", **labels)
        elif result.application_error:
            values.update(status="ERROR", last_error=result.error, next_attempt_at=None)
            self.failed += 1
            emit("delivery_failed", **labels)
        elif attempts >= self.options.max_attempts:
            values.update(status="ERROR", last_error=f"gave up after {attempts} attempts: {result.error}", next_attempt_at=None)
            self.failed += 1
            emit("delivery_failed", **labels)
        else:
            final = False
            emit("delivery_retried", **labels)
            delay = retry_delay(attempts, self.options, self.rng)
            values.update(status="QUEUED", last_error=result.error, next_attempt_at=now + delay)
            row["attempts"], row["next_attempt_at"] = attempts, now + delay
            self.retried += 1
            log.warn("queue {channel}/{destination}: message {message_id} attempt {n} failed ({error}); retry in {delay:.1f}s",
                     channel=self.channel, destination=self.destination, message_id=message_id, n=attempts,
                     error=result.error, delay=delay)
        if final:
            self.pending.pop(message_id, None)
        self._state(result)
        for waiter in self._waiters.pop(message_id, ()):
            waiter.callback(result)
        # recorded through the group commit; the id stays "known" until then so a poll cannot resend it
        update = self.writer.update(("delivery", (message_id, self.destination), values))

        def recorded(outcome):
            if final:
                self.known.discard(message_id)
            return outcome

        update.addBoth(recorded)
        update.addErrback(lambda f: log.error("queue {channel}/{destination}: could not record delivery of {message_id}: {error}",
                                              channel=self.channel, destination=self.destination, message_id=message_id,
                                              error=f.getErrorMessage()))
        if not self.pending:
            self._report()

    def _state(self, result) -> None:
        connected = result.ok or result.application_error or not result.error.startswith(("connection_failed", "timed_out"))
        if connected != self.connected:
            self.connected = connected
            emit("destination_state", channel=self.channel, destination=self.destination, connected=connected)
            d = self.writer.read(self.writer.store.set_destination_state, self.channel, self.destination, connected,
                                 "" if connected else result.error, self.clock())
            d.addErrback(lambda f: log.warn("could not record destination state: {e}", e=f.getErrorMessage()))


@dataclass(slots=True)
class DeliveryResult:
    ok: bool
    application_error: bool = False  # AE from the peer: needs a person, not retried
    ack: str = ""
    error: str = ""
