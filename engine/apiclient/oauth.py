"""The OAuth 2.0 client credentials grant, as requests and answers (sans-IO).

:func:`token_request` builds what to POST to the token endpoint for a credential, with the client
authentication its ``auth`` names: ``client_secret_basic`` (RFC 6749 2.3.1: the id and secret,
form-encoded, in HTTP Basic), ``client_secret_post`` (the two in the body) or ``private_key_jwt``
(RFC 7523: a client assertion signed with the client's private key, RS256/RS384, living less than
five minutes from the reactor clock's now: Epic's backend services). :func:`read_token_answer`
turns the endpoint's answer into a :class:`~hl7relay.apiclient.tokens.Token`, or a
:class:`TokenError` carrying the endpoint's own error verbatim (``invalid_client``, ``invalid_scope``,
a clock skew note) and never the secret.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode

from hl7relay.apiclient.tokens import Token
from hl7relay.errors import HL7RelayError

__all__ = ["ClientCredentials", "TokenRequest", "TokenError", "token_request", "read_token_answer",
           "ASSERTION_LIFETIME", "AUTH_METHODS", "JWT_ALGORITHMS"]

AUTH_METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt")
JWT_ALGORITHMS = ("RS256", "RS384")
ASSERTION_LIFETIME = 240.0  # seconds: under the five minutes backend-services endpoints accept
_JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """One credential of type ``oauth2_client_credentials`` (its secret values already resolved)."""

    name: str
    token_url: str
    client_id: str
    auth: str = "client_secret_basic"
    client_secret: str = field(default="", repr=False)
    private_key: str = field(default="", repr=False)  # PEM, for private_key_jwt
    algorithm: str = "RS384"
    key_id: str = ""  # the JWT's kid, when the endpoint asks for it
    scope: str = ""
    audience: str = ""  # the assertion's aud (default: the token URL)


@dataclass(frozen=True, slots=True)
class TokenRequest:
    url: str
    headers: dict = field(repr=False)
    body: bytes = field(repr=False)


class TokenError(HL7RelayError):
    """The token endpoint refused, or answered something that is not a token."""

    def __init__(self, text: str, status: int | None = None, error: str = ""):
        super().__init__(text)
        self.status = status
        self.error = error  # the endpoint's "error" code, verbatim (invalid_client, ...)


def token_request(credential: ClientCredentials, now: float) -> TokenRequest:
    form = {"grant_type": "client_credentials"}
    if credential.scope:
        form["scope"] = credential.scope
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
    if credential.auth == "client_secret_basic":
        # RFC 6749 2.3.1: each part form-urlencoded before they are joined
        pair = f"{quote(credential.client_id, safe='')}:{quote(credential.client_secret, safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
    elif credential.auth == "client_secret_post":
        form.update(client_id=credential.client_id, client_secret=credential.client_secret)
    elif credential.auth == "private_key_jwt":
        form.update(client_assertion_type=_JWT_BEARER, client_assertion=client_assertion(credential, now))
    else:
        raise ValueError(f"auth {credential.auth!r} is not one of {', '.join(AUTH_METHODS)}")
    return TokenRequest(credential.token_url, headers, urlencode(form).encode("ascii"))


def client_assertion(credential: ClientCredentials, now: float) -> str:
    """RFC 7523 client authentication: iss and sub the client id, aud the token endpoint, a
    unique jti, iat from ``now`` and an expiry under five minutes later."""
    import jwt

    claims = {"iss": credential.client_id, "sub": credential.client_id,
              "aud": credential.audience or credential.token_url, "jti": str(uuid.uuid4()),
              "iat": int(now), "nbf": int(now), "exp": int(now + ASSERTION_LIFETIME)}
    headers = {"kid": credential.key_id} if credential.key_id else None
    try:
        return jwt.encode(claims, credential.private_key, algorithm=credential.algorithm, headers=headers)
    except (ValueError, TypeError, jwt.PyJWTError) as exc:
        raise TokenError(f"{credential.name}: cannot sign the client assertion with its private_key "
                         f"({type(exc).__name__}: not an RSA private key in PEM?)") from None


def read_token_answer(credential: ClientCredentials, status: int, body: bytes, now: float) -> Token:
    """The token in a 200 answer; otherwise a TokenError with the endpoint's words."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        data = None
    if status != 200 or not isinstance(data, dict) or "access_token" not in data:
        if isinstance(data, dict) and data.get("error"):
            error = str(data["error"])[:100]
            described = f": {str(data.get('error_description'))[:300]}" if data.get("error_description") else ""
            raise TokenError(f"{credential.name}: the token endpoint answered {status} {error}{described}", status, error)
        shown = body.decode("utf-8", "replace").strip().replace("\n", " ")[:300] or "(no body)"
        raise TokenError(f"{credential.name}: the token endpoint answered {status}, not a token: {shown}", status)
    value = data["access_token"]
    if not isinstance(value, str) or not value:
        raise TokenError(f"{credential.name}: the token endpoint's access_token is empty", status)
    token_type = str(data.get("token_type", "bearer")).lower()
    if token_type != "bearer":
        raise TokenError(f"{credential.name}: a {token_type!r} token; only bearer tokens are sent", status)
    try:
        lifetime = float(data.get("expires_in", 3600))
    except (TypeError, ValueError):
        lifetime = 3600.0
    scopes = tuple(str(data.get("scope", "")).split()) if data.get("scope") else ()
    return Token(value, now + max(lifetime, 0.0), now, scopes)
