"""The message tracer: attached only while someone traces, filtered, bounded, over the API and the CLI."""

import json
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from twisted.internet import task

from hl7relay.ops.trace import BUFFER_ROWS, MAX_SESSIONS, Tracer

ADT = "MSH|^~\\&|PMS|CLINIC|HL7RELAY|LAB|20240105||{type}|{id}|P|2.5.1\rEVN|A01|20240105\rPID|1||7^^^H^MR||DOE^JANE\rPV1|1|O\r"


def processed(channel="adt", message_id=1, message_type="ADT^A01", control_id="C1", status="PROCESSED"):
    return {"channel": channel, "status": status, "ack_codes": ["AA"], "ack_latency": 0.0021, "stages": {},
            "message_id": message_id, "message_type": message_type, "control_id": control_id, "peer": "10.0.0.5:4000"}


def sent(channel="adt", destination="lab", message_id=1, event="delivery_sent"):
    return event, {"channel": channel, "destination": destination, "message_id": message_id, "attempts": 1,
                   "seconds": 0.0012, "ack": "AA", "error": ""}


class Subscriptions:
    """The event bus as the tracer sees it: who listens to which events, and emit()."""

    def __init__(self):
        self.registered = []  # (observer, the events it wants)

    @property
    def observers(self):
        return [observer for observer, _ in self.registered]

    def subscribe(self, observer, events=None):
        self.registered.append((observer, events))

    def unsubscribe(self, observer):
        self.registered = [(o, e) for o, e in self.registered if o != observer]

    def emit(self, event, fields):
        for observer, events in self.registered:
            if events is None or event in events:
                observer(event, fields)


def test_the_tracer_listens_only_while_a_trace_is_open():
    clock, subs = task.Clock(), Subscriptions()
    tracer = Tracer(clock, subs.subscribe, subs.unsubscribe)
    assert subs.observers == []  # nobody traces: no observer, no cost
    session = tracer.start("user:ana", seconds=60)
    assert subs.observers == [tracer._inbound, tracer._outbound, tracer._file]  # message_processed; delivery_*; file_read
    subs.emit("message_processed", processed())
    clock.advance(61)
    subs.emit("message_processed", processed(message_id=2))  # after its end: not recorded, and it detaches
    assert subs.observers == [] and [r["message_id"] for r in session.read(0)] == [1]
    assert tracer.get(session.id).view(clock.seconds())["done"]  # still readable a minute after its end
    clock.advance(60)
    with pytest.raises(KeyError):
        tracer.get(session.id)
    again = tracer.start("user:ana", seconds=60)
    tracer.stop(again.id)
    assert subs.observers == [] and tracer.get(again.id).view(clock.seconds())["done"]


def test_rows_are_filtered_by_direction_channel_destination_and_type():
    clock, subs = task.Clock(), Subscriptions()
    tracer = Tracer(clock, subs.subscribe, subs.unsubscribe)
    everything = tracer.start("a")
    inbound = tracer.start("a", direction="in", channel="adt", message_type="adt")
    to_lab = tracer.start("a", direction="out", destination="lab")
    a01 = tracer.start("a", message_type="ADT^A01")
    subs.emit("message_processed", processed(message_id=1, message_type="ADT^A01^ADT_A01"))
    subs.emit("message_processed", processed(message_id=2, message_type="ADT^A03", control_id="C2"))
    subs.emit("message_processed", processed(channel="oru", message_id=3, message_type="ORU^R01"))
    subs.emit(*sent(message_id=1))
    subs.emit(*sent(destination="archive", message_id=2, event="delivery_retried"))
    subs.emit("message_received", {"channel": "adt"})  # not a row
    assert [(r["direction"], r["message_id"]) for r in everything.read(0)] == [
        ("in", 1), ("in", 2), ("in", 3), ("out", 1), ("out", 2)]
    assert [r["message_id"] for r in inbound.read(0)] == [1, 2]
    assert [(r["destination"], r["status"], r["ack"], r["latency_us"]) for r in to_lab.read(0)] == [("lab", "SENT", "AA", 1200)]
    assert [(r["direction"], r["message_id"]) for r in a01.read(0)] == [("in", 1), ("out", 1)]
    out = everything.read(0)[3]  # an outbound row shows what came in under that id
    assert out["message_type"] == "ADT^A01^ADT_A01" and out["control_id"] == "C1" and [r["seq"] for r in everything.read(0)] == [1, 2, 3, 4, 5]
    first = everything.read(0)[0]
    assert first["peer"] == "10.0.0.5:4000" and first["ack"] == "AA" and first["latency_us"] == 2100 and "content" not in first
    assert abs(first["at_ms"] - time.time() * 1000) < 60_000 and everything.read(0)[3]["attempt"] == 1


def test_a_trace_of_api_calls_shows_their_method_url_and_status_and_nothing_else():
    clock, subs = task.Clock(), Subscriptions()
    tracer = Tracer(clock, subs.subscribe, subs.unsubscribe)
    api = tracer.start("a", kind="api", scope=({"pms-in"}, {("adt", "pms")}))
    subs.emit("message_processed", processed(message_id=1))  # an MLLP channel: not API
    subs.emit("message_processed", processed(channel="pms-in", message_id=2))
    subs.emit(*sent(message_id=1))  # to the MLLP lab
    event, fields = sent(destination="pms", message_id=2)
    subs.emit(event, dict(fields, ack="HTTP 201", peer="POST https://api.pms.example/v1/results"))
    rows = api.read(0)
    assert [(r["direction"], r["channel"], r["message_id"]) for r in rows] == [("in", "pms-in", 2), ("out", "adt", 2)]
    assert (rows[1]["peer"], rows[1]["ack"], rows[1]["latency_us"]) == ("POST https://api.pms.example/v1/results",
                                                                        "HTTP 201", 1200)
    with pytest.raises(ValueError):
        tracer.start("a", kind="fax")


def test_a_trace_of_files_shows_each_file_finished_beside_its_messages():
    clock, subs = task.Clock(), Subscriptions()
    tracer = Tracer(clock, subs.subscribe, subs.unsubscribe)
    files = tracer.start("a", kind="file", scope=({"nightly"}, set()))
    subs.emit("message_processed", processed(message_id=1))  # an MLLP channel's: not files
    subs.emit("message_processed", dict(processed(channel="nightly", message_id=2), peer="file:ADT.txt"))
    subs.emit("file_read", {"channel": "nightly", "file": "ADT.txt", "file_id": 7, "state": "errors", "messages": 120,
                            "errors": 1})
    rows = files.read(0)
    assert [(r["channel"], r["message_id"], r["peer"]) for r in rows] == [("nightly", 2, "file:ADT.txt"),
                                                                          ("nightly", None, "file:ADT.txt")]
    assert (rows[1]["message_type"], rows[1]["control_id"], rows[1]["status"], rows[1]["error"]) == (
        "FILE", "ADT.txt", "errors", "file 7: 120 messages, 1 as ERROR")


def test_a_slow_reader_loses_the_oldest_rows_never_the_engine_time():
    clock = task.Clock()
    subs = Subscriptions()
    tracer = Tracer(clock, subs.subscribe, subs.unsubscribe)
    session = tracer.start("a")
    for i in range(BUFFER_ROWS + 25):
        subs.emit("message_processed", processed(message_id=i))
    assert session.buffered == BUFFER_ROWS and session.dropped == 25
    assert session.read(0, 3)[0]["seq"] == 26 and session.read(BUFFER_ROWS + 20)[-1]["seq"] == BUFFER_ROWS + 25
    across = session.read(BUFFER_ROWS - 10, 20)  # a page across the ring's end, then on from its start
    assert [(r["seq"], r["message_id"]) for r in across] == [(s, s - 1) for s in range(BUFFER_ROWS - 9, BUFFER_ROWS + 11)]
    subs.emit("message_processed", processed(message_id=-1))  # the row it pushes out was read: not a loss
    assert session.dropped == 25


def test_a_row_leaves_no_object_the_garbage_collector_counts():
    """Under load, every object a row kept (a tuple, a dict) counted towards the next young
    collection; collections came ~3x as often and promoted the engine's in-flight objects until a
    full collection ran, which cost the engine more than the tracer's own code."""
    import gc

    subs = Subscriptions()

    tracer = Tracer(task.Clock(), subs.subscribe, subs.unsubscribe)
    tracer.start("a")
    tracer.start("b", direction="out")
    inbound = [processed(message_id=i, control_id=f"C{i}") for i in range(3000)]
    outbound = [sent(message_id=i) for i in range(3000)]
    for i in range(10):  # a first row of each kind
        subs.emit("message_processed", inbound[i])
        subs.emit(*outbound[i])
    gc.disable()
    try:
        before = gc.get_count()[0]
        for i in range(10, 3000):
            subs.emit("message_processed", inbound[i])
            subs.emit(*outbound[i])
        counted = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert counted < 100, counted  # a tuple kept per row: ~6,000


def test_what_a_trace_may_be():
    subs = Subscriptions()
    tracer = Tracer(task.Clock(), subs.subscribe, subs.unsubscribe)
    for kwargs, text in (({"seconds": 30}, "1 to 60 minutes"), ({"seconds": 3601}, "1 to 60 minutes"),
                         ({"direction": "sideways"}, "in, out or both"),
                         ({"direction": "in", "destination": "lab"}, "outbound")):
        with pytest.raises(ValueError, match=text):
            tracer.start("a", **kwargs)
    opened = [tracer.start("a") for _ in range(MAX_SESSIONS)]
    with pytest.raises(ValueError, match="open already"):
        tracer.start("a")
    tracer.stop(opened[0].id)  # an ended trace, still readable for a minute, frees its place at once
    tracer.start("a")


CHANNEL = """\
name: adt
source: {type: mllp, port: 0}
destinations: [{name: archive, type: file, directory: out}]
"""


def _send(port, count, start=0, kind="ADT^A01"):
    from hl7relay.mllp.framing import MLLPFramer, frame

    with socket.create_connection(("127.0.0.1", port)) as pms:
        for i in range(start, start + count):
            pms.sendall(frame(ADT.format(type=kind, id=f"T{i}").encode()))
            framer, got = MLLPFramer(), []
            while not got:
                got = framer.feed(pms.recv(65536))


@pytest.mark.parametrize("forwarding", ["inline", "process"])
def test_a_trace_over_the_api_and_the_cli(tmp_path, running_engine, forwarding):
    running = running_engine(tmp_path, "--admin-port", "auto", "--console-port", "0", "--forwarding", forwarding,
                             channel=CHANNEL)
    try:
        trace = subprocess.Popen([sys.executable, "-m", "hl7relay", "trace", "--minutes", "1", "--content"],
                                 cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started = trace.stderr.readline()
        assert "tracing both for 1 min" in started, started
        _send(running.mllp_port, 3)
        time.sleep(1.5)  # the CLI polls every half second
        trace.send_signal(signal.SIGTERM)
        out, err = trace.communicate(timeout=30)
        assert trace.returncode == 0 and "Traceback" not in err
        inbound = re.findall(r"IN  adt <- 127\.0\.0\.1:\d+  ADT\^A01 (T\d)  PROCESSED  ACK AA  [\d.]+ ms  #(\d+)", out)
        assert [c for c, _ in inbound] == ["T0", "T1", "T2"], out
        outbound = re.findall(r"OUT adt -> archive  ADT\^A01 (T\d)  SENT  ACK -  [\d.]+ ms  #(\d+)", out)
        assert sorted(outbound) == sorted(inbound), out
        assert "    PID|1||***" in out and "DOE^JANE" not in out  # the content, masked
        assert re.search(r"trace ended: 6 row\(s\)", err), err
        # over the API: a filtered trace, read by sequence, stopped
        from hl7relay.cli._api import call_engine

        settings = {"admin": {"port": 1, "host": "127.0.0.1"}, "data_dir": str(tmp_path / "data")}
        status, session = call_engine(settings, "POST", "/api/v1/traces",
                                      {"direction": "in", "message_type": "ADT^A08", "minutes": 1})
        assert status == 200 and session["message_type"] == "ADT^A08"
        _send(running.mllp_port, 2, start=10, kind="ADT^A08")
        _send(running.mllp_port, 1, start=20, kind="ADT^A01")
        status, page = call_engine(settings, "GET", f"/api/v1/traces/{session['id']}?after=0")
        rows = [dict(zip(page["columns"], values)) for values in page["rows"]]  # compact: columns once, rows as lists
        assert [r["control_id"] for r in rows] == ["T10", "T11"] and page["trace"]["dropped"] == 0
        status, page = call_engine(settings, "GET", f"/api/v1/traces/{session['id']}?after={rows[0]['seq']}")
        assert [dict(zip(page["columns"], values))["control_id"] for values in page["rows"]] == ["T11"]
        assert call_engine(settings, "POST", f"/api/v1/traces/{session['id']}/stop")[1]["done"]
        status, error = call_engine(settings, "POST", "/api/v1/traces", {"minutes": 0.5})
        assert status == 400 and "1 to 60 minutes" in error["error"]
        status, error = call_engine(settings, "POST", "/api/v1/traces", {"channel": "nope"})
        assert status == 400 and "no channel 'nope'" in error["error"]
        assert [e["action"] for e in running.store.audit_entries(action="trace.")].count("trace.start") == 2
        json_out = subprocess.run([sys.executable, "-m", "hl7relay", "trace", "--minutes", "0.5"], cwd=tmp_path,
                                  capture_output=True, text=True, timeout=60)
        assert json_out.returncode == 2 and "1 to 60 minutes" in json_out.stderr
    finally:
        assert running.stop() == 0


def test_the_row_format_in_json():
    from hl7relay.cli.trace import _print

    class Args:
        format = "json"

    import io
    import contextlib

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        _print({"seq": 1, "direction": "in", "message_id": 4}, Args())
    assert json.loads(buffer.getvalue()) == {"seq": 1, "direction": "in", "message_id": 4}
