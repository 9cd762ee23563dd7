"""Log output: Twisted's logger, to standard error, as text or JSON lines.

JSON is one flat object per line with our own fields (time, level, logger, event, text, and
channel, message_id, control_id, destination, peer when the line is about one), never Twisted's
raw event. Repeats are bounded, since their volume is in a sender's hands (one line per junk read,
one per refused message while the store is down): the first few lines of a kind in a minute are
written, then one "... N more like this in the last minute" line per kind.

Levels are ERROR, WARN, INFO, DEBUG and TRACE, for the engine and per channel (``log_level`` in a
channel file). Lines about a message carry ``channel`` and ``control_id`` (and the store id once
stored). Message content is never logged, unless a channel says ``log_phi: true``; then it is
capped at ``log_phi_bytes``.
"""

from __future__ import annotations

import json
import sys
import time

from twisted.logger import (
    FilteringLogObserver, LogLevel, PredicateResult, formatEvent, globalLogBeginner, textFileLogObserver,
)

__all__ = ["start_logging", "LEVELS", "ChannelLevels", "RepeatLimiter", "json_line", "log_entry", "announce", "LogRing",
           "LOG_RING"]

_FIELDS = ("channel", "message_id", "control_id", "destination", "peer", "listener")
_LEVEL_NAMES = {LogLevel.debug: "debug", LogLevel.info: "info", LogLevel.warn: "warn", LogLevel.error: "error",
                LogLevel.critical: "critical"}
_state = {"format": "text"}

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
        if level <= 2 and not event.get("log_namespace", "").startswith("hl7relay"):
            # Twisted's own notes ("MLLPListenerFactory starting on 2575", "(TCP Port 2575 Closed)",
            # "Main loop terminated.") repeat the engine's lines in another format: debug only
            level = 1
        return PredicateResult.yes if level >= max(threshold, 1) else PredicateResult.no


def json_line(event) -> str:
    """One flat JSON object for a log event: our fields only, the text already formatted."""
    return json.dumps(log_entry(event), ensure_ascii=False, default=str)


def log_entry(event) -> dict:
    """A log event as our flat fields (what JSON lines and the log viewer's ring hold)."""
    level = event.get("log_level")
    out = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.get("log_time", time.time())))
                + f".{int((event.get('log_time', 0) % 1) * 1000):03d}Z",
        "level": "trace" if event.get("trace") else _LEVEL_NAMES.get(level, "info"),
        "logger": event.get("log_namespace", ""),
        "event": event.get("event") or event.get("log_namespace", ""),
    }
    for name in _FIELDS:
        value = event.get(name)
        if value is not None:
            out[name] = value if isinstance(value, (int, float, bool)) else str(value)
    text = formatEvent(event) if event.get("log_format") is not None else str(event.get("text", ""))
    failure = event.get("log_failure")
    if failure is not None:
        out["error"] = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        out["traceback"] = failure.getTraceback()
    out["text"] = text
    return out


class _JSONObserver:
    def __init__(self, stream):
        self.stream = stream

    def __call__(self, event):
        try:
            self.stream.write(json_line(event) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed stream must not take the engine down
            pass


class RepeatLimiter:
    """Passes the first ``limit`` events of a kind (logger, level, format) per ``window`` seconds;
    counts the rest and reports them as one line per kind when the window ends."""

    def __init__(self, observer, limit: int = 10, window: float = 60.0, clock=time.monotonic):
        self.observer = observer
        self.limit = limit
        self.window = window
        self.clock = clock
        self._started = clock()
        self._counts: dict[tuple, list] = {}  # kind -> [count, last suppressed event]

    def __call__(self, event):
        now = self.clock()
        if now - self._started >= self.window:
            self.flush(now)
        kind = (event.get("log_namespace"), event.get("log_level"), event.get("log_format"))
        entry = self._counts.get(kind)
        if entry is None:
            entry = self._counts[kind] = [0, None]
        entry[0] += 1
        if entry[0] <= self.limit:
            self.observer(event)
        else:
            entry[1] = event

    def flush(self, now: float | None = None) -> None:
        """Report what was held back, and start a new window."""
        now = self.clock() if now is None else now
        seconds = max(1, round(now - self._started))
        counts, self._counts, self._started = self._counts, {}, now
        for count, last in counts.values():
            if last is None:
                continue
            more = count - self.limit
            summary = dict(last)
            summary["log_format"] = "... {more:,} more like this in the last {seconds}s (the last: {last_text})"
            summary.update(more=more, seconds=seconds, last_text=formatEvent(last) if last.get("log_format") else "",
                           log_time=time.time(), event="repeats_suppressed")
            summary.pop("log_failure", None)
            self.observer(summary)


class LogRing:
    """The last ``size`` lines written, as :func:`log_entry` dicts with a sequence number, for the
    log viewer (``hl7relay logs``, the console's Logs page). A line carrying message content
    (a channel with ``log_phi: true``) is marked ``phi``: the API never shows its text (the
    messages route gives content, masked unless a permitted person asks)."""

    def __init__(self, size: int = 5000):
        from collections import deque

        self.lines: deque = deque(maxlen=size)
        self.next_seq = 1

    def add(self, event) -> None:
        try:
            entry = log_entry(event)
        except Exception:  # noqa: BLE001 - a line that cannot be flattened is not worth losing the log for
            return
        entry.pop("traceback", None)
        entry["seq"] = self.next_seq
        entry["at"] = event.get("log_time", time.time())
        entry["phi"] = event.get("content") is not None
        if event.get("about_message"):  # its text may quote a message's values (ops/phi.mask_log_text)
            entry["about_message"] = True
        self.next_seq += 1
        self.lines.append(entry)

    def read(self, after: int = 0, limit: int = 100, level: str | None = None, channel: str | None = None,
             message_id: int | None = None, since: float | None = None, text: str | None = None) -> list[dict]:
        """The newest ``limit`` lines after ``after`` that match, oldest first."""
        least = _ORDER.get(level, 0) if level else 0
        needle = text.lower() if text else None
        found = [line for line in self.lines if line["seq"] > after
                 and _ORDER.get(line["level"], 2) >= least
                 and (channel is None or line.get("channel") == channel)
                 and (message_id is None or str(line.get("message_id")) == str(message_id))
                 and (since is None or line["at"] >= since)
                 and (needle is None or needle in line["text"].lower())]
        return found[-limit:]


_ORDER = {"trace": 0, "debug": 1, "info": 2, "warn": 3, "error": 4, "critical": 5}
LOG_RING = LogRing()


def announce(text: str, event: str, level: str = "info") -> None:
    """A lifecycle line (startup, ready, stopped): printed as it is in text mode (a warning on
    standard error, after "warning: "), a JSON log line (on standard error, with the rest of the
    log) in JSON mode, so that a log shipper reading JSON never meets a plain line."""
    if _state["format"] == "json":
        sys.stderr.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "level": level,
                                     "logger": "hl7relay.run", "event": event, "text": text}) + "\n")
        sys.stderr.flush()
    elif level == "info":
        print(text, flush=True)
    else:
        print(f"{'warning' if level == 'warn' else level}: {text}", file=sys.stderr, flush=True)


def start_logging(level: str = "info", log_format: str = "text", per_channel: dict | None = None,
                  reactor=None) -> ChannelLevels:
    predicate = ChannelLevels(level, per_channel)
    _state["format"] = log_format
    output = _JSONObserver(sys.stderr) if log_format == "json" else textFileLogObserver(sys.stderr)
    written = output

    def output(event, write=written):  # what is written is also kept for the log viewer (hl7relay logs)
        write(event)
        LOG_RING.add(event)

    limiter = RepeatLimiter(output)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(limiter, [predicate])], redirectStandardIO=False)
    if reactor is None:
        from twisted.internet import reactor
    from twisted.internet import task

    flusher = task.LoopingCall(limiter.flush)
    flusher.clock = reactor
    reactor.callWhenRunning(flusher.start, limiter.window, now=False)
    return predicate
