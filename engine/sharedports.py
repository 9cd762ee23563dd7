"""Listening sockets the worker processes of one host share (``hl7relay run --workers N``).

Each worker opens the channels' listeners itself, with ``SO_REUSEPORT``: the kernel spreads new
connections over the workers' sockets, and when a worker dies its socket closes with it, so new
connections go to the others at once (a sender's reconnect lands on a live worker). Whether this
process is one of several workers is decided once, at its start (``share_ports``), like its umask:
the sources call :func:`listen` and do not need to know.
"""

from __future__ import annotations

import socket

from twisted.internet.abstract import isIPv6Address
from twisted.internet.error import CannotListenError

__all__ = ["share_ports", "ports_shared", "listen"]

_shared = {"on": False}
BACKLOG = 128


def share_ports(on: bool = True) -> None:
    """From now on the channels' listeners of this process share their ports with other processes."""
    _shared["on"] = on


def ports_shared() -> bool:
    return _shared["on"]


def listen(reactor, port: int, factory, interface: str = "", tls_options=None):
    """Listen on ``interface:port`` (TLS with ``tls_options``), shared with this host's other
    workers when :func:`share_ports` was called; a listening port as ``listenTCP`` returns."""
    if not _shared["on"] or port == 0:  # port 0: each would get a port of its own, nothing to share
        if tls_options is not None:
            return reactor.listenSSL(port, factory, tls_options, interface=interface)
        return reactor.listenTCP(port, factory, interface=interface)
    family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((interface or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
            sock.listen(BACKLOG)
        except OSError as exc:  # as listenTCP says it: the sources report a taken port the same way
            raise CannotListenError(interface, port, exc) from None
        sock.setblocking(False)
        if tls_options is not None:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            factory = TLSMemoryBIOFactory(tls_options, False, factory)
        return reactor.adoptStreamPort(sock.fileno(), family, factory)
    finally:
        sock.close()  # the reactor's port holds its own copy of the descriptor
