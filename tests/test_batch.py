from hl7relay.hl7.batch import split_messages
from hl7relay.hl7.message import Message

MSG = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A04|%d|P|2.5\rEVN|A04|20240101\rPID|1||1||DOE^J\rPV1|1|O\r"


def errors(result):
    return [p for p in result.problems if p.severity == "E"]


def test_plain_concatenation_splits_at_each_msh():
    data = MSG % 1 + MSG % 2 + b"\n" + MSG % 3
    result = split_messages(data)
    assert [Message.from_bytes(c.data).control_id for c in result.messages] == ["1", "2", "3"]
    assert b"".join(c.data for c in result.messages) == data
    assert [c.line for c in result.messages] == [1, 5, 9]
    assert not result.problems


def test_full_batch_envelope():
    data = (b"FHS|^~\\&|A|B\rBHS|^~\\&|A|B\r" + MSG % 1 + MSG % 2 + b"BTS|2\rBHS|^~\\&|A|B\r" + MSG % 3
            + b"BTS|1\rFTS|2\r")
    result = split_messages(data)
    assert len(result.messages) == 3 and not result.problems
    assert [s[:3] for s in result.envelope] == [b"FHS", b"BHS", b"BTS", b"BHS", b"BTS", b"FTS"]


def test_optional_headers_and_trailers_are_warnings():
    for data in (b"BHS|^~\\&\r" + MSG % 1, MSG % 1 + b"BTS|1\r", b"FHS|^~\\&\r" + MSG % 1, MSG % 1 + b"FTS|1\r"):
        result = split_messages(data)
        assert len(result.messages) == 1 and result.problems and not errors(result)


def test_broken_envelopes_are_errors():
    orphans = split_messages(b"BHS|^~\\&\rEVN|A04\rPID|1\rBTS|1\r")
    assert not orphans.messages and orphans.is_hl7
    assert any("outside any message" in p.text for p in errors(orphans))
    assert any("BTS-1 says 1" in p.text for p in errors(orphans))
    second_fhs = split_messages(b"FHS|^~\\&\r" + MSG % 1 + b"FHS|^~\\&\r" + MSG % 2)
    assert any("FHS is not at the start" in p.text for p in errors(second_fhs))


def test_bom_and_junk_lines():
    result = split_messages(b"\xef\xbb\xbf" + MSG % 1 + b"   \n")
    assert len(result.messages) == 1 and not result.problems
    assert not split_messages(b"hello\nworld\n").is_hl7
