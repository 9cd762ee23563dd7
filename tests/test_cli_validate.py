import io
import json
import subprocess
import sys

import pytest

from hl7relay.cli import build_parser, main


def run(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr().out


def test_valid_samples_exit_0(capsys, samples):
    code, out = run(capsys, "validate", *sorted(str(p) for p in samples.glob("*.hl7")))
    assert code == 0, out
    assert "adt_a01.hl7: valid" in out and "batch_adt.hl7 message 2 (line 7): valid" in out
    assert out.strip().endswith("0 invalid, 0 unreadable")


def test_invalid_message_exits_1_and_prints_findings(capsys, samples):
    code, out = run(capsys, "validate", str(samples / "malformed" / "missing_pid.hl7"))
    assert code == 1
    assert "  E 100 PID: required segment PID missing; expected after EVN (segment 2), before PV1" in out


def test_unreadable_input_exits_2(capsys, samples):
    code, out = run(capsys, "validate", str(samples / "malformed" / "not_hl7.txt"))
    assert code == 2 and "UNREADABLE" in out
    code, _ = run(capsys, "validate", str(samples / "does-not-exist.hl7"))
    assert code == 2


def test_directory_is_walked_and_json_is_machine_readable(capsys, samples):
    code, out = run(capsys, "validate", "--format", "json", str(samples))
    data = json.loads(out)
    assert code == 2  # samples/malformed holds unreadable inputs too
    names = {entry["input"].rsplit("/", 1)[-1] for entry in data["inputs"]}
    assert {"adt_a01.hl7", "missing_pid.hl7", "not_hl7.txt"} <= names
    summary = data["summary"]
    assert summary["messages"] == sum(len(e["messages"]) for e in data["inputs"])
    finding = next(e for e in data["inputs"] if e["input"].endswith("missing_pid.hl7"))["messages"][0]["findings"][0]
    assert finding["code"] == 100 and finding["severity"] == "E" and finding["location"] == "PID"


def test_stdin_strict_and_version(capsys, monkeypatch, samples):
    data = (samples / "malformed" / "lf_endings.hl7").read_bytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert run(capsys, "validate", "-")[0] == 0
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    code, out = run(capsys, "validate", "--strict", "-")
    assert code == 1 and "LF or CRLF" in out
    code, out = run(capsys, "validate", "--version", "2.3", str(samples / "adt_a01.hl7"))
    assert "[v2.3 ADT_A01]" in out


def test_quiet_hides_warnings(capsys, samples, tmp_path):
    sample = tmp_path / "warned.hl7"
    sample.write_bytes((samples / "oru_r01.hl7").read_bytes().replace(b"^UCUM|", b"^UCUMISH|"))
    _, out = run(capsys, "validate", str(sample))
    assert "  W 103" in out
    _, out = run(capsys, "validate", "-q", str(sample))
    assert "  W 103" not in out and ": valid" in out


def test_help_is_readable():
    parser = build_parser()
    text = parser.format_help()
    assert "validate" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["validate", "--help"])


def test_python_dash_m_runs_the_cli(samples):
    result = subprocess.run([sys.executable, "-m", "hl7relay", "validate", str(samples / "adt_a04.hl7")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "adt_a04.hl7: valid" in result.stdout


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal_for_large_inputs(capsys, monkeypatch, tmp_path, samples):
    for i in range(25):
        (tmp_path / f"m{i:02d}.hl7").write_bytes((samples / "adt_a04.hl7").read_bytes())
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["validate", "-q", str(tmp_path)]) == 0
    assert "25/25 inputs" in terminal.getvalue()
    plain = io.StringIO()
    monkeypatch.setattr(sys, "stderr", plain)
    assert main(["validate", "-q", str(tmp_path)]) == 0
    assert plain.getvalue() == ""


@pytest.mark.parametrize("charset", [b"base64", b"hex", b"rot13", b"zlib", b"uu", b"punycode", b"UTF-8\x00"])
def test_msh18_naming_no_text_encoding_is_a_finding_not_a_traceback(capsys, tmp_path, charset):
    path = tmp_path / "m.hl7"
    path.write_bytes(b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|X9|P|2.5||||||" + charset + b"\rPID|1||1\r")
    code, out = run(capsys, "validate", str(path))
    assert code == 1 and "unknown character set" in out and "X9" in out


ADT = (b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|%s|P|2.5.1\rEVN|A01|20240101\rPID|1||1||DOE^J\rPV1|1|O\r")


def test_a_fifo_inside_a_walked_directory_is_skipped_not_waited_for(tmp_path, capsys):
    """A FIFO inside a directory hung `validate` for ever: a walk reads regular files only."""
    import os

    (tmp_path / "a.hl7").write_bytes(ADT % b"1")
    os.mkfifo(tmp_path / "pipe.hl7")
    result = subprocess.run([sys.executable, "-m", "hl7relay", "validate", str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{tmp_path / 'pipe.hl7'}: skipped: not a regular file (a FIFO, socket or device)" in result.stderr
    assert "1 message in 1 input: 1 valid" in result.stdout


def test_an_empty_argument_is_refused_and_an_empty_directory_explained(tmp_path, capsys):
    """`validate ""` walked the current directory; an empty directory gave no reason."""
    code, out = run(capsys, "validate", "")
    assert code == 2 and out == ""
    result = subprocess.run([sys.executable, "-m", "hl7relay", "validate", ""], capture_output=True, text=True,
                            cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == "hl7relay validate: an empty argument: give a file, a directory or - (standard input)"
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "report.pdf").write_bytes(b"%PDF")
    code = main(["validate", str(tmp_path / "empty"), str(tmp_path / "other")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{tmp_path / 'empty'}: no message files in this directory: it is empty" in err
    assert f"{tmp_path / 'other'}: no message files in this directory: 1 other file (*.dat" in err


def test_an_mllp_capture_is_read_with_its_framing_removed(tmp_path, capsys):
    """A capture of the wire (VT ... FS CR) was "not HL7" with no hint."""
    capture = tmp_path / "capture.dat"
    capture.write_bytes(b"\x0b" + ADT % b"1" + b"\x1c\r\x0b" + ADT % b"2" + b"\x1c\r")
    code, out = run(capsys, "validate", str(capture))
    assert code == 0, out
    assert f"{capture}: note: read as an MLLP capture: the framing (VT ... FS CR) of 2 frames removed" in out
    assert "message 2 (line 5): valid" in out and "2 messages in 1 input: 2 valid" in out


def test_msh_2_is_printed_as_it_is_in_the_message(tmp_path, capsys):
    """The text output doubled the backslash of MSH-2 ('^~\\\\&X')."""
    message = tmp_path / "five.hl7"
    message.write_bytes((ADT % b"1").replace(b"^~\\&|", b"^~\\&X|", 1))
    code, out = run(capsys, "validate", str(message))
    assert code == 1 and "MSH-2 encoding characters '^~\\&X': the fifth" in out


def test_a_message_larger_than_the_limit_is_reported_not_checked(tmp_path, capsys):
    """One 50 MB message of ~930,000 OBX took 20 s and 1.8 GB: past --max-bytes (the engine's frame
    limit by default) it is reported, and a text report prints at most 200 findings a message."""
    big = tmp_path / "big.hl7"
    big.write_bytes(b"MSH|^~\\&|LAB|F|PMS|C|20240105||ORU^R01^ORU_R01|1|P|2.5.1\rPID|1||7||DOE^J\rOBR|1|O1|L1|GLU\r"
                    + b"".join(b"OBX|%d|NM|GLU^Glucose^L||5.5|mmol/L|||||F\r" % n for n in range(10001, 10400)))
    code, out = run(capsys, "validate", "--max-bytes", "1000", str(big))
    assert code == 1 and "bytes: larger than 1,000 (--max-bytes), not checked" in out
    code, out = run(capsys, "validate", str(big))
    printed = [line for line in out.splitlines() if line.startswith(("  W ", "  E "))]
    assert code == 0 and len(printed) == 200 and "  ... and 199 more (--format json lists every one)" in out
    data = json.loads(run(capsys, "validate", "--format", "json", str(big))[1])
    assert len(data["inputs"][0]["messages"][0]["findings"]) == 399


def test_the_shipped_samples_pass_strict(capsys, samples):
    code, out = run(capsys, "validate", "--strict", *sorted(str(p) for p in samples.glob("*.hl7")))
    assert code == 0, out
