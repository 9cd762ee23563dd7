"""Conformance profiles: YAML rules on top of the base standard, from validate and from channels."""

import textwrap
from pathlib import Path

import pytest

from hl7relay.cli import main
from hl7relay.hl7.message import Message
from hl7relay.validation import Validator
from hl7relay.validation.conformance import load_conformance_profile

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "profiles" / "lab-results.yaml"
ORU = (REPO / "samples" / "oru_r01.hl7").read_bytes()


def write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_the_shipped_example_loads_and_the_sample_result_conforms():
    profile, errors = load_conformance_profile(EXAMPLE)
    assert errors == [] and profile.name == "lab-results" and profile.version == "2.5.1"
    assert Validator(profile=profile).validate(Message.from_bytes(ORU)).valid


def test_a_result_breaking_the_profile_gets_one_finding_per_rule():
    profile, _ = load_conformance_profile(EXAMPLE)
    message = Message.from_bytes(ORU)
    message.set("MSH-3", "")
    message.set("MSH-10", "X" * 60)
    message.set("PID-8", "Z")
    message.set("OBX-11", "Q")
    message.append_segment("NTE|1||a note")  # allowed: no rule
    message.append_segment(message.segments[message.segment_names().index("PID")])  # a second PID
    report = Validator(profile=profile).validate(message)
    mine = [f for f in report.findings if f.text.startswith("profile lab-results")]
    assert {(f.path, int(f.code)) for f in mine} == {
        ("MSH-3", 101), ("MSH-10", 104), ("PID-8", 103), ("PID[2]-8", 103), ("OBX-11", 103), ("PID[2]", 100)}
    assert not report.valid


def test_field_rules_apply_to_every_occurrence_and_repetition(tmp_path):
    path = write(tmp_path, """\
        profile: ids
        messages:
          "ADT":
            fields:
              PID-3.5: {values: [MR, PI]}
              PID-19: {forbidden: true, severity: warning}
    """)
    profile, errors = load_conformance_profile(path)
    assert not errors
    message = Message("MSH|^~\\&|A|B|C|D|20240101||ADT^A08|1|P|2.5.1\rPID|1||1^^^H^MR~2^^^H^SS||DOE\r"
                      "PID|2||3^^^H^XX||||||||||||||||123-45-6789\r")
    findings = profile.check(message)
    assert [(f.path, f.repetition, f.severity.value) for f in findings] == [
        ("PID-3[2].5", 2, "E"), ("PID[2]-3.5", 1, "E"), ("PID[2]-19", 1, "W")]
    other = Message("MSH|^~\\&|A|B|C|D|20240101||ORU^R01|1|P|2.5.1\rPID|1||1^^^H^XX\r")
    assert profile.check(other) == []  # the rules are for ADT only


@pytest.mark.parametrize("text, expected", [
    ("profile: x\nmesages: {}\n", "p.yaml:2:1: unknown key 'mesages' in a profile (did you mean 'messages')"),
    ("profile: x\nmessages:\n  ORU^R01:\n    fields:\n      PID8: {required: true}\n", "p.yaml:5:7: invalid HL7 path"),
    ("profile: x\nmessages:\n  'ORU R01': {}\n", "p.yaml:3:3: 'ORU R01' is not a message type"),
    ("profile: x\nmessages:\n  ORU:\n    fields:\n      PID-8: {value_set: nope.txt}\n", "p.yaml:5:26: value_set: cannot read"),
    ("profile: x\nmessages:\n  ORU:\n    fields:\n      PID-8: {required: true, forbidden: true}\n",
     "p.yaml:5:14: PID-8 cannot be both required and forbidden"),
    ("profile: x\nmessages:\n  ORU:\n    segments:\n      OBX: {min: 3, max: 1}\n", "p.yaml:5:12: OBX: max 1 is less than min 3"),
    ("profile: x\nmessages:\n  ORU:\n    fields:\n      PID-8: {values: [F], severity: fatal}\n",
     "p.yaml:5:38: severity must be error or warning"),
    ("profile: x\nmessages:\n  ORU:\n    fields:\n      PID-8: {requird: true}\n",
     "p.yaml:5:15: unknown key 'requird' in field PID-8 (did you mean 'required')"),
    ("profile: x\nversion: 9.9\nmessages:\n  ORU: {}\n", "p.yaml:2:10: version '9.9' is not an HL7 version"),
    ("profile: x\nmessages:\n  ORU:\n    fields:\n      PID-8: {max_length: 0}\n", "p.yaml:5:27: max_length must be a whole number, 1 or more"),
    ("profile: x\nmessages: !!python/object:os.system x\n", "p.yaml:2:11: YAML tag"),
])
def test_profile_problems_have_their_position(tmp_path, text, expected):
    profile, errors = load_conformance_profile(write(tmp_path, text), display_name="p.yaml")
    assert profile is None and any(str(e).startswith(expected) for e in errors), [str(e) for e in errors]


def test_validate_takes_a_profile_and_refuses_a_broken_one(tmp_path, capsys, samples):
    assert main(["validate", "--profile", str(EXAMPLE), str(samples / "oru_r01.hl7")]) == 0
    broken = write(tmp_path, "profile: x\nmessages:\n  ORU:\n    fields:\n      PID8: {required: true}\n")
    assert main(["validate", "--profile", str(broken), str(samples / "oru_r01.hl7")]) == 2
    err = capsys.readouterr().err
    assert f"{broken}:5:7: invalid HL7 path" in err and "not validating" in err
    strict = write(tmp_path, "profile: strict-pid\nmessages:\n  '*':\n    fields:\n      PID-19: {required: true}\n", "s.yaml")
    assert main(["validate", "--profile", str(strict), str(samples / "adt_a01.hl7")]) == 1
    assert "E 101 PID-19: profile strict-pid: PID-19 is required" in capsys.readouterr().out


def test_lint_checks_profiles_beside_channels(tmp_path, capsys):
    assert main(["lint", str(REPO / "config" / "profiles")]) == 0
    folder = tmp_path / "channels"
    folder.mkdir()
    write(folder, "profile: x\nmessages:\n  ORU:\n    fields:\n      PID-8: {requird: true}\n", "bad-profile.yaml")
    write(folder, "name: ch\nsource: {type: mllp, port: 0}\n", "ch.yaml")
    assert main(["lint", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "bad-profile.yaml:5:15: unknown key 'requird'" in out  # checked as a profile, not as a channel


@pytest.mark.parametrize("on_error, status, code", [("reject", "ERROR", "AE"), ("warn", "PROCESSED", "AA")])
def test_a_channel_validates_against_a_profile(tmp_path, manual_executor, on_error, status, code):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_runtime import ADT, answer, ack_codes, make_engine

    (tmp_path / "profiles").mkdir()
    write(tmp_path / "profiles", "profile: site\nmessages:\n  ADT:\n    fields:\n      PID-19: {required: true}\n", "site.yaml")
    engine, channel, store, executor = make_engine(tmp_path, manual_executor, f"""
        validators: [{{profile: {{file: profiles/site.yaml, on_error: {on_error}}}}}]
    """)
    results = answer(engine, channel, ADT.format(id="P1", extra=""))
    executor.run_all()
    assert ack_codes(results[0]) == [code] and store.get_message(1)["status"] == status
    assert b"PID-19 is required" in (store.get_message(1)["stages"].get("findings") or b"") + results[0].acks[0]


def test_a_channel_naming_a_broken_profile_does_not_lint(tmp_path):
    from hl7relay.channels import load_channel

    write(tmp_path, "profile: x\nmessages:\n  ORU:\n    fields:\n      PID8: {required: true}\n", "bad.yaml")
    channel_file = write(tmp_path, "name: ch\nsource: {type: mllp, port: 0}\nvalidators: [{profile: bad.yaml}]\n", "ch.yaml")
    channel, errors = load_channel(channel_file, {})
    assert channel is None and any("the profile has problems" in str(e) and "invalid HL7 path" in str(e) for e in errors)


# -- profiles that express real guides (issue #26) -------------------------------------------------------
PHLIP = REPO / "config" / "profiles" / "phlip-flu-2.5.1.yaml"
RESULT = ("MSH|^~\\&|LAB|FAC|PHL|CDC|20240105||ORU^R01^ORU_R01|1|P|2.5.1|||||||||PROF-A^X^2.16.1^ISO\r"
          "PID|1||7||DOE^J\rOBR|1|O1|L1|GLU^Glucose^LN\r"
          "OBX|1|NM|GLU^Glucose^LN|1|5.5|mmol/L|||||F\r"
          "OBX|2|CWE|FLU^Influenza^LN|1|260373001^Detected^SCT||||||F\r")


def found(tmp_path, rules: str, message: str = RESULT) -> list[str]:
    profile, errors = load_conformance_profile(write(tmp_path, "profile: t\nversion: \"2.5.1\"\nmessages:\n  ORU:\n"
                                                     + textwrap.indent(textwrap.dedent(rules), "    ")))
    assert errors == [], [str(e) for e in errors]
    return [f"{f.path}: {f.text}" for f in profile.check(Message(message))]


def test_a_sequence_rule_reports_one_number_out_of_step_once(tmp_path):
    assert found(tmp_path, "fields:\n  OBX-1: {sequence: true}\n") == []
    twice = RESULT.replace("OBX|2|", "OBX|1|") + "OBX|2|NM|K^Potassium^LN|1|4.1|mmol/L|||||F\r"
    assert found(tmp_path, "fields:\n  OBX-1: {sequence: true}\n", twice) == [
        "OBX[2]-1: profile t: OBX-1 is '1'; OBX 2 should be 2 (numbered 1, 2, 3... in order)"]


def test_a_unique_rule_finds_two_segments_with_the_same_fields(tmp_path):
    same = RESULT.replace("FLU^Influenza^LN|1|", "GLU^Glucose^LN|1|")
    assert found(tmp_path, "unique:\n  - [OBX-3, OBX-4]\n") == []
    assert found(tmp_path, "unique:\n  - [OBX-3, OBX-4]\n", same) == [
        "OBX[2]-3: profile t: OBX-3 + OBX-4 repeats OBX 1's ('GLU^Glucose^LN' + '1')"]


def test_a_condition_holds_within_each_segment(tmp_path):
    rules = """\
        conditions:
          - when: {OBX-2: [NM, SN]}
            then: {required: [OBX-6], pattern: {OBX-5: "^[0-9.]+$"}}
          - when: {OBX-2: CWE}
            then: {forbidden: [OBX-6], values: {OBX-11: [F, C]}}
          - when: {PID-8: absent}
            then: {required: [PID-7]}
        """
    assert found(tmp_path, rules, RESULT.replace("PID|1||7||DOE^J", "PID|1||7||DOE^J||19800101")) == []
    broken = RESULT.replace("|5.5|mmol/L|", "|high||").replace("SCT||||||F\r", "SCT|mg|||||P\r")
    assert found(tmp_path, rules, broken) == [
        "OBX-6: profile t: OBX-6 is required when OBX-2 is NM or SN",
        "OBX-5: profile t: OBX-5 'high' does not match '^[0-9.]+$' when OBX-2 is NM or SN",
        "OBX[2]-6: profile t: OBX-6 must be empty when OBX-2 is CWE",
        "OBX[2]-11: profile t: 'P' is not an allowed value of OBX-11 when OBX-2 is CWE",
        "PID-7: profile t: PID-7 is required when PID-8 is empty"]


def test_patterns_values_without_case_and_a_component_required_in_each_repetition(tmp_path):
    rules = """\
        fields:
          MSH-10: {pattern: "^[0-9]+$"}
          OBX-11: {values: [f, c], ignore_case: true}
          PID-3.1: {required: true}
        """
    message = RESULT.replace("PID|1||7||", "PID|1||7~^^^SSA||").replace("|1|P|2.5.1", "|A1|P|2.5.1")
    assert found(tmp_path, rules, message.replace("|F\r", "|X\r", 1)) == [
        "MSH-10: profile t: MSH-10 'A1' does not match '^[0-9]+$'",
        "OBX-11: profile t: 'X' is not an allowed value of OBX-11",
        "PID-3[2].1: profile t: PID-3.1 is required (repetition 2 has none)"]


def test_a_profile_applies_to_the_messages_whose_msh_21_names_it(tmp_path):
    for_a = write(tmp_path, "profile: a\nmsh_21: [PROF-A]\nmessages:\n  '*':\n    fields:\n      PID-19: {required: true}\n", "a.yaml")
    for_b = write(tmp_path, "profile: b\nmsh_21: PROF-B\nmessages:\n  '*':\n    fields:\n      PID-20: {required: true}\n", "b.yaml")
    from hl7relay.validation.conformance import ProfileSet

    profiles = ProfileSet(tuple(load_conformance_profile(f)[0] for f in (for_a, for_b)))
    assert [f.text for f in profiles.check(Message(RESULT))] == ["profile a: PID-19 is required"]
    other = RESULT.replace("PROF-A^X", "PROF-C^X~PROF-B^X")
    assert [f.text for f in profiles.check(Message(other))] == ["profile b: PID-20 is required"]


@pytest.mark.parametrize("rules, expected", [
    ("fields:\n  PDI-3: {required: true}\n", "PDI-3: v2.5.1 has no segment PDI"),
    ("fields:\n  PID-99: {required: true}\n", "PID-99: PID has 39 fields in v2.5.1"),
    ("fields:\n  PID-5.20: {required: true}\n", "PID-5.20: PID-5 is XPN, which has 14 components"),
    ("unique:\n  - [OBX-3, OBR-4]\n", "the paths of a unique rule are fields of one segment"),
    ("conditions:\n  - when: {OBX-2: [NM]}\n    then: {requird: [OBX-6]}\n", "unknown key 'requird' in a condition's then"),
    ("fields:\n  PID-8: {pattern: \"([\"}\n", "pattern: invalid regular expression"),
])
def test_a_path_the_version_does_not_have_is_a_lint_error(tmp_path, rules, expected):
    profile, errors = load_conformance_profile(write(tmp_path, "profile: t\nversion: \"2.5.1\"\nmessages:\n  ORU:\n"
                                                     + textwrap.indent(rules, "    ")))
    assert profile is None and any(expected in str(e) for e in errors), [str(e) for e in errors]


def test_the_phlip_profile_rejects_every_cdc_negative_message_and_takes_the_valid_ones(corpus):
    """CDC's PHLIP flu test messages (public corpus): the example profile with the base standard
    finds a problem in every negative one (named by its file) and none in the valid ones."""
    profile, errors = load_conformance_profile(PHLIP)
    assert errors == []
    validator = Validator(profile=profile)
    files = sorted(corpus.glob("cdcdex__PHLIP_FLU_2.5.1_*.hl7"))
    assert len(files) >= 10
    for path in files:
        report = validator.validate(Message.from_bytes(path.read_bytes()))
        assert report.valid == ("VALID_MESSAGE" in path.name), (path.name, [str(f) for f in report.findings])
