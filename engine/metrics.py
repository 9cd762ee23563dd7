"""Every Prometheus metric of hl7relay, in one place, fed by events.

Names start with ``hl7relay_``. Components never touch prometheus-client: they emit events
(:mod:`hl7relay.events`) and :class:`Metrics` turns them into counters, gauges and histograms.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from hl7relay import events
from hl7relay.outcomes import MessageStatus

__all__ = ["Metrics", "METRIC_NAMES"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _HotCounter:
    """A labelled counter updated per message: a dict of floats, exposed at scrape time.
    prometheus-client's Counter takes a lock on every increment; the engine updates its
    metrics from the reactor thread only, so plain numbers do (7% of the CPU per message)."""

    def __init__(self, name: str, documentation: str, labelnames: list[str]):
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.values: dict[tuple, float] = {}

    def inc(self, labels: tuple, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def family(self):
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in list(self.values.items()):
            family.add_metric(list(labels), value)
        return family


class _HotHistogram:
    """A labelled histogram updated per message (see _HotCounter): bucket counts found by bisect."""

    def __init__(self, name: str, documentation: str, labelnames: list[str], buckets: tuple):
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.bounds = list(buckets)
        self.series: dict[tuple, list] = {}  # labels -> [count per bucket..., +Inf bucket, sum]

    def observe(self, labels: tuple, value: float) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [0] * (len(self.bounds) + 1) + [0.0]
        series[bisect_left(self.bounds, value)] += 1  # le is inclusive: value == bound counts in that bucket
        series[-1] += value

    def family(self):
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, series in list(self.series.items()):
            cumulative, buckets = 0, []
            for bound, count in zip([*self.bounds, float("inf")], series[:-1]):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else _float_text(bound), cumulative))
            family.add_metric(list(labels), buckets, sum_value=series[-1])
        return family


def _float_text(value: float) -> str:
    return repr(float(value))


class _HotCollector:
    def __init__(self, metrics: list):
        self.metrics = metrics

    def collect(self):
        for metric in self.metrics:
            yield metric.family()


class Metrics:
    """The metric objects in their own registry, and the event observer that updates them."""

    def __init__(self, registry: CollectorRegistry | None = None, environment: str = ""):
        r = self.registry = registry or CollectorRegistry()
        # the environment (--env) as an info metric: join on it rather than label every series
        self.environment = Gauge("hl7relay_environment", "1, labelled with the environment the engine runs in (--env)",
                                 ["environment"], registry=r)
        self.environment.labels(environment or "none").set(1)
        self.received = _HotCounter("hl7relay_messages_received", "Messages received", ["channel"])
        self.filtered = Counter("hl7relay_messages_filtered", "Messages filtered out by the channel", ["channel"], registry=r)
        self.errored = Counter("hl7relay_messages_errored", "Messages stored as ERROR (transformer or validator)", ["channel"], registry=r)
        self.duplicates = Counter("hl7relay_messages_duplicate", "Messages stored as DUPLICATE", ["channel"], registry=r)
        self.acked = _HotCounter("hl7relay_messages_acked", "ACKs sent, by code (AA, AE, AR, CA, CE, CR)", ["channel", "code"])
        self.store_failures = Counter("hl7relay_store_failures", "Messages that could not be stored (answered AR/CR)", ["channel"], registry=r)
        self.sent = _HotCounter("hl7relay_deliveries_sent", "Deliveries that succeeded", ["channel", "destination"])
        self.failed = Counter("hl7relay_deliveries_failed", "Deliveries that went to ERROR (AE or retries exhausted)", ["channel", "destination"], registry=r)
        self.retried = Counter("hl7relay_deliveries_retried", "Delivery attempts that failed and will be retried", ["channel", "destination"], registry=r)
        self.queue_depth = Gauge("hl7relay_queue_depth", "Deliveries queued", ["channel", "destination"], registry=r)
        self.queue_age = Gauge("hl7relay_queue_oldest_age_seconds", "Age of the oldest queued delivery", ["channel", "destination"], registry=r)
        self.destination_up = Gauge("hl7relay_destination_up", "1 when the destination's last attempt reached it", ["channel", "destination"], registry=r)
        self.ack_latency = _HotHistogram("hl7relay_ack_latency_seconds", "From a message's arrival to its ACK being ready",
                                         ["channel"], _LATENCY_BUCKETS)
        self.stage_latency = _HotHistogram("hl7relay_stage_latency_seconds", "Time per stage (pipeline, store)",
                                           ["channel", "stage"], _LATENCY_BUCKETS)
        self.connections = Gauge("hl7relay_open_connections", "Open MLLP connections", ["listener"], registry=r)
        self.refused = Counter("hl7relay_refused_connections", "Connections refused (not_allowed, per_peer, max_connections)",
                               ["listener", "reason"], registry=r)
        self.evicted = Counter("hl7relay_evicted_connections", "Idle connections closed to make room for a new one",
                               ["listener"], registry=r)
        self.discarded_bytes = Counter("hl7relay_discarded_bytes", "Bytes outside MLLP frames", ["listener"], registry=r)
        self.discarded_frames = Counter("hl7relay_discarded_frames", "Frames dropped (oversize, read timeout)", ["listener", "reason"], registry=r)
        self.files = Counter("hl7relay_files_read", "Files a source finished with, by state (done, errors, duplicate)",
                             ["channel", "state"], registry=r)
        self.leases_held = Gauge("hl7relay_leases_held", "Leases this node holds (a cluster's queue partitions)", [],
                                 registry=r)
        self.lease_changes = Counter("hl7relay_lease_changes", "Leases this node took, lost or let go (churn)", ["change"],
                                     registry=r)
        self.fenced = Counter("hl7relay_fenced_writes", "Delivery results left out of a commit: written under a lease "
                              "another node held by then", [], registry=r)
        self.commit_latency = _HotHistogram("hl7relay_store_commit_seconds", "Store commit duration", [], _LATENCY_BUCKETS)
        self.batch_size = _HotHistogram("hl7relay_store_batch_size", "Messages and updates per group commit", [], _BATCH_BUCKETS)
        r.register(_HotCollector([self.received, self.acked, self.sent, self.ack_latency, self.stage_latency,
                                  self.commit_latency, self.batch_size]))
        self._children: dict = {}  # (metric, label values) -> child: labels() validates and locks on every call
        self._handlers = {
            "message_received": lambda f: self.received.inc((f["channel"],)),
            "lease_changed": self._lease_changed,
            "writes_fenced": lambda f: self.fenced.inc(f["count"]),
            "message_processed": self._processed,
            "store_failed": lambda f: self._labels(self.store_failures, f["channel"]).inc(),
            "delivery_sent": lambda f: self.sent.inc((f["channel"], f["destination"])),
            "delivery_failed": lambda f: self._labels(self.failed, f["channel"], f["destination"]).inc(),
            "delivery_retried": lambda f: self._labels(self.retried, f["channel"], f["destination"]).inc(),
            "queue_state": self._queue_state,
            "destination_state": lambda f: self._labels(self.destination_up, f["channel"], f["destination"]).set(1 if f["connected"] else 0),
            "connection_opened": lambda f: self._labels(self.connections, f["listener"]).inc(),
            "connection_closed": lambda f: self._labels(self.connections, f["listener"]).dec(),
            "connection_refused": lambda f: self._labels(self.refused, f["listener"], f.get("reason", "max_connections")).inc(),
            "connection_evicted": lambda f: self._labels(self.evicted, f["listener"]).inc(),
            "bytes_discarded": lambda f: self._labels(self.discarded_bytes, f["listener"]).inc(f["count"]),
            "frame_discarded": lambda f: self._labels(self.discarded_frames, f["listener"], f["reason"]).inc(),
            "store_commit": self._commit,
            "file_read": lambda f: self._labels(self.files, f["channel"], f["state"]).inc(),
        }


    def _lease_changed(self, f) -> None:
        self.lease_changes.labels(f["change"]).inc()
        self.leases_held.set(f["held"])
    def _labels(self, metric, *values):
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def observe(self, event: str, fields: dict) -> None:
        handler = self._handlers.get(event)
        if handler is not None:
            handler(fields)

    def install(self) -> "Metrics":
        events.subscribe(self.observe)
        return self

    def uninstall(self) -> None:
        events.unsubscribe(self.observe)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _processed(self, f):
        channel = f["channel"]
        status = f["status"]
        if status == MessageStatus.FILTERED:
            self._labels(self.filtered, channel).inc()
        elif status == MessageStatus.ERROR:
            self._labels(self.errored, channel).inc()
        elif status == MessageStatus.DUPLICATE:
            self._labels(self.duplicates, channel).inc()
        for code in f.get("ack_codes", ()):
            self.acked.inc((channel, code))
        if f.get("ack_latency") is not None:
            self.ack_latency.observe((channel,), f["ack_latency"])
        for stage, seconds in f.get("stages", {}).items():
            self.stage_latency.observe((channel, stage), seconds)

    def _queue_state(self, f):
        self._labels(self.queue_depth, f["channel"], f["destination"]).set(f["depth"])
        self._labels(self.queue_age, f["channel"], f["destination"]).set(f["oldest_age"] or 0)

    def _commit(self, f):
        self.commit_latency.observe((), f["seconds"])
        self.batch_size.observe((), f["size"])


METRIC_NAMES = frozenset(m.name for m in Metrics().registry.collect())
