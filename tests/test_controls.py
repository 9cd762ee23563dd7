"""Operators' controls on a running engine: enable/disable channels, pause/resume/retry destinations."""

import textwrap

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from hl7relay.channels import load_channel
from hl7relay.hl7.message import Message
from hl7relay.outcomes import DeliveryOutcome
from hl7relay.queues import DeliveryResult
from hl7relay.runtime import Engine
from hl7relay.store.database import Store
from hl7relay.store.writer import StoreWriter

ADT = ("MSH|^~\\&|PMS|CLINIC|HL7RELAY|LAB|20240105093512||ADT^A01^ADT_A01|{id}|P|2.5.1\r"
       "EVN|A01|20240105093512\rPID|1||100234^^^CLINIC^MR||DOE^JANE\rPV1|1|O\r")


def make(tmp_path, controls=None):
    path = tmp_path / "ch.yaml"
    path.write_text(textwrap.dedent("""\
        name: ch
        source: {type: mllp, port: 0}
        destinations: [{name: lab, type: file, directory: out, retry_initial: 60, retry_max: 60}]
    """))
    channel, errors = load_channel(path, {})
    assert not errors
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.migrate()
    for control in controls or ():
        store.set_control(*control, on=True, actor="test", audit=None)
    reactor = MemoryReactorClock()
    writer = StoreWriter(store, reactor, executor=lambda fn, *a: defer.maybeDeferred(fn, *a))
    engine = Engine([channel], writer, reactor=reactor, clock=reactor.seconds)
    delivered, answers = [], []

    def peer(message):
        delivered.append(message.control_id)
        return answers.pop(0) if answers else DeliveryResult(True, ack="AA")

    engine.channels["ch"].queues["lab"].deliver = peer
    engine._deliver[("ch", "lab")] = peer
    return engine, channel, store, reactor, delivered, answers


def send(engine, channel, control_id):
    results = []
    engine.handle(channel, Message(ADT.format(id=control_id)), "peer").addCallback(results.append)
    return results


def run(reactor, seconds):
    for _ in range(int(seconds * 10)):
        reactor.advance(0.1)


def test_a_paused_destination_keeps_queueing_and_sends_in_order_when_resumed(tmp_path):
    engine, channel, store, reactor, delivered, _ = make(tmp_path)
    engine.start()
    engine.set_destination_paused("ch", "lab", True, actor="user:ops", audit={"actor": "user:ops", "action": "destination.pause", "target": "ch/lab"})
    for i in range(3):
        send(engine, channel, f"P{i}")
    run(reactor, 3)
    view = engine.channel_view("ch")["destinations"]["lab"]
    assert delivered == [] and view["paused"] and view["depth"] == 3
    engine.set_destination_paused("ch", "lab", False, actor="user:ops")
    run(reactor, 1)
    assert delivered == ["P0", "P1", "P2"]
    assert [e["action"] for e in store.audit_entries()] == ["destination.pause"]


def test_retry_now_skips_the_backoff(tmp_path):
    engine, channel, store, reactor, delivered, answers = make(tmp_path)
    engine.start()
    answers.append(DeliveryResult(False, error="connection_failed: refused", outcome=DeliveryOutcome.UNREACHABLE))
    send(engine, channel, "R1")
    run(reactor, 5)
    assert delivered == ["R1"] and engine.channel_view("ch")["destinations"]["lab"]["head"]["next_attempt_in"] > 20
    view = engine.retry_now("ch", "lab").result
    assert view["retried_now"] == 1
    run(reactor, 0.5)
    assert delivered == ["R1", "R1"] and engine.channel_view("ch")["destinations"]["lab"]["depth"] == 0


def test_a_disabled_channel_stops_listening_and_its_deliveries_wait_for_it(tmp_path):
    engine, channel, store, reactor, delivered, _ = make(tmp_path)
    engine.start()
    assert len(reactor.tcpServers) == 1 and engine.channel_view("ch")["enabled"]
    engine.channels["ch"].queues["lab"].pause()
    send(engine, channel, "D1")
    run(reactor, 1)
    engine.set_channel_enabled("ch", False, actor="user:ops")
    run(reactor, 1)
    view = engine.channel_view("ch")
    assert not view["enabled"] and view["address"] == "" and delivered == []
    assert ("ch", "", "disabled") in store.controls()
    engine.set_channel_enabled("ch", True, actor="user:ops")
    assert len(reactor.tcpServers) == 2  # listening again
    engine.set_destination_paused("ch", "lab", False)
    run(reactor, 3)
    assert delivered == ["D1"] and ("ch", "", "disabled") not in store.controls()


def test_controls_survive_a_restart(tmp_path):
    engine, channel, store, reactor, delivered, _ = make(tmp_path, controls=[("ch", "", "disabled"), ("ch", "lab", "paused")])
    lines = engine.start()
    assert lines == ["channel ch: disabled (hl7relay channel enable ch)"] and reactor.tcpServers == []
    view = engine.channel_view("ch")
    assert not view["enabled"] and view["destinations"]["lab"]["paused"]


def test_reloads_asked_for_at_once_run_one_after_the_other(tmp_path):
    """Two SIGHUPs in a row: the second waits for the first, then runs (no overlap, no recursion)."""
    engine, channel, store, reactor, delivered, _ = make(tmp_path)
    engine.start()
    engine.channel_paths = [str(tmp_path / "ch.yaml")]
    first = engine.reload_from_files("test")
    second = engine.reload_from_files("test")
    third = engine.reload_from_files("test")
    run(reactor, 3)
    results = [d.result for d in (first, second, third)]
    assert all(r["unchanged"] == ["ch"] for r in results), results


def test_a_trace_for_fhir_follows_fhir_destinations_and_any_ending_in_a_fhir_transformer(tmp_path):
    from hl7relay.controls import Controls
    from hl7relay.ops.trace import CONTENT_KINDS

    path = tmp_path / "ch.yaml"
    path.write_text(textwrap.dedent("""\
        name: ch
        source: {type: mllp, port: 0}
        destinations:
          - {name: lab, type: file, directory: out}
          - {name: bundles, type: file, directory: fhir, transformers: [{fhir: {}}]}
          - {name: ehr, type: fhir, url: 'https://127.0.0.1:1/fhir'}
    """))
    channel, errors = load_channel(path, {})
    assert not errors, errors
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.migrate()
    reactor = MemoryReactorClock()
    engine = Engine([channel], StoreWriter(store, reactor, executor=lambda fn, *a: defer.maybeDeferred(fn, *a)),
                    reactor=reactor, clock=reactor.seconds)
    controls = Controls(engine)
    assert controls.carrying(CONTENT_KINDS["fhir"]) == (set(), {("ch", "bundles"), ("ch", "ehr")})
    assert controls.carrying(CONTENT_KINDS["file"]) == (set(), {("ch", "lab"), ("ch", "bundles")})
    assert controls.carrying(CONTENT_KINDS["api"]) == (set(), {("ch", "ehr")})
    store.close()
