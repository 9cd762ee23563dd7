"""Where alerts go: a webhook (an HTTP POST of JSON) and e-mail (SMTP, STARTTLS or TLS).

Each notifier's ``notify(alert, status)`` returns a Deferred that fails when the notification
did not get through (the alert loop logs and counts it; it never stops for it). Both run on the
engine's reactor and time out. Neither carries message content (see :func:`describe`).
"""

from __future__ import annotations

import email.message
import email.utils
import json
import time
from io import BytesIO
from urllib.parse import urlsplit, urlunsplit

from twisted.internet import defer


__all__ = ["WebhookNotifier", "EmailNotifier", "NotifyError"]


class NotifyError(Exception):
    """A notification was refused or could not be delivered."""


def _reactor(reactor):
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        return default_reactor
    return reactor


class WebhookNotifier:
    """POSTs ``{"status": "firing"|"resolved", "subject", "text", ...the alert}`` as JSON; any 2xx is success."""

    def __init__(self, url: str, headers: dict | None = None, timeout: float = 10.0, reactor=None, tls_ca: str | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"webhook url {url!r} is not an http(s) URL")
        self.url, self.headers, self.timeout = url, dict(headers or {}), timeout
        self.reactor = _reactor(reactor)
        self.tls_ca = tls_ca
        # the label (status, logs, the console) never shows credentials in the URL
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        self.label = "webhook " + urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def _agent(self):
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

        if self.tls_ca:
            from twisted.internet import ssl

            trust = ssl.Certificate.loadPEM(open(self.tls_ca, "rb").read())
            return Agent(self.reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust),
                         connectTimeout=self.timeout)
        return Agent(self.reactor, connectTimeout=self.timeout)

    def notify(self, alert: dict, status: str) -> defer.Deferred:
        from twisted.web.client import FileBodyProducer, readBody
        from twisted.web.http_headers import Headers

        subject, text = describe(alert, status)
        body = json.dumps({"status": status, "subject": subject, "text": text, **alert}).encode()
        headers = Headers({b"Content-Type": [b"application/json"], b"User-Agent": [b"hl7relay-alerts"]})
        for name, value in self.headers.items():
            headers.addRawHeader(name.encode(), str(value).encode())
        d = self._agent().request(b"POST", self.url.encode(), headers, FileBodyProducer(BytesIO(body)))

        def answered(response):
            return readBody(response).addCallback(lambda _: response.code)

        def check(code):
            if not 200 <= code < 300:
                raise NotifyError(f"{self.label} answered HTTP {code}")
            return code

        d.addCallback(answered).addCallback(check)
        d.addTimeout(self.timeout, self.reactor)
        return d


class EmailNotifier:
    """Sends each notification by SMTP to ``recipients`` plus the channel's own (``per_channel``).
    ``security``: starttls (required, the default), tls (implicit, port 465) or none (a local relay)."""

    def __init__(self, host: str, port: int, sender: str, recipients: list, per_channel: dict | None = None,
                 security: str = "starttls", username: str | None = None, password: str | None = None,
                 timeout: float = 30.0, reactor=None, tls_ca: str | None = None):
        if security not in ("starttls", "tls", "none"):
            raise ValueError("email security is starttls, tls or none")
        if not recipients and not per_channel:
            raise ValueError("email needs recipients (to:, or per channel)")
        self.host, self.port, self.sender, self.security = host, port, sender, security
        self.recipients, self.per_channel = list(recipients or []), {k: list(v) for k, v in (per_channel or {}).items()}
        self.username, self.password, self.timeout, self.tls_ca = username, password, timeout, tls_ca
        self.reactor = _reactor(reactor)
        self.label = f"email {host}:{port} ({security})"

    def recipients_for(self, channel: str) -> list:
        return list(dict.fromkeys(self.recipients + self.per_channel.get(channel, [])))

    def message(self, alert: dict, status: str) -> bytes:
        subject, text = describe(alert, status)
        msg = email.message.EmailMessage()
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.recipients_for(alert["channel"]))
        msg["Subject"] = subject
        msg["Date"] = email.utils.formatdate(localtime=True)
        msg["Message-ID"] = email.utils.make_msgid(domain="hl7relay")
        msg.set_content(text)
        return msg.as_bytes()

    def _context(self):
        from twisted.internet import ssl

        trust = ssl.Certificate.loadPEM(open(self.tls_ca, "rb").read()) if self.tls_ca else None
        return ssl.optionsForClientTLS(self.host, trustRoot=trust) if trust else ssl.optionsForClientTLS(self.host)

    def notify(self, alert: dict, status: str) -> defer.Deferred:
        from twisted.mail.smtp import ESMTPSenderFactory

        to = self.recipients_for(alert["channel"])
        if not to:
            return defer.succeed(None)  # nobody for this channel
        done = defer.Deferred()
        context = self._context() if self.security != "none" else None
        factory = ESMTPSenderFactory(
            self.username.encode() if self.username else None, self.password.encode() if self.password else None,
            self.sender, to, BytesIO(self.message(alert, status)), done, retries=0, timeout=self.timeout,
            contextFactory=context, requireAuthentication=bool(self.username),
            requireTransportSecurity=self.security == "starttls")
        factory.noisy = False
        if self.security == "tls":
            from twisted.internet import endpoints

            endpoint = endpoints.wrapClientTLS(context, endpoints.HostnameEndpoint(self.reactor, self.host, self.port,
                                                                                   timeout=self.timeout))
            endpoint.connect(factory).addErrback(done.errback)
        else:
            self.reactor.connectTCP(self.host, self.port, factory, timeout=self.timeout)
        done.addTimeout(self.timeout + 5, self.reactor)
        return done


def describe(alert: dict, status: str) -> tuple[str, str]:
    """(subject, text) of a notification: no message content, ever."""
    state = "RESOLVED" if status == "resolved" else "FIRING"
    where = alert["channel"] + (f" -> {alert['destination']}" if alert["destination"] else "")
    subject = f"[hl7relay] {state}: {alert['rule']} {where}"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(alert["since"]))
    lines = [alert["summary"] if status == "firing" else f"resolved: {alert['summary']}",
             f"severity {alert['severity']}; condition since {since}"]
    if status == "firing":
        lines.append(f"silence it: hl7relay alerts silence {alert['rule']} --channel {alert['channel']}"
                     + (f" --destination {alert['destination']}" if alert["destination"] else "")
                     + " --minutes 60 --reason '...'")
    return subject, "\n".join(lines) + "\n"
