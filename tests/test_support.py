"""Support tools: messages, replay, prune, status; searches use indexes on a large store."""

import json
import random
import textwrap
import time

import pytest
import sqlalchemy as sa
from twisted.internet import defer, task

from hl7relay.channels.destinations import QueueOptions
from hl7relay.cli import main
from hl7relay.queues import DeliveryResult, DestinationQueue
from hl7relay.store.database import DeliveryRecord, MessageRecord, Store
from hl7relay.store.schema import messages
from hl7relay.store.writer import StoreWriter

ADT = "MSH|^~\\&|PMS|CLINIC|HL7RELAY|LAB|20240105||ADT^A08^ADT_A01|{id}|P|2.5.1\rEVN|A08|20240105\rPID|1||{pid}^^^H^MR||DOE^JANE||{dob}|F\rPV1|1|O\r"


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "channels").mkdir()
    store = Store(f"sqlite:///{tmp_path / 'data' / 'hl7relay.db'}")
    store.migrate()
    return tmp_path, store


def write_channel(tmp_path, date_format="%Y"):
    (tmp_path / "channels" / "adt.yaml").write_text(textwrap.dedent(f"""\
        name: adt
        source: {{type: mllp, port: 12900}}
        transformers: [{{format_date: {{path: PID-7, output: "{date_format}"}}}}]
        destinations: [{{name: lab, type: mllp, host: 127.0.0.1, port: 12901}}]
        retention: {{days: 10, errors_days: 40}}
        """))


def add(store, control_id, status="PROCESSED", received_at=None, pid="100234", delivery="SENT", channel="adt", dob="19800412"):
    raw = ADT.format(id=control_id, pid=pid, dob=dob).encode()
    record = MessageRecord(channel, raw, status, received_at or time.time(), control_id=control_id, patient_id=pid,
                           message_type="ADT^A08", sending_facility="CLINIC", error="bad date" if status == "ERROR" else "",
                           deliveries=[DeliveryRecord("lab", delivery, raw)] if delivery else [])
    [message_id] = store.commit([record], [])
    return message_id


def cli(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr().out


def test_list_search_show_with_phi_masked(env, capsys):
    _, store = env
    first = add(store, "M1", pid="999111")
    add(store, "M2", status="ERROR", pid="999222")
    code, out = cli(capsys, "messages", "list")
    assert code == 0 and "M2" in out and "M1" in out and "999111" not in out and "9***" in out
    code, out = cli(capsys, "messages", "list", "--status", "ERROR", "--format", "json")
    rows = json.loads(out)
    assert [r["control_id"] for r in rows] == ["M2"] and rows[0]["patient_id"] == "9***"
    code, out = cli(capsys, "messages", "search", "--text", "999111", "--show-phi", "--reason", "ticket 1")
    assert "M1" in out and "M2" not in out and "999111" in out
    code, out = cli(capsys, "messages", "search", "--text", "doe^jane", "--reason", "ticket 1")  # whatever the case
    assert "M1" in out and "M2" in out
    # which messages hold a name is patient data: a content search says why, and is audited with its text
    assert main(["messages", "search", "--text", "doe^jane"]) == 2
    assert "--text searches message content: say why with --reason" in capsys.readouterr().err
    entry = store.audit_entries(action="messages.search_text")[0]
    assert entry["reason"] == "ticket 1" and entry["detail"] == "text 'doe^jane'" and entry["role"] == "host"
    # the API's and the console's search: a search by patient id is audited on the command line too
    cli(capsys, "messages", "list", "--patient-id", "999111")
    by_patient = store.audit_entries(action="messages.search")[0]  # the newest
    assert by_patient["target"] == "patient_id" and by_patient["role"] == "host"
    code, out = cli(capsys, "messages", "show", str(first))
    assert "PID|1||***||***||***|***" in out and "DOE" not in out and "lab: SENT" in out
    code, out = cli(capsys, "messages", "show", str(first), "--show-phi", "--reason", "ticket 1")
    assert "DOE^JANE" in out
    code, out = cli(capsys, "messages", "list", "--limit", "1")
    assert "-- more: --before 2" in out
    code, out = cli(capsys, "messages", "list", "--limit", "1", "--before", "2")
    assert "M1" in out and "M2" not in out


def test_searches_on_100k_messages_use_indexes(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'big.db'}")
    store.migrate()
    rng = random.Random(1)
    rows = [{"channel": f"ch{i % 5}", "received_at": 1.7e9 + i, "peer": "", "raw": b"MSH|x", "charset": "",
             "sending_application": "PMS", "sending_facility": f"F{i % 50}", "message_type": "ADT^A0%d" % (i % 9),
             "control_id": f"C{i}", "patient_id": f"P{rng.randrange(20000)}", "status": "PROCESSED", "error": "",
             "ack_code": "AA"} for i in range(100_000)]
    with store.engine.begin() as connection:
        connection.execute(messages.insert(), rows)
    start = time.perf_counter()
    for filters in ({"control_id": "C99999"}, {"patient_id": "P123"}, {"channel": "ch3"}, {"status": "ERROR"},
                    {"facility": "F7", "since": 1.7e9 + 50_000}, {"message_type": "ADT^A03"}):
        found = store.search(**filters, limit=50)
        assert found is not None
    elapsed = time.perf_counter() - start
    # the statements search() really runs, explained: an index answers each, and none sorts its matches
    statements = []
    sa.event.listen(store.engine, "before_cursor_execute",
                    lambda conn, cursor, statement, parameters, context, many: statements.append((statement, parameters)))
    for filters, index in (({"control_id": "C99999"}, "ix_messages_control_id"),
                           ({"patient_id": "P123"}, "ix_messages_patient_id"),
                           ({"channel": "ch3"}, "ix_messages_channel_time"),
                           ({"status": "ERROR"}, "ix_messages_status_time"),
                           ({"facility": "F7"}, "ix_messages_facility_time"),
                           ({"channel": "ch3", "message_type": "ADT^A03"}, "_time"),
                           ({"channel": "ch3", "before_id": 50_000}, "ix_messages_channel_time")):
        statements.clear()
        store.search(**filters, limit=50)
        statement, parameters = statements[-1]
        with store.engine.connect() as connection:
            plan = " ".join(str(r) for r in connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters))
        assert index in plan and "TEMP B-TREE" not in plan, (filters, plan)
    page, seen = store.search(channel="ch3", limit=500), []
    while page:  # keyset paging in arrival order visits every match once
        seen += [r["id"] for r in page]
        page = store.search(channel="ch3", limit=500, before_id=page[-1]["id"])
    assert len(seen) == len(set(seen)) == 20_000 and seen == sorted(seen, reverse=True)
    assert elapsed < 60  # a sanity bound only; the index use above is the check


def test_a_message_type_without_trigger_reads_each_type_through_its_index_in_order(tmp_path):
    # "ADT" means every ADT trigger: once one query sorted every match (a full scan at 10M rows)
    store = Store(f"sqlite:///{tmp_path / 'types.db'}")
    store.migrate()
    types = ["ADT", "ADT^A01", "ADT^A03", "ADT^A08^ADT_A01", "ADTX^Z01", "ORU^R01", "AD^A01"]
    rows = [{"channel": "ch", "received_at": 1.7e9 + (i * 7919) % 1000, "peer": "", "raw": b"MSH|x", "charset": "",
             "sending_application": "PMS", "sending_facility": "F", "message_type": types[i % len(types)],
             "control_id": f"C{i}", "patient_id": "P", "status": "PROCESSED", "error": "", "ack_code": "AA"}
            for i in range(1000)]
    with store.engine.begin() as connection:
        connection.execute(messages.insert(), rows)
    with store.engine.connect() as connection:
        assert store._types_like(connection, "ADT") == ["ADT", "ADT^A01", "ADT^A03", "ADT^A08^ADT_A01"]
        assert store._types_like(connection, "ZZZ") == [] and store._types_like(connection, "ORU") == ["ORU^R01"]
    expected = sorted(((r["received_at"], i + 1) for i, r in enumerate(rows)
                       if r["message_type"] == "ADT" or r["message_type"].startswith("ADT^")), reverse=True)
    seen, page = [], store.search(message_type="ADT", limit=37)
    while page:  # merged newest first, and keyset paging over the merge visits each match once
        seen += [(r["received_at"], r["id"]) for r in page]
        page = store.search(message_type="ADT", limit=37, before_id=page[-1]["id"])
    assert seen == expected
    assert store.search(message_type="ZZZ") == []
    found = store.search(message_type="ADT", text=b"msh|X", limit=5)  # the text scan goes over the merge too
    assert [(r["received_at"], r["id"]) for r in found] == expected[:5]
    statements = []
    sa.event.listen(store.engine, "before_cursor_execute",
                    lambda conn, cursor, statement, parameters, context, many: statements.append((statement, parameters)))
    store.search(message_type="ADT", limit=50)
    sent = list(statements)  # (the EXPLAINs below are captured too)
    reads = [(st, p) for st, p in sent if "messages.control_id" in st]
    assert len(reads) == 4
    with store.engine.connect() as connection:
        for statement, parameters in sent:
            plan = " ".join(str(r) for r in connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters))
            assert "ix_messages_type_time" in plan and "TEMP B-TREE" not in plan and "SCAN" not in plan, (statement, plan)
    store.close()


def test_search_by_delivery_status(env):
    _, store = env
    ids = {name: add(store, name, delivery=delivery, channel="oru" if name.endswith("2") else "adt")
           for name, delivery in (("E1", "ERROR"), ("S1", "SENT"), ("Q1", "QUEUED"), ("E2", "ERROR"), ("Q2", "QUEUED"),
                                  ("N1", None), ("F1", "FILTERED"))}
    for status, names in (("ERROR", ["E2", "E1"]), ("QUEUED", ["Q2", "Q1"]), ("SENT", ["S1"]), ("FILTERED", ["F1"])):
        assert [r["control_id"] for r in store.search(delivery_status=status)] == names, status
    assert [r["control_id"] for r in store.search(delivery_status="ERROR", channel="adt")] == ["E1"]
    assert [r["id"] for r in store.search(delivery_status="QUEUED", before_id=ids["Q2"])] == [ids["Q1"]]
    assert store.search(delivery_status="WITHDRAWN") == []


def test_replay_after_fixing_the_channel_delivers_the_errored_messages(env, capsys):
    tmp_path, store = env
    write_channel(tmp_path)
    bad = add(store, "E1", status="ERROR", delivery=None, dob="1980-04-12")
    add(store, "OK1")
    # the channel is fixed: PID-7 is now read as an ISO date
    (tmp_path / "channels" / "adt.yaml").write_text((tmp_path / "channels" / "adt.yaml").read_text().replace(
        '{format_date: {path: PID-7, output: "%Y"}}', '{format_date: {path: PID-7, input: "%Y-%m-%d", output: "%Y%m%d"}}'))
    code, out = cli(capsys, "replay", "--status", "ERROR", "--dry-run")
    assert code == 0 and f"{bad} E1: would send to lab" in out
    code, out = cli(capsys, "replay", "--status", "ERROR")
    assert code == 2  # a replay needs a reason
    code, out = cli(capsys, "replay", "--status", "ERROR", "--reason", "date format fixed", "--operator", "ana")
    assert code == 0 and "queued as message" in out
    replay = store.latest(1)[0]
    stored = store.get_message(replay["id"])
    assert stored["replay_of"] == bad and stored["replay_reason"] == "date format fixed" and stored["replay_operator"] == "ana"
    assert stored["deliveries"][0]["status"] == "QUEUED"
    # the running engine's queue sends it
    clock, received = task.Clock(), []
    writer = StoreWriter(store, executor=lambda fn, *a: defer.maybeDeferred(fn, *a))
    queue = DestinationQueue("adt", "lab", lambda m: received.append(m.get("PID-7")) or DeliveryResult(True, ack="AA"),
                             QueueOptions(), writer, clock, time.time)
    queue.start()
    clock.advance(1)
    assert received == ["19800412"] and store.get_message(replay["id"])["deliveries"][0]["status"] == "SENT"


def test_replaying_a_delivered_message_needs_force_and_shows_changes(env, capsys):
    tmp_path, store = env
    write_channel(tmp_path, date_format="%Y")  # the channel now keeps only the year of PID-7
    sent = add(store, "S1")
    code, out = cli(capsys, "replay", str(sent), "--reason", "again")
    assert code == 1 and "already delivered to lab (use --force" in out
    code, out = cli(capsys, "replay", str(sent), "--dry-run", "--force")
    assert "would send to lab" in out and "the channel changed since it was sent" in out
    code, out = cli(capsys, "replay", str(sent), "--force", "--reason", "lab lost it", "--destination", "lab")
    assert code == 0 and "queued as message" in out


def test_prune_keeps_queued_and_keeps_errors_longer(env, capsys):
    tmp_path, store = env
    write_channel(tmp_path)
    day = 86400
    now = time.time()
    old = add(store, "OLD", received_at=now - 20 * day)
    queued = add(store, "QUEUED", received_at=now - 400 * day, delivery="QUEUED")
    old_error = add(store, "ERR20", status="ERROR", received_at=now - 20 * day, delivery=None)
    ancient_error = add(store, "ERR50", status="ERROR", received_at=now - 50 * day, delivery=None)
    recent = add(store, "NEW", received_at=now - day)
    code, out = cli(capsys, "prune")  # the channel's retention: 10 days, errors 40
    assert code == 0 and "pruned 2 message(s)" in out
    left = {r["control_id"] for r in store.latest(10)}
    assert left == {"QUEUED", "ERR20", "NEW"}
    assert store.get_message(old) is None and store.get_message(ancient_error) is None
    assert store.get_message(queued)["deliveries"][0]["status"] == "QUEUED"
    code, out = cli(capsys, "prune", "--older-than", "12h", "--errors-older-than", "12h")
    assert {r["control_id"] for r in store.latest(10)} == {"QUEUED"} and store.get_message(old_error) is None
    assert store.get_message(recent) is None


def test_status_reports_channels_and_destinations(env, capsys):
    _, store = env
    add(store, "A")
    add(store, "B", status="ERROR", delivery=None)
    add(store, "C", delivery="QUEUED", received_at=time.time() - 7200)
    store.set_destination_state("adt", "lab", False, "connection_failed: refused", time.time())
    write_channel(env[0])
    (env[0] / "channels" / "idle.yaml").write_text(textwrap.dedent("""\
        name: idle
        source: {type: mllp, port: 12902}
        destinations: [{name: archive, type: file, directory: out}]
        """))
    code, out = cli(capsys, "status")
    assert code == 0
    assert "adt: last 24h: received 3, processed 2, filtered 0, errored 1, duplicates 0, queued 1 (oldest 2.0h)\n" in out
    assert "last error: message 2" in out
    assert "-> lab (mllp): NOT connected; queued 1 (oldest 2.0h), sent 1, errors 0; connection_failed: refused" in out
    # a configured channel that has seen nothing yet is listed; a file destination has no "connected"
    assert "idle: last 24h: received 0, processed 0" in out and "-> archive (file): queued 0 (oldest -), sent 0, errors 0" in out
    data = json.loads(cli(capsys, "status", "--format", "json")[1])
    assert data["adt"]["destinations"]["lab"]["connected"] is False


def test_status_counts_a_window_of_messages_but_every_queued_delivery_and_dead_letter(env, capsys):
    _, store = env
    write_channel(env[0])
    day = 86400
    old_queued = add(store, "OQ", delivery="QUEUED", received_at=time.time() - 3 * day)
    add(store, "OD", delivery="ERROR", received_at=time.time() - 2 * day)
    add(store, "OS", received_at=time.time() - 2 * day)
    add(store, "OE", status="ERROR", delivery=None, received_at=time.time() - 2 * day)
    add(store, "NS2", received_at=time.time() - 3600)
    add(store, "NS")
    code, out = cli(capsys, "status")
    assert code == 0
    # the window's messages; every delivery still waiting (and the oldest's age) and every dead letter
    assert "adt: last 24h: received 2, processed 2, filtered 0, errored 0, duplicates 0, queued 1 (oldest 3.0d)" in out
    assert "-> lab (mllp): not tried yet; queued 1 (oldest 3.0d), sent 2, errors 1" in out
    assert "last error: message 4" in out  # older than the window, still the newest error
    code, out = cli(capsys, "status", "--hours", "72.5")
    assert "adt: last 72.5h: received 6, processed 5, filtered 0, errored 1" in out and "sent 3, errors 1" in out
    code, out = cli(capsys, "status", "--hours", "0")
    assert "adt: all stored: received 6" in out
    data = json.loads(cli(capsys, "status", "--format", "json", "--hours", "0.5")[1])
    assert data["adt"]["counts"] == {"PROCESSED": 1} and data["adt"]["destinations"]["lab"]["counts"] == {
        "SENT": 1, "QUEUED": 1, "ERROR": 1}
    assert store.get_message(old_queued)["deliveries"][0]["status"] == "QUEUED"
    for bad in ("-1", "soon", "nan", "1e9"):
        with pytest.raises(SystemExit) as exit_:
            main(["status", "--hours", bad])
        assert exit_.value.code == 2
        assert "hours" in capsys.readouterr().err


def test_replay_dry_run_masks_patient_data_unless_asked(env, capsys):
    """replay --dry-run printed message content unmasked, in text and JSON."""
    tmp_path, store = env
    write_channel(tmp_path, date_format="%Y")
    sent = add(store, "S1", pid="999333", dob="19800412")
    for extra in ((), ("--format", "json")):
        code, out = cli(capsys, "replay", str(sent), "--dry-run", "--force", *extra)
        assert code == 0 and "changed since it was sent" in out.replace("\\n", "\n") or "sent before" in out
        assert "19800412" not in out and "DOE" not in out and "999333" not in out, out
        assert "***" in out
        # the mask hides both versions alike: the diff names the field that changed
        assert "changed: PID-7" in out.replace("\\n", "\n")
    code, out = cli(capsys, "replay", str(sent), "--dry-run", "--force", "--show-phi", "--reason", "ticket 2")
    assert "-PID|1||999333^^^H^MR||DOE^JANE||19800412|F" in out and "+PID|1||999333^^^H^MR||DOE^JANE||1980|F" in out


def test_error_texts_quoting_values_are_masked_and_never_cut(env, capsys):
    _, store = env
    error = ("transformer 1: format_date PID-7: '19800412' does not match '%Y-%m-%d'; " + "and a long explanation " * 8).strip()
    store.commit([MessageRecord("adt", ADT.format(id="E9", pid="5", dob="19800412").encode(), "ERROR", time.time(),
                                control_id="E9", error=error)], [])
    store.set_destination_state("adt", "lab", False, "application_error: patient '19800412' unknown", time.time())
    for argv in (("messages", "list"), ("messages", "show", "1"), ("status",)):
        code, out = cli(capsys, *argv)
        assert code == 0 and "19800412" not in out, (argv, out)
    code, out = cli(capsys, "messages", "list")
    assert out.splitlines()[0].split()[:3] == ["ID", "RECEIVED", "CHANNEL"]  # a header
    assert "'1***' does not match" in out and out.rstrip().endswith("and a long explanation")  # whole, masked
    code, out = cli(capsys, "messages", "list", "--show-phi", "--reason", "ticket 3")
    assert "'19800412' does not match" in out


def test_messages_show_has_each_destinations_answer_masked(env, capsys):
    _, store = env
    message_id = add(store, "A1", pid="999444")
    ack = ("MSH|^~\\&|LAB|LABFAC|PMS|CLINIC|20240105||ACK^A08^ACK|X1|P|2.5.1\rMSA|AE|A1\r"
           "ERR|||204^Unknown key identifier^HL70357|E||||patient '999444' unknown\r")
    store.commit([], [("delivery", (message_id, "lab"), {"status": "ERROR", "last_ack": ack, "last_error": "application_error: patient '999444' unknown"})])
    code, out = cli(capsys, "messages", "show", str(message_id))
    assert "answer:" in out and "MSA|AE|A1" in out and "999444" not in out, out


def test_a_peers_unquoted_error_naming_the_patient_is_masked(env, capsys):
    from hl7relay.ops.phi import mask_known, person_values

    _, store = env
    message_id = add(store, "U1", pid="999555")
    store.commit([], [("delivery", (message_id, "lab"), {"status": "ERROR",
                                                          "last_error": "application_error: DOE JANE (999555) not on file"})])
    code, out = cli(capsys, "messages", "show", str(message_id))
    assert code == 0 and "DOE" not in out and "999555" not in out and "not on file" in out, out
    values = person_values(ADT.format(id="V", pid="123456", dob="19800412").encode())
    assert {"123456", "DOE", "JANE", "19800412"} <= values and "1" not in values
    assert mask_known("AE: DOE JANE 19800412", values) == "AE: *** J*** 1***"
    assert mask_known("nothing here", values) == "nothing here" and mask_known("", values) == ""


def _two_destinations(tmp_path):
    (tmp_path / "channels" / "adt.yaml").write_text(textwrap.dedent("""\
        name: adt
        source: {type: mllp, port: 12900}
        destinations:
          - {name: lab, type: mllp, host: 127.0.0.1, port: 12901}
          - {name: archive, type: file, directory: out}
        """))


def _with_deliveries(store, control_id, statuses: dict, status="PROCESSED", error=""):
    raw = ADT.format(id=control_id, pid="100234", dob="19800412").encode()
    record = MessageRecord("adt", raw, status, time.time(), control_id=control_id, patient_id="100234",
                           message_type="ADT^A08", error=error,
                           deliveries=[DeliveryRecord(name, value, raw) for name, value in statuses.items()])
    [message_id] = store.commit([record], [])
    if "ERROR" in statuses.values():
        with store.engine.begin() as connection:
            from hl7relay.store.schema import deliveries

            connection.execute(deliveries.update().where(deliveries.c.message_id == message_id,
                                                         deliveries.c.status == "ERROR")
                               .values(last_error="application_error: AE: unknown patient 'DOE' (JANE, 19800412)"))
    return message_id


def test_messages_list_failed_finds_a_destinations_ae_with_its_destination_and_error(env, capsys):
    """--status ERROR missed a message the channel processed but whose lab answered AE."""
    tmp_path, store = env
    _two_destinations(tmp_path)
    _with_deliveries(store, "OK1", {"lab": "SENT", "archive": "SENT"})
    dead = _with_deliveries(store, "AE1", {"lab": "ERROR", "archive": "SENT"})
    broken = _with_deliveries(store, "ER1", {}, status="ERROR", error="bad date")
    code, out = cli(capsys, "messages", "list", "--status", "ERROR")
    assert "AE1" not in out  # the message itself was processed
    code, out = cli(capsys, "messages", "list", "--failed")
    assert code == 0 and "AE1" in out and "ER1" in out and "OK1" not in out
    # a peer's words: the quoted value and the patient's own values it names without quotes, masked
    assert "delivery to lab failed: application_error: AE: unknown patient '***' (J***, 1***)" in out
    rows = json.loads(cli(capsys, "messages", "list", "--failed", "--format", "json")[1])
    assert [r["id"] for r in rows] == [broken, dead] and all("raw" not in r for r in rows)
    assert rows[1]["failed_deliveries"] == [{"destination": "lab",
                                             "error": "application_error: AE: unknown patient '***' (J***, 1***)"}]


def test_replay_of_what_failed_targets_the_failed_destinations(env, capsys):
    """Replay by the README's filter skipped the message: the archive already had it."""
    tmp_path, store = env
    _two_destinations(tmp_path)
    dead = _with_deliveries(store, "AE1", {"lab": "ERROR", "archive": "SENT"})
    code, out = cli(capsys, "replay", "--failed", "--reason", "lab fixed")
    assert code == 0 and "queued as message" in out and "to lab" in out and "archive" not in out, out
    replay = store.get_message(store.latest(1)[0]["id"])
    assert replay["replay_of"] == dead and [d["destination"] for d in replay["deliveries"]] == ["lab"]
    assert {d["destination"]: d["status"] for d in store.get_message(dead)["deliveries"]} == {
        "lab": "REPLAYED", "archive": "SENT"}
    other = _with_deliveries(store, "AE2", {"lab": "ERROR", "archive": "SENT"})
    code, out = cli(capsys, "replay", str(other), "--dry-run")  # by id, the same default
    assert code == 0 and f"{other} AE2: would send to lab" in out, out
    code, out = cli(capsys, "replay", "--delivery-status", "ERROR", "--dry-run")  # by the console's delivery filter
    assert code == 0 and f"{other} AE2: would send to lab" in out and "archive" not in out and "would replay 1," in out, out



def test_a_delivery_still_queued_is_no_default_target_of_a_replay(env, capsys):
    """Its queue sends it yet: a replay beside it would deliver the message twice."""
    tmp_path, store = env
    _two_destinations(tmp_path)
    waiting = _with_deliveries(store, "Q1", {"lab": "QUEUED", "archive": "ERROR"})
    code, out = cli(capsys, "replay", str(waiting), "--dry-run")
    assert code == 0 and f"{waiting} Q1: would send to archive" in out and "lab" not in out.split("would send to")[1], out
    from hl7relay.channels import load_channels
    from hl7relay.ops.replay import plan_replay

    channels, _ = load_channels([str(tmp_path / "channels")])
    plan = plan_replay(store, {c.name: c for c in channels}, waiting)
    assert (plan.chosen, plan.dead, plan.delivered) == (["archive"], ["archive"], [])
    code, out = cli(capsys, "replay", str(waiting), "--destination", "lab", "--dry-run")  # chosen: told, not doubled
    assert f"{waiting} Q1: skipped: still queued for lab" in out and "--force" in out, out

def test_a_dead_letter_writes_one_warning_line_without_patient_data(tmp_path):
    from twisted.logger import globalLogPublisher, formatEvent

    store = Store(f"sqlite:///{tmp_path / 'q.db'}")
    store.migrate()
    raw = ADT.format(id="DL1", pid="100234", dob="19800412").encode()
    store.commit([MessageRecord("adt", raw, "PROCESSED", 0.0, control_id="DL1",
                                deliveries=[DeliveryRecord("lab", "QUEUED", raw)])], [])
    clock = task.Clock()
    writer = StoreWriter(store, executor=lambda fn, *a: defer.maybeDeferred(fn, *a))
    answer = DeliveryResult(False, application_error=True, ack="MSH|^~\\&|LAB\rMSA|AE|DL1|unknown patient DOE\r",
                            error="application_error: unknown patient DOE")
    queue = DestinationQueue("adt", "lab", lambda message: answer, QueueOptions(), writer, clock, clock.seconds)
    lines = []
    observer = lambda event: lines.append((event.get("log_level").name, formatEvent(event)))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        queue.start()
        clock.advance(0)
    finally:
        globalLogPublisher.removeObserver(observer)
        queue.stop()
    dead = [text for level, text in lines if "dead letter" in text]
    assert dead == ["queue adt/lab: message 1 is a dead letter after 1 attempt(s): answered AE (application error); "
                    "hl7relay messages show 1, hl7relay replay 1"]
    assert [level for level, text in lines if "dead letter" in text] == ["warn"]


def test_support_verbs_run_elsewhere_see_the_running_engines_channels(tmp_path, running_engine, capsys, monkeypatch):
    """Run away from the engine's folder, status called its running channels 'not in the channel files'."""
    (tmp_path / "site").mkdir()
    engine = running_engine(tmp_path / "site", "--admin-port", "0", "--console-port", "0")
    try:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        code, out = cli(capsys, "status", "--data-dir", str(tmp_path / "site" / "data"))
    finally:
        assert engine.stop() == 0
    assert code == 0 and "adt:" in out and "not in the channel files" not in out, out


@pytest.mark.parametrize("verb", [["messages", "list"], ["messages", "search"], ["prune", "--older-than", "30d", "--dry-run"],
                                  ["replay", "--dry-run"]])
def test_an_unknown_channel_is_an_error_not_no_messages_match(env, capsys, verb):
    """A typo in --channel exited 0 with "no messages match"."""
    tmp_path, store = env
    write_channel(tmp_path)
    add(store, "M1")
    code = main([*verb, "--channel", "atd"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "no channel 'atd' (did you mean 'adt'): channels are adt"
    assert main([*verb, "--channel", "adt"]) in (0, 1)  # a channel that exists: no such complaint
    assert "no channel" not in capsys.readouterr().err


def test_send_names_an_unreadable_input_in_one_line(tmp_path, capsys):
    """`hl7relay send nosuch.hl7` printed a traceback."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "hl7relay", "send", "--port", "9", str(tmp_path / "nosuch.hl7")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip() == f"{tmp_path / 'nosuch.hl7'}: cannot read it (No such file or directory)"


@pytest.mark.parametrize("text, shown", [
    ("MSH-9.2: 'A99' is not an event of ADT", "MSH-9.2: 'A99' is not an event of ADT"),  # the answer support needs
    ("transformer 1: format_date PID-7: '19800412' does not match", "transformer 1: format_date PID-7: '1***' does not match"),
    ("OBX[2]-5: 'positive for HIV'", "OBX[2]-5: 'p***'"),
    ("NTE-3: 'called the patient at home'", "NTE-3: 'c***'"),
    ("PV1-2 'X' is not in table 0004; NK1-2 'ROE' is too long", "PV1-2 'X' is not in table 0004; NK1-2 '***' is too long"),
    ("AE: unknown patient 'DOE^JANE'", "AE: unknown patient 'D***'"),  # no field named: masked
])
def test_quoted_values_are_masked_by_the_field_they_belong_to(text, shown):
    """Every quoted value was masked: 'MSH-9.2: 'A***' is not an event' told support nothing."""
    from hl7relay.ops.phi import mask_text

    assert mask_text(text) == shown
