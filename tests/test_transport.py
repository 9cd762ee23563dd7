"""write_now: sent at once on a plain TCP connection, Twisted's buffer otherwise, order always kept."""

import socket

from twisted.internet import protocol
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.testing import StringTransport

from hl7relay.mllp.transport import write_now


class _Server(protocol.Protocol):
    def connectionMade(self):
        self.factory.connected.append(self)


def _connection():
    reactor = EPollReactor()  # a reactor of the test's own, driven by hand
    factory = protocol.Factory.forProtocol(_Server)
    factory.connected = []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    for _ in range(100):
        if factory.connected:
            break
        reactor.iterate(0.01)
    return reactor, port, client, factory.connected[0].transport


def _close(reactor, port, client):
    client.close()
    port.stopListening()
    for _ in range(5):
        reactor.iterate(0)
    reactor.removeAll()


def test_a_small_write_leaves_at_once_without_waiting_for_the_reactor():
    reactor, port, client, transport = _connection()
    try:
        write_now(transport, b"\x0bMSH|ACK\x1c\r")
        assert client.recv(100) == b"\x0bMSH|ACK\x1c\r"  # no reactor turn in between
        assert not transport.dataBuffer and not transport._tempDataBuffer
        assert transport not in reactor.getWriters()  # nothing left for epoll to watch
    finally:
        _close(reactor, port, client)


def test_what_the_kernel_does_not_take_is_buffered_and_later_writes_queue_behind_it():
    reactor, port, client, transport = _connection()
    try:
        big = bytes(range(256)) * 65536  # 16 MB: far more than a socket buffer holds
        write_now(transport, big)
        assert transport._tempDataBuffer  # the rest waits in Twisted's buffer
        write_now(transport, b"AFTER")  # must not overtake it
        received = bytearray()
        client.setblocking(False)
        while len(received) < len(big) + 5:
            reactor.iterate(0)
            try:
                received += client.recv(1 << 20)
            except BlockingIOError:
                pass
        assert bytes(received) == big + b"AFTER"
    finally:
        _close(reactor, port, client)


def test_other_transports_take_twisteds_path():
    transport = StringTransport()
    write_now(transport, b"data")
    assert transport.value() == b"data"


def test_a_closing_connection_is_left_to_twisted():
    reactor, port, client, transport = _connection()
    try:
        transport.loseConnection()
        write_now(transport, b"late")  # exactly what transport.write does then, not a send behind its back
        assert transport._tempDataBuffer == [b"late"]
    finally:
        _close(reactor, port, client)


def test_an_aborted_connection_gets_nothing_more():
    reactor, port, client, transport = _connection()
    try:
        transport.abortConnection()
        write_now(transport, b"late")  # Twisted discards it; it must not reach the socket either
        client.settimeout(2)
        for _ in range(5):
            reactor.iterate(0)
        assert client.recv(100) == b""  # closed (or reset) without the late bytes
    except ConnectionResetError:
        pass
    finally:
        _close(reactor, port, client)
