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

What a trace costs the engine (issue #16: at most 5% of its throughput with every row read) is
counted in instructions (bench/engine_instructions.py --trace), and shaped this code:
- An event copies a few values into each wanting session's ring, a list made once: a row leaves
  no new object the garbage collector counts. Rows kept as tuples made young collections ~3x as
  frequent under load; each promoted the engine's in-flight objects, until full collections cost
  more than the tracer's own code.
- What repeats from row to row (direction, channel, destination or peer, type, status, ACK code)
  is written out as JSON once per distinct combination (a "tail"), not once per row: writing a
  value costs ~1,000 instructions whatever its form.
- Times are integers (at_ms, latency_us): a float written as JSON (its shortest repr) costs ~9,000
  instructions for a timestamp. A page is written out when read, column slices zipped and
  formatted by C code, with no Python step per row.
- Sessions end by a timer, not by a clock read per event.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field

from hl7relay import events
from hl7relay.outcomes import DeliveryStatus
from hl7relay.ops.phi import mask_text

__all__ = ["Tracer", "TraceSession", "CONTENT_KINDS", "MAX_SESSIONS", "BUFFER_ROWS", "MIN_SECONDS", "MAX_SECONDS", "COLUMNS"]

MAX_SESSIONS = 10
# what a trace may be narrowed to, by the source and destination types that carry it
# what a destination carries, by its type; "fhir-content" stands for any destination whose last
# transformer is fhir (Controls.carrying)
CONTENT_KINDS = {"hl7": frozenset({"mllp", "channel"}), "api": frozenset({"http", "fhir"}),
                 "file": frozenset({"file", "sftp", "batch"}),
                 "fhir": frozenset({"fhir", "fhir-content"})}
BUFFER_ROWS = 5000
MIN_SECONDS, MAX_SECONDS, DEFAULT_SECONDS = 60.0, 3600.0, 300.0
# a delivery's row status: its stored status, or RETRY for an attempt that will be tried again
_OUT_EVENTS = {"delivery_sent": DeliveryStatus.SENT.value, "delivery_failed": DeliveryStatus.ERROR.value,
               "delivery_retried": "RETRY"}
# at_ms: when, in milliseconds since the epoch; latency_us: the ACK's latency (in) or the round
# trip (out), in microseconds; attempt: the delivery attempt (out). The values that repeat from
# row to row come last.
COLUMNS = ("seq", "at_ms", "message_id", "latency_us", "attempt", "control_id", "direction", "channel", "destination",
           "peer", "message_type", "status", "ack", "error")
# a row in a ring: at_ms, message_id, latency_us, attempt (each an int or "null"), the control id,
# the JSON of direction..ack (its tail), the error as JSON (masked)
_WIDTH = 7
_ROW = "[%s,%s,%s,%s,%s,%s,%s,%s]"  # seq, the row
_NULL, _EMPTY = "null", '""'
_encode = json.encoder.encode_basestring  # a str as a JSON string (C)
_RECENT = 10_000  # inbound messages whose type and control id an outbound row can show
_time_ns = time.time_ns


def _tail(direction: str, channel: str, destination, peer, message_type, status, ack) -> str:
    """The JSON of a row's direction..ack: written once per combination, shared by its rows."""
    text = _encode
    return (f'"{direction}",{text(channel)},{"null" if destination is None else text(destination)},{text(peer or "")},'
            f'{text(message_type or "")},{text(status or "")},{text(ack or "")}')


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
    # the rows: row ``seq`` at (seq % BUFFER_ROWS) * _WIDTH, written over in place (numbers and
    # text only, in a list made once)
    ring: list = field(default_factory=lambda: [None] * (BUFFER_ROWS * _WIDTH))
    next_seq: int = 1  # of the next row
    lost: int = 0  # rows that went before anybody read them, up to the last read
    read_upto: int = 0  # the last row a client has read
    stopped: bool = False
    everything: bool = False  # no filter at all: every row is wanted
    kind: str | None = None  # what it carries: hl7, api, file, fhir (CONTENT_KINDS)
    # with kind: the channels whose source, and the (channel, destination) pairs whose destination, carry it
    scope: tuple | None = None

    def __post_init__(self):
        self.everything = (self.direction == "both" and self.channel is None and self.destination is None
                           and self.message_type is None and self.scope is None)

    def wants(self, direction: str, channel: str, destination: str | None, message_type: str | None) -> bool:
        if self.everything:
            return True
        if self.scope is not None and (channel not in self.scope[0] if direction == "in"
                                       else (channel, destination) not in self.scope[1]):
            return False
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

    @property
    def first_kept(self) -> int:
        """The sequence number of the oldest row kept."""
        return max(1, self.next_seq - BUFFER_ROWS)

    @property
    def buffered(self) -> int:
        return self.next_seq - self.first_kept

    @property
    def dropped(self) -> int:
        """Rows that went before a client read them: the buffer keeps the newest BUFFER_ROWS, the
        engine never waits for a reader (counted here, not per row: nothing more per event)."""
        return self.lost + max(0, self.first_kept - 1 - self.read_upto)

    def read_json(self, after: int, limit: int = 1000) -> tuple[str, int]:
        """(the rows after ``after`` as a JSON array of arrays of COLUMNS, how many). Each column
        of a page is a slice of the ring, and the rows are formatted by C code (map, zip, %):
        no Python step per row."""
        first = max(after + 1, self.first_kept)
        end = min(self.next_seq, first + limit)
        pieces, ring, seq = [], self.ring, first
        while seq < end:
            start = seq % BUFFER_ROWS
            count = min(end - seq, BUFFER_ROWS - start)  # up to the ring's end, then on from its start
            base, stop = start * _WIDTH, (start + count) * _WIDTH
            pieces.append(",".join(map(_ROW.__mod__, zip(
                range(seq, seq + count), ring[base:stop:_WIDTH], ring[base + 1:stop:_WIDTH], ring[base + 2:stop:_WIDTH],
                ring[base + 3:stop:_WIDTH], map(_encode, ring[base + 4:stop:_WIDTH]), ring[base + 5:stop:_WIDTH],
                ring[base + 6:stop:_WIDTH]))))
            seq += count
        if end > first:
            self.lost = self.dropped  # what went unread until now stays lost
            self.read_upto = max(self.read_upto, end - 1)
        return "[" + ",".join(pieces) + "]", max(0, end - first)

    def read_rows(self, after: int, limit: int = 1000) -> list[list]:
        """The rows after ``after``, each the values of COLUMNS; the client has read them."""
        return json.loads(self.read_json(after, limit)[0])

    def read(self, after: int, limit: int = 1000) -> list[dict]:
        return [dict(zip(COLUMNS, values)) for values in self.read_rows(after, limit)]

    def view(self, now: float) -> dict:
        return {"id": self.id, "actor": self.actor, "direction": self.direction, "channel": self.channel,
                "destination": self.destination, "message_type": self.message_type, "kind": self.kind,
                "started_at": self.started_at,
                "expires_at": self.expires_at, "expires_in": max(0.0, self.expires_at - now),
                "done": now >= self.expires_at, "dropped": self.dropped, "buffered": self.buffered}


class Tracer:
    """The engine's trace sessions, on ``reactor`` (its seconds and callLater; rows carry the
    wall time)."""

    def __init__(self, reactor, subscribe=events.subscribe, unsubscribe=events.unsubscribe):
        self.reactor = reactor
        self._subscribe, self._unsubscribe = subscribe, unsubscribe
        self.sessions: dict[str, TraceSession] = {}
        self._subscribed = False
        self._live: list[TraceSession] = []  # the sessions not ended, made again when one starts or ends
        self._timer = None  # the next end of a live session
        self._outbound_wanted = False  # a live session wants outbound rows: keep what they show of their message
        # message id -> type, and -> control id, of the last inbound messages: what an outbound row
        # shows of its message (each map in two generations, the older dropped whole: no per-message
        # eviction, no object per message)
        self._types: dict = {}
        self._ids: dict = {}
        self._old_types: dict = {}
        self._old_ids: dict = {}
        self._in_tails: dict = {}  # (channel, peer, type, status, ACK code) -> its tail
        self._out_tails: dict = {}  # (channel, destination, type, status, ACK code) -> its tail

    def clock(self) -> float:
        return self.reactor.seconds()

    def start(self, actor: str, direction: str = "both", channel: str | None = None, destination: str | None = None,
              message_type: str | None = None, seconds: float = DEFAULT_SECONDS, kind: str | None = None,
              scope: tuple | None = None) -> TraceSession:
        """A new session; ValueError when the request is not one (the API answers 400). ``kind``
        narrows it to what is carried as HL7, API calls or files: ``scope`` names the channels
        (inbound) and the (channel, destination) pairs (outbound) whose types carry it."""
        if kind is not None and kind not in CONTENT_KINDS:
            raise ValueError(f"kind is one of {', '.join(CONTENT_KINDS)}")
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
                               (message_type or "").strip().upper() or None, now, now + seconds, kind=kind,
                               scope=(frozenset(scope[0]), frozenset(scope[1])) if kind is not None and scope else
                               ((frozenset(), frozenset()) if kind is not None else None))
        self.sessions[session.id] = session
        self._refresh()
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
        self._refresh()

    def _refresh(self) -> None:
        """The live sessions, what they want, and a timer for the next end among them; with none
        left, the tracer leaves the engine's events."""
        now = self.clock()
        live = [s for s in self.sessions.values() if now < s.expires_at]
        self._live = live
        self._outbound_wanted = any(s.direction != "in" for s in live)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if live:
            self._timer = self.reactor.callLater(min(s.expires_at for s in live) - now, self._refresh)
            if not self._subscribed:
                self._subscribe(self._inbound, events=("message_processed",))
                self._subscribe(self._outbound, events=tuple(_OUT_EVENTS))
                self._subscribe(self._file, events=("file_read",))
                self._subscribed = True
        elif self._subscribed:
            self._unsubscribe(self._inbound)  # nobody traces: the engine's events reach no tracer
            self._unsubscribe(self._outbound)
            self._unsubscribe(self._file)
            self._subscribed = False
            for kept in (self._types, self._ids, self._old_types, self._old_ids, self._in_tails, self._out_tails):
                kept.clear()

    # -- events (each handler subscribed to its own events) ----------------------------------------
    def _inbound(self, event: str, f: dict) -> None:
        codes = f["ack_codes"]
        key = (f["channel"], f["peer"], f["message_type"], f["status"], codes[-1] if codes else "")
        tail = self._in_tails.get(key)
        if tail is None:
            tail = self._new_tail(self._in_tails, key, "in", key[0], None, key[1])
        message_id, control_id = f["message_id"], f["control_id"] or ""
        if self._outbound_wanted and message_id is not None:
            self._types[message_id], self._ids[message_id] = key[2], control_id
            if len(self._types) > _RECENT:
                self._old_types, self._types, self._old_ids, self._ids = self._types, {}, self._ids, {}
        latency = f["ack_latency"]
        row = (_time_ns() // 1_000_000, _NULL if message_id is None else message_id,
               _NULL if latency is None else int(latency * 1e6), _NULL, control_id, tail, _EMPTY)
        for session in self._live:
            if session.everything or session.wants("in", key[0], None, key[2]):
                i = session.next_seq % BUFFER_ROWS * _WIDTH
                session.ring[i:i + _WIDTH] = row
                session.next_seq += 1

    def _file(self, event: str, f: dict) -> None:
        """A file a source finished with: a row of its own beside its messages' (type FILE, its
        name as the control id, its ledger state as the status; what it held as the error column)."""
        key = (f["channel"], f"file:{f['file']}", "FILE", f["state"], "")
        tail = self._new_tail(self._in_tails, key, "in", key[0], None, key[1]) if key not in self._in_tails \
            else self._in_tails[key]
        said = f"file {f['file_id']}: {f['messages']} messages" + (f", {f['errors']} as ERROR" if f["errors"] else "")
        row = (_time_ns() // 1_000_000, _NULL, _NULL, _NULL, f["file"], tail, _encode(said))
        for session in self._live:
            if session.everything or session.wants("in", key[0], None, "FILE"):
                i = session.next_seq % BUFFER_ROWS * _WIDTH
                session.ring[i:i + _WIDTH] = row
                session.next_seq += 1

    def _outbound(self, event: str, f: dict) -> None:
        message_id = f["message_id"]
        message_type = self._types.get(message_id)
        if message_type is not None:
            control_id = self._ids[message_id]
        elif (message_type := self._old_types.get(message_id)) is not None:
            control_id = self._old_ids[message_id]
        else:
            control_id = ""
        peer = f.get("peer")  # an API's method and URL (no query: keys travel there)
        key = (f["channel"], f["destination"], message_type, _OUT_EVENTS[event], f["ack"], peer)
        tail = self._out_tails.get(key)
        if tail is None:
            tail = self._new_tail(self._out_tails, key, "out", key[0], key[1], peer or "")
        seconds, attempts, error = f["seconds"], f["attempts"], f["error"]
        row = (_time_ns() // 1_000_000, _NULL if message_id is None else message_id,
               _NULL if seconds is None else int(seconds * 1e6), _NULL if attempts is None else attempts, control_id,
               tail, _encode(mask_text(error)) if error else _EMPTY)
        for session in self._live:
            if session.everything or session.wants("out", key[0], key[1], message_type):
                i = session.next_seq % BUFFER_ROWS * _WIDTH
                session.ring[i:i + _WIDTH] = row
                session.next_seq += 1

    @staticmethod
    def _new_tail(tails: dict, key: tuple, direction: str, channel: str, destination, peer) -> str:
        if len(tails) >= 10_000:  # peers' ports and types come and go: start afresh
            tails.clear()
        tails[key] = tail = _tail(direction, channel, destination, peer, key[2], key[3], key[4])
        return tail

