from hypothesis import given, strategies as st

from hl7relay.hl7.escape import DEFAULT_DELIMITERS, Delimiters, escape, unescape

D = DEFAULT_DELIMITERS
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)


def test_standard_escapes_decode():
    assert unescape(r"A\F\B\S\C\T\D\R\E\E\F") == "A|B^C&D~E\\F"


def test_truncation_escape_only_when_declared():
    assert unescape(r"x\P\y", Delimiters("|", "^", "~", "\\", "&", "#")) == "x#y"
    assert unescape(r"x\P\y", D) == r"x\P\y"


def test_hex_escape_decodes_in_the_message_charset():
    assert unescape(r"\X0D0A\ ") == "\r\n "
    assert unescape(r"\XC3A9\ ") == "\u00e9 "
    assert unescape(r"\XE9\ ", codec="iso8859_1") == "\u00e9 "


def test_formatting_and_unknown_escapes_are_kept():
    for kept in (r"line\.br\next", r"\H\bold\N\ ", r"\.sp2\ ", r"\Cxxyy\ ", r"\Zlocal\ ", r"\Xzz\ ", r"trailing\ "):
        assert unescape(kept) == kept


def test_escape_encodes_every_delimiter_and_line_breaks():
    assert escape("a|b^c&d~e\\f\rg\nh") == r"a\F\b\S\c\T\d\R\e\E\f\X0D\g\X0A\h"


@given(TEXT, st.sampled_from([D, Delimiters("#", "$", "*", "/", "%", "!"), Delimiters("|", "^", "~", "\\", "&", "#")]))
def test_escape_then_unescape_returns_the_text(text, delimiters):
    encoded = escape(text, delimiters)
    for char in (delimiters.field, delimiters.component, delimiters.repetition, delimiters.subcomponent, "\r", "\n"):
        assert char not in encoded
    assert unescape(encoded, delimiters) == text
