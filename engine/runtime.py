"""The running engine: sources feed channels; each message is processed, committed, then ACKed,
then delivered.

For every message: parse once (the listener does), run the channel pipeline, commit the message
with its stages and one delivery row per destination (group commit), and only then answer. A
commit that fails is answered AR (CR in enhanced mode), never AA. With ``response.when:
after_delivery`` the answer waits for the destinations and reflects them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from hl7relay.ack import AckPolicy, Outcome, Status
from hl7relay.ack.policy import is_ack
from hl7relay.channels.channel import Channel
from hl7relay.channels.pipeline import Result, process, stored_outcome
from hl7relay.events import emit
from hl7relay.message import Message
from hl7relay.outcomes import DeliveryStatus, MessageStatus
from hl7relay.queues import DeliveryResult, DestinationQueue
from hl7relay.store import DeliveryRecord, MessageRecord, MessageUpdate, StageUpdate, StoreError
from hl7relay.storewriter import StoreWriter

__all__ = ["Engine", "DeliveryResult"]

log = Logger(namespace="hl7relay.engine")
# statuses as plain str on the hot path (the store binds a StrEnum through an adapter lookup)
_DUPLICATE, _ERROR = MessageStatus.DUPLICATE.value, MessageStatus.ERROR.value
_D_QUEUED, _D_FILTERED = DeliveryStatus.QUEUED.value, DeliveryStatus.FILTERED.value


@dataclass(slots=True)
class _RunningChannel:
    channel: Channel
    policy: AckPolicy
    queues: dict = field(default_factory=dict)  # destination name -> DestinationQueue
    in_flight_keys: dict = field(default_factory=dict)  # duplicate key -> Deferred firing with the ACK code
    source: object = None  # the open source's runner (sources.py), None while closed
    enabled: bool = True  # an operator may disable a configured channel at run time (hl7relay channel disable)
    address: str = ""  # where it listens, once open


class Engine:
    def __init__(self, channels: list[Channel], writer: StoreWriter, reactor=None, clock=time.time, data_dir="data",
                 queue_poll_interval: float = 1.0, log_phi_bytes: int = 512, log_levels=None,
                 stop_timeout: float = 10.0):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.writer = writer
        self.clock = clock
        self.data_dir = Path(data_dir)
        self.channels: dict[str, _RunningChannel] = {}
        self.in_flight = 0
        self._deliveries: dict = {}  # (channel, destination) -> its Delivery (destinations.py: one per type)
        self.started = False
        self.stopping = False
        self.log_phi_bytes = log_phi_bytes
        self.log_levels = log_levels  # what the log output lets through (None: everything)
        self.stop_timeout = stop_timeout  # how long a stop waits for the ACKs of deliveries on the wire
        for channel in channels:
            if channel.enabled:
                policy = AckPolicy(channel.response.filtered, channel.response.application, channel.response.facility)
                self.channels[channel.name] = _RunningChannel(channel, policy)
        self.queue_poll_interval = queue_poll_interval
        self.channel_paths: list = ["channels"]  # where reload_from_files reads the channel files
        self._reloading: defer.Deferred | None = None
        self._deliver: dict[tuple[str, str], object] = {}  # (channel, destination) -> deliver(message)
        for running in self.channels.values():
            for destination in running.channel.destinations:
                self._build_delivery(running.channel.name, destination)
                running.queues[destination.name] = self._new_queue(running, destination)

    def _build_delivery(self, channel: str, destination) -> None:
        delivery = destination.config.runner(destination.config, self)
        self._deliveries[(channel, destination.name)] = delivery
        self._deliver[(channel, destination.name)] = delivery.deliver

    def _new_queue(self, running: _RunningChannel, destination) -> DestinationQueue:
        return DestinationQueue(running.channel.name, destination.name, self._deliver[(running.channel.name, destination.name)],
                                destination.config.queue, self.writer, self.reactor, self.clock, self.queue_poll_interval)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, controls: set | None = None) -> list[str]:
        """Open every channel that is not disabled; returns one line per channel saying what
        listens where. ``controls`` are the operators' switches kept in the store (read from it
        when not given): disabled channels stay closed, paused destinations stay paused."""
        if controls is None:
            try:
                controls = self.writer.store.controls()
            except Exception:  # noqa: BLE001 - an older test double of the store: no controls
                controls = set()
        lines = []
        for running in self.channels.values():
            name = running.channel.name
            for destination, queue in running.queues.items():
                queue.paused = (name, destination, "paused") in controls
            if (name, "", "disabled") in controls:
                running.enabled = False
                lines.append(f"channel {name}: disabled (hl7relay channel enable {name})")
                continue
            lines.append(self._open(running))
        self.started = True
        return lines

    def _open(self, running: _RunningChannel) -> str:
        """Start a channel's queues and its source; the line that says where it listens."""
        for queue in running.queues.values():
            queue.start()
        channel = running.channel
        targets = ", ".join(f"{d.name} ({d.type})" for d in channel.destinations) or "no destinations"
        running.enabled = True
        running.source = channel.source.runner(channel.source, self, running)
        what = running.source.open()
        running.address = running.source.address
        return f"channel {channel.name}: {what} -> {targets}"

    @defer.inlineCallbacks
    def _close(self, running: _RunningChannel, close_connections: bool):
        """Stop a channel accepting (and, when asked, close its open connections) and stop its
        queues; what they hold stays stored and resumes when the channel opens again."""
        running.enabled = False
        source, running.source = running.source, None
        if source is not None:
            yield source.close(close_connections)
        for queue in running.queues.values():
            queue.stop()

    # -- reload ----------------------------------------------------------------------------------
    def reload_from_files(self, actor: str = "", audit: dict | None = None) -> defer.Deferred:
        """Lint the channel files first; on any problem change nothing and return the problems
        (``{"errors": ["file:line:col: ..."]}``); otherwise apply them (:meth:`reload`)."""
        from hl7relay.channels import load_channels

        if self._reloading is not None:  # one at a time: a second SIGHUP waits for the first
            return self._reloading.addCallback(lambda _: self.reload_from_files(actor, audit))
        try:
            channels, errors = load_channels(self.channel_paths)
        except Exception as exc:  # noqa: BLE001 - unreadable folders are problems like any other
            channels, errors = [], [f"cannot read the channel files: {exc}"]
        if errors:
            texts = [str(e) for e in errors]
            for text in texts:
                log.error("reload refused: {problem}", problem=text)
            log.error("reload refused: {count} problem(s) in the channel files; nothing changed", count=len(texts))
            result = defer.succeed({"errors": texts})
            outcome = "refused"
        else:
            result = self.reload(channels)
            outcome = "ok"

        def audited(summary):
            if audit:
                entry = dict(audit, result=outcome, detail=json.dumps(summary)[:2000])
                return self.writer.read(self.writer.store.audit, entry).addBoth(lambda _: summary)
            return summary

        def finished(value):
            # cleared before the waiting reloads run, so the next one starts rather than waits again
            waiting, self._reloading = self._reloading, None
            if waiting is not None:
                waiting.callback(None)
            return value

        result.addCallback(audited)
        self._reloading = defer.Deferred()
        result.addBoth(finished)
        return result

    @defer.inlineCallbacks
    def reload(self, channels: list[Channel]):
        """Apply new channel definitions (already linted) without a restart. Unchanged channels
        are not touched (their connections stay open); a changed one takes its new configuration
        for the next message, rebinding its listener only when its address or TLS changed; a
        removed or disabled one stops accepting and its queued deliveries stay stored (they resume
        when it comes back); a new one opens. Returns what was done, by channel."""
        wanted = {c.name: c for c in channels if c.enabled}
        summary = {"unchanged": [], "changed": [], "rebound": [], "added": [], "removed": []}
        for name in [n for n in self.channels if n not in wanted]:
            running = self.channels.pop(name)
            yield self._close(running, close_connections=True)
            yield self._retire_queues(running, list(running.queues.values()))
            summary["removed"].append(name)
        try:
            controls = yield self.writer.read(self.writer.store.controls)
        except Exception:  # noqa: BLE001 - a store without controls: nothing disabled or paused
            controls = set()
        for name, channel in wanted.items():
            running = self.channels.get(name)
            if running is None:
                running = _RunningChannel(channel, self._policy(channel))
                self.channels[name] = running
                self._make_queues(running, controls)
                if (name, "", "disabled") in controls:
                    running.enabled = False
                else:
                    self._open(running)
                summary["added"].append(name)
            elif running.channel.fingerprint and running.channel.fingerprint == channel.fingerprint:
                summary["unchanged"].append(name)
            else:
                rebound = yield self._replace(running, channel, controls)
                summary["rebound" if rebound else "changed"].append(name)
        log.info("reload: {summary}", summary=", ".join(f"{k} {', '.join(v)}" for k, v in summary.items() if v) or "nothing to do")
        return summary

    @staticmethod
    def _policy(channel: Channel) -> AckPolicy:
        return AckPolicy(channel.response.filtered, channel.response.application, channel.response.facility)

    def _make_queues(self, running: _RunningChannel, controls) -> None:
        name = running.channel.name
        running.queues = {}
        for destination in running.channel.destinations:
            self._build_delivery(name, destination)
            queue = self._new_queue(running, destination)
            queue.paused = (name, destination.name, "paused") in controls
            running.queues[destination.name] = queue

    @defer.inlineCallbacks
    def _retire_queues(self, running: _RunningChannel, queues: list) -> None:
        """Stop queues and wait (bounded) for their deliveries on the wire, then for their results
        to be committed: a queue that replaces them must not send those again."""
        for queue in queues:
            queue.stop()
        deadline = self.reactor.seconds() + self.stop_timeout
        while any(queue.in_flight for queue in queues) and self.reactor.seconds() < deadline:
            yield task.deferLater(self.reactor, 0.05, lambda: None)
        yield self.writer.drain()
        name = running.channel.name
        for queue in queues:
            delivery = self._deliveries.pop((name, queue.destination), None)
            if delivery is not None:
                delivery.close()

    @defer.inlineCallbacks
    def _replace(self, running: _RunningChannel, channel: Channel, controls):
        """A changed channel: new configuration, new queues; the listener rebound only when its
        address or TLS changed (or the source is not an MLLP listener). True when it was rebound."""
        keep_socket = (running.enabled and running.source is not None
                       and type(channel.source) is type(running.channel.source)
                       and running.source.keeps_socket(channel.source))
        was_enabled = running.enabled
        old_queues = list(running.queues.values())
        if was_enabled and not keep_socket:
            yield self._close(running, close_connections=True)  # stops its queues too
        yield self._retire_queues(running, old_queues)
        running.channel = channel
        running.policy = self._policy(channel)
        self._make_queues(running, controls)
        if not was_enabled:
            return False
        if keep_socket:
            running.source.reconfigure(channel.source)
            for queue in running.queues.values():
                queue.start()
            return False
        self._open(running)
        return True

    # -- operators' controls (the operations API and the CLI call these) ---------------------------
    def _running(self, channel: str) -> _RunningChannel:
        running = self.channels.get(channel)
        if running is None:
            raise KeyError(f"no channel {channel!r}")
        return running

    def _queue(self, channel: str, destination: str) -> DestinationQueue:
        queue = self._running(channel).queues.get(destination)
        if queue is None:
            raise KeyError(f"channel {channel!r} has no destination {destination!r}")
        return queue

    @defer.inlineCallbacks
    def set_channel_enabled(self, channel: str, enabled: bool, actor: str = "", audit: dict | None = None):
        """Enable or disable a channel now, and remember it across restarts."""
        running = self._running(channel)
        yield self.writer.read(self.writer.store.set_control, channel, "", "disabled", not enabled, actor, audit)
        if enabled and not running.enabled:
            for destination in running.channel.destinations:
                queue = self._new_queue(running, destination)
                queue.paused = running.queues[destination.name].paused
                running.queues[destination.name] = queue
            line = self._open(running)
            log.info("{line} (enabled by {actor})", line=line, actor=actor or "?", channel=channel)
        elif not enabled and running.enabled:
            yield self._close(running, close_connections=True)
            log.info("channel {channel} disabled by {actor}: not accepting; its queued deliveries wait", channel=channel,
                     actor=actor or "?")
        return self.channel_view(channel)

    @defer.inlineCallbacks
    def set_destination_paused(self, channel: str, destination: str, paused: bool, actor: str = "",
                               audit: dict | None = None):
        queue = self._queue(channel, destination)
        yield self.writer.read(self.writer.store.set_control, channel, destination, "paused", paused, actor, audit)
        if paused:
            queue.pause()
        else:
            queue.resume()
        log.info("destination {channel}/{destination} {what} by {actor}", channel=channel, destination=destination,
                 what="paused" if paused else "resumed", actor=actor or "?")
        return queue.view()

    @defer.inlineCallbacks
    def retry_now(self, channel: str, destination: str, actor: str = "", audit: dict | None = None):
        """Skip the backoff of the destination's waiting deliveries and of its connections."""
        queue = self._queue(channel, destination)
        delivery = self._deliveries.get((channel, destination))
        if delivery is not None:
            delivery.skip_backoff()
        count = queue.retry_now()
        if audit:
            yield self.writer.read(self.writer.store.audit, dict(audit, detail=f"{count} waiting deliveries"))
        return dict(queue.view(), retried_now=count)

    def channel_view(self, channel: str) -> dict:
        running = self._running(channel)
        view = {"name": channel, "enabled": running.enabled, "source": running.channel.source_type,
                "address": running.address if running.enabled else "",
                "open_connections": running.source.open_connections if running.source is not None else 0,
                "destinations": {d.name: dict(running.queues[d.name].view(), type=d.type)
                                 for d in running.channel.destinations if d.name in running.queues}}
        return view

    def status(self) -> dict:
        return {"started": self.started, "stopping": self.stopping, "in_flight": self.in_flight,
                "channels": {name: self.channel_view(name) for name in self.channels}}

    @defer.inlineCallbacks
    def stop(self):
        """Stop accepting, finish what is in flight, flush the store."""
        self.stopping = True
        for running in self.channels.values():
            yield self._close(running, close_connections=False)
        for _ in range(600):  # in-flight messages get up to a minute
            if self.in_flight == 0:
                break
            yield task.deferLater(self.reactor, 0.1, lambda: None)
        # Deliveries already on the wire: their ACKs are waited for (bounded), so a clean restart
        # does not send them again; what is still unanswered then is resent after the restart.
        deadline = self.reactor.seconds() + self.stop_timeout
        while self._deliveries_in_flight() and self.reactor.seconds() < deadline:
            yield task.deferLater(self.reactor, 0.05, lambda: None)
        unanswered = self._deliveries_in_flight()
        if unanswered:
            log.warn("stopping with {count} deliveries unanswered after {timeout:g}s; they will be sent again "
                     "after the restart (at-least-once)", count=unanswered, timeout=self.stop_timeout)
        for delivery in self._deliveries.values():
            delivery.close()
        yield self.writer.close()

    def _deliveries_in_flight(self) -> int:
        return sum(len(queue.in_flight) for running in self.channels.values() for queue in running.queues.values())

    # -- one message --------------------------------------------------------------------------
    # The hot path is plain Deferred callbacks, not inlineCallbacks: a generator and its
    # Deferreds per layer cost more than the pipeline itself (profiled under load).
    def handle(self, channel: Channel, message: Message, peer) -> defer.Deferred:
        """Process, store and answer one message: a Deferred firing with its :class:`Outcome`."""
        self.in_flight += 1
        started = time.perf_counter()
        emit("message_received", channel=channel.name)
        try:
            d = self._handle(channel, message, peer)
        except BaseException:
            self.in_flight -= 1
            raise
        return d.addBoth(self._handled, channel.name, started)

    def _handled(self, outcome, channel_name: str, started: float):
        self.in_flight -= 1
        if isinstance(outcome, Failure):
            return outcome
        emit("message_processed", channel=channel_name, status=getattr(outcome, "stored_status", outcome.status.value),
             ack_codes=outcome.ack_codes, ack_latency=time.perf_counter() - started,
             stages=getattr(outcome, "timings", {}))
        return outcome

    def _handle(self, channel: Channel, message: Message, peer) -> defer.Deferred:
        running = self.channels[channel.name]
        received_at = self.clock()
        raw = message.raw if message.raw is not None else message.to_bytes()
        trigger = message.get("MSH-9.2")
        header = {  # read before the transformers change anything
            "sending_application": message.get("MSH-3.1"), "sending_facility": message.get("MSH-4.1"),
            "message_type": message.get("MSH-9.1") + ("^" + trigger if trigger else ""),
            "control_id": message.control_id, "patient_id": message.get("PID-3.1"),
        }
        original = message.header()  # the ACK answers what was received, before any transformer
        if channel.duplicates is None:
            return self._process_and_store(running, channel, message, original, raw, header, received_at, peer, None)
        return self._handle_duplicates(running, channel, message, original, raw, header, received_at, peer)

    @defer.inlineCallbacks
    def _handle_duplicates(self, running, channel, message, original, raw, header, received_at, peer):
        # Messages with one key go one at a time, so a repeat that arrives while the original is
        # still being stored is recognised and answered as the original was.
        key = "|".join(message.get(path) for path in channel.duplicates.key)
        previous = running.in_flight_keys.get(key)
        mine = running.in_flight_keys[key] = defer.Deferred()
        try:
            if previous is not None:
                wait = defer.Deferred()
                previous.addBoth(lambda result: (wait.callback(None), result)[1])
                yield wait
            try:
                first = yield self.writer.read(self.writer.store.find_original, channel.name, key,
                                               received_at - channel.duplicates.window)
            except StoreError:
                first = None  # cannot tell: process it (at-least-once beats losing it)
            if first is not None:
                outcome = yield self._duplicate(channel, original, raw, header, received_at, peer, key, first)
            else:
                outcome = yield self._process_and_store(running, channel, message, original, raw, header, received_at,
                                                        peer, key)
        finally:
            if running.in_flight_keys.get(key) is mine:
                del running.in_flight_keys[key]
            mine.callback(None)
        return outcome

    def _tracing(self, channel: Channel) -> bool:
        return self.log_levels is None or self.log_levels.wants(channel.name, "trace")

    @defer.inlineCallbacks
    def _duplicate(self, channel, original, raw, header, received_at, peer, key, first):
        from hl7relay.ack.builder import build_ack

        code = first["ack_code"]
        acks = [] if not code or is_ack(original) else [build_ack(
            original, code, f"duplicate of message {first['id']}", sending_application=channel.response.application,
            sending_facility=channel.response.facility)]
        record = MessageRecord(channel.name, raw, _DUPLICATE, received_at, str(peer), original.charset,
                               error=f"duplicate of message {first['id']}", ack_code=code, duplicate_key=key, **header)
        if acks and "acks" in channel.stages:
            record.stages["ack"] = b"\r".join(acks)
        try:
            yield self.writer.write(record)
        except StoreError:
            return Outcome.internal_error("the message could not be stored")
        log.info("channel {channel}: message {control_id} is a duplicate of message {original_id}", channel=channel.name,
                 control_id=header["control_id"], original_id=first["id"])
        duplicate = Outcome(Status.ACCEPTED, acks=acks, ack_codes=[code] if acks else [])
        duplicate.stored_status = _DUPLICATE
        return duplicate

    def _process_and_store(self, running, channel, message, original, raw, header, received_at, peer,
                           duplicate_key) -> defer.Deferred:
        pipeline_started = time.perf_counter()
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
        record = MessageRecord(channel.name, raw, status, received_at, str(peer), message.charset,
                               error=error, duplicate_key=duplicate_key, **header)
        if processed is not None and processed.findings:
            # what validators with on_error: warn found stays with the message (messages show)
            record.stages["findings"] = _findings_json(processed.findings)
        transformed = None
        if processed is not None and processed.transformed:
            transformed = processed.message.to_bytes()
            if "transformed" in channel.stages:
                record.stages["transformed"] = transformed
        outputs = processed.outputs if processed is not None and processed.result is Result.PROCESSED else []
        for output in outputs:
            if output.message is None:
                record.deliveries.append(DeliveryRecord(output.name, _D_FILTERED))
                continue
            options = running.queues[output.name].options
            key = output.message.get(options.order_key) if options.order == "per_key" else None
            content = output.message.to_bytes()
            # the queue resends from the stored content; it is stored apart only when it differs
            # from the transformed stage (or the raw message) that the queue falls back to
            kept = transformed if transformed is not None and "transformed" in channel.stages else raw
            record.deliveries.append(DeliveryRecord(output.name, _D_QUEUED, content if content != kept else None, key,
                                                    payload=content, message=output.message))
        if channel.response.when == "on_store" or is_ack(original) or not outputs:
            running.policy.prepare(original, outcome)
            record.ack_code = outcome.ack_codes[-1] if outcome.ack_codes else ""
            if outcome.acks and "acks" in channel.stages:
                record.stages["ack"] = b"\r".join(outcome.acks)
        pipeline_seconds = time.perf_counter() - pipeline_started
        d = self.writer.write(record)
        d.addCallbacks(self._stored, self._not_stored,
                       callbackArgs=(running, channel, message, original, raw, header, received_at, record, outcome,
                                     status, pipeline_seconds, time.perf_counter()),
                       errbackArgs=(channel, header))
        return d

    def _not_stored(self, failure, channel, header):
        failure.trap(StoreError)
        log.error("channel {channel}: message {control_id} could not be stored: {error}",
                  channel=channel.name, control_id=header["control_id"], error=failure.getErrorMessage())
        emit("store_failed", channel=channel.name)
        failed = Outcome.internal_error("the message could not be stored")
        failed.stored_status = "NOT_STORED"
        return failed

    def _stored(self, message_id, running, channel, message, original, raw, header, received_at, record, outcome,
                status, pipeline_seconds, store_started):
        outcome.timings = {"pipeline": pipeline_seconds, "store": time.perf_counter() - store_started}
        outcome.stored_status = status
        if self._tracing(channel):
            log.debug("channel {channel}: message {control_id} stored as {message_id} ({status})", channel=channel.name,
                      control_id=header["control_id"], message_id=message_id, status=status, trace=True)
            if channel.log_phi:
                content = raw[: self.log_phi_bytes].decode(message.codec, "replace").replace("\r", "\n")
                log.debug("channel {channel}: message {control_id} content ({size} bytes): {content}",
                          channel=channel.name, control_id=header["control_id"], message_id=message_id, size=len(raw),
                          content=content, trace=True)
        queued = [(running.queues[d.destination], d) for d in record.deliveries if d.status == _D_QUEUED]
        deliveries = [queue.first_result(message_id) for queue, _ in queued] if outcome.acks is None else []
        waiting = [queue for queue, _ in queued] if outcome.acks is None else []
        for queue, delivery in queued:
            queue.enqueue(message_id, delivery.payload if delivery.payload is not None else delivery.content,
                          delivery.order_key, received_at, delivery.message)
        if outcome.acks is not None:
            return outcome
        return self._after_delivery(running, channel, original, message_id, outcome, deliveries, waiting)

    @defer.inlineCallbacks
    def _after_delivery(self, running, channel, original, message_id, outcome, deliveries, queues):
        """response.when: after_delivery: the answer reflects the destinations.

        The rule that keeps a message from arriving twice: when the answer asks the sender to
        send again (AR/CR: a destination refused it, was unreachable or did not answer in time),
        the deliveries that failed are withdrawn, never retried, since the resend carries them.
        When a destination answered AE (not to be resent: it needs a person), the sender gets AE
        and the other failed deliveries are retried as usual. A failed delivery is held, not
        retried, until every destination's first answer is in."""
        results = yield defer.gatherResults(deliveries) if deliveries else defer.succeed([])
        if all(r.ok for r in results):
            final = Outcome.accepted()
            for queue in queues:
                queue.release(message_id)
        elif any(r.application_error for r in results):
            final = Outcome.error("; ".join(r.error for r in results if not r.ok))
            for queue in queues:
                queue.release(message_id)
        else:
            final = Outcome.rejected("; ".join(r.error for r in results if not r.ok), outcome.code or _internal())
            withdrawn = [queue.withdraw(message_id, "withdrawn: the sender was answered "
                                        f"{'CR' if original.get('MSH-15').strip() else 'AR'} and will send it again")
                         for queue in queues]
            try:
                yield defer.gatherResults([d for d in withdrawn if d is not None])
            except Exception:  # noqa: BLE001 - recorded through the store writer, which logs its own failures
                log.error("channel {channel}: could not record the withdrawal of message {message_id}",
                          channel=channel.name, message_id=message_id)
        acks = running.policy.prepare(original, final).acks
        final.timings, final.stored_status = outcome.timings, outcome.stored_status
        updates = [MessageUpdate(message_id, {"ack_code": final.ack_codes[-1] if final.ack_codes else ""})]
        if acks and "acks" in channel.stages:
            updates.append(StageUpdate(message_id, "ack", b"\r".join(acks)))
        try:
            yield self.writer.update(*updates)
        except StoreError as exc:
            log.error("channel {channel}: could not record the ACK of message {message_id}: {error}",
                      channel=channel.name, message_id=message_id, error=str(exc))
        return final

def _findings_json(findings) -> bytes:
    import json

    return json.dumps([{"severity": getattr(f.severity, "value", str(f.severity)), "code": int(f.code),
                        "location": f.path, "text": f.text} for f in findings[:200]]).encode()


def _internal():
    from hl7relay.outcomes import ErrorCode

    return ErrorCode.APPLICATION_INTERNAL_ERROR


