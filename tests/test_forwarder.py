"""Forwarding in a process of its own (forwarding: process): the wire, the forwarder's side
alone, and a real `hl7relay run --forwarding process` delivering, reporting, paused, killed."""

import json
import os
import signal
import socket
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
from twisted.internet import task
from twisted.internet.testing import StringTransport

from hl7relay.forwarder.child import Forwarder
from hl7relay.forwarder.wire import Decoder, WireError, encode
from hl7relay.mllp.framing import MLLPFramer, frame
from hl7relay.hl7.message import Message
from hl7relay.outcomes import DeliveryResult
from hl7relay.store.database import DeliveryRecord, MessageRecord, Store

sys.path.insert(0, str(Path(__file__).parent))
from test_durability import Lab, MSG, wait_for  # noqa: E402


# -- the wire ---------------------------------------------------------------------------------------
@given(st.lists(st.lists(st.tuples(st.sampled_from(["enqueue", "reply", "event"]), st.integers(), st.binary(max_size=300)),
                         max_size=4), min_size=1, max_size=5), st.integers(1, 64))
@settings(max_examples=100)
def test_the_wire_gives_back_every_batch_whatever_the_chunks(batches, chunk):
    data = b"".join(encode(batch) for batch in batches)
    decoder, out = Decoder(), []
    for i in range(0, len(data), chunk):
        out.extend(decoder.feed(data[i:i + chunk]))
    assert out == [message for batch in batches for message in batch]


def test_the_wire_refuses_an_oversized_frame():
    with pytest.raises(WireError):
        Decoder(max_frame_bytes=10).feed(encode([("x", b"0" * 100)]))


# -- the forwarder alone ------------------------------------------------------------------------------
class _Config:
    """A destination config whose runner delivers to a list (answers given by the test)."""

    def __init__(self, answers):
        from hl7relay.channels.destinations import QueueOptions

        self.queue = QueueOptions()
        self.answers = answers
        self.sent = []
        config = self

        class Runner:
            def __init__(self, _config, engine):
                self.closed = False

            def deliver(self, message):
                config.sent.append(message.control_id)
                return config.answers.pop(0) if config.answers else DeliveryResult(True, ack="AA")

            def skip_backoff(self):
                pass

            def stopping(self):
                pass

            def close(self):
                self.closed = True

        self.runner = Runner


@pytest.fixture
def child(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'f.db'}")
    store.migrate()
    clock = task.Clock()
    clock.advance(100)  # after the messages' arrival (1.0)
    written = []
    forwarder = Forwarder(store, clock, clock=clock.seconds, output=lambda data: written.extend(Decoder().feed(data)))
    forwarder.makeConnection(StringTransport())  # its stdin, as StandardIO connects it

    def say(*messages):
        forwarder.dataReceived(encode(list(messages)))
        clock.advance(0)

    yield forwarder, store, clock, written, say
    store.close()


def _statuses(store, message_id=None):
    """Delivery statuses straight from the store's tables."""
    import sqlalchemy as sa

    with store.engine.connect() as connection:
        sql = "SELECT status FROM deliveries" + (" WHERE message_id = :m" if message_id is not None else "")
        return [row[0] for row in connection.execute(sa.text(sql), {"m": message_id})]


def _commit(store, control_id):
    record = MessageRecord("adt", MSG.format(id=control_id).encode(), "PROCESSED", 1.0, "peer", "UNICODE UTF-8",
                           control_id=control_id)
    record.deliveries.append(DeliveryRecord("lab", "QUEUED"))
    return store.commit([record], [])[0]


def test_the_forwarder_delivers_and_leaves_the_writing_to_the_engine(child):
    forwarder, store, clock, written, say = child
    config = _Config([])
    forwarder._on_open(1, "adt", "lab", config, False, 60.0)  # the test's config: not through the wire
    message_id = _commit(store, "F1")
    say(("enqueue", 1, message_id, MSG.format(id="F1").encode(), None, 1.0))
    assert config.sent == ["F1"]
    from hl7relay.store.database import DeliveryUpdate, DestinationStateUpdate

    updates = [m for m in written if m[0] == "update" and isinstance(m[2][0], DeliveryUpdate)]
    assert len(updates) == 1
    # the destination answered: its state (connected) goes to the engine too, as an update of its own
    assert [m[2] for m in written if m[0] == "update" and isinstance(m[2][0], DestinationStateUpdate)] == [
        (DestinationStateUpdate("adt", "lab", True, "", 100.0),)]
    _, request, (update,), lazy = updates[0]
    assert update.message_id == message_id and update.values["status"] == "SENT" and lazy
    assert _statuses(store, message_id) == ["QUEUED"]  # the forwarder never writes the store
    assert message_id in forwarder.queues[1].known  # not forgotten until the engine says it is recorded
    say(("reply", request, None, None))
    assert message_id not in forwarder.queues[1].known
    [sent] = [m for m in written if m[:2] == ("event", "delivery_sent")]
    assert sent[2]["channel"] == "adt" and sent[2]["destination"] == "lab" and sent[2]["message_id"] == message_id
    assert sent[2]["attempts"] == 1 and sent[2]["seconds"] >= 0 and sent[3] == 1  # what the tracer and stats read
    # states go in order (the last one stands), counts once per turn with how many
    written.clear()
    forwarder._event("queue_state", {"channel": "adt", "destination": "lab", "depth": 1, "oldest_age": 0.0})
    forwarder._event("delivery_sent", {"channel": "adt", "destination": "lab"})
    forwarder._event("queue_state", {"channel": "adt", "destination": "lab", "depth": 0, "oldest_age": None})
    forwarder._event("delivery_sent", {"channel": "adt", "destination": "lab"})
    forwarder._event("queue_state", {"channel": "adt", "destination": "lab", "depth": 1, "oldest_age": 0.0})
    clock.advance(0)
    assert [m[2]["depth"] for m in written if m[1] == "queue_state"] == [1, 0, 1]
    assert [m[3] for m in written if m[1] == "delivery_sent"] == [2]
    clock.advance(0.3)
    views = [m[1] for m in written if m[0] == "views"]
    assert views and views[-1][1]["sent"] == 1


def test_first_results_withdrawals_and_controls_are_answered(child):
    forwarder, store, clock, written, say = child
    config = _Config([DeliveryResult(False, error="down", outcome=None)])
    forwarder._on_open(7, "adt", "lab", config, False, 60.0)  # its first poll finds nothing queued
    first, second = _commit(store, "W1"), _commit(store, "W2")
    say(("first_result", 7, first), ("enqueue", 7, first, MSG.format(id="W1").encode(), None, 1.0))
    [result] = [m for m in written if m[0] == "result"]
    assert result[1:3] == (7, first) and not result[3].ok
    say(("withdraw", 11, 7, first, "the sender resends it"))
    [update] = [m for m in written if m[0] == "update" and getattr(m[2][0], "values", {}).get("status") == "WITHDRAWN"]
    say(("reply", update[1], None, None))
    assert ("reply", 11, True, None) in written
    say(("pause", 14, 7), ("enqueue", 7, second, MSG.format(id="W2").encode(), None, 1.0))
    assert config.sent == ["W1"] and forwarder.queues[7].view()["paused"]
    [(_, _, (count, view), _)] = [m for m in written if m[:2] == ("reply", 14)]
    assert count == 0 and view["paused"]  # answered with the view after the pause
    say(("retry_now", 12, 7))
    [(_, _, (count, view), _)] = [m for m in written if m[:2] == ("reply", 12)]
    assert view["depth"] == 1  # W2 (W1 was withdrawn)
    say(("resume", 15, 7))
    assert config.sent == ["W1", "W2"]
    say(("retire", 13, [7], 5.0))
    clock.advance(0)
    assert ("reply", 13, 0, None) in written and not forwarder.queues and not forwarder.deliveries


def test_a_store_write_the_queue_asks_for_goes_to_the_engine(child):
    from hl7relay.store.database import DestinationStateUpdate

    forwarder, store, clock, written, say = child
    d = forwarder.writer.update(DestinationStateUpdate("adt", "lab", False, "down", 1.0))
    clock.advance(0)
    [request] = [m for m in written if m[0] == "update"]
    assert request[2] == (DestinationStateUpdate("adt", "lab", False, "down", 1.0),)
    assert not d.called  # until the engine has committed it
    say(("reply", request[1], None, None))
    assert d.called
    # reads run here
    assert forwarder.writer.read(store.queue_depth, "adt", "lab").result == 0


# -- a real engine ------------------------------------------------------------------------------------
def _children(pid):
    found = []
    for task_dir in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task_dir / "children").read_text().split()]
    return found


def _send(port, ids):
    codes = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        framer = MLLPFramer()
        for control_id in ids:
            connection.sendall(frame(MSG.format(id=control_id).encode()))
            events = []
            while not events:
                events = framer.feed(connection.recv(65536))
            codes.append(Message.from_bytes(events[0].payload).get("MSA-1"))
    return codes


def _get(base, token, path):
    request = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read().decode()


def _post(base, token, path):
    request = urllib.request.Request(base + path, method="POST", data=b"{}",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read().decode())


def _engine_with_forwarder(tmp_path, running_engine, lab, response="", lab_options="", more="", admin="0"):
    """`hl7relay run --forwarding process` with one ADT channel delivering to ``lab``."""
    channel = (f"name: adt\nsource: {{type: mllp, port: 0}}\n{response}"
               f"destinations: [{{name: lab, type: mllp, host: 127.0.0.1, port: {lab.port}, retry_initial: 0.2, "
               f"retry_max: 1{lab_options}}}{more}]\n")
    return running_engine(tmp_path, "--admin-port", admin, "--console-port", "0", "--forwarding", "process",
                          channel=channel)


def test_an_engine_with_a_forwarder_process(tmp_path, running_engine):
    lab = Lab()
    lab.start()
    engine = _engine_with_forwarder(tmp_path, running_engine, lab, more=", {name: archive, type: file, directory: out}",
                                    admin="auto")
    try:
        base = (tmp_path / "data" / "api-endpoint").read_text().strip()
        token = (tmp_path / "data" / "api-token").read_text().strip()
        [child] = _children(engine.process.pid)
        command_line = Path(f"/proc/{child}/cmdline").read_bytes()
        assert b"hl7relay.forwarder.child" in command_line
        assert b"sqlite" not in command_line  # its settings (a store URL may hold a password) came through the pipe

        ids = [f"P{i:02d}" for i in range(20)]
        assert _send(engine.mllp_port, ids) == ["AA"] * 20
        wait_for(lambda: lab.ids() == ids, 30, "every message at the lab, in order")
        wait_for(lambda: len(list((tmp_path / "out").iterdir())) == 20, 30, "every message in the archive folder")

        def recorded():
            statuses = _statuses(engine.store)
            return len(statuses) == 40 and set(statuses) == {"SENT"}

        wait_for(recorded, 30, "every delivery recorded SENT by the engine")
        # the forwarder's queues, seen through the engine (API) and its metrics
        wait_for(lambda: json.loads(_get(base, token, "/api/v1/channels/adt"))["destinations"]["lab"]["sent"] == 20,
                 10, "the forwarder's view in the API")
        view = json.loads(_get(base, token, "/api/v1/channels/adt"))["destinations"]["lab"]
        assert view["connected"] is True and view["depth"] == 0
        metrics = _get(base, token, "/metrics")
        assert 'hl7relay_deliveries_sent_total{channel="adt",destination="lab"} 20.0' in metrics

        # an operator's pause reaches the forwarder; resume sends what waited
        assert _post(base, token, "/api/v1/channels/adt/destinations/lab/pause")["paused"] is True
        assert _send(engine.mllp_port, ["Q01"]) == ["AA"]
        time.sleep(1.0)
        assert "Q01" not in lab.ids()
        assert _post(base, token, "/api/v1/channels/adt/destinations/lab/resume")["paused"] is False
        wait_for(lambda: "Q01" in lab.ids(), 30, "the paused message after resume")

        # a reload that changes the destination: its queue is retired in the forwarder, a new one opened
        from test_runtime import wait_for_line

        channel_file = tmp_path / "channels" / "adt.yaml"
        channel_file.write_text(channel_file.read_text().replace("retry_initial: 0.2", "retry_initial: 0.3"))
        engine.process.send_signal(signal.SIGHUP)
        assert "changed adt" in wait_for_line(engine.process, "reload:")[-1]
        assert _send(engine.mllp_port, ["S01", "S02"]) == ["AA", "AA"]
        wait_for(lambda: lab.ids()[-2:] == ["S01", "S02"], 30, "the messages sent after the reload")

        # the forwarder killed: started again, nothing ACKed is lost
        os.kill(child, signal.SIGKILL)
        wait_for(lambda: len(_children(engine.process.pid)) == 1 and _children(engine.process.pid) != [child], 30,
                 "a new forwarder")
        more = [f"R{i:02d}" for i in range(10)]
        assert _send(engine.mllp_port, more) == ["AA"] * 10
        wait_for(lambda: set(more) <= set(lab.ids()), 30, "the messages sent after the restart")
    finally:
        code = engine.stop()
        lab.close()
    assert code == 0
    output = engine.process.stdout  # closed by stop(); the child went with its engine
    assert output.closed
    assert not Path(f"/proc/{child}").exists()


def test_after_delivery_through_the_forwarder(tmp_path, running_engine):
    """response.when: after_delivery waits for the forwarder's first answer: AA when the lab took
    it; AR when the lab is down, and the failed copy withdrawn (the sender resends it)."""
    lab = Lab()  # bound, not listening: down
    engine = _engine_with_forwarder(tmp_path, running_engine, lab, response="response: {when: after_delivery}\n",
                                    lab_options=", connect_timeout: 2")
    try:
        assert _send(engine.mllp_port, ["A01"]) == ["AR"]
        wait_for(lambda: _statuses(engine.store) == ["WITHDRAWN"], 30, "the failed copy withdrawn")
        lab.start()
        assert _send(engine.mllp_port, ["A02"]) == ["AA"]
        assert lab.ids() == ["A02"]
        time.sleep(1.0)  # a withdrawn copy is never sent later
        assert lab.ids() == ["A02"]
    finally:
        code = engine.stop()
        lab.close()
    assert code == 0


# -- the engine's side alone ----------------------------------------------------------------------------
class _PipeWriter:
    """Stands in for Twisted's writer of the child's stdin: what was written, frame by frame."""

    connected, disconnecting, dataBuffer, _tempDataBuffer, fd = 1, False, b"", [], -1  # os.write(-1) fails: write()

    def __init__(self):
        self.frames = []

    def write(self, data):
        self.frames.append(Decoder().feed(data))


class _ChildTransport:
    def __init__(self, pid):
        self.pid = pid
        self.pipes = {0: _PipeWriter()}


def test_the_engine_side_sends_settings_first_and_reopens_queues_before_what_waited(tmp_path):
    from twisted.internet.error import ProcessTerminated
    from twisted.python.failure import Failure

    from hl7relay.channels import load_channel
    from hl7relay.forwarder.parent import ForwarderProcess, RemoteQueue

    path = tmp_path / "adt.yaml"
    path.write_text("name: adt\nsource: {type: mllp, port: 0}\n"
                    "destinations: [{name: lab, type: mllp, host: 127.0.0.1, port: 9}]\n")
    channel, errors = load_channel(path, {})
    assert not errors
    clock = task.Clock()
    forwarder = ForwarderProcess(None, {"store": "sqlite:///x.db"}, clock)
    queue = RemoteQueue(forwarder, "adt", "lab", channel.destinations[0].config, 1.0)
    first = _ChildTransport(10)
    forwarder.makeConnection(first)
    queue.start()
    waiting = queue.first_result(5)
    clock.advance(0)
    assert [m[0] for frame in first.pipes[0].frames for m in frame] == ["settings", "open", "first_result"]
    assert first.pipes[0].frames[0] == [("settings", {"store": "sqlite:///x.db"})]  # alone, first

    forwarder.processEnded(Failure(ProcessTerminated(signal=9)))
    assert waiting.called and waiting.result.application_error  # AE: the queue still delivers it
    queue.enqueue(6, b"MSH|...", None, 1.0)  # said while no forwarder runs
    clock.advance(0)
    second = _ChildTransport(11)
    forwarder.makeConnection(second)  # what the restart's spawnProcess does
    kinds = [m[0] for frame in second.pipes[0].frames for m in frame]
    assert kinds == ["settings", "open", "enqueue"]
    assert forwarder.restarts == 1
