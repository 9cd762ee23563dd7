import pytest

from hl7relay.hl7.charsets import codec_for, decode_message

MSH = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5||||||%s\rPID|1||1||%s\r"


@pytest.mark.parametrize("name, text, codec", [
    (b"ASCII", "DOE", "ascii"),
    (b"UNICODE UTF-8", "M\u00fcller \u738b", "utf_8"),
    (b"UTF-8", "M\u00fcller", "utf_8"),
    (b"8859/1", "M\u00fcller", "iso8859_1"),
    (b"8859/2", "\u0141\u00f3d\u017a", "iso8859_2"),
    (b"8859/5", "\u0418\u0432\u0430\u043d", "iso8859_5"),
    (b"8859/7", "\u0393\u03b9\u03ac\u03bd\u03bd\u03b7\u03c2", "iso8859_7"),
    (b"8859/15", "\u20ac 5", "iso8859_15"),
    (b"ISO IR100", "M\u00fcller", "iso8859_1"),
    (b"ISO IR192", "M\u00fcller", "utf_8"),
    (b"ISO IR87", "\u5c71\u7530", "iso2022_jp"),
    (b"GB 18030-2000", "\u738b\u4f1f", "gb18030"),
    (b"KS X 1001", "\uae40", "euc_kr"),
    (b"BIG-5", "\u738b", "big5"),
])
def test_msh18_selects_the_character_set(name, text, codec):
    data = MSH % (name, text.encode(codec))
    decoded = decode_message(data)
    assert decoded.codec == codec
    assert f"PID|1||1||{text}" in decoded.text
    assert decoded.problems == [] or name == b"UTF-8"  # UTF-8 is Python's name, not table 0211's


def test_default_charset_when_msh18_is_empty_and_configurable():
    data = MSH % (b"", "M\u00fcller".encode("latin-1"))
    assert decode_message(data, default_charset="8859/1").text.endswith("M\u00fcller\r")
    utf8 = decode_message(MSH % (b"", "M\u00fcller".encode()))
    assert utf8.charset == "UTF-8" and utf8.problems == []


def test_msh18_repetition_uses_the_first_character_set():
    data = MSH % (b"8859/1~ISO IR87", "\u00e9".encode("latin-1"))
    assert decode_message(data).codec == "iso8859_1"


def test_utf8_bom_before_msh_is_skipped():
    decoded = decode_message(b"\xef\xbb\xbf" + MSH % (b"UNICODE UTF-8", b"X"))
    assert decoded.bom and decoded.text.startswith("MSH|")


def test_undecodable_bytes_are_kept_and_reported():
    data = MSH % (b"UNICODE UTF-8", b"M\xfcller\xff")
    decoded = decode_message(data)
    assert any("not valid" in p for p in decoded.problems)
    # nothing vanished: the text encodes back to exactly the same bytes
    assert decoded.text.encode(decoded.codec, "surrogateescape") == data


def test_unknown_charset_falls_back_and_is_reported():
    decoded = decode_message(MSH % (b"KLINGON", b"X"))
    assert decoded.codec == "utf_8"
    assert any("unknown character set" in p for p in decoded.problems)


def test_codec_lookup_flags_non_table_names():
    assert codec_for("8859/1") == ("iso8859_1", True)
    assert codec_for("ISO IR 100") == ("iso8859_1", True)
    assert codec_for("windows-1252") == ("cp1252", False)
    assert codec_for("nonsense-set") == (None, False)


@pytest.mark.parametrize("name", [b"base64", b"hex", b"rot13", b"zlib", b"uu", b"punycode", b"bz2", b"unicode_escape",
                                  b"undefined", b"idna", b"UTF\x008", b"\x00", b"quopri"])
def test_msh18_naming_no_text_encoding_is_a_finding_and_decodes_with_the_default(name):
    data = MSH % (name, "M\u00fcller".encode())
    decoded = decode_message(data)
    assert decoded.codec == "utf_8" and decoded.charset == "UTF-8"
    assert decoded.text.endswith("PID|1||1||M\u00fcller\r")
    assert len(decoded.problems) == 1 and "unknown character set" in decoded.problems[0]


@pytest.mark.parametrize("name, codec", [("utf-8", "utf_8"), ("UTF8", "utf_8"), ("windows-1252", "cp1252"),
                                         ("ISO-8859-15", "iso8859_15"), ("Latin1", "iso8859_1"), ("Shift_JIS", "shift_jis")])
def test_documented_aliases_select_a_decoder_but_are_flagged(name, codec):
    assert codec_for(name) == (codec, False)
