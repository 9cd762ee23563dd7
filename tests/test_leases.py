"""The lease keeper (issue #31): a node's fair share of named leases, renewed, rebalanced with
hysteresis, lost at once when another node took one, and self-fenced when the store stops
answering; on a task.Clock and the database's time given from it."""

from __future__ import annotations

import pytest
from twisted.internet import defer, task

from hl7relay.leases import LeaseKeeper
from hl7relay.store.database import Store

T0 = 1_800_000_000.0
NAMES = [f"queue:adt/lab/{i}" for i in range(4)]


@pytest.fixture
def store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.migrate()
    yield store
    store.close()


class Node:
    def __init__(self, store, clock, name, live, names=NAMES, ttl=10.0, renew=3.0):
        self.gained, self.lost, self.down = [], [], False

        def run(fn, *args, **kwargs):
            if self.down:
                return defer.fail(OSError("the store does not answer"))
            return defer.maybeDeferred(fn, *args, **kwargs)

        self.keeper = LeaseKeeper(run, clock, store, name, names, ttl, renew, live,
                                  lambda lease, epoch: self.gained.append((lease, epoch)), self.lost.append,
                                  db_now=lambda: T0 + clock.seconds())


def test_one_node_takes_every_lease_and_renews_them(store):
    clock = task.Clock()
    a = Node(store, clock, "node-a", lambda: 1)
    a.keeper.start()
    assert sorted(a.keeper.held) == NAMES and [epoch for _, epoch in a.gained] == [1, 1, 1, 1]
    clock.pump([3] * 10)  # ten renewals
    assert sorted(a.keeper.held) == NAMES and a.lost == [] and a.keeper.churn == 4
    assert all(row["owner"] == "node-a" and row["left"] > 7 for row in store.leases(now=T0 + clock.seconds()))


def test_a_second_node_gets_its_share_with_hysteresis_and_a_dead_nodes_leases_move_after_the_ttl(store):
    clock = task.Clock()
    nodes = {"count": 1}
    a = Node(store, clock, "node-a", lambda: nodes["count"])
    a.keeper.start()
    b = Node(store, clock, "node-b", lambda: nodes["count"])
    nodes["count"] = 2
    b.keeper.start()
    assert b.keeper.held == []  # a holds 4: more than its share (2) but not more than share + 1... yet
    clock.advance(3)
    assert len(a.keeper.held) == 3 and a.lost == [a.gained[-1][0]]  # a let one go, drained first
    clock.advance(3)
    assert len(b.keeper.held) == 1 and b.gained[0][1] == 2  # b took it: a new epoch
    assert len(a.keeper.held) == 3  # share 2, hysteresis 1: a keeps 3, no ping-pong
    clock.pump([3] * 10)
    assert (len(a.keeper.held), len(b.keeper.held)) == (3, 1) and a.keeper.churn == 5  # stable
    # a dies (kill -9: nothing more from it); its leases expire and b takes them within ttl + renew
    a.keeper._loop.stop()
    nodes["count"] = 1
    died = clock.seconds()
    while len(b.keeper.held) < 4:
        clock.advance(1)
        assert clock.seconds() - died <= 10 + 3, "not taken over within lease_ttl + lease_renew"
    assert sorted(b.keeper.held) == NAMES


def test_a_paused_node_has_stopped_before_another_takes_over_and_a_refused_renewal_stops_at_once(store):
    clock = task.Clock()
    a = Node(store, clock, "node-a", lambda: 1, names=NAMES[:1])
    lost_at = []
    a.keeper.on_loss = lambda name: lost_at.append(clock.seconds())
    a.keeper.start()
    a.keeper._loop.stop()  # its renewals stop (a pause, a stuck thread): its deadline still stops the work
    b = Node(store, clock, "node-b", lambda: 1, names=NAMES[:1])
    clock.pump([1] * 11)
    b.keeper.start()
    assert b.gained == [(NAMES[0], 2)] and lost_at == [7.0]  # a stopped at 7 s, before the lease expired (10 s)
    # a renewal refused: another node has the lease (the store says so): the work stops at once
    c = Node(store, clock, "node-c", lambda: 1, names=NAMES[1:2])
    c.keeper.start()
    assert store.acquire_lease(NAMES[1], "node-d", 10, now=T0 + clock.seconds() + 60) == 2  # as if c was gone
    clock.advance(3)
    assert c.keeper.held == [] and c.lost == [NAMES[1]] and c.keeper.fenced == 1
    clock.pump([3] * 3)
    assert c.keeper.held == []  # node-d's, live: not taken back


def test_a_node_that_cannot_reach_the_store_stops_before_its_leases_may_have_expired(store):
    clock = task.Clock()
    a = Node(store, clock, "node-a", lambda: 1, names=NAMES[:2])
    a.keeper.start()
    a.down = True
    clock.advance(3)
    assert sorted(a.keeper.held) == NAMES[:2]  # 3 s since the last renewal: surely still ours
    clock.advance(3)
    clock.advance(1)
    assert a.keeper.held == [] and sorted(a.lost) == NAMES[:2]  # 7 s = ttl - renew: it stops (self-fencing)
    a.down = False
    clock.pump([3] * 2)  # the leases expired meanwhile (10 s): taken again, each a new epoch
    assert sorted(a.keeper.held) == NAMES[:2] and [e for _, e in a.gained[-2:]] == [2, 2]
    assert all(row["owner"] == "node-a" for row in store.leases(now=T0 + clock.seconds()))


def test_a_clean_stop_drains_then_releases_so_another_node_takes_over_at_once(store):
    clock = task.Clock()
    a = Node(store, clock, "node-a", lambda: 1, names=NAMES[:2])
    a.keeper.start()
    done = a.keeper.stop()
    assert done.called and sorted(a.lost) == NAMES[:2]
    b = Node(store, clock, "node-b", lambda: 1, names=NAMES[:2])
    b.keeper.start()  # no wait for the ttl
    assert sorted(b.keeper.held) == NAMES[:2] and [e for _, e in b.gained] == [2, 2]


def test_renew_must_be_at_most_half_the_ttl(store):
    with pytest.raises(ValueError, match="at most half"):
        LeaseKeeper(None, task.Clock(), store, "n", NAMES, 10, 6, lambda: 1, print, print)
