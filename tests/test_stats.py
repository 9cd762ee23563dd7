"""Per-channel numbers from memory (stats.py): counts since start and today, rates, ACK p95."""

from hl7relay.stats import ChannelStats


class Clock:
    def __init__(self, now=1_700_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def test_counts_since_start_and_today_by_status():
    clock = Clock()
    stats = ChannelStats(clock, day_of=lambda now: int(now // 86400))
    for status in ("PROCESSED", "PROCESSED", "FILTERED", "ERROR", "DUPLICATE", "NOT_STORED"):
        stats.answered("adt", status, 0.002)
    view = stats.view("adt")
    assert view["since_start"] == {"received": 6, "processed": 2, "filtered": 1, "error": 1, "duplicate": 1, "not_stored": 1}
    assert view["today"] == view["since_start"]
    clock.now += 86400  # the next day: today starts again, since start does not
    stats.answered("adt", "PROCESSED", 0.001)
    view = stats.view("adt")
    assert view["today"]["received"] == 1 and view["today"]["processed"] == 1 and view["since_start"]["received"] == 7
    assert stats.view("other")["since_start"]["received"] == 0  # a channel with nothing yet


def test_rates_over_one_and_five_minutes():
    clock = Clock()
    stats = ChannelStats(clock)
    for second in range(300):  # 2 a second for 5 minutes, then 6 in the last minute's last second
        clock.now = 1_700_000_000.0 + second
        stats.answered("adt", "PROCESSED", None)
        stats.answered("adt", "PROCESSED", None)
    view = stats.view("adt")
    assert view["per_minute_1m"] == 120 and view["per_minute_5m"] == 120
    clock.now += 120  # two quiet minutes
    view = stats.view("adt")
    assert view["per_minute_1m"] == 0 and view["per_minute_5m"] == 2 * 180 / 5
    clock.now += 1000
    assert stats.view("adt")["per_minute_5m"] == 0  # old buckets read as empty, not as last time round


def test_ack_p95_over_the_last_five_minutes():
    clock = Clock()
    stats = ChannelStats(clock)
    for i in range(100):
        stats.answered("adt", "PROCESSED", (i + 1) / 1000)  # 1..100 ms
    stats.answered("adt", None, None)  # a message whose handling failed: received, no status, no latency
    assert stats.view("adt")["since_start"]["received"] == 101
    assert stats.view("adt")["ack_p95_ms"] == 96.0
    clock.now += 301
    assert stats.view("adt")["ack_p95_ms"] is None
