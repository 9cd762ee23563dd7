"""The console's sign-in sessions and the back-off of failed sign-ins, in memory.

A session id is 256 random bits handed to the browser once (an ``HttpOnly; SameSite=Strict``
cookie) and kept here only as its SHA-256, so a memory dump does not give away live sessions.
Each session has its own CSRF token. Sessions end after ``idle`` seconds without a request or
``absolute`` seconds after sign-in, whichever comes first, at sign-out, and for every session of
a user at "sign out everywhere" or when the account is disabled or removed. They live in memory:
a restart of the engine signs everyone out, which is the safe side.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

__all__ = ["Session", "Sessions", "LoginThrottle"]


@dataclass(slots=True)
class Session:
    user: str
    role: str
    phi: bool
    csrf: str
    source: str
    created_at: float
    last_seen: float
    checked_at: float  # when the account was last read from the store (role, PHI, disabled)


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "replace")).hexdigest()


class Sessions:
    def __init__(self, clock, idle: float = 15 * 60, absolute: float = 12 * 3600, limit: int = 10_000):
        self.clock = clock
        self.idle = idle
        self.absolute = absolute
        self.limit = limit  # sessions kept at most: the oldest go first (a flood of sign-ins cannot fill memory)
        self._sessions: dict[str, Session] = {}

    def create(self, user: str, role: str, phi: bool, source: str) -> tuple[str, Session]:
        """A new session: (the id for the cookie, the session)."""
        now = self.clock()
        self._expire(now)
        while len(self._sessions) >= self.limit:
            del self._sessions[next(iter(self._sessions))]
        session_id = secrets.token_urlsafe(32)
        session = Session(user, role, phi, secrets.token_urlsafe(32), source, now, now, now)
        self._sessions[_hash(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None, touch: bool = True) -> Session | None:
        """The live session for a cookie's id, or None; ``touch``: it counts as activity (a
        refused request, or a page refreshing itself, does not)."""
        if not session_id:
            return None
        key = _hash(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self.clock()
        if now - session.last_seen > self.idle or now - session.created_at > self.absolute:
            del self._sessions[key]
            return None
        if touch:
            session.last_seen = now
        return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(_hash(session_id), None)

    def end_all(self, user: str, keep: str | None = None) -> int:
        """End every session of ``user`` (but ``keep``, a session id: the one that asked)."""
        kept = _hash(keep) if keep else None
        keys = [key for key, session in self._sessions.items() if session.user == user and key != kept]
        for key in keys:
            del self._sessions[key]
        return len(keys)

    def count(self) -> int:
        self._expire(self.clock())
        return len(self._sessions)

    def _expire(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items()
                    if now - s.last_seen > self.idle or now - s.created_at > self.absolute]:
            del self._sessions[key]

    @staticmethod
    def csrf_ok(session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(session.csrf.encode(), token.encode("utf-8", "replace"))


class LoginThrottle:
    """Failed sign-ins back off per user name and per address: the first ``free`` failures cost
    nothing, then each one doubles the wait (1 s, 2 s, 4 s ... up to ``longest``). A success
    clears the user's count (not the address's: one good password does not excuse a spray)."""

    def __init__(self, clock, free: int = 3, longest: float = 15 * 60, limit: int = 10_000):
        self.clock = clock
        self.free = free
        self.longest = longest
        self.limit = limit
        self._failures: dict[str, tuple[int, float]] = {}  # key -> (failures, blocked until)

    def wait(self, *keys: str) -> float:
        """Seconds before another attempt is considered for any of ``keys`` (0: go ahead)."""
        now = self.clock()
        return max((max(0.0, self._failures.get(key, (0, 0.0))[1] - now) for key in keys), default=0.0)

    def failed(self, *keys: str) -> None:
        now = self.clock()
        for key in keys:
            count = self._failures.get(key, (0, 0.0))[0] + 1
            delay = 0.0 if count <= self.free else min(self.longest, 2.0 ** (count - self.free - 1))
            self._failures.pop(key, None)  # re-inserted last: the oldest entries go first when full
            self._failures[key] = (count, now + delay)
        while len(self._failures) > self.limit:
            del self._failures[next(iter(self._failures))]

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)
