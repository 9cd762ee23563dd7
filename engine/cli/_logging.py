"""Log output: Twisted's logger, to standard error, as text or JSON lines.

Levels are ERROR, WARN, INFO, DEBUG and TRACE, for the engine and per channel (``log_level`` in a
channel file). Lines about a message carry ``channel`` and ``control_id`` (and the store id once
stored). Message content is never logged, unless a channel says ``log_phi: true``; then it is
capped at ``log_phi_bytes``.
"""

from __future__ import annotations

import sys

from twisted.logger import (
    FilteringLogObserver, LogLevel, PredicateResult, globalLogBeginner, jsonFileLogObserver, textFileLogObserver,
)

__all__ = ["start_logging", "LEVELS", "ChannelLevels"]

# TRACE is DEBUG plus the per-message lines marked trace=True
LEVELS = {"trace": 0, "debug": 1, "info": 2, "warn": 3, "error": 4}
_TWISTED = {LogLevel.debug: 1, LogLevel.info: 2, LogLevel.warn: 3, LogLevel.error: 4, LogLevel.critical: 5}


class ChannelLevels:
    """Lets an event through when it reaches its channel's level (or the default level)."""

    def __init__(self, default: str = "info", per_channel: dict | None = None):
        self.default = LEVELS[default]
        self.per_channel = {name: LEVELS[level] for name, level in (per_channel or {}).items()}

    def wants(self, channel: str, level: str) -> bool:
        """Whether a line of ``level`` about ``channel`` would be written (to skip building it)."""
        threshold = self.per_channel.get(channel, self.default)
        return threshold == 0 if level == "trace" else max(LEVELS[level], 1) >= max(threshold, 1)

    def __call__(self, event) -> PredicateResult:
        threshold = self.per_channel.get(event.get("channel"), self.default)
        if event.get("trace"):
            return PredicateResult.yes if threshold == 0 else PredicateResult.no
        level = _TWISTED.get(event.get("log_level"), 2)
        return PredicateResult.yes if level >= max(threshold, 1) else PredicateResult.no


def start_logging(level: str = "info", log_format: str = "text", per_channel: dict | None = None) -> ChannelLevels:
    predicate = ChannelLevels(level, per_channel)
    output = jsonFileLogObserver(sys.stderr) if log_format == "json" else textFileLogObserver(sys.stderr)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(output, [predicate])], redirectStandardIO=False)
    return predicate
