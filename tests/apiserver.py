"""A PMS's REST API and its OAuth 2.0 token endpoint, for tests: twisted.web over HTTPS with the
test CA, on 127.0.0.1, port 0.

``/token`` issues short-lived bearer tokens for the client credentials grant (client_secret_basic,
client_secret_post, or private_key_jwt verified with the test key's public half). Any other path
is the API: it refuses a missing, unknown or expired token with 401, then answers what the test
scripted (``script``: (status, headers, body) tuples, or ("slow", seconds)) and 201 after that.
Every request is recorded with the time the server saw it."""

from __future__ import annotations

import base64
import itertools
import json
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote

from twisted.web import resource, server


@dataclass
class Seen:
    at: float
    method: str
    path: str
    headers: dict
    body: bytes
    token: str | None = None


@dataclass(eq=False)
class FakeAPI(resource.Resource):
    reactor: object
    client_id: str = "hl7relay"
    client_secret: str = ""
    public_key: object = None  # for private_key_jwt
    token_lifetime: float = 60.0
    api_key: str | None = None  # when set, X-API-Key must carry it (no tokens)
    scope: str = "patient/*.write"
    token_url: str = ""  # the aud a client assertion must carry
    script: deque = field(default_factory=deque)
    requests: list = field(default_factory=list)
    token_requests: list = field(default_factory=list)
    tokens: dict = field(default_factory=dict)  # value -> expires at (reactor seconds)
    refused: int = 0
    token_error: tuple | None = None  # (status, json) the token endpoint answers instead of a token
    refuse_all: bool = False  # every API request is refused (401), whatever its token
    _ids: object = field(default_factory=lambda: itertools.count(1))

    isLeaf = True

    def __post_init__(self):
        resource.Resource.__init__(self)

    def render_POST(self, request):
        return self._render(request)

    render_PUT = render_PATCH = render_POST

    def render_GET(self, request):
        return self._render(request)

    def _render(self, request):
        body = request.content.read()
        headers = {k.decode().lower(): v[-1].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        path = request.uri.decode()
        if request.path == b"/token":
            return self._token(request, headers, body)
        now = self.reactor.seconds()
        token = None
        if self.api_key is not None:
            key = headers.get("x-api-key") or parse_qs(path.partition("?")[2]).get("api_key", [None])[0]
            ok = key == self.api_key
        else:
            auth = headers.get("authorization", "")
            token = auth[7:] if auth.startswith("Bearer ") else None
            ok = token is not None and self.tokens.get(token, -1) > now and not self.refuse_all
        self.requests.append(Seen(time.monotonic(), request.method.decode(), path, headers, body, token))
        if not ok:
            self.refused += 1
            request.setResponseCode(401)
            request.setHeader(b"WWW-Authenticate", b'Bearer error="invalid_token"')
            return b'{"error": "invalid_token"}'
        if self.script:
            answer = self.script.popleft()
            if answer[0] == "slow":
                call = self.reactor.callLater(answer[1], self._late, request)
                request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
                return server.NOT_DONE_YET
            status, extra, text = answer
            request.setResponseCode(status)
            for name, value in (extra or {}).items():
                request.setHeader(name.encode(), str(value).encode())
            return text if isinstance(text, bytes) else str(text).encode()
        request.setResponseCode(201)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"id": next(self._ids), "status": "created"}).encode()

    def _late(self, request):
        request.setResponseCode(201)
        request.write(b'{"late": true}')
        request.finish()

    def _token(self, request, headers, body):
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        self.token_requests.append((time.monotonic(), form, headers))
        request.setHeader(b"Content-Type", b"application/json")
        if self.token_error is not None:
            request.setResponseCode(self.token_error[0])
            return json.dumps(self.token_error[1]).encode()
        if form.get("grant_type") != "client_credentials" or not self._client_ok(form, headers):
            request.setResponseCode(401)
            return b'{"error": "invalid_client", "error_description": "client authentication failed"}'
        value = secrets.token_urlsafe(24)
        self.tokens[value] = self.reactor.seconds() + self.token_lifetime
        return json.dumps({"access_token": value, "token_type": "Bearer", "expires_in": self.token_lifetime,
                           "scope": self.scope}).encode()

    def _client_ok(self, form, headers) -> bool:
        if form.get("client_assertion_type") == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
            import jwt

            try:
                claims = jwt.decode(form.get("client_assertion", ""), self.public_key, algorithms=["RS384", "RS256"],
                                    audience=self.token_url)
            except jwt.PyJWTError:
                return False
            return claims["iss"] == claims["sub"] == self.client_id and claims["exp"] - claims["iat"] < 300
        auth = headers.get("authorization", "")
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            return unquote(user) == self.client_id and unquote(password) == self.client_secret
        return form.get("client_id") == self.client_id and form.get("client_secret") == self.client_secret

    def revoke(self) -> None:
        """Every token issued so far stops working (the API's side of a revocation)."""
        self.tokens.clear()


def serve(reactor, api: FakeAPI, certificate: str, key: str) -> int:
    """Listen over HTTPS on 127.0.0.1, port 0: the port."""
    from hl7relay.mllp.tls import TLSConfig, server_options

    site = server.Site(api)
    site.displayTracebacks = False
    site.log = lambda request: None  # no access log lines in the test output
    port = reactor.listenSSL(0, site, server_options(TLSConfig(certificate, key)), interface="127.0.0.1")
    return port.getHost().port


def spin(reactor, until, limit: float = 30.0, describe=lambda: "") -> None:
    """Drive ``reactor`` until ``until()`` holds (a guard of ``limit`` seconds against a hang).
    Twisted's TLS flushes small writes on the global reactor's clock whatever reactor carries the
    connection: its due calls run here too."""
    from twisted.internet import reactor as global_reactor

    deadline = time.monotonic() + limit
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting (the condition never held) {describe()}")
        reactor.iterate(0.002)
        global_reactor.runUntilCurrent()
