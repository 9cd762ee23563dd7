"""A raw Twisted MLLP relay: frames, ACKs at once, and forwards every frame to a downstream MLLP
peer over N connections, one message in flight on each (no parsing beyond MSH-10, no storage).

It is the ceiling of our stack for what the engine does end to end (two MLLP hops on one
core): the benchmark's second baseline.

    python bench/mllp_relay.py PORT DOWNSTREAM_PORT CONNECTIONS
"""

import sys
from collections import deque

from twisted.internet import protocol, reactor

from mllp_sink import answer, serve  # the sink's framing and ACKs (this folder is on sys.path when run as a script)

from hl7relay.mllp.framing import Frame, MLLPFramer, frame

HEAD = b"MSH|^~\\&|RELAY|RELAY|||20240101000000||ACK^A01^ACK|1|P|2.5.1\rMSA|AA|"
backlog: deque = deque()
idle: list = []


class Inbound(protocol.Protocol):
    def connectionMade(self):
        self.framer = MLLPFramer()

    def dataReceived(self, data):
        payloads, out = answer(self.framer, data, HEAD)
        backlog.extend(payloads)
        if out:
            self.transport.write(b"".join(out))
        while idle and backlog:
            idle.pop().send(backlog.popleft())


class Outbound(protocol.Protocol):
    def connectionMade(self):
        self.framer = MLLPFramer()
        self.ready()

    def ready(self):
        if backlog:
            self.send(backlog.popleft())
        else:
            idle.append(self)

    def send(self, payload):
        self.transport.write(frame(payload))

    def dataReceived(self, data):
        for event in self.framer.feed(data):
            if isinstance(event, Frame):
                self.ready()


def main():
    port, downstream, connections = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    outbound = protocol.ClientFactory.forProtocol(Outbound)
    outbound.noisy = False
    for _ in range(connections):
        reactor.connectTCP("127.0.0.1", downstream, outbound)
    serve(port, Inbound)


if __name__ == "__main__":
    main()
