"""One message's trip through the engine: received -> processed -> committed -> answered -> delivered.

A :class:`Trip` is made for each message a source hands to its running channel
(:meth:`RunningChannel.handle <hl7relay.runtime.RunningChannel.handle>`) and owns everything known about it on the way: what arrived
(raw bytes, the header read before any transformer, the peer), what the channel made of it
(status, error, stages, one delivery per destination), its store id once committed, and the
outcome that answers the sender. ``stage`` says how far it got (for logs and a debugger).

The order is the engine's promise: nothing is answered before it is committed, and with
``response.when: after_delivery`` the answer waits for the destinations' first answers.
The steps are plain Deferred callbacks on the trip's own methods, not inlineCallbacks: a
generator per message costs more than the pipeline (profiled under load); the rare paths
(duplicates, after_delivery) use inlineCallbacks.
"""

from __future__ import annotations

import json
import time
from typing import TypedDict

from twisted.internet import defer
from twisted.logger import Logger

from hl7relay.ack import Outcome
from hl7relay.ack.policy import AckRequest
from hl7relay.channels.pipeline import Result, process, stored_outcome
from hl7relay.hl7.message import Message
from hl7relay.outcomes import NOT_STORED, DeliveryStatus, ErrorCode, MessageStatus
from hl7relay.store.database import DeliveryRecord, MessageRecord, MessageUpdate, StageUpdate, StoreError

__all__ = ["Trip", "RECEIVED", "PROCESSED", "COMMITTED", "ANSWERED", "DELIVERED", "NOT_STORED"]

log = Logger(namespace="hl7relay.engine")

# how far a trip got
RECEIVED, PROCESSED, COMMITTED, ANSWERED, DELIVERED = "received", "processed", "committed", "answered", "delivered"

# statuses as plain str on the hot path (the store binds a StrEnum through an adapter lookup)
_DUPLICATE, _ERROR = MessageStatus.DUPLICATE.value, MessageStatus.ERROR.value
_D_QUEUED, _D_FILTERED = DeliveryStatus.QUEUED.value, DeliveryStatus.FILTERED.value


class Header(TypedDict):
    """The received header, read before any transformer: the stored message's columns."""

    sending_application: str
    sending_facility: str
    message_type: str
    control_id: str
    patient_id: str


class Trip:
    __slots__ = ("resources", "running", "channel", "message", "peer", "received_at", "raw", "header", "original",
                 "ack_request", "duplicate_key", "record", "outcome", "status", "stage", "message_id", "timings",
                 "_store_started", "source_file")

    def __init__(self, resources, running, channel, message: Message, peer):
        self.resources = resources  # clock, store writer, events, settings (resources.py)
        self.running = running  # the channel as it runs (its ACK policy, queues)
        self.channel = channel  # the config the trip started with, kept to its end (a reload does not change it)
        self.message = message
        # 'host:port', as the store records it and the tracer shows it (a listener's Peer made it once)
        self.peer = getattr(peer, "text", None) or str(peer)
        self.source_file = getattr(peer, "source_file", None)  # read from a file: its ledger id, place, line
        self.received_at = resources.clock()
        self.raw = message.raw if message.raw is not None else message.to_bytes()
        msh = message.msh
        trigger = msh(9, 2)
        self.header: Header = {  # read before the transformers change anything
            "sending_application": msh(3, 1), "sending_facility": msh(4, 1),
            "message_type": msh(9, 1) + ("^" + trigger if trigger else ""),
            "control_id": msh(10), "patient_id": message.get("PID-3.1"),
        }
        self.original = message.header()  # the ACK answers what was received, before any transformer
        self.ack_request = AckRequest.of(message)  # what the header asks of the answer, read once
        self.duplicate_key = None if channel.duplicates is None else "|".join(
            message.get(path) for path in channel.duplicates.key)
        self.record: MessageRecord | None = None
        self.outcome: Outcome | None = None  # what answers the sender, once known
        self.status: str | None = None  # as stored (MessageStatus), or NOT_STORED
        self.message_id: int | None = None
        self.timings: dict[str, float] = {}
        self.stage = RECEIVED

    def run(self) -> defer.Deferred:
        """The trip to its answer: a Deferred firing with the :class:`Outcome` that answers the
        sender (its ``acks``), after the commit."""
        if self.duplicate_key is None:
            return self.commit(self.process())
        return self._run_with_duplicates()

    # -- processed ----------------------------------------------------------------------------
    def process(self) -> MessageRecord:
        """Run the channel's pipeline and build what is committed: the message, its stages and one
        delivery per destination; with ``response.when: on_store`` the answer too."""
        channel, message, header = self.channel, self.message, self.header
        started = time.perf_counter()
        try:
            processed = process(channel, message)
        except Exception as exc:  # a bug in a component must not lose the message: store it as ERROR
            log.failure("channel {channel} failed on message {control_id}", channel=channel.name,
                        control_id=header["control_id"])
            processed = None
            outcome = Outcome.error(f"internal error in the channel: {type(exc).__name__}")
            status, error = _ERROR, outcome.text
        if processed is not None:
            status, error, outcome = stored_outcome(processed)
        record = MessageRecord(channel.name, self.raw, status, self.received_at, self.peer, message.charset,
                               error=error, duplicate_key=self.duplicate_key, source_file=self.source_file,
                               snapshot_id=channel.snapshot_id, **header)
        if processed is not None and processed.findings:
            # what validators with on_error: warn found stays with the message (messages show)
            record.stages["findings"] = _findings_json(processed.findings)
        transformed = None
        if processed is not None and processed.transformed:
            transformed = processed.message.to_bytes()
            if "transformed" in channel.stages:
                record.stages["transformed"] = transformed
        outputs = processed.outputs if processed is not None and processed.result is Result.PROCESSED else []
        queues = self.running.queues
        for output in outputs:
            if output.message is None:
                record.deliveries.append(DeliveryRecord(output.name, _D_FILTERED))
                continue
            queue = queues[output.name]
            options = queue.options
            key = output.message.get(options.order_key) if options.order == "per_key" else None
            content = output.message.to_bytes()
            # the queue resends from the stored content; it is stored apart only when it differs
            # from the transformed stage (or the raw message) that the queue falls back to
            kept = transformed if transformed is not None and "transformed" in channel.stages else self.raw
            record.deliveries.append(DeliveryRecord(output.name, _D_QUEUED, content if content != kept else None, key,
                                                    payload=content, message=output.message,
                                                    partition=queue.partition_of(key, content)))
        original = self.original
        if channel.response.when == "on_store" or self.ack_request.is_ack or not outputs:
            self.running.policy.prepare(original, outcome, self.ack_request)
            record.ack_code = outcome.ack_codes[-1] if outcome.ack_codes else ""
            if outcome.acks and "acks" in channel.stages:
                record.stages["ack"] = b"\r".join(outcome.acks)
        self.record, self.outcome, self.status = record, outcome, status
        self.timings["pipeline"] = time.perf_counter() - started
        self.stage = PROCESSED
        return record

    # -- committed, answered ------------------------------------------------------------------------
    def commit(self, record: MessageRecord) -> defer.Deferred:
        self._store_started = time.perf_counter()
        return self.resources.writer.write(record).addCallbacks(self._committed, self._not_committed)

    def _not_committed(self, failure):
        failure.trap(StoreError)
        channel = self.channel.name
        log.error("channel {channel}: message {control_id} could not be stored: {error}",
                  channel=channel, control_id=self.header["control_id"], error=failure.getErrorMessage())
        emit = self.resources.emit
        emit("store_failed", channel=channel)
        self.status = NOT_STORED
        # answered AR (CR in enhanced mode), never AA: the sender keeps it and sends it again
        self.outcome = self.running.policy.prepare(self.original, Outcome.internal_error("the message could not be stored"),
                                                   self.ack_request)
        self.stage = ANSWERED
        return self.outcome

    def _committed(self, message_id):
        self.message_id = message_id
        self.timings["store"] = time.perf_counter() - self._store_started
        self.stage = COMMITTED
        channel, record, outcome = self.channel, self.record, self.outcome
        if self.resources.tracing(channel.name):
            self._trace(message_id)
        queues = self.running.queues
        queued = [(queues[d.destination], d) for d in record.deliveries if d.status == _D_QUEUED]
        answered = outcome.acks is not None
        firsts = [] if answered else [queue.first_result(message_id) for queue, _ in queued]
        for queue, delivery in queued:
            queue.enqueue(message_id, delivery.payload if delivery.payload is not None else delivery.content,
                          delivery.order_key, self.received_at, delivery.message)
        if answered:
            self.stage = ANSWERED
            return outcome
        return self._after_delivery(message_id, outcome, firsts, [queue for queue, _ in queued])

    def _trace(self, message_id) -> None:
        channel, header = self.channel, self.header
        log.debug("channel {channel}: message {control_id} stored as {message_id} ({status})", channel=channel.name,
                  control_id=header["control_id"], message_id=message_id, status=self.status, trace=True)
        if channel.log_phi:
            raw = self.raw
            content = raw[: self.resources.settings.log_phi_bytes].decode(self.message.codec, "replace").replace("\r", "\n")
            log.debug("channel {channel}: message {control_id} content ({size} bytes): {content}",
                      channel=channel.name, control_id=header["control_id"], message_id=message_id, size=len(raw),
                      content=content, trace=True)

    # -- delivered (response.when: after_delivery) ------------------------------------------------
    @defer.inlineCallbacks
    def _after_delivery(self, message_id: int, stored: Outcome, firsts: list, queues: list):
        """response.when: after_delivery: the answer reflects the destinations.

        The rule that keeps a message from arriving twice: when the answer asks the sender to
        send again (AR/CR: a destination refused it, was unreachable or did not answer in time),
        the deliveries that failed are withdrawn, never retried, since the resend carries them.
        When a destination answered AE (not to be resent: it needs a person), the sender gets AE
        and the other failed deliveries are retried as usual. A failed delivery is held, not
        retried, until every destination's first answer is in."""
        channel = self.channel
        results = yield defer.gatherResults(firsts) if firsts else defer.succeed([])
        self.stage = DELIVERED
        if all(r.ok for r in results):
            final = Outcome.accepted()
            for queue in queues:
                queue.release(message_id)
        elif any(r.application_error for r in results):
            final = Outcome.error("; ".join(r.error for r in results if not r.ok))
            for queue in queues:
                queue.release(message_id)
        else:
            resend = self.ack_request.resend_code
            final = Outcome.rejected("; ".join(r.error for r in results if not r.ok),
                                     stored.code or ErrorCode.APPLICATION_INTERNAL_ERROR)
            withdrawn = [queue.withdraw(message_id, f"withdrawn: the sender was answered {resend} and will send it again")
                         for queue, result in zip(queues, results) if not result.ok]
            try:
                yield defer.gatherResults([d for d in withdrawn if d is not None])
            except Exception:  # noqa: BLE001 - recorded through the store writer, which logs its own failures
                log.error("channel {channel}: could not record the withdrawal of message {message_id}",
                          channel=channel.name, message_id=message_id)
        acks = self.running.policy.prepare(self.original, final, self.ack_request).acks
        self.outcome = final
        updates: list[MessageUpdate | StageUpdate] = [MessageUpdate(message_id, {"ack_code": final.ack_codes[-1] if final.ack_codes else ""})]
        if acks and "acks" in channel.stages:
            updates.append(StageUpdate(message_id, "ack", b"\r".join(acks)))
        try:
            yield self.resources.writer.update(*updates)
        except StoreError as exc:
            log.error("channel {channel}: could not record the ACK of message {message_id}: {error}",
                      channel=channel.name, message_id=message_id, error=str(exc))
        self.stage = ANSWERED
        return final

    # -- duplicates ---------------------------------------------------------------------------------
    @defer.inlineCallbacks
    def _run_with_duplicates(self):
        # Messages with one key go one at a time, so a repeat that arrives while the original is
        # still being stored is recognised and answered as the original was.
        key, in_flight_keys = self.duplicate_key, self.running.in_flight_keys
        previous = in_flight_keys.get(key)
        mine = in_flight_keys[key] = defer.Deferred()
        try:
            if previous is not None:
                wait = defer.Deferred()
                previous.addBoth(lambda result: (wait.callback(None), result)[1])
                yield wait
            writer, duplicates = self.resources.writer, self.channel.duplicates
            try:
                first = yield writer.read(writer.store.find_original, self.channel.name, key,
                                          self.received_at - duplicates.window)
            except StoreError:
                first = None  # cannot tell: process it (at-least-once beats losing it)
            if first is not None:
                outcome = yield self._duplicate_of(first)
            else:
                outcome = yield self.commit(self.process())
        finally:
            if in_flight_keys.get(key) is mine:
                del in_flight_keys[key]
            mine.callback(None)
        return outcome

    def _duplicate_of(self, first: dict) -> defer.Deferred:
        """Stored as DUPLICATE, not processed again, and answered as the original was (accepted,
        error, filtered), in the ACK mode of the copy at hand: a resend may switch between
        original and enhanced mode, and its sender reads the codes of its own mode."""
        channel, original = self.channel, self.original
        error = f"duplicate of message {first['id']}"
        code = (first["ack_code"] or "")[1:]
        if code == "E" or first["status"] == _ERROR:
            outcome = Outcome.error(error)
        elif first["status"] == MessageStatus.FILTERED.value:
            outcome = Outcome.filtered()
        else:
            outcome = Outcome.accepted()
        outcome = self.running.policy.prepare(original, outcome, self.ack_request)
        acks = outcome.acks
        record = MessageRecord(channel.name, self.raw, _DUPLICATE, self.received_at, self.peer, original.charset,
                               error=error, ack_code=outcome.ack_codes[-1] if outcome.ack_codes else "",
                               duplicate_key=self.duplicate_key, source_file=self.source_file,
                               snapshot_id=channel.snapshot_id, **self.header)
        if acks and "acks" in channel.stages:
            record.stages["ack"] = b"\r".join(acks)
        self.record, self.status, self.stage = record, _DUPLICATE, PROCESSED
        self.outcome = outcome
        log.info("channel {channel}: message {control_id} is a duplicate of message {original_id}", channel=channel.name,
                 control_id=self.header["control_id"], original_id=first["id"])
        return self.commit(record)


_FINDING_JSON: dict = {}  # a finding's JSON by what it says: a sender's warnings repeat message after message


def _findings_json(findings) -> bytes:
    """What validators with on_error: warn found, as stored with the message (``messages show``):
    ``json.dumps`` of a list of {severity, code, location, text}, each finding's part kept."""
    parts = []
    for f in findings[:200]:
        key = (f.severity, f.code, f.segment, f.sequence, f.field, f.repetition, f.component, f.subcomponent, f.text)
        part = _FINDING_JSON.get(key)
        if part is None:
            if len(_FINDING_JSON) >= 10_000:
                _FINDING_JSON.clear()
            part = _FINDING_JSON[key] = json.dumps({"severity": getattr(f.severity, "value", str(f.severity)),
                                                    "code": int(f.code), "location": f.path, "text": f.text})
        parts.append(part)
    return ("[" + ", ".join(parts) + "]").encode()
