"""Writing to a connection now rather than on the reactor's next turn.

Twisted's ``transport.write`` only buffers: it asks epoll to watch the socket for writability
(one ``epoll_ctl``), sends when the next poll says it may, then stops watching (a second
``epoll_ctl``). An ACK or a delivery is small and the socket's send buffer is almost always
empty, so that is two system calls, a reactor event and a turn of latency per message, on the
listener and on the sender alike. :func:`write_now` sends at once when nothing is waiting in the
transport's buffer and leaves whatever the kernel did not take, and any error, to Twisted's own
path, which keeps its order, flow control and error handling. Transports other than plain TCP
(TLS, test transports) always take Twisted's path.
"""

from __future__ import annotations

from twisted.internet import tcp

__all__ = ["write_now"]

# the exact classes whose buffer attributes and socket are known; a subclass may change them
_PLAIN_TCP = (tcp.Server, tcp.Client)


def write_now(transport, data: bytes) -> None:
    """Write ``data`` to ``transport``, sending it immediately when the transport allows."""
    if (type(transport) in _PLAIN_TCP and not transport.TLS and transport.connected and not transport.disconnecting
            and not transport._aborting and not transport._writeDisconnected and not transport.dataBuffer
            and not transport._tempDataBuffer):
        try:
            sent = transport.socket.send(data)
        except OSError:  # EAGAIN, or an error Twisted will report through connectionLost
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
