"""The lease keeper (issue #31): a node's fair share of named leases, renewed, rebalanced with
hysteresis, lost at once when another node took one, and self-fenced when the store stops
answering; on a task.Clock, with the database's time given from it and the nodes' heartbeats
written as NodeBeat writes them."""

from __future__ import annotations

import pytest
from twisted.internet import defer, task

from hl7relay.leases import LeaseKeeper
from hl7relay.store.database import Store

T0 = 1_800_000_000.0
NAMES = [f"queue:adt/lab/{i}" for i in range(8)]


@pytest.fixture
def store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.migrate()
    yield store
    store.close()


class Node:
    """A node: its heartbeat every renew seconds and its lease keeper."""

    def __init__(self, store, clock, name, names=NAMES, ttl=10.0, renew=3.0):
        self.store, self.clock, self.name = store, clock, name
        self.gained, self.lost, self.down = [], [], False

        def run(fn, *args, **kwargs):
            if self.down:
                return defer.fail(OSError("the store does not answer"))
            return defer.maybeDeferred(fn, *args, **kwargs)

        self.keeper = LeaseKeeper(run, clock, store, name, names, ttl, renew,
                                  lambda lease, epoch: self.gained.append((lease, epoch)), self.lost.append,
                                  db_now=self.now)
        self.beat = task.LoopingCall(lambda: None if self.down else store.heartbeat(name, now=self.now()))
        self.beat.clock = clock
        self.renew = renew

    def now(self):
        return T0 + self.clock.seconds()

    def start(self):
        self.store.register_node(self.name, "host", 1, "test", now=self.now())
        self.beat.start(self.renew, now=False)
        self.keeper.start()
        return self

    def die(self):  # kill -9: nothing more from it, not even a goodbye
        self.beat.stop()
        self.keeper._loop.stop()
        for lease in self.keeper.leases.values():
            if lease.deadline is not None and lease.deadline.active():
                lease.deadline.cancel()

    @property
    def held(self):
        return sorted(self.keeper.held)


def test_one_node_takes_every_lease_and_renews_them(store):
    clock = task.Clock()
    a = Node(store, clock, "node-a").start()
    assert a.held == NAMES and [epoch for _, epoch in a.gained] == [1] * 8
    clock.pump([3] * 10)  # ten renewals
    assert a.held == NAMES and a.lost == [] and a.keeper.churn == 8
    assert all(row["owner"] == "node-a" and row["left"] > 7 for row in store.leases(now=a.now()))


def test_nodes_joining_share_the_leases_and_stay_put(store):
    clock = task.Clock()
    a = Node(store, clock, "node-a").start()
    b = Node(store, clock, "node-b").start()
    c = Node(store, clock, "node-c").start()
    clock.pump([1] * 40)
    counts = sorted(len(n.held) for n in (a, b, c))
    assert sum(counts) == 8 and counts[0] >= 2 and counts[-1] <= 4, counts  # share 3, hysteresis 1
    churn = sum(n.keeper.churn for n in (a, b, c))
    clock.pump([1] * 60)
    assert sum(n.keeper.churn for n in (a, b, c)) == churn  # settled: no ping-pong
    assert all(lease in set(a.held) | set(b.held) | set(c.held) for lease in NAMES)
    assert not set(a.held) & set(b.held) and not set(b.held) & set(c.held) and not set(a.held) & set(c.held)


def test_a_dead_nodes_leases_are_taken_over_within_ttl_plus_renew(store):
    clock = task.Clock()
    nodes = [Node(store, clock, f"node-{x}").start() for x in "abc"]
    clock.pump([1] * 40)
    a, b, c = nodes
    orphans = c.held
    assert orphans
    c.die()
    died = clock.seconds()
    while set(orphans) - set(a.held) - set(b.held):
        clock.advance(0.5)
        assert clock.seconds() - died <= 10 + 3, "not taken over within lease_ttl + lease_renew"
    assert sorted(a.held + b.held) == NAMES
    assert all(epoch >= 2 for lease, epoch in a.gained + b.gained if lease in orphans and epoch > 1)


def test_a_paused_node_has_stopped_before_another_takes_over_and_a_refused_renewal_stops_at_once(store):
    clock = task.Clock()
    a = Node(store, clock, "node-a", names=NAMES[:1]).start()
    lost_at = []
    a.keeper.on_loss = lambda name: lost_at.append(clock.seconds())
    a.keeper._loop.stop()  # its renewals stop (a pause, a stuck thread): its deadline still stops the work
    b = Node(store, clock, "node-b", names=NAMES[:1])
    clock.pump([1] * 11)
    b.start()
    assert b.gained == [(NAMES[0], 2)] and lost_at == [7.0]  # a stopped at 7 s, before the lease expired (10 s)
    # a renewal refused: another node has the lease (the store says so): the work stops at once
    c = Node(store, clock, "node-c", names=NAMES[1:2]).start()
    assert store.acquire_lease(NAMES[1], "node-d", 10, now=c.now() + 60) == 2  # as if c had been gone a minute
    clock.advance(3)
    assert c.held == [] and c.lost == [NAMES[1]] and c.keeper.fenced == 1
    clock.pump([3] * 3)
    assert c.held == []  # node-d's, live: not taken back


def test_a_node_that_cannot_reach_the_store_stops_before_its_leases_may_have_expired(store):
    clock = task.Clock()
    a = Node(store, clock, "node-a", names=NAMES[:2]).start()
    a.down = True
    clock.pump([1] * 6)
    assert a.held == NAMES[:2]  # 6 s since the last renewal: surely still ours
    clock.advance(1)
    assert a.held == [] and sorted(a.lost) == NAMES[:2]  # 7 s = ttl - renew: it stops (self-fencing)
    a.down = False
    clock.pump([1] * 6)  # the leases expired meanwhile (10 s): taken again, each a new epoch
    assert a.held == NAMES[:2] and [e for _, e in a.gained[-2:]] == [2, 2]


def test_a_clean_stop_drains_then_releases_so_another_node_takes_over_at_once(store):
    clock = task.Clock()
    a = Node(store, clock, "node-a", names=NAMES[:2]).start()
    done = a.keeper.stop()
    assert done.called and sorted(a.lost) == NAMES[:2]
    store.node_stopped("node-a", now=a.now())
    b = Node(store, clock, "node-b", names=NAMES[:2]).start()  # no wait for the ttl
    assert b.held == NAMES[:2] and [e for _, e in b.gained] == [2, 2]


def test_renew_must_be_at_most_half_the_ttl(store):
    with pytest.raises(ValueError, match="at most half"):
        LeaseKeeper(None, task.Clock(), store, "n", NAMES, 10, 6, print, print)
