"""Destination queues, driven by task.Clock: retries, dead letter, order, restart."""

import random

import pytest
from twisted.internet import defer, task

from hl7relay.channels.destinations import QueueOptions
from hl7relay.outcomes import DeliveryOutcome
from hl7relay.queues import DeliveryResult, DestinationQueue, retry_delay
from hl7relay.store.database import DeliveryRecord, MessageRecord, Store
from hl7relay.store.writer import StoreWriter

MSG = "MSH|^~\\&|A|B|C|D|20240101||ADT^A08|{id}|P|2.5.1\rPID|1||{key}^^^H^MR\r"


@pytest.fixture
def setup(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'q.db'}")
    store.migrate()
    clock = task.Clock()
    writer = StoreWriter(store, executor=lambda fn, *a: defer.maybeDeferred(fn, *a))
    return store, clock, writer


def enqueue(store, control_id, key="P1", destination="lab"):
    content = MSG.format(id=control_id, key=key).encode()
    store.commit([MessageRecord("ch", content, "PROCESSED", received_at=0.0, control_id=control_id,
                                deliveries=[DeliveryRecord(destination, "QUEUED", content, key)])], [])


class Peer:
    """A destination whose answers the test scripts: a list of DeliveryResults, then success."""

    def __init__(self, answers=()):
        self.answers = list(answers)
        self.received = []

    def __call__(self, message):
        self.received.append(message.control_id)
        return self.answers.pop(0) if self.answers else DeliveryResult(True, ack="AA")


def make_queue(setup, peer, **options):
    store, clock, writer = setup
    queue = DestinationQueue("ch", "lab", peer, QueueOptions(**options), writer, clock, clock.seconds,
                             poll_interval=1.0, rng=random.Random(3))
    queue.start()
    return queue


def statuses(store):
    rows = store.latest(100)
    return {r["control_id"]: store.get_message(r["id"])["deliveries"][0] for r in rows}


DOWN = DeliveryResult(False, error="connection_failed: refused", outcome=DeliveryOutcome.UNREACHABLE)


def test_destination_down_then_up_delivers_everything_in_order(setup):
    store, clock, _ = setup
    for i in range(5):
        enqueue(store, f"M{i}")
    peer = Peer([DOWN] * 4)
    make_queue(setup, peer, retry_initial=1, retry_max=8)
    for _ in range(200):
        clock.advance(0.5)
    assert [s["status"] for s in statuses(store).values()] == ["SENT"] * 5
    delivered = [c for c in peer.received]
    assert delivered[:5] == ["M0"] * 5 and delivered[5:] == ["M1", "M2", "M3", "M4"]  # the head was retried, none lost
    assert statuses(store)["M0"]["attempts"] == 5


def test_retry_spacing_follows_the_policy(setup):
    store, clock, _ = setup
    enqueue(store, "M0")
    peer = Peer([DOWN] * 6)
    times = []

    def timed(message):
        times.append(clock.seconds())
        return peer(message)

    queue = make_queue(setup, timed, max_attempts=10, retry_initial=2, retry_max=10)
    for _ in range(2000):
        clock.advance(0.05)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) == 6 and queue.sent == 1 and queue.retried == 6
    for gap, ceiling in zip(gaps, [2, 4, 8, 10, 10, 10]):
        assert ceiling / 2 - 0.06 <= gap <= ceiling + 0.06, (gap, ceiling)
    options = QueueOptions(retry_initial=2, retry_max=10)
    for attempts in range(1, 8):
        ceiling = min(10, 2 * 2 ** (attempts - 1))
        assert ceiling / 2 <= retry_delay(attempts, options, random.Random(attempts)) <= ceiling


def test_application_error_is_not_retried(setup):
    store, clock, _ = setup
    enqueue(store, "M0")
    enqueue(store, "M1")
    peer = Peer([DeliveryResult(False, application_error=True, ack="AE", error="application_error: PID-3 unknown")])
    make_queue(setup, peer)
    for _ in range(20):
        clock.advance(0.5)
    rows = statuses(store)
    assert rows["M0"]["status"] == "ERROR" and rows["M0"]["attempts"] == 1 and "PID-3 unknown" in rows["M0"]["last_error"]
    assert rows["M1"]["status"] == "SENT"  # an AE does not block the queue
    assert peer.received == ["M0", "M1"]


REFUSED = DeliveryResult(False, ack="AR", error="rejected: not now", rejected=True)


def test_exhausted_retries_go_to_error(setup):
    store, clock, _ = setup
    enqueue(store, "M0")
    peer = Peer([DOWN, REFUSED, DOWN, REFUSED, REFUSED] + [REFUSED] * 100)
    make_queue(setup, peer, max_attempts=3, retry_initial=1, retry_max=1)
    for _ in range(100):
        clock.advance(0.5)
    row = statuses(store)["M0"]
    # only the peer's refusals count: three of them, after two connection failures
    assert row["status"] == "ERROR" and row["attempts"] == 5
    assert row["last_error"].startswith("gave up after 5 attempts (3 refused by the peer)")
    assert peer.received == ["M0"] * 5


def test_an_unreachable_peer_is_retried_indefinitely_by_default_and_found_within_retry_max(setup):
    """The old defaults dead-lettered an in_order head after ~8.5 minutes of outage (10 attempts,
    waits up to 300 s), and the queue moved on without it."""
    store, clock, _ = setup
    enqueue(store, "M0")
    enqueue(store, "M1")
    outage = 3 * 3600
    times = []

    def peer(message):
        times.append(clock.seconds())
        return DOWN if clock.seconds() < outage else DeliveryResult(True, ack="AA")

    queue = make_queue(setup, peer)  # the defaults
    while clock.seconds() < outage + 120:
        clock.advance(1)
    rows = statuses(store)
    assert rows["M0"]["status"] == rows["M1"]["status"] == "SENT" and queue.failed == 0
    assert len(times) > 300 and max(b - a for a, b in zip(times, times[1:])) <= 30 + 1  # retry_max 30 s
    first_after = min(t for t in times if t >= outage)
    assert first_after - outage <= 31  # the peer is found again within retry_max


def test_give_up_after_dead_letters_a_long_unreachable_delivery(setup):
    store, clock, _ = setup
    enqueue(store, "M0")
    peer = Peer([DOWN] * 10000)
    queue = make_queue(setup, peer, retry_initial=1, retry_max=5, give_up_after=60)
    for _ in range(200):
        clock.advance(0.5)
    row = statuses(store)["M0"]
    assert row["status"] == "ERROR" and "(give_up_after)" in row["last_error"] and queue.failed == 1


def test_in_order_head_blocks_and_per_key_does_not(setup):
    store, clock, _ = setup
    enqueue(store, "A1", key="A")
    enqueue(store, "B1", key="B")
    blocked = Peer([DOWN] * 1000)
    queue = make_queue(setup, blocked, max_attempts=1000, retry_initial=1, retry_max=1)
    for _ in range(20):
        clock.advance(0.5)
    assert set(blocked.received) == {"A1"}  # B1 waits behind the failing head
    queue.stop()

    def answer(message):
        return DOWN if message.get("PID-3.1") == "A" else DeliveryResult(True, ack="AA")

    make_queue(setup, answer, order="per_key", max_attempts=1000, retry_initial=1, retry_max=1)
    for _ in range(10):
        clock.advance(0.5)
    rows = statuses(store)
    assert rows["B1"]["status"] == "SENT" and rows["A1"]["status"] == "QUEUED"


def test_a_new_worker_resumes_what_is_queued_at_least_once(setup):
    store, clock, _ = setup
    for i in range(3):
        enqueue(store, f"M{i}")
    hung = defer.Deferred()  # M1's answer never comes: the engine dies meanwhile

    def first_peer(message):
        return DeliveryResult(True, ack="AA") if message.control_id == "M0" else hung

    first = make_queue(setup, first_peer)
    first.stop()
    peer = Peer()
    make_queue(setup, peer)
    for _ in range(10):
        clock.advance(0.5)
    assert all(s["status"] == "SENT" for s in statuses(store).values())
    assert peer.received == ["M1", "M2"]  # M0 was recorded as sent; M1 is sent again (at-least-once)


class HeldPeer:
    """A destination that answers only when the test says so, to see what is in flight at once."""

    def __init__(self):
        self.open: list[tuple[str, str, defer.Deferred]] = []
        self.received = []

    def __call__(self, message):
        d = defer.Deferred()
        self.open.append((message.control_id, message.get("PID-3.1"), d))
        self.received.append(message.control_id)
        return d

    def answer_all(self, result=None):
        held, self.open = self.open, []
        for _, _, d in held:
            d.callback(result or DeliveryResult(True, ack="AA"))


def test_parallel_deliveries_keep_one_message_per_key_in_flight(setup):
    store, clock, _ = setup
    for i, key in enumerate("AABBCCDD"):
        enqueue(store, f"M{i}", key=key)
    peer = HeldPeer()
    make_queue(setup, peer, order="per_key", parallel=3)
    clock.advance(0)
    first = [(cid, key) for cid, key, _ in peer.open]
    assert first == [("M0", "A"), ("M2", "B"), ("M4", "C")]  # three at once, one per key, oldest first
    while peer.open:
        peer.answer_all()
        assert len({key for _, key, _ in peer.open}) == len(peer.open) <= 3
    assert sorted(peer.received) == [f"M{i}" for i in range(8)]
    for key in "ABCD":  # within a key, in order of receipt
        mine = [cid for cid in peer.received if int(cid[1:]) // 2 == "ABCD".index(key)]
        assert mine == sorted(mine)
    clock.advance(1)
    assert all(s["status"] == "SENT" for s in statuses(store).values())


def test_parallel_without_order_fills_every_slot_and_retries_do_not_block(setup):
    store, clock, _ = setup
    for i in range(5):
        enqueue(store, f"M{i}", key="same")
    peer = HeldPeer()
    make_queue(setup, peer, order="none", parallel=4, retry_initial=10, retry_max=10)
    clock.advance(0)
    assert [cid for cid, _, _ in peer.open] == ["M0", "M1", "M2", "M3"]
    peer.answer_all(DOWN)  # all four fail: they wait 5-10 s; M4 goes now
    assert [cid for cid, _, _ in peer.open] == ["M4"]
    peer.answer_all()
    clock.advance(10)
    peer.answer_all()
    clock.advance(1)
    assert all(s["status"] == "SENT" for s in statuses(store).values())


def test_parallel_needs_an_order_that_allows_it(tmp_path):
    from hl7relay.channels.channel import load_channel

    path = tmp_path / "c.yaml"
    path.write_text("name: c\nsource: {type: mllp, port: 2599}\n"
                    "destinations:\n  - {name: lab, type: mllp, host: 127.0.0.1, port: 2600, parallel: 4}\n")
    channel, errors = load_channel(path)
    assert channel is None and len(errors) == 1
    assert "c.yaml:4" in str(errors[0]) and "parallel > 1 needs order: per_key or none" in str(errors[0])
    path.write_text(path.read_text().replace("parallel: 4", "parallel: 4, order: per_key"))
    channel, errors = load_channel(path)
    assert not errors and channel.destinations[0].config.queue.parallel == 4


def test_a_destination_that_raises_is_retried_and_the_queue_goes_on(setup):
    store, clock, _ = setup
    enqueue(store, "M0", key="A")
    enqueue(store, "M1", key="B")
    calls = []

    def buggy(message):
        calls.append(message.control_id)
        if message.control_id == "M0" and calls.count("M0") == 1:
            raise RuntimeError("bug in the destination")
        return DeliveryResult(True, ack="AA")

    make_queue(setup, buggy, order="per_key", retry_initial=1, retry_max=1)
    clock.advance(0)
    rows = statuses(store)
    assert rows["M0"]["status"] == "QUEUED" and "RuntimeError: bug in the destination" in rows["M0"]["last_error"]
    assert rows["M1"]["status"] == "SENT"
    clock.advance(1)
    assert statuses(store)["M0"]["status"] == "SENT" and calls == ["M0", "M1", "M0"]


def test_a_backlog_beyond_memory_drains_without_waiting_for_the_poll(setup, monkeypatch):
    import hl7relay.queues as queues_module

    store, clock, _ = setup
    monkeypatch.setattr(queues_module, "_MEMORY_LIMIT", 10)
    monkeypatch.setattr(queues_module, "_FETCH", 10)
    # results ride along lazily, as under `hl7relay run`: rows sent but not yet recorded are still QUEUED on disk
    writer = StoreWriter(store, clock, executor=lambda fn, *a: defer.maybeDeferred(fn, *a), lazy_delay=0.05)
    peer = Peer()
    queue = DestinationQueue("ch", "lab", peer, QueueOptions(), writer, clock, clock.seconds, poll_interval=1.0)
    for i in range(30):
        enqueue(store, f"M{i:02d}")
    queue.start()  # the first poll reads what is queued: 10 fit in memory
    for i in range(30):  # and the engine hands over the same rows as it commits them
        queue.enqueue(i + 1, MSG.format(id=f"M{i:02d}", key="P1").encode(), "P1", 0.0)
    for _ in range(20):
        clock.advance(0.01)
    assert peer.received == [f"M{i:02d}" for i in range(30)]  # all of it, in order, well inside one poll interval
    clock.advance(0.1)
    assert all(s["status"] == "SENT" for s in statuses(store).values())


def test_rows_held_in_memory_are_not_taken_for_a_backlog(setup, monkeypatch):
    # sent but not yet recorded rows still read QUEUED on disk; counting them as backlog made
    # every finished delivery poll the store again
    import hl7relay.queues as queues_module

    store, clock, _ = setup
    monkeypatch.setattr(queues_module, "_FETCH", 10)
    writer = StoreWriter(store, clock, executor=lambda fn, *a: defer.maybeDeferred(fn, *a), lazy_delay=5.0)
    peer = HeldPeer()
    queue = DestinationQueue("ch", "lab", peer, QueueOptions(order="none", parallel=8), writer, clock, clock.seconds,
                             poll_interval=1.0)
    polls = []
    read = store.queued_deliveries
    monkeypatch.setattr(store, "queued_deliveries", lambda *a: polls.append(a[3]) or read(*a))
    queue.start()
    for i in range(30):
        enqueue(store, f"M{i:02d}", key=f"K{i}")
        queue.enqueue(i + 1, MSG.format(id=f"M{i:02d}", key=f"K{i}").encode(), None, 0.0)
    clock.advance(0)
    peer.answer_all()  # eight sent; their results wait for the lazy commit, so they still read QUEUED
    clock.advance(1)  # the periodic poll: nothing on disk that memory does not hold
    assert queue.backlog == 0 and len(polls) == 2 and polls[-1] is None  # from the oldest, not after an id
    peer.answer_all()
    clock.advance(0)
    assert len(polls) == 2  # finishing deliveries did not poll again
    while peer.open:
        peer.answer_all()
    clock.advance(5)
    assert peer.received == [f"M{i:02d}" for i in range(30)]
    assert all(s["status"] == "SENT" for s in statuses(store).values())


@pytest.mark.parametrize("order, parallel, restart", [("per_key", 3, False), ("per_key", 1, False), ("in_order", 1, False),
                                                      ("per_key", 4, True), ("in_order", 1, True)])
def test_order_holds_after_an_outage_longer_than_memory_while_messages_keep_arriving(setup, monkeypatch, order, parallel,
                                                                                     restart):
    """After an outage the backlog outgrew memory; new messages went straight to memory while
    older ones of the same patient still waited on disk, and overtook them."""
    import hl7relay.queues as queues_module

    store, clock, _ = setup
    monkeypatch.setattr(queues_module, "_MEMORY_LIMIT", 20)
    monkeypatch.setattr(queues_module, "_FETCH", 8)
    writer = StoreWriter(store, clock, executor=lambda fn, *a: defer.maybeDeferred(fn, *a), lazy_delay=0.05)
    rng = random.Random(5)
    delivered = []

    def peer(message):
        if clock.seconds() < 40 or rng.random() < 0.2:  # down, then flaky
            return DeliveryResult(False, error="connection_failed: refused", outcome=DeliveryOutcome.UNREACHABLE)
        delivered.append(message.control_id)
        return DeliveryResult(True, ack="AA")

    def new_queue():
        queue = DestinationQueue("ch", "lab", peer, QueueOptions(order=order, parallel=parallel, retry_initial=0.5,
                                                                 retry_max=2),
                                 writer, clock, clock.seconds, poll_interval=1.0, rng=random.Random(1))
        queue.start()
        return queue

    queue = new_queue()
    sequence = {}
    next_id = [1]

    def arrive(n):
        for _ in range(n):
            key = rng.choice("ABC")
            sequence[key] = sequence.get(key, 0) + 1
            control_id = f"{key}{sequence[key]:04d}"
            enqueue(store, control_id, key=key)
            queue.enqueue(next_id[0], MSG.format(id=control_id, key=key).encode(), key, clock.seconds())
            next_id[0] += 1

    while clock.seconds() < 120:  # messages keep arriving through the outage and after it
        arrive(rng.randint(0, 3))
        clock.advance(0.25)
        if restart and clock.seconds() in (50.0, 90.0):
            queue.stop()  # a restart: memory is lost, the store is not
            queue = new_queue()
    for _ in range(2000):
        clock.advance(0.25)
    for key in "ABC":
        mine = [c for c in delivered if c.startswith(key)]
        first_times = list(dict.fromkeys(mine))  # at-least-once: a restart may resend what was in flight
        assert first_times == sorted(first_times) and len(first_times) == sequence[key], key  # in order, none lost
        if not restart:
            assert len(mine) == len(first_times)  # and each once
    assert all(s["status"] == "SENT" for s in statuses(store).values())


def test_after_a_backlog_drains_new_messages_go_straight_to_memory_again(setup, monkeypatch):
    """Rows go to disk while older ones wait there; once a read has taken them all, new rows are
    handed over in memory again even while messages keep arriving (no detour through the store)."""
    import hl7relay.queues as queues_module

    store, clock, _ = setup
    monkeypatch.setattr(queues_module, "_MEMORY_LIMIT", 10)
    monkeypatch.setattr(queues_module, "_FETCH", 8)
    writer = StoreWriter(store, clock, executor=lambda fn, *a: defer.maybeDeferred(fn, *a), lazy_delay=0.05)
    down = {"on": True}
    delivered = []

    def peer(message):
        if down["on"]:
            return DeliveryResult(False, error="connection_failed: refused", outcome=DeliveryOutcome.UNREACHABLE)
        delivered.append(message.control_id)
        return DeliveryResult(True, ack="AA")

    queue = DestinationQueue("ch", "lab", peer, QueueOptions(retry_initial=0.5, retry_max=1), writer, clock,
                             clock.seconds, poll_interval=1.0, rng=random.Random(1))
    queue.start()
    n = 0
    for step in range(400):
        n += 1
        enqueue(store, f"M{n:04d}")
        queue.enqueue(n, MSG.format(id=f"M{n:04d}", key="P1").encode(), "P1", clock.seconds())
        if step == 100:
            down["on"] = False
        clock.advance(0.1)
    assert not queue.spilled and delivered == [f"M{i:04d}" for i in range(1, len(delivered) + 1)]
    assert len(delivered) >= n - 2


# -- response.when: after_delivery's first result ------------------------------------------------------
@pytest.mark.parametrize("order", ["in_order", "per_key", "none"])
def test_a_waiter_that_withdraws_at_once_withdraws_the_held_copy(setup, order):
    """The first result was handed to its waiter while the row still counted as in flight, so a
    withdrawal made in the waiter's callback (the engine answers AR at once) was refused: the copy
    stayed held for ever, blocked its key, and was sent again after a restart."""
    store, clock, _ = setup
    enqueue(store, "M1")
    peer = Peer([DOWN])
    queue = DestinationQueue("ch", "lab", peer, QueueOptions(order=order, retry_initial=1, retry_max=1),
                             setup[2], clock, clock.seconds, poll_interval=1.0, rng=random.Random(3))
    withdrawn = []
    queue.first_result(1).addCallback(lambda result: withdrawn.append(queue.withdraw(1, "withdrawn: resend")))
    queue.start()
    clock.advance(0)
    [d] = withdrawn
    assert d is not None and not queue.pending and not queue.in_flight
    enqueue(store, "M2")  # the same key flows
    for _ in range(10):
        clock.advance(0.5)
    assert peer.received == ["M1", "M2"]
    rows = statuses(store)
    assert rows["M1"]["status"] == "WITHDRAWN" and rows["M2"]["status"] == "SENT"
    # a restart sends nothing again
    again = Peer()
    make_queue(setup, again)
    for _ in range(5):
        clock.advance(0.5)
    assert again.received == []


@pytest.mark.parametrize("first", [DOWN, DeliveryResult(True, ack="AA")])
def test_a_waiter_that_comes_after_the_first_attempt_gets_its_result(setup, first):
    """A poll can read a row the moment it is committed, before the engine registers the trip's
    waiter: the first attempt then ended unheard and the sender was never answered."""
    store, clock, _ = setup
    enqueue(store, "M1")
    peer = Peer([first])
    queue = make_queue(setup, peer, retry_initial=1, retry_max=1)
    clock.advance(0)
    assert peer.received == ["M1"]
    results = []
    queue.first_result(1).addCallback(results.append)
    assert results == [first]
    if not first.ok:  # held, not retried, until the engine decides
        for _ in range(10):
            clock.advance(0.5)
        assert peer.received == ["M1"] and queue.pending[1].held
        assert queue.withdraw(1, "withdrawn: resend") is not None
        clock.advance(1)
        assert statuses(store)["M1"]["status"] == "WITHDRAWN"
    else:
        assert statuses(store)["M1"]["status"] == "SENT"


def test_the_retry_delay_survives_a_long_outage():
    """Unreachable peers are retried indefinitely; after 1,025 attempts (8.5 h at retry_max 30 s)
    2 ** n overflowed a float and every later attempt's bookkeeping raised."""
    options = QueueOptions(retry_initial=1.0, retry_max=30.0)  # as a channel file gives them: floats
    assert 15 <= retry_delay(5000, options, random.Random(1)) <= 30


def test_local_and_forwarder_queues_are_one_protocol(setup):
    """The engine told them apart with isinstance(queue, DestinationQueue): both declare the Queue
    protocol now, and say where they run."""
    from hl7relay.forwarder.parent import ForwarderProcess, RemoteQueue
    from hl7relay.queues import Queue

    local = make_queue(setup, Peer())
    local.stop()
    remote = RemoteQueue(ForwarderProcess(None, {"store": "sqlite:///x.db"}, task.Clock()), "ch", "lab",
                         type("Config", (), {"queue": QueueOptions()})(), 1.0)
    assert isinstance(local, Queue) and isinstance(remote, Queue)
    assert (local.remote, remote.remote) == (False, True)


def test_a_queue_moves_only_new_running_stopped_and_a_stopped_one_sends_nothing(setup):
    from hl7relay.queues import Pump, QueueState

    store, clock, writer = setup
    peer = Peer()
    queue = DestinationQueue("ch", "lab", peer, QueueOptions(), writer, clock, clock.seconds, poll_interval=1.0)
    assert queue.state is QueueState.NEW and not queue.stopped and queue.pump is Pump.IDLE
    queue.start()
    assert queue.state is QueueState.RUNNING
    with pytest.raises(RuntimeError, match="cannot go from running to running"):
        queue.start()  # a second loop would send every row twice
    enqueue(store, "S1")
    queue.enqueue(1, MSG.format(id="S1", key="P1").encode(), "P1", 0.0)
    queue.nudge()
    queue.nudge()  # one run on the next turn, however many nudges
    clock.advance(0)
    assert peer.received == ["S1"] and queue.pump is Pump.IDLE
    queue.stop()
    queue.stop()  # stopping twice is no move
    assert queue.state is QueueState.STOPPED and queue.stopped
    with pytest.raises(RuntimeError, match="cannot go from stopped to running"):
        queue.start()  # a stopped queue is replaced, never restarted
    enqueue(store, "S2")
    queue.enqueue(2, MSG.format(id="S2", key="P1").encode(), "P1", 0.0)
    queue.nudge()
    clock.advance(5)
    assert peer.received == ["S1"]  # nothing more is sent



def test_a_destination_that_answers_ae_to_everything_is_failing_not_connected(setup):
    """It showed a green "connected" beside "dead 20000": its state comes from its recent
    answers, not only from the socket."""
    store, clock, writer = setup
    ae = DeliveryResult(False, application_error=True, ack="AE", error="application_error: unknown patient")
    peer = Peer([ae] * 10)
    queue = make_queue(setup, peer, order="none")
    assert queue.view()["state"] == "idle"
    for n in range(2):
        enqueue(store, f"F{n}", key=f"K{n}")
    clock.advance(1)
    assert queue.view()["connected"] and queue.view()["state"] == "ok"  # two failures are not yet a pattern
    enqueue(store, "F2", key="K2")
    clock.advance(1)
    assert queue.view()["connected"] and queue.view()["state"] == "failing"
    queue.pause()
    assert queue.view()["state"] == "paused"
    queue.resume()
    for n in range(3, 13):
        enqueue(store, f"F{n}", key=f"K{n}")
        clock.advance(1)
    assert queue.view()["state"] == "ok"  # it accepts again: the last attempt and half of the recent ones
    queue.stop()
    down = make_queue(setup, Peer([DOWN] * 100))
    enqueue(store, "D1", destination="lab")
    clock.advance(1)
    assert down.view()["state"] == "down"


def test_a_result_the_store_does_not_take_is_recorded_later_and_never_sent_again(setup):
    """A database outage at the moment a delivery was answered: its result (SENT) could not be
    committed, the queue forgot the id, and once the store was back its poll read the row (still
    QUEUED) and sent the message a second time (the chaos suite's postgres_down, now and then)."""
    from hl7relay.store.database import StoreError

    store, clock, writer = setup
    peer = Peer()
    real_commit = store.commit
    down = {"on": False}

    def commit(records, updates):
        if down["on"] and updates:
            raise StoreError("store commit failed: OperationalError: connection refused")
        return real_commit(records, updates)

    store.commit = commit
    queue = make_queue(setup, peer)
    enqueue(store, "R1")
    down["on"] = True
    clock.advance(1)  # the poll finds it, sends it: the peer accepts, the result is not recorded
    assert peer.received == ["R1"] and statuses(store)["R1"]["status"] == "QUEUED"
    for _ in range(10):  # polls while the store refuses: the row reads QUEUED, and is not sent again
        clock.advance(1)
    down["on"] = False
    for _ in range(5):
        clock.advance(1)
    assert peer.received == ["R1"] and statuses(store)["R1"]["status"] == "SENT"
    assert 1 not in queue.known  # forgotten once recorded
    queue.stop()


# -- an API's answers (issue #27): wait as told, hold on refused credentials --------------------------

def test_a_429_waits_for_its_retry_after_across_every_key_and_never_dead_letters(setup):
    store, clock, _ = setup
    for i, key in enumerate(["P1", "P2", "P1", "P3"]):
        enqueue(store, f"M{i}", key)
    waited = DeliveryResult(False, error="429 Too Many Requests: wait 20 s", outcome=DeliveryOutcome.RATE_LIMITED,
                            wait=20.0)
    peer = Peer([waited] * 30)  # a long storm: far more 429s than max_attempts or give_up_after allow
    times = []

    def timed(message):
        times.append((clock.seconds(), message.control_id))
        return peer(message)

    queue = make_queue(setup, timed, order="per_key", parallel=1, max_attempts=2, give_up_after=100)
    clock.advance(0)
    clock.advance(0)
    assert times == [(0, "M0")]
    view = queue.view()
    assert view["state"] == "rate_limited" and view["rate_limited_since"] == 0 and view["wait_left"] == 20
    clock.advance(10)
    assert len(times) == 1  # no other key goes while the destination asked for quiet
    for _ in range(4000):
        clock.advance(0.5)
    assert [s["status"] for s in statuses(store).values()] == ["SENT"] * 4  # none dead-lettered
    gaps = [b[0] - a[0] for a, b in zip(times, times[1:])][:30]
    assert all(gap >= 20 - 1e-9 for gap in gaps)  # each wait kept
    sent_order = [c for _, c in times[30:]]
    assert sent_order.index("M0") < sent_order.index("M2")  # the key's order held through the storm
    assert statuses(store)["M0"]["attempts"] == 1  # waits are not failed attempts
    assert queue.view()["rate_limited_since"] is None and queue.view()["state"] == "ok"


def test_refused_credentials_hold_the_queue_until_resumed_and_nothing_is_dead_lettered(setup):
    store, clock, _ = setup
    for i in range(3):
        enqueue(store, f"M{i}")
    refused = DeliveryResult(False, error="401 Unauthorized: not authorised", outcome=DeliveryOutcome.NOT_AUTHORISED)
    peer = Peer([refused])
    queue = make_queue(setup, peer, max_attempts=1)
    for _ in range(100):
        clock.advance(1)
    assert peer.received == ["M0"]  # held: nothing more tried
    view = queue.view()
    assert view["state"] == "held" and view["held"].startswith("401") and view["paused"]
    assert {s["status"] for s in statuses(store).values()} == {"QUEUED"}
    assert statuses(store)["M0"]["attempts"] == 0 and "401" in statuses(store)["M0"]["last_error"]
    queue.resume()  # the credentials were fixed
    for _ in range(10):
        clock.advance(1)
    assert [s["status"] for s in statuses(store).values()] == ["SENT"] * 3
    assert queue.view()["held"] is None and peer.received == ["M0", "M0", "M1", "M2"]


def test_retry_now_overrides_a_retry_after(setup):
    store, clock, _ = setup
    enqueue(store, "M0")
    waited = DeliveryResult(False, error="503", outcome=DeliveryOutcome.RATE_LIMITED, wait=3000.0)
    peer = Peer([waited])
    queue = make_queue(setup, peer)
    clock.advance(0)
    clock.advance(1)
    assert queue.view()["wait_left"] > 2000
    assert queue.retry_now() == 1
    clock.advance(0)
    clock.advance(0)
    assert peer.received == ["M0", "M0"] and statuses(store)["M0"]["status"] == "SENT"
