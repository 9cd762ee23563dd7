"""Listener protocol tests: StringTransport for the wire, task.Clock for time."""

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from hl7relay.ack import ErrorCode, Outcome
from hl7relay.mllp.framing import END, START, MLLPFramer, frame
from hl7relay.mllp.listener import ListenerConfig, MLLPListenerFactory
from hl7relay.receiving import Responder
from hl7relay.hl7.message import Message

MSG = b"MSH|^~\\&|PMS|CLINIC|LAB|LABFAC|20240105||ADT^A01^ADT_A01|%s|P|2.5.1\rEVN|A01|20240105\rPID|1||1^^^H^MR||DOE^J\rPV1|1|O\r"


class Harness:
    def __init__(self, handler=None, **config):
        self.clock = task.Clock()
        self.calls = []
        self.results = []
        self.factory = MLLPListenerFactory(Responder(handler or self.handler), ListenerConfig(**config), self.clock)

    def handler(self, message, peer):
        self.calls.append((message, peer))
        d = defer.Deferred()
        self.results.append(d)
        return d

    def connect(self, port=4000, host="10.0.0.5"):
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        protocol.makeConnection(transport)
        return protocol, transport


def acks(transport) -> list[Message]:
    events = MLLPFramer().feed(transport.value())
    return [Message.from_bytes(e.payload) for e in events]


def test_ack_is_written_only_when_the_handler_answers():
    h = Harness()
    protocol, transport = h.connect()
    protocol.dataReceived(frame(MSG % b"1"))
    assert len(h.calls) == 1 and transport.value() == b""
    h.results[0].callback(Outcome.accepted())
    [a] = acks(transport)
    assert a.get("MSA-1") == "AA" and a.get("MSA-2") == "1"
    assert not transport.disconnecting  # the connection stays open after ACKs
    assert str(h.calls[0][1]) == "10.0.0.5:4000"


def test_frames_in_any_chunking_are_processed_in_order_one_at_a_time():
    h = Harness()
    protocol, transport = h.connect()
    stream = b"".join(frame(MSG % str(i).encode()) for i in range(5))
    for i in range(0, len(stream), 7):
        protocol.dataReceived(stream[i:i + 7])
    for i in range(5):
        assert len(h.calls) == i + 1  # the next message waits for this one's answer
        assert h.calls[i][0].control_id == str(i)
        h.results[i].callback(Outcome.accepted())
    assert [a.get("MSA-2") for a in acks(transport)] == ["0", "1", "2", "3", "4"]


def test_bytes_outside_frames_are_discarded_and_counted():
    h = Harness(handler=lambda m, p: Outcome.accepted())
    protocol, transport = h.connect()
    protocol.dataReceived(b"\r\nnoise" + frame(MSG % b"1") + b"more")
    assert h.factory.discarded_bytes == 11
    assert [a.get("MSA-1") for a in acks(transport)] == ["AA"]


def test_empty_or_non_msh_payload_gets_a_negative_ack_and_the_connection_stays_usable():
    h = Harness(handler=lambda m, p: Outcome.accepted())
    protocol, transport = h.connect()
    protocol.dataReceived(frame(b"") + frame(b"PID|1||1") + frame(b"\r\n") + frame(MSG % b"ok"))
    answers = acks(transport)
    assert [a.get("MSA-1") for a in answers] == ["AR", "AR", "AR", "AA"]
    assert "does not start with an MSH" in answers[1].get("ERR-8")
    assert not transport.disconnecting


def test_handler_failure_is_ar_207_never_aa():
    def broken(message, peer):
        raise RuntimeError("store unavailable")

    h = Harness(handler=broken)
    protocol, transport = h.connect()
    protocol.dataReceived(frame(MSG % b"1"))
    [a] = acks(transport)
    assert a.get("MSA-1") == "AR" and a.get("ERR-3.1") == str(int(ErrorCode.APPLICATION_INTERNAL_ERROR))


def test_failed_deferred_is_ar_as_well():
    h = Harness()
    protocol, transport = h.connect()
    protocol.dataReceived(frame(MSG % b"1"))
    h.results[0].errback(OSError("disk full"))
    assert [a.get("MSA-1") for a in acks(transport)] == ["AR"]


def test_stalled_frame_is_discarded_and_the_connection_reset():
    h = Harness(read_timeout=5)
    protocol, transport = h.connect()
    protocol.dataReceived(START + b"MSH|^~\\&|slow")
    h.clock.advance(4.9)
    assert not transport.disconnecting
    h.clock.advance(0.2)
    assert transport.disconnecting and h.factory.timed_out_frames == 1 and h.calls == []


def test_read_timeout_is_per_frame_and_cleared_when_it_completes():
    h = Harness(handler=lambda m, p: Outcome.accepted(), read_timeout=5)
    protocol, transport = h.connect()
    protocol.dataReceived(START + MSG % b"1")
    h.clock.advance(4)
    protocol.dataReceived(END)
    h.clock.advance(10)
    assert not transport.disconnecting and len(acks(transport)) == 1


def test_oversized_frame_closes_only_that_connection():
    h = Harness(handler=lambda m, p: Outcome.accepted(), max_frame_bytes=1000)
    big, big_transport = h.connect(1)
    other, other_transport = h.connect(2)
    big.dataReceived(START + b"MSH|" + b"x" * 2000)
    assert big_transport.disconnecting and h.factory.oversized_frames == 1
    [answer] = acks(big_transport)
    assert answer.get("MSA-1") == "AR" and "over this listener's limit of 1,000 bytes" in answer.get("ERR-8")
    assert big.framer.buffered == 0  # memory released
    other.dataReceived(frame(MSG % b"2"))
    assert [a.get("MSA-1") for a in acks(other_transport)] == ["AA"] and not other_transport.disconnecting


def test_at_the_global_limit_the_longest_idle_connection_makes_room():
    """64 idle connections once locked every new client out for as long as they stayed open."""
    h = Harness(handler=lambda m, p: Outcome.accepted(), max_connections=2)
    first, t1 = h.connect(1)
    h.clock.advance(5)
    second, t2 = h.connect(2)
    h.clock.advance(5)
    first.dataReceived(frame(MSG % b"1"))  # the first is now the more recently active one
    h.clock.advance(5)
    third, t3 = h.connect(3)
    assert t2.disconnecting and not t1.disconnecting and not t3.disconnecting
    assert h.factory.evicted_connections == 1 and h.factory.refused_connections == 0 and h.factory.open_connections == 2
    second.connectionLost(None)  # the eviction is not counted twice
    assert h.factory.open_connections == 2


def test_at_the_global_limit_busy_connections_are_kept_and_the_newcomer_refused():
    h = Harness(max_connections=2)  # the handler never answers: both connections stay busy
    first, t1 = h.connect(1)
    second, t2 = h.connect(2)
    first.dataReceived(frame(MSG % b"1"))
    second.dataReceived(START + b"MSH|^~\\&|half a frame")
    third, t3 = h.connect(3)
    assert t3.disconnecting and not t1.disconnecting and not t2.disconnecting
    assert h.factory.refused_connections == 1 and h.factory.open_connections == 2


def test_one_address_cannot_take_every_slot():
    h = Harness(max_connections=100, max_connections_per_peer=3)  # the handler never answers: busy connections
    mine = [h.connect(port, host="10.0.0.66") for port in range(1, 4)]
    for protocol, _ in mine:
        protocol.dataReceived(frame(MSG % b"1"))
    _, refused = h.connect(4, host="10.0.0.66")
    assert refused.disconnecting and not any(t.disconnecting for _, t in mine)
    _, other = h.connect(9, host="10.0.0.7")
    assert not other.disconnecting
    mine[0][0].connectionLost(None)
    _, again = h.connect(5, host="10.0.0.66")
    assert not again.disconnecting and h.factory.per_peer["10.0.0.66"] == 3


def test_at_an_address_limit_its_longest_idle_connection_makes_room():
    """16 idle connections from one address (a PMS that opens one per message and never closes
    them) locked that address out for as long as they stayed open."""
    h = Harness(handler=lambda m, p: Outcome.accepted(), max_connections=100, max_connections_per_peer=3)
    mine = []
    for port in range(1, 4):
        mine.append(h.connect(port, host="10.0.0.66"))
        h.clock.advance(5)
    mine[0][0].dataReceived(frame(MSG % b"1"))  # the first is now the most recently active
    _, other = h.connect(9, host="10.0.0.7")  # another address's idle connection is not touched
    h.clock.advance(5)
    newcomer, t4 = h.connect(4, host="10.0.0.66")
    assert not t4.disconnecting and mine[1][1].disconnecting  # the second was idle the longest
    assert not mine[0][1].disconnecting and not mine[2][1].disconnecting and not other.disconnecting
    assert h.factory.evicted_connections == 1 and h.factory.refused_connections == 0
    assert h.factory.per_peer["10.0.0.66"] == 3
    newcomer.dataReceived(frame(MSG % b"2"))
    assert [a.get("MSA-1") for a in acks(t4)] == ["AA"]


def test_an_allow_list_refuses_other_addresses():
    import ipaddress

    h = Harness(allow=(ipaddress.ip_network("10.1.2.0/24"), ipaddress.ip_network("192.168.5.7/32")))
    results = {host: h.connect(1, host=host)[1].disconnecting for host in ("10.1.2.9", "192.168.5.7", "10.1.3.1", "192.168.5.8")}
    assert results == {"10.1.2.9": False, "192.168.5.7": False, "10.1.3.1": True, "192.168.5.8": True}
    assert h.factory.refused_connections == 2


def test_idle_connections_are_closed_when_configured():
    h = Harness(handler=lambda m, p: Outcome.accepted(), idle_timeout=60)
    protocol, transport = h.connect()
    h.clock.advance(59)
    protocol.dataReceived(frame(MSG % b"1"))
    h.clock.advance(59)
    assert not transport.disconnecting
    h.clock.advance(2)
    assert transport.disconnecting


def test_ack_messages_are_not_acknowledged_and_enhanced_mode_is_honoured():
    h = Harness(handler=lambda m, p: Outcome.accepted())
    protocol, transport = h.connect()
    protocol.dataReceived(frame(b"MSH|^~\\&|A|B|C|D|20240101||ACK^A01^ACK|9|P|2.5.1\rMSA|AA|1\r"))
    assert transport.value() == b""
    enhanced = (MSG % b"7").replace(b"|P|2.5.1\r", b"|P|2.5.1|||AL|AL\r")
    protocol.dataReceived(frame(enhanced))
    assert [a.get("MSA-1") for a in acks(transport)] == ["CA", "AA"]


def test_default_charset_applies_when_msh18_is_empty():
    seen = []
    h = Harness(handler=lambda m, p: seen.append(m.get("PID-5.1")) or Outcome.accepted(), charset="8859/1")
    protocol, _ = h.connect()
    protocol.dataReceived(frame((MSG % b"1").replace(b"DOE", "D\u00d6E".encode("latin-1"))))
    assert seen == ["D\u00d6E"]


def test_answer_after_disconnect_is_dropped_quietly():
    h = Harness()
    protocol, transport = h.connect()
    protocol.dataReceived(frame(MSG % b"1"))
    protocol.connectionLost(None)
    h.results[0].callback(Outcome.accepted())
    assert transport.value() == b""
    assert h.factory.open_connections == 0


def test_an_oversized_frame_is_answered_ar_after_the_frames_before_it_then_closed():
    h = Harness(max_frame_bytes=1000)
    protocol, transport = h.connect()
    protocol.dataReceived(frame(MSG % b"OK1") + START + (MSG % b"BIG1") + b"OBX|1|ST|x||" + b"y" * 2000)
    assert transport.value() == b"" and not transport.disconnecting  # the first is still being processed
    h.results[0].callback(Outcome.accepted())
    first, refused = acks(transport)
    assert (first.get("MSA-1"), first.get("MSA-2")) == ("AA", "OK1")
    assert (refused.get("MSA-1"), refused.get("MSA-2")) == ("AR", "BIG1")  # it names the message
    assert "over this listener's limit" in refused.get("ERR-8") and refused.get("ERR-3.1") == "104"
    assert transport.disconnecting and len(h.calls) == 1  # the big one never reached the handler


def test_msh18_naming_a_byte_codec_is_decoded_with_the_default_and_acknowledged_by_its_control_id():
    h = Harness(handler=lambda m, p: Outcome.accepted())
    protocol, transport = h.connect()
    for codec in (b"base64", b"zlib", b"UNICODE\x00"):
        msg = (MSG % (b"C-" + codec.strip(b"\x00"))).replace(b"|2.5.1\r", b"|2.5.1||||||" + codec + b"\r", 1)
        protocol.dataReceived(frame(msg))
    answers = acks(transport)
    assert [(a.get("MSA-1"), a.get("MSA-2")) for a in answers] == [("AA", "C-base64"), ("AA", "C-zlib"), ("AA", "C-UNICODE")]


def test_the_listener_writes_what_its_receiver_answers_and_makes_no_ack_of_its_own():
    """One owner of the answer: every frame the sender reads comes from the receiver (the
    running channel's ACK policy), for messages, unreadable payloads and frames too large alike."""
    from hl7relay.ack.answer import Answer

    asked = []

    class Scripted:
        def receive(self, message, peer):
            asked.append(("receive", message.control_id))
            return defer.succeed(Answer([b"MSH|ours-1\r", b"MSH|ours-2\r"]))

        def unreadable(self, text):
            asked.append(("unreadable", text))
            return Answer([b"MSH|unreadable\r"])

        def too_large(self, header, text):
            asked.append(("too_large", header.control_id if header is not None else None))
            return Answer([b"MSH|too-large\r"], close=True)

    factory = MLLPListenerFactory(Scripted(), ListenerConfig(max_frame_bytes=400), task.Clock())
    protocol = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.5", 4000))
    protocol.makeConnection(transport)
    protocol.dataReceived(frame(MSG % b"1") + frame(b"PID|1\r") + frame(MSG % b"2" + b"NTE|" + b"x" * 500 + b"\r"))
    assert [e.payload for e in MLLPFramer().feed(transport.value())] == [
        b"MSH|ours-1\r", b"MSH|ours-2\r", b"MSH|unreadable\r", b"MSH|too-large\r"]
    assert asked == [("receive", "1"), ("unreadable", "the payload does not start with an MSH segment"), ("too_large", "2")]
    assert transport.disconnecting  # the answer said close
