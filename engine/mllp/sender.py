"""The MLLP sender: one kept-open connection, one message at a time, typed outcomes.

``send()`` writes a message and waits for the ACK whose MSA-2 is the message's MSH-10 (other
frames are logged and ignored). In enhanced mode it waits for the application ACK when MSH-16 is
AL; otherwise the accept ACK is the answer. A lost connection is reopened on the next send, after
an exponential backoff with jitter when connecting keeps failing.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass

from twisted.internet import defer, error as net_error
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger

from hl7relay.errors import AckTimeout, ParseError, PeerApplicationError, PeerRejected, SendConnectionError
from hl7relay.mllp.framing import DEFAULT_MAX_FRAME_BYTES, Frame, FrameTooLarge, MLLPFramer, frame
from hl7relay.hl7.message import Message
from hl7relay.outcomes import AckCode
from hl7relay.mllp.tls import TLSConfig, client_options, describe_tls_failure, is_tls_failure, looks_like_tls
from hl7relay.mllp.transport import write_now

__all__ = ["SendStatus", "SendResult", "SenderConfig", "MLLPSender", "expects_ack"]

log = Logger(namespace="hl7relay.sender")
# MSA-1 as plain str, and what each says about the delivery
_CA = AckCode.CA.value
_ACCEPT_CODES = (AckCode.AA.value.encode(), AckCode.CA.value.encode())  # what the byte matcher recognises


class SendStatus(enum.Enum):
    ACCEPTED = "accepted"  # AA, or CA when no application ACK was asked for
    APPLICATION_ERROR = "application_error"  # AE: needs a person, not resent
    REJECTED = "rejected"  # AR / CR (and CE): retryable
    TIMED_OUT = "timed_out"  # no matching ACK in time: retryable
    CONNECTION_FAILED = "connection_failed"  # could not connect: retryable


_STATUS_OF_CODE = {AckCode.AA.value: SendStatus.ACCEPTED, AckCode.CA.value: SendStatus.ACCEPTED,
                   AckCode.AE.value: SendStatus.APPLICATION_ERROR, AckCode.AR.value: SendStatus.REJECTED,
                   AckCode.CR.value: SendStatus.REJECTED, AckCode.CE.value: SendStatus.REJECTED}


@dataclass(slots=True)
class SendResult:
    status: SendStatus
    control_id: str
    ack_code: str = ""  # MSA-1
    text: str = ""  # MSA-3 and the ERR texts, or what went wrong
    ack: Message | None = None
    ack_bytes: bytes | None = None  # the ACK as received, when it was matched without parsing it

    @property
    def ok(self) -> bool:
        return self.status is SendStatus.ACCEPTED

    def ack_message(self) -> Message | None:
        """The peer's ACK as a message (parsed now when it was matched from its bytes)."""
        if self.ack is None and self.ack_bytes is not None:
            self.ack = Message.from_bytes(self.ack_bytes)
        return self.ack

    def ack_as_text(self) -> str:
        """The peer's ACK as text, for the record ('' when none came)."""
        if self.ack is None and self.ack_bytes is not None:
            return self.ack_bytes.decode("ascii")  # matched from its bytes only when ASCII
        return self.ack.to_text() if self.ack is not None else ""

    @property
    def retryable(self) -> bool:
        return self.status in (SendStatus.REJECTED, SendStatus.TIMED_OUT, SendStatus.CONNECTION_FAILED)

    def raise_for_status(self) -> "SendResult":
        errors = {SendStatus.APPLICATION_ERROR: PeerApplicationError, SendStatus.REJECTED: PeerRejected,
                  SendStatus.TIMED_OUT: AckTimeout, SendStatus.CONNECTION_FAILED: SendConnectionError}
        if self.status in errors:
            raise errors[self.status](f"{self.control_id}: {self.ack_code or self.status.value} {self.text}".strip())
        return self


@dataclass(slots=True)
class SenderConfig:
    host: str
    port: int
    connect_timeout: float = 10.0
    ack_timeout: float = 30.0
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    backoff_initial: float = 1.0  # first wait after a failed connection attempt
    backoff_max: float = 60.0
    tls: TLSConfig | None = None


def ack_text(ack: Message) -> str:
    """MSA-3 and every ERR's text, for people."""
    if not ack.get("MSA-3") and not ack.count("ERR"):
        return ""  # the usual AA
    parts = [ack.get("MSA-3")]
    for occurrence in range(1, ack.count("ERR") + 1):
        text = ack.get(f"ERR[{occurrence}]-8") or ack.get(f"ERR[{occurrence}]-3.2") or ack.get(f"ERR[{occurrence}]-1.4.2")
        location = ack.get(f"ERR[{occurrence}]-2") or ack.get(f"ERR[{occurrence}]-1.1")
        parts.append(f"{location.replace(ack.delimiters.component or '^', '^')}: {text}" if location else text)
    return "; ".join(p for p in parts if p)


def _plain_ack(payload: bytes) -> tuple[str, str] | None:
    """(MSA-1, MSA-2) of an ACK that needs no parsing to be understood: ASCII, the standard
    delimiters, CR between segments, an AA or CA, no MSA-3 and no ERR, an MSA-2 without
    delimiters or escapes. Anything else (None) is parsed as a message, which reads every form."""
    if not payload.startswith(b"MSH|^~\\&|") or not payload.isascii() or b"\rERR|" in payload:
        return None
    start = payload.find(b"\rMSA|")
    if start == -1:
        return None
    end = payload.find(b"\r", start + 5)
    fields = payload[start + 5:len(payload) if end == -1 else end].split(b"|")
    if len(fields) < 2 or fields[0] not in _ACCEPT_CODES or any(fields[2:]):
        return None
    acked = fields[1]
    if not acked or any(c in acked for c in b"^~\\&\n"):
        return None
    return fields[0].decode(), acked.decode()


class _SenderProtocol(Protocol):
    def __init__(self, sender: "MLLPSender"):
        self.sender = sender
        self.framer = MLLPFramer(sender.config.max_frame_bytes)
        self.tls_answer = False  # the peer answered plain MLLP with TLS bytes: a TLS port
        self.received = False

    def connectionMade(self):
        self.sender._connected(self)

    def dataReceived(self, data: bytes):
        self.received = True
        if not self.framer.in_frame and self.sender.config.tls is None and looks_like_tls(data):
            self.tls_answer = True
        for event in self.framer.feed(data):
            if isinstance(event, Frame):
                self.sender._frame_received(event.payload)
            elif isinstance(event, FrameTooLarge):
                log.error("ACK frame larger than {limit} bytes; dropping the connection", limit=event.limit)
                self.transport.abortConnection()
                return

    def connectionLost(self, reason=None):
        self.sender._disconnected(self, reason)


class _Factory(ClientFactory):
    noisy = False
    def __init__(self, sender: "MLLPSender", ready: defer.Deferred):
        self.sender = sender
        self.ready = ready

    def buildProtocol(self, addr):
        return _SenderProtocol(self.sender)

    def clientConnectionFailed(self, connector, reason):
        if not self.ready.called:
            self.ready.errback(reason)


def _comparable(control_id: str) -> str:
    return "".join(c for c in control_id if c >= " " and c != "\ufffd" and not "\ud800" <= c <= "\udfff").strip()


def same_control_id(acked: str, sent: str) -> bool:
    """Whether MSA-2 echoes ``sent`` as a peer may echo it. Receivers drop or replace what they
    cannot carry (NUL and other control characters, undecodable bytes, U+FFFD, surrounding
    spaces), C-based ones stop at a NUL, and some cut MSA-2 to the 20 characters of older
    versions. With one message in flight per connection and a fresh connection after every
    timeout, such an echo can only be of the message in flight; refusing it once blocked an
    in-order queue for ever."""
    if acked == sent:
        return True
    echo = _comparable(acked)
    if not echo:
        return False
    forms = {_comparable(sent), _comparable(sent.split("\x00", 1)[0])}
    if echo in forms:
        return True
    return len(echo) >= 20 and any(form.startswith(echo) for form in forms)


@dataclass(slots=True)
class _Pending:
    control_id: str
    want_application_ack: bool
    done: defer.Deferred
    protocol: object = None  # the connection it was written on
    accept_ack: Message | None = None


def expects_ack(message: Message) -> bool:
    """False for an ACK (never acknowledged) and for enhanced mode with NE/NE."""
    return _ack_expectations(message)[0]


def _ack_expectations(message: Message) -> tuple[bool, bool]:
    """(an ACK is expected at all, the application ACK is awaited: enhanced mode with MSH-16 AL)."""
    if message.msh(9, 1).strip().upper() == "ACK":
        return False, False
    accept, application = message.msh(15).strip().upper(), message.msh(16).strip().upper()
    if not accept and not application:
        return True, False  # original mode
    return accept not in ("", "NE") or application not in ("", "NE"), application == "AL"


class MLLPSender:
    """Sends messages to one peer over one kept-open MLLP connection."""

    def __init__(self, config: SenderConfig, reactor=None, rng: random.Random | None = None):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        self.rng = rng or random.Random()
        self.protocol: _SenderProtocol | None = None
        self._connecting: defer.Deferred | None = None
        self._queue: deque = deque()
        self._pending: _Pending | None = None
        self._failures = 0
        self._not_before = 0.0  # no connection attempt before this reactor time (backoff)
        self._ack_timer = None  # fires ack_timeout after the latest send
        self.mismatched_acks = 0

    @property
    def connected(self) -> bool:
        return self.protocol is not None

    def backoff_delay(self) -> float:
        """The wait before the next attempt after ``self._failures`` failed ones (full jitter)."""
        if self._failures == 0:
            return 0.0
        # the exponent capped: 2 ** 1024 failures is no float (the 1,025th refused connection raised)
        ceiling = min(self.config.backoff_max, self.config.backoff_initial * 2 ** min(self._failures - 1, 60))
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    def send(self, message: Message | bytes) -> defer.Deferred:
        """Send one message; fires with a :class:`SendResult` (it never errbacks for peer answers)."""
        if isinstance(message, (bytes, bytearray)):
            message = Message.from_bytes(bytes(message))
        done = defer.Deferred()
        self._queue.append((message, done))
        self._pump()
        return done

    def skip_backoff(self) -> None:
        """Connect again at the next send instead of after the backoff (an operator's retry now)."""
        self._failures = 0
        self._not_before = 0.0

    def close(self) -> None:
        """Drop the connection (pending sends fail as connection failures)."""
        if self.protocol is not None:
            self.protocol.transport.loseConnection()

    # -- internals -------------------------------------------------------------------------------
    def _pump(self):
        if self._pending is not None or not self._queue or self._connecting is not None:
            return
        if self.protocol is None:
            self._connect()
            return
        message, done = self._queue.popleft()
        control_id = message.control_id
        expected, want_app = _ack_expectations(message)
        if not expected:
            write_now(self.protocol.transport, frame(message.to_bytes()))
            done.callback(SendResult(SendStatus.ACCEPTED, control_id, text="sent; no acknowledgement is expected for it"))
            self._pump()
            return
        pending = _Pending(control_id, want_app, done, self.protocol)
        self._pending = pending
        # one ACK timer per sender, pushed back at each send (one message is in flight at a time):
        # a timer created and cancelled per message churned the reactor's heap
        timer = self._ack_timer
        if timer is not None and timer.active():
            timer.reset(self.config.ack_timeout)
        else:
            self._ack_timer = self.reactor.callLater(self.config.ack_timeout, self._ack_timer_fired)
        write_now(self.protocol.transport, frame(message.to_bytes()))

    def _connect(self):
        delay = max(0.0, self._not_before - self.reactor.seconds())
        ready = defer.Deferred()
        self._connecting = ready
        ready.addCallbacks(self._connect_done, self._connect_failed)
        factory = _Factory(self, ready)

        def attempt():
            cfg = self.config
            if cfg.tls is not None:
                self.reactor.connectSSL(cfg.host, cfg.port, factory, client_options(cfg.tls, cfg.host),
                                        timeout=cfg.connect_timeout)
            else:
                self.reactor.connectTCP(cfg.host, cfg.port, factory, timeout=cfg.connect_timeout)

        if delay > 0:
            self.reactor.callLater(delay, attempt)
        else:
            attempt()

    def _connected(self, protocol: _SenderProtocol):
        self.protocol = protocol
        if self._connecting is not None and not self._connecting.called:
            self._connecting.callback(protocol)

    def _connect_done(self, _):
        self._connecting = None
        self._failures = 0
        self._not_before = 0.0
        self._pump()

    def _connect_failed(self, failure):
        self._connecting = None
        self._failures += 1
        self._not_before = self.reactor.seconds() + self.backoff_delay()
        reason = failure.getErrorMessage() if failure.check(net_error.ConnectError, net_error.TimeoutError) else str(failure.value)
        log.warn("cannot connect to {host}:{port}: {reason}", host=self.config.host, port=self.config.port, reason=reason)
        # every queued message learns of it now; the caller decides when to try again
        queued, self._queue = self._queue, deque()
        for message, done in queued:
            done.callback(SendResult(SendStatus.CONNECTION_FAILED, message.control_id, text=reason))

    def _disconnected(self, protocol, reason):
        if self.protocol is protocol:
            self.protocol = None
        if self._connecting is not None and not self._connecting.called:
            # an older connection, aborted after an ACK timeout, ends while the next one is being
            # made: its end is not that attempt's failure (which failed the next message)
            return
        pending = self._pending
        if pending is not None and pending.protocol is protocol:
            self._pending = None
            where = f"{self.config.host}:{self.config.port}"
            if is_tls_failure(reason):
                text = f"{where}: {describe_tls_failure(reason)}"
                log.error("TLS with {where} failed: {text}", where=where, text=text)
                result = SendResult(SendStatus.CONNECTION_FAILED, pending.control_id, text=text)
            elif getattr(protocol, "tls_answer", False):
                text = f"{where} answered with TLS: it is a TLS port (configure tls / --tls and tls_ca)"
                log.error("{text}", text=text)
                result = SendResult(SendStatus.CONNECTION_FAILED, pending.control_id, text=text)
            elif self.config.tls is not None and not getattr(protocol, "received", False):
                # TLS 1.3 finishes the client's handshake before the server checks its certificate:
                # a refused client certificate then shows only as the server closing at once
                hint = ("; no client certificate was presented and the server may require one (tls_cert, tls_key)"
                        if not self.config.tls.certificate else "; the server may not accept this client certificate")
                text = f"{where} closed the TLS connection without answering{hint}"
                log.error("{text}", text=text)
                result = SendResult(SendStatus.CONNECTION_FAILED, pending.control_id, text=text)
            else:
                text = "the connection closed before the ACK arrived"
                if not getattr(protocol, "received", False) and self.config.tls is None:
                    text += " (the peer closed without a byte: if it is a TLS port, configure TLS)"
                result = SendResult(SendStatus.TIMED_OUT, pending.control_id, text=text)
            pending.done.callback(result)
        self._pump()

    def _frame_received(self, payload: bytes):
        pending = self._pending
        quick = _plain_ack(payload)
        if quick is not None and pending is not None and quick[1] == pending.control_id:
            # the usual answer (a bare AA or CA echoing the id): matched from its bytes
            code = quick[0]
            if code == _CA and pending.want_application_ack:
                pending.accept_ack = Message.from_bytes(payload)
                return
            self._finish(SendResult(SendStatus.ACCEPTED, pending.control_id, code, "", ack_bytes=payload))
            return
        try:
            ack = Message.from_bytes(payload)
        except ParseError:
            log.warn("ignoring a frame that is not HL7 from {host}:{port}", host=self.config.host, port=self.config.port)
            return
        acked = ack.get("MSA-2")
        if pending is None or not same_control_id(acked, pending.control_id):
            self.mismatched_acks += 1
            log.warn("ignoring an ACK for {acked!r} while waiting for {expected!r}", acked=acked,
                     expected=pending.control_id if pending else None)
            return
        code = ack.get("MSA-1").strip().upper()
        if code == _CA and pending.want_application_ack:
            pending.accept_ack = ack  # the peer has it stored; the application ACK is still to come
            return
        status = _STATUS_OF_CODE.get(code)
        if status is None:
            log.warn("ACK with unknown MSA-1 {code!r}; treated as a reject", code=code)
            status = SendStatus.REJECTED
        self._finish(SendResult(status, pending.control_id, code, ack_text(ack), ack))

    def _ack_timer_fired(self):
        self._ack_timer = None
        if self._pending is not None:  # sent when the timer was last pushed back, and still unanswered
            self._ack_timed_out(self._pending)

    def _ack_timed_out(self, pending: _Pending):
        text = f"no ACK within {self.config.ack_timeout:g}s"
        if pending.accept_ack is not None:
            text = f"accepted (CA) but no application ACK within {self.config.ack_timeout:g}s"
        # a late ACK could be taken for the next message's: the next one goes on a fresh connection
        self._pending = None
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.transport.abortConnection()
        pending.done.callback(SendResult(SendStatus.TIMED_OUT, pending.control_id, text=text, ack=pending.accept_ack))
        self._pump()

    def _finish(self, result: SendResult):
        pending, self._pending = self._pending, None
        pending.done.callback(result)
        self._pump()
