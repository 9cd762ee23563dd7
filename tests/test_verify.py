"""hl7relay verify: each check finds what it is for, --repair fixes only the safe things, exit codes for monitoring."""

import json
import textwrap
import time

import pytest
import sqlalchemy as sa

from hl7relay.cli import main
from hl7relay.store.database import DeliveryRecord, MessageRecord, Store, schema_version
from hl7relay.store.schema import MIGRATIONS, deliveries
from hl7relay.store.verify import OK, PROBLEM, SKIPPED, WARNING, repair, verify

ADT = "MSH|^~\\&|PMS|CLINIC|HL7RELAY|LAB|20240105||ADT^A08^ADT_A01|{id}|P|2.5.1\rPID|1||7^^^H^MR||DOE^JANE\rPV1|1|O\r"


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "adt.yaml").write_text(textwrap.dedent("""\
        name: adt
        source: {type: mllp, port: 12900}
        transformers: [{set: {path: MSH-5, value: LAB}}]
        destinations: [{name: lab, type: mllp, host: 127.0.0.1, port: 12901}]
        duplicates: {window: 3600}
        """))
    store = Store(f"sqlite:///{tmp_path / 'data' / 'hl7relay.db'}")
    store.migrate()
    yield tmp_path, store
    store.close()


def add(store, control_id, *, channel="adt", destination="lab", status="PROCESSED", delivery="SENT", ack="AA",
        key=None, received_at=None, stages_kept=("ack", "transformed"), next_attempt_at=None):
    raw = ADT.format(id=control_id).encode()
    record = MessageRecord(channel, raw, status, received_at or time.time(), control_id=control_id, ack_code=ack,
                           duplicate_key=key, deliveries=[DeliveryRecord(destination, delivery, None)] if delivery else [])
    for stage in stages_kept:
        record.stages[stage] = raw
    [message_id] = store.commit([record], [])
    if next_attempt_at is not None:
        with store.engine.begin() as connection:
            connection.execute(deliveries.update().where(deliveries.c.message_id == message_id)
                               .values(next_attempt_at=next_attempt_at))
    return message_id


def cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def by_name(checks):
    return {c.name: c for c in checks}


def test_a_sound_store_passes_every_check(env, capsys):
    _, store = env
    add(store, "A", key="PMS|A")
    add(store, "B", delivery="QUEUED", key="PMS|B")
    code, out, _ = cli(capsys, "verify")
    assert code == 0, out
    assert "OK       backend integrity" in out and "SQLite quick_check: ok" in out and "every check ok" in out
    assert all(line.startswith(("OK ", "data/", "sqlite")) for line in out.strip().splitlines()), out
    data = json.loads(cli(capsys, "verify", "--format", "json", "--full")[1])
    assert data["status"] == "ok" and "integrity_check" in data["checks"][0]["detail"]
    assert [c["name"] for c in data["checks"]] == [
        "backend integrity", "schema version", "deliveries of missing messages", "stages of missing messages",
        "file places of missing messages", "queued for undeclared destinations", "duplicates within the window",
        "stages the channels keep", "overdue deliveries", "file ledger"]


def test_each_check_finds_what_it_is_for_and_repair_fixes_only_the_safe_ones(env, capsys):
    tmp_path, store = env
    now = time.time()
    gone = add(store, "GONE", delivery="QUEUED")
    kept = add(store, "KEPT")
    import sqlite3

    outside = sqlite3.connect(tmp_path / "data" / "hl7relay.db")  # a message deleted outside the engine, without
    with outside:  # foreign keys (SQLite's default): its rows stay behind
        outside.execute("DELETE FROM messages WHERE id = ?", (gone,))
    outside.close()
    stray = [add(store, f"S{i}", destination="old-lab", delivery="QUEUED") for i in range(3)]
    other = add(store, "O1", channel="retired", destination="x", delivery="QUEUED")
    add(store, "D1", key="PMS|D1")
    add(store, "D2", key="PMS|D1")  # the same key again within the hour, not marked DUPLICATE
    add(store, "D3", key="PMS|D3", received_at=now - 7200)
    add(store, "D4", key="PMS|D3")  # outside the window: not a finding
    no_ack = add(store, "NA", stages_kept=("transformed",))
    late = add(store, "LATE", delivery="QUEUED", next_attempt_at=now - 2 * 3600)
    from hl7relay.store.database import FileSeenUpdate

    store.commit([], [FileSeenUpdate("adt", "file:///in", "stuck.hl7", 10, 1.0, "c" * 64, now - 2 * 3600)])
    checks = by_name(verify(store, _channels(tmp_path), now))
    assert checks["backend integrity"].status == OK  # the file is sound; what is in it is not
    stuck = checks["file ledger"]
    assert stuck.status == WARNING and "adt/stuck.hl7 (2.0 h)" in stuck.detail
    orphans = checks["deliveries of missing messages"]
    assert orphans.status == PROBLEM and orphans.count == 1 and orphans.sample == [gone] and orphans.key
    assert checks["stages of missing messages"].count == 2  # ack and transformed
    undeclared = checks["queued for undeclared destinations"]
    assert undeclared.status == PROBLEM and undeclared.count == 4 and "adt/old-lab: 3" in undeclared.detail
    assert "retired/x: 1" in undeclared.detail
    duplicates = checks["duplicates within the window"]
    assert duplicates.status == WARNING and "adt: 1" in duplicates.detail and not duplicates.key
    missing = checks["stages the channels keep"]
    assert missing.status == WARNING and no_ack in missing.sample and "without 'ack'" in missing.detail
    overdue = checks["overdue deliveries"]
    assert overdue.status == WARNING and overdue.count == 1 and "adt/lab: 1, the oldest 2.0 h late" in overdue.detail
    code, out, _ = cli(capsys, "verify")
    assert code == 2 and "--repair would delete the 1 delivery row" in out and "move them to ERROR" in out
    code, out, _ = cli(capsys, "verify", "--repair")
    assert out.startswith("repairing:\n") and "deleted 1 row" in out and "moved 4 deliveries to ERROR" in out
    assert code == 1  # what is left are warnings: nothing safe can be done about them
    after = by_name(verify(store, _channels(tmp_path), time.time()))
    for name in ("backend integrity", "deliveries of missing messages", "stages of missing messages",
                 "queued for undeclared destinations"):
        assert after[name].status == OK, (name, after[name].detail)
    assert store.get_message(stray[0])["deliveries"][0]["status"] == "ERROR"
    assert "no longer declared by channel adt" in store.get_message(stray[0])["deliveries"][0]["last_error"]
    assert store.get_message(other)["deliveries"][0]["status"] == "ERROR"
    assert store.get_message(late)["deliveries"][0]["status"] == "QUEUED"  # a declared queue's: untouched
    assert store.get_message(kept)["deliveries"][0]["status"] == "SENT"
    [entry] = store.audit_entries(action="store.repair")
    assert entry["actor"].startswith("os:") and "deleted 1 row" in entry["detail"] and "moved 4" in entry["detail"]
    assert store.dead_letters(channel="adt")[0]["count"] == 3  # listed as dead letters, replayable


def test_an_old_schema_is_reported_then_migrated_and_a_newer_one_is_a_problem(env, capsys):
    _, store = env
    with store.engine.begin() as connection:
        connection.execute(schema_version.delete().where(schema_version.c.version >= 9))
        connection.exec_driver_sql("ALTER TABLE audit_log DROP COLUMN role")
        connection.exec_driver_sql("DROP INDEX ix_audit_log_at")
    code, out, _ = cli(capsys, "verify")
    assert code == 2 and "WARNING  schema version" in out and "--repair would apply migrations 9: audit log" in out
    code, out, _ = cli(capsys, "verify", "--repair")
    assert f"schema version: migrated to {MIGRATIONS[-1][0]}" in out and code == 0, out
    with store.engine.begin() as connection:
        connection.execute(schema_version.insert().values(version=99))
    code, out, _ = cli(capsys, "verify")
    assert code == 2 and "written by a newer hl7relay" in out


def test_channel_files_with_problems_skip_the_checks_that_need_them(env, capsys):
    tmp_path, store = env
    (tmp_path / "channels" / "bad.yaml").write_text("name: bad\nfitlers: []\n")
    code, out, _ = cli(capsys, "verify")
    # a skipped check is not a passed one: it ended "every check ok" with exit 0
    assert code == 1 and "SKIPPED  queued for undeclared destinations" in out and "hl7relay lint" in out
    assert "every check ok" not in out and out.strip().splitlines()[-1].endswith(
        "the checks that ran are ok; 3 skipped (queued for undeclared destinations, duplicates within the window, "
        "stages the channels keep)")
    assert verify(store, None, time.time())[5].status == SKIPPED


def test_an_ordinary_replay_is_no_warning(env, capsys):
    """A replay has no transformed stage of its own: verify warned about every one."""
    _, store = env
    original = add(store, "A", key="PMS|A", delivery="ERROR")
    code, out, _ = cli(capsys, "replay", str(original), "--reason", "lab fixed")
    assert code == 0, out
    code, out, _ = cli(capsys, "verify")
    assert code == 0 and "every check ok" in out, out


def test_no_store_and_wrong_arguments(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "verify")
    assert code == 3 and "no store at data/hl7relay.db" in err and not out
    code, _, err = cli(capsys, "verify", "--store", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert code == 3 and "cannot open the store" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:
        main(["verify", "--hours", "-2"])
    assert exit_.value.code == 2


def test_postgresql_catalog_check(postgres_url):
    store = Store(postgres_url)
    store.migrate()
    checks = by_name(verify(store, [], time.time()))
    assert checks["backend integrity"].status == OK and "every table and index present" in checks["backend integrity"].detail
    with store.engine.begin() as connection:
        connection.exec_driver_sql("DROP INDEX ix_messages_patient_id")
    check = by_name(verify(store, [], time.time()))["backend integrity"]
    assert check.status == PROBLEM and "missing indexes (searches that need them read whole tables): " \
        "ix_messages_patient_id" in check.detail and check.key == "indexes"
    assert repair(store, [check], time.time()) == ["backend integrity: created ix_messages_patient_id"]
    assert by_name(verify(store, [], time.time()))["backend integrity"].status == OK
    store.close()


def test_a_missing_index_is_found_and_made_again_on_sqlite(env, capsys):
    _, store = env
    with store.engine.begin() as connection:
        connection.exec_driver_sql("DROP INDEX ix_deliveries_dead")
    code, out, _ = cli(capsys, "verify")
    assert code == 2 and "missing indexes (searches that need them read whole tables): ix_deliveries_dead" in out
    code, out, _ = cli(capsys, "verify", "--repair")
    assert code == 0 and "created ix_deliveries_dead" in out


@pytest.fixture
def postgres_url():
    """A schema of its own in the test database, dropped after."""
    import os
    import uuid

    base = os.environ.get("HL7RELAY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    schema = f"verify_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(base)
    try:
        with admin.begin() as connection:
            connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    except sa.exc.OperationalError as exc:
        admin.dispose()
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {base} ({exc.orig}); .ci/run starts it")
        pytest.skip(f"PostgreSQL is not reachable at {base}")
    yield base + ("&" if "?" in base else "?") + f"options=-csearch_path%3D{schema}"
    with admin.begin() as connection:
        connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    admin.dispose()


def _channels(tmp_path):
    from hl7relay.channels import load_channels

    channels, errors = load_channels([str(tmp_path / "channels")])
    assert not errors
    return channels
