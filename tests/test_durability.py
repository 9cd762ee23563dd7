"""Nothing ACKed is ever lost: real processes, real sockets, a destination that is down, kill -9."""

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from hl7relay.mllp.framing import MLLPFramer, frame
from hl7relay.hl7.message import Message

MSG = ("MSH|^~\\&|PMS|CLINIC|LAB|LABFAC|20240105||ADT^A08^ADT_A01|{id}|P|2.5.1\r"
       "EVN|A08|20240105\rPID|1||{id}^^^H^MR||DOE^JANE\rPV1|1|O\r")


class Lab:
    """An MLLP receiver in the test: its socket is bound to port 0 at once, so the channel can
    name the port, but it only listens when told; until then connections are refused (the
    destination is down). Records the control ids it acknowledged, in order."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.received: list[str] = []
        self.lock = threading.Lock()
        self.closed = threading.Event()

    def start(self):
        self.socket.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed.is_set():
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection):
        from hl7relay.ack import build_ack

        framer = MLLPFramer()
        with connection:
            while not self.closed.is_set():
                try:
                    data = connection.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                for event in framer.feed(data):
                    message = Message.from_bytes(event.payload)
                    with self.lock:
                        self.received.append(message.control_id)
                    connection.sendall(frame(build_ack(message, "AA")))

    def ids(self):
        with self.lock:
            return list(self.received)

    def close(self):
        self.closed.set()
        self.socket.close()


def bound_port(log_path, timeout=30):
    """The port a process reported binding ("MLLP on 127.0.0.1:PORT") in its log."""
    found = []

    def seen():
        text = log_path.read_text() if log_path.exists() else ""
        if "MLLP on 127.0.0.1:" in text:
            found.append(int(text.split("MLLP on 127.0.0.1:")[1].split()[0]))
        return bool(found)

    wait_for(seen, timeout, f"a bound port in {log_path.name}")
    return found[0]


def start(*args, log):
    folder = os.path.dirname(log.name)  # run where the test's files are, away from the checkout's config/
    return subprocess.Popen([sys.executable, "-m", "hl7relay", *args], stdout=log, stderr=subprocess.STDOUT, cwd=folder,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def received_ids(log_path):
    """Control ids the `hl7relay listen` receiver printed (one line per message)."""
    ids = []
    for line in log_path.read_text().splitlines():
        parts = line.split()
        if len(parts) > 3 and "-> ACK" in line:
            ids.append(parts[3])
    return ids


def send_many(port, ids, acked, stop):
    """One MLLP connection sending ``ids`` in turn; records the ids answered AA."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            framer = MLLPFramer()
            for control_id in ids:
                if stop.is_set():
                    return
                connection.sendall(frame(MSG.format(id=control_id).encode()))
                events = []
                while not events:
                    data = connection.recv(65536)
                    if not data:
                        return
                    events = framer.feed(data)
                ack = Message.from_bytes(events[0].payload)
                if ack.get("MSA-1") == "AA" and ack.get("MSA-2") == control_id:
                    acked.append(control_id)
    except OSError:
        return  # the engine was killed under us: only what was ACKed counts


def write_channel(folder, engine_port, lab_port):
    folder.mkdir(exist_ok=True)
    (folder / "adt.yaml").write_text(textwrap.dedent(f"""\
        name: adt
        source: {{type: mllp, port: {engine_port}}}
        destinations:
          - {{name: lab, type: mllp, host: 127.0.0.1, port: {lab_port}, ack_timeout: 5, connect_timeout: 2,
              retry_initial: 0.2, retry_max: 1, max_attempts: 1000}}
        """))


def stored_ids(db):
    with sqlite3.connect(db) as connection:
        return [row[0] for row in connection.execute("SELECT control_id FROM messages")]


@pytest.fixture
def processes():
    running = []
    yield running
    for process in running:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


FORWARDING = pytest.mark.parametrize("forwarding", ["inline", "process"])


@FORWARDING
def test_destination_down_then_up_every_message_delivered(tmp_path, processes, forwarding):
    lab = Lab()  # bound, not listening: down
    write_channel(tmp_path / "channels", 0, lab.port)
    engine_log = tmp_path / "engine.log"
    engine = start("run", "--channels", str(tmp_path / "channels"), "--data-dir", str(tmp_path / "data"),
                   "--admin-port", "0", "--console-port", "0", "--forwarding", forwarding, log=open(engine_log, "w"))
    processes.append(engine)
    engine_port = bound_port(engine_log)
    try:
        acked = []
        send_many(engine_port, [f"D{i:03d}" for i in range(30)], acked, threading.Event())
        assert len(acked) == 30  # stored, so ACKed, while the lab is down
        time.sleep(1)
        lab.start()
        wait_for(lambda: set(acked) <= set(lab.ids()), 60, "every message at the lab")
        received = lab.ids()
        assert received[: len(acked)] == acked  # in order of receipt
        assert len(received) - len(set(received)) == 0  # no duplicates needed here
    finally:
        lab.close()


@FORWARDING
def test_kill_9_under_load_then_restart_loses_nothing_acked(tmp_path, processes, forwarding):
    lab_log = tmp_path / "lab.log"
    processes.append(start("listen", "--port", "0", log=open(lab_log, "w")))
    lab_port = bound_port(lab_log)
    write_channel(tmp_path / "channels", 0, lab_port)
    run = ["run", "--channels", str(tmp_path / "channels"), "--data-dir", str(tmp_path / "data"), "--admin-port", "0", "--console-port", "0",
           "--forwarding", forwarding]
    engine = start(*run, log=open(tmp_path / "engine1.log", "w"))
    processes.append(engine)
    engine_port = bound_port(tmp_path / "engine1.log")
    acked, stop = [], threading.Event()
    senders = [threading.Thread(target=send_many, args=(engine_port, [f"K{c}-{i:03d}" for i in range(400)], acked, stop))
               for c in range(4)]
    for thread in senders:
        thread.start()
    wait_for(lambda: len(acked) >= 150, 60, "150 ACKs")
    engine.send_signal(signal.SIGKILL)  # no shutdown, no flush: only what was committed survives
    engine.wait(timeout=30)
    stop.set()
    for thread in senders:
        thread.join(timeout=30)
    acked_at_kill = list(acked)
    db = tmp_path / "data" / "hl7relay.db"
    assert set(acked_at_kill) <= set(stored_ids(db))  # every ACKed message was committed before its ACK
    restarted = start(*run, log=open(tmp_path / "engine2.log", "w"))
    processes.append(restarted)
    wait_for(lambda: set(acked_at_kill) <= set(received_ids(lab_log)), 90, "every ACKed message at the lab")
    received = received_ids(lab_log)
    duplicates = len(received) - len(set(received))
    print(f"ACKed before the kill: {len(acked_at_kill)}; delivered: {len(set(received))}; re-sent (at-least-once): {duplicates}")
    # everything may have reached the lab before the kill: wait for the restart to be up (its
    # SIGTERM handler in place) before stopping it
    wait_for(lambda: "ready; Ctrl-C or SIGTERM stops\n" in (tmp_path / "engine2.log").read_text(), 60, "the restarted engine to be ready")
    restarted.send_signal(signal.SIGTERM)
    assert restarted.wait(timeout=30) == 0
