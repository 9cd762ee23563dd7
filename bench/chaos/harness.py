"""The pieces every chaos scenario uses: the engine as a process, a load of senders that record
every answer, and a destination that records what it got. Real processes and loopback sockets
only; every loop is bounded in count and time."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hl7relay.ack import build_ack
from hl7relay.hl7.message import Message
from hl7relay.mllp.framing import Frame, MLLPFramer, frame

ROOT = Path(__file__).resolve().parents[2]
READY = "ready; Ctrl-C or SIGTERM stops"


class ChaosFailure(AssertionError):
    """A scenario found what it is there to find: a loss, a hang, an unanswered frame. ``figures``:
    what it measured up to then (printed with the failure)."""

    def __init__(self, text: str, figures: dict | None = None):
        super().__init__(text)
        self.figures = figures or {}


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise ChaosFailure(f"timed out after {timeout:g}s waiting for {what}")


# -- the engine ------------------------------------------------------------------------------------
class Engine:
    """``hl7relay run`` in ``folder``: every listener on a port of its own choosing (read back from
    its startup lines), its output in ``engine-N.log``."""

    runs = 0
    started: list["Engine"] = []  # every engine of the run: a failed scenario's are ended by end_all()

    def __init__(self, folder: Path, *arguments: str, env: dict | None = None, ready_timeout: float = 60.0,
                 limits=None, ready_line: str = READY):
        Engine.runs += 1
        self.folder = folder
        self.log_path = folder / f"engine-{Engine.runs}.log"
        self.log = open(self.log_path, "w")
        command = [sys.executable, "-m", "hl7relay", "run", "--admin-port", "auto", "--console-port", "0", *arguments]
        self.process = subprocess.Popen(command, cwd=folder, stdout=self.log, stderr=subprocess.STDOUT,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})), preexec_fn=limits)
        self.started_at = time.monotonic()
        self.ready_line = ready_line
        Engine.started.append(self)
        text = wait_for(lambda: self._ready(), ready_timeout, f"the engine's ready line ({self.log_path})")
        self.ports = {name: int(port) for name, port in re.findall(r"channel (\S+): MLLP on 127\.0\.0\.1:(\d+)", text)}
        admin = re.search(r"admin: (http://127\.0\.0\.1:\d+)/", text)
        self.admin = admin.group(1) if admin else None

    def _ready(self):
        text = self.log_path.read_text(errors="replace")
        if self.ready_line in text:
            return text
        if self.process.poll() is not None:
            raise ChaosFailure(f"the engine exited ({self.process.returncode}) before it was ready:\n{text[-2000:]}")
        return None

    @classmethod
    def end_all(cls) -> int:
        """Kill what a failed scenario left running (its forwarders go with it); how many."""
        ended = 0
        for engine in cls.started:
            if engine.process.poll() is None:
                engine.process.kill()
                engine.process.wait(timeout=30)
                ended += 1
            if not engine.log.closed:
                engine.log.close()
        cls.started = []
        return ended

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_mb(self) -> float:
        """Resident memory of the engine and its children (a forwarder), in MB."""
        total = 0
        for pid in [self.pid, *_children(self.pid)]:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def kill9(self) -> None:
        children = _children(self.pid)
        self.process.kill()
        self.process.wait(timeout=30)
        # the forwarder dies with its engine (parent-death signal): make sure it has
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.02)
        survivors = [pid for pid in children if _alive(pid)]
        self.log.close()
        if survivors:
            raise ChaosFailure(f"the forwarder {survivors} outlived its engine's kill -9")

    def terminate(self, timeout: float = 60.0) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds the stop took)."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
            raise ChaosFailure(f"SIGTERM did not stop the engine within {timeout:g}s") from None
        finally:
            self.log.close()
        return code, time.monotonic() - started

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def reload(self) -> None:
        self.process.send_signal(signal.SIGHUP)

    def readyz(self) -> int:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.admin + "/readyz", timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def worker_pids(supervisor_pid: int) -> dict[int, int]:
    """``hl7relay run --workers N``'s workers: number -> pid, from its children's command lines."""
    pids = {}
    for pid in _children(supervisor_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--worker" in argv:
            pids[int(argv[argv.index(b"--worker") + 1])] = pid
    return pids


def free_port() -> int:
    """A port nothing listens on now (for a listener that must be given one: workers share it)."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    try:
        return probe.getsockname()[1]
    finally:
        probe.close()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# -- a destination --------------------------------------------------------------------------------
class Sink:
    """An MLLP destination on a fixed port that records every message it receives (control id and
    time), answers AA after ``delay`` seconds (or what ``script`` says first: 'AR', 'AE'), and can
    go down (nothing listens, connections dropped) and come back on the same port."""

    opened: list["Sink"] = []  # every destination of the run, taken down by down_all()

    @classmethod
    def down_all(cls) -> None:
        for sink in cls.opened:
            sink.down()
        cls.opened = []

    def __init__(self, delay: float = 0.0, script=()):
        Sink.opened.append(self)
        self.delay = delay
        self.script = list(script)
        self.received: list[tuple[str, float]] = []
        self.accepted: list[tuple[str, float]] = []  # the control ids answered AA, and when
        self.answered_at: dict[str, float] = {}  # control id -> when its first answer was written
        self.lock = threading.Lock()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._server: socket.socket | None = None
        self._connections: set = set()
        self._generation = 0

    def up(self) -> "Sink":
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        wait_for(lambda: _try_bind(server, self.port), 30, f"port {self.port} free again for the destination")
        server.listen(128)
        self._server = server
        self._generation += 1
        threading.Thread(target=self._accept, args=(server, self._generation), daemon=True).start()
        return self

    def down(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            try:
                server.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it: else it goes on accepting
            except OSError:
                pass
            server.close()
        with self.lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()

    def _accept(self, server, generation):
        while self._generation == generation:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with self.lock:
                self._connections.add(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection):
        framer = MLLPFramer()
        try:
            while True:
                data = connection.recv(65536)
                if not data:
                    return
                for event in framer.feed(data):
                    if not isinstance(event, Frame):
                        continue
                    message = Message.from_bytes(event.payload)
                    with self.lock:
                        self.received.append((message.control_id, time.monotonic()))
                        code = self.script.pop(0) if self.script else "AA"
                        if code == "AA":
                            self.accepted.append((message.control_id, time.monotonic()))
                    if self.delay:
                        time.sleep(self.delay)
                    connection.sendall(frame(build_ack(message, code)))
                    with self.lock:
                        self.answered_at.setdefault(message.control_id, time.monotonic())
        except OSError:
            return
        finally:
            with self.lock:
                self._connections.discard(connection)
            connection.close()

    def ids(self) -> list[str]:
        with self.lock:
            return [control_id for control_id, _ in self.received]


def _try_bind(server: socket.socket, port: int) -> bool:
    try:
        server.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False


def first_frame(connection: socket.socket, framer: MLLPFramer | None = None) -> bytes | None:
    """The payload of the next frame on ``connection`` (None when it closes first; a timeout or
    reset raises OSError). ``framer``: one kept across calls on the same connection."""
    framer = framer or MLLPFramer()
    while True:
        data = connection.recv(65536)
        if not data:
            return None
        for event in framer.feed(data):
            if isinstance(event, Frame):
                return event.payload


# -- the senders ----------------------------------------------------------------------------------
ADT = ("MSH|^~\\&|PMS|CLINIC|HL7RELAY|LAB|20240105093512||ADT^A08^ADT_A01|{id}|P|2.5.1\r"
       "EVN|A08|20240105093512\rPID|1||{key}^^^CLINIC^MR||CHAOS^TEST||19800101|F\rPV1|1|O\r")


@dataclass
class Answer:
    control_id: str
    key: str
    code: str  # MSA-1, or "" when the connection ended first
    sent_at: float
    answered_at: float


@dataclass
class Load:
    """``connections`` senders, one message in flight each, a key's messages always on one
    connection (so their order is defined). A connection that ends is opened again; an answer that
    does not come within ``answer_timeout`` with the connection open is a hang."""

    port: int
    connections: int = 4
    keys_per_connection: int = 20
    template: str = ADT
    answer_timeout: float = 60.0
    resend_until_accepted: bool = False  # a PMS that sends again what was not answered AA/CA
    interval: float = 0.0  # a pause after each answer, per connection (0: as fast as answered)
    answers: list = field(default_factory=list)
    hangs: list = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    prefix: str = "C"
    key_prefix: str = "K"  # two loads with keys of their own (a key's messages come from one sender)

    def __post_init__(self):
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.sent = 0

    def start(self, limit: int | None = None) -> "Load":
        for index in range(self.connections):
            thread = threading.Thread(target=self._run, args=(index, limit), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def finish(self, timeout: float = 120.0) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout)
        if any(thread.is_alive() for thread in self._threads):
            raise ChaosFailure("a sender did not finish: an answer never came")

    def wait_answered(self, count: int, timeout: float) -> None:
        wait_for(lambda: self.accepted_count() >= count, timeout, f"{count} messages answered AA")

    def accepted_count(self) -> int:
        with self._lock:
            return sum(1 for a in self.answers if a.code in ("AA", "CA"))

    def accepted(self) -> list[Answer]:
        with self._lock:
            return [a for a in self.answers if a.code in ("AA", "CA")]

    def _run(self, index: int, limit: int | None):
        number = 0
        connection, framer = None, MLLPFramer()
        pending_resend = None
        while not self.stop.is_set() and (limit is None or number < limit):
            if connection is None:
                try:
                    connection = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                    connection.settimeout(self.answer_timeout)
                    framer = MLLPFramer()
                except OSError:
                    time.sleep(0.1)
                    continue
            if pending_resend is not None:
                control_id, key = pending_resend
            else:
                control_id = f"{self.prefix}{index}-{number:06d}"
                key = f"{self.key_prefix}{index}-{number % self.keys_per_connection}"
            sent_at = time.monotonic()
            code = ""
            try:
                connection.sendall(frame(self.template.format(id=control_id, key=key).encode()))
                code = self._answer(connection, framer, control_id)
            except socket.timeout:
                with self._lock:
                    self.hangs.append(control_id)
                connection.close()
                connection = None
            except OSError:
                connection.close()
                connection = None
            with self._lock:
                self.sent += 1
                self.answers.append(Answer(control_id, key, code, sent_at, time.monotonic()))
            if self.resend_until_accepted and code not in ("AA", "CA"):
                pending_resend = (control_id, key)
                time.sleep(0.05)
                continue
            pending_resend = None
            number += 1
            if self.interval:
                time.sleep(self.interval)
        if connection is not None:
            connection.close()

    @staticmethod
    def _answer(connection, framer, control_id) -> str:
        while True:
            data = connection.recv(65536)
            if not data:
                raise OSError("closed")
            for event in framer.feed(data):
                if isinstance(event, Frame):
                    text = event.payload.decode("latin-1")
                    msa = next((s for s in text.split("\r") if s.startswith("MSA|")), "")
                    parts = msa.split("|")
                    if len(parts) > 2 and parts[2] == control_id:
                        return parts[1]


# -- what the store holds -------------------------------------------------------------------------
def stored_control_ids(database: Path) -> set[str]:
    with sqlite3.connect(database) as connection:
        return {row[0] for row in connection.execute("SELECT control_id FROM messages")}


def write_channel(folder: Path, name: str, body: str) -> None:
    (folder / "channels").mkdir(parents=True, exist_ok=True)
    (folder / "channels" / f"{name}.yaml").write_text(body)


def relay_channel(sink_port: int, order: str = "per_key", parallel: int = 4, extra: str = "",
                  listen_port: int = 0) -> str:
    """A channel that stores, ACKs on store and forwards to the sink."""
    keyed = "order_key: PID-3.1, " if order == "per_key" else ""
    return (f"name: relay\nsource: {{type: mllp, host: 127.0.0.1, port: {listen_port}}}\n"
            f"destinations:\n  - {{name: lab, type: mllp, host: 127.0.0.1, port: {sink_port}, order: {order}, "
            f"{keyed}parallel: {parallel if order != 'in_order' else 1}, connect_timeout: 1, ack_timeout: 5, "
            f"retry_initial: 0.2, retry_max: 1}}\n{extra}")


def cluster_node(folder: Path, name: str, url: str, sink_port: int, ttl: float = 4, renew: float = 1,
                 workers: int = 1, listen_port: int = 0) -> Engine:
    """A node of a cluster on ``url``: the relay channel to the sink, 8 partitions; with
    ``workers`` > 1, that many worker processes (hl7relay run --workers) sharing ``listen_port``."""
    write_channel(folder, "relay", relay_channel(sink_port, "per_key", parallel=2, listen_port=listen_port))
    (folder / "hl7relay.yaml").write_text(
        f'store: {{url: "{url}"}}\nchannels: [channels]\n'
        f"cluster: {{node_id: {name}, partitions: 8, lease_ttl: {ttl}, lease_renew: {renew}}}\n")
    if workers > 1:
        return Engine(folder, "--config", "hl7relay.yaml", "--workers", str(workers),
                      ready_line=f"ready: {workers} workers; Ctrl-C or SIGTERM stops")
    return Engine(folder, "--config", "hl7relay.yaml")


def delivery_figures(accepted: list[Answer], received: list[tuple[str, float]], kills: list[float] = (),
                     window: float = 0.5, answered_at: dict | None = None) -> dict:
    """Lost (ACKed, never delivered), duplicates (delivered twice) and those outside the documented
    window, per-key inversions. The window: a copy sent again must have been on the wire at a kill
    (its first answer written after it, or never) or answered in the ``window`` s before it
    (``answered_at``: when the destination wrote each first answer; else when it got the copy)."""
    acked = {a.control_id for a in accepted}
    first: dict[str, float] = {}
    order: list[str] = []
    counts: dict[str, int] = {}
    for control_id, at in received:
        counts[control_id] = counts.get(control_id, 0) + 1
        if control_id not in first:
            first[control_id] = at
            order.append(control_id)
    duplicates = [c for c, n in counts.items() if n > 1]
    answered = answered_at or first

    def within(control_id):
        # a kill whose process was still sending (a dying forwarder's last copies arrive just after
        # it), or whose store had not yet recorded the answer of the first copy
        return any(first[control_id] <= kill + window and answered.get(control_id, kill) >= kill - window
                   for kill in kills)

    outside = [c for c in duplicates if not within(c)]
    # per key, the order of first deliveries must be the order the sender's ACKs came in
    sent_order = {a.control_id: n for n, a in enumerate(sorted(accepted, key=lambda a: a.answered_at))}
    key_of = {a.control_id: a.key for a in accepted}
    inversions, last = 0, {}
    for control_id in order:
        if control_id not in sent_order:
            continue
        key = key_of[control_id]
        if key in last and sent_order[control_id] < last[key]:
            inversions += 1
        last[key] = max(last.get(key, -1), sent_order[control_id])
    figures = {"acked": len(acked), "lost": len(acked - set(first)), "duplicates": sum(counts[c] - 1 for c in duplicates),
               "outside_window": len(outside), "inversions": inversions}
    if outside:  # for the reader of a failure: which, and how long before the nearest kill it was first delivered
        figures["outside_window_examples"] = [
            f"{c}: first delivered {min((k - first[c] for k in kills if k >= first[c]), default=float('nan')):.2f}s, "
            f"answered {min((k - answered.get(c, k) for k in kills if k >= first[c]), default=float('nan')):.2f}s before a kill"
            for c in outside[:5]]
    return figures


def mutations(seed: int, count: int, bases: list[bytes]):
    """Mutated frames (bytes changed, inserted, deleted, cut) that each call for an answer: an
    ACK, and an enhanced-mode message whose MSH-15/16 may withhold one, are left out."""
    rng = random.Random(seed)
    specials = [0, 10, 13, 0x0B, 0x1C, 0x7C, 0x5E, 0x5C, 0x26, 0x7E, 0xFF, 0xC3, 0x31]
    made = 0
    while made < count:
        data = bytearray(rng.choice(bases))
        if rng.random() < 0.3:
            data = data[:rng.randint(0, len(data))]
        for _ in range(rng.randint(1, 10)):
            i = rng.randrange(len(data) + 1)
            choice = rng.random()
            if choice < 0.4 and data:
                data[min(i, len(data) - 1)] = rng.randrange(256)
            elif choice < 0.75:
                data[i:i] = bytes([rng.choice(specials)])
            elif data:
                del data[min(i, len(data) - 1)]
        payload = bytes(data).replace(b"\x1c\r", b"\x1c")
        try:
            message = Message.from_bytes(payload)
            if message.get("MSH-9.1").strip().upper() == "ACK" or {
                    message.get("MSH-15").strip().upper(), message.get("MSH-16").strip().upper()} & {"NE", "ER", "SU"}:
                continue
        except Exception:  # noqa: BLE001 - unreadable frames are answered AR
            pass
        made += 1
        yield payload
