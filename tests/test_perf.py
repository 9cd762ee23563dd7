"""The performance analyzer: an hour in per-minute buckets, percentiles, the slowest messages; hl7relay stats."""

import json
import subprocess
import sys

import pytest
from twisted.internet import task

from hl7relay.ops.perf import BOUNDS_MS, Performance, percentile


def processed(channel="adt", latency=0.002, message_id=1, pipeline=0.0005, store=0.001, status="PROCESSED"):
    return {"channel": channel, "status": status, "ack_codes": ["AA"], "ack_latency": latency,
            "stages": {"pipeline": pipeline, "store": store}, "message_id": message_id, "message_type": "ADT^A01",
            "control_id": f"C{message_id}", "peer": "x"}


def test_percentiles_are_read_within_a_bucket():
    hist = [0] * (len(BOUNDS_MS) + 1)
    from bisect import bisect_left
    for ms in range(1, 101):  # 1..100 ms
        hist[bisect_left([b / 1000 for b in BOUNDS_MS], ms / 1000)] += 1
    for q, exact in ((0.5, 50), (0.95, 95), (0.99, 99), (1.0, 100)):
        assert exact <= percentile(hist, q) <= exact * 1.13
    assert percentile([0] * len(hist), 0.5) is None


def test_an_hour_minute_by_minute():
    clock = task.Clock()
    clock.advance(1_800_000_000 - clock.seconds())
    perf = Performance(clock.seconds)
    for i in range(100):
        perf.observe("message_processed", processed(latency=0.001 + i * 0.0001, message_id=i))
    perf.observe("message_processed", processed(latency=0.9, message_id=500, pipeline=0.85))  # a slow one
    perf.observe("message_processed", processed(channel="oru", latency=0.004, message_id=600, status="ERROR"))
    perf.observe("delivery_sent", {"channel": "adt", "destination": "lab", "message_id": 1, "attempts": 1,
                                   "seconds": 0.003, "ack": "AA", "error": ""})
    perf.observe("delivery_retried", {"channel": "adt", "destination": "lab", "message_id": 2, "attempts": 1,
                                      "seconds": 5.0, "ack": "", "error": "timed out"})
    perf.observe("queue_state", {"channel": "adt", "destination": "lab", "depth": 7, "oldest_age": 12.5})
    perf.observe("queue_state", {"channel": "adt", "destination": "lab", "depth": 2, "oldest_age": 1.0})
    perf.observe("store_commit", {"seconds": 0.002, "size": 8})
    perf.observe("store_commit", {"seconds": 0.004, "size": 4})
    clock.advance(120)
    perf.observe("message_processed", processed(latency=0.002, message_id=700))
    view = perf.view()
    adt = view["channels"]["adt"]
    assert adt["messages"] == 102 and adt["errors"] == 0 and view["channels"]["oru"]["errors"] == 1
    assert adt["chart"][-3] == 101 and adt["chart"][-1] == 1 and len(adt["chart"]) == 60
    assert 0.9 * 1000 <= adt["ack_ms"]["max"] <= 0.9 * 1000 * 1.13 and adt["ack_ms"]["p50"] < 10
    assert set(adt["stages_ms"]) == {"pipeline", "store"}
    [lab] = view["destinations"]
    assert (lab["sent"], lab["retried"], lab["failed"]) == (1, 1, 0) and lab["round_trip_ms"]["max"] >= 5000
    assert lab["queue"] == {"depth_max": 7, "oldest_age_max": 12.5, "depth": 2, "oldest_age": 1.0}
    assert view["store"]["commits"] == 2 and view["store"]["batch_average"] == 6
    slowest = view["slowest"]
    assert len(slowest) == 10 and slowest[0]["message_id"] == 500 and slowest[0]["stages_ms"]["pipeline"] == 850
    assert [r["ack_ms"] for r in slowest] == sorted((r["ack_ms"] for r in slowest), reverse=True)
    assert perf.view(minutes=1)["channels"]["adt"]["messages"] == 1  # only this minute
    assert set(perf.view(channel="oru")["channels"]) == {"oru"}
    clock.advance(3600)
    perf.observe("message_processed", processed(message_id=800))
    assert perf.view()["channels"]["adt"]["messages"] == 1 and len(perf.minutes) == 1  # an hour on, the rest is gone


def test_hl7relay_stats_from_a_running_engine(tmp_path, running_engine):
    import socket

    from hl7relay.mllp.framing import MLLPFramer, frame

    running = running_engine(tmp_path, "--admin-port", "auto", "--console-port", "0")
    try:
        with socket.create_connection(("127.0.0.1", running.mllp_port)) as pms:
            for i in range(5):
                pms.sendall(frame(f"MSH|^~\\&|PMS|C|||20240101||ADT^A08|S{i}|P|2.5\rEVN|A08\rPID|1||1\r".encode()))
                framer, got = MLLPFramer(), []
                while not got:
                    got = framer.feed(pms.recv(65536))
        result = subprocess.run([sys.executable, "-m", "hl7relay", "stats", "--minutes", "5"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "adt: 5 message(s)" in result.stdout and "ACK p50" in result.stdout and "pipeline" in result.stdout
        assert "slowest messages:" in result.stdout and "store: " in result.stdout
        data = json.loads(subprocess.run([sys.executable, "-m", "hl7relay", "stats", "--format", "json"], cwd=tmp_path,
                                         capture_output=True, text=True, timeout=60).stdout)
        assert data["channels"]["adt"]["messages"] == 5 and data["minutes"] == 60
        bad = subprocess.run([sys.executable, "-m", "hl7relay", "stats", "--channel", "nope"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "404" in bad.stderr and "no channel 'nope'" in bad.stderr
    finally:
        assert running.stop() == 0


@pytest.mark.parametrize("minutes", ["0", "61", "x"])
def test_minutes_out_of_range(capsys, minutes):
    from hl7relay.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["stats", "--minutes", minutes])
    assert exit_.value.code == 2
