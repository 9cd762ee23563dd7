"""The ``http`` destination: each message to an HTTP(S) API, with the credentials the settings
name, a rate limit, an idempotency key, and every answer classified by one table
(:mod:`hl7relay.apiclient.responses`): sent, wait as told (429/503), retried (408/425/5xx, no
answer), held (401/403: the credentials, not the message), conflict (409/412) or dead (other 4xx).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from twisted.internet import defer

from hl7relay.apiclient.credentials import Credential, lookup_credential
from hl7relay.apiclient.responses import DEFAULT_MAX_RETRY_AFTER, SuccessRule, Verdict, classify
from hl7relay.channels.destinations import QUEUE_OPTIONS, Delivery, QueueOptions, queue_options
from hl7relay.channels.sources import TLS_OPTIONS, tls_config
from hl7relay.outcomes import DeliveryOutcome, DeliveryResult
from hl7relay.spec import Option, register

__all__ = ["HTTPDestinationConfig", "HTTPDelivery", "render_template", "TEMPLATE_KEY"]

# what may stand in braces in a url or a body template: an HL7 path, the whole message, its
# store id, or the time (JSON's own braces are left alone)
TEMPLATE_KEY = re.compile(r"\{(message|message_id|now(?::[^{}]*)?|[A-Z][A-Z0-9]{2}(?:\[[0-9*]+\])?"
                          r"(?:-[0-9]+(?:\[[0-9]+\])?(?:\.[0-9]+){0,2})?)\}")
_ANSWER_KEPT = 4000  # characters of an API's answer kept with the delivery (like an ACK)
_METHODS = ("POST", "PUT", "PATCH")


@dataclass(slots=True)
class HTTPDestinationConfig:
    url: str
    method: str = "POST"
    headers: dict = field(default_factory=dict, repr=False)
    body: str | None = None  # a template; None: the message itself
    content_type: str = "application/hl7-v2"
    credential: Credential | None = None
    tls: object = None
    timeout: float = 30.0
    connect_timeout: float = 10.0
    rate_limit: float = 0.0  # requests a second; 0: none
    rate_burst: int = 1
    idempotency_header: str | None = None
    max_retry_after: float = DEFAULT_MAX_RETRY_AFTER
    success_when: str | None = None
    queue: QueueOptions = QueueOptions()
    content_type_given: bool = False  # else a FHIR document goes as application/fhir+json


def render_template(template: str, message, message_id: int | None, escape) -> str:
    """``template`` with each ``{KEY}`` replaced (``escape`` applied to each value)."""
    def replace(match):
        key = match.group(1)
        if key == "message":
            value = message.to_bytes().decode("utf-8", "replace")
        elif key == "message_id":
            value = "" if message_id is None else str(message_id)
        elif key.startswith("now"):
            value = datetime.now().strftime(key[4:] if key.startswith("now:") else "%Y%m%d%H%M%S")
        else:
            value = message.get(key) or ""
        return escape(value)

    return TEMPLATE_KEY.sub(replace, template)


def _json_text(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)[1:-1]


def _url_part(value: str) -> str:
    return quote(value, safe="")


def _check_template(text: str, what: str) -> None:
    from hl7relay.hl7.path import parse_path

    for match in TEMPLATE_KEY.finditer(text):
        key = match.group(1)
        if key not in ("message", "message_id") and not key.startswith("now"):
            try:
                parse_path(key)
            except Exception as exc:  # noqa: BLE001 - said as this option's error
                raise ValueError(f"{what}: {{{key}}} is not an HL7 path: {exc}") from None


@register("destination", "http", "send each message to an HTTP(S) API (credentials, rate limit, retries by answer)", [
    Option("url", "str", description="http(s) URL; HL7 paths in braces are filled in from the message, "
                                     "e.g. https://pms.example/api/patients/{PID-3.1}/results"),
    Option("method", "enum", "POST", "the request's method", _METHODS),
    Option("headers", "map", {}, "extra request headers (values may be ${secret:NAME})"),
    Option("body", "str", None, "a body template: {message} (the message as transformed), {message_id}, HL7 paths "
                                "in braces (escaped for JSON when content_type is JSON); default: the message itself"),
    Option("content_type", "str", None, "the body's Content-Type (default: application/hl7-v2 for the message, "
                                        "application/json for a template)"),
    Option("credentials", "str", None, "the name of a credential in the settings (oauth2_client_credentials, "
                                       "api_key, basic, bearer)"),
    *TLS_OPTIONS,
    Option("timeout", "duration", 30.0, "seconds to wait for the answer"),
    Option("connect_timeout", "duration", 10.0, "seconds to wait to connect"),
    Option("rate_limit", "float", 0.0, "requests a second at most, shared by the parallel workers (0: no limit)"),
    Option("rate_burst", "int", 1, "requests that may go at once after a quiet spell"),
    Option("idempotency_header", "str", None, "a header carrying a value that stays the same however often a "
                                              "delivery is sent again (e.g. Idempotency-Key)"),
    Option("max_retry_after", "duration", DEFAULT_MAX_RETRY_AFTER, "the longest a Retry-After is waited for"),
    Option("success_when", "regex", None, "a 2xx answer counts as delivered only if its body matches this "
                                          "(for APIs that answer 200 with an error inside)"),
    *QUEUE_OPTIONS,
])
def _http(options, context=None):
    url = options["url"]
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url {url!r} is not an http(s) URL")
    if parts.username or parts.password:
        raise ValueError("url: no user or password in the URL (name a credential: credentials: NAME)")
    _check_template(url, "url")
    if options["body"] is not None:
        _check_template(options["body"], "body")
    credential = lookup_credential(options["credentials"]) if options["credentials"] else None
    if credential is not None and parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError("credentials go over https only (http is allowed to this machine alone)")
    if options["rate_limit"] < 0 or options["rate_burst"] < 1:
        raise ValueError("rate_limit must be 0 (none) or more, rate_burst 1 or more")
    if options["timeout"] <= 0 or options["connect_timeout"] <= 0:
        raise ValueError("timeout and connect_timeout must be more than 0 seconds")
    headers = {str(k): str(v) for k, v in (options["headers"] or {}).items()}
    for name in headers:
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            raise ValueError(f"headers: {name!r} is not a header name")
    content_type = options["content_type"] or ("application/json" if options["body"] is not None
                                               else "application/hl7-v2")
    success = options["success_when"]
    return HTTPDestinationConfig(
        url, options["method"], headers, options["body"], content_type, credential,
        tls_config({**options, "tls": parts.scheme == "https"}, False, getattr(context, "base_dir", None)),
        options["timeout"], options["connect_timeout"], options["rate_limit"], options["rate_burst"],
        options["idempotency_header"], options["max_retry_after"],
        success.pattern if hasattr(success, "pattern") else success, queue_options(options),
        options["content_type"] is not None)


class HTTPDelivery(Delivery):
    """One destination's requests: its own connections (up to ``parallel``), its rate limit, and
    the credential's authorizer (shared with every destination naming the same credential)."""

    keyed = True  # the idempotency key comes from the delivery's identity

    def __init__(self, config: HTTPDestinationConfig, resources):
        super().__init__(config, resources)
        from hl7relay.apiclient.credentials import Authorizers
        from hl7relay.apiclient.http import HTTPClient
        from hl7relay.apiclient.ratelimit import TokenBucket

        reactor = resources.reactor
        self.client = HTTPClient(reactor, config.tls, config.connect_timeout, config.queue.parallel)
        self.bucket = TokenBucket(config.rate_limit, config.rate_burst, reactor)
        if config.credential is not None:
            if getattr(resources, "authorizers", None) is None:
                resources.authorizers = Authorizers(reactor)
            self.authorizer = resources.authorizers.get(config.credential)
        else:
            self.authorizer = None
        self.success = SuccessRule(re.compile(config.success_when)) if config.success_when else None
        self.json = "json" in config.content_type.lower()
        parts = urlsplit(config.url)
        self.shown_url = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))

    def deliver(self, message, message_id=None):
        config = self.config
        url = render_template(config.url, message, message_id, _url_part) if "{" in config.url else config.url
        if config.body is None:
            body = message.to_bytes()
        else:
            body = render_template(config.body, message, message_id, _json_text if self.json else str).encode("utf-8")
        content_type = config.content_type
        if config.body is None and not config.content_type_given:
            content_type = getattr(message, "content_type", content_type)  # fhir: application/fhir+json
        headers = {"Content-Type": content_type, "User-Agent": "hl7relay", **config.headers}
        if config.idempotency_header:
            headers[config.idempotency_header] = self.idempotency_key(message, message_id)
        d = self._send(url, headers, body, retried=False)
        d.addErrback(self._not_sent)
        return d

    def idempotency_key(self, message, message_id) -> str:
        """The same for every attempt of one delivery (a replay is a new delivery, a new key)."""
        seed = f"{message_id}\0{message.get('MSH-10') or ''}\0{self.config.method}\0{self.config.url}"
        return hashlib.sha256(seed.encode("utf-8")).hexdigest()[:40]

    def _send(self, url: str, headers: dict, body: bytes, retried: bool) -> defer.Deferred:
        if self.authorizer is None and self.bucket.rate <= 0:
            return self._request(url, url, headers, body, None, retried)  # nothing to wait for first
        return self._authorized(url, headers, body, retried)

    @defer.inlineCallbacks
    def _authorized(self, url: str, headers: dict, body: bytes, retried: bool):
        from hl7relay.apiclient.oauth import TokenError

        authorization = None
        sent_headers, target = headers, url
        if self.authorizer is not None:
            try:
                authorization = yield self.authorizer.authorize()
            except TokenError as exc:
                # the token endpoint refused (invalid_client) or is unreachable: the credentials'
                # problem, said as such; an endpoint that refused holds the queue
                if exc.status in (400, 401, 403):
                    return DeliveryResult(False, error=f"not authorised: {exc}", outcome=DeliveryOutcome.NOT_AUTHORISED)
                return DeliveryResult(False, error=str(exc), outcome=DeliveryOutcome.UNREACHABLE)
            sent_headers = {**headers, **authorization.headers}
            if authorization.query:
                parts = urlsplit(url)
                query = (parts.query + "&" if parts.query else "") + urlencode(authorization.query)
                target = urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))
        # the rate limit is taken last, once the token is in hand: what the API sees keeps its pace
        yield self.bucket.acquire()
        result = yield self._request(url, target, sent_headers, body, authorization, retried)
        return result

    def _request(self, url: str, target: str, headers: dict, body: bytes, authorization, retried: bool):
        d = self.client.request(self.config.method, target, headers, body, self.config.timeout)
        return d.addCallbacks(self._answered, self._no_answer, callbackArgs=(url, headers, body, authorization, retried))

    @staticmethod
    def _no_answer(failure):
        from hl7relay.apiclient.http import HTTPFailure

        failure.trap(HTTPFailure)
        exc = failure.value
        return DeliveryResult(False, error=str(exc), outcome=DeliveryOutcome.UNREACHABLE if exc.unreachable
                              else DeliveryOutcome.TIMED_OUT)

    def _answered(self, answer, url: str, headers: dict, body: bytes, authorization, retried: bool):
        config = self.config
        if answer.status == 401 and authorization is not None and not retried and self.authorizer.refused(authorization):
            # the token may have been revoked or expired early: a new one, once, and the request again
            plain = {k: v for k, v in headers.items() if k not in authorization.headers}
            return self._send(url, plain, body, retried=True)
        verdict = classify(answer.status, answer.headers, answer.body, self.resources.clock(),
                           default_wait=config.queue.retry_max, max_retry_after=config.max_retry_after,
                           success=self.success)
        said = self._said(answer)
        kind = verdict.verdict
        if kind is Verdict.SENT:
            return DeliveryResult(True, ack=said)
        if kind is Verdict.WAIT:
            return DeliveryResult(False, ack=said, error=verdict.reason, outcome=DeliveryOutcome.RATE_LIMITED,
                                  wait=verdict.wait)
        if kind is Verdict.HOLD:
            return DeliveryResult(False, ack=said, error=verdict.reason, outcome=DeliveryOutcome.NOT_AUTHORISED)
        if kind is Verdict.RETRY:
            return DeliveryResult(False, ack=said, error=verdict.reason)
        if kind is Verdict.CONFLICT:
            return DeliveryResult(False, True, ack=said, error=verdict.reason, outcome=DeliveryOutcome.CONFLICT)
        return DeliveryResult(False, True, ack=said, error=verdict.reason)

    def _said(self, answer) -> str:
        """What is kept of the answer, like an ACK: its status line, then its body."""
        text = answer.body.decode("utf-8", "replace")
        if len(text) > _ANSWER_KEPT:
            text = text[:_ANSWER_KEPT] + "…"
        head = f"HTTP {answer.status} {self.config.method} {self.shown_url} ({answer.seconds * 1000:.0f} ms)"
        return head + ("\n" + text if text else "")

    def view(self) -> dict:
        """For the sync status: where it sends, its credential's token (expiry, scopes, never the
        value) and its rate limiter."""
        return {"method": self.config.method, "url": self.shown_url,
                "credential": self.authorizer.view() if self.authorizer is not None else None,
                "rate_limit": self.bucket.view()}

    def _not_sent(self, failure):
        failure.trap(defer.CancelledError)
        return DeliveryResult(False, error="not sent: the destination closed", outcome=DeliveryOutcome.FAILED)

    def close(self) -> None:
        self.bucket.close()
        self.client.close()


HTTPDestinationConfig.runner = HTTPDelivery  # type: ignore[attr-defined]
