"""Delimiters and HL7 escape sequences.

Reading decodes ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` (and ``\\P\\``, v2.7's truncation character) and
``\\Xhh...\\`` hex data; formatting escapes (``\\.br\\``, ``\\H\\``, ``\\N\\``...), character-set
switches (``\\C..\\``, ``\\M..\\``) and locally defined ``\\Z..\\`` escapes have no plain-text
meaning, so they are kept intact. Writing escapes every delimiter, and CR/LF as hex, so any text
set into a field reads back unchanged.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

__all__ = ["Delimiters", "DEFAULT_DELIMITERS", "escape", "unescape"]


class Delimiters(NamedTuple):
    """MSH-1 and MSH-2. A character the message does not declare is ``None``."""

    field: str = "|"
    component: str | None = "^"
    repetition: str | None = "~"
    escape: str | None = "\\"
    subcomponent: str | None = "&"
    truncation: str | None = None  # v2.7+: fifth character of MSH-2

    @classmethod
    def from_encoding(cls, field: str, encoding: str) -> "Delimiters":
        return _from_encoding(cls, field, encoding)

    @property
    def encoding_characters(self) -> str:
        return "".join(c for c in self[1:] if c)


DEFAULT_DELIMITERS = Delimiters()


@functools.lru_cache(maxsize=256)
def _from_encoding(cls, field: str, encoding: str) -> Delimiters:
    chars = list(encoding[:5])
    chars += [None] * (5 - len(chars))
    return cls(field, *chars)


@functools.lru_cache(maxsize=256)
def _escape_table(d: Delimiters) -> dict[int, str]:
    esc = d.escape
    if not esc:
        return {}
    table = {ord(esc): f"{esc}E{esc}", ord(d.field): f"{esc}F{esc}"}
    for char, code in ((d.component, "S"), (d.subcomponent, "T"), (d.repetition, "R"), (d.truncation, "P")):
        if char:
            table[ord(char)] = f"{esc}{code}{esc}"
    table.setdefault(13, f"{esc}X0D{esc}")
    table.setdefault(10, f"{esc}X0A{esc}")
    return table


def escape(value: str, d: Delimiters = DEFAULT_DELIMITERS) -> str:
    """Encode plain text so it can stand in one HL7 leaf value."""
    table = _escape_table(d)
    if not table:
        return value
    return value.translate(table)


def _decode_hex(body: str, codec: str) -> str | None:
    if not body or len(body) % 2 or any(c not in "0123456789ABCDEFabcdef" for c in body):
        return None
    data = bytes.fromhex(body)
    try:
        return data.decode(codec)
    except (UnicodeDecodeError, LookupError):
        return data.decode("latin_1")


def unescape(value: str, d: Delimiters = DEFAULT_DELIMITERS, codec: str = "utf_8") -> str:
    """Decode the escape sequences of one leaf value; unknown ones are kept as they are."""
    esc = d.escape
    if not esc or esc not in value:
        return value
    simple = {"F": d.field, "S": d.component, "T": d.subcomponent, "R": d.repetition, "E": esc, "P": d.truncation}
    out = []
    i = 0
    while True:
        start = value.find(esc, i)
        end = value.find(esc, start + 1) if start != -1 else -1
        if end == -1:
            out.append(value[i:])
            break
        out.append(value[i:start])
        body = value[start + 1 : end]
        decoded = simple.get(body) if len(body) == 1 else None
        if decoded is None and body[:1] == "X":
            decoded = _decode_hex(body[1:], codec)
        out.append(value[start : end + 1] if decoded is None else decoded)
        i = end + 1
    return "".join(out)
