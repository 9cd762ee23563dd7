"""The running engine: its channels' lifecycle (open, close, reload, enable, pause) and the
entry point for each message.

For every message (a :class:`~hl7relay.trip.Trip`): parse once (the source does), run the
channel pipeline, commit the message with its stages and one delivery row per destination (group
commit), and only then answer. A commit that fails is answered AR (CR in enhanced mode), never
AA. With ``response.when: after_delivery`` the answer waits for the destinations and reflects them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from hl7relay.ack import AckPolicy, Outcome
from hl7relay.ack.answer import Answer
from hl7relay.channels.channel import Channel
from hl7relay.channels.sources import Source
from hl7relay.errors import ReadOnlyEnvironment
from hl7relay.leases import LeaseKeeper
from hl7relay.hl7.message import Message
from hl7relay.queues import DeliveryResult, DestinationQueue, Queue
from hl7relay.receiving import Responder
from hl7relay.resources import Resources, Settings
from hl7relay.store.records import AuditUpdate, ControlUpdate
from hl7relay.store.writer import StoreWriter
from hl7relay.stats import ChannelStats
from hl7relay.trip import Trip

__all__ = ["Engine", "RunningChannel", "DeliveryResult", "StopReport"]

log = Logger(namespace="hl7relay.engine")


def channel_policy(channel: Channel) -> AckPolicy:
    response = channel.response
    return AckPolicy(response.filtered, response.application, response.facility)


class RunningChannel(Responder):
    """A channel as it runs: its configuration (replaced by a reload; a trip keeps the one it
    started with), its ACK policy, its destinations' queues and its open source. It owns the
    trips of its messages and their answers: a source hands it each message (:meth:`receive`)
    and writes back the :class:`~hl7relay.ack.answer.Answer` it gets."""

    def __init__(self, channel: Channel, resources: Resources):
        super().__init__(policy=channel_policy(channel))
        self.channel = channel
        self.resources = resources
        self.queues: dict[str, Queue] = {}  # destination name -> its Queue (here, or in the forwarder)
        self.in_flight_keys: dict = {}  # duplicate key -> Deferred firing when its message is answered
        self.source: Source | None = None  # the open source's runner (sources.py), None while closed
        self.enabled = True  # an operator may disable a configured channel at run time (hl7relay channel disable)
        self.address = ""  # where it listens, once open
        # the peers its listener has seen (mllp/listener.py): kept while the channel is closed and opened again
        self.peers: dict = {}

    def handle(self, message: Message, peer, channel: Channel | None = None) -> defer.Deferred:
        """Process, commit and answer one message (its :class:`~hl7relay.trip.Trip`) under
        ``channel`` (the running configuration when not given): a Deferred firing with the
        :class:`Outcome` whose ACKs answer the sender."""
        if channel is None:
            channel = self.channel
        resources = self.resources
        resources.in_flight += 1
        started = time.perf_counter()
        emit = resources.emit  # named so: the events test finds every emit() by name
        emit("message_received", channel=channel.name)
        try:
            trip = Trip(resources, self, channel, message, peer)
            d = trip.run()
        except BaseException:
            resources.in_flight -= 1
            raise
        return d.addBoth(self._answered, trip, started)

    def store_unreadable(self, raw: bytes, peer, error: str) -> defer.Deferred:
        """A message a reader could not parse (a file's): stored as ERROR with its bytes, so it is
        counted, alerted on and can be replayed once fixed; there is no sender to answer. Fires
        with its id, or None when it could not be stored."""
        from hl7relay.outcomes import MessageStatus
        from hl7relay.store.database import MessageRecord, StoreError

        resources, channel = self.resources, self.channel
        emit = resources.emit
        emit("message_received", channel=channel.name)
        now = resources.clock()
        record = MessageRecord(channel.name, raw, MessageStatus.ERROR.value, now, getattr(peer, "text", str(peer)),
                               error=error, source_file=getattr(peer, "source_file", None))

        def stored(message_id):
            emit("message_processed", channel=channel.name, status=MessageStatus.ERROR.value, ack_codes=(),
                 ack_latency=0.0, stages={}, message_id=message_id, message_type="", control_id="",
                 peer=record.peer)
            resources.stats.answered(channel.name, MessageStatus.ERROR.value, 0.0, now)
            log.warn("channel {channel}: {error} (stored as ERROR, message {message_id})", channel=channel.name,
                     error=error, message_id=message_id, about_message=True)
            return message_id

        def failed(failure):
            failure.trap(StoreError)
            log.error("channel {channel}: {error}; it could not be stored either: {reason}", channel=channel.name,
                      error=error, reason=failure.getErrorMessage())
            emit("store_failed", channel=channel.name)
            return None

        return resources.writer.write(record).addCallbacks(stored, failed)

    def _answered(self, outcome, trip: Trip, started: float):
        resources = self.resources
        resources.in_flight -= 1
        latency = time.perf_counter() - started
        if isinstance(outcome, Failure):
            resources.stats.answered(trip.channel.name, None, None)
            return outcome
        header, emit = trip.header, resources.emit
        emit("message_processed", channel=trip.channel.name, status=trip.status, ack_codes=outcome.ack_codes,
             ack_latency=latency, stages=trip.timings, message_id=trip.message_id, message_type=header["message_type"],
             control_id=header["control_id"], peer=trip.peer)
        # counted at its arrival second (the trip read the clock then): one clock call fewer per message
        resources.stats.answered(trip.channel.name, trip.status, latency, trip.received_at)
        return outcome

    def _answer(self, outcome: Outcome, message: Message) -> Answer:
        # the trip's policy prepared (and stored) the ACKs: they are sent as they are
        if outcome.acks is not None:
            return Answer(outcome.acks)
        return self.policy.answer(message, outcome)


@dataclass(slots=True)
class StopReport:
    """What a stop left undone when its time (``stop_timeout``) ran out."""

    timeout: float
    unanswered: int = 0  # messages being processed whose senders got no answer
    dropped: int = 0  # frames received but not started: dropped unanswered
    deliveries_unanswered: int = 0  # deliveries on the wire: sent again after the restart

    @property
    def clean(self) -> bool:
        return not (self.unanswered or self.dropped or self.deliveries_unanswered)

    def describe(self) -> str:
        """The engine's last line."""
        if self.clean:
            return "stopped: in-flight messages finished, store flushed"
        parts = []
        if self.unanswered:
            parts.append(f"{self.unanswered} message(s) in flight left unanswered after {self.timeout:g}s (their "
                         "senders will send them again)")
        if self.dropped:
            parts.append(f"{self.dropped} received message(s) not started, dropped unanswered (their senders will "
                         "send them again)")
        if self.deliveries_unanswered:
            parts.append(f"{self.deliveries_unanswered} deliveries unanswered (sent again after the restart)")
        return "stopped: " + "; ".join(parts) + "; store flushed"


# sources that read (a folder, a server) rather than listen: in a cluster one node reads each
POLLERS = frozenset({"file", "sftp", "fhir"})


class Engine:
    """The running engine: it owns the running channels and their lifecycle. Its parts are given
    :class:`~hl7relay.resources.Resources`, never the engine; operators reach it through
    :class:`~hl7relay.controls.Controls`."""

    def __init__(self, channels: list[Channel], writer: StoreWriter, reactor=None, clock=time.time, data_dir="data",
                 queue_poll_interval: float = 1.0, log_phi_bytes: int = 512, log_levels=None,
                 stop_timeout: float = 10.0, forwarder=None, tracer=None, channel_paths=("channels",),
                 read_only: bool = False, cluster=None):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.writer = writer
        self.channels: dict[str, RunningChannel] = {}
        settings = Settings(Path(data_dir), queue_poll_interval, log_phi_bytes, log_levels, stop_timeout, read_only)
        # message traces (ops/trace.py), handed in by the command that runs the engine: the core
        # does not import the operations tools
        self.resources = Resources(reactor, writer, clock, settings, ChannelStats(clock), tracer=tracer,
                                   channels=self.channels)
        self._deliveries: dict = {}  # (channel, destination) -> its Delivery (destinations.py: one per type)
        self.started = False
        self.stopping = False
        # forwarding: process: the destinations' queues run in the forwarder process (forwarder/),
        # handed in as an object that makes their stand-ins (queue()), retires and stops them
        self.forwarder = forwarder
        for channel in channels:
            if channel.enabled:
                self.channels[channel.name] = RunningChannel(channel, self.resources)
        self.channel_paths: list = list(channel_paths)  # where reload_from_files reads the channel files
        self._reloading: defer.Deferred | None = None
        # the snapshot the channels run under (and, after a rollback, the one it re-applied and its files)
        self.configuration: dict = {}
        self.environment = None  # environments.Environment it runs in (promoted_only: reloads check it)
        self.settings_file: str | None = None  # the engine's settings file (a snapshot holds it too)
        # several engines on one store (cluster.ClusterSettings): queues in partitions, held by lease
        self.cluster = cluster
        self.keeper: LeaseKeeper | None = None  # once started
        self._deliver: dict[tuple[str, str], object] = {}  # (channel, destination) -> deliver(message)
        for running in self.channels.values():
            for destination in running.channel.destinations:
                self._build_delivery(running.channel.name, destination)
                running.queues[destination.name] = self._new_queue(running, destination)

    # what the engine's parts share (Resources), readable (and, for tests, settable) here
    @property
    def clock(self):
        return self.resources.clock

    @clock.setter
    def clock(self, clock) -> None:
        self.resources.clock = clock

    @property
    def settings(self) -> Settings:
        return self.resources.settings

    @property
    def stats(self) -> ChannelStats:
        return self.resources.stats

    @property
    def tracer(self):
        return self.resources.tracer

    @property
    def in_flight(self) -> int:
        return self.resources.in_flight

    @property
    def stop_timeout(self) -> float:
        return self.resources.settings.stop_timeout

    @stop_timeout.setter
    def stop_timeout(self, seconds: float) -> None:
        self.resources.settings.stop_timeout = seconds

    @property
    def log_phi_bytes(self) -> int:
        return self.resources.settings.log_phi_bytes

    @log_phi_bytes.setter
    def log_phi_bytes(self, size: int) -> None:
        self.resources.settings.log_phi_bytes = size

    def _remote(self, destination) -> bool:
        """Whether this destination's queue runs in the forwarder process. A ``channel``
        destination hands messages to this engine's own channels: it stays here."""
        return self.forwarder is not None and destination.type != "channel"

    def _build_delivery(self, channel: str, destination) -> None:
        if self._remote(destination):
            return  # the forwarder builds its own
        delivery = destination.config.runner(destination.config, self.resources)
        self._deliveries[(channel, destination.name)] = delivery
        self._deliver[(channel, destination.name)] = delivery.deliver

    def _new_queue(self, running: RunningChannel, destination) -> Queue:
        if self._remote(destination):
            return self.forwarder.queue(running.channel.name, destination.name, destination.config,
                                        self.settings.queue_poll_interval)
        name = (running.channel.name, destination.name)

        def make(partition: int | None = None, lease: tuple | None = None) -> DestinationQueue:
            return DestinationQueue(name[0], name[1], self._deliver[name], destination.config.queue, self.writer,
                                    self.reactor, self.clock, self.settings.queue_poll_interval,
                                    keyed=getattr(self._deliveries.get(name), "keyed", False),
                                    describe=getattr(self._deliveries.get(name), "view", None),
                                    partition=partition, lease=lease)

        if self.cluster is not None:  # the partitions this node holds a lease on (cluster.py)
            from hl7relay.cluster import PartitionedQueue

            return PartitionedQueue(name[0], name[1], destination.config.queue, self.cluster.partitions, make,
                                    self.reactor, self.stop_timeout, self.writer.drain)
        return make()

    # -- a cluster's leases (cluster.py, leases.py) --------------------------------------------------
    def _lease_names(self) -> list[str]:
        return [name for running in self.channels.values() for queue in running.queues.values()
                for name in getattr(queue, "lease_names", lambda: [])()] + [
            f"source:{name}" for name, running in self.channels.items() if running.channel.source_type in POLLERS]

    def _partitioned(self, lease: str):
        from hl7relay.cluster import parse_lease_name

        parsed = parse_lease_name(lease)
        if parsed is None:
            return None, 0
        channel, destination, partition = parsed
        running = self.channels.get(channel)
        queue = running.queues.get(destination) if running is not None else None
        return (queue, partition) if hasattr(queue, "gain") else (None, partition)

    def _gained(self, lease: str, epoch: int) -> None:
        if lease.startswith("source:"):
            running = self.channels.get(lease[len("source:"):])
            if running is not None and running.enabled and running.source is None and not self.stopping:
                log.info("{line}", line=self._open_source(running))
            return
        queue, partition = self._partitioned(lease)
        if queue is not None:
            queue.gain(partition, (lease, self.cluster.node_id, epoch))

    def _lost(self, lease: str):
        if lease.startswith("source:"):
            running = self.channels.get(lease[len("source:"):])
            if running is None or running.source is None:
                return None
            source, running.source = running.source, None
            log.info("channel {channel}: its source is another node's now", channel=running.channel.name)
            return source.close(False)
        queue, partition = self._partitioned(lease)
        return queue.lose(partition) if queue is not None else None

    def _start_leases(self) -> None:
        cluster = self.cluster
        self.keeper = LeaseKeeper(self.writer.read, self.reactor, self.writer.store, cluster.node_id, self._lease_names(),
                                  cluster.lease_ttl, cluster.lease_renew, self._gained, self._lost)
        self.keeper.start()

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
                queue.paused = (name, destination, "paused") in controls or self.settings.read_only
            if (name, "", "disabled") in controls:
                running.enabled = False
                lines.append(f"channel {name}: disabled (hl7relay channel enable {name})")
                continue
            lines.append(self._open(running))
        self.started = True
        if self.cluster is not None:
            self._start_leases()
        return lines

    def _open(self, running: RunningChannel) -> str:
        """Start a channel's queues and its source; the line that says where it listens."""
        for queue in running.queues.values():
            queue.start()
        channel = running.channel
        targets = ", ".join(f"{d.name} ({d.type})" for d in channel.destinations) or "no destinations"
        running.enabled = True
        if self.cluster is not None and channel.source_type in POLLERS:
            # one node reads a folder or a server: the one holding the channel's source lease
            return (f"channel {channel.name}: {channel.source_type} source, read by the node holding lease "
                    f"source:{channel.name} -> {targets}")
        return self._open_source(running, targets)

    def _open_source(self, running: RunningChannel, targets: str = "") -> str:
        channel = running.channel
        source = running.source = channel.source.runner(channel.source, running)
        what = source.open()
        running.address = source.address
        return f"channel {channel.name}: {what} -> {targets}"

    @defer.inlineCallbacks
    def _close(self, running: RunningChannel, close_connections: bool):
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
        from hl7relay.snapshots import take_snapshot

        note = (audit or {}).get("reason", "")

        @defer.inlineCallbacks
        def load():
            try:
                channels, errors = load_channels(self.channel_paths)
            except Exception as exc:  # noqa: BLE001 - unreadable folders are problems like any other
                return [], [f"cannot read the channel files: {exc}"], None
            if not errors and self.environment is not None and self.environment.promoted_only:
                from hl7relay.promotion import not_promoted

                problem = yield self.writer.read(not_promoted, self.channel_paths, self.environment, self.writer.store)
                if problem:
                    errors = [problem]
            return channels, errors, lambda: take_snapshot(self.channel_paths, actor or "engine", "reload",
                                                           self.clock(), note, channels, self.settings_file)

        return self._apply_configuration(load, "reload", audit)

    def rollback(self, snapshot_id: int, actor: str = "", note: str = "", audit: dict | None = None) -> defer.Deferred:
        """Run a stored snapshot's configuration again: the same lint-then-apply as a reload, from
        the snapshot's files (certificates and other files it does not hold are read from the
        disk). Records a new snapshot; the engine runs it (a restart too) until a reload applies
        the files. ``{"missing": ...}`` / ``{"refused": ...}`` / ``{"errors": [...]}`` when it
        cannot; nothing changes then."""
        from hl7relay.snapshots import load_snapshot_channels, reapplied
        from hl7relay.yamlsource import current_environment

        @defer.inlineCallbacks
        def load():
            row = yield self.writer.read(self.writer.store.snapshot, snapshot_id)
            if row is None:
                return [], {"missing": f"no snapshot {snapshot_id} (hl7relay config history)"}, None
            environment = current_environment()[0]
            if row["environment"] != environment:
                return [], {"refused": f"snapshot {snapshot_id} ran in environment {row['environment'] or '(none)'}; "
                                       f"this engine runs in {environment or '(none)'} (hl7relay promote moves "
                                       "configuration between environments)"}, None
            channels, errors = load_snapshot_channels(row, self.channel_paths)
            return channels, errors, lambda: reapplied(row, actor or "engine", "rollback", note, self.clock())

        return self._apply_configuration(load, "rollback", audit)

    def _apply_configuration(self, load, kind: str, audit: dict | None) -> defer.Deferred:
        """One reload or rollback at a time: ``load()`` gives (channels, problems, the snapshot to
        record); on problems nothing changes; otherwise the snapshot is recorded, then applied."""
        if self._reloading is not None:  # one at a time: a second SIGHUP waits for the first
            return self._reloading.addCallback(lambda _: self._apply_configuration(load, kind, audit))
        self._reloading = defer.Deferred()
        outcome = {"result": "ok"}

        def loaded(found):
            channels, errors, snapshot = found
            if not errors and self.cluster is not None:  # as at start (run.py)
                errors = [f"{c.file}: channel {c.name} answers after_delivery, which a cluster does not do yet "
                          "(the delivery may be another node's): response: {when: on_store}"
                          for c in channels if c.enabled and c.response.when == "after_delivery"]
            if isinstance(errors, dict):  # the snapshot itself is missing or refused
                outcome["result"] = "refused"
                log.error("{kind} refused: {problem}", kind=kind, problem=next(iter(errors.values())))
                return errors
            if errors:
                texts = [str(e) for e in errors]
                for text in texts:
                    log.error("{kind} refused: {problem}", kind=kind, problem=text)
                log.error("{kind} refused: {count} problem(s) in the channel files; nothing changed", kind=kind,
                          count=len(texts))
                outcome["result"] = "refused"
                return {"errors": texts}

            # what is applied is recorded first, so each message says the snapshot it ran under
            def apply(recorded):
                snapshot_id, taken = recorded
                self._stamp(snapshot_id, channels)
                self.configuration = {"snapshot": snapshot_id, "from_snapshot": taken.from_snapshot if taken else None,
                                      "files": taken.files if taken is not None and taken.from_snapshot else None,
                                      # the channel files' own hash: the same on every node running them
                                      # (the snapshot's sha256 covers each node's settings file too)
                                      "sha256": taken.source_sha256 if taken is not None else ""}
                return self.reload(channels).addCallback(
                    lambda summary: dict(summary, snapshot=snapshot_id) if kind == "rollback" else summary)

            return self._record_snapshot(snapshot, kind).addCallback(apply)

        def audited(summary):
            if audit:
                entry = dict(audit, result=outcome["result"], detail=json.dumps(summary)[:2000])
                return self.writer.update(AuditUpdate(entry)).addBoth(lambda _: summary)
            return summary

        def finished(value):
            # cleared before the waiting reloads run, so the next one starts rather than waits again
            waiting, self._reloading = self._reloading, None
            if waiting is not None:
                waiting.callback(None)
            return value

        result = defer.maybeDeferred(load).addCallback(loaded).addCallback(audited)
        result.addBoth(finished)
        return result

    def _record_snapshot(self, make, kind: str) -> defer.Deferred:
        """The configuration a reload or rollback applies, recorded (hl7relay config history):
        (its id or None, the snapshot or None)."""
        record = getattr(self.writer.store, "record_snapshot", None)
        if record is None or make is None:  # a store without them (a test's stand-in)
            return defer.succeed((None, None))
        try:
            snapshot = make()
        except Exception as exc:  # noqa: BLE001 - the reload goes on; its record is said missing
            log.error("the configuration snapshot of the {kind} was not taken: {error}", kind=kind, error=str(exc))
            return defer.succeed((None, None))

        def recorded(snapshot_id):
            log.info("configuration: snapshot {snapshot_id} for the {kind}", snapshot_id=snapshot_id, kind=kind)
            return snapshot_id, snapshot

        def failed(failure):
            log.error("the configuration snapshot of the {kind} was not recorded: {error}", kind=kind,
                      error=failure.getErrorMessage())
            return None, snapshot

        return self.writer.read(record, snapshot).addCallbacks(recorded, failed)

    def _stamp(self, snapshot_id: int | None, channels=()) -> None:
        """The snapshot the running channels (and ``channels``, about to replace some) run under."""
        for channel in [*(running.channel for running in self.channels.values()), *channels]:
            channel.snapshot_id = snapshot_id

    def stamp_snapshot(self, snapshot_id: int | None, from_snapshot: int | None = None, files: dict | None = None,
                       sha256: str = "") -> None:
        """At start: the snapshot recorded for what the engine starts with (``from_snapshot``:
        the stored one it runs again, after a rollback, and its files)."""
        self._stamp(snapshot_id)
        self.configuration = {"snapshot": snapshot_id, "from_snapshot": from_snapshot, "files": files, "sha256": sha256}

    def configuration_view(self) -> dict:
        """The snapshot the engine runs, and whether the channel files on disk differ from it
        (after a rollback: until they are fixed, or a reload applies them)."""
        from hl7relay.snapshots import differs_from_files

        view = {"snapshot": self.configuration.get("snapshot"), "from_snapshot": self.configuration.get("from_snapshot"),
                "differs_from_files": False}
        files = self.configuration.get("files")
        if files is not None:
            view["differs_from_files"] = differs_from_files({"files": files}, self.channel_paths)
        return view

    @defer.inlineCallbacks
    def reload(self, channels: list[Channel]):
        """Apply new channel definitions (already linted) without a restart. Unchanged channels
        are not touched (their connections stay open); a changed one takes its new configuration
        for the next message, rebinding its listener only when its address or TLS changed; a
        removed or disabled one stops accepting and its queued deliveries stay stored (they resume
        when it comes back); a new one opens. Returns what was done, by channel."""
        wanted = {c.name: c for c in channels if c.enabled}
        summary: dict[str, list[str]] = {"unchanged": [], "changed": [], "rebound": [], "added": [], "removed": []}
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
            current = self.channels.get(name)
            if current is None:
                running = RunningChannel(channel, self.resources)
                self.channels[name] = running
                self._make_queues(running, controls)
                if (name, "", "disabled") in controls:
                    running.enabled = False
                else:
                    self._open(running)
                summary["added"].append(name)
            elif current.channel.fingerprint and current.channel.fingerprint == channel.fingerprint:
                summary["unchanged"].append(name)
            else:
                rebound = yield self._replace(current, channel, controls)
                summary["rebound" if rebound else "changed"].append(name)
        log.info("reload: {summary}", summary=", ".join(f"{k} {', '.join(v)}" for k, v in summary.items() if v) or "nothing to do")
        if self.keeper is not None:  # the new queues take the partitions still held; others come and go
            self.keeper.set_names(self._lease_names())
        return summary

    def _make_queues(self, running: RunningChannel, controls) -> None:
        name = running.channel.name
        running.queues = {}
        for destination in running.channel.destinations:
            self._build_delivery(name, destination)
            queue = self._new_queue(running, destination)
            queue.paused = (name, destination.name, "paused") in controls or self.settings.read_only
            running.queues[destination.name] = queue

    @defer.inlineCallbacks
    def _retire_queues(self, running: RunningChannel, queues: list):
        """Stop queues and wait (bounded) for their deliveries on the wire, then for their results
        to be committed: a queue that replaces them must not send those again."""
        remote = [queue for queue in queues if queue.remote]
        queues = [queue for queue in queues if not queue.remote]
        for queue in queues:
            queue.stop()
            delivery = self._deliveries.get((running.channel.name, queue.destination))
            if delivery is not None:
                delivery.stopping()
        retired = self.forwarder.retire(remote, self.stop_timeout) if remote else None
        deadline = self.reactor.seconds() + self.stop_timeout
        while any(queue.in_flight for queue in queues) and self.reactor.seconds() < deadline:
            yield task.deferLater(self.reactor, 0.05, lambda: None)
        if retired is not None:
            yield retired  # their results are with the writer now
        yield self.writer.drain()
        name = running.channel.name
        for queue in queues:
            delivery = self._deliveries.pop((name, queue.destination), None)
            if delivery is not None:
                delivery.close()

    @defer.inlineCallbacks
    def _replace(self, running: RunningChannel, channel: Channel, controls):
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
        running.policy = channel_policy(channel)
        self._make_queues(running, controls)
        if not was_enabled:
            return False
        if keep_socket and running.source is not None:
            running.source.reconfigure(channel.source)
            for queue in running.queues.values():
                queue.start()
            return False
        self._open(running)
        return True

    # -- operators' controls (the operations API and the CLI call these) ---------------------------
    def running_channel(self, channel: str) -> RunningChannel:
        running = self.channels.get(channel)
        if running is None:
            raise KeyError(f"no channel {channel!r}")
        return running

    def queue(self, channel: str, destination: str) -> Queue:
        queue = self.running_channel(channel).queues.get(destination)
        if queue is None:
            raise KeyError(f"channel {channel!r} has no destination {destination!r}")
        return queue

    def _control(self, channel: str, destination: str, setting: str, on: bool, actor: str, audit: dict | None) -> list:
        """An operator's switch and its audit entry, committed together (remembered across restarts)."""
        updates: list = [ControlUpdate(channel, destination, setting, on, actor, self.clock())]
        if audit:
            updates.append(AuditUpdate(audit))
        return updates

    @defer.inlineCallbacks
    def set_channel_enabled(self, channel: str, enabled: bool, actor: str = "", audit: dict | None = None):
        """Enable or disable a channel now, and remember it across restarts."""
        running = self.running_channel(channel)
        yield self.writer.update(*self._control(channel, "", "disabled", not enabled, actor, audit))
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
        queue = self.queue(channel, destination)
        if not paused and self.settings.read_only:
            raise ReadOnlyEnvironment(f"the environment is read only (read_only: true): {channel}/{destination} holds what it "
                           "would send; nothing is sent")
        yield self.writer.update(*self._control(channel, destination, "paused", paused, actor, audit))
        # a forwarder's queue answers once it is paused there (its view then current)
        yield defer.maybeDeferred(queue.pause if paused else queue.resume)
        log.info("destination {channel}/{destination} {what} by {actor}", channel=channel, destination=destination,
                 what="paused" if paused else "resumed", actor=actor or "?")
        return queue.view()

    @defer.inlineCallbacks
    def retry_now(self, channel: str, destination: str, actor: str = "", audit: dict | None = None):
        """Skip the backoff of the destination's waiting deliveries and of its connections."""
        queue = self.queue(channel, destination)
        delivery = self._deliveries.get((channel, destination))
        if delivery is not None:
            delivery.skip_backoff()
        count = yield defer.maybeDeferred(queue.retry_now)  # a forwarder's queue answers from there
        if audit:
            yield self.writer.update(AuditUpdate(dict(audit, detail=f"{count} waiting deliveries")))
        return dict(queue.view(), retried_now=count)

    def channel_view(self, channel: str) -> dict:
        running = self.running_channel(channel)
        view = {"name": channel, "enabled": running.enabled, "source": running.channel.source_type,
                "address": running.address if running.enabled else "",
                "open_connections": running.source.open_connections if running.source is not None else 0,
                "counters": self.stats.view(channel),
                "destinations": {d.name: dict(running.queues[d.name].view(), type=d.type)
                                 for d in running.channel.destinations if d.name in running.queues}}
        return view

    def connections_view(self, channel: str) -> dict:
        """The channel's listener: its address, open connections and the peers it has seen."""
        running = self.running_channel(channel)
        view = running.source.connections_view() if running.source is not None else None
        return {"name": channel, "source": running.channel.source_type, "enabled": running.enabled,
                "address": running.address if running.enabled else "", **(view or {"open_connections": 0,
                                                                                  "connections": [], "peers": []})}

    def source_views(self) -> dict[str, dict]:
        """Each open source's view (only those that have one: pollers), by channel."""
        views = {}
        for name, running in self.channels.items():
            view = running.source.view() if running.source is not None and running.enabled else None
            if view is not None:
                views[name] = view
        return views

    def status(self) -> dict:
        return {"started": self.started, "stopping": self.stopping, "in_flight": self.in_flight,
                "configuration": self.configuration_view(),
                "channels": {name: self.channel_view(name) for name in self.channels}}

    @defer.inlineCallbacks
    def stop(self):
        """Stop within ``stop_timeout``: stop accepting and reading at once, answer the messages
        being processed, wait for the ACKs of deliveries on the wire, flush the store. Returns a
        :class:`StopReport` of what was left when the time ran out."""
        self.stopping = True
        deadline = self.reactor.seconds() + self.stop_timeout
        report = StopReport(self.stop_timeout)
        sources = []
        for running in self.channels.values():
            if running.source is not None:
                sources.append(running.source)
            yield self._close(running, close_connections=False)
        # nothing more is read: a frame received but not started is dropped unanswered (its
        # sender sends it again); what is being processed is answered, then its connection closes
        report.dropped = sum(source.finish() for source in sources)
        while self.in_flight and self.reactor.seconds() < deadline:
            yield task.deferLater(self.reactor, 0.02, lambda: None)
        report.unanswered = self.in_flight
        if self.in_flight:
            # the time is up: their senders get no answer and send them again (they may have
            # been stored meanwhile: at-least-once, as after a crash)
            for source in sources:
                source.abort()
        # Deliveries already on the wire: their ACKs are waited for (bounded by the same
        # deadline), so a clean restart does not send them again; what is still unanswered then
        # is resent after the restart.
        for delivery in self._deliveries.values():
            delivery.stopping()
        remaining = max(0.0, deadline - self.reactor.seconds())
        forwarder = self.forwarder.stop(remaining) if self.forwarder is not None else defer.succeed(0)
        while self._deliveries_in_flight() and self.reactor.seconds() < deadline:
            yield task.deferLater(self.reactor, 0.02, lambda: None)
        report.deliveries_unanswered = self._deliveries_in_flight()
        report.deliveries_unanswered += yield forwarder  # its results are with the writer now
        if report.unanswered:
            log.warn("stopping with {count} received messages unanswered after {timeout:g}s (stop_timeout); their "
                     "senders will send them again", count=report.unanswered, timeout=self.stop_timeout)
        if report.dropped:
            log.warn("stopping: {count} received messages not started were dropped unanswered; their senders will "
                     "send them again", count=report.dropped)
        if report.deliveries_unanswered:
            log.warn("stopping with {count} deliveries unanswered after {timeout:g}s; they will be sent again "
                     "after the restart (at-least-once)", count=report.deliveries_unanswered, timeout=self.stop_timeout)
        for delivery in self._deliveries.values():
            delivery.close()
        if self.keeper is not None:  # drained above: the leases are let go, the other nodes take over at once
            yield self.keeper.stop()
        yield self.writer.close()
        return report

    def _deliveries_in_flight(self) -> int:
        """Deliveries on the wire from this process's own queues."""
        return sum(len(queue.in_flight) for running in self.channels.values() for queue in running.queues.values()
                   if not queue.remote)

    # -- one message --------------------------------------------------------------------------
    def handle(self, channel: Channel, message: Message, peer) -> defer.Deferred:
        """Process, commit and answer one message on ``channel`` (:meth:`RunningChannel.handle`)."""
        return self.channels[channel.name].handle(message, peer, channel)
