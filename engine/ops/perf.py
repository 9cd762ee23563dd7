"""The performance analyzer: the last hour of the running engine, minute by minute, in memory.

Per channel: messages per minute, ACK latency and per-stage (pipeline, store) latency
percentiles; per destination: deliveries, failures and retries, round-trip percentiles, queue
depth and the age of its oldest message; the store's commit time and batch size; and the ten
slowest messages of the hour with where their time went. Fed by the engine's events (one
minute's bucket per event, a bisect into fixed latency bounds), read by the operations API
(``hl7relay stats``, the console's Performance page). Nothing here touches the store.
"""

from __future__ import annotations

import heapq
import time
from bisect import bisect_left

from hl7relay import events
from hl7relay.outcomes import NOT_STORED, MessageStatus

__all__ = ["Performance", "BOUNDS_MS", "percentile"]

MINUTES = 60
# latency bucket bounds (ms), about 12% apart: a percentile is read to within a bucket
BOUNDS_MS = tuple(round(0.05 * 1.12 ** i, 3) for i in range(0, 128) if 0.05 * 1.12 ** i <= 120_000)
_BOUNDS_S = tuple(b / 1000 for b in BOUNDS_MS)
_SLOWEST = 10
_FAILED = frozenset({MessageStatus.ERROR.value, NOT_STORED})  # counted as errors in the per-minute view
_COUNTS = {"delivery_sent": "sent", "delivery_failed": "failed", "delivery_retried": "retried"}


def _histogram() -> list:
    return [0] * (len(_BOUNDS_S) + 1)


def percentile(histogram: list, fraction: float) -> float | None:
    """The bucket bound (ms) under which ``fraction`` of the samples fall; None without samples."""
    total = sum(histogram)
    if not total:
        return None
    wanted, seen = fraction * total, 0
    for index, count in enumerate(histogram):
        seen += count
        if seen >= wanted and count:
            return BOUNDS_MS[min(index, len(BOUNDS_MS) - 1)]  # beyond the last bound: read as it
    return None


class _Minute:
    __slots__ = ("minute", "channels", "destinations", "commits", "commit_hist", "batch_total", "slowest")

    def __init__(self, minute: int):
        self.minute = minute
        self.channels: dict = {}  # name -> {"count", "errors", "ack": hist, "stages": {stage: hist}}
        self.destinations: dict = {}  # (channel, destination) -> {"sent", "failed", "retried", "rtt": hist, queue}
        self.commits = 0
        self.commit_hist = _histogram()
        self.batch_total = 0
        self.slowest: list = []  # heap of (seconds, tiebreak, row): this minute's slowest messages


class Performance:
    def __init__(self, clock=time.time):
        self.clock = clock
        self.minutes: dict[int, _Minute] = {}
        self._counter = 0
        self.queues: dict = {}  # (channel, destination) -> the latest queue_state: (depth, oldest_age)
        self._bucket, self._from, self._until = None, 0.0, 0.0

    def install(self) -> "Performance":
        events.subscribe(self.observe, events=("message_processed", "delivery_sent", "delivery_failed",
                                               "delivery_retried", "queue_state", "store_commit"))
        return self

    def uninstall(self) -> None:
        events.unsubscribe(self.observe)

    def _minute(self) -> _Minute:
        now = self.clock()
        if self._from <= now < self._until:  # the current minute's bucket: one comparison per event
            return self._bucket
        minute = int(now // 60)
        bucket = self.minutes.get(minute)
        if bucket is None:
            bucket = self.minutes[minute] = _Minute(minute)
            for old in [m for m in self.minutes if m <= minute - MINUTES]:
                del self.minutes[old]
        self._bucket, self._from, self._until = bucket, minute * 60.0, minute * 60.0 + 60.0
        return bucket

    def observe(self, event: str, f: dict) -> None:
        if event == "message_processed":
            self._processed(f)
        elif event in ("delivery_sent", "delivery_failed", "delivery_retried"):
            self._delivery(event, f)
        elif event == "queue_state":
            self._queue(f)
        elif event == "store_commit":
            bucket = self._minute()
            bucket.commits += 1
            bucket.commit_hist[bisect_left(_BOUNDS_S, f["seconds"])] += 1
            bucket.batch_total += f["size"]

    def _processed(self, f: dict) -> None:
        bucket = self._minute()
        name = f["channel"]
        channel = bucket.channels.get(name)
        if channel is None:
            channel = bucket.channels[name] = {"count": 0, "errors": 0, "ack": _histogram(), "stages": {}}
        channel["count"] += 1
        if f.get("status") in _FAILED:
            channel["errors"] += 1
        latency = f.get("ack_latency")
        stages = f.get("stages") or {}
        for stage, seconds in stages.items():
            hist = channel["stages"].get(stage)
            if hist is None:
                hist = channel["stages"][stage] = _histogram()
            hist[bisect_left(_BOUNDS_S, seconds)] += 1
        if latency is None:
            return
        channel["ack"][bisect_left(_BOUNDS_S, latency)] += 1
        slowest = bucket.slowest
        if len(slowest) < _SLOWEST or latency > slowest[0][0]:
            self._counter += 1
            row = {"at": self.clock(), "channel": name, "message_id": f.get("message_id"),
                   "message_type": f.get("message_type") or "", "control_id": f.get("control_id") or "",
                   "status": f.get("status"), "ack_ms": round(latency * 1000, 2),
                   "stages_ms": {stage: round(seconds * 1000, 2) for stage, seconds in stages.items()}}
            entry = (latency, self._counter, row)
            if len(slowest) < _SLOWEST:
                heapq.heappush(slowest, entry)
            else:
                heapq.heapreplace(slowest, entry)

    def _delivery(self, event: str, f: dict) -> None:
        entry = self._destination(f)
        entry[_COUNTS[event]] += 1
        if f.get("seconds") is not None:
            entry["rtt"][bisect_left(_BOUNDS_S, f["seconds"])] += 1

    def _destination(self, f: dict) -> dict:
        """This minute's numbers of the event's destination."""
        bucket = self._minute()
        key = (f["channel"], f["destination"])
        entry = bucket.destinations.get(key)
        if entry is None:
            entry = bucket.destinations[key] = {"sent": 0, "failed": 0, "retried": 0, "rtt": _histogram(),
                                                "depth_max": 0, "oldest_age_max": 0.0}
        return entry

    def _queue(self, f: dict) -> None:
        self.queues[(f["channel"], f["destination"])] = (f["depth"], f["oldest_age"])
        entry = self._destination(f)
        entry["depth_max"] = max(entry["depth_max"], f["depth"])
        entry["oldest_age_max"] = max(entry["oldest_age_max"], f["oldest_age"] or 0.0)

    # -- reading ------------------------------------------------------------------------------------
    def view(self, minutes: int = MINUTES, channel: str | None = None) -> dict:
        """The last ``minutes`` (1-60): per channel, per destination, the store, the slowest messages,
        and each minute's counts (oldest first) for a chart."""
        now = self.clock()
        current = int(now // 60)
        wanted = [self.minutes[m] for m in range(current - minutes + 1, current + 1) if m in self.minutes]
        span = min(minutes, max(1.0, (now - (current - minutes + 1) * 60) / 60))  # the minutes it covers so far
        channels: dict = {}
        for bucket in wanted:
            for name, c in bucket.channels.items():
                if channel is not None and name != channel:
                    continue
                total = channels.setdefault(name, {"count": 0, "errors": 0, "ack": _histogram(), "stages": {},
                                                   "per_minute": {}})
                total["count"] += c["count"]
                total["errors"] += c["errors"]
                _add(total["ack"], c["ack"])
                for stage, hist in c["stages"].items():
                    _add(total["stages"].setdefault(stage, _histogram()), hist)
                total["per_minute"][bucket.minute] = c["count"]
        destinations: dict = {}
        for bucket in wanted:
            for (name, destination), d in bucket.destinations.items():
                if channel is not None and name != channel:
                    continue
                total = destinations.setdefault(f"{name}/{destination}", {
                    "channel": name, "destination": destination, "sent": 0, "failed": 0, "retried": 0,
                    "rtt": _histogram(), "depth_max": 0, "oldest_age_max": 0.0})
                for k in ("sent", "failed", "retried"):
                    total[k] += d[k]
                _add(total["rtt"], d["rtt"])
                total["depth_max"] = max(total["depth_max"], d["depth_max"])
                total["oldest_age_max"] = max(total["oldest_age_max"], d["oldest_age_max"])
        commit_hist, commits, batch_total = _histogram(), 0, 0
        for bucket in wanted:
            _add(commit_hist, bucket.commit_hist)
            commits += bucket.commits
            batch_total += bucket.batch_total
        slowest = sorted((entry for bucket in wanted for entry in bucket.slowest
                          if channel is None or entry[2]["channel"] == channel), key=lambda e: -e[0])[:_SLOWEST]
        minute_list = [current - minutes + 1 + i for i in range(minutes)]
        return {
            "minutes": minutes, "until": now,
            "channels": {name: {"messages": c["count"], "errors": c["errors"], "per_minute": round(c["count"] / span, 2),
                                "ack_ms": _percentiles(c["ack"]),
                                "stages_ms": {stage: _percentiles(h) for stage, h in c["stages"].items()},
                                "chart": [c["per_minute"].get(m, 0) for m in minute_list]}
                         for name, c in sorted(channels.items())},
            "destinations": sorted(({
                "channel": d["channel"], "destination": d["destination"], "sent": d["sent"], "failed": d["failed"],
                "retried": d["retried"], "per_minute": round(d["sent"] / span, 2), "round_trip_ms": _percentiles(d["rtt"]),
                "queue": {"depth_max": d["depth_max"], "oldest_age_max": d["oldest_age_max"],
                          **_latest(self.queues.get((d["channel"], d["destination"])))}}
                for d in destinations.values()), key=lambda d: -(d["round_trip_ms"]["p95"] or 0)),
            "store": {"commits": commits, "commit_ms": _percentiles(commit_hist),
                      "batch_average": round(batch_total / commits, 2) if commits else None},
            "slowest": [entry[2] for entry in slowest],
        }


def _latest(state) -> dict:
    return {} if state is None else {"depth": state[0], "oldest_age": state[1]}


def _add(total: list, more: list) -> None:
    for index, count in enumerate(more):
        if count:
            total[index] += count


def _percentiles(histogram: list) -> dict:
    return {name: percentile(histogram, q) for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))}
