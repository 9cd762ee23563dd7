"""The store on SQLite and on PostgreSQL (127.0.0.1:5432, database test), and group commit."""

import os

import pytest
import sqlalchemy as sa
from twisted.internet import defer

from hl7relay.store.database import (MIGRATIONS, WAL_CHECKPOINT_PAGES, WAL_SIZE_LIMIT_BYTES, DeliveryRecord, DeliveryUpdate,
                                     MessageRecord, Store, StoreError, schema_version)
from hl7relay.store.schema import metadata
from hl7relay.store.writer import StoreWriter

POSTGRES_URL = os.environ.get("HL7RELAY_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _postgres_store():
    store = Store(POSTGRES_URL)
    try:
        with store.engine.begin() as connection:
            # every table of the schema, ours or not: one left by another version of hl7relay (a
            # foreign key to messages) would stop metadata's own drop
            for table in sa.inspect(connection).get_table_names():
                connection.exec_driver_sql(f'DROP TABLE IF EXISTS "{table}" CASCADE')
    except sa.exc.OperationalError as exc:
        store.close()
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_URL} ({exc.orig}); .ci/run starts it")
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES_URL}")
    return store




def record(control_id="M1", raw=b"MSH|^~\\&|A|B\rPID|1\r", **kw):
    values = dict(channel="adt", raw=raw, status="PROCESSED", control_id=control_id, message_type="ADT^A01",
                  patient_id="100234", sending_facility="CLINIC", received_at=1700000000.0)
    values.update(kw)
    return MessageRecord(**values)


def test_migrations_are_versioned_and_idempotent(store):
    assert store.schema_version() == MIGRATIONS[-1][0]
    assert store.migrate() == MIGRATIONS[-1][0]  # again: nothing to do
    with store.engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(schema_version)).scalar() == len(MIGRATIONS)


def test_messages_stages_and_deliveries_round_trip(store):
    raw = b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|M1|P|2.5|||||8859/1\rPID|1||1||M\xfcller\r"
    r = record(raw=raw, stages={"transformed": b"MSH|x", "ack": b"MSH|ack"},
               deliveries=[DeliveryRecord("lab", "QUEUED", b"MSH|lab"), DeliveryRecord("archive", "FILTERED")])
    [message_id] = store.commit([r], [])
    stored = store.get_message(message_id)
    assert stored["raw"] == raw and stored["control_id"] == "M1" and stored["status"] == "PROCESSED"
    assert stored["stages"] == {"transformed": b"MSH|x", "ack": b"MSH|ack", "destination:lab": b"MSH|lab"}
    assert [(d["destination"], d["status"], d["attempts"]) for d in stored["deliveries"]] == [
        ("lab", "QUEUED", 0), ("archive", "FILTERED", 0)]
    store.commit([], [("delivery", (message_id, "lab"), {"status": "SENT", "attempts": 1, "last_ack": "AA", "updated_at": 2.0}),
                         ("message", message_id, {"ack_code": "AA"}), ("stage", (message_id, "ack"), b"MSH|ack2")])
    stored = store.get_message(message_id)
    assert stored["deliveries"][0]["status"] == "SENT" and stored["ack_code"] == "AA" and stored["stages"]["ack"] == b"MSH|ack2"


def test_one_transaction_per_batch_keeps_order(store):
    ids = store.commit([record(f"M{i}") for i in range(50)], [])
    assert ids == sorted(ids) and len(set(ids)) == 50
    assert store.count(channel="adt") == 50 and [m["control_id"] for m in store.latest(3)] == ["M49", "M48", "M47"]


def test_a_failed_batch_writes_nothing(store):
    bad = record("BAD")
    bad.status = None  # NOT NULL: the database refuses it
    with pytest.raises(StoreError):
        store.commit([record("GOOD"), bad], [])
    assert store.count() == 0


def test_search_columns_are_indexed(store):
    names = {ix["name"] for ix in sa.inspect(store.engine).get_indexes("messages")}
    assert {"ix_messages_channel_time", "ix_messages_status_time", "ix_messages_control_id",
            "ix_messages_patient_id"} <= names
    assert "ix_messages_duplicate_key" in names
    assert {ix["name"] for ix in sa.inspect(store.engine).get_indexes("deliveries")} == {
        "ix_deliveries_queued", "ix_deliveries_message_destination", "ix_deliveries_dead",
        "ix_deliveries_partition"}  # migration 4 dropped two; 20: a cluster's partitions
    assert "ix_messages_replay_of" in names


def test_dead_letters_are_grouped_and_a_replay_takes_them_off_the_list(store):
    store.commit([record(f"D{i}", deliveries=[DeliveryRecord("lab", "QUEUED", b"MSH|x")]) for i in range(5)], [])
    ids = [r["message_id"] for r in store.queued_deliveries("adt", "lab")]
    errors = ["AE: unknown patient", "AE: unknown patient", "gave up after 10 attempts", "AE: unknown patient"]
    store.commit([], [DeliveryUpdate(i, "lab", {"status": "ERROR", "last_error": e, "updated_at": 1000.0 + n})
                      for n, (i, e) in enumerate(zip(ids, errors))])
    groups = store.dead_letters()
    assert [(g["channel"], g["destination"], g["error"], g["count"]) for g in groups] == [
        ("adt", "lab", "AE: unknown patient", 3), ("adt", "lab", "gave up after 10 attempts", 1)]
    assert groups[0]["first_seen"] == 1000.0 and groups[0]["last_seen"] == 1003.0
    assert store.dead_letter_ids("adt", "lab", "AE: unknown patient") == [ids[0], ids[1], ids[3]]
    assert store.dead_letter_ids("adt", "lab") == ids[:4] and store.dead_letter_ids("other", "lab") == []
    assert store.dead_letters(channel="other") == []
    store.commit([], [DeliveryUpdate(ids[0], "lab", {"status": "REPLAYED", "updated_at": 2000.0})])
    assert store.dead_letters()[0]["count"] == 2


def test_the_queue_reads_what_waits_in_order_and_only_what_it_does_not_hold(store):
    store.commit([record(f"M{i}", deliveries=[DeliveryRecord("lab", "QUEUED" if i % 2 else "FILTERED", b"MSH|x")])
                  for i in range(6)], [])
    queued = [r["message_id"] for r in store.queued_deliveries("adt", "lab")]
    assert len(queued) == 3 and queued == sorted(queued)
    assert store.queue_depth("adt", "lab") == 3
    assert [r["message_id"] for r in store.queued_deliveries("adt", "lab", skip={queued[0], queued[2]})] == [queued[1]]
    assert [r["message_id"] for r in store.queued_deliveries("adt", "lab", after_id=queued[0])] == queued[1:]
    assert [r["message_id"] for r in store.queued_deliveries("adt", "lab", limit=2)] == queued[:2]
    assert store.queued_deliveries("adt", "lab", skip=set(queued)) == []
    assert store.queued_deliveries("other", "lab") == []  # another channel's destination of that name
    assert {r["content"] for r in store.queued_deliveries("adt", "lab")} == {b"MSH|x"}


def test_the_queue_reads_its_backlog_in_order_from_the_partial_index(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'queue.db'}")
    store.migrate()
    store.commit([record(f"M{i}", deliveries=[DeliveryRecord("lab", "QUEUED" if i % 2 else "FILTERED", b"MSH|x")])
                  for i in range(6)], [])
    assert [r["message_id"] for r in store.queued_deliveries("adt", "lab")] == [2, 4, 6]
    from sqlalchemy.dialects import sqlite as sqlite_dialect

    from hl7relay.store.deliveries import _QUEUED_IDS
    compiled = _QUEUED_IDS.compile(dialect=sqlite_dialect.dialect())
    values = compiled.construct_params({"destination": "lab", "channel": "adt", "after_id": -1, "limit": 200})
    with store.engine.connect() as connection:
        plan = " ".join(row[-1] for row in connection.exec_driver_sql(
            "EXPLAIN QUERY PLAN " + str(compiled), tuple(values[name] for name in compiled.positiontup)))
    assert "ix_deliveries_queued" in plan and "TEMP B-TREE" not in plan  # no sort of the backlog
    store.close()


def test_delivery_updates_find_their_row_by_index(tmp_path):
    # the planner once chose the destination index and scanned the destination's whole history
    store = Store(f"sqlite:///{tmp_path / 'plan.db'}")
    store.migrate()
    with store.engine.connect() as connection:
        plan = connection.exec_driver_sql(
            "EXPLAIN QUERY PLAN UPDATE deliveries SET status = 'SENT' WHERE message_id = 1 AND destination = 'lab'").all()
    assert "ix_deliveries_message_destination (message_id=? AND destination=?)" in plan[0][-1]
    store.close()


def test_one_delivery_row_per_destination(store):
    [message_id] = store.commit([record(deliveries=[DeliveryRecord("lab", "QUEUED", b"MSH|x")])], [])
    with pytest.raises(sa.exc.IntegrityError):
        with store.engine.begin() as connection:
            connection.execute(sa.insert(metadata.tables["deliveries"]).values(
                message_id=message_id, destination="lab", status="QUEUED", attempts=0, last_ack="", last_error="",
                updated_at=0.0))


def test_duplicate_lookups_use_the_partial_index_of_keyed_messages(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'dup.db'}")
    store.migrate()
    store.commit([record("A", duplicate_key="k1"), record("B")], [])
    assert store.find_original("adt", "k1", 0)["id"] == 1 and store.find_original("adt", "k2", 0) is None
    with store.engine.connect() as connection:
        plan = connection.exec_driver_sql(
            "EXPLAIN QUERY PLAN SELECT id FROM messages WHERE channel = ? AND duplicate_key = ? AND received_at >= ?",
            ("adt", "k1", 0)).all()
        keyed = connection.exec_driver_sql("SELECT count(*) FROM messages INDEXED BY ix_messages_duplicate_key "
                                           "WHERE duplicate_key IS NOT NULL").scalar()
    assert "ix_messages_duplicate_key" in plan[0][-1] and keyed == 1
    store.close()


def test_sqlite_is_durable(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'd.db'}")
    store.migrate()
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    store.commit([record("C1")], [])  # the group commit's own connection has the same settings
    committing = store._sqlite_batch._connection
    assert committing.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert committing.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WAL_CHECKPOINT_PAGES > 1000  # not the 4 MB default
    assert committing.execute("PRAGMA journal_size_limit").fetchone()[0] == WAL_SIZE_LIMIT_BYTES
    assert store.display_url == f"sqlite:///{tmp_path / 'd.db'}"
    store.close()


def test_display_url_hides_passwords():
    assert "s3cret" not in Store("postgresql+psycopg://u:s3cret@127.0.0.1:1/x").display_url


# -- group commit --------------------------------------------------------------------------------
def test_concurrent_writes_share_one_commit(tmp_path, manual_executor):
    store = Store(f"sqlite:///{tmp_path / 'g.db'}")
    store.migrate()
    executor = manual_executor
    writer = StoreWriter(store, executor=executor)
    ids = []
    writer.write(record("A")).addCallback(ids.append)
    for name in ("B", "C", "D"):  # arrive while A's commit is on disk
        writer.write(record(name)).addCallback(ids.append)
    assert len(executor.calls) == 1 and len(executor.calls[0][1][0]) == 1
    executor.run()
    assert len(executor.calls) == 1 and [r.control_id for r in executor.calls[0][1][0]] == ["B", "C", "D"]
    assert ids and len(ids) == 1  # B, C, D are not durable yet: not answered yet
    executor.run()
    assert len(ids) == 4 and writer.batches == 2 and writer.largest_batch == 3


def test_sqlite_commit_overlaps_the_next_batch(tmp_path):
    """The batch's statements run on the reactor thread; only its COMMIT is handed off (by
    hand here; a thread in the engine). Until it returns nothing is answered, nobody else sees
    the rows, and the next records wait for the following batch."""
    from twisted.internet import task

    store = Store(f"sqlite:///{tmp_path / 'o.db'}")
    store.migrate()
    clock = task.Clock()
    commits = []  # the COMMITs handed off, each run when the test says

    def runner(fn):
        d = defer.Deferred()
        commits.append((fn, d))
        return d

    writer = StoreWriter(store, clock, commit_runner=runner)
    assert writer.inline
    ids = []
    writer.write(record("A")).addCallback(ids.append)
    clock.advance(0)
    assert len(commits) == 1 and not ids
    writer.write(record("B")).addCallback(ids.append)  # arrives while A's COMMIT is on disk
    writer.write(record("C")).addCallback(ids.append)
    clock.advance(0)
    assert len(commits) == 1  # B and C wait for A's COMMIT: one transaction at a time
    other = Store(f"sqlite:///{tmp_path / 'o.db'}")
    assert other.count() == 0  # written, not committed: not visible, not answered
    fn, d = commits.pop()
    d.callback(fn())
    assert len(ids) == 1 and other.count() == 1
    assert len(commits) == 1  # B and C went in the next batch at once
    fn, d = commits.pop()
    d.callback(fn())
    assert len(ids) == 3 and other.count() == 3 and writer.batches == 2 and writer.largest_batch == 2
    assert ids == sorted(ids)
    other.close()
    writer.close()


def test_a_failed_overlapped_commit_is_retried_one_record_at_a_time(tmp_path):
    from twisted.internet import task

    store = Store(f"sqlite:///{tmp_path / 'f.db'}")
    store.migrate()
    clock = task.Clock()
    commits = []

    def runner(fn):
        d = defer.Deferred()
        commits.append((fn, d))
        return d

    writer = StoreWriter(store, clock, commit_runner=runner)
    writer._busy = True  # both records in one batch
    ids, failures = [], []
    writer.write(record("A")).addCallbacks(ids.append, failures.append)
    writer.write(record("B")).addCallbacks(ids.append, failures.append)
    writer._busy = False
    writer._flush()
    [(fn, d)] = commits
    # the COMMIT fails as on a full disk: finish() rolls back and raises StoreError
    store._batch()._connection.rollback()
    d.errback(StoreError("store commit failed: OperationalError: disk I/O error"))
    # each record is then tried alone, committed in full, and answered with its own id
    assert failures == [] and len(ids) == 2 and store.count() == 2
    assert writer.commit_failure is None
    writer.close()


def test_one_bad_record_does_not_fail_its_batch(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'p.db'}")
    store.migrate()
    writer = StoreWriter(store, executor=lambda fn, *a: defer.maybeDeferred(fn, *a))
    writer._busy = True  # hold the queue so both land in one batch
    good, bad = [], []
    writer.write(record("GOOD")).addCallback(good.append)
    poison = record("BAD")
    poison.status = None
    writer.write(poison).addErrback(lambda f: bad.append(f.check(StoreError)))
    writer._busy = False
    writer._flush()
    assert good and bad == [StoreError]
    assert store.count() == 1


def test_lazy_updates_ride_with_the_next_messages_or_go_after_their_delay(tmp_path):
    from twisted.internet import task

    store = Store(f"sqlite:///{tmp_path / 'lazy.db'}")
    store.migrate()
    clock = task.Clock()
    commits = []
    real_commit = store.commit

    def counting_commit(records, updates):
        commits.append((len(records), len(updates)))
        return real_commit(records, updates)

    store.commit = counting_commit
    writer = StoreWriter(store, clock, executor=lambda fn, *a: defer.maybeDeferred(fn, *a), lazy_delay=0.05)
    ids = []
    writer.write(record("A", deliveries=[DeliveryRecord("lab", "QUEUED", b"MSH|x")])).addCallback(ids.append)
    clock.advance(0)
    [message_id] = ids
    sent = ("delivery", (message_id, "lab"), {"status": "SENT", "attempts": 1})
    recorded = []
    writer.update(sent, lazy=True).addCallback(recorded.append)
    clock.advance(0.01)
    assert commits == [(1, 0)] and not recorded  # waiting for company
    writer.write(record("B"))
    clock.advance(0)
    assert commits == [(1, 0), (1, 1)] and recorded == [None]  # rode along with B
    writer.update(("delivery", (message_id, "lab"), {"attempts": 2}), lazy=True).addCallback(recorded.append)
    clock.advance(0.049)
    assert len(commits) == 2
    clock.advance(0.002)
    assert commits[-1] == (0, 1) and len(recorded) == 2  # alone, once its delay passed
    writer.update(("delivery", (message_id, "lab"), {"attempts": 3}), lazy=True)
    closed = []
    writer.drain().addCallback(closed.append)  # shutting down: no waiting for the timer
    assert commits[-1] == (0, 1) and len(commits) == 4 and closed == [None]
    assert store.get_message(message_id)["deliveries"][0]["attempts"] == 3


def test_undecodable_bytes_in_indexed_fields_are_stored_losslessly_and_searchable(store):
    """A stray Latin-1 byte in a UTF-8 message (no MSH-18) once failed the commit for ever
    ('surrogates not allowed'), so the sender was answered AR again and again."""
    from hl7relay.hl7.message import Message

    raw = b"MSH|^~\\&|PMS\xe9|CLINIC|A|B|20240101||ADT^A01|CTL\xe9\x00|P|2.5\rPID|1||P\xff42^^^H^MR\r"
    m = Message.from_bytes(raw)
    assert m.decode_problems  # the bytes did not decode; they are kept
    [message_id] = store.commit([record(control_id=m.control_id, patient_id=m.get("PID-3.1"), raw=raw,
                                        sending_application=m.get("MSH-3"), error=f"bad {m.control_id}",
                                        deliveries=[DeliveryRecord("lab", "QUEUED", order_key=m.get("PID-3.1"))])], [])
    stored = store.get_message(message_id)
    assert stored["raw"] == raw  # the bytes themselves
    assert stored["control_id"] == "CTL\\xe9\\x00" and stored["patient_id"] == "P\\xff42"
    # found by the value as the message holds it, and as a person types it
    for control_id in (m.control_id, "CTL\\xe9\\x00"):
        assert [r["id"] for r in store.search(control_id=control_id)] == [message_id]
    assert [r["id"] for r in store.search(patient_id=m.get("PID-3.1"))] == [message_id]
    store.commit([], [("delivery", (message_id, "lab"), {"last_error": f"peer said {m.control_id}"})])
    assert store.get_message(message_id)["deliveries"][0]["last_error"] == "peer said CTL\\xe9\\x00"


def test_a_new_sqlite_store_is_private_to_its_user(tmp_path):
    """The store, its WAL/SHM files and the data folder were created 0644/0755: any local user
    could read every message."""
    import stat

    old = os.umask(0o022)  # a typical login umask: the store must not depend on it
    try:
        store = Store(f"sqlite:///{tmp_path / 'data' / 'deep' / 'hl7relay.db'}")
        store.migrate()
        store.commit([record()], [])
        folder = tmp_path / "data" / "deep"
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
        assert modes == {"hl7relay.db": 0o600, "hl7relay.db-wal": 0o600, "hl7relay.db-shm": 0o600}, modes
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
        store.close()
    finally:
        os.umask(old)


def test_a_store_that_must_exist_is_not_created(tmp_path):
    with pytest.raises(StoreError, match="no store at"):
        Store(f"sqlite:///{tmp_path / 'nothing' / 'hl7relay.db'}", create=False)
    assert not (tmp_path / "nothing").exists()


def test_files_readable_by_others_are_found(tmp_path):
    from hl7relay.store.database import readable_by_others

    os.chmod(tmp_path, 0o700)
    url = f"sqlite:///{tmp_path / 'hl7relay.db'}"
    Store(url).close()
    assert readable_by_others(url) == []
    os.chmod(tmp_path / "hl7relay.db", 0o644)
    assert any(f.startswith(str(tmp_path / "hl7relay.db")) and "0o644" in f for f in readable_by_others(url))


def test_sqlite_and_postgresql_store_the_same_rows_from_the_same_batches(tmp_path):
    """One row builder for both backends: the same batches (messages with stages and deliveries,
    delivery/message/stage updates, audit entries, odd bytes) leave the same rows in each."""
    from hl7relay.store.database import AuditUpdate, DeliveryUpdate, MessageUpdate, StageUpdate
    from hl7relay.store.schema import audit_log, deliveries, messages, stages

    sqlite = Store(f"sqlite:///{tmp_path / 'a.db'}")
    postgres = _postgres_store()
    batches = [
        ([record("B1", deliveries=[DeliveryRecord("lab", "QUEUED", b"MSH|lab", "P1"), DeliveryRecord("files", "FILTERED")],
                 stages={"transformed": b"MSH|t"}),
          record("B2\udce9", patient_id="P\x002", error="it's 'bad'", duplicate_key="k1")], []),
        ([record("B3", received_at=1700000100.0, deliveries=[DeliveryRecord("lab", "QUEUED", None, "P3")])],
         [DeliveryUpdate(1, "lab", {"status": "SENT", "attempts": 1, "last_ack": "MSH|ack\rMSA|AA|B1", "updated_at": 2.0}),
          MessageUpdate(2, {"ack_code": "AE", "error": "now \udcff"}),
          StageUpdate(1, "ack", b"MSH|first"), StageUpdate(1, "ack", b"MSH|second"),
          AuditUpdate({"at": 5.0, "actor": "os:me", "action": "replay", "target": "message 1", "reason": "why"})]),
        ([], [("delivery", (3, "lab"), {"status": "ERROR", "last_error": "gave up", "next_attempt_at": None, "updated_at": 3.0})]),
    ]
    try:
        for store in (sqlite, postgres):
            store.migrate()
            for records, updates in batches:
                store.commit(records, updates)
        def dump(store):
            with store.engine.connect() as connection:
                return {table.name: [tuple(row) for row in connection.execute(
                            sa.select(*[c for c in table.columns if c.name != "id" or table is messages])
                            .order_by(*table.primary_key.columns))]
                        for table in (messages, stages, deliveries, audit_log)}
        left, right = dump(sqlite), dump(postgres)
        for table in left:
            assert left[table] == right[table], table
        assert len(left["messages"]) == 3 and len(left["audit_log"]) == 1
        assert [r for r in left["message_stages"] if r[1] == "ack"] == [(1, "ack", b"MSH|second")]
    finally:
        sqlite.close()
        postgres.close()


def test_a_failing_batch_is_a_store_error_and_the_store_carries_on(store):
    twice = record("F1", deliveries=[DeliveryRecord("lab", "QUEUED", b"MSH|x"), DeliveryRecord("lab", "QUEUED", b"MSH|x")])
    with pytest.raises(StoreError):  # two deliveries of one message to one destination: the unique index refuses
        store.commit([twice], [])
    assert store.count() == 0  # all of the batch or nothing
    [message_id] = store.commit([record("F2")], [])
    assert store.get_message(message_id)["control_id"] == "F2"


def test_the_engine_stores_acknowledges_and_delivers_on_postgresql(tmp_path):
    """`hl7relay run` on PostgreSQL (a schema of its own): every message ACKed AA only once stored,
    each stored once with its stages, and delivered; the hot path talks to psycopg directly."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    import uuid
    from pathlib import Path

    from hl7relay.mllp.framing import MLLPFramer, frame

    sys.path.insert(0, str(Path(__file__).parent))
    from test_runtime import ADT, READY, wait_for_line

    schema = f"engine_{uuid.uuid4().hex[:8]}"
    admin = _postgres_store()  # skips (or fails under CI) when no server answers
    with admin.engine.begin() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    url = POSTGRES_URL + ("&" if "?" in POSTGRES_URL else "?") + f"options=-csearch_path%3D{schema}"
    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "adt.yaml").write_text(
        "name: adt\nsource: {type: mllp, port: 0}\ntransformers: [{set: {path: MSH-5, value: LAB}}]\n"
        f"destinations: [{{name: archive, type: file, directory: {tmp_path / 'out'}}}]\n")
    process = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--store", url, "--data-dir", str(tmp_path / "data"),
                                "--admin-port", "0", "--console-port", "0"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        startup = "".join(wait_for_line(process, READY))
        port = int(startup.split("MLLP on 127.0.0.1:")[1].split()[0])
        codes = []
        with socket.create_connection(("127.0.0.1", port)) as pms:
            framer = MLLPFramer()
            for n in range(40):
                pms.sendall(frame(ADT.format(id=f"PG{n}", extra="").encode()))
                got = []
                while not got:
                    got = framer.feed(pms.recv(65536))
                codes.append(got[0].payload.split(b"MSA|")[1][:2])
        assert codes == [b"AA"] * 40
        store = Store(url)
        rows = store.search(channel="adt", limit=100)
        assert sorted(r["control_id"] for r in rows) == sorted(f"PG{n}" for n in range(40))
        assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)
        stored = store.get_message(rows[0]["id"])
        assert set(stored["stages"]) >= {"transformed", "ack"}
        deadline = time.monotonic() + 30  # the file destination writes them as its queue runs
        while len(list((tmp_path / "out").glob("*.hl7"))) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list((tmp_path / "out").glob("*.hl7"))) == 40
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        process.stdout.close()
        with admin.engine.begin() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")


def test_postgresql_commits_without_pipeline_mode_where_libpq_lacks_it(monkeypatch):
    import psycopg

    store = _postgres_store()
    store.migrate()
    monkeypatch.setattr(psycopg.Pipeline, "is_supported", classmethod(lambda cls: False))
    ids = store.commit([record(f"NP{i}", deliveries=[DeliveryRecord("lab", "QUEUED", b"MSH|x")]) for i in range(3)], [])
    assert len(ids) == 3 and [store.get_message(i)["control_id"] for i in ids] == ["NP0", "NP1", "NP2"]
    assert [r["message_id"] for r in store.queued_deliveries("adt", "lab")] == ids


def test_updates_of_one_delivery_in_one_batch_apply_in_order(store):
    """An attempt's result (QUEUED, attempts 1) and the withdrawal that followed it (WITHDRAWN)
    in one batch were run in groups by the columns they set: when another withdrawal opened the
    batch, the delivery came out QUEUED, and the withdrawn copy was sent after all."""
    from hl7relay.store.database import DeliveryUpdate

    ids = store.commit([record(f"W{n}", deliveries=[DeliveryRecord("pms", "QUEUED", b"x")]) for n in range(2)], [])
    withdrawn = {"status": "WITHDRAWN", "last_error": "withdrawn", "next_attempt_at": None, "updated_at": 2.0}
    store.commit([], [
        DeliveryUpdate(ids[0], "pms", withdrawn),  # another message's withdrawal first: its column set's group runs first
        DeliveryUpdate(ids[1], "pms", {"status": "QUEUED", "attempts": 1, "last_ack": "", "last_error": "refused",
                                       "next_attempt_at": 5.0, "updated_at": 1.0}),
        DeliveryUpdate(ids[1], "pms", withdrawn),
    ])
    delivery = store.get_message(ids[1])["deliveries"][0]
    assert (delivery["status"], delivery["attempts"], delivery["last_error"]) == ("WITHDRAWN", 1, "withdrawn")
    assert store.queued_deliveries("adt", "pms") == []


def test_the_engines_small_writes_are_typed_updates_in_the_group_commit(store):
    """An operator's switch, a destination's state and a token's use go through the writer's one
    way in for writes (update), not through its reads; the last of each in a batch stands."""
    from hl7relay.store.database import AuditUpdate, ControlUpdate, DestinationStateUpdate, TokenUseUpdate

    store.add_token("ci", "viewer", "hash-of-ci", "test", {"action": "token.create", "actor": "test"})
    store.commit([], [
        ControlUpdate("adt", "lab", "paused", True, "ops", 1.0),
        ControlUpdate("adt", "", "disabled", True, "ops", 1.0),
        ControlUpdate("adt", "lab", "paused", False, "ops", 2.0),  # resumed in the same batch: not paused
        AuditUpdate({"action": "destination.resume", "actor": "ops", "target": "adt/lab"}),
        DestinationStateUpdate("adt", "lab", False, "connection refused", 3.0),
        TokenUseUpdate("ci", 4.0),
    ])
    assert store.controls() == {("adt", "", "disabled")}
    store.commit([], [DestinationStateUpdate("adt", "lab", True, "", 5.0),  # upserted: one row, the latest
                      ControlUpdate("adt", "lab", "paused", True, "ops", 6.0)])
    assert store.controls() == {("adt", "", "disabled"), ("adt", "lab", "paused")}
    state = store.channel_status(10.0)["adt"]["destinations"]["lab"]
    assert state["connected"] and state["last_error"] == ""
    assert [t["last_used_at"] for t in store.list_tokens()] == [4.0]
    assert [e["action"] for e in store.audit_entries()][:2] == ["destination.resume", "token.create"]
    with pytest.raises((ValueError, StoreError), match="not a store update"):
        store.commit([], [object()])  # not an update: refused


def test_a_text_search_that_reaches_its_scan_limit_says_where_it_stopped(store):
    """A content search stopped after its scan limit and read as "no match" for a message that
    existed further back: it now says how far it read, and where to go on from."""
    store.commit([record(f"S{n}", raw=b"MSH|^~\\&|A|B\rPID|1||" + (b"NEEDLE" if n == 0 else b"hay") + b"\r")
                  for n in range(1200)], [])
    rows = store.search(text=b"needle", scan_limit=1000)
    assert rows == [] and rows.scanned == 1000 and rows.stopped_at == 201  # ids 1200..201 read, newest first
    rows = store.search(text=b"needle", before_id=rows.stopped_at, scan_limit=1000)
    assert [r["control_id"] for r in rows] == ["S0"] and rows.stopped_at is None
    rows = store.search(text=b"nowhere", scan_limit=5000)  # read to the oldest: a true "no match"
    assert rows == [] and rows.scanned == 1200 and rows.stopped_at is None


def test_the_last_active_admin_cannot_be_demoted_disabled_or_removed(store):
    from hl7relay.store.records import LastAdminError

    audit = {"actor": "test", "action": "user.change", "target": "x"}
    store.add_user("ada", "admin", "hash", audit)
    store.add_user("bob", "admin", "hash", audit)
    store.add_user("val", "viewer", "hash", audit)
    assert store.update_user("bob", audit, role="operator")  # ada remains
    entries = len(store.audit_entries(limit=1000))
    for change in (lambda: store.update_user("ada", audit, role="viewer"),
                   lambda: store.update_user("ada", audit, disabled=True),
                   lambda: store.remove_user("ada", audit)):
        with pytest.raises(LastAdminError, match="ada is the last active admin"):
            change()
    assert store.get_user("ada")["role"] == "admin" and not store.get_user("ada")["disabled"]
    assert len(store.audit_entries(limit=1000)) == entries  # nothing changed, nothing audited
    assert store.update_user("val", audit, role="operator") and store.remove_user("val", audit)  # others as before
    assert store.update_user("bob", audit, role="admin") and store.update_user("ada", audit, disabled=True)


def test_a_search_counts_its_matches_up_to_a_bound(store):
    """The Messages page said "of more": it now says how many match, counted through the same
    indexes, and never more than it was asked to count ("10,000+")."""
    store.commit([record(f"C{n}", message_type="ADT^A01" if n % 2 else "ADT^A04") for n in range(130)], [])
    store.commit([record("ORU1", message_type="ORU^R01")], [])
    rows = store.search(limit=50, count_most=1000)
    assert len(rows) == 50 and (rows.total, rows.total_capped) == (131, False)
    rows = store.search(message_type="ADT", limit=50, count_most=1000)  # two types, read and counted apiece
    assert (rows.total, rows.total_capped) == (130, False)
    rows = store.search(message_type="ADT", limit=50, count_most=100)
    assert (rows.total, rows.total_capped) == (100, True)
    rows = store.search(message_type="ADT^A04", before_id=rows[-1]["id"], limit=10, count_most=1000)
    assert len(rows) == 10 and rows.total == 65  # the whole match, whichever page
    assert store.search(limit=50).total is None  # not asked: not counted
    assert store.search(text=b"C1", count_most=1000).total is None  # a content search says what it scanned instead


@pytest.mark.parametrize("filters", [{}, {"channel": "adt"}])
def test_a_newer_page_is_the_one_before_an_older_page(store, filters):
    store.commit([record(f"P{n}") for n in range(120)], [])
    first = store.search(**filters, limit=50)
    second = store.search(**filters, before_id=first[-1]["id"], limit=50)
    back = store.search(**filters, after_id=second[0]["id"], limit=50)
    assert [r["id"] for r in back] == [r["id"] for r in first] and not back.newer_exists  # the first page: none newer
    third = store.search(**filters, before_id=second[-1]["id"], limit=50)
    assert len(third) == 20
    back = store.search(**filters, after_id=third[0]["id"], limit=50)
    assert [r["id"] for r in back] == [r["id"] for r in second] and back.newer_exists
    assert store.search(**filters, after_id=first[0]["id"], limit=50) == []  # nothing newer than the newest


def test_fhir_cross_references_are_upserted_with_the_delivery_result(store):
    from hl7relay.store.database import XrefUpdate

    [message_id] = store.commit([record(deliveries=[DeliveryRecord("ehr", "QUEUED")])], [])

    def xref(version, fhir_id="p1"):
        return XrefUpdate("adt", "ehr", "Patient", "6b1f-local", "CLINIC|100234", fhir_id, version, "h" * 64,
                          message_id, 1700000000.0 + int(version))

    store.commit([], [DeliveryUpdate(message_id, "ehr", {"status": "SENT", "updated_at": 1.0}), xref("1")])
    store.commit([], [xref("2"), xref("3")])  # the last of one key in a batch counts
    [row] = store.xrefs(resource_type="Patient")
    assert (row["fhir_id"], row["version_id"], row["identifier"], row["message_id"]) == ("p1", "3", "CLINIC|100234", message_id)
    assert store.xrefs(identifier="CLINIC|100234")[0]["local_key"] == "6b1f-local"
    assert store.xrefs(destination="other") == []
    assert store.get_message(message_id)["deliveries"][0]["status"] == "SENT"


def test_the_file_ledger_counts_each_files_messages_in_order_in_their_own_transaction(store):
    """Both backends: a message read from a file adds its place in the same commit; places that do
    not follow those stored (a gap) fail the commit; the ledger's own row is made once."""
    from hl7relay.store.database import FileSeenUpdate, FileUpdate

    seen = FileSeenUpdate("adt", "file:///in", "ADT.txt", 300, 1.0, "a" * 64, 1700000000.0)
    store.commit([], [seen, seen])
    store.commit([], [seen])  # seen again (a re-read): the row stays as it is
    entry = store.file_entry("adt", "file:///in", "ADT.txt", "a" * 64)
    ids = store.commit([record("F1", source_file=(entry["id"], 0, 3)),
                        record("F2", status="ERROR", source_file=(entry["id"], 1, 7))], [])
    with pytest.raises(StoreError, match="do not follow"):
        store.commit([record("F4", source_file=(entry["id"], 3, 15))], [])  # place 2 is not stored
    store.commit([record("F3", source_file=(entry["id"], 2, 11))], [])
    store.commit([], [FileUpdate(entry["id"], {"state": "errors", "messages": 3, "done_at": 1700000100.0})])
    row = store.file(entry["id"])
    assert (row["state"], row["messages"], row["committed"], row["errors"]) == ("errors", 3, 3, 1)
    assert store.file_ordinals(entry["id"]) == {0, 1, 2} and store.count() == 3
    assert [r["control_id"] for r in store.file_message_rows(entry["id"])] == ["F1", "F2", "F3"]
    assert store.file_of_message(ids[1])["line"] == 7
    assert store.file_read_before("adt", "a" * 64, other_than=entry["id"] + 1)["id"] == entry["id"]
    with pytest.raises((ValueError, StoreError), match="unknown columns"):  # column names go into SQL: only the ledger's
        store.commit([], [FileUpdate(entry["id"], {"name": "x"})])
