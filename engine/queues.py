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
        self.loop = task.LoopingCall(self.run)
        self.loop.clock = reactor
        self.poll_interval = poll_interval
        self.busy = False
        self.again = False
        self.stopped = False
        self.connected: bool | None = None
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

    def nudge(self) -> None:
        """New deliveries were committed: look now rather than at the next poll."""
        if not self.stopped:
            self.reactor.callLater(0, self.run)

    def first_result(self, message_id: int) -> defer.Deferred:
        """Fires with the DeliveryResult of the message's next attempt (for response.when: after_delivery)."""
        d = defer.Deferred()
        self._waiters.setdefault(message_id, []).append(d)
        return d

    @defer.inlineCallbacks
    def run(self):
        if self.busy:
            self.again = True
            return
        self.busy = True
        try:
            while not self.stopped:
                self.again = False
                try:
                    rows = yield self.writer.read(self.writer.store.queued_deliveries, self.channel, self.destination, _FETCH)
                except StoreError as exc:
                    log.error("queue {channel}/{destination}: cannot read the queue: {error}", channel=self.channel,
                              destination=self.destination, error=str(exc))
                    return
                depth = len(rows)
                if depth >= _FETCH:
                    depth = yield self.writer.read(self.writer.store.queue_depth, self.channel, self.destination)
                self._report(rows, depth)
                due = self._due(rows)
                for row in due:
                    if self.stopped:
                        return
                    yield self._attempt(row)
                if not due and not self.again:
                    self._sleep_until(rows)
                    return
        finally:
            self.busy = False

    def _report(self, rows: list[dict], depth: int) -> None:
        oldest = min((row["received_at"] for row in rows), default=None)
        emit("queue_state", channel=self.channel, destination=self.destination, depth=depth,
             oldest_age=None if oldest is None else max(0.0, self.clock() - oldest))

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

    def _sleep_until(self, rows: list[dict]) -> None:
        pending = [row["next_attempt_at"] for row in rows if row["next_attempt_at"]]
        if not pending:
            return
        delay = max(0.0, min(pending) - self.clock())
        if delay < self.poll_interval:
            if self._wake is not None and self._wake.active():
                self._wake.cancel()
            self._wake = self.reactor.callLater(delay, self.run)

    @defer.inlineCallbacks
    def _attempt(self, row: dict):
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
            emit("delivery_retried", **labels)
            delay = retry_delay(attempts, self.options, self.rng)
            values.update(status="QUEUED", last_error=result.error, next_attempt_at=now + delay)
            self.retried += 1
            log.warn("queue {channel}/{destination}: message {message_id} attempt {n} failed ({error}); retry in {delay:.1f}s",
                     channel=self.channel, destination=self.destination, message_id=row["message_id"], n=attempts,
                     error=result.error, delay=delay)
        self._state(result)
        try:
            yield self.writer.update(("delivery", (row["message_id"], self.destination), values))
        except StoreError as exc:
            log.error("queue {channel}/{destination}: could not record delivery of {message_id}: {error}", channel=self.channel,
                      destination=self.destination, message_id=row["message_id"], error=str(exc))
        for waiter in self._waiters.pop(row["message_id"], ()):
            waiter.callback(result)

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
