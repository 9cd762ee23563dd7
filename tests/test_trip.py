"""A message's trip (trip.py): each step testable alone, in order: received, processed, committed,
answered, delivered; the config it started with kept to the end."""

import textwrap

from twisted.internet import defer, task

from hl7relay.channels import load_channel
from hl7relay.hl7.message import Message
from hl7relay.outcomes import DeliveryResult
from hl7relay.runtime import Engine
from hl7relay.store.database import Store, StoreError
from hl7relay.store.writer import StoreWriter
from hl7relay.trip import ANSWERED, COMMITTED, DELIVERED, NOT_STORED, PROCESSED, RECEIVED, Trip

ADT = ("MSH|^~\\&|PMS|CLINIC|HL7RELAY|LAB|20240105093512||ADT^A01^ADT_A01|{id}|P|2.5.1{extra}\r"
       "EVN|A01|20240105093512\rPID|1||100234^^^CLINIC^MR||DOE^JANE\rPV1|1|O\r")


def make_engine(tmp_path, executor, body=""):
    """An engine on a task.Clock whose store work runs when the test says (executor.run_all)."""
    path = tmp_path / "ch.yaml"
    path.write_text("name: ch\nsource: {type: mllp, port: 0}\n" + textwrap.dedent(body))
    channel, errors = load_channel(path, {})
    assert not errors, errors
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.migrate()
    clock = task.Clock()
    engine = Engine([channel], StoreWriter(store, clock, executor=executor), reactor=clock, clock=lambda: 1700000000.0)
    return engine, channel, store, executor


def trip_of(engine, channel, control_id="T1", peer="10.0.0.1:5000"):
    return Trip(engine.resources, engine.channels[channel.name], channel, Message(ADT.format(id=control_id, extra="")), peer)


def test_received_reads_the_header_before_any_transformer(tmp_path, manual_executor):
    engine, channel, store, _ = make_engine(tmp_path, manual_executor, """
        transformers: [{set: {path: MSH-3, value: CHANGED}}, {set: {path: PID-3.1, value: X}}]
    """)
    trip = trip_of(engine, channel)
    assert trip.stage == RECEIVED and trip.received_at == 1700000000.0
    assert trip.header["sending_application"] == "PMS" and trip.header["patient_id"] == "100234"
    assert trip.header["message_type"] == "ADT^A01" and trip.header["control_id"] == "T1"
    record = trip.process()
    # processed: the record that will be committed, the store not touched yet, the header as received
    assert trip.stage == PROCESSED and store.count() == 0
    assert record.sending_application == "PMS" and Message.from_bytes(record.stages["transformed"]).get("MSH-3") == "CHANGED"
    assert trip.status == "PROCESSED" and trip.outcome.acks and "pipeline" in trip.timings


def test_committed_before_answered(tmp_path, manual_executor):
    engine, channel, store, executor = make_engine(tmp_path, manual_executor, """
        destinations: [{name: out, type: file, directory: out}]
    """)
    trip = trip_of(engine, channel)
    answered = []
    trip.run().addCallback(answered.append)
    assert trip.stage == PROCESSED and answered == [] and store.count() == 0
    executor.run_all()
    assert trip.stage == ANSWERED and trip.message_id == 1 and store.count() == 1
    [outcome] = answered
    assert outcome is trip.outcome and Message.from_bytes(outcome.acks[0]).get("MSA-1") == "AA"
    assert [d["message_id"] for d in store.queued_deliveries("ch", "out")] == [1] and "store" in trip.timings


def test_a_failed_commit_is_answered_never_aa(tmp_path, manual_executor):
    engine, channel, store, executor = make_engine(tmp_path, manual_executor)
    engine.writer.write = lambda record: defer.fail(StoreError("disk full"))
    answered = []
    trip = trip_of(engine, channel)
    trip.run().addCallback(answered.append)
    [outcome] = answered
    assert Message.from_bytes(outcome.acks[0]).get("MSA-1") == "AR" and store.count() == 0
    assert trip.status == NOT_STORED and trip.stage == ANSWERED


def test_the_config_a_trip_started_with_is_kept_when_the_channel_changes(tmp_path, manual_executor):
    engine, channel, store, executor = make_engine(tmp_path, manual_executor, """
        transformers: [{set: {path: MSH-5, value: OLD}}]
    """)
    trip = trip_of(engine, channel)
    (tmp_path / "ch.yaml").write_text((tmp_path / "ch.yaml").read_text().replace("OLD", "NEW"))
    changed, errors = load_channel(tmp_path / "ch.yaml", {})
    assert not errors
    engine.channels["ch"].channel = changed  # what a reload does for a changed channel: the next message takes it
    trip.run()
    executor.run_all()
    assert trip.stage == ANSWERED
    assert Message.from_bytes(store.get_message(1)["stages"]["transformed"]).get("MSH-5") == "OLD"
    engine.handle(changed, Message(ADT.format(id="T2", extra="")), "peer")
    executor.run_all()
    assert Message.from_bytes(store.get_message(2)["stages"]["transformed"]).get("MSH-5") == "NEW"


def test_after_delivery_the_trip_is_delivered_then_answered(tmp_path, manual_executor):
    engine, channel, store, executor = make_engine(tmp_path, manual_executor, """
        response: {when: after_delivery}
        destinations: [{name: out, type: file, directory: out}]
    """)
    queue = engine.channels["ch"].queues["out"]
    first = defer.Deferred()
    queue.first_result = lambda message_id: first
    trip = trip_of(engine, channel)
    answered = []
    trip.run().addCallback(answered.append)
    executor.run_all()
    assert trip.stage == COMMITTED and answered == []  # committed, waiting for the destination
    first.callback(DeliveryResult(ok=True))
    assert trip.stage == DELIVERED and answered == []  # the destinations answered; their ACK code is being recorded
    executor.run_all()
    assert trip.stage == ANSWERED and Message.from_bytes(answered[0].acks[0]).get("MSA-1") == "AA"
    assert store.get_message(1)["ack_code"] == "AA"


def test_stored_findings_are_the_json_of_each_finding_whatever_was_seen_before(samples):
    import json

    from hl7relay.hl7.message import Message
    from hl7relay.trip import _findings_json
    from hl7relay.validation import Validator

    validator = Validator(strict=True)
    findings = []
    for path in sorted(samples.rglob("*.hl7")):
        try:
            findings += validator.validate(Message.from_bytes(path.read_bytes())).findings
        except Exception:  # noqa: BLE001 - unreadable samples give no findings here
            continue
    assert len(findings) > 5  # the malformed samples: enough kinds of finding to serialise
    expected = [{"severity": f.severity.value, "code": int(f.code), "location": f.path, "text": f.text}
                for f in findings[:200]]
    for _ in range(2):  # cold, then from the kept parts
        stored = _findings_json(findings)
        assert stored == json.dumps(expected).encode() and json.loads(stored) == expected
    assert _findings_json([]) == b"[]"
