"""The integration simulator: realistic, repeatable, valid traffic; sent in order per patient, summarised."""

import json
import re
import subprocess
import sys
from collections import defaultdict

import pytest
from twisted.internet import defer, task

from hl7relay.cli import main
from hl7relay.hl7.message import Message
from hl7relay.simulate import CHARSETS, VERSIONS, Driver, Simulation
from hl7relay.validation import Validator


def test_a_seed_gives_the_same_messages_byte_for_byte():
    first = [m.data for m in Simulation(seed=7).take(200)]
    assert first == [m.data for m in Simulation(seed=7).take(200)]
    assert first != [m.data for m in Simulation(seed=8).take(200)]
    assert len({Message.from_bytes(d).get("MSH-10") for d in first}) == 200  # control ids unique


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("charset", sorted(CHARSETS))
def test_every_message_is_valid_for_its_version_and_charset(version, charset):
    validator, types = Validator(), set()
    msh18, codec = CHARSETS[charset]
    for generated in Simulation(seed=11, version=version, charset=charset).take(150):
        message = Message.from_bytes(generated.data)
        assert message.get("MSH-12") == version and message.get("MSH-18") == msh18
        generated.data.decode(codec)  # in the character set MSH-18 names
        if charset == "ascii":
            assert generated.data.isascii()
        errors = [str(f) for f in validator.validate(message).findings if f.severity.value == "E"]
        assert not errors, (generated.message_type, errors, generated.data)
        types.add(generated.message_type)
    assert types >= {"ADT^A01", "ADT^A04", "ADT^A08", "SIU^S12", "ORU^R01"}


def test_patients_move_through_their_stay_and_appointments_consistently():
    admitted, booked, seen = set(), set(), {}
    names = {}
    accented = 0
    for generated in Simulation(seed=3, charset="utf-8", patients=30).take(3000):
        m = Message.from_bytes(generated.data)
        mrn, event = m.get("PID-3.1"), m.get("MSH-9.2")
        assert mrn == generated.patient_id
        identity = (m.get("PID-5"), m.get("PID-7"), m.get("PID-8"))
        assert names.setdefault(mrn, identity) == identity  # a patient keeps name, birth date and sex
        accented += not m.get("PID-5").isascii()
        if event == "A01":
            assert mrn not in admitted
            admitted.add(mrn)
        elif event == "A02":
            assert mrn in admitted and m.get("PV1-6") and m.get("PV1-6") != m.get("PV1-3")
        elif event == "A03":
            assert mrn in admitted and m.get("PV1-45")
            admitted.remove(mrn)
        elif event == "S12":
            booked.add((mrn, m.get("SCH-1.1")))
        elif event in ("S13", "S15"):
            assert (mrn, m.get("SCH-1.1")) in booked
            if event == "S15":
                booked.remove((mrn, m.get("SCH-1.1")))
                assert m.get("SCH-25.1") == "CANCELLED"
        elif m.get("MSH-9.1") == "ORU":
            types = [m.get(f"OBX[{i}]-2") for i in range(1, m.count("OBX") + 1)]
            assert "NM" in types and "ST" in types and "DT" in types and ({"CE", "CWE"} & set(types))
            assert all(m.get(f"OBX[{i}]-1") == str(i) for i in range(1, len(types) + 1))
        seen[event] = seen.get(event, 0) + 1
    assert set(seen) >= {"A01", "A02", "A03", "A04", "A08", "S12", "S13", "S15", "R01"}
    assert accented > 0  # utf-8 carries accented names; ascii never does (above)


class FakeSender:
    """Answers AA after ``delay`` seconds of the clock (0: at once); records what it got."""

    def __init__(self, clock, delay=0.0, code="AA"):
        self.clock, self.delay, self.code, self.sent, self.in_flight = clock, delay, code, [], 0

    def send(self, data):
        self.sent.append(data)
        self.in_flight += 1
        assert self.in_flight == 1  # one message in flight per connection
        result = type("Result", (), {"ack_code": self.code})()

        def answer():
            self.in_flight -= 1
            return result

        if not self.delay:
            return defer.succeed(answer())
        d = defer.Deferred()
        self.clock.callLater(self.delay, lambda: d.callback(answer()))
        return d


def test_a_patients_messages_keep_their_connection_and_order():
    clock = task.Clock()
    senders = [FakeSender(clock, delay=0.001 * (i + 1)) for i in range(3)]
    done = []
    Driver(Simulation(seed=5), senders, clock, count=600).start().addCallback(done.append)
    while not done:
        clock.advance(0.001)
    [summary] = done
    assert summary.sent == 600 and summary.codes == {"AA": 600} and summary.accepted
    expected = defaultdict(list)
    for generated in Simulation(seed=5).take(600):
        expected[generated.patient_id].append(generated.data)
    connection_of, got = {}, defaultdict(list)
    for index, sender in enumerate(senders):
        for data in sender.sent:
            mrn = Message.from_bytes(data).get("PID-3.1")
            assert connection_of.setdefault(mrn, index) == index
            got[mrn].append(data)
    assert got == expected and all(s.sent for s in senders)
    assert 0.001 <= summary.percentile(0.5) <= 0.003 and summary.percentile(1.0) == pytest.approx(0.003)


def test_a_rate_spreads_the_messages_over_time():
    clock = task.Clock()
    senders = [FakeSender(clock), FakeSender(clock)]
    done = []
    Driver(Simulation(seed=1), senders, clock, count=100, rate=20).start().addCallback(done.append)
    handed = []
    for _ in range(24):
        clock.advance(0.25)
        handed.append(sum(len(s.sent) for s in senders))
    assert handed[3] == 21 and handed[7] == 41  # 20 per second: message n (from 0) at n/20 s
    assert done and done[0].sent == 100 and done[0].elapsed == pytest.approx(5.0, abs=0.26)
    # a duration ends it early
    clock, done = task.Clock(), []
    Driver(Simulation(seed=1), [FakeSender(clock)], clock, count=1000, rate=10, duration=2).start().addCallback(done.append)
    clock.pump([0.5] * 10)
    assert done and done[0].sent == 20


def test_no_connection_stops_the_run_at_once():
    clock, done = task.Clock(), []
    failing = type("Failing", (), {"send": lambda self, data: defer.succeed(
        type("R", (), {"ack_code": "", "status": type("S", (), {"value": "connection_failed"})()})())})()
    driver = Driver(Simulation(seed=1), [failing, failing], clock, count=500)
    driver.start().addCallback(done.append)
    assert done and done[0].sent <= 2 and driver.stopped == "no connection could be made" and not done[0].accepted


def _listener(*extra):
    process = subprocess.Popen([sys.executable, "-m", "hl7relay", "listen", "--port", "0", *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
    return process, port


def test_the_cli_sends_to_a_listener_and_summarises(tmp_path):
    listener, port = _listener()
    try:
        result = subprocess.run([sys.executable, "-m", "hl7relay", "simulate", "--port", str(port), "--count", "120",
                                 "--connections", "3", "--format", "json", "--hl7-version", "2.3"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["sent"] == summary["answered"] == 120 and summary["codes"] == {"AA": 120}
        assert summary["latency_ms"]["p50"] > 0 and summary["stopped"] is None
        text = subprocess.run([sys.executable, "-m", "hl7relay", "simulate", "--port", str(port), "--count", "10",
                               "--rate", "100", "--ack-mode", "enhanced"], capture_output=True, text=True, timeout=120)
        assert text.returncode == 0 and "sent 10 messages (seed 1, HL7 2.5.1, utf-8)" in text.stdout
        assert "answers: AA 10" in text.stdout and "ACK latency: p50" in text.stdout  # CA, then AA
    finally:
        listener.terminate()
        listener.wait(30)
    refusing, port = _listener("--answer", "AE")
    try:
        result = subprocess.run([sys.executable, "-m", "hl7relay", "simulate", "--port", str(port), "--count", "5"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and "answers: AE 5" in result.stdout
    finally:
        refusing.terminate()
        refusing.wait(30)
    result = subprocess.run([sys.executable, "-m", "hl7relay", "simulate", "--port", str(port), "--count", "5"],
                            capture_output=True, text=True, timeout=120)  # nobody listens there now
    assert result.returncode == 1 and "stopped early: no connection could be made" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_written_traffic_validates(tmp_path, capsys):
    assert main(["simulate", "--out", str(tmp_path / "out"), "--count", "250", "--seed", "4",
                 "--hl7-version", "2.7", "--charset", "latin-1"]) == 0
    assert "wrote 250 messages (seed 4, HL7 2.7, latin-1)" in capsys.readouterr().out
    files = sorted((tmp_path / "out").iterdir())
    assert len(files) == 250 and files[0].name.startswith("000001-")
    assert main(["validate", "--format", "json", str(tmp_path / "out")]) == 0


@pytest.mark.parametrize("argv, fragment", [
    (["--connections", "0"], "connections are 1 to 1000"),
    (["--rate", "-1"], "a rate is 0"),
    (["--rate", "fast"], "not a number of messages per second"),
    (["--count", "0"], "give 1 or more"),
    (["--hl7-version", "9.9"], "invalid choice"),
    (["--charset", "ebcdic"], "invalid choice"),
    (["--port", "70000"], "out of range"),
])
def test_wrong_arguments_get_one_line(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_:
        main(["simulate", *argv])
    assert exit_.value.code == 2 and fragment in capsys.readouterr().err


def test_simulate_names_its_target_and_marks_its_messages_as_test_traffic(tmp_path, capsys):
    """With no arguments it sent 100 production-flagged fake patients from "PMS" to port 2575:
    into a running engine, which forwarded them to the lab."""
    assert main(["simulate"]) == 2
    assert "say where: --port PORT [--host HOST]" in capsys.readouterr().err
    assert main(["simulate", "--out", str(tmp_path / "x"), "--port", "2575"]) == 2
    assert main(["simulate", "--out", str(tmp_path / "out"), "--count", "3"]) == 0
    from hl7relay.hl7.message import Message

    for path in sorted((tmp_path / "out").iterdir()):
        message = Message.from_bytes(path.read_bytes())
        assert (message.get("MSH-3"), message.get("MSH-11")) == ("SIMULATOR", "T")
    assert main(["simulate", "--out", str(tmp_path / "prod"), "--count", "1", "--processing-id", "P"]) == 0
    assert Message.from_bytes(next((tmp_path / "prod").iterdir()).read_bytes()).get("MSH-11") == "P"
