"""When a polling source looks (``schedule``) and when a file is due (``expect``): sans-IO, every
answer from a time given, so a test clock drives them.

``schedule: {every: 60}`` looks every 60 seconds; ``schedule: {cron: "5 2 * * *", timezone:
Europe/London}`` at 02:05 London time (standard five-field cron, croniter's reading, daylight
saving included). ``expect: {cron: "0 3 * * *", within: 3600}``: a file is due at 03:00 each day;
one first seen within an hour either side of it counts; when none has come an hour after, the
file is missing (an alert) until one comes.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from hl7relay.spec import ComponentSpec, Option

__all__ = ["Schedule", "Expectation", "SCHEDULE", "EXPECT", "schedule_from", "expectation_from"]

SCHEDULE = ComponentSpec("setting", "schedule", "when a polling source looks", (
    Option("every", "duration", None, "seconds between looks"),
    Option("cron", "str", None, "a cron expression (minute hour day month weekday): looks at those times"),
    Option("timezone", "str", "UTC", "the cron expression's time zone, e.g. America/New_York"),
), title="schedule")
EXPECT = ComponentSpec("setting", "expect", "when a file is due (an alert when it has not come)", (
    Option("cron", "str", description="when a file is due: a cron expression, e.g. '0 3 * * *'"),
    Option("within", "duration", 3600.0, "seconds either side of the due time a file may come; missing after"),
    Option("timezone", "str", "UTC", "the cron expression's time zone"),
), title="expect")


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"timezone: {name!r} is not a time zone (e.g. Europe/London, UTC)") from None


class _Cron:
    def __init__(self, expression: str, zone: str):
        from croniter import croniter

        self.zone = _zone(zone)
        self.expression = expression
        if not croniter.is_valid(expression) or len(expression.split()) != 5:
            raise ValueError(f"cron: {expression!r} is not a cron expression (minute hour day month weekday, "
                             "e.g. '5 2 * * *')")
        self._croniter = croniter

    def next_after(self, t: float) -> float:
        start = datetime.datetime.fromtimestamp(t, self.zone)
        return float(self._croniter(self.expression, start).get_next(float))

    def last_at_or_before(self, t: float) -> float:
        start = datetime.datetime.fromtimestamp(t + 1, self.zone)  # "before t + 1" includes t itself
        return float(self._croniter(self.expression, start).get_prev(float))


@dataclass(slots=True)
class Schedule:
    """The next look after a moment: every N seconds, or at a cron expression's times."""

    every: float | None = None
    cron: _Cron | None = None

    def next_after(self, t: float) -> float:
        if self.cron is not None:
            return self.cron.next_after(t)
        return t + (self.every or 0.0)

    def describe(self) -> str:
        if self.cron is not None:
            return f"at '{self.cron.expression}' ({self.cron.zone.key})"
        return f"every {self.every:g}s"


@dataclass(slots=True)
class Expectation:
    cron: _Cron
    within: float

    def missing(self, now: float, last_file_at: float | None, watching_since: float) -> float | None:
        """The due time of the file that has not come (None: nothing is missing). The latest due
        time whose window has closed counts; a file first seen since its window opened (late
        ones too) answers it. A due time from before the source was watching (less its window)
        does not: a new channel does not start with an alarm, and a restart at 03:30 still
        sees that the 03:00 file did not come."""
        due = self.cron.last_at_or_before(now - self.within)
        if due < watching_since - self.within:
            return None
        if last_file_at is not None and last_file_at >= due - self.within:
            return None
        return due

    def describe(self) -> str:
        return f"a file at '{self.cron.expression}' ({self.cron.zone.key}) within {self.within:g}s"


def schedule_from(options: dict | None, default_every: float) -> Schedule:
    if not options:
        return Schedule(every=default_every)
    if (options.get("every") is None) == (options.get("cron") is None):
        raise ValueError("schedule: give either every (seconds) or cron (an expression)")
    if options.get("cron") is not None:
        return Schedule(cron=_Cron(options["cron"], options.get("timezone") or "UTC"))
    if options["every"] <= 0:
        raise ValueError("schedule: every is a number of seconds above 0")
    return Schedule(every=float(options["every"]))


def expectation_from(options: dict | None) -> Expectation | None:
    if not options:
        return None
    if options["within"] <= 0:
        raise ValueError("expect: within is a number of seconds above 0")
    return Expectation(_Cron(options["cron"], options.get("timezone") or "UTC"), float(options["within"]))
