"""Validator findings: one test per kind of check."""

from pathlib import Path

import pytest

from hl7relay.ack import ErrorCode
from hl7relay.hl7.message import Message
from hl7relay.validation import Validator, validate
from hl7relay.validation.events import resolve_structure
from hl7relay.validation.profile import get_profile

MSH = "MSH|^~\\&|PMS|CLINIC|LAB|LABFAC|20240105093512||{type}|MSG1|P|{version}\r"
EVN = "EVN|A01|20240105093512\r"
PID = "PID|1||100234^^^CLINIC^MR||DOE^JANE||19800412|F\r"
PV1 = "PV1|1|O\r"


def pid_with(**fields):
    """A valid PID with the given fields (``f7="..."``) set."""
    values = {1: "1", 3: "100234^^^CLINIC^MR", 5: "DOE^JANE"}
    values.update({int(k[1:]): v for k, v in fields.items()})
    return "|".join(["PID"] + [values.get(n, "") for n in range(1, max(values) + 1)]) + "\r"


def check(body, type="ADT^A01^ADT_A01", version="2.5.1", **kw):
    return validate(Message(MSH.format(type=type, version=version) + body), **kw)


def texts(report, code=None):
    return [str(f) for f in report.findings if code is None or f.code == code]


def test_valid_message_has_no_findings():
    report = check(EVN + PID + PV1)
    assert report.valid and report.findings == [] and report.structure == "ADT_A01"


def test_missing_required_segment_names_its_place():
    report = check(EVN + PV1)
    assert texts(report) == ["E 100 PID: required segment PID missing; expected after EVN (segment 2), before PV1"]


def test_segment_order_is_checked():
    # hl7apy's own STRICT validation passes EVN after PID; ours does not.
    report = check(PID + EVN + PV1)
    assert texts(report) == ["E 100 EVN: segment 3: EVN is out of order; expected after MSH (segment 1), before PID"]
    assert report.findings[0].position == 3 and report.findings[0].location == "EVN^1"


def test_repeating_a_single_segment_is_an_error():
    report = check(EVN + PID + PID + PV1)
    assert texts(report, ErrorCode.SEGMENT_SEQUENCE_ERROR) == ["E 100 PID[2]: segment 4: PID repeats; ADT_A01 allows 1 here"]


def test_optional_and_repeating_segments_and_groups_pass():
    body = EVN + PID + "NK1|1|DOE^JOHN\rNK1|2|DOE^JIM\r" + PV1 + "PV2|||^checkup\rAL1|1||^Penicillin\rIN1|1|PLAN1|INS1\rIN2\rIN1|2|PLAN2|INS2\r"
    assert check(body).valid


def test_z_segments_are_allowed_anywhere_after_msh_and_unknown_segments_are_not():
    assert check("ZX1|a\r" + EVN + "ZX2|b\r" + PID + PV1 + "ZX3|c\r").valid
    report = check(EVN + PID + "XYZ|1\r" + PV1)
    assert texts(report) == ["E 100 XYZ: segment 4: XYZ is not a segment of v2.5.1"]
    report = check(EVN + PID + PV1 + "QRD|20240101|R|I|Q1|||1^RD|PID|DEM\r")
    assert "QRD is not part of the ADT_A01 structure" in texts(report)[0]


def test_groups_and_choices_in_a_deep_structure():
    oru = (PID + "ORC|RE|1\rOBR|1|1||GLU^Glucose\rOBX|1|NM|GLU||5.5|mmol/L||N|||F\rNTE|1||ok\r"
           "OBR|2|2||HB^Hb\rOBX|1|NM|HB||13|g/dL||N|||F\r")
    assert check(oru, type="ORU^R01^ORU_R01").valid
    report = check(PID + "OBX|1|NM|GLU||5.5|mmol/L||N|||F\r", type="ORU^R01^ORU_R01")
    assert report.errors and {f.code for f in report.errors} == {ErrorCode.SEGMENT_SEQUENCE_ERROR}


def test_ambiguous_structure_prefers_the_reading_without_errors():
    # OML_O21 (2.5): an ORC after a specimen may open a prior result or the next order
    body = (PID + PV1 + "ORC|NW|1\rTQ1|||||||||A\rOBR||1||GLU^Glucose\rSPM|1|S1||SER\r"
            "ORC|NW|2\rTQ1|||||||||A\rOBR||2||GLU^Glucose\rSPM|1|S2||SER\r")
    assert check(body, type="OML^O21^OML_O21", version="2.5").valid


def test_required_fields():
    report = check(EVN + "PID|1\r" + PV1)
    assert texts(report, ErrorCode.REQUIRED_FIELD_MISSING) == [
        "E 101 PID-3: required field PID-3 (patient identifier list) is missing",
        "E 101 PID-5: required field PID-5 (patient name) is missing",
    ]


def test_header_fields_are_required():
    report = validate(Message("MSH|^~\\&|A|B|C|D\rPID|1\r"))
    assert [f.field for f in report.findings if f.code == ErrorCode.REQUIRED_FIELD_MISSING] == [7, 9, 10, 11, 12]


@pytest.mark.parametrize("segment, expected", [
    ("PID|1||1||D^J||1980041|F\r", "PID-7.1: '1980041' is not a date/time"),
    ("PID|1||1||D^J||19800230|F\r", "it has day 30, which 1980-02 does not have"),
    ("PID|1||1||D^J||198004121275|F\r", "it has minute 75"),
    ("PID|x||1||D^J\r", "PID-1: 'x' is not a sequence id"),
    (pid_with(f25="1.5x"), "PID-25: '1.5x' is not a number"),
])
def test_datatype_formats(segment, expected):
    report = check(EVN + segment + PV1)
    assert any(expected in t for t in texts(report, ErrorCode.DATA_TYPE_ERROR)), texts(report)


def test_valid_datatype_forms_pass():
    for value in ("1980", "198004", "19800412", "1980041210", "198004121030", "19800412103059.1234+0100", "19800412-0500"):
        assert check(EVN + f"PID|1||1||D^J||{value}|F\r" + PV1).valid, value


def test_obx5_is_checked_by_the_type_obx2_names():
    body = PID + "OBR|1|1||X^Y\r{obx}"
    bad = check(body.format(obx="OBX|1|NM|GLU||high||||||F\r"), type="ORU^R01^ORU_R01")
    assert "OBX-5: 'high' is not a number (NM)" in texts(bad)[0]
    assert check(body.format(obx="OBX|1|CE|GLU||H^High^HL70078||||||F\r"), type="ORU^R01^ORU_R01").valid
    assert check(body.format(obx="OBX|1|TS|GLU||20240101||||||F\r"), type="ORU^R01^ORU_R01").valid
    unknown = check(body.format(obx="OBX|1|QQ|GLU||x||||||F\r"), type="ORU^R01^ORU_R01")
    assert any("OBX-2 value type 'QQ'" in t for t in texts(unknown))


def test_table_values_warn_and_strict_makes_them_errors():
    hl7_table = EVN + pid_with(f24="Q") + PV1  # PID-24 is ID, HL7 table 0136 (Y/N)
    report = check(hl7_table)
    assert report.valid
    assert texts(report) == ["W 103 PID-24: 'Q' is not in HL7 table 0136"]
    assert not check(hl7_table, strict=True).valid
    # IS tables are user-defined: a value outside the suggested ones is a warning, even when strict
    user_table = EVN + PID + "PV1|1|Q\r"
    assert check(user_table, strict=True).valid
    assert "user-defined table 0004" in texts(check(user_table))[0]


def test_lengths_warn():
    report = check(EVN + PID.replace("DOE^JANE", "D" * 250 + "^JANE") + PV1)
    assert report.valid and [f.code for f in report.findings] == [ErrorCode.VALUE_TOO_LONG]
    assert not check(EVN + PID.replace("DOE^JANE", "D" * 250 + "^JANE") + PV1, strict=True).valid


def test_line_feed_endings_pass_but_strict_flags_them():
    text = (MSH.format(type="ADT^A01^ADT_A01", version="2.5.1") + EVN + PID + PV1).replace("\r", "\n")
    assert validate(Message(text)).valid
    assert not validate(Message(text), strict=True).valid


@pytest.mark.parametrize("type, version, code", [
    ("XYZ^A01", "2.5.1", ErrorCode.UNSUPPORTED_MESSAGE_TYPE),
    ("ADT^A99", "2.5.1", ErrorCode.UNSUPPORTED_EVENT_CODE),
    ("ADT^A01", "9.9", ErrorCode.UNSUPPORTED_VERSION_ID),
])
def test_unsupported_type_event_version(type, version, code):
    report = check(EVN + PID + PV1, type=type, version=version)
    assert [f.code for f in report.errors] == [code]


def test_unsupported_processing_id():
    report = validate(Message("MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|X|2.5.1\r" + EVN + PID + PV1))
    assert [f.code for f in report.errors] == [ErrorCode.UNSUPPORTED_PROCESSING_ID]


def test_version_option_overrides_msh12():
    message = Message(MSH.format(type="ADT^A01", version="9.9") + EVN + PID + PV1)
    assert Validator(version="2.5.1").validate(message).valid


@pytest.mark.parametrize("encoding, version, fragment", [
    ("^~\\&#", "2.5.1", "the fifth, '#' (truncation), is defined from v2.7; v2.5.1 has four"),
    ("^~\\", "2.5.1", "four are required"),
    ("^^\\&", "2.5.1", "not distinct"),
    ("^~\\&#$", "2.7", "6 characters is too many; at most five"),
    ("^~\\&#$%", "2.5.1", "7 characters is too many; at most four (five from v2.7)"),
    ("^~a&", "2.5.1", "must not be letters"),
])
def test_envelope_encoding_characters(encoding, version, fragment):
    report = validate(Message(f"MSH|{encoding}|A|B|C|D|20240101||ADT^A01|1|P|{version}\r" + EVN + PID + PV1))
    assert any(fragment in t for t in texts(report)), texts(report)


def test_a_truncation_character_before_v27_is_a_warning_and_the_rest_is_still_checked():
    """US ELR / PHLIP guides prescribe ^~\\&# in v2.5.1; that one problem used to stop every
    field and structure check."""
    message = Message("MSH|^~\\&#|A|B|C|D|20240101||ADT^A01^ADT_A01|1|P|2.5.1\r" + PID + EVN + PV1)
    report = validate(message)
    assert [(f.severity.value, f.field) for f in report.findings if f.segment == "MSH"] == [("W", 2)]
    assert any("EVN is out of order" in t for t in texts(report))  # the structure was still checked
    assert not validate(message, strict=True).valid
    six = validate(Message("MSH|^~\\&#$|A|B|C|D|20240101||ADT^A01^ADT_A01|1|P|2.5.1\r" + PID + EVN + PV1))
    assert any("EVN is out of order" in t for t in texts(six))  # too many: an error, and still checked


def test_five_encoding_characters_are_fine_from_v27():
    report = validate(Message("MSH|^~\\&#|A|B|C|D|20240101||ADT^A01^ADT_A01|1|P|2.7\r" + EVN.replace("A01", "")
                              + "PID|1||1^^^H^MR||DOE^J\rPV1|1|O\r"))
    assert report.valid, texts(report)


def test_events_map_to_shared_structures():
    assert check(EVN + PID + PV1, type="ADT^A04").structure == "ADT_A01"
    assert check(EVN + PID + PV1, type="ADT^A08").structure == "ADT_A01"
    profile = get_profile("2.8")
    assert resolve_structure("ADT", "A55", "2.8", profile.structures) == "ADT_A54"
    assert resolve_structure("ADT", "A55", "2.5", get_profile("2.5").structures) == "ADT_A52"
    assert resolve_structure("SIU", "S14", "2.3", get_profile("2.3").structures) == "SIU_S12"
    assert resolve_structure("ADT", "A04", "2.2", get_profile("2.2").structures) == "ADT_A04"


def test_every_finding_is_reported_not_only_the_first():
    report = check("PID|x||1||D^J||1980130|F\r" + PV1 + "XYZ|1\r")
    codes = sorted(int(f.code) for f in report.errors)
    assert codes == [100, 100, 102, 102]


def test_findings_serialise():
    report = check(EVN + PV1)
    data = report.to_dict()
    assert data["valid"] is False and data["structure"] == "ADT_A01"
    assert data["findings"][0] == {
        "severity": "E", "code": 100, "code_text": "Segment sequence error", "segment": "PID",
        "position": None, "location": "PID", "path": "PID",
        "text": "required segment PID missing; expected after EVN (segment 2), before PV1",
    }


def test_undecodable_bytes_are_an_error():
    data = (MSH.format(type="ADT^A01^ADT_A01", version="2.5.1") + EVN + PID + PV1).encode() .replace(b"DOE", b"D\xffE")
    report = validate(Message.from_bytes(data))
    assert any("not valid UTF-8" in t for t in texts(report, ErrorCode.DATA_TYPE_ERROR))


def test_every_supported_version_compiles_its_common_structures():
    for version in ("2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8", "2.8.1", "2.8.2"):
        profile = get_profile(version)
        for message_type, event in (("ADT", "A01"), ("ORU", "R01"), ("ACK", "A01")):
            name = profile.resolve(message_type, event)
            assert name and profile.structure(name).children[0].name == "MSH"


@pytest.mark.parametrize("value, ok", [
    ("20240229", True), ("20230229", False), ("19000229", False), ("20000229", True), ("20240431", False),
    ("20241301", False), ("20240100", False), ("202401011259", True), ("202401012400", False),
    ("20240101235959", True), ("20240101235960", False), ("2024", True), ("202401011230+0100", True),
    ("20240101.5", False), ("\u0662\u0660\u0662\u0664\u0660\u0661\u0660\u0661", False),
])
def test_date_time_check_edges(value, ok):
    from hl7relay.validation.datatypes import PRIMITIVE_CHECKS
    assert (PRIMITIVE_CHECKS["DTM"](value) is None) == ok


def test_withdrawn_fields_warn_and_strict_makes_them_errors():
    text = ("MSH|^~\\&|A|B|C|D|20240101||ADT^A01^ADT_A01|1|P|2.8\r"
            "EVN|A01|20240101\rPID|1||1^^^H^MR||DOE^J\rPV1|1|O\r")
    report = validate(Message(text))  # EVN-1 was withdrawn; hl7apy's v2.8 no longer lists it
    assert report.valid and texts(report) == ["W 102 EVN-1: EVN-1 is withdrawn in v2.8 and should be empty; receivers ignore it"]
    assert not validate(Message(text), strict=True).valid


# -- issue: validator accuracy ----------------------------------------------------------------------
def test_one_early_segment_is_reported_once_and_the_segments_after_it_are_not_flagged():
    """After a misplaced segment the matcher jumped to its place and flagged every correct segment
    between (PV1, PV2, AL1 here)."""
    report = check(EVN + PID + "OBX|1|ST|x||early||||||F\r" + PV1 + "PV2|||^checkup\rAL1|1||^Penicillin\rDG1|1||I10\r")
    assert texts(report, ErrorCode.SEGMENT_SEQUENCE_ERROR) == ["E 100 OBX: segment 4: OBX is out of order or not expected here (after PID (segment 3))"]


def test_v26_xtn_components_are_numbered_by_their_names():
    """hl7apy lists v2.6 XTN as XTN_2..XTN_18: the e-mail (XTN.4) was checked as a number and the
    unformatted number (XTN.12) as a date."""
    phone = "^NET^Internet^jane.doe@example.org^^^^^^^^5551234567"
    report = check(EVN + pid_with(f13=phone) + PV1, version="2.6")
    assert report.valid, texts(report)
    bad = check(EVN + pid_with(f13="^PRN^PH^^1^555^1234567") + PV1, version="2.6")
    assert bad.valid  # the country code (XTN.5) is a number, and 1 is one
    wrong = check(EVN + pid_with(f13="^PRN^PH^^one") + PV1, version="2.6")
    assert [f.path for f in wrong.errors] == ["PID-13.5"]


@pytest.mark.parametrize("version, segment, number, value", [
    ("2.8", "PR1", 11, "not a number"), ("2.8.2", "PR1", 12, "x"), ("2.6", "IN1", 40, "abc"),
    ("2.7", "OBR", 27, "^^^x"), ("2.8", "PID", 4, "X1^^^H"),
])
def test_a_field_the_field_table_withdraws_is_withdrawn(version, segment, number, value):
    profile = get_profile(version)
    assert profile.segment(segment).fields[number - 1].datatype == "WD"
    message = (MSH.format(type="ADT^A01^ADT_A01", version=version) + EVN + PID + PV1
               + "|".join([segment] + [""] * (number - 1) + [value]) + "\r")
    findings = [f for f in validate(Message(message)).findings if f.segment == segment and f.field == number]
    assert [f.severity.value for f in findings] == ["W"] and "withdrawn" in findings[0].text


def test_v27_pid28_keeps_the_segment_tables_type():
    assert get_profile("2.7").segment("PID").fields[27].datatype == "CWE"


@pytest.mark.parametrize("version, body", [
    ("2.1", "ORC|NW|1\rOBR|1|1||CBC\r"),
    ("2.1", "ORC|NW|1\rRX1|1\rNTE|1||note\rOBX|1|ST|x||v\rNTE|1||obs note\r"),
    ("2.2", "ORC|NW|1\rOBR|1|1||CBC\r"),
    ("2.2", "ORC|NW|1\rOBR|1|1||CBC\rOBX|1|ST|x||v\rOBX|2|ST|y||w\rNTE|1||note\r"),
])
def test_a_plain_order_is_a_valid_orm_o01_in_v21_and_v22(version, body):
    report = validate(Message(MSH.format(type="ORM^O01", version=version) + "PID|||1||DOE^J\r" + body))
    assert not texts(report, ErrorCode.SEGMENT_SEQUENCE_ERROR), texts(report)


def test_orm_o01_v21_still_needs_one_order_segment_choice_only():
    report = validate(Message(MSH.format(type="ORM^O01", version="2.1") + "ORC|NW|1\rOBR|1\rRX1|1\r"))
    assert any("RX1" in t for t in texts(report, ErrorCode.SEGMENT_SEQUENCE_ERROR))


def _pd1_17(value):  # PD1-17 is DT (the FHIR-Converter samples have '20150202^20150202')
    return pid_with() + "PD1" + "|" * 17 + value + "\r"


@pytest.mark.parametrize("segments, value, first_ok", [
    (lambda v: pid_with(f1=v), "1^X", True),  # SI
    (lambda v: pid_with(f1=v), "x^1", False),
    (_pd1_17, "20150202^20150202", True),
    (_pd1_17, "2015020X^20150202", False),
])
def test_extra_components_in_a_primitive_are_a_warning_and_the_first_is_checked(segments, value, first_ok):
    report = check(EVN + segments(value) + PV1)
    extra = [f for f in report.findings if "receivers ignore all but the first" in f.text]
    assert [f.severity.value for f in extra] == ["W"]
    assert report.valid == first_ok, texts(report)  # the first component is checked as the value
    assert not check(EVN + segments(value) + PV1, strict=True).valid


def test_the_explicit_null_is_accepted_in_a_component():
    report = check(EVN + pid_with(f3='100234^^^CLINIC^""', f5='DOE^""', f7='""', f11='""^^""^^12345',
                                  f13='^PRN^PH^^""') + PV1)  # CX.5 an ID (table 0203), XTN.5 an NM
    assert report.valid and report.findings == [], texts(report)


def test_v21_orr_o02_takes_one_order_segment():
    body = "MSA|AA|1\rPID|||1||DOE^J\rORC|OK|1\rOBR|1|1||CBC\r"
    report = validate(Message(MSH.format(type="ORR^O02", version="2.1") + body))
    assert not texts(report, ErrorCode.SEGMENT_SEQUENCE_ERROR), texts(report)


def test_the_audit_of_hl7apy_finds_nothing_we_do_not_handle():
    """Every mechanically found mistake in hl7apy's tables is corrected or accepted with a reason
    (corrections.py); a new hl7apy release with new ones fails here (bench/audit_hl7apy.py lists them)."""
    from hl7relay.validation.audit import audit

    findings = audit()
    assert not [str(f) for f in findings if not f.handled]
    kinds = {(f.version, f.kind, f.where) for f in findings}
    # the ones this audit was written for are found (so it cannot pass by finding nothing)
    for expected in [("2.6", "numbering", "XTN"), ("2.6", "type", "IN1_40"), ("2.8", "type", "PR1_11"),
                     ("2.8.2", "type", "PID_4"), ("2.7", "type", "OBR_27"),
                     ("2.2", "required-nte", "ORM_O01/ORM_O01_ORDER/ORM_O01_ORDER_DETAIL/NTE"),
                     ("2.1", "choice", "ORM_O01/ORM_O01_ORDER/ORM_O01_ORDER_DETAIL"),
                     ("2.3.1", "required-once", "OBX_4"), ("2.3", "required-once", "OBR_27")]:
        assert expected in kinds, expected


@pytest.mark.parametrize("version, segment", [("2.3.1", "OBX|1|NM|GLU^Glucose^L||5.5|mmol/L|||||F"),
                                              ("2.3", "OBR|1|ORD1|LAB1|GLU^Glucose^L")])
def test_a_field_required_in_one_version_only_is_optional_there(version, segment):
    """OBX-4 "required" in v2.3.1 (39 errors on one public file; it is conditional) and OBR-27 in
    v2.3: required in no version before or after them."""
    body = ("PID|1||7||DOE^J\r" "OBR|1|ORD1|LAB1|GLU^Glucose^L|||20240105\r" if segment.startswith("OBX") else
            "PID|1||7||DOE^J\r") + segment + "\r"
    report = validate(Message(MSH.format(type="ORU^R01", version=version) + body))
    missing = [f.text for f in report.findings if f.code == ErrorCode.REQUIRED_FIELD_MISSING]
    assert not [t for t in missing if "OBX-4" in t or "OBR-27" in t], missing


def test_remembered_field_values_change_no_finding(samples, corpus, monkeypatch):
    """Field values checked are remembered per version, delimiters and strictness, clean or with
    what they found (profile.clean_values):
    every sample and corpus message, validated again in another order with the memory warm, and
    with no memory at all, gets exactly the same findings."""
    from hl7relay.hl7.batch import split_messages
    from hl7relay.validation.profile import Profile

    files = sorted(p for p in [*samples.rglob("*.hl7"), *corpus.rglob("*")] if p.is_file() and p.suffix != ".tsv"
                   and p.name != "README.md")
    messages = []
    for path in files:
        for chunk in split_messages(path.read_bytes()).messages:
            try:
                messages.append(Message.from_bytes(chunk.data))
            except Exception:  # noqa: BLE001 - unreadable ones are the corpus tests' business
                continue
    assert len(messages) > 200

    def findings(validator, message):
        return [(f.severity, f.code, f.text, f.path) for f in validator.validate(message).findings]

    for strict in (False, True):
        validator = Validator(strict=strict)
        warm_first = [findings(validator, m) for m in messages]
        warm_again = [findings(validator, m) for m in reversed(messages)][::-1]
        with monkeypatch.context() as patch:
            patch.setattr(Profile, "clean_values", lambda self, d, strict=False: {})  # nothing remembered
            cold = [findings(validator, m) for m in messages]
        assert warm_first == cold and warm_again == cold


def test_a_site_defined_z_message_type_is_a_warning():
    """`ZDT` was an error: Z message types are site-defined, as Z segments are."""
    report = validate(Message(MSH.format(type="ZDT^Z01", version="2.5.1") + PID + "ZDT|1|data\r"))
    assert report.valid and [(f.severity.value, f.text) for f in report.findings] == [
        ("W", "message type 'ZDT' is site-defined (Z): its structure is not checked")]
    assert not validate(Message(MSH.format(type="QQQ^Z01", version="2.5.1") + PID)).valid  # not Z: still an error


ELR = (MSH.format(type="ORU^R01^ORU_R01", version="2.5.1") + PID +
       "OBR|1|ORD1|LAB1|94500-6^SARS-CoV-2 RNA^LN|||20240105\r"
       "OBX|1|CWE|94500-6^SARS-CoV-2 RNA^LN||260373001^Detected^SCT||||||F\r"
       "OBX|2|NM|2345-7^Glucose^LN||5.5|mmol/L^mmol/L^UCUM|||||F\r"
       "OBX|3|CWE|29768-9^Drug^LN||197361^Amlodipine 5 MG^RXNORM||||||F\r"
       "OBX|4|CWE|11450-4^Problem^LN||A^B^2.16.840.1.114222.4.5.232||||||F\r")


def test_strict_takes_the_coding_systems_and_value_types_us_public_health_traffic_uses():
    """--strict was unusable on US public-health traffic: table 0125 of v2.4-2.6 lacks CWE and
    table 0396 lacks SCT, UCUM, RXNORM and CDC's OIDs (2,074 errors in 49 files)."""
    report = Validator(strict=True).validate(Message(ELR))
    assert [str(f) for f in report.findings] == []
    wrong = Validator(strict=True).validate(Message(ELR.replace("^RXNORM|", "^RXNORMISH|").replace("|CWE|94500", "|XYZ|94500")))
    assert sorted(f.text for f in wrong.findings if f.text.startswith("'")) == [
        "'RXNORMISH' is not in HL7 table 0396", "'XYZ' is not in HL7 table 0125"]


def test_a_site_adds_values_to_hl7_tables_from_a_file(tmp_path):
    from hl7relay.validation.corrections import load_table_values

    message = Message(ELR.replace("^SCT|", "^PH_SNOMED-CT|"))
    assert not Validator(strict=True).validate(message).valid
    shipped, errors = load_table_values(Path(__file__).parent.parent / "config" / "tables" / "us-public-health.yaml")
    assert not errors and "PH_SNOMED-CT" in shipped["HL70396"]
    assert Validator(strict=True, table_values=shipped).validate(message).valid
    assert not Validator(strict=True).validate(message).valid  # another validator: the standard's tables only
    bad = tmp_path / "bad.yaml"
    bad.write_text('"396x": [A]\n"0396": B\n')
    assert load_table_values(bad) == ({}, load_table_values(bad)[1])
    assert [str(e) for e in load_table_values(bad)[1]] == [
        f"{bad}:1:1: '396x' is not an HL7 table number (e.g. \"0396\")", f"{bad}:2:9: table 0396: a list of values"]


def test_chapter_2a_rules_between_components_are_checked_where_the_type_is():
    """HD.2 and HD.3 (and EI.3 and EI.4) are valued together or not at all: rules inside data types
    were not checked. An HD is found in a field (MSH-4), a component of another type (CX.4 in PID-3,
    as subcomponents) and an EI's own components; warnings by default, errors under --strict."""
    message = Message("MSH|^~\\&|LAB|LABFAC^2.16.840.1.114222^ISO|PMS|CLINIC^2.16.1|20240105||ORU^R01^ORU_R01|1|P|2.5.1\r"
                      "PID|1||7^^^HOSP&2.16.1&~8^^^HOSP&&ISO||DOE^J\r"
                      "OBR|1|O1^PMS^2.16.1^ISO|L1^LAB^2.16.2|GLU^Glucose^LN\r")
    found = [str(f) for f in validate(message).findings]
    assert found == [
        "W 102 MSH-6.3: HD.2 and HD.3 are both valued or both empty (HL7 chapter 2A, HD): HD.2 without HD.3",
        "W 102 PID-3.4.3: HD.2 and HD.3 are both valued or both empty (HL7 chapter 2A, HD): HD.2 without HD.3",
        "W 102 PID-3[2].4.2: HD.2 and HD.3 are both valued or both empty (HL7 chapter 2A, HD): HD.3 without HD.2",
        "W 102 OBR-3.4: EI.3 and EI.4 are both valued or both empty (HL7 chapter 2A, EI): EI.3 without EI.4",
    ], found
    strict = Validator(strict=True).validate(message)
    assert not strict.valid and {f.severity.value for f in strict.findings} == {"E"}


OML = ("MSH|^~\\&|OP|Entero-gastric|OF|Chemistry|20030906||OML^O21^OML_O21|msgOP123|P|2.5.1\r"
       "PID|1||12345^5^M10^Memphis_Hosp^PI||EVERYMAN^ADAM\rPV1|1|O|Ward\r"
       "ORC|NW|12345678^gastric||666^gastric\rTQ1|||||||||A\rOBR||12345678^gastric||82951^Glucose Tolerance Test^LN\r"
       "OBX|1|NM|GLUCOSE||75|g|||||F\rSPM|1|123456781^gastric||SER\rSPM|2|123456782^gastric||SER\r")


def test_a_missing_required_first_segment_is_reported_once_and_its_group_read_on():
    """One missing ORC gave 6-7 errors, every segment of the order after it; one missing NTE in an
    RDS^O13 (the required note that opens a supplement) gave 14, the first blaming RXD."""
    no_orc = validate(Message(OML.replace("ORC|NW|12345678^gastric||666^gastric\r", "")))
    assert [str(f) for f in no_orc.findings] == [
        "E 100 ORC: required segment ORC missing; expected after PV1 (segment 3), before TQ1"]
    rds = ("MSH|^~\\&|PHARM|FAC|PMS|CLINIC|20240105||RDS^O13^RDS_O13|1|P|2.5.1\rPID|1||7||DOE^J\rORC|RE|O1\r"
           "RXO|RX1^Drug^L|1\rRXR|PO\rRXE|^^^20240105|RX1^Drug^L|1||TAB\rTQ1|1\rRXR|PO\rRXD|1|RX1^Drug^L|20240105|1|||7\rRXR|PO\r")
    assert [str(f) for f in validate(Message(rds)).findings] == [
        "E 100 NTE: required segment NTE missing; expected after RXO (segment 4), before RXR"]
    assert validate(Message(rds.replace("RXO|RX1^Drug^L|1\r", "RXO|RX1^Drug^L|1\rNTE|1||take with food\r"))).valid


def test_a_second_order_with_timing_is_not_read_as_a_prior_result():
    """An ORC after an order's results may open a prior result or the next order: reading it as a
    prior result needed its TQ1 displaced, and reported 4 errors in a valid two-order OML^O21."""
    order = "ORC|NW|12345679^gastric||667^gastric\rTQ1|||||||||A\rOBR||12345679^gastric||82951^Glucose^LN\rOBX|1|NM|GLUCOSE||80|g|||||F\r"
    two = OML.replace("SPM|1|", order + "SPM|1|", 1)
    report = validate(Message(two))
    assert report.valid and report.findings == [], [str(f) for f in report.findings]


def test_a_misplaced_group_is_one_finding_not_one_per_segment():
    """One misplaced block gave an error per segment of it: the patient's PID and PV1 after the
    order are one group out of place."""
    moved = OML.replace("PID|1||12345^5^M10^Memphis_Hosp^PI||EVERYMAN^ADAM\rPV1|1|O|Ward\r", "").replace(
        "SPM|1|", "PID|1||12345^5^M10^Memphis_Hosp^PI||EVERYMAN^ADAM\rPV1|1|O|Ward\rSPM|1|", 1)
    assert [str(f) for f in validate(Message(moved)).findings] == [
        "E 100 PID: segments 6-7 (PID, PV1): group PATIENT is out of order or not expected here (after OBX (segment 5))",
        "E 100 SPM: segments 8-9 (SPM, SPM): group SPECIMEN is out of order or not expected here (after PV1 (segment 7))"]
