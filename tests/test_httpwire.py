"""HTTP/1.1 request framing (sans-IO), at every chunk size: bodies by length or chunks, limits,
100-continue, pipelining, and the ambiguous framings that smuggle requests, refused."""

from hypothesis import given, settings, strategies as st

from hl7relay.httpwire import Continue, Refusal, Request, RequestFramer, response

HL7 = b"MSH|^~\\&|PMS|CLINIC|LAB|HOSP|20240101||ADT^A08|C1|P|2.5.1\rPID|1||P1^^^H^MR\r"


def post(body: bytes, *extra: bytes, chunked: bool = False) -> bytes:
    head = [b"POST /hl7 HTTP/1.1", b"Host: engine", b"Content-Type: application/hl7-v2", *extra]
    if chunked:
        encoded = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in (body[:7], body[7:30], body[30:]) if piece)
        return b"\r\n".join(head + [b"Transfer-Encoding: chunked"]) + b"\r\n\r\n" + encoded + b"0\r\nX-Trailer: t\r\n\r\n"
    return b"\r\n".join(head + [b"Content-Length: %d" % len(body)]) + b"\r\n\r\n" + body


def feed_in(data: bytes, sizes, framer=None) -> list:
    framer = framer or RequestFramer()
    out, at, i = [], 0, 0
    while at < len(data):
        size = sizes[i % len(sizes)] if sizes else len(data)
        out += framer.feed(data[at:at + size])
        at += size
        i += 1
    return out


@settings(max_examples=200)
@given(st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=8))
def test_requests_come_out_whole_at_every_chunk_size(sizes):
    stream = post(HL7) + post(HL7 + b"OBX|1\r", chunked=True) + post(b"", b"Connection: close")
    events = feed_in(stream, sizes)
    assert [type(e) for e in events] == [Request, Request, Request]
    first, second, third = events
    assert (first.method, first.path, first.body, first.keep_alive) == ("POST", "/hl7", HL7, True)
    assert first.header("content-type") == "application/hl7-v2"
    assert second.body == HL7 + b"OBX|1\r" and second.keep_alive
    assert third.body == b"" and not third.keep_alive


def test_feeding_one_byte_at_a_time_stays_linear():
    body = HL7 * 2000  # 150 KB
    framer = RequestFramer()
    data = post(body, chunked=True)
    events = []
    for i in range(len(data)):
        events += framer.feed(data[i:i + 1])
    assert len(events) == 1 and events[0].body == body


def test_a_body_of_many_tiny_chunks_fed_at_once_does_not_recurse():
    data = (b"POST /hl7 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\nx\r\n" * 50_000 + b"0\r\n\r\n")
    [request] = RequestFramer().feed(data)
    assert request.body == b"x" * 50_000


def test_expect_100_continue_is_said_before_the_body_arrives():
    framer = RequestFramer()
    head, body = post(HL7, b"Expect: 100-continue").split(b"\r\n\r\n", 1)
    assert framer.feed(head + b"\r\n\r\n") == [Continue()]
    [request] = framer.feed(body)
    assert request.body == HL7
    assert [type(e) for e in RequestFramer().feed(post(HL7, b"Expect: 100-continue"))] == [Request]  # body came along


def refusal(data: bytes, **limits) -> Refusal:
    events = RequestFramer(**limits).feed(data)
    assert events and isinstance(events[-1], Refusal), events
    return events[-1]


def test_limits_are_refused_before_the_bytes_are_kept():
    assert refusal(b"POST /hl7 HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n", max_body=1024).status == 413
    chunked = b"POST /hl7 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"x" * 1024 + b"\r\n" + b"400\r\n"
    assert refusal(chunked, max_body=1500).status == 413
    assert refusal(b"POST /hl7 HTTP/1.1\r\nX: " + b"a" * 20000, max_head=16384).status == 431
    framer = RequestFramer()
    assert framer.feed(b"GARBAGE\r\n\r\n")[0].status == 400
    assert framer.feed(post(HL7)) == []  # after a refusal nothing more is read


def test_ambiguous_framings_that_smuggle_requests_are_refused():
    both = b"POST /hl7 HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert refusal(both).status == 400
    assert refusal(b"POST /hl7 HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!").status == 400
    assert refusal(b"POST /hl7 HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").status == 501
    assert refusal(b"POST /hl7 HTTP/1.1\r\nX: a\nContent-Length: 5\r\n\r\nhello").status == 400
    assert refusal(b"POST /hl7 HTTP/1.1\r\n Folded: yes\r\n\r\n").status == 400
    assert refusal(b"POST /hl7 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n").status == 400
    assert refusal(b"POST /hl7 HTTP/2.0\r\n\r\n").status == 505
    assert refusal(b"POST /hl7 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloX\r\n\r\n").status == 400  # the next "request"


def test_http_1_0_closes_unless_asked_and_a_response_is_one_block():
    [request] = RequestFramer().feed(b"POST /hl7 HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi")
    assert not request.keep_alive
    [request] = RequestFramer().feed(b"POST /hl7 HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi")
    assert request.keep_alive
    data = response(200, b"MSH|ACK", {"Content-Type": "application/hl7-v2"}, close=True)
    head, body = data.split(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\nDate: ") and b"\r\nContent-Length: 7\r\n" in head
    assert head.endswith(b"Connection: close") and body == b"MSH|ACK"
