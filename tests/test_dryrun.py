"""The channel dry run (hl7relay test --message FILE CHANNEL): every step, what each destination gets, the ACK."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hl7relay.channels.channel import load_channel
from hl7relay.channels.dryrun import dry_run, render_text
from hl7relay.channels.pipeline import process, stored_outcome
from hl7relay.cli import main
from hl7relay.hl7.message import Message

ROOT = Path(__file__).resolve().parent.parent
A01 = (ROOT / "samples" / "adt_a01.hl7").read_bytes()
NO_PATIENT_ID = ("MSH|^~\\&|PMS|CLINIC|HL7RELAY|LAB|20240105093512||ADT^A08^ADT_A01|T4|P|2.5.1\r"
                 "EVN|A08|20240105093512\rPID|1||||ROE^RICHARD\rPV1|1|O\r")


def channel(path):
    loaded, errors = load_channel(path)
    assert not errors, errors
    return loaded


def test_each_step_of_the_channel_is_shown_where_the_file_declares_it():
    adt = channel(ROOT / "channels" / "adt-to-lab.yaml")
    run = dry_run(adt, Message.from_bytes(A01))
    file = ROOT / "channels" / "adt-to-lab.yaml"
    assert [(s.kind, s.index, s.label, s.outcome) for s in run.steps] == [
        ("filter", 1, f"filters at {file}:10:3", "passed"),
        ("transformer", 1, f"set at {file}:12:5", "changed"),
        ("transformer", 2, f"set at {file}:13:5", "changed"),
        ("transformer", 3, f"map at {file}:14:5", "changed"),
        ("transformer", 4, f"upper at {file}:15:5", "no change"),  # DOE is upper case already
        ("validator", 1, f"structure at {file}:17:5", "1 finding (on_error: warn)"),
        ("validator", 2, f"required at {file}:18:5", "passed"),
        ("destination filter", 1, f"filters at {file}:27:7", "passed"),
    ]
    mapped = run.steps[3]
    assert mapped.changes == [
        "-PV1|1|O|CLINIC^EXAM3^1^CLINIC||||1234567890^BROWN^ROBERT^^^DR^MD^^^^^^NPI||||||||||||V2001^^^CLINIC^VN"
        "|||||||||||||||||||||||||20240105093000",
        "+PV1|1|OP|CLINIC^EXAM3^1^CLINIC||||1234567890^BROWN^ROBERT^^^DR^MD^^^^^^NPI||||||||||||V2001^^^CLINIC^VN"
        "|||||||||||||||||||||||||20240105093000"]
    assert {f["path"] for f in run.steps[5].findings} == {"PV1-2"}  # RXNORM, in AL1-3.3, is a coding system since table 0396 is read whole
    # what each destination gets is what the engine's pipeline gives it
    engine = process(adt, Message.from_bytes(A01))
    assert [(d.name, d.delivered, d.output) for d in run.destinations] == [
        (o.name, True, o.message.to_text().rstrip("\r").replace("\r", "\n")) for o in engine.outputs]
    assert run.status == stored_outcome(engine)[0] == "PROCESSED" and run.ack_codes == ["CA"]  # enhanced mode asks CA
    assert run.acks[0].split("\n")[1] == "MSA|CA|MSG00001" and run.notes == []
    text = render_text(run, "samples/adt_a01.hl7")
    assert f"transformer 3: map at {file}:14:5: changed\n      -PV1|1|O|" in text
    assert "destination lab (mllp) gets:\n      MSH|^~\\&|PMS|CLINIC|LAB|LABFAC|" in text
    assert "  stored as PROCESSED\n  ACK CA:\n      MSH|" in text


def test_a_rejected_message_shows_the_finding_and_the_ae_the_sender_gets():
    run = dry_run(channel(ROOT / "channels" / "adt-to-lab.yaml"), Message(NO_PATIENT_ID))
    assert run.steps[-1].outcome == "1 finding (rejects the message)"
    assert run.status == "ERROR" and "PID-3.1 is required" in run.error and run.ack_codes == ["AE"]
    assert [(d.delivered, d.reason) for d in run.destinations] == [(False, "the message is stored as ERROR")] * 2
    ack = run.acks[0].split("\n")
    assert ack[1] == "MSA|AE|T4" and any("PID-3.1 is required by this channel" in line for line in ack if line.startswith("ERR"))


def test_filtered_failed_transformers_destination_steps_and_notes(tmp_path):
    (tmp_path / "c.yaml").write_text(textwrap.dedent("""\
        name: c
        source: {type: mllp, port: 0}
        filters:
          - message_type: ADT
        transformers:
          - format_date: {path: PID-7, input: "%Y-%m-%d", output: "%Y%m%d"}
        response: {when: after_delivery, filtered: AA}
        duplicates: true
        destinations:
          - name: lab
            type: file
            directory: out
            filters: [{event: A01}]
            transformers:
              - set: {path: MSH-5, value: LAB}
              - delete_segment: NK1
          - name: billing
            type: file
            directory: out
            filters: [{event: A03}]
        """))
    c = channel(tmp_path / "c.yaml")
    run = dry_run(c, Message("MSH|^~\\&|PMS|CLINIC|||20240105||ADT^A01|C1|P|2.5\rPID|1||7||DOE||1980-04-12\rNK1|1|DOE\r"))
    assert [(s.kind, s.destination, s.index, s.outcome) for s in run.steps] == [
        ("filter", None, 1, "passed"), ("transformer", None, 1, "changed"),
        ("destination filter", "lab", 1, "passed"),
        ("destination transformer", "lab", 1, "changed"), ("destination transformer", "lab", 2, "changed"),
        ("destination filter", "billing", 1, "skipped")]
    # a destination's steps change its own copy, from the channel's output on
    assert run.steps[1].changes == ["-PID|1||7||DOE||1980-04-12", "+PID|1||7||DOE||19800412"]
    assert run.steps[3].changes == ["-MSH|^~\\&|PMS|CLINIC|||20240105||ADT^A01|C1|P|2.5",
                                    "+MSH|^~\\&|PMS|CLINIC|LAB||20240105||ADT^A01|C1|P|2.5"]
    assert run.steps[4].changes == ["-NK1|1|DOE"]
    lab, billing = run.destinations
    assert lab.delivered and lab.output == "MSH|^~\\&|PMS|CLINIC|LAB||20240105||ADT^A01|C1|P|2.5\nPID|1||7||DOE||19800412"
    assert not billing.delivered and billing.reason == "its filter skipped the message"
    assert run.ack_codes == ["AA"] and any("after_delivery" in n for n in run.notes) and any("duplicate" in n for n in run.notes)
    failed = dry_run(c, Message("MSH|^~\\&|PMS|CLINIC|||20240105||ADT^A01|C2|P|2.5\rPID|1||7||DOE||19800412\r"))
    assert failed.steps[1].outcome.startswith("failed: ") and failed.status == "ERROR" and failed.ack_codes == ["AE"]
    assert failed.error.startswith("transformer 1: ")
    filtered = dry_run(c, Message("MSH|^~\\&|PMS|CLINIC|||20240105||ORU^R01|C3|P|2.5\r"))
    assert [s.outcome for s in filtered.steps] == ["filtered out"] and filtered.status == "FILTERED"
    assert filtered.ack_codes == ["AA"]  # response.filtered: AA
    assert {d.reason for d in filtered.destinations} == {"the channel filtered the message out"}
    ack = dry_run(c, Message("MSH|^~\\&|PMS|CLINIC|||20240105||ACK^A01|C4|P|2.5\rMSA|AA|X\r"))
    assert ack.acks == [] and "no ACK" in render_text(ack)


def cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_cli_finds_the_channel_by_name_or_file_and_answers_each_message(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    code, out, err = cli(capsys, "test", "--message", "samples/adt_a01.hl7", "adt-to-lab")
    assert code == 0 and "channel adt-to-lab (channels/adt-to-lab.yaml), samples/adt_a01.hl7" in out and "ACK CA:" in out
    code, out, _ = cli(capsys, "test", "--message", "samples/batch_adt.hl7", "channels/adt-to-lab.yaml")
    assert code == 0 and "message 1 of 2 (samples/batch_adt.hl7, line 3)" in out and "message 2 of 2" in out
    bad = tmp_path / "bad.hl7"
    bad.write_bytes(NO_PATIENT_ID.encode())
    code, out, _ = cli(capsys, "test", "--message", str(bad), "adt-to-lab", "--format", "json")
    [result] = json.loads(out)
    assert code == 1 and result["status"] == "ERROR" and result["ack_codes"] == ["AE"]
    assert [s["kind"] for s in result["steps"]][:2] == ["filter", "transformer"]
    code, _, err = cli(capsys, "test", "--message", "samples/adt_a01.hl7", "adt-to-lb")
    assert code == 1 and err.strip() == "no channel named 'adt-to-lb' in channels (did you mean 'adt-to-lab')"
    code, _, err = cli(capsys, "test", "--message", "samples/adt_a01.hl7", "missing.yaml")
    assert code == 1 and err.strip() == "missing.yaml: no such channel file"
    code, _, err = cli(capsys, "test", "--message", "nothere.hl7", "adt-to-lab")
    assert code == 1 and err.strip() == "nothere.hl7: cannot read: No such file or directory"
    (tmp_path / "notes.txt").write_text("no HL7 here\n")
    code, _, err = cli(capsys, "test", "--message", str(tmp_path / "notes.txt"), "adt-to-lab")
    assert code == 1 and err.strip() == f"{tmp_path / 'notes.txt'}: not HL7: no MSH segment found"
    code, _, err = cli(capsys, "test", "--message", "samples/adt_a01.hl7")
    assert code == 2 and "needs one CHANNEL" in err
    (tmp_path / "broken.yaml").write_text("name: b\nsource: {type: mllp, port: 1}\nfitlers: []\n")
    code, _, err = cli(capsys, "test", "--message", "samples/adt_a01.hl7", str(tmp_path / "broken.yaml"))
    assert code == 1 and "broken.yaml:3:1: unknown key 'fitlers'" in err
    code, out, _ = cli(capsys, "test", "--message", "samples/siu_s12.hl7", "--channels", str(ROOT / "channels"), "siu-to-files")
    assert code == 0 and "channel siu-to-files" in out


def test_the_cli_reads_standard_input_and_never_shows_a_traceback():
    result = subprocess.run([sys.executable, "-m", "hl7relay", "test", "--message", "-", "adt-to-lab"],
                            input=A01.replace(b"\r", b"\n"), capture_output=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0 and b"standard input" in result.stdout and b"MSA|CA|MSG00001" in result.stdout
    garbage = b"MSH|^~\\&|A|B\rMSH|bad\x00\r" * 3
    result = subprocess.run([sys.executable, "-m", "hl7relay", "test", "--message", "-", "adt-to-lab"],
                            input=garbage, capture_output=True, cwd=ROOT, timeout=60)
    assert b"Traceback" not in result.stdout + result.stderr and result.returncode in (0, 1)


@pytest.mark.parametrize("sample", sorted(p.name for p in (ROOT / "samples").glob("*.hl7")))
def test_every_sample_through_every_channel_matches_the_engines_pipeline(sample):
    from hl7relay.hl7.batch import split_messages

    for file in sorted((ROOT / "channels").glob("*.yaml")):
        if file.name.endswith(".test.yaml"):
            continue
        c = channel(file)
        for chunk in split_messages((ROOT / "samples" / sample).read_bytes()).messages:
            run = dry_run(c, Message.from_bytes(chunk.data))
            engine = process(c, Message.from_bytes(chunk.data))
            assert run.status == stored_outcome(engine)[0]
            delivered = {o.name: o.message.to_text().rstrip("\r").replace("\r", "\n") for o in engine.outputs
                         if o.message is not None} if run.status == "PROCESSED" else {}
            assert {d.name: d.output for d in run.destinations if d.delivered} == delivered


def test_a_step_that_finds_no_segment_to_change_says_so(tmp_path):
    """A step writes only into segments the message has: its dry run says why nothing changed."""
    from hl7relay.channels import load_channel
    from hl7relay.channels.dryrun import dry_run
    from hl7relay.hl7.message import Message

    path = tmp_path / "c.yaml"
    path.write_text("name: c\nsource: {type: mllp, port: 0}\ntransformers:\n"
                    "  - set: {path: ZPI-1, value: x}\n  - map: {path: \"NTE[*]-3\", table: {}, default: y}\n"
                    "  - set: {path: \"OBX[*]-11\", value: C}\n  - set: {path: ZPI-1, value: x, create: true}\n"
                    "destinations: [{name: d, type: file, directory: out}]\n")
    channel, errors = load_channel(path, {})
    assert not errors, errors
    message = Message("MSH|^~\\&|LAB|F|PMS|C|20240105||ORU^R01|1|P|2.5.1\rPID|1||7\rOBX|1|NM|A||1\rOBX|2|NM|B||2\r")
    steps = dry_run(channel, message).steps
    assert [s.outcome for s in steps] == ["no change (the message has no ZPI; create: true adds it)",
                                          "no change (the message has no NTE)", "changed", "changed"]
    assert steps[2].changes == ["-OBX|1|NM|A||1", "-OBX|2|NM|B||2", "+OBX|1|NM|A||1||||||C", "+OBX|2|NM|B||2||||||C"]
