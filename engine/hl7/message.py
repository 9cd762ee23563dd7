"""The HL7 v2 message model: text in, fields read and written by HL7 path, text out.

Built for the per-message path of an interface engine: nothing is split until it is asked for,
and what was split is cached. Splitting a 1 KB message into segments costs about a microsecond;
a field is split only when a path reaches into it. An unmodified message gives back exactly the
bytes it was read from; a modified one re-joins only the segments that changed, with CR as the
segment terminator (LF and CRLF are accepted on input).
"""

from __future__ import annotations

import re
from typing import Iterator

from hl7relay.hl7.charsets import DEFAULT_CHARSET, DecodedText, decode_message
from hl7relay.errors import HL7RelayError, ParseError, PathError
from hl7relay.hl7.escape import Delimiters, escape, unescape
from hl7relay.hl7.path import EVERY, Path, parse_path

__all__ = ["Message", "HEADER_SEGMENTS"]

# Segments whose field 1 is the field separator itself, so their field n sits at split index n-1.
HEADER_SEGMENTS = frozenset({"MSH", "FHS", "BHS"})
_LINE_BREAKS = re.compile(r"\r\n|\r|\n")
# A segment id is three of these. HL7 lets MSH-1 be any character, so when it is one of them the
# id cannot be found by splitting on it: it is then the first three characters (see _name_of).
_ID_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


def _name_of(segment: str, fs: str) -> str:
    """The segment id of one segment's text, for a field separator that may occur in ids."""
    if len(segment) >= 3 and segment[3:4] in (fs, ""):
        return segment[:3]
    return segment.split(fs, 1)[0]


def _split_fields(segment: str, fs: str) -> list[str]:
    """``segment.split(fs)`` with the segment id kept whole when ``fs`` may occur in it."""
    if len(segment) >= 3 and segment[3:4] in (fs, ""):
        return [segment[:3], *segment[4:].split(fs)] if len(segment) > 3 else [segment]
    return segment.split(fs)


class Message:
    """One HL7 v2 message.

    ``Message(text)`` reads decoded text; :meth:`from_bytes` decodes bytes by MSH-18 first and
    keeps them, so :meth:`to_bytes` of an unmodified message returns them untouched.
    """

    __slots__ = (
        "text", "raw", "charset", "codec", "decode_problems", "delimiters",
        "_segments", "_names", "_index", "_fields", "_modified", "_fs_in_ids", "_header_values",
    )

    def __init__(self, text: str, *, raw: bytes | None = None, charset: str = DEFAULT_CHARSET,
                 codec: str = "utf_8", decode_problems: list[str] | None = None):
        if text.startswith("\ufeff"):
            text = text[1:]
        if not text.startswith("MSH") or len(text) < 4 or text[3] in "\r\n":
            head = text[:20].encode("unicode_escape").decode("ascii")
            raise ParseError(f"not an HL7 message: it must start with 'MSH' and a field separator, got {head!r}")
        self.text = text
        self.raw = raw
        self.charset = charset
        self.codec = codec
        self.decode_problems = decode_problems or []
        field_sep = text[3]
        line_end = len(text)
        for terminator in ("\r", "\n"):
            i = text.find(terminator, 4)
            if i != -1 and i < line_end:
                line_end = i
        end = text.find(field_sep, 4, line_end)
        encoding = text[4 : line_end if end == -1 else end]
        self.delimiters = Delimiters.from_encoding(field_sep, encoding)
        self._fs_in_ids = field_sep in _ID_CHARACTERS
        self._segments: list[str] | None = None
        self._names: list[str] | None = None
        self._index: dict[str, list[int]] | None = None
        self._fields: dict[int, list[str]] = {}
        self._modified = False
        self._header_values: dict[int, str] = {}  # msh() results, until MSH changes

    @classmethod
    def from_bytes(cls, data: bytes, default_charset: str = DEFAULT_CHARSET) -> "Message":
        """Decode by MSH-18 (else ``default_charset``) and read; the bytes are kept."""
        decoded: DecodedText = decode_message(data, default_charset)
        return cls(decoded.text, raw=data, charset=decoded.charset, codec=decoded.codec,
                   decode_problems=decoded.problems)

    # -- segments ---------------------------------------------------------------------------
    def _split(self) -> list[str]:
        text = self.text
        parts = _LINE_BREAKS.split(text) if "\n" in text else text.split("\r")
        segments = [p for p in parts if p]
        self._segments = segments
        fs = self.delimiters.field
        if self._fs_in_ids:
            self._names = [_name_of(s, fs) for s in segments]
        else:
            self._names = [s.split(fs, 1)[0] for s in segments]
        return segments

    @property
    def segments(self) -> list[str]:
        """The segments' text, in order (a copy)."""
        return list(self._segments if self._segments is not None else self._split())

    def segment_names(self) -> list[str]:
        if self._names is None:
            self._split()
        return list(self._names)

    def _locate(self, name: str, occurrence: int) -> int | None:
        if occurrence < 1:
            raise PathError(f"{name}[*] names every {name}: expand the path first (Message.expand)")
        if name == "MSH" and occurrence == 1:
            return 0  # every message starts with it; no need to split the rest
        if self._names is None:
            self._split()
        names = self._names
        if occurrence == 1:
            try:
                return names.index(name)  # the common case, at C speed
            except ValueError:
                return None
        positions = self._positions(name)
        return positions[occurrence - 1] if occurrence <= len(positions) else None

    def _positions(self, name: str) -> list[int]:
        index = self._index
        if index is None:
            if self._names is None:
                self._split()
            index = {}
            for i, segment_name in enumerate(self._names):
                index.setdefault(segment_name, []).append(i)
            self._index = index
        return index.get(name, [])

    def count(self, name: str) -> int:
        """How many segments of that name the message has."""
        return len(self._positions(name))

    def fields(self, position: int) -> list[str]:
        """Fields of the segment at ``position`` (0-based), so that ``fields[n]`` is SEG-n.

        For MSH (and FHS/BHS) ``fields[1]`` is the field separator and ``fields[2]`` the encoding
        characters, as the standard numbers them. Returns the cached list: do not modify it.
        """
        cached = self._fields.get(position)
        if cached is not None:
            return cached
        fs = self.delimiters.field
        if position == 0 and self._segments is None:
            text = self.text  # MSH alone: cut the first line rather than split the message
            end = len(text)
            for terminator in ("\r", "\n"):
                i = text.find(terminator, 0, end)
                if i != -1:
                    end = i
            parts = _split_fields(text[:end], fs) if self._fs_in_ids else text[:end].split(fs)
            parts.insert(1, fs)
            self._fields[0] = parts
            return parts
        segments = self._segments if self._segments is not None else self._split()
        text = segments[position]
        parts = _split_fields(text, fs) if self._fs_in_ids else text.split(fs)
        if self._names[position] in HEADER_SEGMENTS:
            parts.insert(1, fs)
        self._fields[position] = parts
        return parts

    def _store(self, position: int, fields: list[str]) -> None:
        if self._segments is None:
            self._split()
        fs = self.delimiters.field
        if self._names[position] in HEADER_SEGMENTS:
            text = fields[0] + fs + fs.join(fields[2:])
        else:
            text = fs.join(fields)
        self._segments[position] = text
        self._fields[position] = fields
        self._modified = True
        if position == 0:
            self._header_values = {}

    # -- reading ----------------------------------------------------------------------------
    def get(self, path: str | Path) -> str:
        """The value at ``path``; ``''`` when absent.

        A leaf (no deeper delimiter in it) comes back with its escapes decoded. A composite
        (``PID-5`` of ``DOE^JOHN``) comes back as its encoded HL7 text, so no structure is lost;
        address a component to get a decoded value. Without ``[r]`` the first repetition is read.
        """
        # the engine reads a couple of dozen values per message: the common cases are inlined
        p = path if isinstance(path, Path) else parse_path(path)
        segment, number = p.segment, p.field
        if segment == "MSH" and p.occurrence == 1:
            fields = self._fields.get(0) or self.fields(0)
        else:
            position = self._locate(segment, p.occurrence)
            if position is None:
                return ""
            fields = self._fields.get(position) or self.fields(position)
        if number >= len(fields):
            return ""
        value = fields[number]
        if not value:
            return ""
        if number <= 2 and segment in HEADER_SEGMENTS:
            return value  # MSH-1 and MSH-2 are the delimiters themselves: never decoded
        d = self.delimiters
        rep = d.repetition
        if rep and rep in value:
            reps = value.split(rep)
            r = p.repetition or 1
            value = reps[r - 1] if r <= len(reps) else ""
        elif p.repetition is not None and p.repetition > 1:
            return ""
        component = p.component
        if component is None:
            return self._leaf(value, (d.component, d.subcomponent))
        cs = d.component
        if component == 1 and cs:
            i = value.find(cs)
            if i != -1:
                value = value[:i]
        else:
            value = _nth(value, cs, component)
        if p.subcomponent is None:
            ss = d.subcomponent
            if ss and ss in value:
                return value
            esc = d.escape
            return unescape(value, d, self.codec) if esc and esc in value else value
        return self._leaf(_nth(value, d.subcomponent, p.subcomponent), ())

    def get_raw(self, path: str | Path) -> str:
        """The encoded HL7 text at ``path``, escapes and all (``SMITH\\S\\JONES`` stays one
        value): what copying a value to another place must write with :meth:`set_raw`, where
        :meth:`get`'s decoded text would split at a delimiter it had escaped."""
        p = path if isinstance(path, Path) else parse_path(path)
        position = 0 if p.segment == "MSH" and p.occurrence == 1 else self._locate(p.segment, p.occurrence)
        if position is None:
            return ""
        fields = self._fields.get(position) or self.fields(position)
        if p.field >= len(fields) or not fields[p.field]:
            return ""
        value = fields[p.field]
        if p.field <= 2 and p.segment in HEADER_SEGMENTS:
            return value
        d = self.delimiters
        if d.repetition and d.repetition in value:
            reps = value.split(d.repetition)
            r = p.repetition or 1
            value = reps[r - 1] if r <= len(reps) else ""
        elif p.repetition is not None and p.repetition > 1:
            return ""
        if p.component is not None:
            value = _nth(value, d.component, p.component)
            if p.subcomponent is not None:
                value = _nth(value, d.subcomponent, p.subcomponent)
        return value

    def msh(self, number: int, component: int = 0) -> str:
        """``MSH-<number>`` (or ``MSH-<number>.<component>``) exactly as :meth:`get` reads it,
        without a path: the header is read on every message (ACKs, the stored columns), and its
        values seldom hold an escape, a repetition or a subcomponent (those go through get).
        Kept until the header changes: the ACK, the stored columns and the sender ask again."""
        key = (number << 16) | component
        cached = self._header_values.get(key)
        if cached is not None:
            return cached
        value = self._header_value(number, component)
        self._header_values[key] = value
        return value

    def _header_value(self, number: int, component: int) -> str:
        fields = self._fields.get(0) or self.fields(0)
        if number >= len(fields):
            return ""
        value = fields[number]
        if not value or number <= 2:
            return value
        d = self.delimiters
        esc, rep, sub = d.escape, d.repetition, d.subcomponent
        if (esc and esc in value) or (rep and rep in value) or (sub and sub in value):
            return self.get(f"MSH-{number}.{component}" if component else f"MSH-{number}")
        return _nth(value, d.component, component) if component else value

    def _leaf(self, value: str, deeper: tuple) -> str:
        for sep in deeper:
            if sep and sep in value:
                return value
        return unescape(value, self.delimiters, self.codec)

    def repetitions(self, path: str | Path) -> list[str]:
        """Every repetition of a field, each read as :meth:`get` reads one."""
        p = path if isinstance(path, Path) else parse_path(path)
        if p.repetition is not None or p.component is not None:
            raise PathError(f"{p}: repetitions() takes a field path such as {p.segment}-{p.field}")
        position = self._locate(p.segment, p.occurrence)
        if position is None:
            return []
        fields = self.fields(position)
        if p.field >= len(fields) or not fields[p.field]:
            return []
        rep = self.delimiters.repetition
        count = fields[p.field].count(rep) + 1 if rep else 1
        return [self.get(p._replace(repetition=r)) for r in range(1, count + 1)]

    def expand(self, path: str | Path, create: bool = False) -> list[Path]:
        """The places a path names in this message, in order: ``OBX[*]-3.1`` is OBX[1]-3.1,
        OBX[2]-3.1, ... for each OBX there is; ``PID-3[*].4`` each repetition PID-3 has (none when
        it is empty). A path naming one segment gives that one place when the segment exists, and
        nothing when it does not, unless ``create``: a step writes into a segment only where the
        message has it (a "default" must never invent a segment), or where it says it may create it."""
        p = path if isinstance(path, Path) else parse_path(path, many=True)
        occurrence = p.occurrence
        if occurrence != EVERY and p.repetition != EVERY:  # one place: the common step, kept short
            return [p] if create or self._locate(p.segment, occurrence) is not None else []
        if occurrence == EVERY:
            if self._names is None:
                self._split()
            # counted in the list (C speed): the name index is built only where a second one is read
            occurrences = range(1, self._names.count(p.segment) + 1)
        elif create or self._locate(p.segment, occurrence) is not None:
            occurrences = range(occurrence, occurrence + 1)
        else:
            return []
        segment, number, repetition, component, subcomponent = p.segment, p.field, p.repetition, p.component, p.subcomponent
        make = tuple.__new__  # a Path without NamedTuple._replace's cost, once per place
        if repetition != EVERY:
            return [make(Path, (segment, o, number, repetition, component, subcomponent)) for o in occurrences]
        places = []
        rep = self.delimiters.repetition
        for o in occurrences:
            position = self._locate(segment, o)
            if position is None:
                continue
            fields = self.fields(position)
            value = fields[number] if number < len(fields) else ""
            if value:
                count = value.count(rep) + 1 if rep else 1
                places += [make(Path, (segment, o, number, r, component, subcomponent)) for r in range(1, count + 1)]
        return places

    def __getitem__(self, path: str) -> str:
        return self.get(path)

    # -- writing ----------------------------------------------------------------------------
    def set(self, path: str | Path, value: str) -> None:
        """Write plain text at ``path``; delimiters in it are escaped, so :meth:`get` returns it."""
        d = self.delimiters
        if not d.escape and any(c and c in value for c in d):
            raise PathError(f"{path}: the message declares no escape character, so {value!r} cannot be written")
        self.set_raw(path, escape(value, d))

    def __setitem__(self, path: str, value: str) -> None:
        self.set(path, value)

    def set_raw(self, path: str | Path, er7: str) -> None:
        """Write already-encoded HL7 text at ``path`` (e.g. ``'DOE^JOHN'`` into PID-5)."""
        p = path if isinstance(path, Path) else parse_path(path)
        if p.segment in HEADER_SEGMENTS and p.field <= 2:
            raise PathError(f"{p}: the delimiters in {p.segment}-1 and {p.segment}-2 cannot be rewritten")
        if "\r" in er7 or "\n" in er7:
            raise PathError(f"{p}: a value cannot contain a segment terminator")
        position = self._locate(p.segment, p.occurrence)
        if position is None:
            # create the missing segments (PV1[2]-3 on a message with no PV1 adds two)
            for _ in range(p.occurrence - self.count(p.segment)):
                self.append_segment(p.segment)
            position = self._locate(p.segment, p.occurrence)
            if position is None:  # cannot happen with _name_of; never loop on it
                raise PathError(f"{p}: segment {p.segment} could not be added to this message")
        fields = list(self.fields(position))
        if len(fields) <= p.field:
            fields.extend([""] * (p.field + 1 - len(fields)))
        d = self.delimiters
        value = fields[p.field]
        if p.repetition is None and p.component is None and not (d.repetition and d.repetition in value):
            value = er7
        else:
            reps = value.split(d.repetition) if d.repetition else [value]
            r = p.repetition or 1
            if r > 1 and not d.repetition:
                raise PathError(f"{p}: this message declares no repetition separator")
            reps.extend([""] * (r - len(reps)))
            target = reps[r - 1]
            if p.component is None:
                target = er7
            else:
                target = _replace_nth(target, d.component, p.component, p, lambda component: (
                    er7 if p.subcomponent is None
                    else _replace_nth(component, d.subcomponent, p.subcomponent, p, lambda _: er7)
                ))
            reps[r - 1] = target
            value = d.repetition.join(reps) if d.repetition else reps[0]
        fields[p.field] = value
        self._store(position, fields)

    def append_segment(self, text: str) -> None:
        """Add a segment (its HL7 text, e.g. ``'NTE|1||note'``) at the end of the message."""
        self.insert_segment(len(self.segments), text)

    def insert_segment(self, position: int, text: str) -> None:
        """Insert a segment before the 0-based ``position``."""
        if "\r" in text or "\n" in text or not text:
            raise PathError("a segment is one non-empty line of HL7 text")
        if position < 1:
            raise PathError("nothing can be inserted before MSH")
        if self._segments is None:
            self._split()
        fs = self.delimiters.field
        self._segments.insert(position, text)
        self._names.insert(position, _name_of(text, fs) if self._fs_in_ids else text.split(fs, 1)[0])
        self._reindex()

    def delete_segment(self, name: str, occurrence: int = 1) -> bool:
        """Remove the ``occurrence``-th segment called ``name``; False when there is none."""
        if name == "MSH":
            raise PathError("MSH cannot be deleted: it defines the message")
        position = self._locate(name, occurrence)
        if position is None:
            return False
        del self._segments[position]
        del self._names[position]
        self._reindex()
        return True

    def _reindex(self) -> None:
        self._index = None
        self._fields = {}
        self._modified = True
        self._header_values = {}

    # -- copies -----------------------------------------------------------------------------
    def copy(self) -> "Message":
        """An independent copy that shares nothing mutable (segments already split stay split)."""
        other = Message.__new__(Message)
        other.text, other.raw, other.charset, other.codec = self.text, self.raw, self.charset, self.codec
        other.decode_problems = list(self.decode_problems)
        other.delimiters = self.delimiters
        other._fs_in_ids = self._fs_in_ids
        other._segments = None if self._segments is None else list(self._segments)
        other._names = None if self._names is None else list(self._names)
        other._index = None
        other._fields = {position: list(fields) for position, fields in self._fields.items()}
        other._modified = self._modified
        other._header_values = dict(self._header_values)
        return other

    def header(self) -> "Message":
        """The MSH segment alone, as a message: what an ACK needs, without copying the body."""
        fields = self.fields(0)
        text = "MSH" + self.delimiters.field + self.delimiters.field.join(fields[2:]) + "\r"
        return Message(text, charset=self.charset, codec=self.codec)

    # -- output -----------------------------------------------------------------------------
    @property
    def modified(self) -> bool:
        return self._modified

    def to_text(self) -> str:
        """The message as text: the input itself when unmodified, else segments joined by CR."""
        if not self._modified:
            return self.text
        return "\r".join(self._segments) + "\r"

    __str__ = to_text

    def to_bytes(self) -> bytes:
        """The message as bytes in its own character set (the input bytes when unmodified)."""
        if not self._modified and self.raw is not None:
            return self.raw
        try:
            return self.to_text().encode(self.codec, "surrogateescape")
        except UnicodeEncodeError as exc:
            raise HL7RelayError(
                f"the message holds text that {self.charset} cannot encode "
                f"({exc.object[exc.start:exc.end]!r}); change MSH-18 or the value"
            ) from None

    def __repr__(self) -> str:
        return f"<Message {self.get('MSH-9')!r} {self.get('MSH-10')!r}>"

    # -- header shortcuts -------------------------------------------------------------------
    @property
    def message_type(self) -> str:
        return self.msh(9, 1)

    @property
    def trigger_event(self) -> str:
        return self.msh(9, 2)

    @property
    def structure_id(self) -> str:
        return self.msh(9, 3)

    @property
    def control_id(self) -> str:
        return self.msh(10)

    @property
    def processing_id(self) -> str:
        return self.msh(11, 1)

    @property
    def version(self) -> str:
        return self.msh(12, 1)

    def __iter__(self) -> Iterator[str]:
        return iter(self.segments)


def _nth(value: str, sep: str | None, n: int) -> str:
    if not sep:
        return value if n == 1 else ""
    if n == 1:
        i = value.find(sep)
        return value if i == -1 else value[:i]
    parts = value.split(sep)
    return parts[n - 1] if n <= len(parts) else ""


def _replace_nth(value: str, sep: str | None, n: int, p: Path, change) -> str:
    if not sep:
        if n > 1:
            raise PathError(f"{p}: this message does not declare the separator that path needs")
        return change(value)
    parts = value.split(sep)
    parts.extend([""] * (n - len(parts)))
    parts[n - 1] = change(parts[n - 1])
    return sep.join(parts)
