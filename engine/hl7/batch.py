"""Files and streams holding several messages: HL7 batches (FHS/BHS ... BTS/FTS) and plain
concatenations of messages.

Splitting works on bytes, before any decoding, because each message may declare its own
character set in MSH-18; segment names are ASCII in every character set HL7 allows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hl7relay.hl7.charsets import UTF8_BOM

__all__ = ["MessageChunk", "EnvelopeProblem", "SplitResult", "split_messages"]

_LINES = re.compile(rb"[^\r\n]+")
_ENVELOPE = (b"FHS", b"BHS", b"BTS", b"FTS")


@dataclass(slots=True)
class MessageChunk:
    """One message's bytes, cut from a larger input, with where it started."""

    data: bytes
    offset: int
    line: int  # 1-based line (segment) number of its MSH in the input


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


def split_messages(data: bytes) -> SplitResult:
    """Cut ``data`` into messages at every MSH, checking the batch envelope around them."""
    result = SplitResult()
    base = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    start: int | None = None  # offset of the open message's MSH
    start_line = 0
    file_open = batch_open = file_seen = False
    batches_in_file = messages_in_batch = 0

    def problem(severity: str, line: int | None, text: str) -> None:
        result.problems.append(EnvelopeProblem(severity, line, text))

    def close(end: int) -> None:
        nonlocal start, messages_in_batch
        if start is not None:
            result.messages.append(MessageChunk(data[start:end], start, start_line))
            messages_in_batch += 1
            start = None

    for number, match in enumerate(_LINES.finditer(data, base), start=1):
        line = match.group()
        name = line[:3]
        if name == b"MSH":
            close(match.start())
            start, start_line = match.start(), number
        elif name in _ENVELOPE and (len(line) == 3 or not line[3:4].isalnum()):
            close(match.start())
            result.envelope.append(line)
            if name == b"FHS":
                if file_seen or result.messages:
                    problem("E", number, "FHS is not at the start of the file (a file has one FHS, before everything else)")
                file_open = file_seen = True
                batches_in_file = 0
            elif name == b"BHS":
                if batch_open:
                    problem("W", number, "BHS before the previous batch's BTS")
                batch_open, messages_in_batch = True, 0
                batches_in_file += 1
            elif name == b"BTS":
                if not batch_open:
                    problem("W", number, "BTS without a BHS")
                announced = _count(line)
                if announced is not None and announced != messages_in_batch:
                    problem("E", number, f"BTS-1 says {announced} messages, the batch holds {messages_in_batch}")
                batch_open = False
            else:  # FTS
                if not file_open:
                    problem("W", number, "FTS without an FHS")
                if batch_open:
                    problem("W", number, "FTS before the batch's BTS")
                    batch_open = False
                announced = _count(line)
                if announced is not None and announced != max(batches_in_file, 1):
                    problem("E", number, f"FTS-1 says {announced} batches, the file holds {batches_in_file}")
                file_open = False
        elif start is None and line.strip():
            shown = line[:3].decode("ascii", "replace")
            problem("E", number, f"segment {shown!r} is outside any message (no MSH before it)")
    close(len(data))
    if batch_open:
        problem("W", None, "the batch has no BTS trailer")
    if file_open:
        problem("W", None, "the file has no FTS trailer")
    return result
