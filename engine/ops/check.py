"""The connection tester: can the engine reach a destination, step by step?

:func:`check_destination` answers, with each step's result and time, what a support engineer
asks in order: does the name resolve (DNS), does the port accept a connection (TCP), does TLS
work and what certificate does the peer present (subject, issuer, days to expiry; a warning under
30 days), and, when asked, does an MLLP round trip with a harmless message come back with an ACK.
Plain blocking sockets with timeouts: the CLI calls it directly, the console on a thread.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import time
from dataclasses import dataclass

from hl7relay.mllp.framing import Frame, MLLPFramer, frame

__all__ = ["Step", "check_destination", "check_credential", "check_url", "credential_verdict", "check_api_destination",
           "default_check_message", "EXPIRY_WARNING_DAYS"]

EXPIRY_WARNING_DAYS = 30


@dataclass(slots=True)
class Step:
    name: str  # DNS, TCP, TLS, MLLP
    status: str  # ok, warning, failed, skipped
    detail: str
    seconds: float | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "detail": self.detail,
                "ms": None if self.seconds is None else round(self.seconds * 1000, 2)}


def default_check_message(now: datetime.datetime | None = None) -> bytes:
    """A harmless message: an NMQ^N01 system clock query (HL7's application management message),
    which changes nothing anywhere; a receiver that does not handle it still answers AE or AR,
    which proves the MLLP link works."""
    stamp = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y%m%d%H%M%S")
    return (f"MSH|^~\\&|HL7RELAY|HL7RELAY|||{stamp}||NMQ^N01^NMQ_N01|CHK{stamp}|P|2.5\r"
            f"NCK|{stamp}\r").encode()


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def check_destination(host: str, port: int, tls=None, round_trip: bytes | None = None, timeout: float = 10.0,
                      clock=time.perf_counter) -> list[Step]:
    """DNS, TCP, TLS (``tls``: the destination's TLSConfig, None for plain MLLP) and, with
    ``round_trip`` (a message), an MLLP exchange. Steps after a failed one are skipped."""
    steps: list[Step] = []
    started = clock()
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        steps.append(Step("DNS", "failed", f"{host} does not resolve: {exc.strerror}", clock() - started))
        return _skip_rest(steps, tls, round_trip, "the name does not resolve")
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    steps.append(Step("DNS", "ok", f"{host} -> {', '.join(addresses[:4])}", clock() - started))
    sock, errors = None, []
    for family, kind, proto, _, address in infos:
        started = clock()
        candidate = socket.socket(family, kind, proto)
        candidate.settimeout(timeout)
        try:
            candidate.connect(address)
        except OSError as exc:
            candidate.close()
            reason = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
            errors.append(f"{address[0]}:{port}: {reason} after {_ms(clock() - started)}")
            continue
        sock = candidate
        steps.append(Step("TCP", "ok", f"connected to {address[0]}:{port}", clock() - started))
        break
    if sock is None:
        steps.append(Step("TCP", "failed", "; ".join(errors) + (" (nothing listens there, or a firewall refuses)"
                                                                  if any("refused" in e for e in errors) else "")))
        return _skip_rest(steps, tls, round_trip, "no connection")
    try:
        if tls is not None:
            sock, step = _handshake(sock, host, port, tls, timeout, clock)
            steps.append(step)
            if sock is None:
                return _skip_rest(steps, None, round_trip, "TLS failed")
        else:
            steps.append(Step("TLS", "skipped", "the destination does not use TLS (tls: false)"))
        if round_trip is None:
            steps.append(Step("MLLP", "skipped", "no round trip asked for (--mllp, or check_round_trip: true)"))
        else:
            steps.append(_round_trip(sock, round_trip, timeout, clock))
    finally:
        if sock is not None:
            sock.close()
    return steps


def _skip_rest(steps: list[Step], tls, round_trip, why: str) -> list[Step]:
    if tls is not None:
        steps.append(Step("TLS", "skipped", why))
    if round_trip is not None:
        steps.append(Step("MLLP", "skipped", why))
    return steps


def _context(tls, verify: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=getattr(tls, "ca", None))
    if getattr(tls, "certificate", None):
        context.load_cert_chain(tls.certificate, tls.key)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _handshake(sock, host: str, port: int, tls, timeout: float, clock):
    """(the TLS socket or None, the step): verified as the sender verifies; when that fails, the
    certificate is fetched again without verifying so the step can say what the peer presents."""
    server_name = getattr(tls, "server_name", None) or host
    started = clock()
    try:
        wrapped = _context(tls, verify=True).wrap_socket(sock, server_hostname=server_name)
    except ssl.SSLCertVerificationError as exc:
        elapsed = clock() - started
        sock.close()
        details = _peer_certificate(host, port, tls, server_name, timeout)
        return None, Step("TLS", "failed", f"the certificate does not verify: {exc.verify_message}"
                                           + (f"; it presents {details}" if details else ""), elapsed)
    except socket.timeout:
        sock.close()
        return None, Step("TLS", "failed", f"no TLS answer within {timeout:g} s: the port speaks plain MLLP, it "
                                           "seems (a plain listener waits for a frame; tls: false?)", clock() - started)
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        hint = " (a plain MLLP port?)" if "WRONG_VERSION_NUMBER" in str(exc) or "record layer" in str(exc) else ""
        if "closed" in str(exc).lower() or isinstance(exc, (ConnectionResetError, ssl.SSLEOFError)):
            hint = " (the peer closed the connection: it may require a client certificate, tls_cert/tls_key)"
        return None, Step("TLS", "failed", f"handshake failed: {reason}{hint}", clock() - started)
    elapsed = clock() - started
    certificate = _describe(wrapped.getpeercert(binary_form=True))
    status, detail = "ok", f"{wrapped.version()}, {wrapped.cipher()[0]}; {certificate['text']}"
    if certificate["days"] is not None and certificate["days"] < EXPIRY_WARNING_DAYS:
        status = "warning"
        detail += f" - renew it: it expires in {certificate['days']} day{'s' * (certificate['days'] != 1)}"
    return wrapped, Step("TLS", status, detail, elapsed)


def _peer_certificate(host: str, port: int, tls, server_name: str, timeout: float) -> str:
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with _context(tls, verify=False).wrap_socket(raw, server_hostname=server_name) as wrapped:
                return _describe(wrapped.getpeercert(binary_form=True))["text"]
    except (OSError, ssl.SSLError):
        return ""


def _describe(der: bytes | None) -> dict:
    if not der:
        return {"text": "no certificate", "days": None}
    from cryptography import x509

    certificate = x509.load_der_x509_certificate(der)
    expires = certificate.not_valid_after_utc
    days = (expires - datetime.datetime.now(datetime.timezone.utc)).days
    when = "EXPIRED " + expires.strftime("%Y-%m-%d") if days < 0 else f"expires {expires:%Y-%m-%d} (in {days} days)"
    return {"text": f"subject {certificate.subject.rfc4514_string()}, issuer {certificate.issuer.rfc4514_string()}, {when}",
            "days": days}


def _round_trip(sock, message: bytes, timeout: float, clock) -> Step:
    from hl7relay.errors import ParseError
    from hl7relay.hl7.message import Message

    control_id = Message.from_bytes(message).get("MSH-10")
    framer = MLLPFramer(1024 * 1024)
    started = clock()
    try:
        sock.settimeout(timeout)
        sock.sendall(frame(message))
        while True:
            data = sock.recv(65536)
            if not data:
                return Step("MLLP", "failed", "the peer closed the connection without answering", clock() - started)
            for event in framer.feed(data):
                if isinstance(event, Frame):
                    elapsed = clock() - started
                    try:
                        ack = Message.from_bytes(event.payload)
                    except ParseError as exc:
                        return Step("MLLP", "warning", f"answered with something that is not HL7 ({exc})", elapsed)
                    code, answers = ack.get("MSA-1"), ack.get("MSA-2")
                    text = ack.get("MSA-3") or ack.get("ERR-8") or ""
                    detail = (f"{message.split(b'|')[8].decode('ascii', 'replace')} {control_id} answered "
                              f"{code or '(no MSA-1)'}" + (f": {text}" if text else ""))
                    if answers != control_id:
                        return Step("MLLP", "warning", detail + f"; but its MSA-2 is {answers!r}", elapsed)
                    # any ACK proves the link; AE/AR to a test message is the peer saying it does not handle it
                    return Step("MLLP", "ok", detail, elapsed)
    except socket.timeout:
        return Step("MLLP", "failed", f"no answer within {timeout:g} s (the peer reads but does not ACK?)", clock() - started)
    except OSError as exc:
        return Step("MLLP", "failed", f"the connection failed: {exc.strerror or exc}", clock() - started)


def check_credential(credential, reactor, timeout: float = 10.0):
    """Test a credential now: the token endpoint reached (DNS, TCP, TLS), a token obtained (its
    expiry and scopes) or the endpoint's own error verbatim, then with ``check_url`` a GET carrying
    the credential. A Deferred firing with the steps; nothing of a token or a secret in them."""
    from twisted.internet import defer

    from hl7relay.apiclient.credentials import Authorization, Authorizer
    from hl7relay.apiclient.http import HTTPFailure, safe_url
    from hl7relay.apiclient.oauth import TokenError

    authorizer = Authorizer(credential, reactor)
    oauth = credential.oauth
    first = oauth.token_url if oauth is not None else credential.check_url
    steps: list[Step] = []

    @defer.inlineCallbacks
    def run():
        reached = yield _reach(first, credential.tls, timeout)
        steps.extend(reached)
        if any(step.status == "failed" for step in steps):
            return steps
        if oauth is not None:
            started = time.perf_counter()
            try:
                token = yield authorizer.fetch_token()
            except TokenError as exc:
                steps.append(Step("TOKEN", "failed", str(exc), time.perf_counter() - started))
                return steps
            lifetime = token.expires_at - token.issued_at
            scopes = " ".join(token.scopes) or "none named"
            steps.append(Step("TOKEN", "ok", f"token obtained from {safe_url(oauth.token_url)}: expires in "
                                             f"{lifetime:.0f} s; scopes: {scopes}", time.perf_counter() - started))
            authorization = Authorization({"Authorization": "Bearer " + token.value})
        else:
            authorization = yield authorizer.authorize()
        if credential.check_url:
            url = credential.check_url
            if authorization.query:
                from urllib.parse import urlencode

                url += ("&" if "?" in url else "?") + urlencode(authorization.query)
            from hl7relay.apiclient.http import HTTPClient

            client = HTTPClient(reactor, credential.tls, timeout)
            try:
                answer = yield client.request("GET", url, authorization.headers, None, timeout)
            except HTTPFailure as exc:
                steps.append(Step("API", "failed", str(exc)))
                return steps
            finally:
                client.close()
            where = safe_url(credential.check_url)
            status = "ok" if 200 <= answer.status < 300 else "failed" if answer.status in (401, 403) else "warning"
            said = answer.body.decode("utf-8", "replace").strip().replace("\n", " ")[:200]
            detail = f"GET {where}: HTTP {answer.status}" + (
                " (the API refused the credential)" if status == "failed" else "") + (f": {said}" if status != "ok"
                                                                                     and said else "")
            steps.append(Step("API", status, detail, answer.seconds))
        return steps

    d = run()
    d.addBoth(lambda result: (authorizer.close(), result)[1])
    return d


def _reach(url: str, tls, timeout: float):
    """DNS, TCP and (https) TLS to ``url``'s host, on a thread: a Deferred of the steps."""
    from urllib.parse import urlsplit

    from twisted.internet import threads

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if parts.scheme == "https" and tls is None:
        from hl7relay.mllp.tls import TLSConfig

        tls = TLSConfig()  # the system's trust store
    if parts.scheme != "https":
        tls = None
    d = threads.deferToThread(check_destination, parts.hostname, port, tls, None, timeout)

    def kept(steps):
        for step in steps:
            if step.name == "TLS" and step.status == "skipped":
                step.detail = "plain http: no TLS (this machine only)"
        return [step for step in steps if step.name != "MLLP"]

    return d.addCallback(kept)


def credential_verdict(steps) -> str:
    """What a credential check came to: authenticated (the token obtained, or check_url answered
    2xx), NOT authenticated (a step failed: refused, unreachable), or not confirmed (check_url
    answered something else: a 404 or 405 says nothing of the credential)."""
    if any(step.status == "failed" for step in steps):
        return "NOT authenticated"
    if any(step.name in ("TOKEN", "API") and step.status == "warning" for step in steps) and not any(
            step.name == "TOKEN" and step.status == "ok" for step in steps):
        return "not confirmed (check_url did not answer 2xx)"
    return "authenticated"


def check_url(url: str, tls, reactor, timeout: float = 10.0):
    """``hl7relay check URL``: DNS, TCP, TLS, then an HTTP round trip (a GET, no credentials): its
    status and time. Any answer proves the way there works (a 401 from an API is an answer)."""
    from twisted.internet import defer

    from hl7relay.apiclient.http import HTTPClient, HTTPFailure, safe_url

    @defer.inlineCallbacks
    def run():
        steps = yield _reach(url, tls, timeout)
        if any(step.status == "failed" for step in steps):
            return steps
        client = HTTPClient(reactor, tls, timeout)
        try:
            answer = yield client.request("GET", url, {"User-Agent": "hl7relay-check"}, None, timeout)
        except HTTPFailure as exc:
            steps.append(Step("HTTP", "failed", str(exc)))
            return steps
        finally:
            client.close()
        status = "ok" if answer.status < 400 or answer.status in (401, 403, 405) else "warning"
        server = answer.headers.get("server")
        steps.append(Step("HTTP", status, f"GET {safe_url(url)}: HTTP {answer.status}"
                                          + (f" ({server[:60]})" if server else ""), answer.seconds))
        return steps

    return run()


def check_api_destination(config, reactor, timeout: float = 10.0):
    """An http destination: DNS, TCP and TLS to its API's host, then its credential's token (the
    token endpoint's own steps shown only when they fail). Nothing is sent to the API itself: a
    request there could create a record."""
    from twisted.internet import defer

    @defer.inlineCallbacks
    def run():
        steps = yield _reach(config.url, config.tls, timeout)
        if any(step.status == "failed" for step in steps) or config.credential is None:
            return steps
        if config.credential.oauth is None:
            steps.append(Step("TOKEN", "skipped", f"{config.credential.name} is a static {config.credential.type} "
                                                  "credential: it is checked with check_url (check --credentials)"))
            return steps
        from dataclasses import replace

        token = yield check_credential(replace(config.credential, check_url=None), reactor, timeout)
        steps.extend(step for step in token if step.name == "TOKEN" or step.status == "failed")
        return steps

    return run()
