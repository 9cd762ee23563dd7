"""Real sockets on 127.0.0.1: `hl7relay listen` and `hl7relay send` as separate processes,
in plain TCP, TLS, and mutual TLS (certificates generated here, at test time)."""

import selectors
import signal
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def pki(make_pki):
    return make_pki()


def hl7relay(*args):
    return [sys.executable, "-m", "hl7relay", *args]


class Listener:
    def __init__(self, *args):
        self.process = subprocess.Popen(hl7relay("listen", "--port", "0", *args), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        first = self._line(timeout=30)
        assert first and "MLLP on 127.0.0.1:" in first, first
        self.port = first.split("MLLP on 127.0.0.1:")[1].split()[0]
        self.lines = []

    def _line(self, timeout):
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            return None
        return self.process.stdout.readline()

    def stop(self):
        self.process.send_signal(signal.SIGTERM)  # SIGINT is ignored in a background job
        try:
            out, _ = self.process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        return out


def send(port, *args, timeout=60):
    return subprocess.run(hl7relay("send", "--port", port, "--timeout", "10", "--connect-timeout", "5", *args),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def plain_listener():
    listener = Listener()
    yield listener
    listener.stop()


def test_send_to_listen_over_loopback(plain_listener, samples):
    result = send(plain_listener.port, str(samples / "adt_a01.hl7"), str(samples / "batch_adt.hl7"),
                  str(samples / "malformed" / "lf_endings.hl7"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        f"{samples / 'adt_a01.hl7'} MSG00001: CA MSG00001",
        f"{samples / 'batch_adt.hl7'} MSG00101: CA MSG00101",
        f"{samples / 'batch_adt.hl7'} MSG00102: CA MSG00102",
        f"{samples / 'malformed' / 'lf_endings.hl7'} BAD00006: CA BAD00006",
    ]
    log = plain_listener.stop()
    assert log.count("-> ACK CA") == 4 and "DOE" not in log  # summaries carry no patient data


def test_original_mode_gets_aa_and_stdin_works(plain_listener, samples):
    data = (samples / "adt_a04.hl7").read_bytes().replace(b"|AL|NE|", b"|||")
    result = subprocess.run(hl7relay("send", "--port", plain_listener.port, "-"), input=data, capture_output=True, timeout=60)
    assert result.returncode == 0 and result.stdout.decode().strip() == "<stdin> MSG00003: AA MSG00003"


def test_send_reports_a_refused_connection():
    result = subprocess.run(hl7relay("send", "--port", "9", "--connect-timeout", "3", "-"),
                            input=b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5\r", capture_output=True, timeout=60)
    assert result.returncode == 1 and b"CONNECTION FAILED" in result.stdout


def test_tls(pki, samples):
    listener = Listener("--tls-cert", pki["server"], "--tls-key", pki["server_key"])
    try:
        result = send(listener.port, "--tls-ca", pki["ca"], "--host", "127.0.0.1", str(samples / "adt_a03.hl7"))
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip().endswith("CA MSG00002")
        untrusted = send(listener.port, "--tls", str(samples / "adt_a03.hl7"))  # system CAs do not know ours
        assert untrusted.returncode == 1
    finally:
        listener.stop()


def test_mutual_tls_refuses_a_client_without_a_certificate(pki, samples):
    listener = Listener("--tls-cert", pki["server"], "--tls-key", pki["server_key"], "--tls-ca", pki["ca"],
                        "--require-client-cert")
    try:
        anonymous = send(listener.port, "--tls-ca", pki["ca"], str(samples / "adt_a03.hl7"))
        assert anonymous.returncode == 1 and "CA MSG00002" not in anonymous.stdout
        with_cert = send(listener.port, "--tls-ca", pki["ca"], "--tls-cert", pki["client"], "--tls-key", pki["client_key"],
                         str(samples / "adt_a03.hl7"))
        assert with_cert.returncode == 0, with_cert.stdout + with_cert.stderr
    finally:
        log = listener.stop()
    assert log.count("-> ACK CA") == 1  # only the client with a certificate got through


def _original_mode(samples, tmp_path, count=1):
    """adt_a04 in original mode, ``count`` times with distinct control ids, as one file."""
    data = (samples / "adt_a04.hl7").read_bytes().replace(b"|AL|NE|", b"|||").rstrip(b"\r\n") + b"\r"
    path = tmp_path / "messages.hl7"
    path.write_bytes(b"".join(data.replace(b"MSG00003", b"R%05d" % i) for i in range(count)))
    return str(path)


@pytest.mark.parametrize("code", ["AE", "AR", "CR"])
def test_listen_rehearses_a_receiver_that_answers_with_an_error_code(samples, tmp_path, code):
    listener = Listener("--answer", code)
    try:
        result = send(listener.port, _original_mode(samples, tmp_path))
    finally:
        log = listener.stop()
    assert result.returncode == 1 and f": {code} R00000 hl7relay listen --answer {code}: rehearsing" in result.stdout
    assert f"-> ACK {code}" in log


def test_listen_fails_the_first_messages_only_then_recovers(samples, tmp_path):
    listener = Listener("--answer", "AR", "--fail-first", "2")
    try:
        result = send(listener.port, _original_mode(samples, tmp_path, 3))
    finally:
        listener.stop()
    assert [line.split(": ")[1][:2] for line in result.stdout.splitlines()] == ["AR", "AR", "AA"]


def test_listen_no_answer_and_delay_make_the_sender_time_out(samples, tmp_path):
    for args in (["--no-answer"], ["--delay", "5"]):
        listener = Listener(*args)
        try:
            result = subprocess.run(hl7relay("send", "--port", listener.port, "--timeout", "1", _original_mode(samples, tmp_path)),
                                    capture_output=True, text=True, timeout=60)
        finally:
            log = listener.stop()
        assert result.returncode == 1 and "TIMED OUT" in result.stdout, result.stdout
        assert ("no answer (--no-answer)" if args == ["--no-answer"] else "ACK AA in 5s (--delay)") in log


def test_listen_delay_shorter_than_the_timeout_is_answered(samples, tmp_path):
    listener = Listener("--delay", "0.3")
    try:
        result = send(listener.port, _original_mode(samples, tmp_path))
    finally:
        listener.stop()
    assert result.returncode == 0 and result.stdout.strip().endswith("AA R00000")


def test_listen_drop_closes_the_connection_without_an_answer(samples, tmp_path):
    listener = Listener("--drop")
    try:
        result = send(listener.port, _original_mode(samples, tmp_path))
    finally:
        log = listener.stop()
    assert result.returncode == 1 and "closed before the ACK" in result.stdout, result.stdout
    assert "connection dropped (--drop)" in log


def test_tls_failures_are_named_on_both_sides(pki, samples):
    """A refused client certificate and plain text to a TLS port were reported as timeouts by
    send, and the listener logged nothing."""
    listener = Listener("--tls-cert", pki["server"], "--tls-key", pki["server_key"], "--tls-ca", pki["ca"],
                        "--require-client-cert")
    try:
        anonymous = send(listener.port, "--tls-ca", pki["ca"], str(samples / "adt_a03.hl7"))
        plain = send(listener.port, str(samples / "adt_a03.hl7"))
    finally:
        log = listener.stop()
    assert anonymous.returncode == 1 and "TIMED OUT" not in anonymous.stdout, anonymous.stdout
    assert "CONNECTION FAILED" in anonymous.stdout and "certificate" in anonymous.stdout, anonymous.stdout
    assert plain.returncode == 1 and "if it is a TLS port, configure TLS" in plain.stdout, plain.stdout
    assert log.count("TLS with 127.0.0.1:") >= 2, log
    assert "plain text" in log, log
