"""Promotion (issue #30): channel files that ran in test, with their tests green and no new error
class, cleared for prod; four eyes when prod asks for two approvals; a promoted_only engine runs
nothing else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

CHANNEL = ("name: adt\nsource: {type: mllp, port: 0}\n"
           "transformers:\n  - map: {path: PV1-2, table: {I: IP, O: OP}}\n"
           "destinations:\n  - {name: lab, type: mllp, host: 127.0.0.1, port: '${env:LAB_PORT}', retry_initial: 30}\n")
TESTS = ("cases:\n  - name: the class is mapped\n    message: |\n"
         "      MSH|^~\\&|PMS|CLINIC|LAB|LABFAC|20240105||ADT^A04^ADT_A01|T1|P|2.5.1\n      PID|1||1^^^H^MR||DOE^JANE\n"
         "      PV1|1|O\n    expect:\n      destinations:\n        lab: {PV1-2: OP}\n")


def hl7relay(folder: Path, *args, user: str = "ana"):
    env = dict(os.environ, USER=user, LOGNAME=user, PYTHONUNBUFFERED="1")
    env.pop("HL7RELAY_ENV", None)
    return subprocess.run([sys.executable, "-m", "hl7relay", *args], cwd=folder, capture_output=True, text=True,
                          timeout=120, env=env)


def run_engine(folder: Path, env: str, data: str, meanwhile=None) -> subprocess.CompletedProcess | None:
    """Start an engine, wait for it to be ready, (call ``meanwhile``,) stop it: None; or its output
    when it did not start."""
    log = folder / f"{data}.log"
    engine = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--env", env, "--channels", "channels",
                               "--data-dir", data, "--admin-port", "auto", "--console-port", "0"], cwd=folder,
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 60
    while "ready; Ctrl-C" not in log.read_text():
        if engine.poll() is not None:
            return subprocess.CompletedProcess(engine.args, engine.returncode, log.read_text(), "")
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    try:
        if meanwhile is not None:
            meanwhile()
    finally:
        engine.send_signal(signal.SIGTERM)
    assert engine.wait(timeout=60) == 0
    return None


def test_promote_needs_the_files_to_have_run_in_test_and_a_second_admin_when_prod_says_so(tmp_path):
    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "adt.yaml").write_text(CHANNEL)
    (tmp_path / "channels" / "adt.test.yaml").write_text(TESTS)
    (tmp_path / "environments").mkdir()
    (tmp_path / "environments" / "test.yaml").write_text("LAB_PORT: 2576\n")
    (tmp_path / "environments" / "prod.yaml").write_text("LAB_PORT: 2577\npromoted_only: true\napprovals: 2\n")
    evidence = ["--evidence-store", "sqlite:///test-data/hl7relay.db"]
    prod = ["--data-dir", "prod-data", "--channels", "channels"]

    never = hl7relay(tmp_path, "promote", "--from", "test", "--to", "prod", "--reason", "CHG-1", *prod,
                     "--evidence-store", "sqlite:///prod-data/hl7relay.db")
    assert never.returncode == 1 and "never ran in test" in never.stderr, never.stdout + never.stderr
    assert hl7relay(tmp_path, "promote", "--from", "test", "--to", "prod", *prod).returncode == 2  # no reason

    assert run_engine(tmp_path, "test", "test-data") is None  # the files run in test
    refused = run_engine(tmp_path, "prod", "prod-data")  # prod runs only what was promoted to it
    assert refused is not None and refused.returncode == 1
    assert "not starting: environment prod runs only promoted channel files" in refused.stdout

    (tmp_path / "channels" / "adt.test.yaml").write_text(TESTS.replace("PV1-2: OP", "PV1-2: OUT"))
    failing = hl7relay(tmp_path, "promote", "--from", "test", "--to", "prod", "--reason", "CHG-1", *prod, *evidence)
    assert failing.returncode == 1 and "channel test failed (test values)" in failing.stderr, failing.stderr
    (tmp_path / "channels" / "adt.test.yaml").write_text(TESTS)

    asked = hl7relay(tmp_path, "promote", "--from", "test", "--to", "prod", "--reason", "CHG-1", *prod, *evidence)
    assert asked.returncode == 0, asked.stdout + asked.stderr
    assert "ran in test: snapshot 1" in asked.stdout and "channel tests (test values): 1 case(s), 0 failed" in asked.stdout
    assert "promotion 1 waits for a second admin: hl7relay promote --approve 1" in asked.stdout
    waiting = run_engine(tmp_path, "prod", "prod-data")
    assert waiting is not None and "promotion 1 waits for approval" in waiting.stdout
    same = hl7relay(tmp_path, "promote", "--approve", "1", "--reason", "looks fine", *prod)
    assert same.returncode == 1 and "another admin approves it (four eyes)" in same.stderr
    other = hl7relay(tmp_path, "promote", "--approve", "1", "--reason", "reviewed CHG-1", *prod, user="bob")
    assert other.returncode == 0 and "promotion 1 approved" in other.stdout, other.stdout + other.stderr
    def change_and_reload():  # prod runs; a change not promoted is not reloaded either
        (tmp_path / "channels" / "adt.yaml").write_text(CHANNEL.replace("O: OP", "O: OUT"))
        reload = hl7relay(tmp_path, "reload", "--data-dir", "prod-data", "--env", "prod")
        assert reload.returncode == 1 and "were not promoted to it" in reload.stderr, reload.stdout + reload.stderr
        assert "nothing changed" in reload.stderr

    assert run_engine(tmp_path, "prod", "prod-data", change_and_reload) is None  # promoted: prod starts
    listed = hl7relay(tmp_path, "promote", "--list", *prod)
    assert "test -> prod" in listed.stdout and "approved" in listed.stdout and "by os:ana approved by os:bob" in listed.stdout

    # the change did not run in test: it is not promoted, and prod does not start with it
    changed = hl7relay(tmp_path, "promote", "--from", "test", "--to", "prod", "--reason", "CHG-2", *prod, *evidence)
    assert changed.returncode == 1 and "never ran in test" in changed.stderr
    assert run_engine(tmp_path, "prod", "prod-data") is not None
    import sqlite3

    with sqlite3.connect(tmp_path / "prod-data" / "hl7relay.db") as connection:
        audit = list(connection.execute("SELECT action, actor, target, reason, result FROM audit_log "
                                        "WHERE action LIKE 'config.promote%' ORDER BY id"))
    assert audit == [("config.promote", "os:ana", "promotion 1", "CHG-1", "pending"),
                     ("config.promote.approve", "os:bob", "promotion 1", "reviewed CHG-1", "ok")]


def test_a_new_error_class_in_test_refuses_the_promotion(tmp_path):
    """Errors seen under earlier snapshots are known; a kind the promoted files brought is not."""
    from hl7relay.environments import Environment
    from hl7relay.promotion import gather_evidence
    from hl7relay.snapshots import take_snapshot
    from hl7relay.store.database import MessageRecord, Store
    from hl7relay.yamlsource import set_environment

    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "adt.yaml").write_text(CHANNEL)
    test, prod = Environment("test", "t", {"LAB_PORT": "2576"}), Environment("prod", "p", {"LAB_PORT": "2577"})
    store = Store(f"sqlite:///{tmp_path / 'test.db'}")
    store.migrate()
    set_environment("test", test.values)
    try:
        old = store.record_snapshot(take_snapshot([tmp_path / "channels"], "os:ana", "start", 1.0))
        (tmp_path / "channels" / "adt.yaml").write_text(CHANNEL + "# v2\n")
        new = store.record_snapshot(take_snapshot([tmp_path / "channels"], "os:ana", "reload", 2.0))
    finally:
        set_environment("", {})

    def message(snapshot_id, control_id, error):
        return MessageRecord("adt", b"MSH|^~\\&|A|B|||1||ADT^A04|" + control_id.encode() + b"|P|2.5\r", "ERROR", 1.0,
                             error=error, control_id=control_id, snapshot_id=snapshot_id)

    store.commit([message(old, "M1", "PID-7 '19900101x' is not a date")], [])
    store.commit([message(new, "M2", "PID-7 '1985-01-01' is not a date")], [])  # the same class
    evidence = gather_evidence([tmp_path / "channels"], test, prod, store)
    assert evidence.snapshots == [new] and evidence.messages == 1 and evidence.problems() == []
    store.commit([message(new, "M3", "segment ZZ1 at 4 is not allowed here")], [])
    evidence = gather_evidence([tmp_path / "channels"], test, prod, store)
    assert evidence.problems() == ["new error class in test (1x): adt: segment ZZN at N is not allowed here"]
