import pytest

from hl7relay.ack import AckPolicy, ControlIds, ErrorCode, Outcome, build_ack, unreadable_ack
from hl7relay.hl7.message import Message
from hl7relay.validation import validate

IN = ("MSH|^~\\&|PMS|CLINIC|LAB|LABFAC|20240105093512||ADT^A01^ADT_A01|MSG1|P|{version}{extra}\r"
      "EVN|A01|20240105\rPID|1||1^^^H^MR||DOE^J\rPV1|1|O\r")


def received(version="2.5.1", accept="", application="", charset=""):
    extra = f"|||{accept}|{application}||{charset}" if (accept or application or charset) else ""
    return Message(IN.format(version=version, extra=extra))


def ack(data: bytes) -> Message:
    return Message.from_bytes(data)


def test_header_swaps_parties_and_copies_what_it_must():
    a = ack(build_ack(received(), "AA", now=0))
    assert a.get("MSH-2") == "^~\\&"
    assert (a.get("MSH-3"), a.get("MSH-4"), a.get("MSH-5"), a.get("MSH-6")) == ("LAB", "LABFAC", "PMS", "CLINIC")
    assert a.get("MSH-9") == "ACK^A01^ACK" and a.get("MSH-11") == "P" and a.get("MSH-12") == "2.5.1"
    assert a.get("MSA-1") == "AA" and a.get("MSA-2") == "MSG1"
    assert a.get("MSH-7").startswith("1970010")
    assert a.control_id and a.control_id != "MSG1"


@pytest.mark.parametrize("version, expected", [("2.5", "ACK^A01^ACK"), ("2.8", "ACK^A01^ACK"), ("2.4", "ACK^A01"),
                                               ("2.3", "ACK^A01"), ("2.2", "ACK")])
def test_message_type_by_version(version, expected):
    assert ack(build_ack(received(version), "AA")).get("MSH-9") == expected


def test_control_ids_are_unique_within_one_second():
    ids = ControlIds(clock=lambda: 1700000000.0)
    values = [ids() for _ in range(10000)]
    assert len(set(values)) == len(values) and all(len(v) <= 20 for v in values)


def test_errors_from_v25_use_err_2_3_4_and_8():
    message = received()
    message.delete_segment("PID")
    findings = validate(message).findings
    a = ack(build_ack(message, "AE", "invalid", ErrorCode.SEGMENT_SEQUENCE_ERROR, findings))
    assert a.get("MSA-1") == "AE" and a.get("MSA-3") == ""
    assert a.get("ERR-3") == "100^Segment sequence error^HL70357"
    assert a.get("ERR-2.1") == "PID" and a.get("ERR-4") == "E"
    assert "required segment PID missing" in a.get("ERR-8")


def test_errors_before_v25_use_msa_3_and_err_1():
    a = ack(build_ack(received("2.3"), "AE", "content error", ErrorCode.REQUIRED_FIELD_MISSING))
    assert a.get("MSA-3") == "content error"
    assert a.get("ERR-1.4") == "101&Required field missing&HL70357"


def test_ack_keeps_the_character_set():
    message = Message.from_bytes(IN.format(version="2.5.1", extra="||||||8859/1").replace("DOE", "D\u00d6E").encode("latin-1"))
    data = build_ack(message, "AE", "Fehler: \u00d6", ErrorCode.APPLICATION_INTERNAL_ERROR)
    assert Message.from_bytes(data).get("ERR-8") == "Fehler: \u00d6"
    assert "\u00d6".encode("latin-1") in data


def test_unreadable_payload_gets_ar():
    a = ack(unreadable_ack("empty MLLP frame"))
    assert a.get("MSA-1") == "AR" and a.get("MSA-2") == "" and a.get("ERR-3.1") == "100"


# -- the policy ----------------------------------------------------------------------------------
policy = AckPolicy()


def codes(message, outcome, p=policy):
    built = [ack(f).get("MSA-1") for f in p.acks(message, outcome)]
    assert p.codes(message, outcome) == built  # the planned codes are the built ones
    return built


@pytest.mark.parametrize("outcome, expected", [
    (Outcome.accepted(), ["AA"]),
    (Outcome.error("bad content", ErrorCode.DATA_TYPE_ERROR), ["AE"]),
    (Outcome.rejected("unsupported", ErrorCode.UNSUPPORTED_MESSAGE_TYPE), ["AR"]),
    (Outcome.internal_error("store down"), ["AR"]),
    (Outcome.filtered(), ["AR"]),
])
def test_original_mode(outcome, expected):
    assert codes(received(), outcome) == expected


def test_filtered_answer_is_configurable():
    assert codes(received(), Outcome.filtered(), AckPolicy(filtered_code="AA")) == ["AA"]


def test_a_message_that_is_an_ack_is_never_acknowledged():
    message = Message("MSH|^~\\&|A|B|C|D|20240101||ACK^A01^ACK|9|P|2.5.1\rMSA|AA|1\r")
    assert policy.acks(message, Outcome.accepted()) == []


@pytest.mark.parametrize("accept, application, outcome, expected", [
    ("AL", "AL", Outcome.accepted(), ["CA", "AA"]),
    ("AL", "NE", Outcome.accepted(), ["CA"]),
    ("NE", "AL", Outcome.accepted(), ["AA"]),
    ("NE", "NE", Outcome.accepted(), []),
    ("AL", "ER", Outcome.accepted(), ["CA"]),
    ("AL", "ER", Outcome.error("x", ErrorCode.DATA_TYPE_ERROR), ["CA", "AE"]),
    ("AL", "SU", Outcome.accepted(), ["CA", "AA"]),
    ("AL", "SU", Outcome.error("x", ErrorCode.DATA_TYPE_ERROR), ["CA"]),
    ("ER", "AL", Outcome.accepted(), ["AA"]),
    ("ER", "AL", Outcome.internal_error("store down"), ["CR"]),
    ("SU", "AL", Outcome.internal_error("store down"), []),
    ("AL", "AL", Outcome.internal_error("store down"), ["CR"]),
    ("AL", "AL", Outcome.rejected("unsupported", ErrorCode.UNSUPPORTED_EVENT_CODE), ["CR"]),
    # HL7 requires both in enhanced mode: an empty or garbled one is answered as AL, never left waiting
    ("AL", "", Outcome.accepted(), ["CA", "AA"]),
    ("NE", "", Outcome.accepted(), ["AA"]),
    ("A L", "NE", Outcome.accepted(), ["CA"]),
    ("NE", "XX", Outcome.error("bad"), ["AE"]),
])
def test_enhanced_mode(accept, application, outcome, expected):
    assert codes(received(accept=accept, application=application), outcome) == expected


def test_never_aa_without_storage():
    for outcome in (Outcome.internal_error("x"), Outcome.rejected("x", ErrorCode.UNSUPPORTED_VERSION_ID, stored=False)):
        for accept, application in (("", ""), ("AL", "AL")):
            assert not {"AA", "CA"} & set(codes(received(accept=accept, application=application), outcome))


def test_the_header_is_read_once_into_an_ack_request_that_decides_like_the_message():
    from hl7relay.ack.policy import AckRequest, resend_code

    base = "MSH|^~\\&|PMS|CLINIC|HL7RELAY|LAB|20240105||{type}|C1|P|2.5.1|||{accept}|{application}\rPID|1\r"
    policy = AckPolicy()
    for message_type in ("ADT^A01", "ACK", " ack "):
        for accept in ("", "AL", "NE", "ER", "SU", " al ", "XX"):
            for application in ("", "AL", "NE", "ER", "SU"):
                message = Message(base.format(type=message_type, accept=accept, application=application))
                request = AckRequest.of(message)
                assert request.is_ack == (message_type.strip().upper() == "ACK")
                assert request.enhanced == bool(accept.strip() or application.strip())
                assert request.resend_code == resend_code(message) == ("CR" if accept.strip() else "AR")
                assert (request.accept, request.application) == (accept.strip().upper(), application.strip().upper())
                codes = policy.codes(message, Outcome.accepted(), request)
                if request.is_ack:
                    assert codes == []  # an ACK is never acknowledged
                elif not request.enhanced:
                    assert codes == ["AA"]
                else:  # NE withholds; AL, SU (on success) and anything garbled ask; ER does not (success)
                    assert codes == (["CA"] if request.accept not in ("NE", "ER") else []) + (
                        ["AA"] if request.application not in ("NE", "ER") else [])
