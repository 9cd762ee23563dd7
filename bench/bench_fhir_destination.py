"""The fhir destination against the plain http destination posting the same Bundles to the same
server, in the same run (issue #28).

    python bench/bench_fhir_destination.py [--messages 2000] [--parallel 8] [--repeat 3]

A sink (twisted.web in a process of its own, plain HTTP on loopback) answers every POST with a
transaction-response: one entry per entry sent, each with its location and version, as a FHIR
server does. Both rows send the same transaction Bundle (the 1 KB ADT^A01 converted once, one per
message with its own identifiers) through a destination queue over SQLite, each result recorded:
- ``http``: the http destination (content_type application/fhir+json): the answer kept as is;
- ``fhir``: the fhir destination: the answer read for failed entries, and each resource's id and
  version written to the cross-reference table in the delivery's transaction.
Printed: deliveries a second and CPU per delivery (best of --repeat), and fhir's share of http's rate.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SINK = r"""
import json, sys
from twisted.internet import reactor
from twisted.web import resource, server

class Sink(resource.Resource):
    isLeaf = True
    def render_POST(self, request):
        bundle = json.loads(request.content.read())
        entries = [{"response": {"status": "200 OK", "location": f"{e['resource']['resourceType']}/{n}/_history/1",
                                 "etag": 'W/"1"'}} for n, e in enumerate(bundle.get("entry") or [], start=1)]
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/fhir+json")
        return json.dumps({"resourceType": "Bundle", "type": "transaction-response", "entry": entries}).encode()

class Quiet(server.Site):
    def log(self, request):
        pass

port = reactor.listenTCP(0, Quiet(Sink()), interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""


def bundles(messages: int) -> list[bytes]:
    from _common import adt_a01_1kb

    from hl7relay.fhir.convert import Converter
    from hl7relay.fhir.maps import default_maps
    from hl7relay.hl7.message import Message

    converter = Converter(default_maps(), bundle="transaction")
    data = adt_a01_1kb()
    out = []
    for n in range(messages):
        message = Message.from_bytes(data.replace(b"100234^^^CLINIC^MR", f"P{n:07d}^^^CLINIC^MR".encode(), 1))
        out.append(converter.convert(message).to_bytes())
    return out


def rows(port: int, messages: int, parallel: int, repeat: int) -> dict:
    from twisted.internet import defer, task

    contents = bundles(messages)
    results: dict = {"http": [], "fhir": []}

    @defer.inlineCallbacks
    def run(reactor, kind: str, folder: Path):
        import dataclasses

        from hl7relay.channels.destinations import QueueOptions
        from hl7relay.channels.fhir_destination import FHIRDelivery, FHIRDestinationConfig
        from hl7relay.channels.http_destination import HTTPDelivery, HTTPDestinationConfig
        from hl7relay.queues import DestinationQueue
        from hl7relay.resources import Resources
        from hl7relay.store.database import DeliveryRecord, MessageRecord, Store
        from hl7relay.store.writer import StoreWriter

        store = Store(f"sqlite:///{folder / 'bench.db'}")
        store.migrate()
        records = [MessageRecord("adt", b"MSH|^~\\&|PMS|CLINIC\r", "PROCESSED", received_at=time.time(),
                                 control_id=f"B{n:07d}", deliveries=[DeliveryRecord("ehr", "QUEUED", content, None)])
                   for n, content in enumerate(contents)]
        for start in range(0, messages, 1000):
            store.commit(records[start:start + 1000], [])
        writer = StoreWriter(store, reactor)
        queue_options = dataclasses.replace(QueueOptions(), order="none", parallel=parallel)
        url = f"http://127.0.0.1:{port}/fhir"
        if kind == "http":
            config = HTTPDestinationConfig(url, content_type="application/fhir+json", queue=queue_options,
                                           content_type_given=True)
            delivery = HTTPDelivery(config, Resources(reactor, writer, time.time))
        else:
            config = FHIRDestinationConfig(url, content_type="application/fhir+json", queue=queue_options, base_url=url,
                                           owner=("adt", "ehr"))
            delivery = FHIRDelivery(config, Resources(reactor, writer, time.time))
        queue = DestinationQueue("adt", "ehr", delivery.deliver, config.queue, writer, reactor, time.time,
                                 poll_interval=1.0, keyed=True)
        cpu, wall = time.process_time(), time.perf_counter()
        queue.start()
        while queue.sent < messages:
            yield task.deferLater(reactor, 0.005, lambda: None)
        results[kind].append((time.perf_counter() - wall, time.process_time() - cpu))
        queue.stop()
        delivery.close()
        yield writer.close()
        if kind == "fhir":
            assert len(store.xrefs(resource_type="Patient")) == messages, "every Patient cross-referenced"
        store.close()

    @defer.inlineCallbacks
    def main(reactor):
        for _ in range(repeat):
            for kind in ("http", "fhir"):
                with tempfile.TemporaryDirectory() as folder:
                    yield run(reactor, kind, Path(folder))

    from bench_http import _react

    _react(main)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sink = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    try:
        port = int(sink.stdout.readline())
        found = rows(port, args.messages, args.parallel, args.repeat)
    finally:
        sink.terminate()
        sink.wait()
    best = {kind: min(runs, key=lambda r: r[0]) for kind, runs in found.items()}
    print(f"{args.messages} Bundles, {args.parallel} in flight, best of {args.repeat}")
    for kind, (wall, cpu) in best.items():
        print(f"  {kind:5} {args.messages / wall:8.0f} deliveries/s  {cpu / args.messages * 1e6:7.0f} µs CPU per delivery")
    print(f"  fhir / http: {best['http'][0] / best['fhir'][0]:.0%} of the rate")


if __name__ == "__main__":
    main()
