"""A token bucket on the reactor's clock: a destination's rate limit, shared by its parallel workers."""

from __future__ import annotations

from collections import deque

from twisted.internet import defer

__all__ = ["TokenBucket"]


class TokenBucket:
    """``rate`` requests a second on average, at most ``burst`` at once after a quiet spell.
    ``acquire`` fires when a request may go; waiters are served in the order they asked."""

    def __init__(self, rate: float, burst: int, reactor):
        self.rate = rate
        self.burst = max(1, burst)
        self.reactor = reactor
        self.tokens = float(self.burst)
        self._last = reactor.seconds()
        self._waiters: deque[defer.Deferred] = deque()
        self._call = None

    def _refill(self) -> None:
        now = self.reactor.seconds()
        self.tokens = min(float(self.burst), self.tokens + (now - self._last) * self.rate)
        self._last = now

    def acquire(self) -> defer.Deferred:
        if self.rate <= 0:
            return defer.succeed(None)
        self._refill()
        if not self._waiters and self.tokens >= 1:
            self.tokens -= 1
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred(lambda cancelled: self._cancelled(cancelled))
        self._waiters.append(d)
        self._schedule()
        return d

    def take(self) -> bool:
        """A request may go now (and is counted), or not: for a server that refuses rather than waits."""
        if self.rate <= 0:
            return True
        self._refill()
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def _cancelled(self, d) -> None:
        try:
            self._waiters.remove(d)
        except ValueError:
            pass

    def _schedule(self) -> None:
        if self._call is not None and self._call.active():
            return
        self._call = self.reactor.callLater(max(0.0, (1 - self.tokens) / self.rate), self._serve)

    def _serve(self) -> None:
        self._call = None
        self._refill()
        while self._waiters and self.tokens >= 1:
            self.tokens -= 1
            self._waiters.popleft().callback(None)
        if self._waiters:
            self._schedule()

    def view(self) -> dict:
        if self.rate <= 0:
            return {"rate": None}
        self._refill()
        return {"rate": self.rate, "burst": self.burst, "available": round(self.tokens, 2),
                "waiting": len(self._waiters)}

    def close(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        waiters, self._waiters = self._waiters, deque()
        for d in waiters:
            d.cancel()
