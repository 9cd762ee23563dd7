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
import json
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from hl7relay import events
from hl7relay.ops.phi import mask_text

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
    dropped: int = 0  # rows that went before anybody read them
    read_upto: int = 0  # the last row a client has read
    stopped: bool = False
    everything: bool = False  # no filter at all: every row is wanted

    def __post_init__(self):
        self.everything = (self.direction == "both" and self.channel is None and self.destination is None
                           and self.message_type is None)

    def wants(self, direction: str, channel: str, destination: str | None, message_type: str | None) -> bool:
        if self.everything:
            return True
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

    def add(self, row: str) -> None:
        """A row as JSON text (the values of ROW_FIELDS), shared by every session that wants it:
        text holds no object the garbage collector would walk again and again, and a read only
        joins it (measured: rows kept as objects cost the engine ~3x more per message)."""
        rows = self.rows
        if len(rows) == rows.maxlen and rows[0][0] > self.read_upto:
            self.dropped += 1  # the client reads too slowly: an unread row goes, the engine does not wait
        rows.append((self.next_seq, row))
        self.next_seq += 1

    def read_json(self, after: int, limit: int = 1000) -> tuple[str, int]:
        """(the rows after ``after`` as a JSON array of [seq, *ROW_FIELDS] arrays, how many)."""
        first = self.next_seq - len(self.rows)  # the sequence number of the oldest row kept
        start = max(0, after + 1 - first)
        rows = list(itertools.islice(self.rows, start, start + limit))
        if rows:
            self.read_upto = max(self.read_upto, rows[-1][0])
        return "[" + ",".join(f"[{seq},{row[1:]}" for seq, row in rows) + "]", len(rows)

    def read_rows(self, after: int, limit: int = 1000) -> list[list]:
        return json.loads(self.read_json(after, limit)[0])

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
        self._live_list: list = []
        self._outbound_wanted = False  # a live session wants outbound rows: keep what they show of their message
        self._live_until = 0.0  # until then, _live_list holds the live sessions
        # message id -> (type, control id), from the inbound rows: what an outbound row shows of its message
        self._recent: OrderedDict = OrderedDict()

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
        self._live_until = 0.0  # the live list is made again at the next event
        if not self._subscribed:
            self._subscribe(self.observe, events=("message_processed", *_OUT_EVENTS))
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
                self._live_until = 0.0
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
        if now < self._live_until:  # no session ended since the list was made
            return self._live_list
        live = [s for s in self.sessions.values() if now < s.expires_at]
        self._live_list, self._live_until = live, min((s.expires_at for s in live), default=0.0)
        self._outbound_wanted = any(s.direction != "in" for s in live)
        if not live:
            self._expire()
        return live

    def _inbound(self, f: dict) -> None:
        message_id, message_type = f.get("message_id"), f.get("message_type") or ""
        live = self._live(self.clock())  # (first: it says whether outbound rows are wanted)
        if message_id is not None and self._outbound_wanted:
            recent = self._recent  # what an outbound row shows of its message
            recent[message_id] = (message_type, f.get("control_id") or "")
            if len(recent) > 10_000:
                recent.popitem(last=False)
        row = None
        for session in live:
            if session.wants("in", f["channel"], None, message_type):
                if row is None:  # ROW_FIELDS as JSON text, written out by hand (a JSONEncoder per row cost 4x)
                    codes, latency, peer = f.get("ack_codes"), f.get("ack_latency"), f.get("peer")
                    row = (f'[{self.clock()!r},"in",{_text(f["channel"])},null,{_text(str(peer) if peer else "")},'
                           f'{_text(message_type)},{_text(f.get("control_id") or "")},{_number(message_id)},'
                           f'{_text(f.get("status") or "")},{_text(codes[-1] if codes else "")},{_ms(latency)},"",null]')
                session.add(row)

    def _outbound(self, event: str, f: dict) -> None:
        known = self._recent.get(f.get("message_id"))
        row = None
        for session in self._live(self.clock()):
            if session.wants("out", f["channel"], f["destination"], known[0] if known else None):
                if row is None:
                    message_type, control_id = known or ("", "")
                    seconds, error = f.get("seconds"), f.get("error") or ""
                    row = (f'[{self.clock()!r},"out",{_text(f["channel"])},{_text(f["destination"])},"",'
                           f'{_text(message_type)},{_text(control_id)},{_number(f.get("message_id"))},'
                           f'"{_OUT_EVENTS[event]}",{_text(f.get("ack") or "")},{_ms(seconds)},'
                           f'{_text(mask_text(error) if error else "")},{_number(f.get("attempts"))}]')
                session.add(row)


_text = json.encoder.encode_basestring  # a str as a JSON string (C)


def _number(value) -> str:
    return "null" if value is None else str(int(value))


def _ms(seconds) -> str:
    """Seconds as milliseconds to the hundredth (JSON)."""
    return "null" if seconds is None else repr(round(seconds * 1000, 2))
