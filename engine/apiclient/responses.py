"""What an HTTP answer means for a delivery: one table, in one place, with its own tests.

Reference engines retry every status >= 400 the same way (one 400 retried for ever sent ~700
alert e-mails) and ignore Retry-After. Here each answer is one :class:`Verdict`:

=============================  ==========  ============================================================
answer                         verdict     what the queue does
=============================  ==========  ============================================================
2xx (and ``success_when``)     SENT        delivered; the response kept like an ACK (masked)
429, 503                       WAIT        waits for Retry-After (seconds or an HTTP date, capped);
                                           not a failed attempt: never dead-lettered for it
408, 425, 500-599 but 501/505  RETRY       the queue's backoff, counted as a failed attempt
401, 403                       HOLD        credentials, not the message: the queue holds (nothing is
                                           dead-lettered) and an alert says "not authorised"
409, 412                       CONFLICT    a dead letter at once, shown as a conflict (someone changed
                                           the record: a person decides)
other 4xx, 501, 505            DEAD        a dead letter at once, with the response body
1xx, 3xx                       DEAD        an answer a delivery cannot use (redirects are not followed:
                                           Authorization must never reach another origin)
no answer (transport error)    RETRY       (decided by the caller: unreachable, timed out)
=============================  ==========  ============================================================

Sans-IO: status, headers and body in; a verdict out. The clock is given (Retry-After as a date).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

__all__ = ["Verdict", "Classified", "classify", "retry_after", "SuccessRule", "DEFAULT_MAX_RETRY_AFTER"]

DEFAULT_MAX_RETRY_AFTER = 3600.0  # seconds: a Retry-After beyond this is taken as this (and said)
_BODY_SHOWN = 500  # characters of a response body kept with a dead letter


class Verdict(enum.Enum):
    SENT = "sent"
    WAIT = "wait"  # rate limited or unavailable: come back after ``wait`` seconds, no attempt counted
    RETRY = "retry"  # the queue's backoff, counted as a failed attempt
    HOLD = "hold"  # not authorised: hold the queue, alert; nothing dead-lettered
    CONFLICT = "conflict"  # dead letter, shown as a conflict
    DEAD = "dead"  # dead letter at once


@dataclass(frozen=True, slots=True)
class Classified:
    verdict: Verdict
    status: int
    reason: str  # one line for people: "429 Too Many Requests: wait 30 s (Retry-After)"
    wait: float | None = None  # seconds, for WAIT


@dataclass(frozen=True, slots=True)
class SuccessRule:
    """For an API that answers 200 with an error inside: the body must match ``pattern`` (a
    regular expression) to count as delivered; otherwise the answer is a dead letter."""

    pattern: re.Pattern

    def holds(self, body: bytes) -> bool:
        return self.pattern.search(body.decode("utf-8", "replace")) is not None


_PHRASES = {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
            403: "Forbidden", 404: "Not Found", 408: "Request Timeout", 409: "Conflict", 412: "Precondition Failed",
            413: "Content Too Large", 415: "Unsupported Media Type", 422: "Unprocessable Content", 425: "Too Early",
            429: "Too Many Requests", 500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported"}


def _head(status: int) -> str:
    phrase = _PHRASES.get(status)
    return f"{status} {phrase}" if phrase else str(status)


def retry_after(value: str | None, now: float, cap: float = DEFAULT_MAX_RETRY_AFTER) -> tuple[float | None, str]:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), capped at ``cap``,
    and how it was read; (None, why) when there is none or it cannot be read."""
    if value is None or not value.strip():
        return None, "no Retry-After"
    text = value.strip()
    if text.isdigit():
        seconds = float(int(text[:12]))
    else:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None, f"Retry-After {text[:40]!r} is neither seconds nor an HTTP date"
        if when.tzinfo is None:  # HTTP dates are GMT
            import datetime

            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = max(0.0, when.timestamp() - now)
    if seconds > cap:
        return cap, f"Retry-After {int(seconds)} s, capped at {int(cap)} s (max_retry_after)"
    return seconds, f"Retry-After {int(seconds)} s"


def classify(status: int, headers: dict[str, str], body: bytes, now: float, *, default_wait: float,
             max_retry_after: float = DEFAULT_MAX_RETRY_AFTER, success: SuccessRule | None = None) -> Classified:
    """The verdict on one answer. ``headers``: names in lower case. ``default_wait``: how long a
    429/503 without a usable Retry-After waits (the queue's next backoff step)."""
    head = _head(status)
    if 200 <= status < 300:
        if success is not None and not success.holds(body):
            return Classified(Verdict.DEAD, status, f"{head}, but the answer does not say success "
                                                    f"(success_when): {_shown(body)}")
        return Classified(Verdict.SENT, status, head)
    if status in (429, 503):
        wait, how = retry_after(headers.get("retry-after"), now, max_retry_after)
        if wait is None:
            wait, how = default_wait, f"{how}: wait {int(default_wait)} s"
        else:
            how = f"wait {int(wait)} s ({how})"
        return Classified(Verdict.WAIT, status, f"{head}: {how}", wait)
    if status in (401, 403):
        return Classified(Verdict.HOLD, status, f"{head}: not authorised (the credentials, not the message): "
                                                f"{_shown(body)}")
    if status in (409, 412):
        return Classified(Verdict.CONFLICT, status, f"{head}: conflict: {_shown(body)}")
    if status in (408, 425) or (500 <= status < 600 and status not in (501, 505)):
        return Classified(Verdict.RETRY, status, f"{head}: {_shown(body)}" if body else head)
    if 300 <= status < 400:
        location = headers.get("location", "")
        return Classified(Verdict.DEAD, status, f"{head}: a redirect{' to ' + location[:100] if location else ''} "
                                                "is not followed (credentials never go to another address): "
                                                "fix the destination's url")
    return Classified(Verdict.DEAD, status, f"{head}: {_shown(body)}" if body else head)


def _shown(body: bytes) -> str:
    text = body.decode("utf-8", "replace").replace("\r", " ").replace("\n", " ").strip()
    return text[:_BODY_SHOWN] + ("…" if len(text) > _BODY_SHOWN else "") if text else "(no body)"
