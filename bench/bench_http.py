"""HTTP integration (issue #27): the http destination against a bare Twisted HTTP client, and the http
source against the MLLP source, each pair measured in the same run.

    python bench/bench_http.py [--messages 2000] [--parallel 8] [--repeat 3] [--skip-source]

Destination: a sink server (twisted.web in a process of its own, plain HTTP on loopback, answering
201 with a small JSON body) receives the same 1 KB ADT^A01 bodies from
- ``bare``: twisted.web's Agent with a persistent pool, ``--parallel`` requests in flight;
- ``hl7relay``: a destination queue (order: none, parallel: ``--parallel``) with the http
  destination, over a SQLite store holding the queued deliveries, each result recorded.
Printed: deliveries a second and CPU per delivery of this process (the writer thread included),
best of ``--repeat``, and hl7relay's share of the bare client's rate (target: >= 50%).

Source: one ``hl7relay run`` with two channels that store and answer (no destination): ``mllp-in``
(MLLP) and ``http-in`` (the http source, plain HTTP on loopback, a sender token). A lean client
(prepared bytes, kept-alive connections, one message in flight on each) sends generated messages
(hl7relay.simulate) to each over ``--parallel`` connections, so the engine, not the client, is
measured. Printed: messages a second, the engine's CPU per message (from /proc), latency, and
http's share of MLLP's rate (target: >= 70%).
"""

from __future__ import annotations

import argparse
import warnings
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

SINK = r"""
import itertools, json, sys
from twisted.internet import reactor
from twisted.web import resource, server

class Sink(resource.Resource):
    isLeaf = True
    ids = itertools.count(1)

    def render_POST(self, request):
        request.content.read()
        request.setResponseCode(201)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"id": next(self.ids), "status": "created"}).encode()

class Quiet(server.Site):
    def log(self, request):
        pass

port = reactor.listenTCP(0, Quiet(Sink()), interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""


def start_sink() -> tuple[subprocess.Popen, int]:
    sink = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    return sink, int(sink.stdout.readline())


def destination_rows(port: int, messages: int, parallel: int, repeat: int, then=None) -> dict:
    from twisted.internet import defer, reactor, task

    from _common import adt_a01_1kb

    body = adt_a01_1kb()
    url = f"http://127.0.0.1:{port}/api/adt"
    results: dict = {"bare": [], "hl7relay": []}

    @defer.inlineCallbacks
    def bare():
        from twisted.web.client import Agent, HTTPConnectionPool, readBody
        from twisted.web.http_headers import Headers

        from hl7relay.apiclient.http import _Bytes

        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = parallel
        agent = Agent(reactor, pool=pool)
        headers = Headers({b"Content-Type": [b"application/hl7-v2"]})
        remaining = iter(range(messages))

        @defer.inlineCallbacks
        def worker():
            for _ in remaining:
                response = yield agent.request(b"POST", url.encode(), headers, _Bytes(body))
                yield readBody(response)

        cpu, wall = time.process_time(), time.perf_counter()
        yield defer.DeferredList([worker() for _ in range(parallel)])
        results["bare"].append((time.perf_counter() - wall, time.process_time() - cpu))
        yield pool.closeCachedConnections()

    @defer.inlineCallbacks
    def ours(folder: Path):
        import dataclasses

        from hl7relay.channels.destinations import QueueOptions
        from hl7relay.channels.http_destination import HTTPDelivery, HTTPDestinationConfig
        from hl7relay.queues import DestinationQueue
        from hl7relay.resources import Resources
        from hl7relay.store.database import DeliveryRecord, MessageRecord, Store
        from hl7relay.store.writer import StoreWriter

        store = Store(f"sqlite:///{folder / 'bench.db'}")
        store.migrate()
        records = []
        for n in range(messages):
            data = body.replace(b"|MSG00001|", f"|B{n:07d}|".encode(), 1)
            records.append(MessageRecord("adt", data, "PROCESSED", received_at=time.time(), control_id=f"B{n:07d}",
                                         deliveries=[DeliveryRecord("pms", "QUEUED", data, None)]))
        for start in range(0, messages, 1000):
            store.commit(records[start:start + 1000], [])
        writer = StoreWriter(store, reactor)
        config = HTTPDestinationConfig(url, queue=dataclasses.replace(QueueOptions(), order="none", parallel=parallel))
        delivery = HTTPDelivery(config, Resources(reactor, writer, time.time))
        queue = DestinationQueue("adt", "pms", delivery.deliver, config.queue, writer, reactor, time.time,
                                 poll_interval=1.0, keyed=True)
        cpu, wall = time.process_time(), time.perf_counter()
        queue.start()
        while queue.sent < messages:
            yield task.deferLater(reactor, 0.005, lambda: None)
        results["hl7relay"].append((time.perf_counter() - wall, time.process_time() - cpu))
        queue.stop()
        delivery.close()
        yield writer.close()
        store.close()

    @defer.inlineCallbacks
    def main(_reactor):
        for _ in range(repeat):
            yield bare()
            with tempfile.TemporaryDirectory() as folder:
                yield ours(Path(folder))
        if then is not None:  # the source's rows, on this run of the reactor (it runs once a process)
            yield then(_reactor)

    _react(main)
    return results


def _react(main) -> None:
    from twisted.internet import task

    try:
        task.react(main)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise


def engine_cpu(pid: int) -> float:
    """The engine's CPU seconds so far (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def lean_load(reactor, port: int, messages: list, connections: int, http_path: str | None = None, token: str = ""):
    """Send ``messages`` over ``connections`` kept-alive connections, one in flight on each, as lean
    as a client can be (prepared bytes, the answer found by its end): MLLP frames, or with
    ``http_path`` HTTP/1.1 POSTs. A Deferred of (seconds, latencies)."""
    from twisted.internet import defer, protocol
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    def framed(data: bytes) -> bytes:
        if http_path is None:
            return b"\x0b" + data + b"\x1c\r"
        return (f"POST {http_path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/hl7-v2\r\n"
                f"Authorization: Bearer {token}\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data

    pending = iter([framed(m) for m in messages])
    latencies: list = []
    done = defer.Deferred()
    open_connections = [connections]

    class Client(protocol.Protocol):
        def connectionMade(self):
            self.buffer = b""
            self.next()

        def next(self):
            data = next(pending, None)
            if data is None:
                self.transport.loseConnection()
                return
            self.sent = time.perf_counter()
            self.transport.write(data)

        def dataReceived(self, data):
            self.buffer += data
            if http_path is None:
                if b"\x1c\r" not in self.buffer:
                    return
                self.buffer = self.buffer.split(b"\x1c\r", 1)[1]
            else:
                head, found, rest = self.buffer.partition(b"\r\n\r\n")
                if not found:
                    return
                length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
                if len(rest) < length:
                    return
                if not head.startswith(b"HTTP/1.1 200"):
                    raise SystemExit(f"the http source answered {head.splitlines()[0]!r}")
                self.buffer = rest[length:]
            latencies.append(time.perf_counter() - self.sent)
            self.next()

        def connectionLost(self, reason=None):
            open_connections[0] -= 1
            if not open_connections[0]:
                done.callback((time.perf_counter() - started, latencies))

    started = time.perf_counter()
    for _ in range(connections):
        connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Client())
    return done


def start_engine(folder: Path):
    """hl7relay run with mllp-in and http-in, storing and answering (no destination)."""
    from hl7relay.store.database import Store

    (folder / "channels").mkdir()
    (folder / "data").mkdir()
    (folder / "channels" / "mllp.yaml").write_text("name: mllp-in\nsource: {type: mllp, port: 0}\ndestinations: []\n")
    (folder / "channels" / "http.yaml").write_text(
        "name: http-in\nsource: {type: http, port: 0, allow_plain_http: true, tokens: [bench]}\ndestinations: []\n")
    Store(f"sqlite:///{folder / 'data' / 'hl7relay.db'}").migrate()
    token = subprocess.run([sys.executable, "-m", "hl7relay", "token", "create", "bench", "--role", "sender"],
                           cwd=folder, capture_output=True, text=True, check=True).stdout.strip()
    engine = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--admin-port", "0", "--console-port", "0"],
                              cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines: list[str] = []
    while not any("ready; Ctrl-C or SIGTERM stops" in line for line in lines):
        line = engine.stdout.readline().decode()
        if not line:
            raise SystemExit("the engine did not start:\n" + "".join(lines))
        lines.append(line)
    text = "".join(lines)
    mllp_port = int(text.split("MLLP on 127.0.0.1:")[1].split()[0])
    http_port = int(text.split("HTTP on 127.0.0.1:")[1].split()[0])
    return engine, mllp_port, http_port, token


def source_rows(reactor, messages: int, parallel: int, repeat: int):
    """A Deferred of {"mllp": [...], "http": [...]}: (seconds, engine CPU seconds, latencies) per run."""
    from twisted.internet import defer

    from hl7relay.simulate import Simulation

    results: dict = {"mllp": [], "http": []}
    folder = Path(tempfile.mkdtemp())
    engine, mllp_port, http_port, token = start_engine(folder)

    @defer.inlineCallbacks
    def run():
        try:
            for round_ in range(repeat):
                for kind in ("mllp", "http"):
                    batch = [m.data for m in Simulation(seed=round_ * 2 + (kind == "http") + 1).take(messages)]
                    cpu = engine_cpu(engine.pid)
                    seconds, latencies = yield lean_load(reactor, mllp_port if kind == "mllp" else http_port, batch,
                                                         parallel, None if kind == "mllp" else "/hl7", token)
                    results[kind].append((seconds, engine_cpu(engine.pid) - cpu, _percentiles(latencies)))
        finally:
            engine.terminate()
            engine.wait(timeout=30)
        return results

    return run()


def _percentiles(latencies: list) -> dict:
    ordered = sorted(latencies)
    return {name: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))] * 1000
            for name, q in (("p50", 0.5), ("p99", 0.99))}


def report(title: str, rows: dict, messages: int, base: str, ours: str, target: float) -> None:
    print(title)
    best = {}
    for name, runs in rows.items():
        wall, cpu, *rest = min(runs, key=lambda r: r[0])
        best[name] = messages / wall
        latency = ""
        if rest:
            p = rest[0]
            latency = f"  p50 {p['p50']:.2f} ms  p99 {p['p99']:.2f} ms"
        print(f"  {name:<9} {messages / wall:>9,.0f} msgs/s  {cpu / messages * 1e6:>7.0f} µs CPU each{latency}")
    share = best[ours] / best[base]
    print(f"  {ours} / {base}: {share:.0%} (target >= {target:.0%}: {'met' if share >= target else 'NOT met'})")


def main() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # readBody on a pooled connection: harmless
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-source", action="store_true")
    args = parser.parse_args()
    sink, port = start_sink()
    source: dict = {}
    try:
        rows = destination_rows(port, args.messages, args.parallel, args.repeat,
                                then=None if args.skip_source else
                                lambda reactor: source_rows(reactor, args.messages, args.parallel, args.repeat)
                                .addCallback(source.update))
    finally:
        sink.terminate()
        sink.wait(timeout=30)
    report(f"http destination: {args.messages} deliveries of 1 KB, {args.parallel} in flight (CPU: this process)",
           rows, args.messages, "bare", "hl7relay", 0.5)
    if source:
        report(f"http source vs MLLP source: {args.messages} generated messages over {args.parallel} kept-alive "
               "connections, one in flight each (CPU: the engine)", source, args.messages, "mllp", "http", 0.7)


if __name__ == "__main__":
    main()
