"""Bytes to text: the character set comes from MSH-18, or from a configured default.

HL7 names its character sets in table 0211 ("8859/1", "UNICODE UTF-8", "ISO IR87"...). MSH itself
is always ASCII-compatible, so MSH-18 is read from the raw bytes before anything is decoded. Bytes
that do not decode never raise and never vanish: they are carried as lone surrogates
(``surrogateescape``), so encoding the text again gives back the very same bytes, and each problem
is reported in ``DecodedText.problems``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

__all__ = ["DecodedText", "decode_message", "codec_for", "ALIASES", "DEFAULT_CHARSET", "UTF8_BOM"]

DEFAULT_CHARSET = "UTF-8"
UTF8_BOM = b"\xef\xbb\xbf"

# HL7 table 0211 and the ISO-IR names (as DICOM spells them too) mapped to Python codecs.
_TABLE_0211 = {
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "ISO IR100": "iso8859_1",
    "ISO IR101": "iso8859_2",
    "ISO IR109": "iso8859_3",
    "ISO IR110": "iso8859_4",
    "ISO IR144": "iso8859_5",
    "ISO IR127": "iso8859_6",
    "ISO IR126": "iso8859_7",
    "ISO IR138": "iso8859_8",
    "ISO IR148": "iso8859_9",
    "ISO IR166": "tis_620",
    "ISO IR13": "shift_jis",
    "ISO IR14": "shift_jis",
    "ISO IR87": "iso2022_jp",
    "ISO IR159": "iso2022_jp_2",
    "ISO IR192": "utf_8",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "BIG-5": "big5",
    "UNICODE": "utf_8",
    "UNICODE UTF-8": "utf_8",
    "UNICODE UTF-16": "utf_16",
    "UNICODE UTF-32": "utf_32",
}
for _n in range(1, 17):
    if _n != 12:  # there is no ISO 8859-12
        _TABLE_0211[f"8859/{_n}"] = f"iso8859_{_n}"

# Names outside table 0211 that senders really put in MSH-18 (the IANA names of the same and of
# the Windows code pages), compared without case, spaces, hyphens or underscores. Nothing else
# selects a decoder: Python's codec registry also holds byte transforms (base64, hex, zlib, uu,
# rot13...) and oddities (punycode, unicode_escape), and a sender must not pick those.
ALIASES = {
    "UTF8": "utf_8", "UTF16": "utf_16", "UTF16LE": "utf_16_le", "UTF16BE": "utf_16_be",
    "UTF32": "utf_32", "UTF32LE": "utf_32_le", "UTF32BE": "utf_32_be",
    "USASCII": "ascii", "LATIN1": "iso8859_1", "LATIN2": "iso8859_2", "LATIN9": "iso8859_15",
    "SHIFTJIS": "shift_jis", "SJIS": "shift_jis", "EUCJP": "euc_jp", "EUCKR": "euc_kr",
    "ISO2022JP": "iso2022_jp", "GB2312": "gb2312", "GBK": "gbk", "GB18030": "gb18030",
    "BIG5": "big5", "KOI8R": "koi8_r", "KOI8U": "koi8_u", "TIS620": "tis_620",
    "8859": "iso8859_1",  # the family without its part, as some senders write it: read as 8859/1
}
for _n in range(1, 17):
    if _n != 12:
        ALIASES[f"ISO8859{_n}"] = f"iso8859_{_n}"
for _n in range(1250, 1259):
    ALIASES[f"WINDOWS{_n}"] = ALIASES[f"CP{_n}"] = f"cp{_n}"


@dataclass(slots=True)
class DecodedText:
    """The text of one message and how it was obtained from its bytes."""

    text: str
    charset: str  # the HL7 name used (MSH-18 or the default)
    codec: str  # the Python codec behind it
    problems: list[str] = field(default_factory=list)
    bom: bool = False


def _normalise(name: str) -> str:
    return " ".join(name.upper().replace("_", " ").split())


@functools.lru_cache(maxsize=256)
def codec_for(name: str) -> tuple[str | None, bool]:
    """Python codec for an HL7 character set name: ``(codec, is_table_0211_name)``.

    Names from :data:`ALIASES` (``UTF-8``, ``windows-1252``) are accepted but flagged, since a
    receiver following the standard may not know them; any other name gives ``(None, False)``.
    """
    key = _normalise(name)
    if key in _TABLE_0211:
        return _TABLE_0211[key], True
    if key.startswith("ISO IR ") and key.replace("ISO IR ", "ISO IR") in _TABLE_0211:
        return _TABLE_0211[key.replace("ISO IR ", "ISO IR")], True
    return ALIASES.get("".join(c for c in key if c not in " -"), None), False


def _msh18(data: bytes) -> str | None:
    """First repetition, first component of MSH-18, read from undecoded bytes."""
    if data[:3] != b"MSH" or len(data) < 8:
        return None
    end = data.find(b"\r")
    newline = data.find(b"\n", 0, end if end != -1 else len(data))
    if newline != -1:
        end = newline
    fields = data[: end if end != -1 else len(data)].split(data[3:4], 18)
    if len(fields) < 18:
        return None
    value = fields[17]
    encoding = fields[1]
    for sep in encoding[1:2] + encoding[0:1]:  # repetition, then component separator
        value = value.split(bytes((sep,)), 1)[0]
    try:
        return value.decode("ascii").strip() or None
    except UnicodeDecodeError:
        return None


def decode_message(data: bytes, default_charset: str = DEFAULT_CHARSET) -> DecodedText:
    """Decode one message's bytes using MSH-18, else ``default_charset``."""
    problems: list[str] = []
    bom = data.startswith(UTF8_BOM)
    body = data[3:] if bom else data
    declared = _msh18(body)
    charset = declared or default_charset
    codec, standard = codec_for(charset)
    if codec is None:
        problems.append(f"unknown character set {charset!r} in MSH-18 (not an HL7 table 0211 name or a "
                        f"known alias); decoded as {default_charset}")
        charset = default_charset
        codec, _ = codec_for(default_charset)
        codec = codec or "utf_8"
    elif declared and not standard:
        problems.append(f"character set {declared!r} in MSH-18 is not an HL7 table 0211 name")
    if bom and codec != "utf_8":
        problems.append(f"UTF-8 byte-order mark before MSH but MSH-18 says {charset}")
    try:
        text = body.decode(codec)
    except UnicodeDecodeError as exc:
        problems.append(
            f"bytes at offset {exc.start + (3 if bom else 0)} are not valid {charset}; kept undecoded"
        )
        try:
            text = body.decode(codec, "surrogateescape")
        except UnicodeDecodeError:
            # Stateful codecs (ISO 2022) cannot escape every byte; Latin-1 maps each byte to one
            # character, so nothing is lost and the raw bytes stay on the message anyway.
            problems.append(f"decoded as ISO-8859-1 because {charset} could not be applied")
            codec, charset = "latin_1", "8859/1"
            text = body.decode("latin_1")
    return DecodedText(text=text, charset=charset, codec=codec, problems=problems, bom=bom)
