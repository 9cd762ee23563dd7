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
    engine = start(tmp_path, log)
    try:
        wait_for(log, "ready; Ctrl-C", engine)
        assert "configuration: snapshot 1 (2 files, sha256 " in log.read_text()
        assert f"git {commit[:12]})" in log.read_text()
        port = int(log.read_text().split("MLLP on 127.0.0.1:")[1].split()[0])
        send(port, "S1")  # processed under A
        (channels / "lookups" / "class.csv").write_text("I,IP\nO,OUT\n")  # B: a mapping changed, not committed
        engine.send_signal(signal.SIGHUP)
        wait_for(log, "snapshot 2 for the reload", engine)
        time.sleep(0.5)  # the reload applies right after its snapshot is recorded
        send(port, "S2")  # processed under B
        import sqlite3

        with sqlite3.connect(tmp_path / "data" / "hl7relay.db") as connection:
            rows = list(connection.execute("SELECT control_id, snapshot_id FROM messages ORDER BY id"))
        assert rows == [("S1", 1), ("S2", 2)]  # each message says what configuration processed it
    finally:
        stop(engine)
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


def wait_for(log: Path, text: str, engine, count: int = 1) -> None:
    deadline = time.monotonic() + 60
    while log.read_text().count(text) < count:
        assert time.monotonic() < deadline and engine.poll() is None, log.read_text()
        time.sleep(0.05)


def start(folder: Path, log: Path, *extra):
    return subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--env", "test", "--channels", "channels",
                             "--data-dir", "data", "--admin-port", "auto", "--console-port", "0", *extra], cwd=folder,
                            stdout=open(log, "a"), stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def stop(engine) -> None:
    engine.send_signal(signal.SIGTERM)
    assert engine.wait(timeout=60) == 0


def output(folder: Path, control_id: str, before: float = 0.0) -> bytes:
    path = folder / "out" / f"{control_id}.hl7"
    deadline = time.monotonic() + 60
    while not path.exists() or path.stat().st_mtime <= before:
        assert time.monotonic() < deadline, f"no output for {control_id}"
        time.sleep(0.05)
    return path.read_bytes()


def test_rollback_runs_the_old_configuration_until_a_reload_and_replay_can_use_either(tmp_path):
    """Issue #30's end-to-end: A runs; B (a mapping changed) is reloaded; a rollback to A makes
    outputs equal A's again, survives a restart, and shows in status until a reload applies the
    files; replay as processed of a B message uses B, replay with the current configuration A."""
    channels = tmp_path / "channels"
    (channels / "lookups").mkdir(parents=True)
    (tmp_path / "out.secret").write_text("rollback-secret-never-shown\n")
    (channels / "adt.yaml").write_text(
        "name: adt\nsource: {type: mllp, port: 0}\n"
        "transformers:\n  - map: {path: PV1-2, file: lookups/class.csv}\n"
        "  - set: {path: ZZZ-1, value: '${file:../out.secret}'}\n  - delete_segment: ZZZ\n"
        "destinations:\n  - {name: files, type: file, directory: '${env:OUT_DIR}', mode: '0600'}\n")
    (channels / "lookups" / "class.csv").write_text("I,IP\nO,OP\n")
    (tmp_path / "environments").mkdir()
    (tmp_path / "environments" / "test.yaml").write_text("OUT_DIR: out\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "channels", "environments")
    git(tmp_path, "commit", "-q", "-m", "A")
    log = tmp_path / "engine.log"
    engine = start(tmp_path, log)
    try:
        wait_for(log, "ready; Ctrl-C", engine)
        port = int(log.read_text().split("MLLP on 127.0.0.1:")[1].split()[0])
        send(port, "S1")
        under_a = output(tmp_path, "S1")
        assert b"PV1|1|OP" in under_a
        (channels / "lookups" / "class.csv").write_text("I,IP\nO,OUT\n")  # B
        git(tmp_path, "commit", "-q", "-am", "B")
        engine.send_signal(signal.SIGHUP)
        wait_for(log, "snapshot 2 for the reload", engine)
        time.sleep(0.5)  # the reload applies right after its snapshot is recorded
        send(port, "S2")
        assert b"PV1|1|OUT" in output(tmp_path, "S2")

        refused = hl7relay(tmp_path, "config", "rollback", "1", "--data-dir", "data")
        assert refused.returncode == 2 and "--reason" in refused.stderr  # why, always
        missing = hl7relay(tmp_path, "config", "rollback", "99", "--reason", "x", "--data-dir", "data")
        assert missing.returncode == 2 and "no snapshot 99" in missing.stderr, missing.stderr
        rolled = hl7relay(tmp_path, "config", "rollback", "1", "--reason", "B broke the lab's class codes",
                          "--data-dir", "data", "--env", "test")
        assert rolled.returncode == 0, rolled.stdout + rolled.stderr
        assert "rolled back to snapshot 1: now snapshot 3; changed adt" in rolled.stdout
        assert "already sent stays sent" in rolled.stdout
        send(port, "S3")
        assert output(tmp_path, "S3").replace(b"S3", b"S1") == under_a  # A's output, byte for byte

        status = hl7relay(tmp_path, "status", "--data-dir", "data", "--channels", "channels", "--env", "test")
        assert "configuration: snapshot 3 (rollback" in status.stdout and "rolled back to snapshot 1" in status.stdout
        assert "the channel files DIFFER from what runs (hl7relay config diff 3; hl7relay reload applies them)" in status.stdout
        against_files = hl7relay(tmp_path, "config", "diff", "3", "--data-dir", "data", "--channels", "channels",
                                 "--env", "test")
        changed = [line for line in against_files.stdout.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]
        assert against_files.returncode == 1 and changed == ["-O,OP", "+O,OUT"], against_files.stdout
        diff = hl7relay(tmp_path, "config", "diff", "1", "2", "--data-dir", "data")
        changed = [line for line in diff.stdout.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]
        assert changed == ["-O,OP", "+O,OUT"]  # A to B: only the mapping

        before = (tmp_path / "out" / "S2.hl7").stat().st_mtime
        replayed = hl7relay(tmp_path, "replay", "2", "--as-processed", "--force", "--reason", "resend as B did",
                            "--data-dir", "data", "--channels", "channels", "--env", "test")
        assert replayed.returncode == 0 and "as processed (snapshot 2)" in replayed.stdout, replayed.stdout + replayed.stderr
        assert b"PV1|1|OUT" in output(tmp_path, "S2", before)  # B's configuration, though A runs
        before = (tmp_path / "out" / "S2.hl7").stat().st_mtime
        current = hl7relay(tmp_path, "replay", "2", "--force", "--reason", "resend as now",
                           "--data-dir", "data", "--channels", "channels", "--env", "test")
        assert current.returncode == 0, current.stdout + current.stderr
        assert b"PV1|1|OP" in output(tmp_path, "S2", before)  # the current configuration: A, rolled back to
    finally:
        stop(engine)
    engine = start(tmp_path, log)  # a restart keeps the rollback
    try:
        wait_for(log, "ready; Ctrl-C", engine, 2)
        assert "configuration: rolled back to snapshot 1, not the channel files" in log.read_text()
        port = int(log.read_text().split("MLLP on 127.0.0.1:")[-1].split()[0])
        send(port, "S4")
        assert b"PV1|1|OP" in output(tmp_path, "S4")
        reload = hl7relay(tmp_path, "reload", "--reason", "B fixed", "--data-dir", "data")
        assert reload.returncode == 0, reload.stderr
        send(port, "S5")
        assert b"PV1|1|OUT" in output(tmp_path, "S5")  # the files again
    finally:
        stop(engine)
    import sqlite3

    with sqlite3.connect(tmp_path / "data" / "hl7relay.db") as connection:
        rows = list(connection.execute("SELECT control_id, snapshot_id, replay_of FROM messages ORDER BY id"))
        snapshots = list(connection.execute("SELECT id, reason, from_snapshot, note FROM config_snapshots ORDER BY id"))
        audit = list(connection.execute("SELECT action, target, reason, result FROM audit_log WHERE action LIKE 'config.%'"))
    assert rows == [("S1", 1, None), ("S2", 2, None), ("S3", 3, None), ("S2", 2, 2), ("S2", 3, 2), ("S4", 4, None),
                    ("S5", 5, None)]
    assert snapshots == [(1, "start", None, ""), (2, "reload", None, ""), (3, "rollback", 1, "B broke the lab's class codes"),
                         (4, "start", 1, "B broke the lab's class codes"), (5, "reload", None, "B fixed")]
    assert audit == [("config.rollback", "snapshot 99", "x", "refused"),  # a refused one is audited too
                     ("config.rollback", "snapshot 1", "B broke the lab's class codes", "ok")]
    status = hl7relay(tmp_path, "status", "--data-dir", "data", "--channels", "channels", "--env", "test")
    assert "configuration: snapshot 5 (reload" in status.stdout and "the channel files are what runs" in status.stdout
    every = log.read_text() + (tmp_path / "data" / "hl7relay.db").read_bytes().decode("latin-1")
    every += "".join(p.read_text() for p in (tmp_path / "out").iterdir())
    assert "rollback-secret-never-shown" not in every


def test_the_suites_secret_scan_finds_a_planted_leak():
    """The scan run at the end of the suite (conftest.py) can fail: a vault value and a *.secret
    file's value, planted in a snapshot and a log, are each found. (Planted outside the session's
    temporary folder, which the real scan reads.)"""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        _planted_leaks_are_found(Path(folder))


def _planted_leaks_are_found(tmp_path: Path) -> None:
    import json
    import sqlite3
    import zlib

    from cryptography.fernet import Fernet
    from secret_scan import scan

    from hl7relay.store.database import Store

    data = tmp_path / "data"
    store = Store(f"sqlite:///{data / 'hl7relay.db'}")
    store.migrate()
    key = Fernet.generate_key()
    (data / "vault.key").write_bytes(key)
    (tmp_path / "token.secret").write_text("file-secret-planted\n")
    with sqlite3.connect(data / "hl7relay.db") as connection:
        connection.execute("INSERT INTO secrets (name, ciphertext, created_at, created_by) VALUES (?, ?, 1, 'test')",
                           ("api-key", Fernet(key).encrypt(b"vault-secret-planted")))
    assert scan(tmp_path) == []
    with sqlite3.connect(data / "hl7relay.db") as connection:
        connection.execute("INSERT INTO config_snapshots (taken_at, sha256, environment, node, actor, reason, git_commit, "
                           "git_dirty, files, bundle) VALUES (1, 'x', '', '', '', 'start', '', 0, 1, ?)",
                           (zlib.compress(json.dumps({"a.yaml": "key: vault-secret-planted"}).encode()),))
    (tmp_path / "engine.log").write_text("sent with file-secret-planted\n")
    hits = scan(tmp_path)
    assert len(hits) == 2 and any("snapshot 1: the secret of" in hit and "secret api-key" in hit for hit in hits)
    assert any("engine.log: the secret of" in hit and "token.secret" in hit for hit in hits)
    assert not any("planted" in hit for hit in hits)  # the leak is named, the value not repeated


def test_a_snapshot_holds_the_files_a_channel_reads_elsewhere_and_the_settings_without_a_password(tmp_path):
    """A lookup table outside the channel folder is in the snapshot and a rollback reads it from
    there; the settings file is in it too, a store URL's password masked; the promotion hash is
    the channel folder's alone (a host's settings differ between test and prod)."""
    from hl7relay.channels import load_channels
    from hl7relay.snapshots import differs_from_files, load_snapshot_channels, source_sha256, take_snapshot

    (tmp_path / "channels").mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "class.csv").write_text("O,OP\n")
    (tmp_path / "channels" / "adt.yaml").write_text(
        "name: adt\nsource: {type: mllp, port: 0}\ntransformers:\n  - map: {path: PV1-2, file: ../shared/class.csv}\n")
    settings = tmp_path / "hl7relay.yaml"
    settings.write_text("store:\n  url: postgresql+psycopg://relay:hunter2-db@db.example/hl7relay\n")
    channels, errors = load_channels([tmp_path / "channels"])
    assert not errors
    snapshot = take_snapshot([tmp_path / "channels"], "os:ana", "start", 1.0, channels=channels, settings_file=settings)
    outside = str((tmp_path / "channels" / "../shared/class.csv"))
    assert snapshot.files[outside] == "O,OP\n"
    assert "relay:***@db.example" in snapshot.files[str(settings)] and "hunter2-db" not in str(snapshot.files)
    assert snapshot.source_sha256 == source_sha256([tmp_path / "channels"])
    (tmp_path / "shared" / "class.csv").write_text("O,OUT\n")  # changed on disk since
    row = {"id": 1, "files": snapshot.files}
    assert not differs_from_files(row, [tmp_path / "channels"])  # the channel folder itself did not change
    [channel], errors = load_snapshot_channels(row, [tmp_path / "channels"])
    from hl7relay.hl7.message import Message
    from hl7relay.channels.pipeline import process

    raw = b"MSH|^~\\&|A|B|C|D|20240105||ADT^A04|1|P|2.5.1\rPV1|1|O\r"
    assert not errors and process(channel, Message.from_bytes(raw)).message.get("PV1-2") == "OP"  # the snapshot's table
    [from_disk], _ = load_channels([tmp_path / "channels"])
    assert process(from_disk, Message.from_bytes(raw)).message.get("PV1-2") == "OUT"  # the disk's


def test_a_start_after_a_rollback_runs_the_snapshot_unless_told_from_files(tmp_path, monkeypatch):
    """The newest snapshot re-applies another (a rollback): a start runs that one again; with
    --from-files the files, and the rollback is over."""
    from hl7relay.snapshots import reapplied, take_snapshot
    from hl7relay.store.database import Store
    from hl7relay.yamlsource import set_environment

    (tmp_path / "channels").mkdir()
    (tmp_path / "environments").mkdir()
    (tmp_path / "environments" / "test.yaml").write_text("UNUSED: 1\n")
    (tmp_path / "channels" / "adt.yaml").write_text("name: adt\nsource: {type: mllp, port: 0}\n")
    store = Store(f"sqlite:///{tmp_path / 'data' / 'hl7relay.db'}")
    store.migrate()
    monkeypatch.chdir(tmp_path)  # the snapshot's paths as the engine, run there, names them
    set_environment("test", {"UNUSED": "1"})
    try:
        first = store.record_snapshot(take_snapshot(["channels"], "os:ana", "start", 1.0))
    finally:
        set_environment("", {})
    store.record_snapshot(reapplied(dict(store.snapshot(first)), "user:ana", "rollback", "INC-1", 2.0))
    (tmp_path / "channels" / "adt.yaml").write_text("name: adt\nsource: {type: mllp, port: 0}\n# changed\n")
    log = tmp_path / "engine.log"
    for extra, expected in (((), True), (("--from-files",), False)):
        log.write_text("")
        engine = start(tmp_path, log, *extra)
        try:
            wait_for(log, "ready; Ctrl-C", engine)
            assert ("configuration: rolled back to snapshot 1, not the channel files" in log.read_text()) is expected
        finally:
            stop(engine)
    rows = store.snapshots()
    assert [(r["id"], r["reason"], r["from_snapshot"]) for r in rows[:2]] == [(4, "start", None), (3, "start", 1)]
    assert "# changed" not in store.snapshot(3)["files"]["channels/adt.yaml"]
    assert "# changed" in store.snapshot(4)["files"]["channels/adt.yaml"]


def test_the_files_hash_and_compare_the_same_however_their_folder_is_named(tmp_path, monkeypatch):
    """The engine names its folder `channels` (from its settings), a command run later may name it
    `/srv/.../channels`: the promotion hash and the files-differ check must not see a difference."""
    from hl7relay.snapshots import differs_from_files, source_sha256, take_snapshot

    (tmp_path / "channels" / "lookups").mkdir(parents=True)
    (tmp_path / "channels" / "adt.yaml").write_text("name: adt\nsource: {type: mllp, port: 0}\n")
    (tmp_path / "channels" / "lookups" / "x.csv").write_text("I,IP\n")
    monkeypatch.chdir(tmp_path)
    snapshot = take_snapshot(["channels"], "os:ana", "start", 1.0)
    absolute = [str(tmp_path / "channels")]
    assert snapshot.source_sha256 == source_sha256(absolute) == source_sha256(["channels"])
    assert not differs_from_files({"files": snapshot.files}, absolute)
    (tmp_path / "channels" / "lookups" / "x.csv").write_text("I,IN\n")
    assert differs_from_files({"files": snapshot.files}, absolute)
