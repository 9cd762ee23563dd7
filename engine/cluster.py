"""Several engines on one PostgreSQL store (issue #31): each destination's queue is split into
partitions, and a node delivers only the partitions it holds a lease on (leases.py).

A delivery's partition is decided when its message is stored: ``per_key`` by its key's hash (a
key's deliveries stay in one partition, in order, whichever node holds it), ``in_order`` the one
partition 0 (the destination's order is one queue's), ``none`` by its content's hash (spread).
The :class:`PartitionedQueue` stands where the engine expects a destination's queue; for each
partition this node holds it runs a :class:`~hl7relay.queues.DestinationQueue` of that partition
alone, whose results are written under the lease (fenced once the lease moved on). A message
stored here for a partition another node holds waits in the store: its owner's poll reads it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from hl7relay.channels.destinations import QueueOptions
from hl7relay.store.database import StoreError
from hl7relay.events import emit

log = Logger(namespace="hl7relay.cluster")
FETCH = 200  # each partition's first queued deliveries a read looks at (queues._FETCH)
READ_EVERY = 0.05  # seconds between two reads of a destination's partitions

__all__ = ["ClusterSettings", "PartitionedQueue", "partition_of", "lease_name", "parse_lease_name"]


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    node_id: str
    partitions: int = 16
    lease_ttl: float = 10.0
    lease_renew: float = 3.0
    workers: int = 1  # engine processes on this host (hl7relay run --workers N), each a node of its own


def partition_of(options: QueueOptions, order_key: str | None, content: bytes | None, partitions: int) -> int:
    if partitions <= 1 or options.order == "in_order":
        return 0
    if options.order == "per_key":
        return zlib.crc32((order_key or "").encode("utf-8", "replace")) % partitions
    return zlib.crc32(content or b"") % partitions


def lease_name(channel: str, destination: str, partition: int) -> str:
    return f"queue:{channel}/{destination}/{partition}"


def parse_lease_name(name: str) -> tuple[str, str, int] | None:
    if not name.startswith("queue:"):
        return None
    path, _, number = name[len("queue:"):].rpartition("/")
    channel, _, destination = path.partition("/")
    return channel, destination, int(number)


class PartitionedQueue:
    """A destination's queue in a cluster: the partitions this node holds, each a queue of its
    own. ``make(partition, lease)`` builds one (a DestinationQueue of that partition)."""

    remote = False

    def __init__(self, channel: str, destination: str, options: QueueOptions, partitions: int, make, reactor,
                 stop_timeout: float, drain=None):
        self.channel, self.destination, self.options = channel, destination, options
        self.count = 1 if options.order == "in_order" else partitions
        self.make, self.reactor, self.stop_timeout = make, reactor, stop_timeout
        self.drain = drain  # () -> Deferred: the store writer's pending results committed
        self.parts: dict[int, Any] = {}  # partition -> its running queue (a DestinationQueue)
        self.paused = False
        self._stopped = False
        self._reporting: Any = None  # the report due on the next reactor turn
        self._asked: set[int] = set()  # partitions whose queue asked for a read of the store
        self._read_call: Any = None  # the read due on the next reactor turn
        self._reading = False
        self._last_read = float("-inf")

    # -- what the engine and its trips use (hl7relay.queues.Queue) -------------------------------
    @property
    def stopped(self) -> bool:
        return self._stopped

    def lease_names(self) -> list[str]:
        return [lease_name(self.channel, self.destination, p) for p in range(self.count)]

    def partition_of(self, order_key: str | None, content: bytes | None) -> int:
        return partition_of(self.options, order_key, content, self.count)

    def start(self) -> None:
        """Nothing runs until a lease is taken (:meth:`gain`)."""

    def stop(self) -> None:
        self._stopped = True
        for call in (self._reporting, self._read_call):
            if call is not None and call.active():
                call.cancel()
        self._reporting = self._read_call = None
        for part in self.parts.values():
            part.stop()

    def enqueue(self, message_id: int, content: bytes, order_key: str | None, received_at: float, message=None) -> None:
        part = self.parts.get(self.partition_of(order_key, content))
        if part is not None:
            part.enqueue(message_id, content, order_key, received_at, message)
        # else: another node holds the partition; its poll reads the row

    def first_result(self, message_id: int) -> defer.Deferred:  # pragma: no cover - refused at start (run.py)
        raise RuntimeError("response: after_delivery is not supported in a cluster")

    def release(self, message_id: int) -> None:  # pragma: no cover - after_delivery only
        for part in self.parts.values():
            part.release(message_id)

    def withdraw(self, message_id: int, reason: str):  # pragma: no cover - after_delivery only
        return None

    def pause(self) -> None:
        self.paused = True
        for part in self.parts.values():
            part.pause()

    def resume(self) -> None:
        self.paused = False
        for part in self.parts.values():
            part.resume()

    def retry_now(self) -> int:
        return sum(part.retry_now() for part in self.parts.values())

    @property
    def in_flight(self) -> dict:
        merged: dict = {}
        for part in self.parts.values():
            merged.update(part.in_flight)
        return merged

    def view(self) -> dict:
        views = [part.view() for part in self.parts.values()]
        first = views[0] if views else {}
        states = [v["state"] for v in views]
        state = ("paused" if self.paused else next((s for s in ("held", "down", "failing", "rate_limited") if s in states),
                                                   "ok" if "ok" in states else "idle"))
        return {
            "channel": self.channel, "destination": self.destination, "paused": self.paused,
            "connected": first.get("connected"), "state": state,
            "depth": sum(v["depth"] for v in views), "in_memory": sum(v["in_memory"] for v in views),
            "on_disk": sum(v["on_disk"] for v in views), "in_flight": sum(v["in_flight"] for v in views),
            "oldest_age": max((v["oldest_age"] for v in views if v["oldest_age"] is not None), default=None),
            "head": first.get("head"), "last_error": next((v["last_error"] for v in views if v["last_error"]), ""),
            "last_error_at": max((v["last_error_at"] for v in views if v["last_error_at"]), default=None),
            "last_error_class": next((v["last_error_class"] for v in views if v["last_error_class"]), None),
            "last_sent_at": max((v["last_sent_at"] for v in views if v["last_sent_at"]), default=None),
            "held": next((v["held"] for v in views if v["held"]), None),
            "rate_limited_since": None, "wait_left": None,
            "sent": sum(v["sent"] for v in views), "failed": sum(v["failed"] for v in views),
            "retried": sum(v["retried"] for v in views),
            "partitions": {"count": self.count, "held": sorted(self.parts)},
        }

    def report(self) -> None:
        """The destination's queue as the metrics see it: the partitions this node holds, summed
        (once per reactor turn, however many partitions changed in it)."""
        if self._reporting is None:
            self._reporting = self.reactor.callLater(0, self._report)

    def _report(self) -> None:
        self._reporting = None
        depths = [(part.depth(), part.clock) for part in self.parts.values()]
        oldest = min(((at, clock) for (_, at), clock in depths if at is not None), default=None, key=lambda o: o[0])
        emit("queue_state", channel=self.channel, destination=self.destination, depth=sum(d for (d, _), _ in depths),
             oldest_age=None if oldest is None else max(0.0, oldest[1]() - oldest[0]))

    # -- reading the store: one read for every partition that asks ------------------------------------
    def request(self, part) -> None:
        """A partition's queue wants to read its queued rows (its poll, a row stored here): the
        partitions asking in the same turn, or while a read is under way, are read together."""
        self._asked.add(part.partition)
        self._schedule_read()

    def _schedule_read(self) -> None:
        # at most one read every READ_EVERY: under load every stored row asks, and reads back to
        # back kept a thread and the GIL busy rereading the same queued ids
        if not self._reading and self._read_call is None and not self._stopped:
            delay = max(0.0, self._last_read + READ_EVERY - self.reactor.seconds())
            self._read_call = self.reactor.callLater(delay, self._read)

    @defer.inlineCallbacks
    def _read(self):
        self._read_call = None
        parts = {p: self.parts[p] for p in sorted(self._asked) if p in self.parts and not self.parts[p].stopped}
        busy = {p for p, part in parts.items() if part._polling}  # still counting its backlog: next read
        self._asked = busy
        parts = {p: part for p, part in parts.items() if p not in busy}
        if not parts or self._stopped:
            if self._asked and not self._stopped:
                self._schedule_read()
            return
        first = next(iter(parts.values()))
        self._last_read = self.reactor.seconds()
        known_before = {p: len(part.known) for p, part in parts.items()}
        skip = frozenset().union(*(part.known for part in parts.values()))
        self._reading = True
        for part in parts.values():
            part._polling = True
        try:
            rows = yield first.writer.read_aside(first.writer.store.queued_in_partitions, self.channel,
                                                 self.destination, FETCH, tuple(parts), skip)
        except StoreError as exc:
            log.error("queue {channel}/{destination}: cannot read the queue: {error}", channel=self.channel,
                      destination=self.destination, error=str(exc))
            rows = None
        finally:
            self._reading = False
            for part in parts.values():
                part._polling = False
        if rows is not None:
            found: dict[int, list] = {p: [] for p in parts}
            for row in rows:
                found[row["queue_partition"]].append(row)
            for p, part in parts.items():
                if self.parts.get(p) is part and not part.stopped:  # still ours
                    part.take(found[p], None, known_before[p])
        if self._asked:
            self._schedule_read()

    # -- leases (the engine's LeaseKeeper) ---------------------------------------------------------
    def gain(self, partition: int, lease: tuple) -> None:
        """This node holds the partition now: its queue reads the partition's backlog in order."""
        if self._stopped or partition in self.parts:
            return
        part = self.make(partition, lease)
        part.on_report = self.report
        part.poller = self
        if self.paused:
            part.pause()
        self.parts[partition] = part
        part.start()

    @defer.inlineCallbacks
    def lose(self, partition: int):
        """Stop the partition's queue, wait (bounded) for its deliveries on the wire, then for
        their results to be committed: the lease is let go only then, so the next owner does not
        find a delivered row still QUEUED and send it again. (Results written under a lease that
        is no longer ours are fenced.)"""
        part = self.parts.pop(partition, None)
        if part is None:
            return
        part.stop()
        deadline = self.reactor.seconds() + self.stop_timeout
        while part.in_flight and self.reactor.seconds() < deadline:
            yield task.deferLater(self.reactor, 0.05, lambda: None)
        if self.drain is not None:
            yield self.drain()
