"""Credentials for other systems' APIs: each named once in the settings, used by name.

A ``credentials:`` mapping in the engine config file (``config/hl7relay.yaml``) or in
``credentials.yaml`` beside it names each credential and its type:

- ``oauth2_client_credentials``: a token endpoint, a client id and its authentication
  (``client_secret_basic``, ``client_secret_post``, or ``private_key_jwt``: Epic's backend
  services), ``scope``, ``audience``;
- ``api_key`` (in a header or a query parameter), ``basic``, ``bearer`` (a static token).

Secret values are never written in the files: each one is ``${secret:NAME}`` (the vault),
``${env:NAME}`` or ``${file:PATH}``, and a value written out is a config error at its position.
A destination names its credential (``credentials: pms-api``); at run time one
:class:`Authorizer` per credential serves every destination that names it (one token cache).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from twisted.internet import defer

from hl7relay.apiclient.oauth import AUTH_METHODS, JWT_ALGORITHMS, ClientCredentials, TokenError, read_token_answer, \
    token_request
from hl7relay.apiclient.tokens import Token, TokenCache
from hl7relay.spec import ComponentSpec, Option, check_options, did_you_mean

__all__ = ["Credential", "CREDENTIAL_TYPES", "SECRET_OPTIONS", "check_credentials", "read_credentials",
           "set_credentials_source", "refresh_credentials", "lookup_credential", "credential_problems",
           "loaded_credentials", "Authorization", "Authorizer",
           "Authorizers", "credential_specs"]

SECRET_OPTIONS = frozenset({"client_secret", "private_key", "key", "password", "token"})
_CHECK_URL = Option("check_url", "str", None, "hl7relay check --credentials also sends a GET here with the "
                                               "credential and shows the answer's status")
_TLS = (
    Option("tls_ca", "str", None, "PEM CA to trust for the token endpoint and check_url (default: the system's)"),
    Option("tls_cert", "str", None, "PEM client certificate for the token endpoint and check_url (mutual TLS)"),
    Option("tls_key", "str", None, "PEM private key of tls_cert"),
)


def credential_specs() -> dict[str, ComponentSpec]:
    secret = " (a secret: ${secret:NAME}, ${env:NAME} or ${file:PATH}, never written out)"
    return {spec.name: spec for spec in (
        ComponentSpec("credential", "oauth2_client_credentials", "OAuth 2.0 client credentials grant (RFC 6749 4.4)", (
            Option("type", "str", description="oauth2_client_credentials"),
            Option("token_url", "str", description="the token endpoint (https)"),
            Option("client_id", "str", description="the client id the API's owner registered"),
            Option("auth", "enum", "client_secret_basic", "how the client authenticates at the token endpoint",
                   AUTH_METHODS),
            Option("client_secret", "str", None, "for client_secret_basic and client_secret_post" + secret, secret=True),
            Option("private_key", "str", None, "for private_key_jwt: the RSA private key in PEM" + secret, secret=True),
            Option("algorithm", "enum", "RS384", "private_key_jwt: the assertion's signature", JWT_ALGORITHMS),
            Option("key_id", "str", None, "private_key_jwt: the kid the endpoint knows the key by"),
            Option("scope", "strlist", [], "scopes asked for (space separated, or a list)"),
            Option("audience", "str", None, "private_key_jwt: the assertion's aud (default: token_url)"),
            Option("timeout", "duration", 30.0, "seconds to wait for the token endpoint"),
            *_TLS, _CHECK_URL)),
        ComponentSpec("credential", "api_key", "a static API key, in a header or a query parameter", (
            Option("type", "str", description="api_key"),
            Option("key", "str", description="the key" + secret, secret=True),
            Option("header", "str", "X-API-Key", "the header that carries it"),
            Option("query", "str", None, "a query parameter that carries it instead of a header"),
            *_TLS, _CHECK_URL)),
        ComponentSpec("credential", "basic", "HTTP Basic authentication", (
            Option("type", "str", description="basic"),
            Option("username", "str", description="the user"),
            Option("password", "str", description="the password" + secret, secret=True),
            *_TLS, _CHECK_URL)),
        ComponentSpec("credential", "bearer", "a static bearer token", (
            Option("type", "str", description="bearer"),
            Option("token", "str", description="the token" + secret, secret=True),
            *_TLS, _CHECK_URL)),
    )}


CREDENTIAL_TYPES = tuple(credential_specs())


@dataclass(frozen=True, slots=True)
class Credential:
    """One credential, its secret values resolved (never in a repr)."""

    name: str
    type: str
    oauth: ClientCredentials | None = None
    header: str = ""  # api_key: the header carrying the key
    query: str = ""  # api_key: the query parameter carrying it instead
    username: str = ""
    secret: str = field(default="", repr=False)  # api_key's key, basic's password, bearer's token
    tls: object = None  # TLSConfig for the token endpoint
    timeout: float = 30.0
    check_url: str | None = None


def _https(url: str, what: str) -> str | None:
    """Why ``url`` cannot be used, or None. Plain http only to this machine (a test server)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{what} {url!r} is not an http(s) URL"
    if parts.scheme == "http":
        host = parts.hostname
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            return f"{what} {url!r}: credentials go over https only (http is allowed to this machine alone)"
    return None


def check_credentials(doc, data, path: tuple = ("credentials",)) -> dict[str, Credential]:
    """The credentials in ``data`` (a mapping name -> options), every problem reported at its
    position in ``doc``."""
    from hl7relay.vault import valid_secret_name

    specs = credential_specs()
    found: dict[str, Credential] = {}
    if not isinstance(data, dict):
        doc.error(path, "credentials is a mapping: {NAME: {type: oauth2_client_credentials | api_key | basic | "
                        "bearer, ...}}")
        return found
    for name, options in data.items():
        where = path + (name,)
        if not valid_secret_name(name):
            doc.error(where, f"{name!r} is not a credential name: a letter, then letters, digits and . _ -",
                      key=True)
            continue
        kind = options.get("type") if isinstance(options, dict) else None
        spec = specs.get(kind) if isinstance(kind, str) else None
        if spec is None:
            doc.error(where + (("type",) if kind is not None else ()),
                      f"credential {name!r} needs a type: {', '.join(specs)}"
                      + (did_you_mean(str(kind), specs) if kind is not None else ""))
            continue
        written = [o.name for o in spec.options if o.secret and isinstance(options.get(o.name), str)
                   and options.get(o.name) and where + (o.name,) not in doc.substituted]
        for option in written:
            doc.error(where + (option,), f"{option} is written in the file: keep it in the vault "
                                         f"(hl7relay secret set NAME) and write {option}: ${{secret:NAME}}")
        checked = check_options(spec, options, doc, where)
        if checked is None or written:
            continue
        try:
            found[name] = _build(name, str(kind), checked, Path(doc.file).resolve().parent)
        except ValueError as exc:
            doc.error(where, f"credential {name!r}: {exc}")
    return found


def _build(name: str, kind: str, o: dict, base: Path) -> Credential:
    from hl7relay.mllp.tls import TLSConfig

    check_url = o.get("check_url")
    if check_url and (why := _https(check_url, "check_url")):
        raise ValueError(why)

    def resolve(value):
        return value if value is None or Path(value).is_absolute() else str(base / value)

    tls = None
    if o["tls_ca"] or o["tls_cert"]:
        tls = TLSConfig(resolve(o["tls_cert"]), resolve(o["tls_key"]), resolve(o["tls_ca"]))
    if kind == "api_key":
        if not o["header"] and not o["query"]:
            raise ValueError("an api_key goes in a header or a query parameter")
        return Credential(name, kind, header=o["header"] if not o["query"] else "", query=o["query"] or "",
                          secret=o["key"], tls=tls, check_url=check_url)
    if kind == "basic":
        if ":" in o["username"]:
            raise ValueError("a Basic user name cannot contain ':'")
        return Credential(name, kind, username=o["username"], secret=o["password"], tls=tls, check_url=check_url)
    if kind == "bearer":
        return Credential(name, kind, secret=o["token"], tls=tls, check_url=check_url)
    if why := _https(o["token_url"], "token_url"):
        raise ValueError(why)
    auth = o["auth"]
    if auth == "private_key_jwt":
        if not o["private_key"]:
            raise ValueError("private_key_jwt needs private_key (the RSA key in PEM, from ${secret:NAME} or ${file:PATH})")
        _check_rsa_key(o["private_key"])
    elif not o["client_secret"]:
        raise ValueError(f"{auth} needs client_secret (${{secret:NAME}})")
    scope = " ".join(o["scope"]) if isinstance(o["scope"], list) else str(o["scope"] or "")
    client = ClientCredentials(name, o["token_url"], o["client_id"], auth, o["client_secret"] or "",
                               o["private_key"] or "", o["algorithm"], o["key_id"] or "", scope, o["audience"] or "")
    return Credential(name, kind, oauth=client, tls=tls, timeout=o["timeout"], check_url=check_url)


def _check_rsa_key(pem: str) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    try:
        key = serialization.load_pem_private_key(pem.encode("utf-8"), password=None)
    except (ValueError, TypeError):
        raise ValueError("private_key is not an unencrypted private key in PEM") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("private_key must be an RSA key (RS256/RS384)")


def read_credentials(files) -> tuple[dict[str, Credential], list[str]]:
    """The credentials in ``files``: (path, whole) pairs; ``whole``: a credentials file (the file
    is the mapping, or holds only ``credentials:``), else the engine config file, of which only
    the ``credentials:`` section is read (its other problems are the settings' to say). Files
    that do not exist are skipped."""
    from hl7relay.yamlsource import load_document

    found: dict[str, Credential] = {}
    problems: list[str] = []
    for path, whole in files:
        path = Path(path)
        if not path.is_file():
            continue
        doc = load_document(path)
        if doc.errors:
            # the config file's other problems are the settings' to say; the credentials' own here
            mine = doc.errors if whole else in_section(doc, "credentials")
            problems += [str(e) for e in mine]
            if mine or doc.data is None:
                continue
        data = doc.data
        where: tuple = ()
        if whole and isinstance(data, dict) and set(data) == {"credentials"}:
            section, where = data["credentials"], ("credentials",)
        elif whole:
            section, where = data, ()
        elif isinstance(data, dict) and data.get("credentials") is not None:
            section, where = data["credentials"], ("credentials",)
        else:
            continue
        for name, credential in check_credentials(doc, section, where).items():
            if name in found:
                doc.error(where + (name,), f"credential {name!r} is named twice (also in another file)", key=True)
            found[name] = credential
        problems += [str(e) for e in doc.errors]
    return found, problems


def in_section(doc, key: str) -> list:
    """The errors of ``doc`` between its top-level ``key`` and the next top-level key."""
    start = doc.key_marks.get((key,))
    if start is None:
        return []
    later = [mark.line for path, mark in doc.key_marks.items() if len(path) == 1 and mark.line > start.line]
    end = min(later, default=float("inf"))
    return [e for e in doc.errors if start.line <= e.mark.line < end]


# -- the credentials the channels being loaded may name --------------------------------------------------
# Set by the settings (cli/_settings.py) as a function that reads them again, so that a reload
# after `hl7relay secret rotate` builds its destinations with the new values.
_source = None
_loaded: tuple[dict, list[str]] = ({}, [])


def set_credentials_source(source) -> None:
    global _source, _loaded
    _source = source
    _loaded = source() if source is not None else ({}, [])


def refresh_credentials() -> None:
    global _loaded
    if _source is not None:
        _loaded = _source()


def credential_problems() -> list[str]:
    """What is wrong in the credentials last read (file:line:col: ...)."""
    return list(_loaded[1])


def loaded_credentials() -> dict[str, Credential]:
    return dict(_loaded[0])


def lookup_credential(name: str) -> Credential:
    found, problems = _loaded
    credential = found.get(name)
    if credential is not None:
        return credential
    if problems:
        raise ValueError(f"credentials {name!r} cannot be used: {problems[0]}")
    raise ValueError(f"no credentials named {name!r}" + (did_you_mean(name, found) if found else
                     " (name it under credentials: in config/hl7relay.yaml or config/credentials.yaml)"))


# -- at run time ------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Authorization:
    """What one request carries for its credential."""

    headers: dict = field(repr=False)
    query: tuple = field(default=(), repr=False)
    token: str | None = field(default=None, repr=False)  # the OAuth token used (dropped on a 401)


class Authorizer:
    """One credential at run time: what a request carries, and for OAuth 2.0 the token cache
    every destination naming the credential shares."""

    def __init__(self, credential: Credential, reactor):
        self.credential = credential
        self.reactor = reactor
        self.cache: TokenCache | None = None
        self.client = None
        if credential.oauth is not None:
            from hl7relay.apiclient.http import HTTPClient

            self.client = HTTPClient(reactor, credential.tls, connect_timeout=min(10.0, credential.timeout))
            self.cache = TokenCache(self.fetch_token, reactor)
        self.last_refused: str = ""

    def authorize(self) -> defer.Deferred:
        """A Deferred firing with the :class:`Authorization` for the next request."""
        c = self.credential
        if c.type == "api_key":
            return defer.succeed(Authorization({} if c.query else {c.header: c.secret},
                                               ((c.query, c.secret),) if c.query else ()))
        if c.type == "basic":
            import base64

            pair = base64.b64encode(f"{c.username}:{c.secret}".encode("utf-8")).decode("ascii")
            return defer.succeed(Authorization({"Authorization": "Basic " + pair}))
        if c.type == "bearer":
            return defer.succeed(Authorization({"Authorization": "Bearer " + c.secret}))
        assert self.cache is not None
        return self.cache.get().addCallback(lambda value: Authorization({"Authorization": "Bearer " + value},
                                                                        token=value))

    def refused(self, authorization: Authorization) -> bool:
        """The API answered 401 to ``authorization``: True when asking again may help (an OAuth
        token is dropped and fetched anew); a static credential will be refused again."""
        if self.cache is None or authorization.token is None:
            return False
        self.cache.invalidate(authorization.token)
        return True

    def fetch_token(self) -> defer.Deferred:
        """Ask the token endpoint now (the cache decides when)."""
        from hl7relay.apiclient.http import HTTPFailure

        c = self.credential
        assert c.oauth is not None and self.client is not None
        now = self.reactor.seconds()
        try:
            request = token_request(c.oauth, now)
        except TokenError as exc:
            return defer.fail(exc)
        d = self.client.request("POST", request.url, request.headers, request.body, c.timeout)

        def answered(answer):
            return read_token_answer(c.oauth, answer.status, answer.body, self.reactor.seconds())

        def failed(failure):
            failure.trap(HTTPFailure)
            raise TokenError(f"{c.name}: the token endpoint: {failure.getErrorMessage()}")

        return d.addCallbacks(answered, failed)

    def view(self) -> dict:
        """For status and the console: never a token or a secret."""
        c = self.credential
        # the same keys for every type (a static credential has no token to tell of)
        view: dict = {"credential": c.name, "type": c.type, "token_expires_in": None, "scopes": [], "token_fetches": 0,
                      "token_error": None}
        if self.cache is not None:
            token: Token | None = self.cache.token
            now = self.reactor.seconds()
            view.update(token_expires_in=None if token is None else round(token.left(now), 1),
                        scopes=list(token.scopes) if token is not None else [],
                        token_fetches=self.cache.fetches, token_error=self.cache.last_error or None)
        return view

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


class Authorizers:
    """The authorizers of one process, one per credential name: destinations naming the same
    credential share it (and its token). A reload that changed the credential gets a new one."""

    def __init__(self, reactor):
        self.reactor = reactor
        self._by_name: dict[str, Authorizer] = {}

    def get(self, credential: Credential) -> Authorizer:
        current = self._by_name.get(credential.name)
        if current is None or current.credential != credential:
            if current is not None:
                current.close()
            current = self._by_name[credential.name] = Authorizer(credential, self.reactor)
        return current

    def views(self) -> list[dict]:
        return [a.view() for _, a in sorted(self._by_name.items())]
