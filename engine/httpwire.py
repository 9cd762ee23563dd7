"""HTTP/1.1 requests from bytes, and responses to bytes (sans-IO): what the ``http`` source reads.

:class:`RequestFramer` is fed whatever the socket gives and returns what became complete: a
:class:`Request` (head and whole body), :class:`Continue` (the sender asked ``Expect:
100-continue`` and waits for a go-ahead before its body), or a :class:`Refusal` (status and why;
nothing more is read from that connection). Bodies come with ``Content-Length`` or chunked;
both at once is refused (the classic request-smuggling ambiguity), and so is any other
transfer coding. Heads are bounded (``max_head``), bodies too (``max_body``: refused as soon as
the declared length or the bytes received pass it, before they are kept). Buffers are consumed
from the front without copying what remains, so feeding a request byte by byte stays linear.

twisted.web's request machinery (a Request object of dozens of attributes, a form parser run
on every POST's Content-Type, a header callback per line) cost the source about twice the CPU
of MLLP per message; this reads what a message POST needs and nothing else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from email.utils import formatdate

__all__ = ["Request", "Continue", "Refusal", "RequestFramer", "response", "REASONS"]

_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
REASONS = {100: "Continue", 200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large",
           415: "Unsupported Media Type", 422: "Unprocessable Content", 429: "Too Many Requests",
           431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
           503: "Service Unavailable", 505: "HTTP Version Not Supported"}


@dataclass(slots=True)
class Request:
    method: str
    target: str  # as sent: path and query
    version: str  # "HTTP/1.1"
    headers: dict  # lower-case names; repeated ones joined with ", "
    body: bytes = b""
    keep_alive: bool = True

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)


@dataclass(slots=True)
class Continue:
    """The sender waits for ``100 Continue`` before sending its body."""


@dataclass(slots=True)
class Refusal:
    status: int
    text: str
    headers: dict = field(default_factory=dict)


_AGAIN = object()
_HEX = frozenset(b"0123456789abcdefABCDEF")


class _State:
    HEAD, BODY, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILER, CLOSED = range(7)


class RequestFramer:
    def __init__(self, max_head: int = 16 * 1024, max_body: int = 16 * 1024 * 1024):
        self.max_head = max_head
        self.max_body = max_body
        self._buffer = bytearray()
        self._start = 0  # where unread bytes begin in _buffer
        self._state = _State.HEAD
        self._request: Request | None = None
        self._body: list[bytes] = []
        self._received = 0
        self._left = 0  # bytes of the body (or of the current chunk) still to come
        self._scanned = 0  # how far the head (or a chunk line) was searched for its end already

    @property
    def partial(self) -> bool:
        """A request has begun and is not whole yet."""
        return self._state not in (_State.HEAD, _State.CLOSED) or self._start < len(self._buffer)

    def feed(self, data: bytes) -> list:
        """Bytes in; complete requests (and Continue, or a final Refusal) out."""
        if self._state == _State.CLOSED:
            return []
        self._buffer += data
        out: list = []
        while True:
            event = self._step()
            if event is None:
                break
            if event is _AGAIN:  # the state moved on: look again (a loop, never recursion: a body of
                continue         # many tiny chunks fed at once must not exhaust the stack)
            out.append(event)
            if isinstance(event, Refusal):
                self._state = _State.CLOSED
                self._buffer.clear()
                break
        if self._start > 65536 or self._start == len(self._buffer):
            del self._buffer[:self._start]  # consumed: dropped in one go, not per request
            self._scanned = max(0, self._scanned - self._start)
            self._start = 0
        return out

    # -- one step: an event, or None when more bytes are needed ---------------------------------------
    def _step(self):
        state = self._state
        if state == _State.HEAD:
            return self._head()
        if state == _State.BODY:
            return self._fixed_body()
        if state == _State.CHUNK_SIZE:
            return self._chunk_size()
        if state == _State.CHUNK_DATA:
            return self._chunk_data()
        if state == _State.CHUNK_END:
            return self._chunk_end()
        if state == _State.TRAILER:
            return self._trailer()
        return None

    def _line_end(self, marker: bytes, limit: int, too_long: Refusal):
        buffer, start = self._buffer, self._start
        at = buffer.find(marker, max(start, self._scanned - len(marker) + 1))
        if at < 0:
            self._scanned = len(buffer)
            if len(buffer) - start > limit:
                return too_long
            return None
        self._scanned = 0
        return at

    def _head(self):
        # empty lines before a request are allowed (RFC 9112 2.2)
        while self._buffer.startswith(b"\r\n", self._start):
            self._start += 2
        if self._start == len(self._buffer):
            return None
        at = self._line_end(b"\r\n\r\n", self.max_head, Refusal(431, f"the request head is over {self.max_head} bytes"))
        if at is None or isinstance(at, Refusal):
            return at
        head = bytes(self._buffer[self._start:at])
        self._start = at + 4
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            return Refusal(400, "the request line is not METHOD TARGET HTTP/1.1")
        method, target, version = parts
        if not all(c in _TOKEN for c in method):
            return Refusal(400, "the method is not a token")
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            return Refusal(505 if version.startswith(b"HTTP/") else 400, "HTTP/1.1 or HTTP/1.0 only")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if b"\n" in line or b"\r" in line:  # a bare CR or LF: two parsers could read two different heads
                return Refusal(400, "a header line holds a bare CR or LF")
            name, colon, value = line.partition(b":")
            if not colon or not name or not all(c in _TOKEN for c in name):
                return Refusal(400, "a header line is not NAME: VALUE" + (" (folded lines are not allowed)"
                                                                           if line[:1] in (b" ", b"\t") else ""))
            key = name.decode("ascii").lower()
            text = value.strip(b" \t").decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        keep_alive = (headers.get("connection", "").lower() != "close" if version == b"HTTP/1.1"
                      else "keep-alive" in headers.get("connection", "").lower())
        request = Request(method.decode("ascii"), target.decode("latin-1"), version.decode("ascii"), headers,
                          keep_alive=keep_alive)
        coding = headers.get("transfer-encoding")
        length_text = headers.get("content-length")
        if coding is not None:
            if length_text is not None:
                return Refusal(400, "both Transfer-Encoding and Content-Length: which one frames the body?")
            if coding.lower() != "chunked":
                return Refusal(501, f"transfer coding {coding[:40]!r} is not supported (chunked is)")
            self._request, self._body, self._received = request, [], 0
            self._state = _State.CHUNK_SIZE
            return self._continue(request)
        if length_text is None or length_text == "0":  # no body
            self._state = _State.HEAD
            return request
        values = {v.strip() for v in length_text.split(",")}
        if len(values) != 1 or not next(iter(values)).isdigit():
            return Refusal(400, "Content-Length is not one whole number")
        length = int(next(iter(values)))
        if length > self.max_body:
            return Refusal(413, f"the body of {length} bytes is over the limit of {self.max_body}")
        self._request, self._left = request, length
        self._state = _State.BODY
        return self._continue(request)

    def _continue(self, request: Request):
        if request.headers.get("expect", "").lower() == "100-continue" and self._start == len(self._buffer):
            return Continue()
        return _AGAIN

    def _fixed_body(self):
        available = len(self._buffer) - self._start
        if available < self._left:
            return None
        request = self._request
        assert request is not None
        request.body = bytes(self._buffer[self._start:self._start + self._left])
        self._start += self._left
        self._request, self._state = None, _State.HEAD
        return request

    def _chunk_size(self):
        at = self._line_end(b"\r\n", 1024, Refusal(400, "a chunk size line is over 1024 bytes"))
        if at is None or isinstance(at, Refusal):
            return at
        line = bytes(self._buffer[self._start:at]).split(b";", 1)[0].strip(b" \t")
        self._start = at + 2
        if not line or len(line) > 16 or not all(c in _HEX for c in line):
            return Refusal(400, "a chunk size is not hexadecimal")
        size = int(line, 16)
        if self._received + size > self.max_body:
            return Refusal(413, f"the body is over the limit of {self.max_body} bytes")
        if size == 0:
            self._state = _State.TRAILER
            return _AGAIN
        self._left, self._state = size, _State.CHUNK_DATA
        return _AGAIN

    def _chunk_data(self):
        available = len(self._buffer) - self._start
        if not available:
            return None
        taken = min(available, self._left)
        self._body.append(bytes(self._buffer[self._start:self._start + taken]))
        self._start += taken
        self._left -= taken
        self._received += taken
        if self._left:
            return None
        self._state = _State.CHUNK_END
        return _AGAIN

    def _chunk_end(self):
        if len(self._buffer) - self._start < 2:
            return None
        if self._buffer[self._start:self._start + 2] != b"\r\n":
            return Refusal(400, "a chunk does not end with CRLF")
        self._start += 2
        self._state = _State.CHUNK_SIZE
        return _AGAIN

    def _trailer(self):
        at = self._line_end(b"\r\n", self.max_head, Refusal(431, "the trailer is too large"))
        if at is None or isinstance(at, Refusal):
            return at
        empty = at == self._start
        self._start = at + 2
        if not empty:
            return _AGAIN  # a trailer field: not used
        request = self._request
        assert request is not None
        request.body = b"".join(self._body)
        self._request, self._body, self._state = None, [], _State.HEAD
        return request


_date_cache: dict[int, str] = {}


def _date() -> str:
    """The Date header, made once a second."""
    now = int(time.time())
    text = _date_cache.get(now)
    if text is None:
        _date_cache.clear()
        text = _date_cache[now] = formatdate(now, usegmt=True)
    return text


def response(status: int, body: bytes, headers: dict, close: bool = False) -> bytes:
    """One whole response: status line, headers (with Date, Content-Length), body."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}", f"Date: {_date()}",
             f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
