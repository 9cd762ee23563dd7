"""The message tracer: live rows of what comes in and goes out, for a bounded time.

A trace session says what it wants (direction in/out/both, a channel, a destination, a message
type) and for how long (1 minute to 1 hour). While any session is open, :class:`Tracer` listens
to the engine's events; with none open it is not subscribed at all, so tracing costs nothing
when nobody traces. Each session keeps its rows in a bounded buffer that its client reads by
sequence number: a client that reads too slowly loses the oldest rows (counted as dropped),
the engine never waits for it.

Rows carry what identifies a message (its store id, type, control id, peer, status, ACK code,
latency), never its content: a client that wants the content asks the messages API for it by
id, masked unless the caller may see patient data and gives a reason (audited there).
"""

from __future__ import annotations

import itertools
import secrets
from collections import deque
from dataclasses import dataclass, field

from hl7relay import events

__all__ = ["Tracer", "TraceSession", "MAX_SESSIONS", "BUFFER_ROWS", "MIN_SECONDS", "MAX_SECONDS", "COLUMNS"]

MAX_SESSIONS = 10
BUFFER_ROWS = 5000
MIN_SECONDS, MAX_SECONDS, DEFAULT_SECONDS = 60.0, 3600.0, 300.0
_OUT_EVENTS = {"delivery_sent": "SENT", "delivery_failed": "ERROR", "delivery_retried": "RETRY"}
ROW_FIELDS = ("at", "direction", "channel", "destination", "peer", "message_type", "control_id", "message_id",
              "status", "ack", "ms", "error", "attempt")
COLUMNS = ("seq", *ROW_FIELDS)


@dataclass(slots=True)
class TraceSession:
    id: str
    actor: str
    direction: str  # in, out, both
    channel: str | None
    destination: str | None
    message_type: str | None  # "ADT" (any trigger) or "ADT^A01"
    started_at: float
    expires_at: float
    rows: deque = field(default_factory=lambda: deque(maxlen=BUFFER_ROWS))
    next_seq: int = 1
    dropped: int = 0
    stopped: bool = False

    def wants(self, direction: str, channel: str, destination: str | None, message_type: str | None) -> bool:
        if self.direction != "both" and self.direction != direction:
            return False
        if self.channel is not None and self.channel != channel:
            return False
        if self.destination is not None and (direction == "in" or self.destination != destination):
            return False
        if self.message_type is not None:
            if not message_type:
                return False
            if "^" in self.message_type:
                return message_type == self.message_type or message_type.startswith(self.message_type + "^")
            return message_type.split("^", 1)[0] == self.message_type
        return True

    def add(self, row: tuple) -> None:
        """A row (the values of ROW_FIELDS), shared by every session that wants it: no copy."""
        if len(self.rows) == self.rows.maxlen:
            self.dropped += 1  # the client reads too slowly: the oldest row goes, the engine does not wait
        self.rows.append((self.next_seq, row))
        self.next_seq += 1

    def read_rows(self, after: int, limit: int = 1000) -> list[list]:
        """[seq, *row] lists after ``after`` (what the API sends: compact, no keys repeated)."""
        first = self.next_seq - len(self.rows)  # the sequence number of the oldest row kept
        start = max(0, after + 1 - first)
        return [[seq, *row] for seq, row in itertools.islice(self.rows, start, start + limit)]

    def read(self, after: int, limit: int = 1000) -> list[dict]:
        return [dict(zip(COLUMNS, values)) for values in self.read_rows(after, limit)]

    def view(self, now: float) -> dict:
        return {"id": self.id, "actor": self.actor, "direction": self.direction, "channel": self.channel,
                "destination": self.destination, "message_type": self.message_type, "started_at": self.started_at,
                "expires_at": self.expires_at, "expires_in": max(0.0, self.expires_at - now),
                "done": now >= self.expires_at, "dropped": self.dropped, "buffered": len(self.rows)}


class Tracer:
    """The engine's trace sessions. ``clock``: the reactor's seconds (wall time for rows)."""

    def __init__(self, clock, subscribe=events.subscribe, unsubscribe=events.unsubscribe):
        self.clock = clock
        self._subscribe, self._unsubscribe = subscribe, unsubscribe
        self.sessions: dict[str, TraceSession] = {}
        self._subscribed = False
        # message id -> (type, control id), from the inbound rows: what an outbound row shows of its message
        self._recent: dict = {}

    def start(self, actor: str, direction: str = "both", channel: str | None = None, destination: str | None = None,
              message_type: str | None = None, seconds: float = DEFAULT_SECONDS) -> TraceSession:
        """A new session; ValueError when the request is not one (the API answers 400)."""
        self._expire()
        if direction not in ("in", "out", "both"):
            raise ValueError("direction is in, out or both")
        if not MIN_SECONDS <= seconds <= MAX_SECONDS:
            raise ValueError(f"a trace lasts {MIN_SECONDS / 60:g} to {MAX_SECONDS / 60:g} minutes")
        if destination is not None and direction == "in":
            raise ValueError("a destination is traced outbound: direction out or both")
        if sum(1 for s in self.sessions.values() if self.clock() < s.expires_at) >= MAX_SESSIONS:
            raise ValueError(f"{MAX_SESSIONS} traces are open already; stop one, or wait for one to end")
        now = self.clock()
        session = TraceSession(secrets.token_hex(8), actor, direction, channel or None, destination or None,
                               (message_type or "").strip().upper() or None, now, now + seconds)
        self.sessions[session.id] = session
        if not self._subscribed:
            self._subscribe(self.observe)
            self._subscribed = True
        return session

    def get(self, session_id: str) -> TraceSession:
        self._expire()
        session = self.sessions.get(session_id)
        if session is None:
            raise KeyError(f"no trace {session_id!r} (ended, or never started)")
        return session

    def stop(self, session_id: str) -> TraceSession:
        session = self.get(session_id)
        session.stopped = True
        self._expire()
        return session

    def _expire(self) -> None:
        now = self.clock()
        for session_id, session in list(self.sessions.items()):
            if session.stopped and session.expires_at > now:
                session.expires_at = now  # stopped: it ends now
            if now - session.expires_at >= 60:  # ended a minute ago: rows its client did not read go too
                del self.sessions[session_id]
        if self._subscribed and not any(now < s.expires_at for s in self.sessions.values()):
            self._unsubscribe(self.observe)  # nobody traces: the engine's events reach no tracer
            self._subscribed = False
            self._recent.clear()

    # -- events -----------------------------------------------------------------------------------
    def observe(self, event: str, fields: dict) -> None:
        if event == "message_processed":
            self._inbound(fields)
        elif event in _OUT_EVENTS:
            self._outbound(event, fields)

    def _live(self, now: float) -> list[TraceSession]:
        live = [s for s in self.sessions.values() if now < s.expires_at]
        if not live:
            self._expire()
        return live

    def _inbound(self, f: dict) -> None:
        now = self.clock()
        message_id, message_type = f.get("message_id"), f.get("message_type") or ""
        recent = self._recent
        if message_id is not None:
            recent[message_id] = (message_type, f.get("control_id") or "")
            if len(recent) > 10_000:
                del recent[next(iter(recent))]
        row = None
        for session in self._live(now):
            if session.wants("in", f["channel"], None, message_type):
                if row is None:
                    codes, latency = f.get("ack_codes"), f.get("ack_latency")
                    row = (now, "in", f["channel"], None, str(f.get("peer") or ""), message_type,
                           f.get("control_id") or "", message_id, f.get("status"), codes[-1] if codes else "",
                           None if latency is None else round(latency * 1000, 2), "", None)
                session.add(row)

    def _outbound(self, event: str, f: dict) -> None:
        now = self.clock()
        message_type, control_id = self._recent.get(f.get("message_id"), ("", ""))
        row = None
        for session in self._live(now):
            if session.wants("out", f["channel"], f["destination"], message_type or None):
                if row is None:
                    seconds = f.get("seconds")
                    row = (now, "out", f["channel"], f["destination"], "", message_type, control_id, f.get("message_id"),
                           _OUT_EVENTS[event], f.get("ack") or "", None if seconds is None else round(seconds * 1000, 2),
                           f.get("error") or "", f.get("attempts"))
                session.add(row)
