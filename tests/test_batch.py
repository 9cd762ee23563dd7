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


# -- the streaming splitter: any chunk size, bounded memory ---------------------------------------
from hypothesis import given, settings, strategies as st  # noqa: E402

from hl7relay.hl7.batch import MessageSplitter  # noqa: E402

_PIECES = st.sampled_from([MSG % 1, MSG % 22, b"FHS|^~\\&\r", b"BHS|^~\\&\r", b"BTS|2\r", b"FTS|1\r", b"\r\n", b"\n",
                           b"NTE|1||free text\r", b"\xef\xbb\xbf", b"MSH|^~\\&|X" + b"Y" * 300 + b"\r", b"OBX|1|ST|" + b"Z" * 200])


def _fed(data: bytes, sizes: list[int], limit: int = 64 * 1024 * 1024):
    splitter, out, position = MessageSplitter(limit), [], 0
    for size in sizes:
        out += splitter.feed(data[position:position + size])
        position += size
    out += splitter.feed(data[position:])
    out += splitter.finish()
    return out, splitter


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, max_size=12).map(b"".join), st.lists(st.integers(1, 40), max_size=60))
def test_the_splitter_gives_the_same_messages_at_every_chunk_size(data, sizes):
    whole = split_messages(data)
    out, splitter = _fed(data, sizes)
    assert [(c.data, c.offset, c.line, c.oversize) for c in out] == [(c.data, c.offset, c.line, 0) for c in whole.messages]
    assert splitter.problems == whole.problems and splitter.envelope == whole.envelope


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=12).map(b"".join), st.lists(st.integers(1, 40), max_size=60),
       st.integers(64, 400))
def test_a_message_past_the_limit_comes_out_cut_and_counted_and_the_next_one_whole(data, sizes, limit):
    whole = split_messages(data).messages
    out, splitter = _fed(data, sizes, limit)
    assert len(out) == len(whole)  # a long line never hides the MSH after it
    for got, expected in zip(out, whole):
        assert got.line == expected.line
        if len(expected.data) <= limit:
            assert (got.data, got.oversize) == (expected.data, 0)
        else:  # the message's first bytes (a line past the limit keeps its head), the rest counted
            assert expected.data.startswith(got.data[:MessageSplitter._LINE_HEAD]) and len(got.data) <= limit
            assert len(got.data) + got.oversize == len(expected.data)
    assert len(splitter._buffer) == 0


def test_the_splitter_holds_one_message_and_one_line_at_most():
    splitter, biggest = MessageSplitter(10_000), 0
    for n in range(2_000):
        splitter.feed(MSG % n)
        biggest = max(biggest, len(splitter._buffer))
    assert biggest <= 2 * len(MSG % 2_000)
    splitter.feed(b"MSH|^~\\&|A\rOBX|1|ED|" + b"x" * 100_000)  # one line past the limit: not buffered whole
    assert len(splitter._buffer) <= 10_000 + MessageSplitter._LINE_HEAD
