"""The ``http`` source: a channel receives messages POSTed over HTTPS.

A sender POSTs one HL7 v2 message (``application/hl7-v2``, ``x-application/hl7-v2+er7``; segments
ending in CR, LF or CRLF) or JSON (``{"message": "MSH|..."}``) to the source's path. It is
answered only once the message and its delivery rows are committed (the ACK-after-commit rule
of MLLP): with the channel's HL7 ACK (an HL7 request) or a JSON result, 503 with Retry-After
while the store is failing (nothing was kept: send it again), 413 over ``max_body``, 429 over a
client's rate limit. A repeated ``Idempotency-Key`` gets the first answer again without the
message being processed twice (within ``idempotency_window``, in this process); the channel's
duplicates rule covers restarts.

Senders authenticate with an API token (``hl7relay token create NAME --role sender``) the
source names in ``tokens``, or with a client certificate (mutual TLS); a sender token may do
nothing but post to the channels that name it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, ClassVar

from twisted.internet import defer, protocol
from twisted.logger import Logger

from hl7relay.channels.sources import TLS_OPTIONS, Source, tls_config
from hl7relay.mllp.listener import remember_peer
from hl7relay.mllp.transport import write_now
from hl7relay.spec import Option, register
from hl7relay.store.accounts import SENDER_ROLE

__all__ = ["HTTPSourceConfig", "HTTPSource", "HL7_TYPES"]

log = Logger(namespace="hl7relay.http")

HL7_TYPES = ("application/hl7-v2", "x-application/hl7-v2+er7", "text/plain")
DEFAULT_MAX_BODY = 16 * 1024 * 1024
_TOKEN_CACHE_SECONDS = 10.0  # a revoked token is refused within this long
_RETRY_AFTER_STORE = 5  # seconds a sender is asked to wait while the store fails
_STORE_FAILING = object()


@dataclass(slots=True)
class HTTPSourceConfig:
    host: str
    port: int
    path: str
    tls: object
    tokens: tuple
    max_body: int
    rate_limit: float
    rate_burst: int
    idempotency_window: float
    charset: str
    runner: ClassVar[type[Source]]


@register("source", "http", "receive messages POSTed over HTTPS (HL7 v2 or JSON), answered after commit", [
    Option("host", "str", "127.0.0.1", "address to listen on (0.0.0.0 for all)"),
    Option("port", "int", description="TCP port"),
    Option("path", "str", "/hl7", "the path messages are POSTed to"),
    *TLS_OPTIONS,
    Option("require_client_cert", "bool", False, "mutual TLS: senders need a certificate from tls_ca"),
    Option("allow_plain_http", "bool", False, "serve without TLS (only on a loopback address: a local test)"),
    Option("tokens", "list", [], "API tokens that may post here, by name (hl7relay token create NAME --role sender)",
           item="str"),
    Option("max_body", "int", DEFAULT_MAX_BODY, "larger requests are refused (413)"),
    Option("rate_limit", "float", 0.0, "requests a second per sender (its token or certificate); over it: 429 (0: none)"),
    Option("rate_burst", "int", 20, "requests a sender may make at once after a quiet spell"),
    Option("idempotency_window", "duration", 86400.0, "seconds a repeated Idempotency-Key gets the first answer"),
    Option("charset", "str", "UTF-8", "for messages with an empty MSH-18"),
])
def _http(options, context=None):
    import ipaddress

    if not 0 <= options["port"] <= 65535:
        raise ValueError(f"port {options['port']} is not a TCP port")
    if not options["path"].startswith("/"):
        raise ValueError("path starts with /")
    tls = tls_config(options, True, getattr(context, "base_dir", None))
    host = options["host"]
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if tls is None or not tls.certificate:
        if not options["allow_plain_http"]:
            raise ValueError("an http source serves HTTPS: give tls_cert and tls_key (or allow_plain_http: true "
                             "for a local test on a loopback address)")
        if not loopback:
            raise ValueError("allow_plain_http serves a loopback address only (patient data would cross the network "
                             "readable)")
        tls = None
    if not options["tokens"] and not (tls is not None and tls.require_client_cert):
        raise ValueError("say who may post: tokens (hl7relay token create NAME --role sender) or "
                         "require_client_cert: true")
    if options["max_body"] < 1 or options["rate_limit"] < 0 or options["rate_burst"] < 1:
        raise ValueError("max_body and rate_burst must be 1 or more, rate_limit 0 (none) or more")
    return HTTPSourceConfig(host, options["port"], options["path"], tls, tuple(options["tokens"]), options["max_body"],
                            options["rate_limit"], options["rate_burst"], options["idempotency_window"],
                            options["charset"])


class _Reply:
    """An answer to one POST: status, headers, body."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, body: bytes, content_type: str, headers: dict | None = None):
        self.status, self.body = status, body
        self.headers = {"Content-Type": content_type, **(headers or {})}


_TEXT = "text/plain; charset=utf-8"
IDLE_TIMEOUT = 60.0  # seconds a kept-alive connection may wait for its next request
READ_TIMEOUT = 30.0  # seconds a request may take to arrive whole once it has begun (no slowloris)


class HTTPSource(Source):
    def __init__(self, config: HTTPSourceConfig, running):
        super().__init__(config, running)
        self.port = None
        self.endpoint = _Endpoint(self)
        self.connections: set[_Connection] = set()

    def open(self) -> str:
        config = self.config
        factory = protocol.Factory.forProtocol(lambda: _Connection(self))
        from hl7relay.mllp.tls import server_options
        from hl7relay.sharedports import listen

        port = listen(self.reactor, config.port, factory, config.host,
                      server_options(config.tls) if config.tls is not None else None)
        self.port = port
        address = port.getHost()
        self.address = f"{address.host}:{address.port}"
        scheme = "https" if config.tls is not None else "http"
        return f"HTTP{' TLS' if config.tls is not None else ''} on {self.address} ({scheme}://{self.address}{config.path})"

    def close(self, close_connections: bool):
        port, self.port = self.port, None
        d = defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)

        def closed(_):
            if close_connections:
                for connection in list(self.connections):
                    connection.transport.loseConnection()

        return d.addCallback(closed)

    def finish(self) -> int:
        return sum(connection.finish() for connection in list(self.connections))

    def abort(self) -> None:
        for connection in list(self.connections):
            connection.transport.abortConnection()

    def keeps_socket(self, new_config) -> bool:
        old = self.config
        return (self.port is not None and isinstance(new_config, HTTPSourceConfig)
                and (old.host, old.port, old.tls) == (new_config.host, new_config.port, new_config.tls))

    def reconfigure(self, new_config) -> None:
        self.config = new_config
        self.endpoint.reconfigured()

    @property
    def bound(self) -> bool:
        return self.port is not None

    @property
    def open_connections(self) -> int:
        return len(self.connections)

    def connections_view(self, most: int = 200) -> dict:
        """Open connections and the senders seen (hl7relay check --inbound, the console)."""
        now = self.reactor.seconds()
        connections = sorted(self.connections, key=lambda c: c.connected_at, reverse=True)[:most]
        peers = self.running.peers
        return {"open_connections": len(self.connections),
                "connections": [{"peer": f"{c.client[0]}:{c.client[1]}", "connected_seconds": now - c.connected_at,
                                 "messages": c.messages, "idle_seconds": now - c.last_activity} for c in connections],
                "peers": [dict(entry) for entry in reversed(list(peers.values())[-most:])]}


class _Connection(protocol.Protocol):
    """One sender's connection: requests framed by :class:`~hl7relay.httpwire.RequestFramer`,
    handled one at a time in order (HTTP answers in order), each answer written in one go."""

    transport: Any  # a TCP or TLS transport once connected

    def __init__(self, source: HTTPSource):
        from hl7relay.httpwire import RequestFramer

        self.source = source
        self.framer = RequestFramer(max_body=source.config.max_body)
        self.waiting: deque = deque()  # requests (or a refusal) read but not yet handled
        self.busy = False
        self.closed = False
        self.finishing = False
        self.subject: Any = False  # the client certificate's subject, read once (False: not yet)
        self._idle = None
        self._read = None

    def connectionMade(self):
        self.source.connections.add(self)
        peer = self.transport.getPeer()
        self.client = (getattr(peer, "host", "?"), getattr(peer, "port", 0))
        self.connected_at = self.last_activity = self.source.reactor.seconds()
        self.messages = 0
        remember_peer(self.source.running.peers, self.client[0], connected_at=self.connected_at)
        self._idle_from_now()

    def _idle_from_now(self):
        reactor = self.source.reactor
        if self._idle is not None and self._idle.active():
            self._idle.reset(IDLE_TIMEOUT)
        else:
            self._idle = reactor.callLater(IDLE_TIMEOUT, self._timed_out, "idle")

    def _timed_out(self, why: str):
        if why == "read" and not self.closed:
            self.transport.write(_response(_Reply(408, b"the request did not arrive whole in time\n", _TEXT), True))
        self.transport.loseConnection()

    def dataReceived(self, data: bytes):
        from hl7relay.httpwire import Continue

        if self.finishing:
            return
        self.last_activity = self.source.reactor.seconds()
        self._idle_from_now()
        if self._read is None:
            self._read = self.source.reactor.callLater(READ_TIMEOUT, self._timed_out, "read")
        for event in self.framer.feed(data):
            if isinstance(event, Continue):
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            else:
                self.waiting.append(event)
        if self.framer_idle() and self._read is not None and self._read.active():
            self._read.cancel()
            self._read = None
        self._next()

    def framer_idle(self) -> bool:
        return not self.framer.partial

    def _next(self):
        from hl7relay.httpwire import Refusal

        if self.busy or not self.waiting or self.closed:
            return
        event = self.waiting.popleft()
        if isinstance(event, Refusal):
            reply = _Reply(event.status, (event.text + "\n").encode(), _TEXT)
            self.transport.write(_response(reply, True))
            self.transport.loseConnection()
            return
        self.busy = True
        self.messages += 1
        remember_peer(self.source.running.peers, self.client[0], message_at=self.last_activity)
        d = defer.ensureDeferred(self.source.endpoint.post(event, self))
        d.addErrback(self._failed)
        d.addCallback(self._answered, event)

    def _failed(self, failure):
        log.failure("http source: a request failed", failure)
        return _Reply(500, b"the engine could not take the message\n", _TEXT)

    def _answered(self, reply, request):
        self.busy = False
        if self.closed:
            return  # the sender went away: the message is stored, its answer unsent
        close = not request.keep_alive or self.finishing
        write_now(self.transport, _response(reply, close))  # sent now, not on the next turn (as MLLP's ACKs)
        if close:
            self.transport.loseConnection()
        else:
            self._next()

    def client_subject(self) -> str | None:
        if self.subject is False:
            self.subject = _client_subject(self.transport)
        return self.subject or None

    def finish(self) -> int:
        """The engine stops: read nothing more, answer what is being handled, drop what waits."""
        self.finishing = True
        self.transport.pauseProducing()
        dropped = len(self.waiting)
        self.waiting.clear()
        if not self.busy:
            self.transport.loseConnection()
        return dropped

    def connectionLost(self, reason=None):
        self.closed = True
        self.source.connections.discard(self)
        for timer in (self._idle, self._read):
            if timer is not None and timer.active():
                timer.cancel()


def _response(reply: _Reply, close: bool) -> bytes:
    from hl7relay.httpwire import response

    return response(reply.status, reply.body, reply.headers, close)


class _Endpoint:
    """What one POST comes to: who sent it, whether it may, the message, and its answer."""

    def __init__(self, source: HTTPSource):
        self.source = source
        self.buckets: OrderedDict[str, Any] = OrderedDict()  # sender -> its TokenBucket
        self.idempotent: OrderedDict[str, tuple[float, Any]] = OrderedDict()  # key -> (when, reply or Deferred)
        self.tokens: dict[str, tuple[float, dict | None]] = {}  # token hash -> (checked at, row)

    def reconfigured(self) -> None:
        self.buckets.clear()

    async def post(self, request, connection) -> _Reply:
        """One request's answer: ``request`` an :class:`~hl7relay.httpwire.Request`."""
        source = self.source
        config = source.config
        if request.path != config.path:
            return _Reply(404, b"no such path: POST messages to " + config.path.encode() + b"\n", _TEXT)
        if request.method != "POST":
            return _Reply(405, b"POST a message here\n", _TEXT, {"Allow": "POST"})
        sender = await self._sender(request, connection)
        if isinstance(sender, _Reply):
            return sender
        if config.rate_limit > 0:
            limited = self._rate_limited(sender)
            if limited is not None:
                return limited
        key = request.header("idempotency-key")
        if key:
            key_id = hashlib.sha256(f"{sender}\0{key[:200]}".encode("utf-8", "replace")).hexdigest()
            now = source.reactor.seconds()
            seen = self.idempotent.get(key_id)
            if seen is not None and now - seen[0] <= config.idempotency_window:
                earlier = seen[1]
                if isinstance(earlier, defer.Deferred):  # the first is still being processed: its answer
                    waiter: defer.Deferred = defer.Deferred()

                    def relay(reply):
                        waiter.callback(reply)
                        return reply

                    earlier.addBoth(relay)
                    return await waiter
                return earlier
            pending: defer.Deferred = defer.Deferred()
            self.idempotent[key_id] = (now, pending)
            self._trim(now)
            try:
                reply = await self._message(request, sender, connection)
            except BaseException:
                self.idempotent.pop(key_id, None)  # a resend must be processed, and nobody waits for ever
                pending.errback()
                raise
            if reply.status == 503:  # not kept: a resend must be processed
                self.idempotent.pop(key_id, None)
            else:
                self.idempotent[key_id] = (now, reply)
            pending.callback(reply)
            return reply
        return await self._message(request, sender, connection)

    def _trim(self, now: float) -> None:
        window = self.source.config.idempotency_window
        while self.idempotent and (len(self.idempotent) > 100_000
                                   or now - next(iter(self.idempotent.values()))[0] > window):
            self.idempotent.popitem(last=False)

    async def _sender(self, request, connection):
        """Who sent it ("token:NAME" or "cert:SUBJECT"), or the refusal."""
        config = self.source.config
        header = request.header("authorization")
        scheme, _, token = header.partition(" ")
        if config.tokens and scheme.lower() == "bearer" and token.strip():
            row = await self._token(token.strip())
            if row is _STORE_FAILING:
                return _Reply(503, b"the engine's store cannot be read: send it again later\n", _TEXT,
                              {"Retry-After": str(_RETRY_AFTER_STORE)})
            if row is None or row["name"] not in config.tokens or row["role"] != SENDER_ROLE:
                return _refusal(403 if row is not None else 401,
                                "this token may not post here" if row is not None else "unknown or revoked token")
            return f"token:{row['name']}"
        subject = connection.client_subject()
        if subject is not None and config.tls is not None and config.tls.require_client_cert:
            return f"cert:{subject}"
        return _refusal(401, "send Authorization: Bearer TOKEN (a sender token this channel names)")

    async def _token(self, token: str):
        from hl7relay.store.accounts import token_hash

        hashed = token_hash(token)
        now = self.source.reactor.seconds()
        cached = self.tokens.get(hashed)
        if cached is not None and now - cached[0] < _TOKEN_CACHE_SECONDS:
            return cached[1]
        writer = self.source.running.resources.writer
        try:
            row = await writer.read(writer.store.find_token, hashed)
        except Exception:  # noqa: BLE001 - the store is failing: 503, not "unknown token"
            return _STORE_FAILING
        if len(self.tokens) > 10_000:
            self.tokens.clear()
        self.tokens[hashed] = (now, row)
        if row is not None and (row["last_used_at"] or 0) < self.source.running.resources.clock() - 60:
            from hl7relay.store.database import TokenUseUpdate  # `hl7relay token list`: at most a write a minute

            writer.update(TokenUseUpdate(row["name"], self.source.running.resources.clock()),
                          lazy=True).addErrback(lambda _: None)
        return row

    def _rate_limited(self, sender: str) -> _Reply | None:
        from hl7relay.apiclient.ratelimit import TokenBucket

        config = self.source.config
        bucket = self.buckets.get(sender)
        if bucket is None:
            bucket = self.buckets[sender] = TokenBucket(config.rate_limit, config.rate_burst, self.source.reactor)
            if len(self.buckets) > 10_000:
                self.buckets.popitem(last=False)
        if not bucket.take():
            wait = max(1, int(1 / config.rate_limit + 0.999))
            return _Reply(429, f"more than {config.rate_limit:g} requests a second: wait {wait} s\n".encode(),
                          "text/plain; charset=utf-8", {"Retry-After": str(wait)})
        return None

    async def _message(self, request, sender: str, connection) -> _Reply:
        from hl7relay.ack.outcome import Status
        from hl7relay.errors import ParseError
        from hl7relay.hl7.message import Message
        from hl7relay.mllp.listener import Peer

        source = self.source
        running = source.running
        content_type = request.header("content-type").split(";")[0].strip().lower()
        data = request.body
        as_json = content_type == "application/json"
        if as_json:
            try:
                body = json.loads(data)
                text = body["message"]
                if not isinstance(text, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                return _json(400, {"status": "unreadable", "text": 'a JSON body is {"message": "MSH|..."}'})
            data = text.encode("utf-8")
        elif content_type not in HL7_TYPES:
            return _Reply(415, f"send {HL7_TYPES[0]} or application/json, not {content_type or 'no content type'}\n"
                          .encode(), _TEXT)
        data = data.replace(b"\r\n", b"\r").replace(b"\n", b"\r").strip(b"\r")
        try:
            message = Message.from_bytes(data + b"\r", source.config.charset)
        except ParseError as exc:
            frames = running.unreadable(str(exc)).frames
            if as_json:
                return _json(400, {"status": "unreadable", "text": str(exc)})
            return _Reply(400, b"".join(frames), HL7_TYPES[0])
        peer = Peer(f"{sender}@{connection.client[0]}", connection.client[1])
        started = time.perf_counter()
        try:
            outcome = await running.handle(message, peer)
        except Exception:  # noqa: BLE001 - the engine's own failure: answered, never a traceback to the sender
            log.failure("http source: handling a message failed")
            from hl7relay.ack.outcome import Outcome

            outcome = Outcome.internal_error("the engine could not process the message")
        answer = running.policy.answer(message, outcome)
        ack = b"".join(answer.frames)
        stored = outcome.status is not Status.INTERNAL_ERROR
        headers = {} if stored else {"Retry-After": str(_RETRY_AFTER_STORE)}
        if as_json:
            status = {Status.ACCEPTED: 200, Status.FILTERED: 200, Status.INTERNAL_ERROR: 503}.get(outcome.status, 422)
            return _json(status, {"status": outcome.status.value, "ack_code": outcome.ack_codes[0] if outcome.ack_codes
                                  else _msa(ack), "control_id": message.control_id, "text": outcome.text,
                                  "ack": ack.decode("utf-8", "replace"),
                                  "seconds": round(time.perf_counter() - started, 6)}, headers)
        return _Reply(200 if stored else 503, ack, HL7_TYPES[0], headers)


def _msa(ack: bytes) -> str:
    at = ack.find(b"\rMSA|")
    return ack[at + 5:at + 7].decode("ascii", "replace") if at >= 0 else ""


def _json(status: int, body: dict, headers: dict | None = None) -> _Reply:
    return _Reply(status, json.dumps(body).encode(), "application/json", headers)


def _refusal(status: int, text: str) -> _Reply:
    headers = {"WWW-Authenticate": 'Bearer realm="hl7relay"'} if status == 401 else {}
    return _Reply(status, (text + "\n").encode(), "text/plain; charset=utf-8", headers)


def _client_subject(transport) -> str | None:
    """The verified client certificate's subject common name (mutual TLS), or None."""
    getter = getattr(transport, "getPeerCertificate", None)
    if getter is None:
        return None
    try:
        certificate = getter()
    except Exception:  # noqa: BLE001 - no TLS, or no certificate
        return None
    if certificate is None:
        return None
    name = certificate.get_subject()
    return getattr(name, "CN", None) or str(name)


HTTPSourceConfig.runner = HTTPSource
