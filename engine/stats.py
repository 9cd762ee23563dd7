"""Per-channel numbers kept in memory for the operations API and the console's dashboard:
counts since start and today, messages per minute over the last 1 and 5 minutes, ACK latency p95.

Reading them never touches the store (a dashboard refreshing every second must not scan a table
of millions). The engine calls :meth:`ChannelStats.answered`
once per message, when it is answered: a few dictionary updates and a bucket increment.
"""

from __future__ import annotations

import time
from collections import deque

from hl7relay.outcomes import NOT_STORED, STORED_STATUSES

__all__ = ["ChannelStats", "COUNTED"]

# the statuses counted per channel (a message is counted once, under the status it was stored with)
COUNTED = (*STORED_STATUSES, NOT_STORED)
_WINDOW = 300  # seconds of per-second buckets: rates over 1 and 5 minutes
_LATENCIES = 4096  # ACK latencies kept for the p95 (the last 5 minutes of them, at most this many)


class _Channel:
    __slots__ = ("received", "by_status", "today", "today_received", "day", "stamps", "counts", "latencies")

    def __init__(self, day):
        self.received = 0
        self.by_status = dict.fromkeys(COUNTED, 0)
        self.today = dict.fromkeys(COUNTED, 0)
        self.today_received = 0
        self.day = day
        self.stamps = [0] * _WINDOW  # the second each bucket counts, so a stale bucket reads as 0
        self.counts = [0] * _WINDOW
        self.latencies: deque = deque(maxlen=_LATENCIES)  # (answered at, seconds)


class ChannelStats:
    def __init__(self, clock=time.time, day_of=None):
        self.clock = clock
        # "today" is the site's day (local time), as the dashboard shows it
        self.day_of = day_of or (lambda now: time.localtime(now)[:3])
        self.started_at = clock()
        self._channels: dict[str, _Channel] = {}

    def _channel(self, name: str, now: float) -> _Channel:
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = _Channel(self.day_of(now))
        return channel

    def answered(self, name: str, status: str | None, ack_latency: float | None, now: float | None = None) -> None:
        """One message answered (``status``: what it was stored as; None: its handling failed);
        ``now``: when, if the caller knows (saves a clock call per message)."""
        if now is None:
            now = self.clock()
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = _Channel(self.day_of(now))
        second = int(now)
        slot = second % _WINDOW
        if channel.stamps[slot] != second:  # a new second: maybe a new day too
            self._roll(channel, now)
            channel.stamps[slot], channel.counts[slot] = second, 0
        channel.counts[slot] += 1
        channel.received += 1
        channel.today_received += 1
        if status in channel.by_status:
            channel.by_status[status] += 1
            channel.today[status] += 1
        if ack_latency is not None:
            channel.latencies.append((now, ack_latency))

    def _roll(self, channel: _Channel, now: float) -> None:
        day = self.day_of(now)
        if day != channel.day:
            channel.day = day
            channel.today = dict.fromkeys(COUNTED, 0)
            channel.today_received = 0

    def view(self, name: str) -> dict:
        """What the API and the dashboard show of a channel."""
        now = self.clock()
        channel = self._channel(name, now)
        self._roll(channel, now)
        second = int(now)
        last_minute = sum(c for s, c in zip(channel.stamps, channel.counts) if second - 60 < s <= second)
        last_five = sum(c for s, c in zip(channel.stamps, channel.counts) if second - _WINDOW < s <= second)
        recent = sorted(seconds for at, seconds in channel.latencies if at > now - _WINDOW)
        p95 = recent[min(len(recent) - 1, int(len(recent) * 0.95))] if recent else None
        return {
            "since_start": {"received": channel.received, **{k.lower(): v for k, v in channel.by_status.items()}},
            "today": {"received": channel.today_received, **{k.lower(): v for k, v in channel.today.items()}},
            "per_minute_1m": float(last_minute),
            "per_minute_5m": last_five / 5.0,
            "ack_p95_ms": None if p95 is None else round(p95 * 1000, 2),
            "started_at": self.started_at,
        }
