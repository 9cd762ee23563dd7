"""One access token per credential, shared by every delivery that uses it.

What a destination asks of it (``get``): a token now, fetched at most once however many deliveries
ask together (single flight: 50 concurrent deliveries, one request to the token endpoint);
refreshed ahead of its expiry (when ``refresh_left`` of its lifetime is left) while the current
one keeps serving, so no delivery meets an expired token; dropped when the API answered 401 to it
(``invalidate``), so the next ``get`` fetches a new one, once. The fetch itself (the OAuth 2.0
request) is given: this object only decides when to make it. Time comes from the reactor's clock.
A token's value is never in a repr, a log line or an exception text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet import defer

__all__ = ["Token", "TokenCache"]


@dataclass(frozen=True, slots=True)
class Token:
    value: str = field(repr=False)
    expires_at: float  # reactor seconds
    issued_at: float
    scopes: tuple = ()

    def left(self, now: float) -> float:
        return self.expires_at - now


class TokenCache:
    def __init__(self, fetch, clock, refresh_left: float = 0.2, min_lifetime: float = 1.0):
        """``fetch()``: a Deferred firing with a :class:`Token` (or failing); ``clock``: has
        ``seconds()``; ``refresh_left``: the fraction of a token's lifetime left when a new one is
        fetched ahead of time."""
        self._fetch = fetch
        self._clock = clock
        self._refresh_left = refresh_left
        self._min_lifetime = min_lifetime
        self._token: Token | None = None
        self._waiting: list[defer.Deferred] | None = None  # a fetch in flight: who waits for it
        self.fetches = 0  # how many times the token endpoint was asked (status, tests)
        self.last_error: str = ""

    @property
    def token(self) -> Token | None:
        return self._token

    def get(self) -> defer.Deferred:
        """A Deferred firing with a token's value (or the fetch's failure)."""
        now = self._clock.seconds()
        token = self._token
        if token is not None and token.left(now) > 0:
            lifetime = max(token.expires_at - token.issued_at, self._min_lifetime)
            if token.left(now) <= lifetime * self._refresh_left and self._waiting is None:
                self._start()  # ahead of expiry; this one still serves meanwhile
            return defer.succeed(token.value)
        waiter: defer.Deferred = defer.Deferred()
        if self._waiting is not None:
            self._waiting.append(waiter)
        else:
            self._start(waiter)  # listed before the fetch starts: an answer at once still reaches it
        return waiter

    def invalidate(self, value: str) -> None:
        """The API refused this token (401): the next ``get`` fetches another, once, however many
        deliveries saw the refusal (a newer token than the refused one is kept)."""
        if self._token is not None and self._token.value == value:
            self._token = None

    def _start(self, waiter: defer.Deferred | None = None) -> None:
        """Ask the token endpoint; ``waiter`` is the first to wait for its answer."""
        self._waiting = [waiter] if waiter is not None else []
        self.fetches += 1
        defer.maybeDeferred(self._fetch).addCallbacks(self._fetched, self._failed)

    def _fetched(self, token: Token) -> None:
        self._token, self.last_error = token, ""
        waiting, self._waiting = self._waiting or [], None
        for waiter in waiting:
            waiter.callback(token.value)

    def _failed(self, failure) -> None:
        self.last_error = failure.getErrorMessage()
        waiting, self._waiting = self._waiting or [], None
        now = self._clock.seconds()
        current = self._token if self._token is not None and self._token.left(now) > 0 else None
        for waiter in waiting:
            if current is not None:
                waiter.callback(current.value)  # a refresh ahead of time failed: the current one still serves
            else:
                waiter.errback(failure)
        # handled: said to every waiter (and kept in last_error for status), none left unseen
