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


def test_quiet_hides_warnings(capsys, samples):
    _, out = run(capsys, "validate", str(samples / "oru_r01.hl7"))
    assert "  W 103" in out
    _, out = run(capsys, "validate", "-q", str(samples / "oru_r01.hl7"))
    assert "  W 103" not in out


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
