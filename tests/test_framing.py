from hypothesis import given, settings, strategies as st

from hl7relay.mllp.framing import END, START, Discarded, Frame, FrameTooLarge, MLLPFramer, frame

# payload bytes: anything, including <VT> and lone <FS>, but never the <FS><CR> end marker
payloads = st.binary(max_size=300).filter(lambda b: END not in b and not b.endswith(b"\x1c"))
junk = st.binary(max_size=20).filter(lambda b: START not in b)


def feed_in_chunks(data: bytes, size: int, framer: MLLPFramer | None = None):
    framer = framer or MLLPFramer()
    events = []
    for i in range(0, len(data), size):
        events += framer.feed(data[i:i + size])
    return framer, events


@given(st.lists(st.tuples(junk, payloads), min_size=1, max_size=6), junk, st.data())
@settings(max_examples=200)
def test_same_frames_at_every_chunk_size(parts, trailing, data):
    stream = b"".join(j + frame(p) for j, p in parts) + trailing
    expected = [p for _, p in parts]
    discarded = sum(len(j) for j, _ in parts) + len(trailing)
    for size in sorted({1, 2, 3, 7, len(stream), data.draw(st.integers(1, max(1, len(stream))))}):
        framer, events = feed_in_chunks(stream, size)
        assert [e.payload for e in events if isinstance(e, Frame)] == expected
        assert sum(e.count for e in events if isinstance(e, Discarded)) == discarded == framer.discarded_bytes
        assert not framer.in_frame


def test_vt_and_lone_fs_inside_a_payload_do_not_split_it():
    payload = b"MSH|^~\\&|A\x0bB|\x1cC\rPID|1\x1c\x1c"
    _, events = feed_in_chunks(frame(payload.rstrip(b"\x1c") + b"x"), 1)
    assert [e for e in events if isinstance(e, Frame)] == [Frame(payload.rstrip(b"\x1c") + b"x")]


def test_several_frames_in_one_read_come_out_in_order():
    framer = MLLPFramer()
    events = framer.feed(b"".join(frame(b"MSH|%d" % i) for i in range(1000)))
    assert [e.payload for e in events] == [b"MSH|%d" % i for i in range(1000)]


def test_empty_frame_is_a_frame():
    assert MLLPFramer().feed(frame(b"")) == [Frame(b"")]


def test_oversized_frame_is_reported_once_and_memory_released():
    framer = MLLPFramer(max_frame_bytes=100)
    events = framer.feed(START + b"x" * 60)
    assert events == [] and framer.in_frame
    events = framer.feed(b"y" * 60)
    assert events == [FrameTooLarge(120, 100, b"x" * 60 + b"y" * 60)]
    assert framer.buffered == 0 and framer.broken
    assert framer.feed(frame(b"MSH|ok")) == []  # the connection is to be closed: nothing more
    framer.reset()
    assert framer.feed(frame(b"MSH|ok")) == [Frame(b"MSH|ok")]


def test_an_oversized_frame_keeps_its_first_line_for_the_answer():
    framer = MLLPFramer(max_frame_bytes=50)
    [event] = framer.feed(START + b"MSH|^~\\&|A|B|C|D|1||ADT^A01|X1|P|2.5\rPID|" + b"z" * 80 + END + frame(b"MSH|next"))
    assert event == FrameTooLarge(event.size, 50, b"MSH|^~\\&|A|B|C|D|1||ADT^A01|X1|P|2.5") and event.size > 50
    assert framer.broken


def test_a_read_of_many_frames_is_not_copied_per_frame():
    """Many frames in one read are cut out of it by offset; the old framer copied the rest of the
    read once per frame (quadratic), which shows as several copies of the read alive at once."""
    import tracemalloc

    payloads = [b"MSH|^~\\&|%05d|" % i + b"x" * 200 for i in range(5000)]
    data = b"".join(frame(p) for p in payloads) + START + b"MSH|open"
    framer = MLLPFramer()
    tracemalloc.start()
    try:
        events = framer.feed(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [e.payload for e in events] == payloads and framer.buffered == len(b"MSH|open")
    # the frames themselves are one copy of the read; nothing else of that size
    assert peak < 1.5 * len(data), (peak, len(data))


def test_a_slow_sender_is_searched_once():
    """The end marker is searched only in bytes not searched before (O(n) for a byte-at-a-time sender)."""
    framer = MLLPFramer()
    framer.feed(START)
    for _ in range(1, 5000):
        framer.feed(b"a")
        assert framer._searched == framer.buffered - 1  # next search starts at the last byte only
    framer.feed(b"\x1c")
    assert framer.feed(b"\r") == [Frame(b"a" * 4999)]


def test_in_frame_tracks_an_open_frame():
    framer = MLLPFramer()
    framer.feed(b"junk")
    assert not framer.in_frame
    framer.feed(START + b"MSH")
    assert framer.in_frame
    framer.feed(END)
    assert not framer.in_frame
