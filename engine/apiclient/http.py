"""One HTTP(S) request and its answer, over Twisted's Agent: what the ``http`` destination and the
OAuth 2.0 token requests use.

Redirects are never followed (an Authorization header must not reach another origin: a 3xx is an
answer, classified by :mod:`~hl7relay.apiclient.responses`). Answers are read up to
``max_answer_bytes`` (a peer cannot fill our memory). Every failure to get an answer becomes an
:class:`HTTPFailure` saying, in words a support engineer can act on, whether the peer could not be
reached (nothing was sent) or did not answer in time (it may have the request).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from twisted.internet import defer, protocol
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from hl7relay.errors import HL7RelayError

__all__ = ["HTTPAnswer", "HTTPFailure", "HTTPClient", "safe_url", "MAX_ANSWER_BYTES"]

MAX_ANSWER_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class HTTPAnswer:
    status: int
    headers: dict  # names in lower case; a repeated header's last value
    body: bytes
    seconds: float  # round trip
    truncated: bool = False


class HTTPFailure(HL7RelayError):
    """No answer. ``unreachable``: not connected, nothing was sent; otherwise the request may have
    reached the peer (no answer in time, the connection dropped)."""

    def __init__(self, text: str, unreachable: bool, timed_out: bool = False):
        super().__init__(text)
        self.unreachable = unreachable
        self.timed_out = timed_out


def safe_url(url: str) -> str:
    """The URL as logs, status and the tracer show it: no user:password, no query (API keys travel
    there), no fragment."""
    parts = urlsplit(url)
    netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class _BoundedBody(protocol.Protocol):
    def __init__(self, finished: defer.Deferred, limit: int):
        self.finished = finished
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.truncated = False

    def dataReceived(self, data: bytes) -> None:
        if self.truncated:
            return
        room = self.limit - self.size
        if len(data) > room:
            self.parts.append(data[:room])
            self.size = self.limit
            self.truncated = True
            if self.transport is not None:
                self.transport.stopProducing()  # the rest is not read
            return
        self.parts.append(data)
        self.size += len(data)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        from twisted.web.client import PotentialDataLoss, ResponseDone

        if self.finished.called:
            return
        if self.truncated or reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.parts))
        else:
            self.finished.errback(reason)


def _policy(tls):
    """Who to trust for HTTPS: ``tls.ca`` (or the system's store), presenting ``tls``'s client
    certificate when it has one (mutual TLS)."""
    @implementer(IPolicyForHTTPS)
    class Policy:
        def creatorForNetloc(self, hostname: bytes, port: int):
            from twisted.internet import ssl

            host = hostname.decode("ascii")
            if tls is None:
                return ssl.optionsForClientTLS(host)
            from hl7relay.mllp.tls import client_options

            return client_options(tls, host)

    return Policy()


class HTTPClient:
    """Requests to one peer (connections kept open and reused, up to ``connections`` at once)."""

    def __init__(self, reactor, tls=None, connect_timeout: float = 10.0, connections: int = 2,
                 max_answer_bytes: int = MAX_ANSWER_BYTES):
        from twisted.web.client import Agent, HTTPConnectionPool

        self.reactor = reactor
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = max(1, connections)
        self.pool.retryAutomatically = False  # a request that may have arrived is never sent again behind our back
        self.agent = Agent(reactor, contextFactory=_policy(tls), connectTimeout=connect_timeout, pool=self.pool)
        self.max_answer_bytes = max_answer_bytes

    def request(self, method: str, url: str, headers: dict, body: bytes | None, timeout: float) -> defer.Deferred:
        """A Deferred firing with an :class:`HTTPAnswer` or failing with an :class:`HTTPFailure`."""
        from twisted.web.http_headers import Headers

        raw = Headers()
        for name, value in headers.items():
            raw.addRawHeader(name.encode("latin-1"), str(value).encode("latin-1"))
        started = time.perf_counter()
        producer = _Bytes(body) if body is not None else None
        d = self.agent.request(method.encode("ascii"), url.encode("ascii"), raw, producer)  # type: ignore[arg-type]

        def answered(response):
            finished: defer.Deferred = defer.Deferred()
            reader = _BoundedBody(finished, self.max_answer_bytes)
            response.deliverBody(reader)
            names = {k.decode("latin-1").lower(): v[-1].decode("latin-1", "replace")
                     for k, v in response.headers.getAllRawHeaders()}
            return finished.addCallback(lambda data: HTTPAnswer(response.code, names, data,
                                                                time.perf_counter() - started, reader.truncated))

        d.addCallback(answered)
        d.addTimeout(timeout, self.reactor)
        return d.addErrback(_failure, url, timeout)

    def close(self) -> defer.Deferred:
        return self.pool.closeCachedConnections()


@implementer(IBodyProducer)
class _Bytes:
    """A request body already in memory, written at once (no cooperator round trips)."""

    def __init__(self, data: bytes):
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self.data)
        return defer.succeed(None)

    def stopProducing(self):
        pass

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass


def _failure(failure, url: str, timeout: float):
    from twisted.internet import error
    from twisted.web._newclient import RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived

    where = safe_url(url)
    if failure.check(defer.TimeoutError, defer.CancelledError):
        raise HTTPFailure(f"{where}: no answer within {timeout:g} s", unreachable=False, timed_out=True)
    if failure.check(error.DNSLookupError):
        raise HTTPFailure(f"{where}: the host name does not resolve ({failure.getErrorMessage()})", unreachable=True)
    if failure.check(error.ConnectionRefusedError):
        raise HTTPFailure(f"{where}: connection refused", unreachable=True)
    if failure.check(error.TimeoutError, error.ConnectingCancelledError):
        raise HTTPFailure(f"{where}: could not connect in time", unreachable=True)
    if failure.check(error.ConnectError):
        raise HTTPFailure(f"{where}: cannot connect ({failure.getErrorMessage()})", unreachable=True)
    if failure.check(ResponseNeverReceived, RequestTransmissionFailed, ResponseFailed):
        from hl7relay.mllp.tls import describe_tls_failure, is_tls_failure

        reasons = getattr(failure.value, "reasons", []) or []
        for reason in reasons:
            if is_tls_failure(reason):
                raise HTTPFailure(f"{where}: {describe_tls_failure(reason)}", unreachable=True)
        if failure.check(RequestTransmissionFailed):
            raise HTTPFailure(f"{where}: the connection failed while sending", unreachable=False)
        raise HTTPFailure(f"{where}: the connection closed before a whole answer", unreachable=False)
    if failure.check(ValueError):  # a URL Twisted cannot request (a scheme, a host)
        raise HTTPFailure(f"{where}: {failure.getErrorMessage()}", unreachable=True)
    return failure
