"""A raw Twisted MLLP server: frames and ACKs, nothing else (no parsing, no storage).

It is both the ceiling of our stack (the benchmark's baseline) and the sink the engine's MLLP
destination delivers to. MSA-2 echoes MSH-10, cut from the bytes, so senders can match ACKs.

    python bench/mllp_sink.py PORT STATS_FILE
"""

import json
import signal
import sys
import time

from twisted.internet import protocol, reactor

from hl7relay.mllp.framing import Frame, MLLPFramer, frame  # the framer only: the baseline is framing + ACK

HEAD = b"MSH|^~\\&|SINK|SINK|||20240101000000||ACK^A01^ACK|1|P|2.5.1\rMSA|AA|"
stats = {"received": 0, "first": None, "last": None}


def answer(framer: MLLPFramer, data: bytes, head: bytes = HEAD) -> tuple[list[bytes], list[bytes]]:
    """The payloads ``data`` completes, and an AA frame for each (MSA-2 = its MSH-10, cut from the bytes)."""
    payloads = [event.payload for event in framer.feed(data) if isinstance(event, Frame)]
    acks = []
    for payload in payloads:
        fields = payload.split(b"|", 10)
        acks.append(frame(head + (fields[9] if len(fields) > 9 else b"") + b"\r"))
    return payloads, acks


class Sink(protocol.Protocol):
    def connectionMade(self):
        self.framer = MLLPFramer()

    def dataReceived(self, data):
        payloads, out = answer(self.framer, data)
        stats["received"] += len(payloads)
        if out:
            now = time.monotonic()
            stats["first"] = stats["first"] or now
            stats["last"] = now
            self.transport.write(b"".join(out))


def serve(port: int, protocol_class, on_stop=None) -> None:
    """Listen on 127.0.0.1:``port``, print "ready", run until SIGTERM (calling ``on_stop`` first)."""
    factory = protocol.Factory.forProtocol(protocol_class)
    factory.noisy = False
    reactor.listenTCP(port, factory, interface="127.0.0.1")

    def stop(*_):
        if on_stop is not None:
            on_stop()
        reactor.stop()

    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(stop))
    print("ready", flush=True)
    reactor.run(installSignalHandlers=False)


def main():
    port, stats_file = int(sys.argv[1]), sys.argv[2]

    def dump(*_):
        with open(stats_file, "w") as f:
            json.dump(stats, f)

    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(dump))
    serve(port, Sink, on_stop=dump)


if __name__ == "__main__":
    main()
