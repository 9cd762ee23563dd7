"""The engine: stored before ACK, store failure never AA, outcomes stored; end to end over sockets."""

import os
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from twisted.internet import defer, task

from hl7relay.ack import Status
from hl7relay.channels import load_channel
from hl7relay.hl7.message import Message
from hl7relay.outcomes import DeliveryOutcome
from hl7relay.runtime import Engine
from hl7relay.store.database import Store, StoreError
from hl7relay.store.writer import StoreWriter

ADT = ("MSH|^~\\&|PMS|CLINIC|HL7RELAY|LAB|20240105093512||ADT^A01^ADT_A01|{id}|P|2.5.1{extra}\r"
       "EVN|A01|20240105093512\rPID|1||100234^^^CLINIC^MR||DOE^JANE\rPV1|1|O\r")


def make_engine(tmp_path, executor, body="", store=None):
    path = tmp_path / "ch.yaml"
    path.write_text("name: ch\nsource: {type: mllp, port: 12650}\n" + textwrap.dedent(body))
    channel, errors = load_channel(path, {})
    assert not errors, errors
    store = store or Store(f"sqlite:///{tmp_path / 's.db'}")
    store.migrate()
    reactor = task.Clock()
    engine = Engine([channel], StoreWriter(store, reactor, executor=executor), reactor=reactor, clock=lambda: 1700000000.0)
    return engine, channel, store, executor


def answer(engine, channel, text):
    results = []
    engine.handle(channel, Message(text), "10.0.0.1:5000").addCallback(results.append)
    return results


def ack_codes(outcome):
    return [Message.from_bytes(a).get("MSA-1") for a in outcome.acks]


def test_the_ack_waits_for_the_commit(tmp_path, manual_executor):
    engine, channel, store, executor = make_engine(tmp_path, manual_executor)
    results = answer(engine, channel, ADT.format(id="M1", extra=""))
    assert results == [] and store.count() == 0  # not durable yet: nothing answered
    executor.run_all()
    [outcome] = results
    assert outcome.status is Status.ACCEPTED and ack_codes(outcome) == ["AA"]
    stored = store.get_message(1)
    assert stored["status"] == "PROCESSED" and stored["ack_code"] == "AA" and stored["peer"] == "10.0.0.1:5000"
    assert Message.from_bytes(stored["stages"]["ack"]).get("MSA-2") == "M1"  # the very ACK that is sent


def test_a_destination_copy_is_stored_only_when_it_differs(tmp_path, manual_executor):
    engine, channel, store, executor = make_engine(tmp_path, manual_executor, """
        transformers: [{set: {path: MSH-5, value: LAB}}]
        destinations:
          - {name: same, type: file, directory: out}
          - name: own
            type: file
            directory: out
            transformers: [{set: {path: MSH-6, value: WARD}}]
    """)
    answer(engine, channel, ADT.format(id="M1", extra=""))
    executor.run_all()
    stored = store.get_message(1)
    assert set(stored["stages"]) == {"transformed", "ack", "destination:own"}  # 'same' is the transformed message
    [row_same] = store.queued_deliveries("ch", "same")
    [row_own] = store.queued_deliveries("ch", "own")
    # what a restarted queue sends: its own copy, else the transformed stage
    assert row_same["content"] == stored["stages"]["transformed"]
    assert Message.from_bytes(row_same["content"]).get("MSH-5") == "LAB"
    assert Message.from_bytes(row_own["content"]).get("MSH-6") == "WARD"
    assert Message.from_bytes(row_own["content"]).get("MSH-5") == "LAB"


class FailingStore(Store):
    def commit(self, records, updates):
        raise StoreError("disk full")


@pytest.mark.parametrize("extra, expected", [("", ["AR"]), ("|||AL|AL", ["CR"]), ("|||NE|AL", [])])
def test_a_store_failure_is_never_aa(tmp_path, manual_executor, extra, expected):
    engine, channel, _, executor = make_engine(tmp_path, manual_executor, store=FailingStore(f"sqlite:///{tmp_path / 'f.db'}"))
    results = answer(engine, channel, ADT.format(id="M1", extra=extra))
    executor.run_all()
    [outcome] = results
    assert outcome.status is Status.INTERNAL_ERROR
    codes = [Message.from_bytes(a).get("MSA-1") for a in engine.channels["ch"].policy.acks(Message(ADT.format(id="M1", extra=extra)), outcome)]
    assert codes == expected and "AA" not in codes and "CA" not in codes


def test_filtered_and_error_messages_are_stored_with_their_outcome(tmp_path, manual_executor):
    engine, channel, store, executor = make_engine(tmp_path, manual_executor, """\
        filters: [{event: [A01]}]
        transformers: [{format_date: {path: PID-5.1, output: "%Y"}}]
        """)
    filtered = answer(engine, channel, ADT.format(id="F1", extra="").replace("ADT^A01^", "ADT^A08^"))
    failed = answer(engine, channel, ADT.format(id="E1", extra=""))
    executor.run_all()
    assert ack_codes(filtered[0]) == ["AR"] and ack_codes(failed[0]) == ["AE"]
    rows = {m["control_id"]: m for m in store.latest()}
    assert rows["F1"]["status"] == "FILTERED" and rows["F1"]["ack_code"] == "AR"
    assert rows["E1"]["status"] == "ERROR" and "PID-5.1" in rows["E1"]["error"] and rows["E1"]["ack_code"] == "AE"
    assert Message.from_bytes(store.get_message(rows["E1"]["id"])["raw"]).get("PID-5.1") == "DOE"  # raw untouched


def test_storage_policy_controls_the_stages(tmp_path, manual_executor):
    engine, channel, store, executor = make_engine(tmp_path, manual_executor, """\
        transformers: [{set: {path: MSH-5, value: X}}]
        storage: {stages: []}
        """)
    answer(engine, channel, ADT.format(id="S1", extra=""))
    executor.run_all()
    assert store.get_message(1)["stages"] == {}


# -- end to end: hl7relay run, hl7relay listen, hl7relay send, over loopback ---------------------------
READY = "ready; Ctrl-C or SIGTERM stops"  # the engine's ready line, whole: "ready" alone matches "Address already in use"


def wait_for_line(process, fragment, timeout=30):
    """Lines the process printed until one contains ``fragment`` (reads the pipe's fd directly).
    What was read past that line stays with the process object: keyed by the fd number, it was
    read again by a later process whose pipe got the same number (a stale 'ready')."""
    fd = process.stdout.fileno()
    os.set_blocking(fd, False)
    selector = selectors.DefaultSelector()
    selector.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        buffer = getattr(process, "_unread", b"")
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            process._unread = buffer
            seen.append(line.decode(errors="replace") + "\n")
            if fragment in seen[-1]:
                return seen
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not selector.select(remaining):
            raise AssertionError(f"{fragment!r} not seen; output so far: {''.join(seen)}")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise AssertionError(f"{fragment!r} not seen before the process ended: {''.join(seen)}")
        process._unread = getattr(process, "_unread", b"") + chunk


def test_end_to_end_stored_then_delivered_to_a_file_and_an_mllp_receiver(tmp_path, samples):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    lab = subprocess.Popen([sys.executable, "-m", "hl7relay", "listen", "--port", "0"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    engine = None
    try:
        lab_port = int("".join(wait_for_line(lab, "MLLP on")).split("MLLP on 127.0.0.1:")[1].split()[0])
        channels = tmp_path / "channels"
        channels.mkdir()
        (channels / "adt.yaml").write_text(textwrap.dedent(f"""\
            name: adt
            source: {{type: mllp, port: 0}}
            filters: [{{message_type: ADT}}]
            transformers: [{{set: {{path: MSH-5, value: LAB}}}}]
            destinations:
              - {{name: lab, type: mllp, host: 127.0.0.1, port: {lab_port}, order: per_key, parallel: 3}}
              - {{name: files, type: file, directory: "{tmp_path / 'out'}", filename: "{{MSH-10}}.hl7"}}
            """))
        engine = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--channels", str(channels),
                                   "--data-dir", str(tmp_path / "data"), "--admin-port", "0", "--console-port", "0"], cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        startup = "".join(wait_for_line(engine, READY))
        engine_port = int(startup.split("MLLP on 127.0.0.1:")[1].split()[0])
        assert f"channel adt: MLLP on 127.0.0.1:{engine_port} -> lab (mllp), files (file)" in startup
        messages = [samples / "adt_a01.hl7", samples / "adt_a04.hl7", samples / "adt_a08.hl7"]
        sent = subprocess.run([sys.executable, "-m", "hl7relay", "send", "--port", str(engine_port), *map(str, messages)],
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        received = "".join(wait_for_line(lab, "MSG00004"))
        # one patient: in order of receipt, even with three connections to the lab
        assert [received.index(f" {cid} ") for cid in ("MSG00001", "MSG00003", "MSG00004")] == sorted(
            received.index(f" {cid} ") for cid in ("MSG00001", "MSG00003", "MSG00004"))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(list((tmp_path / "out").glob("*.hl7"))) < 3:
            time.sleep(0.1)
        assert sorted(p.name for p in (tmp_path / "out").glob("*.hl7")) == ["MSG00001.hl7", "MSG00003.hl7", "MSG00004.hl7"]
        assert Message.from_bytes((tmp_path / "out" / "MSG00001.hl7").read_bytes()).get("MSH-5") == "LAB"
        engine.send_signal(signal.SIGTERM)
        out = "".join(wait_for_line(engine, "stopped:"))
        assert engine.wait(timeout=30) == 0 and "stopped: in-flight messages finished, store flushed" in out
    finally:
        for process in (engine, lab):
            if process is None:
                continue
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
            process.stdout.close()
    store = Store(f"sqlite:///{tmp_path / 'data' / 'hl7relay.db'}")
    rows = store.latest()
    assert [r["control_id"] for r in rows] == ["MSG00004", "MSG00003", "MSG00001"]
    assert all(r["status"] == "PROCESSED" for r in rows)
    deliveries = store.get_message(rows[-1]["id"])["deliveries"]
    assert {(d["destination"], d["status"]) for d in deliveries} == {("lab", "SENT"), ("files", "SENT")}


def test_run_refuses_to_start_on_lint_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: bad\nsource: {type: mllp, port: nope}\n")
    result = subprocess.run([sys.executable, "-m", "hl7relay", "run", "--channels", str(tmp_path), "--data-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "bad.yaml:2:28: port must be a whole number" in result.stderr
    assert "not starting" in result.stderr


def file_engine(tmp_path, after="move"):
    inbox = tmp_path / "inbox"
    path = tmp_path / "files.yaml"
    path.write_text(f"name: files\nsource: {{type: file, directory: '{inbox}', poll_interval: 2, settle: 1, after: {after}}}\n")
    channel, errors = load_channel(path, {})
    assert not errors, errors
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.migrate()
    clock = task.Clock()
    engine = Engine([channel], StoreWriter(store, executor=lambda fn, *a: defer.maybeDeferred(fn, *a)), reactor=clock)
    assert engine.start() == [f"channel files: files *.hl7 in {inbox} -> no destinations"]
    return engine, store, clock, inbox


def test_file_source_reads_batches_once_they_are_complete_then_moves_them(tmp_path, samples):
    engine, store, clock, inbox = file_engine(tmp_path)
    batch = (samples / "batch_adt.hl7").read_bytes()
    target = inbox / "drop.hl7"
    target.write_bytes(batch[:100])  # a sender is still writing it
    clock.advance(2)
    target.write_bytes(batch[:300])
    clock.advance(2)
    assert store.count() == 0  # it changed since the last look: not read
    target.write_bytes(batch)
    clock.advance(2)
    assert store.count() == 0  # unchanged for less than a look: still waiting
    clock.advance(2)
    assert [m["control_id"] for m in store.latest()] == ["MSG00102", "MSG00101"]
    assert not target.exists() and (inbox / "processed" / "drop.hl7").read_bytes() == batch
    clock.advance(10)
    assert store.count() == 2  # read once


def test_file_source_can_delete_and_leaves_unstored_files(tmp_path, samples):
    engine, store, clock, inbox = file_engine(tmp_path, after="delete")
    (inbox / "a.hl7").write_bytes((samples / "adt_a01.hl7").read_bytes())
    clock.advance(2)
    clock.advance(2)
    assert store.count() == 1 and not (inbox / "a.hl7").exists()

    def refuse(records, updates):
        raise StoreError("database down")

    store.commit = refuse
    (inbox / "b.hl7").write_bytes((samples / "adt_a03.hl7").read_bytes())
    for _ in range(3):
        clock.advance(2)
    assert (inbox / "b.hl7").exists()  # not stored, so not deleted: read again on a later look


DUPLICATES = """\
duplicates: {window: 3600}
destinations: [{name: out, type: file, directory: out}]
"""


def test_duplicates_are_stored_not_processed_and_answered_like_the_original(tmp_path, manual_executor):
    engine, channel, store, executor = make_engine(tmp_path, manual_executor, DUPLICATES)
    first = answer(engine, channel, ADT.format(id="D1", extra=""))
    second = answer(engine, channel, ADT.format(id="D1", extra=""))  # arrives while the first is being stored
    executor.run_all()
    assert ack_codes(first[0]) == ["AA"] and ack_codes(second[0]) == ["AA"]
    third = answer(engine, channel, ADT.format(id="D1", extra=""))
    other = answer(engine, channel, ADT.format(id="D2", extra=""))
    executor.run_all()
    assert ack_codes(third[0]) == ["AA"] and ack_codes(other[0]) == ["AA"]
    rows = {(r["control_id"], r["status"]) for r in store.latest(10)}
    assert rows == {("D1", "PROCESSED"), ("D1", "DUPLICATE"), ("D2", "PROCESSED")} and store.count(status="DUPLICATE") == 2
    duplicate = next(r for r in store.latest(10) if r["status"] == "DUPLICATE")
    stored = store.get_message(duplicate["id"])
    assert stored["deliveries"] == [] and stored["error"] == "duplicate of message 1"


@pytest.mark.parametrize("first, resend, expected", [
    ("", "|||AL|AL", ["CA", "AA"]),  # the original in original mode, the resend in enhanced mode
    ("|||AL|NE", "", ["AA"]),  # and the other way round
    ("|||AL|AL", "|||NE|AL", ["AA"]),  # enhanced both times: the resend's own MSH-15/16
])
def test_a_duplicate_is_answered_in_the_mode_of_the_resend(tmp_path, manual_executor, first, resend, expected):
    """A duplicate was answered with the first copy's code (CA to a sender in original mode, AA to
    one in enhanced mode): a sender reads the codes of its own mode only."""
    engine, channel, store, executor = make_engine(tmp_path, manual_executor, DUPLICATES)
    answer(engine, channel, ADT.format(id="D1", extra=first))
    executor.run_all()
    again = answer(engine, channel, ADT.format(id="D1", extra=resend))
    executor.run_all()
    assert ack_codes(again[0]) == expected and store.count(status="DUPLICATE") == 1


def test_a_resend_after_a_request_to_resend_is_processed_not_taken_for_a_duplicate(tmp_path, manual_executor):
    """The first copy was answered AR (send it again); its resend was answered AR again as its
    duplicate, for ever."""
    engine, channel, store, executor = make_engine(tmp_path, manual_executor, DUPLICATES + "filters: [{field: {path: PID-8, exists: true}}]\n")
    first = answer(engine, channel, ADT.format(id="D1", extra=""))  # filtered: AR
    executor.run_all()
    assert ack_codes(first[0]) == ["AR"]
    resend = answer(engine, channel, ADT.format(id="D1", extra="").replace("DOE^JANE", "DOE^JANE||19700101|F"))
    executor.run_all()
    assert ack_codes(resend[0]) == ["AA"] and store.count(status="DUPLICATE") == 0


def test_a_repeat_outside_the_window_is_processed(tmp_path, manual_executor):
    engine, channel, store, executor = make_engine(tmp_path, manual_executor, DUPLICATES)
    now = [1700000000.0]
    engine.clock = lambda: now[0]
    answer(engine, channel, ADT.format(id="W1", extra=""))
    executor.run_all()
    now[0] += 7200
    answer(engine, channel, ADT.format(id="W1", extra=""))
    executor.run_all()
    assert store.count(status="PROCESSED") == 2 and store.count(status="DUPLICATE") == 0


@pytest.mark.parametrize("log_phi", [False, True])
def test_message_content_is_logged_only_with_log_phi(tmp_path, manual_executor, log_phi):
    from twisted.logger import globalLogPublisher

    captured = []
    globalLogPublisher.addObserver(captured.append)
    try:
        engine, channel, store, executor = make_engine(tmp_path, manual_executor, f"log_phi: {str(log_phi).lower()}\n")
        engine.log_phi_bytes = 40
        answer(engine, channel, ADT.format(id="L1", extra=""))
        executor.run_all()
    finally:
        globalLogPublisher.removeObserver(captured.append)
    about_message = [e for e in captured if e.get("control_id") == "L1"]
    assert about_message and all(e.get("channel") == "ch" for e in about_message)
    contents = [e["content"] for e in about_message if "content" in e]
    if log_phi:
        assert contents and len(contents[0]) <= 40 and contents[0].startswith("MSH|")
    else:
        assert not contents and not any("DOE" in str(e) for e in captured)


def test_undecodable_bytes_in_msh10_and_pid3_are_stored_and_answered_aa(tmp_path, manual_executor):
    engine, channel, store, executor = make_engine(tmp_path, manual_executor, """
        duplicates: {window: 86400}
        destinations: [{name: lab, type: file, directory: out, filename: "{MSH-10}.hl7"}]
    """)
    raw = ADT.format(id="M@@", extra="").replace("100234", "10##34").encode()
    raw = raw.replace(b"@@", b"\xe9\x00").replace(b"##", b"\xff")  # not UTF-8, and no MSH-18
    results = []
    for _ in range(2):
        engine.handle(channel, Message.from_bytes(raw), "10.0.0.1:5000").addCallback(results.append)
        executor.run_all()
    assert [ack_codes(o) for o in results] == [["AA"], ["AA"]]
    assert Message.from_bytes(results[0].acks[0]).get("MSA-2") == Message.from_bytes(raw).control_id
    first, second = store.get_message(1), store.get_message(2)
    assert first["raw"] == raw and first["status"] == "PROCESSED" and second["status"] == "DUPLICATE"
    assert [r["id"] for r in store.search(patient_id="10\\xff34")] == [2, 1]


# -- hostile input over MLLP: every frame gets an answer, and nobody else waits for it ---------------
def _start_engine(tmp_path, channel_yaml):
    channels = tmp_path / "channels"
    channels.mkdir()
    (channels / "ch.yaml").write_text(textwrap.dedent(channel_yaml))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    engine = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--channels", str(channels),
                               "--data-dir", str(tmp_path / "data"), "--admin-port", "0", "--console-port", "0"], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    startup = "".join(wait_for_line(engine, READY))
    port = int(startup.split("MLLP on 127.0.0.1:")[1].split()[0])
    return engine, port


def _stop_engine(engine):
    engine.send_signal(signal.SIGTERM)
    try:
        assert engine.wait(timeout=30) == 0
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()
        engine.stdout.close()


def _answers(sock, framer, timeout=10.0):
    """The ACK frames that arrive within ``timeout`` of asking (at least one, else fails)."""
    from hl7relay.mllp.framing import Frame

    sock.settimeout(timeout)
    frames = []
    while not frames:
        data = sock.recv(65536)
        assert data, "the engine closed the connection without answering"
        frames += [e.payload for e in framer.feed(data) if isinstance(e, Frame)]
    return frames


def test_a_message_with_a_digit_field_separator_is_answered_and_others_keep_being_served(tmp_path):
    """MSH-1 '1' made Message.set() loop for ever adding a PV1 it could never find: the reactor
    stopped, every connection hung and SIGTERM was ignored."""
    from hl7relay.mllp.framing import MLLPFramer, frame

    engine, port = _start_engine(tmp_path, """\
        name: ch
        source: {type: mllp, port: 0}
        transformers:
          - set: {path: MSH-5, value: LAB}
          - set: {path: PV1-2, value: U}
          - upper: PID-5.1
    """)
    try:
        hostile = b"MSH1^~\\&1PMS1CLINIC1X1Y111ADT^A041HANG1P12.5\rPID111ID77\r"  # no PV1
        normal = ADT.format(id="OK1", extra="").replace("PV1|1|O\r", "").encode()
        with socket.create_connection(("127.0.0.1", port)) as a, socket.create_connection(("127.0.0.1", port)) as b:
            a.sendall(frame(hostile))
            b.sendall(frame(normal))
            [answer_b] = _answers(b, MLLPFramer())
            [answer_a] = _answers(a, MLLPFramer())
        assert (Message.from_bytes(answer_b).get("MSA-1"), Message.from_bytes(answer_b).get("MSA-2")) == ("AA", "OK1")
        reply = Message.from_bytes(answer_a)
        assert reply.get("MSA-2") == "HANG" and reply.get("MSH-5") == "PMS" and reply.get("MSA-1") in ("AA", "AE", "AR")
    finally:
        _stop_engine(engine)


def _mutations(seed: int, count: int):
    """Mutated frames that each call for an answer: the chaos suite's generator (bench/chaos), on
    bases of this file's own."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "chaos"))
    from harness import mutations

    bases = [ADT.format(id="F1", extra="").encode(),
             ADT.format(id="F2", extra="|||AL|NE||UNICODE UTF-8").encode(),
             b"MSH|^~\\&|A|B|C|D|20240101||ORU^R01|F3|P|2.3\rPID|1||9\rOBX|1|NM|x||5\r"]
    return mutations(seed, count, bases)


def test_every_fuzzed_frame_gets_an_answer(tmp_path):
    from hl7relay.mllp.framing import MLLPFramer, frame

    engine, port = _start_engine(tmp_path, """\
        name: ch
        source: {type: mllp, port: 0}
        validators: [{structure: {on_error: warn}}]
        destinations: [{name: out, type: file, directory: out}]
    """)
    answered = 0
    try:
        sock = socket.create_connection(("127.0.0.1", port))
        framer = MLLPFramer()
        for n, payload in enumerate(_mutations(seed=11, count=1500)):
            sock.sendall(frame(payload))
            try:
                _answers(sock, framer)
            except (OSError, AssertionError) as exc:
                raise AssertionError(f"frame {n} got no answer ({exc}): {payload!r}") from None
            answered += 1
        sock.close()
    finally:
        _stop_engine(engine)
    assert answered > 1000


# -- response.when: after_delivery --------------------------------------------------------------------
def _after_delivery_engine(tmp_path, answers):
    from hl7relay.queues import DeliveryResult

    engine, channel, store, _ = make_engine(tmp_path, lambda fn, *a: defer.maybeDeferred(fn, *a), """
        response: {when: after_delivery}
        destinations:
          - {name: lab, type: file, directory: out, retry_initial: 1, retry_max: 1}
          - {name: billing, type: file, directory: out2, retry_initial: 1, retry_max: 1}
    """)
    received = {"lab": [], "billing": []}
    engine.clock = engine.reactor.seconds  # time moves in these tests, for the engine and its queues alike
    for name, queue in engine.channels["ch"].queues.items():
        queue.clock = engine.reactor.seconds
        def deliver(message, name=name):
            received[name].append(message.control_id)
            script = answers[name]
            return script.pop(0) if script else DeliveryResult(True, ack="AA")
        queue.deliver = deliver
        queue.start()  # the queues alone: no listener on a task.Clock
    return engine, channel, store, received


def _run(engine, seconds):
    for _ in range(int(seconds * 10)):
        engine.reactor.advance(0.1)


def test_after_delivery_a_request_to_resend_withdraws_the_failed_copy(tmp_path):
    """The sender was answered CR ("send it again") while the engine kept the message queued too,
    so the lab later got it twice."""
    from hl7relay.queues import DeliveryResult

    down = DeliveryResult(False, error="connection_failed: refused", outcome=DeliveryOutcome.UNREACHABLE)
    engine, channel, store, received = _after_delivery_engine(tmp_path, {"lab": [down], "billing": []})
    results = []
    engine.handle(channel, Message(ADT.format(id="R1", extra="|||AL|AL")), "peer").addCallback(results.append)
    _run(engine, 1)
    assert ack_codes(results[0]) == ["CR"]
    _run(engine, 30)  # the lab comes back: the withdrawn copy is not sent
    assert received["lab"] == ["R1"] and received["billing"] == ["R1"]
    lab = {d["destination"]: d for d in store.get_message(1)["deliveries"]}
    assert lab["lab"]["status"] == "WITHDRAWN" and "will send it again" in lab["lab"]["last_error"]
    assert lab["billing"]["status"] == "SENT"
    engine.handle(channel, Message(ADT.format(id="R1", extra="|||AL|AL")), "peer").addCallback(results.append)
    _run(engine, 2)  # the resend is the one copy the lab gets
    assert ack_codes(results[1]) == ["CA", "AA"] and received["lab"] == ["R1", "R1"]


def test_after_delivery_an_application_error_is_not_resent_and_other_failures_are_retried(tmp_path):
    from hl7relay.queues import DeliveryResult

    engine, channel, store, received = _after_delivery_engine(tmp_path, {
        "lab": [DeliveryResult(False, application_error=True, ack="AE", error="application_error: unknown patient")],
        "billing": [DeliveryResult(False, error="timed_out: no ACK", outcome=DeliveryOutcome.TIMED_OUT)]})
    results = []
    engine.handle(channel, Message(ADT.format(id="E1", extra="")), "peer").addCallback(results.append)
    _run(engine, 0.5)
    assert ack_codes(results[0]) == ["AE"]
    _run(engine, 5)  # billing was held while waiting for the lab's answer, then retried
    assert received["billing"] == ["E1", "E1"] and received["lab"] == ["E1"]
    rows = {d["destination"]: d["status"] for d in store.get_message(1)["deliveries"]}
    assert rows == {"lab": "ERROR", "billing": "SENT"}


def test_a_stop_waits_for_the_acks_of_deliveries_on_the_wire_then_closes(tmp_path):
    """A clean stop closed the sender connections at once, so what was on the wire was resent after the restart."""
    from hl7relay.queues import DeliveryResult

    engine, channel, store, _ = make_engine(tmp_path, lambda fn, *a: defer.maybeDeferred(fn, *a), """
        destinations: [{name: lab, type: file, directory: out}]
    """)
    queue = engine.channels["ch"].queues["lab"]
    answers = []

    def slow_peer(message):
        d = defer.Deferred()
        engine.reactor.callLater(3, d.callback, DeliveryResult(True, ack="AA"))
        answers.append(d)
        return d

    queue.deliver = slow_peer
    queue.start()
    answer(engine, channel, ADT.format(id="W1", extra=""))
    engine.reactor.advance(0.1)
    assert len(answers) == 1 and queue.in_flight
    stopped = []
    engine.stop().addCallback(stopped.append)
    _run(engine, 2)
    assert not stopped  # still waiting for the ACK on the wire
    _run(engine, 1.5)
    assert stopped and store.get_message(1)["deliveries"][0]["status"] == "SENT"  # answered and recorded


def test_a_stop_gives_up_on_an_unanswered_delivery_after_stop_timeout(tmp_path):
    engine, channel, store, _ = make_engine(tmp_path, lambda fn, *a: defer.maybeDeferred(fn, *a), """
        destinations: [{name: lab, type: file, directory: out}]
    """)
    engine.stop_timeout = 4
    queue = engine.channels["ch"].queues["lab"]
    queue.deliver = lambda message: defer.Deferred()  # never answers
    queue.start()
    answer(engine, channel, ADT.format(id="W2", extra=""))
    engine.reactor.advance(0.1)
    stopped = []
    engine.stop().addCallback(stopped.append)
    _run(engine, 3.8)
    assert not stopped
    _run(engine, 0.5)
    assert stopped and store.get_message(1)["deliveries"][0]["status"] == "QUEUED"  # resent after the restart


def test_a_stop_keeps_its_timeout_when_a_message_is_still_being_stored(tmp_path, manual_executor):
    """Engine.stop() waited a hard-coded 60 s for messages in flight, whatever stop_timeout said,
    then said they had finished."""
    engine, channel, store, executor = make_engine(tmp_path, manual_executor)
    engine.stop_timeout = 3
    results = answer(engine, channel, ADT.format(id="S1", extra=""))  # its commit never returns
    stopped = []
    engine.stop().addCallback(stopped.append)
    _run(engine, 2.9)
    assert not stopped and not results
    _run(engine, 0.2)
    assert not stopped  # the store's flush is what it waits for now
    executor.run_all()
    [report] = stopped
    assert report.unanswered == 1 and not report.clean
    assert "1 message(s) in flight left unanswered after 3s" in report.describe()


def test_after_delivery_a_stop_answers_the_waiting_sender_and_withdraws_the_unsent_copy(tmp_path):
    """A trip waiting for the first attempt of a delivery that its stopped queue would never
    make waited for ever (a minute, then 'in-flight messages finished')."""
    engine, channel, store, received = _after_delivery_engine(tmp_path, {"lab": [], "billing": []})
    for queue in engine.channels["ch"].queues.values():
        queue.pause()  # nothing is sent before the stop
    results = []
    engine.handle(channel, Message(ADT.format(id="P1", extra="")), "peer").addCallback(results.append)
    _run(engine, 0.5)
    assert not results
    stopped = []
    engine.stop().addCallback(stopped.append)
    _run(engine, 0.5)
    assert ack_codes(results[0]) == ["AR"] and stopped and stopped[0].clean
    assert {d["status"] for d in store.get_message(1)["deliveries"]} == {"WITHDRAWN"}
    assert received == {"lab": [], "billing": []}


def test_a_stopping_listener_reads_nothing_more_and_closes_after_the_answer():
    from twisted.internet.testing import StringTransport

    from hl7relay.mllp.framing import frame
    from hl7relay.mllp.listener import ListenerConfig, MLLPListenerFactory

    handled, pending = [], []

    def handler(message, peer):
        handled.append(message.control_id)
        d = defer.Deferred()
        pending.append(d)
        return d

    from hl7relay.receiving import Responder

    factory = MLLPListenerFactory(Responder(handler), ListenerConfig(), task.Clock())
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"".join(frame(ADT.format(id=i, extra="").encode()) for i in ("F1", "F2", "F3")))
    assert handled == ["F1"]
    assert protocol.finish() == 2  # F2 and F3 dropped unanswered
    assert transport.producerState == "paused"
    protocol.dataReceived(frame(ADT.format(id="F4", extra="").encode()))  # already in a buffer: ignored
    from hl7relay.ack import Outcome

    pending[0].callback(Outcome.accepted())
    assert handled == ["F1"] and b"MSA|AA|F1" in transport.value() and transport.disconnecting


def test_idle_connections_cannot_lock_a_sender_out(tmp_path):
    from hl7relay.mllp.framing import MLLPFramer, frame

    engine, port = _start_engine(tmp_path, """\
        name: ch
        source: {type: mllp, port: 0, max_connections: 5, max_connections_per_peer: 50}
    """)
    idle = []
    try:
        for _ in range(20):  # four times the limit, all silent
            idle.append(socket.create_connection(("127.0.0.1", port)))
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", port)) as pms:
            pms.sendall(frame(ADT.format(id="IN1", extra="").encode()))
            [reply] = _answers(pms, MLLPFramer())
        assert Message.from_bytes(reply).get("MSA-2") == "IN1"
    finally:
        for s in idle:
            s.close()
        _stop_engine(engine)


def test_file_outputs_get_their_configured_mode_whatever_the_umask(tmp_path):
    import stat

    from hl7relay.channels.destinations import write_atomically as _write_atomically

    old = os.umask(0o077)  # as under hl7relay run
    try:
        _write_atomically(tmp_path / "out", "a.hl7", b"MSH|", 0o640)
        _write_atomically(tmp_path / "out", "b.hl7", b"MSH|", 0o600)
        _write_atomically(tmp_path / "private", "c.hl7", b"MSH|", 0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out" / "a.hl7").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "out" / "b.hl7").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o700


def test_run_warns_when_the_store_is_readable_by_others_and_creates_nothing_readable(tmp_path):
    import stat

    store_path = tmp_path / "data" / "hl7relay.db"
    engine, _ = _start_engine(tmp_path, "name: ch\nsource: {type: mllp, port: 0}\n")
    _stop_engine(engine)
    assert stat.S_IMODE(store_path.stat().st_mode) == 0o600 and stat.S_IMODE(store_path.parent.stat().st_mode) == 0o700
    os.chmod(store_path, 0o644)
    process = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--channels", str(tmp_path / "channels"),
                                "--data-dir", str(tmp_path / "data"), "--admin-port", "0", "--console-port", "0"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    output = "".join(wait_for_line(process, READY))
    _stop_engine(process)
    assert "warning: the store is readable by other users of this machine" in output and "0o644" in output


def test_reload_under_load_leaves_unchanged_channels_alone_and_applies_the_changed_ones(tmp_path):
    """SIGHUP and `hl7relay reload`: lint first (a broken file changes nothing), then per channel."""
    import json
    import threading

    from hl7relay.mllp.framing import MLLPFramer, frame

    channels = tmp_path / "channels"
    channels.mkdir()
    (channels / "a.yaml").write_text("name: a\nsource: {type: mllp, port: 0}\n")
    b_file = channels / "b.yaml"
    b_file.write_text("name: b\nsource: {type: mllp, port: 0}\ntransformers: [{set: {path: MSH-5, value: OLD}}]\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    engine = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--admin-port", "auto", "--console-port", "0"], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "hl7relay", *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60)

    def address(name):
        return json.loads(cli("channel", "show", name, "--format", "json").stdout)["address"]

    def replace(text):  # as editors do: the engine never reads a half-written file
        temporary = channels / ".b.yaml.tmp"
        temporary.write_text(text)
        os.replace(temporary, b_file)

    answers, stop = [], threading.Event()
    try:
        startup = "".join(wait_for_line(engine, READY))
        port_a = int(startup.split("channel a: MLLP on 127.0.0.1:")[1].split()[0])
        b_before = address("b")

        def keep_sending():
            with socket.create_connection(("127.0.0.1", port_a)) as connection:
                framer, n = MLLPFramer(), 0
                while not stop.is_set() and n < 3000:
                    n += 1
                    connection.sendall(frame(ADT.format(id=f"L{n}", extra="").encode()))
                    [reply] = _answers(connection, framer)
                    answers.append(Message.from_bytes(reply).get("MSA-1"))

        sender = threading.Thread(target=keep_sending)
        sender.start()
        time.sleep(0.5)
        # 1. a broken file: nothing changes
        replace("name: b\nsource: {type: mllp, port: 0}\ntransformers: [{sett: {path: MSH-5, value: NEW}}]\n")
        result = cli("reload")
        assert result.returncode == 1 and "b.yaml:3:17: unknown transformer 'sett'" in result.stderr, result.stderr
        wait_for_line(engine, "nothing changed")
        engine.send_signal(signal.SIGHUP)
        wait_for_line(engine, "nothing changed")
        # 2. a changed transformer: same socket, new behaviour
        replace("name: b\nsource: {type: mllp, port: 0}\ntransformers: [{set: {path: MSH-5, value: NEW}}]\n")
        engine.send_signal(signal.SIGHUP)
        wait_for_line(engine, "reload: unchanged a, changed b")
        assert address("b") == b_before
        port_b = int(b_before.split(":")[1])
        with socket.create_connection(("127.0.0.1", port_b)) as connection:
            connection.sendall(frame(ADT.format(id="B1", extra="").encode()))
            [reply] = _answers(connection, MLLPFramer())
        assert Message.from_bytes(reply).get("MSA-1") == "AA"
        # 3. a changed address: rebound
        replace("name: b\nsource: {type: mllp, host: 127.0.0.2, port: 0}\n")
        result = cli("reload", "--reason", "move b")
        assert result.returncode == 0 and "rebound b" in result.stdout and "unchanged a" in result.stdout, result.stdout
        assert address("b").startswith("127.0.0.2:")
        time.sleep(0.5)
        stop.set()
        sender.join(timeout=60)
    finally:
        stop.set()
        _stop_engine(engine)
    assert len(answers) > 20 and set(answers) == {"AA"}  # channel a: nothing refused, nothing lost
    store = Store(f"sqlite:///{tmp_path / 'data' / 'hl7relay.db'}")
    assert store.count(channel="a") == len(answers)
    [b1] = [r for r in store.latest(5000) if r["control_id"] == "B1"]
    assert Message.from_bytes(store.get_message(b1["id"])["stages"]["transformed"]).get("MSH-5") == "NEW"
    actions = [(e["action"], e["result"]) for e in store.audit_entries(action="reload")][::-1]
    assert actions == [("reload", "refused"), ("reload", "refused"), ("reload", "ok"), ("reload", "ok")]



def test_warn_findings_are_kept_with_the_stored_message_and_shown(tmp_path, manual_executor, capsys, monkeypatch):
    """validators: {structure: {on_error: warn}} once dropped its findings."""
    from hl7relay.cli import main

    engine, channel, store, executor = make_engine(tmp_path, manual_executor, """
        validators: [{structure: {on_error: warn}}, {required: {paths: [PID-8], on_error: warn}}]
    """)
    results = answer(engine, channel, ADT.format(id="V1", extra="").replace("EVN|A01|20240105093512\r", ""))
    executor.run_all()
    assert ack_codes(results[0]) == ["AA"]
    import json
    findings = json.loads(store.get_message(1)["stages"]["findings"])
    assert any(f["code"] == 100 and "EVN" in f["text"] for f in findings)
    assert any(f["code"] == 101 and f["location"] == "PID-8" for f in findings)
    monkeypatch.chdir(tmp_path)
    assert main(["messages", "show", "1", "--store", f"sqlite:///{tmp_path / 's.db'}"]) == 0
    out = capsys.readouterr().out
    assert "validation findings" in out and "PID-8 is required by this channel" in out and "EVN" in out


def test_the_engine_output_is_its_own_lines_only(tmp_path):
    """Twisted's own notes ('[-] MLLPListenerFactory starting on ...', 'Main loop terminated.')
    interleaved the engine's lines in another format."""
    engine, _ = _start_engine(tmp_path, """\
        name: ch
        source: {type: mllp, port: 0}
    """)
    engine.send_signal(signal.SIGTERM)
    os.set_blocking(engine.stdout.fileno(), True)
    rest = (getattr(engine, "_unread", b"") + engine.stdout.read()).decode()
    assert engine.wait(timeout=30) == 0
    engine.stdout.close()
    lines = rest.splitlines()
    assert lines == ["stopping: no new messages; finishing those in flight (up to 10s)",
                     "stopped: in-flight messages finished, store flushed"], rest


def test_a_running_channel_answers_its_source_with_the_ack_it_stored_and_its_current_policy(tmp_path, manual_executor):
    """The running channel is its listener's Receiver: the frames it hands back are the very ACKs
    committed with the message (built once), and what it says to an unreadable payload follows
    the channel's ACK policy as it is now (a reload replaces it)."""
    engine, channel, store, executor = make_engine(tmp_path, manual_executor, "response: {application: LABGATE}\n")
    running = engine.channels["ch"]
    answers = []
    running.receive(Message(ADT.format(id="RC1", extra="|||AL|NE")), "10.0.0.1:5000").addCallback(answers.append)
    assert answers == []  # nothing before the commit
    executor.run_all()
    [answer] = answers
    assert answer.frames == [store.get_message(1)["stages"]["ack"]] and not answer.close
    [ack] = [Message.from_bytes(f) for f in answer.frames]
    assert ack.get("MSA-1") == "CA" and ack.get("MSA-2") == "RC1"  # enhanced mode: the accept ACK only (NE)
    assert Message.from_bytes(running.unreadable("not HL7").frames[0]).get("MSH-3") == "LABGATE"
    changed, errors = load_channel(_write(tmp_path, "ch2.yaml", "name: ch\nsource: {type: mllp, port: 12650}\n"
                                          "response: {application: OTHERAPP}\n"), {})
    assert not errors
    running.enabled = False  # (never opened here: the reload replaces its config without binding a port)
    engine.reload([changed])
    executor.run_all()
    assert engine.channels["ch"] is running
    assert Message.from_bytes(running.unreadable("not HL7").frames[0]).get("MSH-3") == "OTHERAPP"
    too_large = running.too_large(Message(ADT.format(id="RC2", extra="|||AL|AL")).header(), "too big")
    assert too_large.close and Message.from_bytes(too_large.frames[0]).get("MSA-1") == "CR"  # asks for a resend, in its mode


def _write(folder, name, text):
    path = folder / name
    path.write_text(text)
    return path
