"""Configuration snapshots (issue #30, second step): what the engine ran, recorded at start and at
each reload, in a git checkout; history, show and diff; never a secret's value."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def git(folder: Path, *args) -> str:
    done = subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.org", *args], cwd=folder,
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


def send(port: int, control_id: str) -> None:
    import socket

    from hl7relay.mllp.framing import MLLPFramer, frame

    message = (f"MSH|^~\\&|PMS|CLINIC|LAB|LABFAC|20240105||ADT^A04^ADT_A01|{control_id}|P|2.5.1\r"
               f"PID|1||{control_id}^^^H^MR||DOE^JANE\rPV1|1|O\r")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(frame(message.encode()))
        framer, events = MLLPFramer(), []
        while not events:
            events = framer.feed(connection.recv(65536))


def hl7relay(folder: Path, *args):
    return subprocess.run([sys.executable, "-m", "hl7relay", *args], cwd=folder, capture_output=True, text=True, timeout=60)


def test_start_and_reload_record_what_ran_and_config_reads_it_back(tmp_path):
    channels = tmp_path / "channels"
    (channels / "lookups").mkdir(parents=True)
    (tmp_path / "api.secret").write_text("s3cret-value-never-shown\n")
    (channels / "adt.yaml").write_text(
        "name: adt\nsource: {type: mllp, port: 0}\ntransformers:\n  - map: {path: PV1-2, file: lookups/class.csv}\n"
        "destinations:\n  - {name: api, type: http, url: 'https://${env:API_HOST}/v1', "
        "headers: {X-Key: '${file:../api.secret}'}}\n")
    (channels / "lookups" / "class.csv").write_text("I,IP\nO,OP\n")
    (tmp_path / "environments").mkdir()
    (tmp_path / "environments" / "test.yaml").write_text("API_HOST: api.test\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "channels", "environments")
    git(tmp_path, "commit", "-q", "-m", "A")
    commit = git(tmp_path, "rev-parse", "HEAD")
    log = tmp_path / "engine.log"
    engine = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--env", "test", "--channels", "channels",
                               "--data-dir", "data", "--admin-port", "0", "--console-port", "0"], cwd=tmp_path,
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + 60
        while "ready" not in log.read_text():
            assert time.monotonic() < deadline and engine.poll() is None, log.read_text()
            time.sleep(0.05)
        assert "configuration: snapshot 1 (2 files, sha256 " in log.read_text()
        assert f"git {commit[:12]})" in log.read_text()
        port = int(log.read_text().split("MLLP on 127.0.0.1:")[1].split()[0])
        send(port, "S1")  # processed under A
        (channels / "lookups" / "class.csv").write_text("I,IP\nO,OUT\n")  # B: a mapping changed, not committed
        engine.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while "snapshot 2 for the reload" not in log.read_text():
            assert time.monotonic() < deadline and engine.poll() is None, log.read_text()
            time.sleep(0.05)
        time.sleep(0.5)  # the reload applies right after its snapshot is recorded
        send(port, "S2")  # processed under B
        import sqlite3

        with sqlite3.connect(tmp_path / "data" / "hl7relay.db") as connection:
            rows = list(connection.execute("SELECT control_id, snapshot_id FROM messages ORDER BY id"))
        assert rows == [("S1", 1), ("S2", 2)]  # each message says what configuration processed it
    finally:
        engine.send_signal(signal.SIGTERM)
        assert engine.wait(timeout=60) == 0
    history = hl7relay(tmp_path, "config", "history", "--data-dir", "data")
    lines = history.stdout.strip().splitlines()
    assert history.returncode == 0 and len(lines) == 2, history.stdout + history.stderr
    assert lines[0].split()[0] == "2" and " reload " in lines[0] and f"git {commit[:12]}+changes" in lines[0]
    assert " start " in lines[1] and " test " in lines[1] and f"git {commit[:12]} " in lines[1]
    diff = hl7relay(tmp_path, "config", "diff", "1", "2", "--data-dir", "data")
    changed = [line for line in diff.stdout.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert diff.returncode == 1 and changed == ["-O,OP", "+O,OUT"], diff.stdout  # the mapping, and nothing else
    shown = hl7relay(tmp_path, "config", "show", "1", "--data-dir", "data")
    assert "# channels/adt.yaml" in shown.stdout and "https://api.test/v1" in shown.stdout  # the environment's value
    assert "${file:../api.secret}" in shown.stdout  # a secret stays its reference
    one = hl7relay(tmp_path, "config", "show", "1", "channels/lookups/class.csv", "--data-dir", "data")
    assert one.stdout == "I,IP\nO,OP\n"
    every = history.stdout + diff.stdout + shown.stdout + log.read_text()
    every += (tmp_path / "data" / "hl7relay.db").read_bytes().decode("latin-1")
    assert "s3cret-value-never-shown" not in every  # not in a snapshot, a diff, a log line, nor the store
    assert hl7relay(tmp_path, "config", "show", "9", "--data-dir", "data").returncode == 2
    same = hl7relay(tmp_path, "config", "diff", "1", "1", "--data-dir", "data")
    assert same.returncode == 0 and "hold the same files" in same.stdout
