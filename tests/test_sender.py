"""Sender tests: MemoryReactorClock records connection attempts; StringTransport is the wire."""

import random

import pytest
from hypothesis import given, strategies as st
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from hl7relay.errors import AckTimeout, PeerApplicationError, PeerRejected, SendConnectionError
from hl7relay.mllp.framing import MLLPFramer, frame
from hl7relay.hl7.message import Message
from hl7relay.mllp.sender import MLLPSender, SenderConfig, SendStatus

MSG = "MSH|^~\\&|A|B|C|D|20240101||ADT^A01^ADT_A01|{id}|P|2.5.1{extra}\rEVN|A01|20240101\rPID|1||1^^^H^MR||DOE^J\rPV1|1|O\r"


def message(control_id="M1", extra=""):
    return Message(MSG.format(id=control_id, extra=extra))


def ack_frame(code, control_id, text=""):
    return frame(f"MSH|^~\\&|C|D|A|B|20240101||ACK^A01^ACK|X{control_id}|P|2.5.1\rMSA|{code}|{control_id}|{text}\r".encode())


class Harness:
    def __init__(self, **config):
        self.reactor = MemoryReactorClock()
        self.sender = MLLPSender(SenderConfig("127.0.0.1", 2575, **config), self.reactor, random.Random(7))
        self.transport = None
        self.results = []

    def send(self, msg):
        d = self.sender.send(msg)
        d.addCallback(self.results.append)
        return d

    def accept_connection(self, index=-1):
        factory = self.reactor.tcpClients[index][2]
        protocol = factory.buildProtocol(None)
        self.transport = StringTransport()
        protocol.makeConnection(self.transport)
        self.protocol = protocol
        return protocol

    def refuse_connection(self, index=-1):
        self.reactor.tcpClients[index][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))

    def written(self):
        return [Message.from_bytes(e.payload).control_id for e in MLLPFramer().feed(self.transport.value())]


def test_sends_on_one_kept_open_connection_and_matches_acks_by_msa2():
    h = Harness()
    h.send(message("M1"))
    h.send(message("M2"))
    assert len(h.reactor.tcpClients) == 1
    protocol = h.accept_connection()
    assert h.written() == ["M1"]  # one at a time
    protocol.dataReceived(ack_frame("AA", "OTHER"))  # not ours: logged and ignored
    assert h.results == [] and h.sender.mismatched_acks == 1
    protocol.dataReceived(ack_frame("AA", "M1"))
    assert h.written() == ["M1", "M2"]
    protocol.dataReceived(ack_frame("AA", "M2"))
    assert [(r.status, r.ack_code) for r in h.results] == [(SendStatus.ACCEPTED, "AA")] * 2
    assert len(h.reactor.tcpClients) == 1


@pytest.mark.parametrize("code, status, retryable, error", [
    ("AE", SendStatus.APPLICATION_ERROR, False, PeerApplicationError),
    ("AR", SendStatus.REJECTED, True, PeerRejected),
    ("CR", SendStatus.REJECTED, True, PeerRejected),
])
def test_negative_acks_are_typed(code, status, retryable, error):
    h = Harness()
    h.send(message())
    h.accept_connection().dataReceived(ack_frame(code, "M1", "PID-3 missing"))
    [result] = h.results
    assert result.status is status and result.retryable is retryable and "PID-3 missing" in result.text
    with pytest.raises(error):
        result.raise_for_status()


def test_ack_timeout_resets_the_connection_and_the_next_send_reconnects():
    h = Harness(ack_timeout=10)
    h.send(message("M1"))
    h.accept_connection()
    h.reactor.advance(9)
    assert h.results == []
    h.reactor.advance(2)
    [result] = h.results
    assert result.status is SendStatus.TIMED_OUT and result.retryable
    with pytest.raises(AckTimeout):
        result.raise_for_status()
    assert h.transport.disconnecting
    h.send(message("M2"))
    assert len(h.reactor.tcpClients) == 2


def test_the_timed_out_connection_ending_late_does_not_fail_the_next_message():
    """The aborted connection's end arrived while the next one was being made and failed it:
    `hl7relay send` reported the message after a timeout as CONNECTION FAILED."""
    h = Harness(ack_timeout=10)
    h.send(message("M1"))
    old = h.accept_connection()
    h.reactor.advance(11)
    h.send(message("M2"))  # a new connection is being made...
    old.connectionLost(Failure(ConnectionRefusedError()))  # ...when the aborted one's end arrives
    assert len(h.results) == 1
    new = h.accept_connection()
    assert h.written() == ["M2"]
    new.dataReceived(ack_frame("AA", "M2"))
    assert [(r.control_id, r.status) for r in h.results] == [("M1", SendStatus.TIMED_OUT), ("M2", SendStatus.ACCEPTED)]


def test_each_message_gets_the_whole_ack_timeout_from_its_own_send():
    h = Harness(ack_timeout=10)
    h.send(message("M1"))
    protocol = h.accept_connection()
    h.reactor.advance(6)
    protocol.dataReceived(ack_frame("AA", "M1"))
    h.reactor.advance(3)
    h.send(message("M2"))  # at t=9: the timer armed for M1 (t=10) must not time M2 out
    h.reactor.advance(9.5)
    assert [r.status for r in h.results] == [SendStatus.ACCEPTED]
    h.reactor.advance(1)  # t=19.5: ten seconds after M2 was sent
    assert [r.status for r in h.results] == [SendStatus.ACCEPTED, SendStatus.TIMED_OUT]
    assert h.transport.disconnecting
    assert len(h.reactor.getDelayedCalls()) == 0  # one timer per sender, gone once it has fired
    h.reactor.advance(60)  # and nothing fires late for a message already answered
    assert len(h.results) == 2


def test_enhanced_mode_waits_for_the_application_ack():
    h = Harness(ack_timeout=10)
    h.send(message("M1", "|||AL|AL"))
    protocol = h.accept_connection()
    protocol.dataReceived(ack_frame("CA", "M1"))
    assert h.results == []
    protocol.dataReceived(ack_frame("AA", "M1"))
    assert [(r.status, r.ack_code) for r in h.results] == [(SendStatus.ACCEPTED, "AA")]


def test_enhanced_mode_accept_only_and_missing_application_ack():
    h = Harness(ack_timeout=10)
    h.send(message("M1", "|||AL|NE"))
    protocol = h.accept_connection()
    protocol.dataReceived(ack_frame("CA", "M1"))
    assert [(r.status, r.ack_code) for r in h.results] == [(SendStatus.ACCEPTED, "CA")]
    h.send(message("M2", "|||AL|AL"))
    protocol.dataReceived(ack_frame("CA", "M2"))
    h.reactor.advance(11)
    assert h.results[-1].status is SendStatus.TIMED_OUT and "accepted (CA)" in h.results[-1].text


def test_messages_that_expect_no_ack_complete_once_written():
    h = Harness()
    h.send(Message("MSH|^~\\&|A|B|C|D|20240101||ACK^A01^ACK|K1|P|2.5.1\rMSA|AA|M0\r"))
    h.send(message("M9", "|||NE|NE"))
    h.accept_connection()
    assert h.written() == ["K1", "M9"]
    assert [r.status for r in h.results] == [SendStatus.ACCEPTED, SendStatus.ACCEPTED]


def test_connection_failure_then_exponential_backoff_with_jitter():
    h = Harness(backoff_initial=1, backoff_max=8)
    h.send(message("M1"))
    h.refuse_connection()
    [result] = h.results
    assert result.status is SendStatus.CONNECTION_FAILED and result.retryable
    with pytest.raises(SendConnectionError):
        result.raise_for_status()
    delays = []
    for attempt in range(2, 7):
        before = len(h.reactor.tcpClients)
        h.send(message(f"M{attempt}"))
        waited = 0.0
        while len(h.reactor.tcpClients) == before:
            h.reactor.advance(0.05)
            waited += 0.05
        delays.append(waited)
        h.refuse_connection()
    ceilings = [1, 2, 4, 8, 8]
    for delay, ceiling in zip(delays, ceilings):
        assert ceiling / 2 - 0.05 <= delay <= ceiling + 0.05
    h.send(message("M7"))
    h.reactor.advance(8.1)
    h.accept_connection()
    h.protocol.dataReceived(ack_frame("AA", "M7"))
    assert h.results[-1].status is SendStatus.ACCEPTED
    assert h.sender.backoff_delay() == 0.0  # success resets the backoff


def test_connection_lost_while_waiting():
    h = Harness()
    h.send(message("M1"))
    protocol = h.accept_connection()
    protocol.connectionLost(None)
    assert h.results[0].status is SendStatus.TIMED_OUT and "closed" in h.results[0].text


@pytest.mark.parametrize("echo", ["C7\x00 ", "C7", "C7\ufffd", " C7\x00", "C7\ufffdX"])
def test_an_ack_echoing_a_control_id_without_its_nul_or_undecodable_bytes_still_matches(echo):
    """A peer that drops a NUL or replaces an undecodable byte in MSA-2 once left the message
    unanswered for ever, blocking an in-order queue behind it."""
    h = Harness()
    h.send(Message.from_bytes(MSG.format(id="C7@X", extra="").encode().replace(b"@", b"\x00\xff")))
    protocol = h.accept_connection()
    protocol.dataReceived(frame(f"MSH|^~\\&|C|D|A|B|20240101||ACK^A01^ACK|X1|P|2.5.1\rMSA|AA|{echo}\r".encode()))
    assert [r.status for r in h.results] == [SendStatus.ACCEPTED]


def test_an_ack_for_another_control_id_is_still_ignored():
    h = Harness()
    h.send(message("C7\x00"))
    protocol = h.accept_connection()
    protocol.dataReceived(ack_frame("AA", "C8"))
    assert h.results == [] and h.sender.mismatched_acks == 1


def test_an_echo_cut_at_a_nul_or_at_20_characters_matches():
    from hl7relay.mllp.sender import same_control_id

    assert same_control_id("AB", "AB\x00CD") and same_control_id("ABCD", "AB\x00CD")
    assert same_control_id("12345678901234567890", "12345678901234567890123")
    assert not same_control_id("1234567890", "1234567890123") and not same_control_id("", "\x00")
    assert not same_control_id("AC", "AB\x00CD")


# -- ACKs matched from their bytes -----------------------------------------------------------------
def test_a_plain_aa_is_matched_without_parsing_and_reads_as_the_parsed_ack():
    h = Harness()
    h.send(message("M1"))
    protocol = h.accept_connection()
    payload = MLLPFramer().feed(ack_frame("AA", "M1"))[0].payload
    protocol.dataReceived(ack_frame("AA", "M1"))
    [result] = h.results
    assert result.status is SendStatus.ACCEPTED and result.ack_code == "AA" and result.text == ""
    assert result.ack is None and result.ack_bytes == payload  # matched from the bytes
    assert result.ack_as_text() == Message.from_bytes(payload).to_text()
    assert result.ack_message().get("MSA-2") == "M1"


@pytest.mark.parametrize("ack", [
    "MSH|^~\\&|C|D|A|B|1||ACK|X|P|2.5.1\rMSA|AA|M1|all good\r",  # MSA-3: its text is kept
    "MSH|^~\\&|C|D|A|B|1||ACK|X|P|2.5.1\rMSA|AA|M1\rERR|||207^x^HL70357|W\r",  # an ERR (a warning)
    "MSH|^~\\&|C|D|A|B|1||ACK|X|P|2.5.1\nMSA|AA|M1\n",  # LF between segments
    "MSH#^~\\&#C#D#A#B#1##ACK#X#P#2.5.1\rMSA#AA#M1\r",  # other delimiters
    "MSH|^~\\&|C|D|A|B|1||ACK|X|P|2.5.1\rMSA|aa|M1\r",  # lower case
    "MSH|^~\\&|C|D|A|B|1||ACK|X|P|2.5.1|||||8859/1\rMSA|AA|M1\r".replace("C|D", "C\xe9|D"),  # not ASCII
    "MSH|^~\\&|C|D|A|B|1||ACK|X|P|2.5.1\rMSA|AA| M1 \r",  # an echo with spaces
])
def test_every_other_ack_form_is_parsed_and_still_matches(ack):
    from hl7relay.mllp.sender import _plain_ack

    h = Harness()
    h.send(message("M1"))
    protocol = h.accept_connection()
    data = ack.encode("latin-1")
    quick = _plain_ack(data)
    assert quick is None or quick[1] != "M1"  # not taken from the bytes: parsed
    protocol.dataReceived(frame(data))
    [result] = h.results
    assert result.status is SendStatus.ACCEPTED and result.ack is not None
    assert result.ack_as_text() == result.ack.to_text()


def test_a_plain_ca_in_enhanced_mode_still_waits_for_the_application_ack():
    h = Harness()
    h.send(message("M1", extra="|||AL|AL"))
    protocol = h.accept_connection()
    protocol.dataReceived(ack_frame("CA", "M1"))
    assert h.results == []
    protocol.dataReceived(ack_frame("AA", "M1"))
    assert [r.ack_code for r in h.results] == ["AA"]


@given(st.sampled_from(["AA", "CA", "AE", "AR", "aa", "AA "]),
       st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12),
       st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=6),
       st.sampled_from(["", "\rERR|||101^x^HL70357|E", "\rZZZ|1"]))
def test_the_byte_matcher_agrees_with_the_parser_whenever_it_answers(code, acked, text, tail):
    from hl7relay.mllp.sender import _plain_ack

    payload = f"MSH|^~\\&|C|D|A|B|1||ACK|X|P|2.5.1\rMSA|{code}|{acked}|{text}{tail}\r".encode()
    quick = _plain_ack(payload)
    if quick is None:
        return
    parsed = Message.from_bytes(payload)
    assert quick == (parsed.get("MSA-1"), parsed.get("MSA-2"))
    assert not parsed.get("MSA-3") and not parsed.count("ERR")


def _mllp_delivery(options: str):
    """An MLLP destination (``options`` added to its YAML) as a queue uses it, on a memory reactor."""
    import tempfile
    from pathlib import Path

    from hl7relay.channels import load_channel
    from hl7relay.channels.destinations import MLLPDelivery

    class Engine:
        reactor = MemoryReactorClock()

    path = Path(tempfile.mkdtemp()) / "ch.yaml"
    path.write_text("name: ch\nsource: {type: mllp, port: 0}\n"
                    f"destinations: [{{name: lab, type: mllp, host: 127.0.0.1, port: 2576, {options}}}]\n")
    channel, errors = load_channel(path, {})
    assert not errors, errors
    return MLLPDelivery(channel.destinations[0].config, Engine), Engine.reactor


def test_a_queues_sender_connects_when_the_queue_says_with_no_backoff_of_its_own():
    """The sender's own backoff (up to 60 s) stacked on the queue's retry schedule: a lab that came
    back waited past retry_max, and an after_delivery sender waited a minute for an AR."""
    delivery, reactor = _mllp_delivery("connect_timeout: 1")
    for attempt in range(8):  # eight refused connections in a row
        results = []
        delivery.deliver(message(f"M{attempt}")).addCallback(results.append)
        assert len(reactor.tcpClients) == attempt + 1  # tried at once, every time
        reactor.tcpClients[-1][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        assert results and not results[0].ok


def test_the_backoff_survives_any_number_of_failures():
    """After 1,024 refused connections in a row the backoff raised OverflowError (int too large to
    convert to float) in the sender's errback: that destination never tried again."""
    h = Harness(backoff_initial=1.0, backoff_max=60.0)
    h.sender._failures = 5000
    assert 30.0 <= h.sender.backoff_delay() <= 60.0


def test_deliveries_beyond_parallel_wait_for_a_free_connection():
    """A cluster's partitions of one destination share its `parallel` connections: a delivery
    that finds none free waits for the next to finish (it raised IndexError and counted a failed
    attempt, under load, once the partitions were read together)."""
    from twisted.internet import defer

    delivery, _ = _mllp_delivery("parallel: 2, order: none")
    pending: list = []

    class FakeSender:
        def send(self, payload):
            d = defer.Deferred()
            pending.append((self, payload, d))
            return d

        def close(self):
            pass

    delivery.senders = [FakeSender(), FakeSender()]
    delivery._idle = list(delivery.senders)
    results = []
    for number in range(4):
        delivery.deliver(message(f"M{number}")).addBoth(results.append)
    assert len(pending) == 2 and not results  # two on the wire, two waiting
    ok = type("R", (), {"ok": True, "status": None, "ack_as_text": lambda self: "MSA|AA", "ack_code": "AA", "text": ""})()
    first = pending.pop(0)
    first[2].callback(ok)
    assert len(pending) == 2 and pending[-1][0] is first[0]  # its connection went to the next at once
    assert len(results) == 1 and results[0].ok
    delivery.close()  # the destination goes: the one still waiting fails, nothing hangs
    assert len(results) == 2 and isinstance(results[1], Failure)
