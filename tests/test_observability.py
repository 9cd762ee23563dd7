"""Metrics, admin endpoints, logs; the shipped alert rules and dashboard use only metrics that exist."""

import json
import re
from pathlib import Path

import pytest
import yaml
from twisted.internet import defer, task
from twisted.logger import LogLevel
from twisted.web.test.requesthelper import DummyRequest

from hl7relay import events
from hl7relay.controls import Controls
from hl7relay.ops.admin import AdminSite
from hl7relay.logs import ChannelLevels
from hl7relay.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent


def exposed_names(metrics: Metrics) -> set:
    names = set()
    for family in metrics.registry.collect():
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count", "_created")}
        else:
            names.add(family.name)
    return names


def used_names(text: str) -> set:
    return set(re.findall(r"\bhl7relay_[a-z_]+", text))


def test_every_metric_the_alerts_and_dashboard_use_exists():
    names = exposed_names(Metrics())
    rules = yaml.safe_load((REPO / "config" / "prometheus" / "hl7relay-alerts.yml").read_text())
    expressions = " ".join(rule["expr"] for group in rules["groups"] for rule in group["rules"])
    dashboard = json.loads((REPO / "config" / "grafana" / "hl7relay-dashboard.json").read_text())
    queries = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for used in (used_names(expressions), used_names(queries)):
        assert used and used <= names, used - names
    assert {"HL7RelayQueueStuck", "HL7RelayErrorRate", "HL7RelayDestinationDown"} <= {
        r["alert"] for g in rules["groups"] for r in g["rules"]}


def test_events_become_metrics():
    metrics = Metrics().install()
    try:
        events.emit("message_received", channel="adt")
        events.emit("message_processed", channel="adt", status="ERROR", ack_codes=["AE"], ack_latency=0.002,
                    stages={"pipeline": 0.0001, "store": 0.001})
        events.emit("delivery_retried", channel="adt", destination="lab")
        events.emit("queue_state", channel="adt", destination="lab", depth=7, oldest_age=42.0)
        events.emit("connection_opened", listener="adt")
        events.emit("store_commit", seconds=0.0004, size=8)
        text = metrics.render().decode()
    finally:
        metrics.uninstall()
    for line in ('hl7relay_messages_received_total{channel="adt"} 1.0', 'hl7relay_messages_errored_total{channel="adt"} 1.0',
                 'hl7relay_messages_acked_total{channel="adt",code="AE"} 1.0',
                 'hl7relay_deliveries_retried_total{channel="adt",destination="lab"} 1.0',
                 'hl7relay_queue_depth{channel="adt",destination="lab"} 7.0',
                 'hl7relay_queue_oldest_age_seconds{channel="adt",destination="lab"} 42.0',
                 'hl7relay_open_connections{listener="adt"} 1.0', "hl7relay_store_batch_size_sum 8.0",
                 'hl7relay_ack_latency_seconds_count{channel="adt"} 1.0',
                 # buckets are cumulative and their bounds inclusive (le), as Prometheus defines them
                 'hl7relay_ack_latency_seconds_bucket{channel="adt",le="0.001"} 0.0',
                 'hl7relay_ack_latency_seconds_bucket{channel="adt",le="0.002"} 1.0',
                 'hl7relay_ack_latency_seconds_bucket{channel="adt",le="+Inf"} 1.0',
                 'hl7relay_ack_latency_seconds_sum{channel="adt"} 0.002',
                 'hl7relay_stage_latency_seconds_count{channel="adt",stage="store"} 1.0',
                 "hl7relay_store_commit_seconds_count 1.0"):
        assert line in text, line
    assert all(name.startswith("hl7relay_") for name in used_names(text) | {f.name for f in metrics.registry.collect()})


class _FakeStore:
    def __init__(self, ok=True):
        self.ok = ok

    def ping(self):
        if not self.ok:
            raise OSError("connection refused")
        return True


class _FakeWriter:
    commit_failure = None

    def __init__(self, ok):
        self.store = _FakeStore(ok)

    def read(self, fn, *args):
        return defer.maybeDeferred(fn, *args)


class _FakeEngine:
    def __init__(self, ok=True, started=True):
        self.writer = _FakeWriter(ok)
        self.reactor = task.Clock()
        self.started, self.stopping, self.channels = started, False, {}


def get(site, path):
    request = DummyRequest([path.encode()])
    resource = site.resource.getChildWithDefault(path.encode(), request)
    body = resource.render(request)
    if isinstance(body, bytes):
        request.write(body)
        request.finish()
    return request.responseCode or 200, b"".join(request.written).decode()


@pytest.mark.parametrize("engine, code, text", [
    (_FakeEngine(), 200, "ready"),
    (_FakeEngine(ok=False), 503, "store unreachable"),
    (_FakeEngine(started=False), 503, "starting"),
])
def test_readyz(engine, code, text):
    assert get(AdminSite(Controls(engine), Metrics()), "readyz")[0] == code
    assert text in get(AdminSite(Controls(engine), Metrics()), "readyz")[1]


def test_healthz_and_metrics_endpoints():
    site = AdminSite(Controls(_FakeEngine()), Metrics())
    assert get(site, "healthz") == (200, "ok\n")
    code, body = get(site, "metrics")
    assert code == 200 and "# HELP hl7relay_messages_received_total Messages received" in body


def test_channel_log_levels_and_trace():
    levels = ChannelLevels("warn", {"adt": "trace", "siu": "error"})

    def passes(**event):
        return levels(event).name == "yes"

    assert passes(log_level=LogLevel.debug, channel="adt", trace=True)
    assert not passes(log_level=LogLevel.debug, channel="oru", trace=True)
    assert not passes(log_level=LogLevel.info, channel="oru") and passes(log_level=LogLevel.warn, channel="oru")
    assert not passes(log_level=LogLevel.warn, channel="siu") and passes(log_level=LogLevel.error, channel="siu")
    # wants() (asked before a line is built) agrees with the filter for every level and channel
    twisted_levels = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}
    for channel in ("adt", "oru", "siu"):
        assert levels.wants(channel, "trace") == passes(log_level=LogLevel.debug, channel=channel, trace=True)
        for name, level in twisted_levels.items():
            assert levels.wants(channel, name) == passes(log_level=level, channel=channel), (channel, name)


def test_admin_binds_to_localhost_by_default():
    from hl7relay.cli._settings import resolve_settings

    class Args:
        config = None
        store = data_dir = None

    settings, _ = resolve_settings(Args())
    assert settings["admin"]["host"] == "127.0.0.1"


def test_readyz_goes_503_while_commits_fail_and_back_when_the_store_takes_writes(tmp_path):
    """/readyz stayed "ready" while every commit failed for lack of disk space."""
    from hl7relay.store.database import MessageRecord, Store, StoreError
    from hl7relay.store.writer import StoreWriter

    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.migrate()
    clock = task.Clock()
    writer = StoreWriter(store, clock, executor=lambda fn, *a: defer.maybeDeferred(fn, *a))
    engine = _FakeEngine()
    engine.writer, engine.reactor = writer, clock
    site = AdminSite(Controls(engine), Metrics())
    full = {"on": True}
    real_commit, real_probe = store.commit, store.probe_write

    def commit(records, updates):
        if full["on"]:
            raise StoreError("store commit failed: OperationalError: database or disk is full")
        return real_commit(records, updates)

    def probe_write():
        if full["on"]:
            raise StoreError("store write failed: database or disk is full")
        return real_probe()

    store.commit, store.probe_write = commit, probe_write
    failures = []
    for i in range(3):
        writer.write(MessageRecord("ch", b"MSH|", "PROCESSED", control_id=str(i))).addErrback(failures.append)
        clock.advance(0)
    assert len(failures) == 3
    code, body = get(site, "readyz")
    assert code == 503 and "store cannot commit" in body and "disk is full" in body
    full["on"] = False  # space freed: no message needs to arrive for readiness to come back
    code, body = get(site, "readyz")
    assert (code, body) == (200, "ready\n") and writer.commit_failure is None


def test_repeated_log_lines_are_bounded_and_summarised():
    """Log volume was in a sender's hands: one line per junk read, one per refused message."""
    from twisted.logger import LogLevel

    from hl7relay.logs import RepeatLimiter

    now = [0.0]
    written = []
    limiter = RepeatLimiter(written.append, limit=10, window=60, clock=lambda: now[0])
    junk = {"log_namespace": "hl7relay.listener", "log_level": LogLevel.warn,
            "log_format": "discarded {count} bytes outside MLLP frames from {peer}"}
    for i in range(3586 + 10):
        limiter(dict(junk, count=i, peer=f"10.0.0.{i % 200}:4000"))
    limiter({"log_namespace": "hl7relay.run", "log_level": LogLevel.info, "log_format": "something else"})
    assert len(written) == 11  # ten of the kind, and the other kind
    now[0] = 61.0
    limiter.flush()
    from twisted.logger import formatEvent

    summary = formatEvent(written[-1])
    assert summary.startswith("... 3,586 more like this in the last 61s (the last: discarded 3595 bytes")
    limiter(dict(junk, count=1, peer="x"))
    assert len(written) == 13  # a new window starts afresh


def _hold_store_lock(database, seconds: float):
    """Hold the store's engine lock as a stopping engine would, on a thread, until the returned
    event is set (the engine said it waits) or ``seconds`` passed: (thread, event)."""
    import fcntl
    import os
    import threading

    database.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(str(database) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    said = threading.Event()

    def release():
        said.wait(seconds)
        os.close(fd)

    thread = threading.Thread(target=release)
    thread.start()
    return thread, said


def test_json_log_lines_are_flat_objects_with_our_fields(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time

    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "ch.yaml").write_text("name: ch\nsource: {type: mllp, port: 0}\n")
    # another engine on the store is stopping: the wait for it is a JSON line too
    # (held until the engine says it waits: how long its start takes to get there is the machine's)
    waiting, said = _hold_store_lock(tmp_path / "data" / "hl7relay.db", seconds=20.0)
    process = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--channels", str(tmp_path / "channels"),
                                "--data-dir", str(tmp_path / "data"), "--admin-port", "0", "--log-format", "json",
                                "--console-port", "0"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            lines.append(line)
            if '"event": "waiting_for_store"' in line:
                said.set()
            if '"event": "ready"' in line:
                break
        port = int(next(json.loads(x)["text"] for x in lines if '"channel_started"' in x).split("127.0.0.1:")[1].split()[0])
        with socket.create_connection(("127.0.0.1", port)) as junk:
            for _ in range(30):
                junk.sendall(b"junk outside any frame")
                time.sleep(0.005)
    finally:
        said.set()
        process.send_signal(15)
        out, err = process.communicate(timeout=30)
        waiting.join()
    lines += err.splitlines()
    objects = [json.loads(line) for line in lines if line.strip()]
    assert [o["level"] for o in objects if o["event"] == "waiting_for_store"] == ["warn"]
    assert process.returncode == 0 and objects
    for obj in objects:
        assert {"time", "level", "logger", "event", "text"} <= set(obj) and not any(k.startswith("log_") for k in obj), obj
    events = [o["event"] for o in objects]
    assert events[:2] == ["waiting_for_store", "starting"] and "ready" in events and events[-1] != "" and "stopped" in events
    discarded = [o for o in objects if "outside MLLP frames" in o["text"]]
    assert 1 <= len(discarded) <= 10 and discarded[0]["peer"].startswith("127.0.0.1:")


def test_every_event_is_declared_emitted_as_declared_and_measured():
    """Events are typed: each emit() in the engine names a declared event with exactly its
    declared fields (checked from the source, since emit() itself does not check: hot path), and
    the metrics module has a handler for every declared event."""
    import ast
    from pathlib import Path

    from hl7relay.events import EVENTS

    root = Path(__file__).resolve().parent.parent
    emitted = {}
    for path in [*(root / "engine").rglob("*.py"), *(root / "ack").rglob("*.py"), *(root / "transformers").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "emit":
                assert node.args and isinstance(node.args[0], ast.Constant), f"{path}:{node.lineno}: emit() needs a literal name"
                name = node.args[0].value
                fields = {k.arg for k in node.keywords if k.arg}
                assert name in EVENTS, f"{path}:{node.lineno}: undeclared event {name!r}"
                if all(k.arg for k in node.keywords):  # **labels: checked where the dict is built
                    assert fields == EVENTS[name], f"{path}:{node.lineno}: {name} with {sorted(fields)}"
                emitted[name] = path
    assert set(emitted) == set(EVENTS), f"declared but never emitted: {set(EVENTS) - set(emitted)}"
    assert set(Metrics()._handlers) == set(EVENTS)


def test_an_observer_of_some_events_is_called_for_those_only():
    from hl7relay import events

    everything, some = [], []

    def all_of_them(event, fields):
        everything.append(event)

    def three(event, fields):
        some.append(event)

    events.subscribe(all_of_them)
    events.subscribe(three, events=("delivery_sent", "store_commit", "queue_state"))
    try:
        events.emit("message_received", channel="a")
        events.emit("delivery_sent", channel="a", destination="b")
        events.relay("store_commit", {"seconds": 0.1, "size": 1})
        events.emit("not_an_event_name", x=1)  # (checked elsewhere: the table is what is emitted)
    finally:
        events.unsubscribe(all_of_them)
        events.unsubscribe(three)
    assert everything == ["message_received", "delivery_sent", "store_commit", "not_an_event_name"]
    assert some == ["delivery_sent", "store_commit"]
    events.emit("delivery_sent", channel="a", destination="b")
    assert some == ["delivery_sent", "store_commit"]  # unsubscribed


def test_a_lifecycle_warning_is_one_line_on_standard_error_in_text_mode(capsys, monkeypatch):
    from hl7relay import logs as _logging

    monkeypatch.setitem(_logging._state, "format", "text")
    _logging.announce("console not started on 127.0.0.1:9103: in use", "console_not_started", "warn")
    _logging.announce("ready", "ready")
    out, err = capsys.readouterr()
    assert err == "warning: console not started on 127.0.0.1:9103: in use\n" and out == "ready\n"
