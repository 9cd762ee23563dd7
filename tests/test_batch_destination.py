"""The batch destination: messages gathered into FHS/BHS ... BTS/FTS files, written whole; SENT
only once the file has its name; a failed write retried whole; a crash leaves the deliveries
QUEUED for a batch after the restart; never a partial file, never one written over."""

from __future__ import annotations

import textwrap

import pytest
from twisted.internet import defer, task

from hl7relay.channels import load_channel
from hl7relay.hl7.batch import split_messages
from hl7relay.hl7.message import Message
from hl7relay.runtime import Engine
from hl7relay.store.database import Store
from hl7relay.store.writer import StoreWriter

ADT = ("MSH|^~\\&|PMS|CLINIC|HL7RELAY|LAB|20240105093512||ADT^A04^ADT_A01|{id}|P|2.5.1\r"
       "EVN|A04|20240105093512\rPID|1||{id}^^^CLINIC^MR||DOE^JANE\rPV1|1|O\r")


class BatchEngine:
    def __init__(self, tmp_path, options: str = ""):
        self.out = tmp_path / "out"
        path = tmp_path / "ch.yaml"
        settings = {"max_messages": "3", "max_age": "60", "retry_initial": "5", "retry_max": "5"}
        for item in filter(None, (o.strip() for o in options.split(", "))):
            key, value = item.split(": ", 1)
            settings[key] = value
        listed = ", ".join(f"{k}: {v}" for k, v in settings.items())
        path.write_text(textwrap.dedent(f"""\
            name: ch
            source: {{type: file, directory: '{tmp_path / "inbox"}'}}
            destinations:
              - {{name: results, type: batch, directory: '{self.out}', {listed}}}
            """))
        self.channel, errors = load_channel(path, {})
        assert not errors, errors
        self.store = Store(f"sqlite:///{tmp_path / 's.db'}")
        self.store.migrate()
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.engine = Engine([self.channel], StoreWriter(self.store, executor=lambda fn, *a: defer.maybeDeferred(fn, *a)),
                             reactor=self.clock, clock=self.clock.seconds)
        self.engine.start()

    def send(self, *ids):
        for control_id in ids:
            self.engine.handle(self.channel, Message(ADT.format(id=control_id)), "10.0.0.1:1")
        self.clock.advance(0)  # the queue takes them on the next turn

    def statuses(self) -> dict:
        return {m["control_id"]: self.store.get_message(m["id"])["deliveries"][0]["status"] for m in self.store.latest(100)}

    def files(self) -> list:
        return sorted(p.name for p in self.out.iterdir()) if self.out.exists() else []

    def batch(self, name: str) -> list[str]:
        split = split_messages((self.out / name).read_bytes())
        assert not split.problems, split.problems  # FHS/BHS, BTS-1 and FTS-1 agree with what is in it
        return [Message.from_bytes(c.data).control_id for c in split.messages]


def test_a_batch_is_written_at_max_messages_or_max_age_and_only_then_sent(tmp_path):
    batches = BatchEngine(tmp_path)
    batches.send("B1", "B2")
    assert batches.files() == [] and set(batches.statuses().values()) == {"QUEUED"}
    batches.send("B3", "B4")  # the third fills the batch: written, its three SENT
    [first] = batches.files()
    assert batches.batch(first) == ["B1", "B2", "B3"]
    assert batches.statuses() == {"B1": "SENT", "B2": "SENT", "B3": "SENT", "B4": "QUEUED"}
    delivery = batches.store.get_message(batches.store.latest(4)[-1]["id"])["deliveries"][0]
    assert delivery["last_ack"] == f"in {first} (batch of 3)"
    batches.clock.advance(59)
    assert len(batches.files()) == 1
    batches.clock.advance(1)  # B4 waited max_age
    assert len(batches.files()) == 2 and batches.statuses()["B4"] == "SENT"
    second = [f for f in batches.files() if f != first][0]
    assert batches.batch(second) == ["B4"]
    batches.send("C1", "C2", "C3", "C4", "C5", "C6")  # two batches in one second: the second never over the first
    third, fourth = [f for f in batches.files() if f not in (first, second)]
    assert (third, fourth) == (second.replace(".hl7", ".1.hl7"), second.replace(".hl7", ".2.hl7"))
    assert batches.batch(third) == ["C1", "C2", "C3"] and batches.batch(fourth) == ["C4", "C5", "C6"]
    text = (batches.out / first).read_bytes().decode()
    assert text.startswith("FHS|^~\\&|PMS|CLINIC|HL7RELAY|LAB|") and "\rBTS|3\rFTS|1\r" in text
    assert not [p for p in batches.out.iterdir() if p.name.startswith(".")]  # no .part left


def test_a_batch_that_cannot_be_written_is_retried_whole_and_written_once(tmp_path):
    batches = BatchEngine(tmp_path)
    batches.out.parent.mkdir(exist_ok=True)
    batches.out.write_text("not a folder")  # the disk says no
    batches.send("F1", "F2", "F3")
    assert set(batches.statuses().values()) == {"QUEUED"}
    attempts = batches.store.get_message(batches.store.latest(1)[0]["id"])["deliveries"][0]
    assert "the batch could not be written" in attempts["last_error"]
    batches.out.unlink()  # room again
    batches.clock.advance(5)  # the retries come back as one batch, in order
    [name] = batches.files()
    assert batches.batch(name) == ["F1", "F2", "F3"] and set(batches.statuses().values()) == {"SENT"}


def test_a_flush_schedule_writes_what_has_gathered_at_its_times(tmp_path):
    batches = BatchEngine(tmp_path, "max_age: 86400, flush: '0 2 * * *'")  # 2023-11-14 22:13:20 UTC now
    batches.send("N1")
    batches.clock.advance(3 * 3600)
    assert batches.files() == []
    batches.clock.advance(2 * 3600)  # 02:00 has passed
    [name] = batches.files()
    assert batches.batch(name) == ["N1"]


def test_stopping_writes_the_batch_it_holds_at_once(tmp_path):
    batches = BatchEngine(tmp_path, "max_age: 3600")
    batches.send("S1", "S2")
    stopped = batches.engine.stop()
    batches.clock.advance(1)
    report = []
    stopped.addCallback(report.append)
    assert report and report[0].clean and len(batches.files()) == 1 and batches.batch(batches.files()[0]) == ["S1", "S2"]


@pytest.mark.parametrize("options, expected", [
    ("max_messages: 0", "max_messages must be between 1 and 1000"),
    ("filename: '{MSH-10}.hl7'", "a name with {now:FORMAT} only"),
    ("flush: 'at two'", "cron: 'at two' is not a cron expression"),
    ("parallel: 4", "unknown key 'parallel'"),
])
def test_wrong_batch_options_are_lint_errors(tmp_path, options, expected):
    path = tmp_path / "ch.yaml"
    path.write_text(f"name: ch\nsource: {{type: mllp, port: 0}}\ndestinations: [{{name: b, type: batch, directory: out, "
                    f"{options}}}]\n")
    _channel, errors = load_channel(path, {})
    assert errors and expected in str(errors[0]), errors


def test_kill_9_with_a_batch_gathering_then_restart_writes_it_whole_once(tmp_path):
    """Nothing of a batch is on disk under its name before it is whole: after kill -9 its
    deliveries are QUEUED, and the restarted engine writes them, each once, in one batch."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    from hl7relay.mllp.framing import MLLPFramer, frame

    out, channels, data = tmp_path / "out", tmp_path / "channels", tmp_path / "data"
    channels.mkdir()

    def channel(max_age: int):
        (channels / "ch.yaml").write_text(
            f"name: ch\nsource: {{type: mllp, port: 0}}\ndestinations: [{{name: results, type: batch, directory: '{out}', "
            f"max_messages: 1000, max_age: {max_age}}}]\n")

    def start(log):
        process = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--channels", str(channels), "--data-dir",
                                    str(data), "--admin-port", "0", "--console-port", "0"], cwd=tmp_path,
                                   stdout=open(tmp_path / log, "w"), stderr=subprocess.STDOUT,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.monotonic() + 60
        while "MLLP on 127.0.0.1:" not in (tmp_path / log).read_text():
            assert time.monotonic() < deadline and process.poll() is None, (tmp_path / log).read_text()
            time.sleep(0.05)
        return process, int((tmp_path / log).read_text().split("MLLP on 127.0.0.1:")[1].split()[0])

    channel(3600)
    engine, port = start("engine1.log")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as pms:
            framer = MLLPFramer()
            for n in range(40):
                pms.sendall(frame(ADT.format(id=f"K{n:02d}").encode()))
                got = []
                while not got:
                    got = framer.feed(pms.recv(65536))
        engine.send_signal(signal.SIGKILL)
        engine.wait(timeout=30)
        assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]
        channel(1)
        engine, _ = start("engine2.log")
        deadline = time.monotonic() + 60
        while not (out.exists() and [p for p in out.iterdir() if not p.name.startswith(".")]):
            assert time.monotonic() < deadline, "no batch after the restart"
            time.sleep(0.1)
        time.sleep(1.5)  # another batch, if a delivery were sent twice, would be written by now
        files = [p for p in out.iterdir()]
        assert len(files) == 1, files
        ids = [Message.from_bytes(c.data).control_id for c in split_messages(files[0].read_bytes()).messages]
        assert ids == [f"K{n:02d}" for n in range(40)]
    finally:
        engine.send_signal(signal.SIGTERM)
        assert engine.wait(timeout=60) == 0
