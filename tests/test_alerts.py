"""Alerts without Prometheus: conditions, pending -> firing -> resolved, de-duplication, silences;
notified by webhook and e-mail to receivers started here, in a real destination outage."""

import json
import re
import socket
import socketserver
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from twisted.internet import defer, task

from hl7relay.controls import Controls
from hl7relay.ops.alerts import Alerts, AlertSettings
from hl7relay.ops.notify import describe
from hl7relay.ops.perf import Performance


class FakeQueue:
    def __init__(self, **view):
        self.state = {"depth": 0, "oldest_age": None, "connected": None, "paused": False, **view}

    def view(self):
        return dict(self.state)


class FakeRunning:
    def __init__(self, queues):
        self.queues = queues


class FakeEngine:
    def __init__(self, clock, queues):
        self.reactor = clock
        self.channels = {"adt": FakeRunning(queues)}
        self.performance = Performance(clock.seconds)
        self.writer = type("W", (), {"commit_failure": None})()
        self.sources = {}  # channel -> its source's view (a poller's)

    def source_views(self):
        return self.sources


class Recorder:
    label = "recorder"

    def __init__(self):
        self.sent = []

    def notify(self, alert, status):
        self.sent.append((status, alert["rule"], alert["destination"]))
        return defer.succeed(None)


def setup(**settings):
    clock = task.Clock()
    clock.advance(1_800_000_000)
    lab = FakeQueue()
    engine = FakeEngine(clock, {"lab": lab})
    recorder = Recorder()
    alerts = Alerts(Controls(engine, performance=engine.performance), AlertSettings(notifiers=[recorder], **settings),
                    clock.seconds)
    return clock, lab, engine, recorder, alerts


def test_an_outage_goes_pending_then_fires_once_then_resolves():
    clock, lab, engine, recorder, alerts = setup()
    lab.state["connected"] = False
    assert alerts.evaluate() == [] and alerts.view()["alerts"][0]["state"] == "pending"  # not for 5 minutes yet
    clock.advance(299)
    alerts.evaluate()
    assert recorder.sent == []
    clock.advance(1)
    [(status, view)] = alerts.evaluate()
    assert status == "firing" and view["summary"] == "adt -> lab cannot be reached" and view["severity"] == "page"
    for _ in range(10):  # still down: told once
        clock.advance(15)
        alerts.evaluate()
    assert recorder.sent == [("firing", "HL7RelayDestinationDown", "lab")]
    clock.advance(4 * 3600)  # ... and again after repeat_every
    alerts.evaluate()
    assert recorder.sent[-1] == ("firing", "HL7RelayDestinationDown", "lab") and len(recorder.sent) == 2
    lab.state["connected"] = True
    [(status, view)] = alerts.evaluate()
    assert status == "resolved" and recorder.sent[-1] == ("resolved", "HL7RelayDestinationDown", "lab")
    assert alerts.view()["alerts"] == [] and alerts.view()["resolved"][0]["rule"] == "HL7RelayDestinationDown"
    lab.state["connected"] = False  # a blip shorter than its hold never fires, and never resolves aloud
    alerts.evaluate()
    lab.state["connected"] = True
    alerts.evaluate()
    assert len(recorder.sent) == 3


def test_each_condition():
    clock, lab, engine, recorder, alerts = setup(hold={"HL7RelayQueueStuck": 0, "HL7RelayQueueGrowing": 0,
                                                       "HL7RelayErrorRate": 0, "HL7RelaySlowAcks": 0})
    lab.state.update(depth=1500, oldest_age=900.0, paused=True, connected=False)  # paused: down is not an outage
    perf = engine.performance
    for i in range(20):
        perf.observe("message_processed", {"channel": "adt", "status": "ERROR" if i < 2 else "PROCESSED",
                                           "ack_codes": ["AA"], "ack_latency": 0.9, "stages": {}, "message_id": i})
    perf.observe("delivery_failed", {"channel": "adt", "destination": "lab", "message_id": 1, "seconds": 0.1})
    engine.writer.commit_failure = "disk I/O error"
    fired = {view["rule"]: view["value"] for status, view in alerts.evaluate()}
    slow = fired.pop("HL7RelaySlowAcks")
    assert fired == {"HL7RelayQueueStuck": 900.0, "HL7RelayQueueGrowing": 1500, "HL7RelayErrorRate": 0.1,
                     "HL7RelayDeadLetters": 1.0, "HL7RelayStoreFailing": 0.0}
    assert 0.9 <= slow <= 0.9 * 1.13  # the p99, read within its latency bucket
    summaries = {view["rule"]: view["summary"] for view in alerts.view()["alerts"]}
    assert summaries["HL7RelayErrorRate"] == "adt: 10% of messages end in ERROR"
    assert summaries["HL7RelayQueueStuck"] == "adt -> lab: the oldest queued message is 900s old"
    order = [v["severity"] for v in alerts.view()["alerts"]]
    assert order == sorted(order, key=lambda s: s != "page")  # pages first


def test_a_silence_keeps_it_quiet_but_visible():
    clock, lab, engine, recorder, alerts = setup(hold={"HL7RelayDestinationDown": 0})
    entry = alerts.silence("HL7RelayDestinationDown", "adt", "lab", 3600, "user:ana", "lab maintenance")
    assert entry["until"] == clock.seconds() + 3600
    lab.state["connected"] = False
    [(status, view)] = alerts.evaluate()
    assert view["silenced_until"] == entry["until"] and recorder.sent == []
    lab.state["connected"] = True
    alerts.evaluate()
    assert recorder.sent == []  # never told firing: no resolved notice either
    for bad, text in ((("Nope", None, None, 3600, "a", "r"), "no alert rule"),
                      (("HL7RelayDestinationDown", None, "lab", 3600, "a", "r"), "with its channel"),
                      (("HL7RelayDestinationDown", "adt", None, 10, "a", "r"), "1 minute to 7 days"),
                      (("HL7RelayDestinationDown", "adt", None, 3600, "a", " "), "needs a reason")):
        with pytest.raises(ValueError, match=text):
            alerts.silence(*bad)
    assert alerts.unsilence("HL7RelayDestinationDown", "adt", "lab") is True
    assert alerts.unsilence("HL7RelayDestinationDown", "adt", "lab") is False  # no such silence any more
    alerts.silence("HL7RelayDestinationDown", None, None, 60, "a", "everywhere")
    lab.state["connected"] = False
    alerts.evaluate()
    assert recorder.sent == []  # silenced everywhere
    lab.state["connected"] = True
    alerts.evaluate()
    clock.advance(61)
    lab.state["connected"] = False
    alerts.evaluate()
    assert recorder.sent == [("firing", "HL7RelayDestinationDown", "lab")]  # the silence ended
    assert alerts.view()["silences"] == []


def test_a_notification_never_carries_content():
    subject, text = describe({"rule": "HL7RelayDeadLetters", "severity": "warn", "channel": "adt", "destination": "lab",
                              "since": 0, "summary": "adt -> lab: 3 deliveries went to ERROR"}, "firing")
    assert subject == "[hl7relay] FIRING: HL7RelayDeadLetters adt -> lab"
    assert "hl7relay alerts silence HL7RelayDeadLetters --channel adt --destination lab" in text


# -- a real outage, real receivers ----------------------------------------------------------------------
class Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        Hook.received.append((json.loads(self.rfile.read(int(self.headers["Content-Length"]))), self.headers["X-Token"]))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


class SMTPHandler(socketserver.StreamRequestHandler):
    """Just enough SMTP to take a message: EHLO, MAIL, RCPT, DATA, QUIT."""

    mails: list = []

    def handle(self):
        self.wfile.write(b"220 test ESMTP\r\n")
        envelope = {"to": []}
        while True:
            line = self.rfile.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                self.wfile.write(b"250 test\r\n")
            elif verb == b"MAIL":
                envelope["from"] = line.decode().split(":", 1)[1].strip()
                self.wfile.write(b"250 ok\r\n")
            elif verb == b"RCPT":
                envelope["to"].append(line.decode().split(":", 1)[1].strip())
                self.wfile.write(b"250 ok\r\n")
            elif verb == b"DATA":
                self.wfile.write(b"354 go on\r\n")
                data = b""
                while not data.endswith(b"\r\n.\r\n"):
                    data += self.rfile.readline()
                SMTPHandler.mails.append(dict(envelope, data=data.decode()))
                envelope = {"to": []}
                self.wfile.write(b"250 queued\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 ok\r\n")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_real_outage_fires_and_resolves_by_webhook_and_email(tmp_path, running_engine):
    hook = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    smtp = socketserver.ThreadingTCPServer(("127.0.0.1", 0), SMTPHandler)
    for server in (hook, smtp):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    lab_port = _free_port()
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "hl7relay.yaml").write_text(textwrap.dedent(f"""\
        alerts:
          evaluate_every: 0.3
          hold: {{HL7RelayDestinationDown: 0.5}}
          webhook: {{url: "http://127.0.0.1:{hook.server_address[1]}/hook", headers: {{X-Token: s3cret}}}}
          email: {{host: 127.0.0.1, port: {smtp.server_address[1]}, security: none, from: hl7relay@clinic.example,
                   to: [oncall@clinic.example], channels: {{adt: [lab-team@clinic.example]}}}}
        """))
    channel = ("name: adt\nsource: {type: mllp, port: 0}\n"
               f"destinations: [{{name: lab, type: mllp, host: 127.0.0.1, port: {lab_port}, retry_initial: 0.5, "
               "retry_max: 0.5, connect_timeout: 1}]\n")
    running = running_engine(tmp_path, "--admin-port", "auto", "--console-port", "0", channel=channel)
    receiver = None
    try:
        with socket.create_connection(("127.0.0.1", running.mllp_port)) as pms:
            pms.sendall(b"\x0bMSH|^~\\&|PMS|C|||20240101||ADT^A08|AL1|P|2.5\rEVN|A08\rPID|1||1\r\x1c\r")
            assert b"MSA|AA" in pms.recv(65536)

        def wait_for(condition, seconds=30):
            deadline = time.time() + seconds
            while time.time() < deadline and not condition():
                time.sleep(0.1)
            return condition()

        assert wait_for(lambda: any(body["status"] == "firing" for body, _ in Hook.received))
        body, token = next((b, t) for b, t in Hook.received if b["status"] == "firing")
        assert token == "s3cret" and body["rule"] == "HL7RelayDestinationDown" and body["destination"] == "lab"
        assert body["subject"] == "[hl7relay] FIRING: HL7RelayDestinationDown adt -> lab"
        assert wait_for(lambda: SMTPHandler.mails)
        mail = SMTPHandler.mails[0]
        assert mail["from"] == "<hl7relay@clinic.example>"
        assert sorted(mail["to"]) == ["<lab-team@clinic.example>", "<oncall@clinic.example>"]
        assert "Subject: [hl7relay] FIRING: HL7RelayDestinationDown adt -> lab" in mail["data"]
        status = subprocess.run([sys.executable, "-m", "hl7relay", "status"], cwd=tmp_path, capture_output=True,
                                text=True, timeout=60)
        assert "alerts (the running engine):" in status.stdout and "FIRING   page HL7RelayDestinationDown" in status.stdout
        listed = subprocess.run([sys.executable, "-m", "hl7relay", "alerts"], cwd=tmp_path, capture_output=True,
                                text=True, timeout=60)
        assert "adt -> lab cannot be reached" in listed.stdout and "webhook http://127.0.0.1" in listed.stdout
        # the lab comes back: the queue delivers, the alert resolves, both receivers hear it
        receiver = subprocess.Popen([sys.executable, "-m", "hl7relay", "listen", "--port", str(lab_port)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert wait_for(lambda: any(body["status"] == "resolved" for body, _ in Hook.received))
        assert wait_for(lambda: any("RESOLVED" in m["data"] for m in SMTPHandler.mails))
        assert [b["status"] for b, _ in Hook.received] == ["firing", "resolved"]  # once each: de-duplicated
        silenced = subprocess.run([sys.executable, "-m", "hl7relay", "alerts", "silence", "HL7RelayDeadLetters",
                                   "--channel", "adt", "--minutes", "30", "--reason", "replaying by hand"],
                                  cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert silenced.returncode == 0 and "HL7RelayDeadLetters for adt: silenced until" in silenced.stdout
        entry = running.store.audit_entries(action="alert.")[0]
        assert entry["action"] == "alert.silence" and entry["reason"] == "replaying by hand"
        wrong = subprocess.run([sys.executable, "-m", "hl7relay", "alerts", "silence", "Nope", "--reason", "x"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert wrong.returncode == 1 and "no alert rule 'Nope'" in wrong.stderr
    finally:
        if receiver is not None:
            receiver.terminate()
            receiver.wait(30)
        assert running.stop() == 0
        hook.shutdown()
        smtp.shutdown()


def test_bad_alert_settings_are_positions(tmp_path, capsys, monkeypatch):
    from hl7relay.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(textwrap.dedent("""\
        alerts:
          hold: {HL7RelayDestinationDwn: 60}
          email: {host: smtp.example, from: a@b}
          webhook: {url: 42, timeot: 3}
        """))
    code = main(["run", "--config", "bad.yaml"])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 1 and "Traceback" not in text
    assert re.search(r"bad\.yaml:2:\d+: no alert rule 'HL7RelayDestinationDwn' \(did you mean 'HL7RelayDestinationDown'\)", text), text
    assert re.search(r"bad\.yaml:3:\d+: email needs recipients", text), text
    assert re.search(r"bad\.yaml:4:\d+: unknown key 'timeot'", text), text


def test_refused_credentials_page_at_once_and_a_long_rate_limit_warns():
    clock, lab, engine, recorder, alerts = setup()
    lab.state.update(held="401 Unauthorized: not authorised", paused=True, connected=True)
    [(status, view)] = alerts.evaluate()
    assert (status, view["rule"], view["severity"]) == ("firing", "HL7RelayNotAuthorised", "page")
    assert "hl7relay destination resume adt lab" in view["summary"]
    lab.state.update(held=None, paused=False, rate_limited_since=clock.seconds())
    assert [s for s, _ in alerts.evaluate()] == ["resolved"]  # resumed: the page resolves; the rate limit is pending
    clock.advance(599)
    assert alerts.evaluate() == []
    clock.advance(1)
    [(status, view)] = alerts.evaluate()
    assert view["rule"] == "HL7RelayRateLimited" and view["summary"].endswith("for 600s (it keeps answering 429/503)")


def test_a_file_that_has_not_come_pages_at_once_and_resolves_when_one_comes():
    clock, lab, engine, recorder, alerts = setup()
    engine.sources["adt"] = {"missing_since": clock.seconds() - 3700}
    [(status, view)] = alerts.evaluate()
    assert (status, view["rule"], view["severity"]) == ("firing", "HL7RelayFileMissing", "page")
    assert view["summary"] == "adt: the file due 3700s ago has not come (its source's expect:; hl7relay files)"
    engine.sources["adt"] = {"missing_since": None}
    assert [(s, v["rule"]) for s, v in alerts.evaluate()] == [("resolved", "HL7RelayFileMissing")]


def test_leases_changing_more_than_twenty_times_in_ten_minutes_warn():
    from hl7relay import events

    clock, lab, engine, recorder, alerts = setup()
    alerts.start()
    try:
        for _ in range(20):
            events.emit("lease_changed", change="taken", held=1, lease="queue:adt/lab/0")
        assert alerts.evaluate() == []  # a rebalance
        events.emit("lease_changed", change="lost", held=0, lease="queue:adt/lab/0")
        [(status, view)] = alerts.evaluate()
        assert (status, view["rule"], view["severity"]) == ("firing", "HL7RelayLeaseChurn", "warn")
        assert view["summary"].startswith("cluster: this node's leases changed 21 times in 10 minutes")
        clock.advance(601)  # the engine's own evaluation (started above) runs meanwhile
        alerts.evaluate()
        assert recorder.sent[-1] == ("resolved", "HL7RelayLeaseChurn", None)
    finally:
        alerts.stop()
