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
