"""The engine's own CPU per message, without sockets or a second process.

    python bench/bench_pipeline.py [--validation] [--connections 8] [--rounds 400] [--repeat 5]

The benchmark channel of bench_engine.py, in one process on a task.Clock: eight listener
protocols on StringTransports each get a message per round; the engine parses, filters,
transforms, commits to a durable SQLite file (group commit, fsync included), writes the ACKs,
and its queue "delivers" each message to a peer that answers AA at once and records that in the
store. Prometheus metrics are on. Reported: CPU µs per message (best of --repeat), which is
steadier on a shared machine than msgs/s over loopback, and where it goes (--profile).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet import task
from twisted.internet.testing import StringTransport

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import adt_a01_1kb  # noqa: E402
from bench_engine import CHANNEL  # noqa: E402

from hl7relay.channels import load_channel  # noqa: E402
from hl7relay.mllp.framing import frame  # noqa: E402
from hl7relay.mllp.listener import MLLPListenerFactory  # noqa: E402
from hl7relay.metrics import Metrics  # noqa: E402
from hl7relay.queues import DeliveryResult  # noqa: E402
from hl7relay.runtime import Engine  # noqa: E402
from hl7relay.store.database import Store  # noqa: E402
from hl7relay.store.writer import StoreWriter  # noqa: E402


class _Peer:
    def __init__(self, host="127.0.0.1", port=40000):
        self.host, self.port = host, port


def build(work: Path, validation: bool, connections: int):
    path = work / "bench.yaml"
    validators = "validators: [{structure: {on_error: warn}}]" if validation else ""
    path.write_text(CHANNEL.format(port=2575, sink=2576, validators=validators, parallel=8))
    channel, errors = load_channel(path, {})
    assert not errors, errors
    clock = task.Clock()
    store = Store(f"sqlite:///{work / 'bench.db'}")
    store.migrate()
    engine = Engine([channel], StoreWriter(store, clock, lazy_delay=0.05, overlap_commits=False), reactor=clock)  # as `hl7relay run`
    running = engine.channels[channel.name]
    for queue in running.queues.values():
        queue.deliver = lambda message: DeliveryResult(True, ack="AA")
        queue.start()
    factory = MLLPListenerFactory(running, channel.source.listener, clock, "bench")
    protocols = []
    for i in range(connections):
        protocol = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=_Peer(port=40000 + i))
        protocol.makeConnection(transport)
        protocols.append((protocol, transport))
    return engine, clock, protocols, store


def run(engine, clock, protocols, rounds: int, template: bytes, offset: int, reader=None) -> float:
    started = time.process_time()
    for r in range(rounds):
        if reader is not None and r % 50 == 0:
            reader()
        for c, (protocol, _) in enumerate(protocols):
            control_id = f"B{c}-{offset + r:07d}".encode()
            patient = f"B{c}-{(offset + r) % 250:03d}".encode()
            protocol.dataReceived(frame(template.replace(b"@@ID@@", control_id).replace(b"@@PID@@", patient)))
        for _ in range(4):  # commit + ACKs, then deliveries and their records
            clock.advance(0)
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--validation", action="store_true")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-metrics", action="store_true", help="without Prometheus metrics (to see what they cost)")
    parser.add_argument("--trace", choices=("unread", "read"),
                        help="with a message trace open: its rows never read, or read as the API sends them")
    parser.add_argument("--profile", nargs="?", const="tottime", choices=("tottime", "cumulative", "ncalls"),
                        help="print the top functions by own (default) or cumulative time")
    args = parser.parse_args()
    template = (adt_a01_1kb().replace(b"MSG00001", b"@@ID@@").replace(b"|100234^", b"|@@PID@@^")
                .replace(b"|AL|NE|", b"|||"))
    metrics = None if args.no_metrics else Metrics().install()
    with tempfile.TemporaryDirectory(prefix="hl7relay-pipeline-") as work:
        engine, clock, protocols, store = build(Path(work), args.validation, args.connections)
        from hl7relay.ops.perf import Performance

        performance = Performance(clock.seconds).install()  # as `hl7relay run` has it
        reader = None
        if args.trace:
            session = engine.tracer.start("bench", seconds=3600)
            if args.trace == "read":
                import json

                cursor = [0]

                def read_trace():  # what GET /api/v1/traces/ID does for its rows
                    rows, count = session.read_json(cursor[0], 5000)
                    cursor[0] += count
                    json.dumps({"trace": session.view(0.0)}) + rows

                reader = read_trace
        run(engine, clock, protocols, 50, template, 0)  # warm-up: caches, compiled profiles
        results, offset = [], 50
        profiler = cProfile.Profile() if args.profile else None
        for _ in range(args.repeat):
            if profiler:
                profiler.enable()
            seconds = run(engine, clock, protocols, args.rounds, template, offset, reader)
            if profiler:
                profiler.disable()
            offset += args.rounds
            results.append(seconds / (args.rounds * len(protocols)) * 1e6)
        acks = sum(t.value().count(b"\x0bMSH") for _, t in protocols)
        sent = sum(q.sent for q in engine.channels["bench"].queues.values())
        total = (50 + args.rounds * args.repeat) * len(protocols)
        assert acks == total and store.count() == total and sent == total, (acks, store.count(), sent, total)
        if metrics is not None:
            metrics.uninstall()
        performance.uninstall()
    print(f"validation {'on' if args.validation else 'off'}: {min(results):.0f} µs CPU per message "
          f"(in, stored, ACKed, delivered, recorded; best of {args.repeat}: "
          f"{', '.join(f'{r:.0f}' for r in results)}) -> at most {1e6 / min(results):,.0f} msgs/s on one core")
    if profiler:
        pstats.Stats(profiler).sort_stats(args.profile).print_stats(40)


if __name__ == "__main__":
    main()
