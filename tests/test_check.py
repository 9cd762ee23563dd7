"""hl7relay check: the connection tester, step by step, over real loopback sockets; and who reaches our listeners."""

import json
import re
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from hl7relay.cli import main
from hl7relay.mllp.tls import TLSConfig
from hl7relay.ops.check import check_destination, default_check_message


class Listener:
    """``hl7relay listen --port 0`` with extra arguments; its port."""

    def __init__(self, *args):
        self.process = subprocess.Popen([sys.executable, "-m", "hl7relay", "listen", "--port", "0", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.port = int(re.search(r"127\.0\.0\.1:(\d+)", self.process.stdout.readline()).group(1))

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        self.process.communicate(timeout=30)


@pytest.fixture
def plain():
    listener = Listener()
    yield listener
    listener.stop()


def steps(result):
    return {s.name: s for s in result}


def test_each_step_is_answered_with_its_time(plain):
    found = steps(check_destination("127.0.0.1", plain.port, None, default_check_message()))
    assert [(name, s.status) for name, s in found.items()] == [("DNS", "ok"), ("TCP", "ok"), ("TLS", "skipped"),
                                                               ("MLLP", "ok")]
    assert found["TCP"].detail == f"connected to 127.0.0.1:{plain.port}" and found["TCP"].seconds >= 0
    assert found["MLLP"].detail.startswith("NMQ^N01^NMQ_N01 CHK") and "answered AA" in found["MLLP"].detail
    without = steps(check_destination("localhost", plain.port, None, None))
    assert without["MLLP"].status == "skipped" and "127.0.0.1" in without["DNS"].detail


def test_what_fails_is_named_and_the_rest_skipped():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    refused = steps(check_destination("127.0.0.1", closed, TLSConfig(), default_check_message()))
    assert refused["TCP"].status == "failed" and "Connection refused" in refused["TCP"].detail
    assert refused["TLS"].status == refused["MLLP"].status == "skipped"
    unknown = steps(check_destination("no-such-host.invalid", 2575, None, None))
    assert unknown["DNS"].status == "failed" and "does not resolve" in unknown["DNS"].detail and len(unknown) == 1
    with socket.socket() as silent:  # accepts, never answers: the round trip times out
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        quiet = steps(check_destination("127.0.0.1", silent.getsockname()[1], None, default_check_message(), timeout=0.5))
    assert quiet["TCP"].status == "ok" and quiet["MLLP"].status == "failed" and "no answer within 0.5 s" in quiet["MLLP"].detail


def test_tls_shows_the_certificate_and_warns_before_it_expires(make_pki):
    pki = make_pki(server_days=10)
    listener = Listener("--tls-cert", pki["server"], "--tls-key", pki["server_key"])
    try:
        good = steps(check_destination("127.0.0.1", listener.port, TLSConfig(ca=pki["ca"]), default_check_message()))
        tls = good["TLS"]
        assert tls.status == "warning" and "subject CN=hl7relay server, issuer CN=hl7relay test CA" in tls.detail
        assert re.search(r"expires \d{4}-\d\d-\d\d \(in (9|10) days\) - renew it", tls.detail), tls.detail
        assert good["MLLP"].status == "ok"  # the round trip goes through the TLS connection
        untrusted = steps(check_destination("127.0.0.1", listener.port, TLSConfig(), None))
        assert untrusted["TLS"].status == "failed" and "does not verify" in untrusted["TLS"].detail
        assert "it presents subject CN=hl7relay server" in untrusted["TLS"].detail  # what it shows, all the same
    finally:
        listener.stop()
    plain = Listener()
    try:
        wrong = steps(check_destination("127.0.0.1", plain.port, TLSConfig(), None, timeout=1))
        assert wrong["TLS"].status == "failed" and "plain MLLP" in wrong["TLS"].detail
    finally:
        plain.stop()
    fresh = make_pki(server_days=400)
    listener = Listener("--tls-cert", fresh["server"], "--tls-key", fresh["server_key"])
    try:
        assert steps(check_destination("127.0.0.1", listener.port, TLSConfig(ca=fresh["ca"]), None))["TLS"].status == "ok"
    finally:
        listener.stop()


def test_the_cli_checks_destinations_by_name_or_address(plain, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "channels").mkdir()
    (tmp_path / "probe.hl7").write_text("MSH|^~\\&|HL7RELAY|X|||20240101||ADT^A08|PROBE1|T|2.5\nEVN|A08\n")
    (tmp_path / "channels" / "a.yaml").write_text(textwrap.dedent(f"""\
        name: a
        source: {{type: mllp, port: 0}}
        destinations:
          - {{name: lab, type: mllp, host: 127.0.0.1, port: {plain.port}, check_round_trip: true,
              check_message: ../probe.hl7}}
          - {{name: files, type: file, directory: out}}
        """))
    (tmp_path / "channels" / "b.yaml").write_text(textwrap.dedent("""\
        name: b
        source: {type: mllp, port: 0}
        destinations: [{name: lab, type: mllp, host: 127.0.0.1, port: 1}]
        """))
    assert main(["check", "a/lab"]) == 0
    out = capsys.readouterr().out
    assert f"a/lab: 127.0.0.1:{plain.port}\n" in out and "MLLP  OK       ADT^A08 PROBE1 answered AA" in out
    assert main(["check", "lab"]) == 2 and "name one of a/lab, b/lab" in capsys.readouterr().err
    assert main(["check", "lb"]) == 2 and "(did you mean 'lab')" in capsys.readouterr().err
    assert main(["check", "--format", "json"]) == 1  # every MLLP destination; b/lab refuses
    results = json.loads(capsys.readouterr().out)
    assert [(r["target"], r["reachable"]) for r in results] == [("a/lab", True), ("b/lab", False)]
    assert main(["check", f"127.0.0.1:{plain.port}", "--mllp"]) == 0
    assert "answered AA" in capsys.readouterr().out
    assert main(["check", "127.0.0.1:70000"]) == 2 and "a port is 1 to 65535" in capsys.readouterr().err


def test_inbound_shows_who_reached_our_listener(tmp_path, running_engine, capsys, monkeypatch):
    running = running_engine(tmp_path, "--admin-port", "auto", "--console-port", "0")
    try:
        with socket.create_connection(("127.0.0.1", running.mllp_port)) as pms:
            pms.sendall(b"\x0bMSH|^~\\&|PMS|CLINIC|||20240101||ADT^A08|IN1|P|2.5\rEVN|A08\rPID|1||1\r\x1c\r")
            assert b"MSA|" in pms.recv(65536)
            monkeypatch.chdir(tmp_path)
            assert main(["check", "--inbound"]) == 0
            out = capsys.readouterr().out
            assert re.search(r"adt: listening on 127\.0\.0\.1:\d+; 1 connection\(s\) open", out), out
            assert re.search(r"open: 127\.0\.0\.1:\d+ for \d+s, 1 message\(s\)", out), out
            assert re.search(r"peer 127\.0\.0\.1: 1 connection\(s\), 1 message\(s\), last message \S+ \S+ \(\d+s ago\)",
                             out), out
        assert main(["check", "--inbound", "adt", "--format", "json"]) == 0
        [view] = json.loads(capsys.readouterr().out)
        assert view["peers"][0]["host"] == "127.0.0.1" and view["peers"][0]["messages"] == 1
        assert main(["check", "--inbound", "nope"]) == 1 and "404" in capsys.readouterr().err
    finally:
        assert running.stop() == 0
