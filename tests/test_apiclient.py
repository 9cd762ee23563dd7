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
