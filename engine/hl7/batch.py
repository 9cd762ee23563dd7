"""Files and streams holding several messages: HL7 batches (FHS/BHS ... BTS/FTS) and plain
concatenations of messages.

Splitting works on bytes, before any decoding, because each message may declare its own
character set in MSH-18; segment names are ASCII in every character set HL7 allows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hl7relay.hl7.charsets import UTF8_BOM

__all__ = ["MessageChunk", "EnvelopeProblem", "SplitResult", "MessageSplitter", "split_messages"]

_LINES = re.compile(rb"[^\r\n]+")
_ENVELOPE = (b"FHS", b"BHS", b"BTS", b"FTS")


@dataclass(slots=True)
class MessageChunk:
    """One message's bytes, cut from a larger input, with where it started."""

    data: bytes
    offset: int
    line: int  # 1-based line (segment) number of its MSH in the input
    oversize: int = 0  # bytes past the splitter's limit, left out of data (0: the whole message)


@dataclass(slots=True, frozen=True)
class EnvelopeProblem:
    """A problem with the batch envelope or with segments outside any message.

    HL7's batch grammar is ``[FHS] {[BHS] {MSH...} [BTS]} [FTS]``: every header and trailer is
    optional, so a missing one is a warning ("W"); segments outside a message, a second file
    header and a wrong trailer count are errors ("E").
    """

    severity: str
    line: int | None
    text: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{self.severity} {where}{self.text}"


@dataclass(slots=True)
class SplitResult:
    messages: list[MessageChunk] = field(default_factory=list)
    problems: list[EnvelopeProblem] = field(default_factory=list)
    envelope: list[bytes] = field(default_factory=list)  # FHS/BHS/BTS/FTS segments, in order

    @property
    def is_hl7(self) -> bool:
        """False when nothing in the input looks like HL7 (no MSH, FHS or BHS at all)."""
        return bool(self.messages) or any(s[:3] in (b"FHS", b"BHS") for s in self.envelope)


def _count(segment: bytes) -> int | None:
    """BTS-1 / FTS-1: the number of messages / batches the trailer announces."""
    if len(segment) < 5:
        return None
    value = segment[4:].split(segment[3:4])[0].strip()
    return int(value) if value.isdigit() else None


class MessageSplitter:
    """Sans-IO: bytes in (any chunk size), whole messages out, with the batch envelope checked.

    It holds only the message being read and the line not yet ended, so a 500 MB batch file is
    split in bounded memory. A message longer than ``max_message_bytes`` comes out cut at that
    size with ``oversize`` counting what was left out (never buffered); a single line longer
    than that keeps its first bytes (its segment name) and counts the rest the same way."""

    _LINE_HEAD = 64  # what an overlong unfinished line keeps: enough to tell MSH from the rest

    def __init__(self, max_message_bytes: int = 64 * 1024 * 1024):
        self.max_message_bytes = max(max_message_bytes, self._LINE_HEAD)
        self.problems: list[EnvelopeProblem] = []
        self.envelope: list[bytes] = []
        # The buffer: the open message from its MSH (else nothing) and then the unfinished line.
        # _base is the input offset of buffer[0]; _shift the bytes left out of the open message
        # so far (offsets after them move by that much); _scanned where the unfinished line starts.
        self._buffer = bytearray()
        self._base = 0
        self._shift = 0
        self._scanned = 0
        self._line_dropped = 0  # bytes left out of the unfinished line
        self._line = 0  # lines (segments) seen so far
        self._open: int | None = None  # buffer position of the open message's MSH (0 between feeds)
        self._start: int | None = None  # its input offset
        self._start_line = 0
        self._oversize = 0  # bytes left out of the open message
        self._bom_pending = True  # a UTF-8 byte order mark may start the input
        self._file_open = self._batch_open = self._file_seen = False
        self._batches_in_file = self._messages_in_batch = self._messages_out = 0
        self._finished = False

    def feed(self, data: bytes) -> list[MessageChunk]:
        """The messages that ``data`` completes (a message ends where the next one begins)."""
        if self._finished:
            raise ValueError("feed after finish")
        out: list[MessageChunk] = []
        buffer = self._buffer
        buffer += data
        if self._bom_pending:
            if len(buffer) < len(UTF8_BOM) and UTF8_BOM.startswith(bytes(buffer)):
                return out  # the first bytes of a byte order mark, maybe
            self._bom_pending = False
            if buffer.startswith(UTF8_BOM):
                del buffer[:len(UTF8_BOM)]
                self._base += len(UTF8_BOM)
        end = max(buffer.rfind(b"\r", self._scanned), buffer.rfind(b"\n", self._scanned))
        if end >= 0:
            self._scan(out, end)
        self._bound()
        return out

    def finish(self) -> list[MessageChunk]:
        """The last message; then ``problems`` holds the envelope's too."""
        out: list[MessageChunk] = []
        if self._finished:
            return out
        self._finished = True
        if self._bom_pending and self._buffer.startswith(UTF8_BOM):
            del self._buffer[:len(UTF8_BOM)]
            self._base += len(UTF8_BOM)
        self._scan(out, len(self._buffer))
        self._close(out, len(self._buffer))
        self._buffer.clear()
        if self._batch_open:
            self._problem("W", None, "the batch has no BTS trailer")
        if self._file_open:
            self._problem("W", None, "the file has no FTS trailer")
        return out

    # -- inside ----------------------------------------------------------------------------------
    def _scan(self, out: list, end: int) -> None:
        """The complete lines up to ``end`` (a separator, or the end of the input). The buffer is
        cut once afterwards: a regular expression holds it while it scans."""
        buffer = self._buffer
        dropped, self._line_dropped = self._line_dropped, 0
        for match in _LINES.finditer(buffer, self._scanned, end):
            self._line += 1
            number, line, at = self._line, match.group(), match.start()
            name = line[:3]
            if name == b"MSH":
                self._close(out, at)
                self._open, self._start, self._start_line = at, self._base + self._shift + at, number
            elif name in _ENVELOPE and (len(line) == 3 or not line[3:4].isalnum()):
                self._close(out, at)
                self.envelope.append(bytes(line))
                self._envelope(name, line, number)
            elif self._open is None and line.strip():
                shown = line[:3].decode("ascii", "replace")
                self._problem("E", number, f"segment {shown!r} is outside any message (no MSH before it)")
            if dropped:  # the first line scanned is the one that was cut: its rest was its message's
                if self._open is not None:
                    self._oversize += dropped
                self._shift += dropped
                dropped = 0
        self._line_dropped += dropped  # no line ended yet: the cut one is still unfinished
        keep = self._open if self._open is not None else end
        if keep:
            del buffer[:keep]
            self._base += self._shift + keep
            self._shift = 0
            if self._open is not None:
                self._open = 0
        self._scanned = end - keep

    def _close(self, out: list, end: int) -> None:
        """The open message ends at buffer position ``end`` (the buffer is not cut here)."""
        if self._open is None:
            return
        if end - self._open > self.max_message_bytes:  # lines read since the last cut: over the limit too
            self._oversize += end - self._open - self.max_message_bytes
            end = self._open + self.max_message_bytes
        out.append(MessageChunk(bytes(self._buffer[self._open:end]), self._start or 0, self._start_line, self._oversize))
        self._oversize = 0
        self._messages_in_batch += 1
        self._messages_out += 1
        self._open = self._start = None

    def _bound(self) -> None:
        buffer, limit = self._buffer, self.max_message_bytes
        if self._open is not None and self._scanned > limit:  # the open message's complete lines
            excess = self._scanned - limit
            del buffer[limit:self._scanned]
            self._scanned = limit
            self._shift += excess
            self._oversize += excess
        unfinished = len(buffer) - self._scanned
        if unfinished > limit:  # one line longer than a message may be: its head is kept
            cut = self._scanned + self._LINE_HEAD
            self._line_dropped += len(buffer) - cut
            del buffer[cut:]

    def _problem(self, severity: str, line: int | None, text: str) -> None:
        self.problems.append(EnvelopeProblem(severity, line, text))

    def _envelope(self, name: bytes, line: bytes, number: int) -> None:
        if name == b"FHS":
            if self._file_seen or self._messages_out:
                self._problem("E", number, "FHS is not at the start of the file (a file has one FHS, before everything else)")
            self._file_open = self._file_seen = True
            self._batches_in_file = 0
        elif name == b"BHS":
            if self._batch_open:
                self._problem("W", number, "BHS before the previous batch's BTS")
            self._batch_open, self._messages_in_batch = True, 0
            self._batches_in_file += 1
        elif name == b"BTS":
            if not self._batch_open:
                self._problem("W", number, "BTS without a BHS")
            announced = _count(bytes(line))
            if announced is not None and announced != self._messages_in_batch:
                self._problem("E", number, f"BTS-1 says {announced} messages, the batch holds {self._messages_in_batch}")
            self._batch_open = False
        else:  # FTS
            if not self._file_open:
                self._problem("W", number, "FTS without an FHS")
            if self._batch_open:
                self._problem("W", number, "FTS before the batch's BTS")
                self._batch_open = False
            announced = _count(bytes(line))
            if announced is not None and announced != max(self._batches_in_file, 1):
                self._problem("E", number, f"FTS-1 says {announced} batches, the file holds {self._batches_in_file}")
            self._file_open = False


def split_messages(data: bytes) -> SplitResult:
    """Cut ``data`` into messages at every MSH, checking the batch envelope around them."""
    splitter = MessageSplitter(max_message_bytes=max(len(data), 1))
    messages = splitter.feed(data) + splitter.finish()
    return SplitResult(messages, splitter.problems, splitter.envelope)
