"""The MLLP listener: Twisted wiring around :class:`~hl7relay.mllp.framing.MLLPFramer`.

Each connection hands its messages, one at a time and in order, to a
:class:`~hl7relay.receiving.Receiver` (the engine's running channel) and writes the
:class:`~hl7relay.ack.answer.Answer` it gets back, only when it arrives: a receiver that commits
to a store first gives ACK-after-commit. The listener makes no ACK of its own: payloads that are
not HL7, frames over the limit and handler failures are answered as the receiver's ACK policy
says. Time comes from the injected reactor, so tests drive it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from hl7relay.ack.answer import Answer, Receiver
from hl7relay.events import emit
from hl7relay.hl7.charsets import DEFAULT_CHARSET, UTF8_BOM
from hl7relay.errors import ParseError
from hl7relay.mllp.framing import DEFAULT_MAX_FRAME_BYTES, Discarded, Frame, FrameTooLarge, MLLPFramer, frame
from hl7relay.hl7.message import Message
from hl7relay.mllp.tls import TLSConfig, describe_tls_failure, is_tls_failure, server_options
from hl7relay.mllp.transport import write_now

__all__ = ["ListenerConfig", "MLLPListenerFactory", "MLLPServerProtocol", "Peer", "listen", "default_max_connections"]

log = Logger(namespace="hl7relay.listener")


def default_max_connections() -> int:
    """A global limit sized from the process's file limit: half of it (the other half is for the
    store, destinations, logs), at least 64 and at most 10,000."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 1024
    if soft == resource.RLIM_INFINITY:
        return 10_000
    return max(64, min(10_000, soft // 2))


@dataclass(slots=True)
class ListenerConfig:
    """Options of one MLLP listener, with their defaults.

    Connection slots cannot be used to lock a hospital out: one address may hold at most
    ``max_connections_per_peer`` connections (a PMS needs a few), the global limit is sized from
    the file limit, and when it is reached the longest-idle connection is closed to make room
    for the new one rather than the new one being refused. ``allow`` (CIDRs) refuses everyone else.
    """

    host: str = "127.0.0.1"  # localhost only unless told otherwise
    port: int = 2575  # HL7's registered port
    max_connections: int = field(default_factory=default_max_connections)
    max_connections_per_peer: int = 16  # from one address; at the limit its longest-idle one makes room
    allow: tuple = ()  # ip_network objects; empty: any address
    read_timeout: float = 30.0  # seconds a started frame may take to complete
    idle_timeout: float = 0.0  # seconds without any byte before the connection is closed; 0: never
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    charset: str = DEFAULT_CHARSET  # for messages whose MSH-18 is empty
    tls: TLSConfig | None = None
    keepalive: bool = True  # TCP keepalive, so dead peers are noticed


@dataclass(frozen=True, slots=True)
class Peer:
    """Who sent a message: address, port and (with mutual TLS) the client certificate subject."""

    host: str
    port: int
    certificate_subject: str | None = None
    # 'host:port', made once per connection: each message's trip records it (one string shared by
    # the connection's messages, its hash computed once)
    text: str = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "text", f"{self.host}:{self.port}")

    def __str__(self) -> str:
        return self.text


def _allowed(host: str, networks) -> bool:
    import ipaddress

    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


MAX_PEERS_REMEMBERED = 1000


class MLLPServerProtocol(Protocol):
    transport: Any  # a TCP or TLS transport once connected (Twisted types it ITransport | None)

    def __init__(self, factory: "MLLPListenerFactory"):
        self.factory = factory
        self.framer = MLLPFramer(factory.config.max_frame_bytes)
        self.queue: deque[bytes | FrameTooLarge] = deque()  # frames received, answered in turn
        self.busy = False
        self.closed = False
        self.peer = Peer("", 0)  # who connected (connectionMade)
        self._read_timer = None
        self._idle_timer = None
        self.closing_after_answer = False
        self.finishing = False  # the engine is stopping: nothing more is read
        self.last_activity = 0.0
        self.connected_at = 0.0
        self.messages = 0  # frames received on this connection

    # -- connection ----------------------------------------------------------------------------
    def connectionMade(self):
        factory = self.factory
        config = factory.config
        address = self.transport.getPeer()
        self.peer = Peer(getattr(address, "host", "?"), getattr(address, "port", 0))
        if config.allow and not _allowed(self.peer.host, config.allow):
            self._refuse("not_allowed", "{peer} is not in the listener's allow list")
            return
        if (factory.per_peer.get(self.peer.host, 0) >= config.max_connections_per_peer
                and not factory.evict_idlest(self, host=self.peer.host)):
            # a PMS that opens a connection per message and never closes them would otherwise
            # lock its own address out: its longest-idle connection makes room, as for the total
            self._refuse("per_peer", "{host} already has {limit} connections open, none idle to close "
                         "(max_connections_per_peer)", host=self.peer.host, limit=config.max_connections_per_peer)
            return
        if factory.open_connections >= config.max_connections and not factory.evict_idlest(self):
            self._refuse("max_connections", "{limit} connections open, none idle to close (max_connections)",
                         limit=config.max_connections)
            return
        factory.open_connections += 1
        factory.per_peer[self.peer.host] = factory.per_peer.get(self.peer.host, 0) + 1
        factory.connections.add(self)
        self.connected_at = factory.reactor.seconds()
        factory.peer_seen(self.peer.host, connected_at=self.connected_at)
        emit("connection_opened", listener=factory.name)
        if factory.config.keepalive and hasattr(self.transport, "setTcpKeepAlive"):
            try:
                self.transport.setTcpKeepAlive(True)
            except (AttributeError, OSError):  # not every transport has a socket under it
                pass
        self._touch()

    def _refuse(self, reason: str, text: str, **fields):
        factory = self.factory
        factory.refused_connections += 1
        emit("connection_refused", listener=factory.name, reason=reason)
        log.warn("refusing connection from {peer}: " + text, peer=str(self.peer), **fields)
        self.closed = True
        self.transport.abortConnection()

    def connectionLost(self, reason=None):
        if self.factory.config.tls is not None and is_tls_failure(reason):
            self.factory.tls_failures += 1
            emit("connection_refused", listener=self.factory.name, reason="tls")
            log.warn("TLS with {peer} failed: {text}", peer=str(self.peer), text=describe_tls_failure(reason))
        self.factory.forget(self)
        self.closed = True
        self._cancel("_read_timer")
        self._cancel("_idle_timer")

    # -- bytes in ------------------------------------------------------------------------------
    def dataReceived(self, data: bytes):
        if self.closed or self.finishing:
            return
        self._touch()
        for event in self.framer.feed(data):
            if isinstance(event, Frame):
                self.queue.append(event.payload)
                self.messages += 1
                self.factory.peer_seen(self.peer.host, message_at=self.last_activity)
            elif isinstance(event, Discarded):
                self.factory.discarded_bytes += event.count
                emit("bytes_discarded", listener=self.factory.name, count=event.count)
                log.warn("discarded {count} bytes outside MLLP frames from {peer}", count=event.count, peer=str(self.peer))
            elif isinstance(event, FrameTooLarge):
                self.factory.oversized_frames += 1
                emit("frame_discarded", listener=self.factory.name, reason="oversize")
                log.error("frame from {peer} exceeds {limit} bytes; answering AR and closing the connection",
                          peer=str(self.peer), limit=event.limit)
                # answered in turn, after the frames before it, then the connection is closed:
                # the sender reads "too big" instead of guessing at a network fault
                self.queue.append(event)
                self._cancel("_read_timer")
                self._next()
                return
        self._arm_read_timer()
        self._next()

    def _arm_read_timer(self):
        if self.framer.in_frame:
            if self._read_timer is None:
                self._read_timer = self.factory.reactor.callLater(self.factory.config.read_timeout, self._read_timed_out)
        else:
            self._cancel("_read_timer")

    def _read_timed_out(self):
        self._read_timer = None
        self.factory.timed_out_frames += 1
        emit("frame_discarded", listener=self.factory.name, reason="read_timeout")
        log.warn("frame from {peer} incomplete after {timeout}s ({size} bytes); resetting the connection",
                 peer=str(self.peer), timeout=self.factory.config.read_timeout, size=self.framer.buffered)
        self.framer.reset()
        self._abort()

    @property
    def idle(self) -> bool:
        """Nothing half-received, nothing being processed or waiting to be: safe to close."""
        return not (self.busy or self.queue or self.framer.in_frame or self.closed)

    def _touch(self):
        self.last_activity = self.factory.reactor.seconds()
        timeout = self.factory.config.idle_timeout
        if timeout > 0:
            self._cancel("_idle_timer")
            self._idle_timer = self.factory.reactor.callLater(timeout, self._idle_timed_out)

    def _idle_timed_out(self):
        self._idle_timer = None
        if self.busy or self.queue:
            self._touch()  # still working on what this peer sent
            return
        log.info("closing idle connection from {peer}", peer=str(self.peer))
        self.transport.loseConnection()

    def _cancel(self, name):
        timer = getattr(self, name)
        if timer is not None and timer.active():
            timer.cancel()
        setattr(self, name, None)

    def _abort(self):
        self.closed = True
        self.queue.clear()
        self.transport.abortConnection()

    def finish(self) -> int:
        """The engine is stopping: read nothing more, answer the message being processed, then
        close. Frames received but not started are dropped unanswered (their sender sends them
        again, as after any lost connection); returns how many."""
        if self.closed:
            return 0
        self.finishing = True
        dropped = sum(1 for payload in self.queue if not isinstance(payload, FrameTooLarge))
        self.queue.clear()
        self._cancel("_read_timer")
        self._cancel("_idle_timer")
        self.transport.pauseProducing()
        if self.busy:
            self.closing_after_answer = True  # _write closes it once the answer is out
        else:
            self.closed = True
            self.transport.loseConnection()
        return dropped

    # -- messages, one at a time per connection -------------------------------------------------
    def _next(self):
        if self.busy or not self.queue or self.closed:
            return
        self.busy = True
        payload = self.queue.popleft()
        d = defer.maybeDeferred(self._process, payload)
        d.addErrback(self._failed)
        d.addBoth(self._write)

    def _process(self, payload):
        config, receiver = self.factory.config, self.factory.receiver
        if isinstance(payload, FrameTooLarge):
            return self._too_large(payload)
        body = payload[len(UTF8_BOM):] if payload.startswith(UTF8_BOM) else payload
        if not body.strip(b"\r\n\t "):
            return receiver.unreadable("empty MLLP frame")
        if not body.startswith(b"MSH"):
            return receiver.unreadable("the payload does not start with an MSH segment")
        try:
            message = Message.from_bytes(payload, config.charset)
        except ParseError as exc:
            return receiver.unreadable(str(exc))
        return receiver.receive(message, self.peer)

    def _too_large(self, event: FrameTooLarge) -> Answer:
        text = f"the message is {event.size:,}+ bytes, over this listener's limit of {event.limit:,} bytes; not accepted"
        head = event.head[len(UTF8_BOM):] if event.head.startswith(UTF8_BOM) else event.head
        header = None
        if head.startswith(b"MSH"):
            try:
                header = Message.from_bytes(head + b"\r", self.factory.config.charset)
            except ParseError:
                header = None
        return self.factory.receiver.too_large(header, text)

    def _failed(self, failure):
        log.failure("internal error answering {peer}", failure, peer=str(self.peer))
        return self.factory.receiver.unreadable("internal error")

    def _write(self, answer: Answer):
        self.busy = False
        frames = answer.frames
        if self.closed:
            if frames:
                log.warn("connection from {peer} closed before its ACK could be sent", peer=str(self.peer))
            return
        if frames:
            write_now(self.transport, b"".join([frame(ack) for ack in frames]))
            self.last_activity = self.factory.reactor.seconds()
        if answer.close or self.closing_after_answer:
            self.closed = True
            self.queue.clear()
            self.transport.loseConnection()  # after the answer is written
            return
        self._next()


class MLLPListenerFactory(Factory):
    """One listener: its configuration, its receiver and its counters."""

    noisy = False  # the engine prints its own startup lines

    def __init__(self, receiver: Receiver, config: ListenerConfig | None = None, reactor=None, name: str = "mllp"):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.receiver = receiver
        self.name = name  # labels this listener's metrics and logs
        self.config = config or ListenerConfig()
        self.reactor = reactor
        self.connections: set[MLLPServerProtocol] = set()
        self.per_peer: dict[str, int] = {}  # open connections by peer address
        self.evicted_connections = 0
        self.tls_failures = 0
        self.open_connections = 0
        self.refused_connections = 0
        self.discarded_bytes = 0
        self.oversized_frames = 0
        self.timed_out_frames = 0
        # who has connected, most recent last: "can the PMS reach us?" (hl7relay check --inbound)
        self.peers: dict[str, dict] = {}

    def peer_seen(self, host: str, connected_at: float | None = None, message_at: float | None = None) -> None:
        remember_peer(self.peers, host, connected_at, message_at)

    def view(self, most: int = 200) -> dict:
        """Open connections and the peers seen, newest first (at most ``most`` of each)."""
        now = self.reactor.seconds()
        connections = sorted(self.connections, key=lambda p: p.connected_at, reverse=True)[:most]
        return {"open_connections": self.open_connections, "refused_connections": self.refused_connections,
                "tls_failures": self.tls_failures,
                "connections": [{"peer": str(p.peer), "connected_seconds": now - p.connected_at, "messages": p.messages,
                                 "idle_seconds": now - p.last_activity} for p in connections],
                "peers": [dict(entry) for entry in reversed(list(self.peers.values())[-most:])]}

    def buildProtocol(self, addr):
        return MLLPServerProtocol(self)

    def forget(self, protocol: MLLPServerProtocol) -> None:
        """Count a connection out (once: closing, or evicted before its close arrives)."""
        if protocol not in self.connections:
            return
        self.connections.discard(protocol)
        self.open_connections -= 1
        remaining = self.per_peer.get(protocol.peer.host, 1) - 1
        if remaining > 0:
            self.per_peer[protocol.peer.host] = remaining
        else:
            self.per_peer.pop(protocol.peer.host, None)
        emit("connection_closed", listener=self.name)

    def evict_idlest(self, newcomer: MLLPServerProtocol, host: str | None = None) -> bool:
        """Close the connection idle the longest (of ``host``'s, when given) to make room; False
        when every one is busy."""
        idle = [p for p in self.connections if p.idle and (host is None or p.peer.host == host)]
        if not idle:
            return False
        victim = min(idle, key=lambda p: p.last_activity)
        self.evicted_connections += 1
        emit("connection_evicted", listener=self.name)
        limit = (f"{self.config.max_connections_per_peer} connections open from {host}: max_connections_per_peer"
                 if host is not None else f"{self.config.max_connections} connections open: max_connections")
        log.warn("closing the connection from {victim}, idle {seconds:.0f}s, to make room for {peer} ({limit})",
                 victim=str(victim.peer), peer=str(newcomer.peer), seconds=self.reactor.seconds() - victim.last_activity,
                 limit=limit)
        self.forget(victim)  # counted out now, so the newcomer's slot is free at once
        victim.closed = True
        victim._cancel("_read_timer")
        victim._cancel("_idle_timer")
        victim.transport.abortConnection()
        return True


def remember_peer(peers: dict, host: str, connected_at: float | None = None, message_at: float | None = None) -> None:
    """Note a connection or a message from ``host`` in ``peers`` (most recent last, bounded): who
    has reached a listener, for "can the PMS reach us?" (hl7relay check --inbound)."""
    entry = peers.get(host)
    if entry is None:
        entry = peers[host] = {"host": host, "connections": 0, "messages": 0, "last_connected_at": None,
                               "last_message_at": None}
        if len(peers) > MAX_PEERS_REMEMBERED:
            del peers[next(iter(peers))]  # the one seen least recently (dicts keep insertion order)
    elif connected_at is not None:
        peers[host] = peers.pop(host)  # seen again: to the end
    if connected_at is not None:
        entry["connections"] += 1
        entry["last_connected_at"] = connected_at
    if message_at is not None:
        entry["messages"] += 1
        entry["last_message_at"] = message_at


def listen(receiver: Receiver, config: ListenerConfig, reactor=None, name: str = "mllp", peers: dict | None = None):
    """Start listening; returns the IListeningPort (``.getHost().port`` tells the bound port).
    ``peers``: where to remember the peers seen (kept by the caller across re-opens)."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    factory = MLLPListenerFactory(receiver, config, reactor, name)
    if peers is not None:
        factory.peers = peers
    from hl7relay.sharedports import listen as listen_shared

    return listen_shared(reactor, config.port, factory, config.host,
                         server_options(config.tls) if config.tls is not None else None)
