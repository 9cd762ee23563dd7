"""HTTP answers and what a delivery makes of them: one table (hl7relay.apiclient.responses)."""

import email.utils
import re

import pytest

from hl7relay.apiclient.responses import SuccessRule, Verdict, classify, retry_after

NOW = 1_800_000_000.0


def verdict(status, headers=None, body=b"", **kw):
    return classify(status, headers or {}, body, NOW, default_wait=30.0, **kw)


@pytest.mark.parametrize("status, expected", [
    (200, Verdict.SENT), (201, Verdict.SENT), (204, Verdict.SENT),
    (429, Verdict.WAIT), (503, Verdict.WAIT),
    (408, Verdict.RETRY), (425, Verdict.RETRY), (500, Verdict.RETRY), (502, Verdict.RETRY), (504, Verdict.RETRY),
    (401, Verdict.HOLD), (403, Verdict.HOLD),
    (409, Verdict.CONFLICT), (412, Verdict.CONFLICT),
    (400, Verdict.DEAD), (404, Verdict.DEAD), (413, Verdict.DEAD), (422, Verdict.DEAD), (501, Verdict.DEAD),
    (505, Verdict.DEAD), (301, Verdict.DEAD), (302, Verdict.DEAD), (100, Verdict.DEAD),
])
def test_every_status_has_one_verdict(status, expected):
    assert verdict(status).verdict is expected


def test_a_400_is_a_dead_letter_with_the_body_and_never_retried():
    """One 400 retried for ever sent ~700 alert e-mails (connect #6313)."""
    result = verdict(400, body=b'{"error": "invalid_patient", "detail": "DOB missing"}\n')
    assert result.verdict is Verdict.DEAD and result.reason == '400 Bad Request: {"error": "invalid_patient", "detail": "DOB missing"}'
    long = verdict(422, body=b"x" * 2000)
    assert len(long.reason) < 600 and long.reason.endswith("…")


def test_a_429_waits_for_retry_after_in_seconds_or_as_a_date_capped():
    assert verdict(429, {"retry-after": "30"}).wait == 30.0
    date = email.utils.formatdate(NOW + 120, usegmt=True)
    result = verdict(503, {"retry-after": date})
    assert result.verdict is Verdict.WAIT and result.wait == pytest.approx(120) and "wait 120 s" in result.reason
    capped = verdict(429, {"retry-after": "86400"}, max_retry_after=600)
    assert capped.wait == 600 and "capped at 600 s (max_retry_after)" in capped.reason
    past = verdict(429, {"retry-after": email.utils.formatdate(NOW - 60, usegmt=True)})
    assert past.wait == 0.0
    for unreadable in (None, "", "soon", "-5"):
        result = verdict(429, {"retry-after": unreadable} if unreadable is not None else {})
        assert result.verdict is Verdict.WAIT and result.wait == 30.0 and "wait 30 s" in result.reason


def test_retry_after_reads_what_the_rfc_allows():
    assert retry_after("120", NOW) == (120.0, "Retry-After 120 s")
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", NOW)[0] == 0.0  # long past
    assert retry_after("99999999999999999999", NOW, cap=10)[0] == 10


def test_not_authorised_holds_the_queue_and_redirects_are_not_followed():
    held = verdict(401, body=b'{"error":"invalid_token"}')
    assert held.verdict is Verdict.HOLD and "not authorised" in held.reason and "invalid_token" in held.reason
    moved = verdict(302, {"location": "https://elsewhere.example/api"})
    assert moved.verdict is Verdict.DEAD and "is not followed" in moved.reason and "elsewhere.example" in moved.reason


def test_success_when_catches_an_error_inside_a_200():
    rule = SuccessRule(re.compile(r'"status"\s*:\s*"ok"'))
    assert verdict(200, body=b'{"status": "ok"}', success=rule).verdict is Verdict.SENT
    failed = verdict(200, body=b'{"status": "error", "message": "patient locked"}', success=rule)
    assert failed.verdict is Verdict.DEAD and "does not say success" in failed.reason and "patient locked" in failed.reason


# -- the token cache -------------------------------------------------------------------------------------
from twisted.internet import defer, task  # noqa: E402

from hl7relay.apiclient.tokens import Token, TokenCache  # noqa: E402


class Endpoint:
    """A token endpoint the test answers by hand: each fetch is a Deferred it fires."""

    def __init__(self, clock):
        self.clock = clock
        self.pending = []

    def fetch(self):
        d = defer.Deferred()
        self.pending.append(d)
        return d

    def answer(self, value, lifetime=100.0):
        self.pending.pop(0).callback(Token(value, self.clock.seconds() + lifetime, self.clock.seconds()))


def results(deferreds):
    out = []
    for d in deferreds:
        d.addBoth(out.append)
    return out


def test_fifty_deliveries_asking_together_cause_one_fetch():
    clock = task.Clock()
    endpoint = Endpoint(clock)
    cache = TokenCache(endpoint.fetch, clock)
    got = results([cache.get() for _ in range(50)])
    assert cache.fetches == 1 and got == []  # all wait for the one fetch
    endpoint.answer("tok-1")
    assert got == ["tok-1"] * 50 and results([cache.get()]) == ["tok-1"] and cache.fetches == 1


def test_a_token_is_refreshed_ahead_of_expiry_and_no_delivery_waits():
    clock = task.Clock()
    endpoint = Endpoint(clock)
    cache = TokenCache(endpoint.fetch, clock, refresh_left=0.2)
    results([cache.get()])
    endpoint.answer("tok-1", lifetime=10.0)
    clock.advance(7.0)
    assert results([cache.get()]) == ["tok-1"] and cache.fetches == 1  # 30% left: no refresh yet
    clock.advance(1.5)
    assert results([cache.get(), cache.get()]) == ["tok-1", "tok-1"] and cache.fetches == 2  # 15% left: one refresh
    endpoint.answer("tok-2", lifetime=10.0)
    assert results([cache.get()]) == ["tok-2"]


def test_a_401_drops_the_token_once_and_a_failed_fetch_reaches_its_waiters():
    clock = task.Clock()
    endpoint = Endpoint(clock)
    cache = TokenCache(endpoint.fetch, clock)
    results([cache.get()])
    endpoint.answer("tok-1")
    for _ in range(5):  # five deliveries refused with the same token
        cache.invalidate("tok-1")
    waiting = results([cache.get() for _ in range(5)])
    assert cache.fetches == 2
    endpoint.answer("tok-2")
    cache.invalidate("tok-1")  # a late refusal of the old token keeps the new one
    assert waiting == ["tok-2"] * 5 and results([cache.get()]) == ["tok-2"] and cache.fetches == 2
    cache.invalidate("tok-2")
    failing = results([cache.get(), cache.get()])
    endpoint.pending.pop(0).errback(RuntimeError("invalid_client"))
    assert [f.getErrorMessage() for f in failing] == ["invalid_client", "invalid_client"]
    assert cache.last_error == "invalid_client" and cache.fetches == 3
    results([cache.get()])
    assert cache.fetches == 4  # the next delivery tries again


def test_a_refresh_that_fails_leaves_the_current_token_serving_and_no_token_is_shown():
    clock = task.Clock()
    endpoint = Endpoint(clock)
    cache = TokenCache(endpoint.fetch, clock)
    results([cache.get()])
    endpoint.answer("tok-secret-1", lifetime=10.0)
    clock.advance(9.0)
    assert results([cache.get()]) == ["tok-secret-1"]
    endpoint.pending.pop(0).errback(RuntimeError("endpoint down"))
    assert results([cache.get()]) == ["tok-secret-1"]  # still valid for 1 s
    assert "tok-secret-1" not in repr(cache.token) and "tok-secret-1" not in repr(cache.__dict__.get("_token"))


# -- the OAuth 2.0 client credentials grant ------------------------------------------------------------
import base64 as _b64  # noqa: E402
from urllib.parse import parse_qs  # noqa: E402

from hl7relay.apiclient.oauth import ASSERTION_LIFETIME, ClientCredentials, TokenError, read_token_answer, token_request  # noqa: E402


def _rsa_pem():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


def test_client_secret_basic_and_post_put_the_secret_where_the_rfc_says():
    credential = ClientCredentials("athena", "https://auth.example/oauth2/token", "my:client", "client_secret_basic",
                                   client_secret="p@ss w/rd", scope="system/Patient.read")
    request = token_request(credential, NOW)
    assert "p@ss" not in repr(request) and "p@ss" not in repr(credential)
    user, secret = _b64.b64decode(request.headers["Authorization"][6:]).decode().split(":")
    assert (user, secret) == ("my%3Aclient", "p%40ss%20w%2Frd")  # form-encoded before joining (RFC 6749 2.3.1)
    assert parse_qs(request.body.decode()) == {"grant_type": ["client_credentials"], "scope": ["system/Patient.read"]}
    post = token_request(ClientCredentials("athena", "https://auth.example/t", "id1", "client_secret_post",
                                           client_secret="s3"), NOW)
    assert "Authorization" not in post.headers
    assert parse_qs(post.body.decode()) == {"grant_type": ["client_credentials"], "client_id": ["id1"], "client_secret": ["s3"]}


def test_private_key_jwt_signs_a_short_lived_assertion_the_endpoint_can_verify():
    import jwt

    private, public = _rsa_pem()
    credential = ClientCredentials("epic", "https://fhir.example/oauth2/token", "client-123", "private_key_jwt",
                                   private_key=private, algorithm="RS384", key_id="k1")
    form = parse_qs(token_request(credential, NOW).body.decode())
    assert form["client_assertion_type"] == ["urn:ietf:params:oauth:client-assertion-type:jwt-bearer"]
    assertion = form["client_assertion"][0]
    claims = jwt.decode(assertion, public, algorithms=["RS384"], audience="https://fhir.example/oauth2/token",
                        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False})
    assert claims["iss"] == claims["sub"] == "client-123" and claims["iat"] == int(NOW)
    assert 0 < claims["exp"] - claims["iat"] <= ASSERTION_LIFETIME < 300
    assert jwt.get_unverified_header(assertion)["kid"] == "k1"
    again = parse_qs(token_request(credential, NOW).body.decode())["client_assertion"][0]
    assert jwt.decode(again, public, algorithms=["RS384"], audience=credential.token_url,
                      options={"verify_exp": False, "verify_iat": False, "verify_nbf": False})["jti"] != claims["jti"]
    broken = ClientCredentials("epic", credential.token_url, "c", "private_key_jwt", private_key="not a key")
    with pytest.raises(TokenError, match="cannot sign the client assertion"):
        token_request(broken, NOW)


def test_the_token_endpoints_answer_is_a_token_or_its_own_error_verbatim():
    credential = ClientCredentials("athena", "https://auth.example/t", "id1", client_secret="s3")
    token = read_token_answer(credential, 200, b'{"access_token": "at-1", "token_type": "Bearer", "expires_in": 300, '
                                               b'"scope": "a b"}', NOW)
    assert (token.value, token.expires_at, token.scopes) == ("at-1", NOW + 300, ("a", "b"))
    with pytest.raises(TokenError) as refused:
        read_token_answer(credential, 401, b'{"error": "invalid_client", "error_description": "client assertion '
                                           b'iat is in the future (clock skew?)"}', NOW)
    assert str(refused.value) == ("athena: the token endpoint answered 401 invalid_client: client assertion iat is in "
                                  "the future (clock skew?)") and refused.value.error == "invalid_client"
    with pytest.raises(TokenError, match="answered 502, not a token: <html>bad gateway</html>"):
        read_token_answer(credential, 502, b"<html>bad gateway</html>", NOW)
    with pytest.raises(TokenError, match="only bearer tokens"):
        read_token_answer(credential, 200, b'{"access_token": "x", "token_type": "mac"}', NOW)


def test_an_endpoint_that_answers_at_once_still_answers_the_delivery():
    clock = task.Clock()
    cache = TokenCache(lambda: Token("tok-now", clock.seconds() + 60, clock.seconds()), clock)
    assert results([cache.get(), cache.get()]) == ["tok-now", "tok-now"] and cache.fetches == 1
    failing = TokenCache(lambda: 1 / 0, clock)
    [failure] = results([failing.get()])
    assert failure.check(ZeroDivisionError) and failing.last_error
