"""SFTP in and out against a real server (asyncssh, in a process of its own, on loopback): host
keys pinned, the sftp source through the file ledger (a slow uploader, a connection that drops
mid-file, a name used again), and `hl7relay check sftp://`."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sftp_server import SFTPServer  # noqa: E402

from hl7relay.channels import load_channel  # noqa: E402

ADT = ("MSH|^~\\&|PMS|CLINIC|HL7RELAY|LAB|20240105093512||ADT^A04^ADT_A01|{id}|P|2.5.1\r"
       "EVN|A04|20240105093512\rPID|1||{id}^^^CLINIC^MR||DOE^JANE\rPV1|1|O\r")


def batch(*ids, note: int = 0) -> bytes:
    extra = ("NTE|1||" + "n" * note + "\r") if note else ""
    return "".join(ADT.format(id=i) + extra for i in ids).encode()


@pytest.fixture
def server(tmp_path):
    started = SFTPServer(tmp_path / "sftp")
    yield started
    started.stop()


class Engine:
    """`hl7relay run` with one sftp channel; stopped with SIGTERM."""

    def __init__(self, folder: Path, server: SFTPServer, source: str = "", name: str = "engine"):
        self.folder = folder
        channels = folder / "channels"
        channels.mkdir(parents=True, exist_ok=True)
        (channels / "pms.yaml").write_text(
            "name: pms\nsource: {type: sftp, host: 127.0.0.1, port: %d, username: hl7relay, known_hosts: '%s', "
            "private_key: '${file:%s}', directory: /outbox, glob: '*.txt', poll_interval: 0.2%s}\n"
            % (server.port, server.known_hosts, server.folder / "client_key", ", " + source if source else ""))
        self.log = folder / f"{name}.log"
        self.process = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--channels", str(channels),
                                         "--data-dir", str(folder / "data"), "--admin-port", "0", "--console-port", "0"],
                                        cwd=folder, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.wait(lambda: "ready" in self.log.read_text(), "the engine to be ready", 60)

    def wait(self, predicate, what, timeout=60):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.05)

    def stored(self) -> list[tuple[str, str]]:
        db = self.folder / "data" / "hl7relay.db"
        try:
            with sqlite3.connect(db, timeout=30) as connection:
                return list(connection.execute("SELECT control_id, status FROM messages ORDER BY id"))
        except sqlite3.OperationalError:
            return []

    def ledger(self) -> list[tuple]:
        with sqlite3.connect(self.folder / "data" / "hl7relay.db", timeout=30) as connection:
            return list(connection.execute("SELECT source, name, state, messages, committed, archived_as FROM file_ledger "
                                           "ORDER BY id"))

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def test_check_prints_the_host_key_to_pin_and_says_whether_it_is_pinned(server, tmp_path):
    run = [sys.executable, "-m", "hl7relay", "check", f"sftp://127.0.0.1:{server.port}"]
    pinned = subprocess.run([*run, "--known-hosts", str(server.known_hosts)], capture_output=True, text=True, timeout=60)
    assert pinned.returncode == 0 and f"pinned in {server.known_hosts}" in pinned.stdout
    line = [x.strip() for x in pinned.stdout.splitlines() if x.strip().startswith("[127.0.0.1]:")][0]
    assert line == server.known_hosts.read_text().strip()
    (tmp_path / "empty").write_text("")
    unknown = subprocess.run([*run, "--known-hosts", str(tmp_path / "empty")], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1 and "NOT pinned" in unknown.stdout and "is not in" in unknown.stdout


def test_an_sftp_file_is_read_once_through_the_ledger_and_archived_on_the_server(server, tmp_path):
    outbox = server.root / "outbox"
    outbox.mkdir()
    (outbox / "ADT.txt.part").write_bytes(batch("S1", "S2", "S3"))
    engine = Engine(tmp_path / "engine", server, "complete: rename")
    try:
        time.sleep(0.5)
        assert engine.stored() == []  # still named .part: the glob does not take it
        (outbox / "ADT.txt.part").rename(outbox / "ADT.txt")
        engine.wait(lambda: len(engine.stored()) == 3, "three messages")
        engine.wait(lambda: not (outbox / "ADT.txt").exists(), "the file moved on the server")
        assert (outbox / "processed" / "ADT.txt").read_bytes() == batch("S1", "S2", "S3")
        # the next night's export, the same name: another file, archived beside the first
        (outbox / "ADT.txt.part").write_bytes(batch("S4"))
        (outbox / "ADT.txt.part").rename(outbox / "ADT.txt")
        engine.wait(lambda: len(engine.stored()) == 4 and (outbox / "processed" / "ADT.1.txt").exists(), "the second")
        assert [c for c, _ in engine.stored()] == ["S1", "S2", "S3", "S4"]
        ledger = engine.ledger()
        source = f"sftp://127.0.0.1:{server.port}/outbox"
        assert [(r[0], r[1], r[2], r[3], r[4]) for r in ledger] == [(source, "ADT.txt", "done", 3, 3),
                                                                     (source, "ADT.txt", "done", 1, 1)]
        assert ledger[1][5] == f"sftp://127.0.0.1:{server.port}/outbox/processed/ADT.1.txt"
        assert not list((tmp_path / "engine" / "data" / "spool" / "pms").iterdir())  # the local copies are gone
    finally:
        assert engine.stop() == 0


def test_a_slow_uploader_is_never_read_half_written(server, tmp_path):
    outbox = server.root / "outbox"
    outbox.mkdir()
    engine = Engine(tmp_path / "engine", server, "complete: settle, settle: 2")
    data = batch(*[f"W{n:03d}" for n in range(60)])
    try:
        with open(outbox / "slow.txt", "wb") as upload:  # a PMS writing its export bit by bit
            for start in range(0, len(data), len(data) // 6):
                upload.write(data[start:start + len(data) // 6])
                upload.flush()
                time.sleep(1.1)  # a pause shorter than settle: SFTP's times are whole seconds
        engine.wait(lambda: len(engine.stored()) == 60, "every message", 60)
        assert {status for _, status in engine.stored()} == {"PROCESSED"}  # none cut in half
        assert [r[2:5] for r in engine.ledger()] == [("done", 60, 60)]
    finally:
        assert engine.stop() == 0


def test_a_connection_that_drops_mid_download_is_read_again_whole(tmp_path):
    server = SFTPServer(tmp_path / "sftp", drop_after=300_000)
    try:
        outbox = server.root / "outbox"
        outbox.mkdir()
        ids = [f"D{n:03d}" for n in range(200)]
        (outbox / "big.txt").write_bytes(batch(*ids, note=4000))  # about 850 KB: the drop comes mid-file
        engine = Engine(tmp_path / "engine", server, "complete: rename")
        try:
            engine.wait(lambda: len(engine.stored()) == 200, "every message after the reconnection", 90)
            assert [c for c, _ in engine.stored()] == ids  # once each, in order
            log = engine.log.read_text()
            assert "trying again in" in log or "cannot read big.txt" in log
        finally:
            assert engine.stop() == 0
    finally:
        server.stop()


def test_a_server_that_is_not_the_pinned_one_is_refused(server, tmp_path):
    outbox = server.root / "outbox"
    outbox.mkdir()
    (outbox / "a.txt").write_bytes(batch("X1"))
    server.known_hosts.write_text(f"[127.0.0.1]:{server.port} ssh-ed25519 "
                                  "AAAAC3NzaC1lZDI1NTE5AAAAIMSYoEeTwsQ0dCI6DYFEwB6r718x35A6ObwUYWTQ40Eh\n")
    engine = Engine(tmp_path / "engine", server, "complete: rename")
    try:
        engine.wait(lambda: "is not the one in" in engine.log.read_text(), "the refusal")
        assert engine.stored() == [] and (outbox / "a.txt").exists()
    finally:
        assert engine.stop() == 0


@pytest.mark.parametrize("options, expected", [
    ("complete: settle, settle: 1", "settle: SFTP says modification times in whole seconds: at least 2"),
    ("password: ''", "private_key or password"),
    ("known_hosts: nowhere", "known_hosts: "),
    ("private_key: 'not a key'", "private_key: not a private key it can read"),
])
def test_wrong_sftp_source_options_are_lint_errors(tmp_path, options, expected):
    (tmp_path / "known_hosts").write_text("")
    key = "'-----BEGIN OPENSSH PRIVATE KEY-----'" if "private_key" not in options else ""
    base = {"host": "127.0.0.1", "username": "u", "known_hosts": "known_hosts"}
    for item in options.split(", "):
        k, v = item.split(": ", 1)
        base[k] = v
    if "password" in options:
        base.pop("private_key", None)
    elif "private_key" not in base:
        base["password"] = "p"
    listed = ", ".join(f"{k}: {v}" for k, v in base.items())
    path = tmp_path / "ch.yaml"
    path.write_text(f"name: ch\nsource: {{type: sftp, {listed}}}\n")
    _channel, errors = load_channel(path, {})
    assert errors and expected in str(errors[0]), (errors, key)


# -- onto the server ----------------------------------------------------------------------------------
class Outbound(Engine):
    """`hl7relay run` with a local file source and a destination onto the SFTP server."""

    def __init__(self, folder: Path, server: SFTPServer, destination: str, name: str = "engine"):
        self.folder = folder
        self.inbox = folder / "inbox"
        self.inbox.mkdir(parents=True, exist_ok=True)
        channels = folder / "channels"
        channels.mkdir(parents=True, exist_ok=True)
        connection = (f"host: 127.0.0.1, port: {server.port}, username: hl7relay, known_hosts: '{server.known_hosts}', "
                      f"private_key: '${{file:{server.folder / 'client_key'}}}'")
        (channels / "out.yaml").write_text(
            f"name: out\nsource: {{type: file, directory: '{self.inbox}', glob: '*.hl7', complete: rename, "
            f"poll_interval: 0.2}}\ndestinations:\n  - {destination.replace('CONNECTION', connection)}\n")
        self.log = folder / f"{name}.log"
        self.process = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--channels", str(channels),
                                         "--data-dir", str(folder / "data"), "--admin-port", "0", "--console-port", "0"],
                                        cwd=folder, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.wait(lambda: "ready" in self.log.read_text(), "the engine to be ready", 60)

    def deliveries(self) -> list[str]:
        try:
            with sqlite3.connect(self.folder / "data" / "hl7relay.db", timeout=30) as connection:
                return [r[0] for r in connection.execute("SELECT status FROM deliveries ORDER BY message_id")]
        except sqlite3.OperationalError:
            return []


def test_the_sftp_destination_uploads_each_message_under_a_hidden_name_then_renames_it(server, tmp_path):
    engine = Outbound(tmp_path / "engine", server, "{name: pms, type: sftp, CONNECTION, directory: /inbound}")
    try:
        (engine.inbox / "a.part").write_bytes(batch("U1", "U2", "U3"))
        (engine.inbox / "a.part").rename(engine.inbox / "a.hl7")
        engine.wait(lambda: engine.deliveries() == ["SENT"] * 3, "three deliveries SENT")
        inbound = server.root / "inbound"
        assert sorted(p.name for p in inbound.iterdir()) == ["U1.hl7", "U2.hl7", "U3.hl7"]  # nothing .part left
        assert (inbound / "U2.hl7").read_bytes() == ADT.format(id="U2").encode()
    finally:
        assert engine.stop() == 0


def test_a_batch_over_sftp_survives_a_connection_dropped_mid_upload_and_is_written_whole_once(tmp_path):
    server = SFTPServer(tmp_path / "sftp", drop_after=200_000)
    try:
        engine = Outbound(tmp_path / "engine", server,
                          "{name: nightly, type: batch, directory: /batches, max_messages: 80, max_age: 2, retry_initial: 0.2, "
                          "retry_max: 1, sftp: {CONNECTION}}")
        try:
            ids = [f"B{n:03d}" for n in range(80)]
            (engine.inbox / "night.part").write_bytes(batch(*ids, note=4000))  # about 340 KB: dropped mid-upload
            (engine.inbox / "night.part").rename(engine.inbox / "night.hl7")
            engine.wait(lambda: engine.deliveries() == ["SENT"] * 80, "the batch SENT after the drop", 90)
            files = list((server.root / "batches").iterdir())
            assert len(files) == 1 and files[0].suffix == ".hl7", files  # whole, once; its .part written over and renamed
            from hl7relay.hl7.batch import split_messages
            from hl7relay.hl7.message import Message

            split = split_messages(files[0].read_bytes())
            assert not split.problems and [Message.from_bytes(c.data).control_id for c in split.messages] == ids
            assert "the batch could not be written" in engine.log.read_text()  # the drop happened
        finally:
            assert engine.stop() == 0
    finally:
        server.stop()


def test_the_readme_sftp_channel_lints_with_its_key_and_pin_in_place(server, tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Batch files: the file source and its ledger")[1].split("\n### ")[0]
    text = [block.split("```", 1)[0] for block in section.split("```yaml\n")[1:] if "type: sftp" in block][0]
    channels = tmp_path / "channels"
    channels.mkdir()
    (channels / "sftp_known_hosts").write_text(server.known_hosts.read_text())
    text = text.replace("${secret:pms-sftp-key}", f"${{file:{server.folder / 'client_key'}}}")
    (channels / "nightly-adt-sftp.yaml").write_text(text)
    done = subprocess.run([sys.executable, "-m", "hl7relay", "lint", "channels"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "1 channel OK: nightly-adt-sftp", done.stdout + done.stderr


def test_kill_9_mid_sftp_file_then_restart_stores_every_message_once_in_order(server, tmp_path):
    outbox = server.root / "outbox"
    outbox.mkdir()
    # big enough that the kill, sent once 300 are stored, lands mid-file on a fast machine too (4,000
    # were all stored before it once)
    ids = [f"K{n:05d}" for n in range(20000)]
    (outbox / "night.part").write_bytes(batch(*ids))
    engine = Engine(tmp_path / "engine", server, "complete: rename")
    (outbox / "night.part").rename(outbox / "night.txt")
    engine.wait(lambda: len(engine.stored()) >= 300, "300 messages stored")
    engine.process.send_signal(signal.SIGKILL)  # mid-file
    engine.process.wait(timeout=30)
    at_kill = [c for c, _ in engine.stored()]
    assert 300 <= len(at_kill) < len(ids) and at_kill == ids[:len(at_kill)]
    assert (outbox / "night.txt").exists()  # not moved: it was not finished
    again = Engine(tmp_path / "engine", server, "complete: rename", name="engine2")
    try:
        again.wait(lambda: not (outbox / "night.txt").exists(), "the file finished and moved", 120)
        assert [c for c, _ in again.stored()] == ids  # nothing lost, nothing twice, in file order
        assert [r[2:5] for r in again.ledger()] == [("done", len(ids), len(ids))]
    finally:
        assert again.stop() == 0
