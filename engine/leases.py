"""Holding leases (issue #31): a node's share of a set of named leases (a destination queue's
partitions, the singletons), renewed, rebalanced and let go.

Every ``renew`` seconds the keeper renews what it holds; a renewal refused (another node took
it: this node was paused past its ttl) stops that work at once. A renewal that cannot be made
(the store does not answer, or answers late) is not waited for: ``ttl - renew`` seconds after the
last successful renewal began, a timer stops the work (self-fencing), before the lease can have
expired; it resumes when a lease is taken again. Then, from the store's nodes (live: heard from within the
ttl) and leases, the keeper takes free leases up to its fair share (the names divided by the live
nodes, rounded up), and one more of those a dead node left (so the survivors absorb them without
waiting); it lets leases go, each after ``on_loss`` has drained it, when it holds more than its
share plus one, or more than its share while another live node holds less than its share minus
one (hysteresis: a slow database or a node that comes and goes does not make leases ping-pong).
Each change of owner is counted (``churn``).

The times of the leases are the database's (``ClusterQueries``); ``db_now``, when given, is
passed to it instead (tests, with a ``task.Clock``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from hl7relay.events import emit

__all__ = ["LeaseKeeper", "LeaseState"]

log = Logger(namespace="hl7relay.leases")


class LeaseState(enum.Enum):
    FREE = "free"  # not ours
    HELD = "held"  # ours: the work runs
    DRAINING = "draining"  # ours, being let go (rebalance): the work stops, then the lease is released


@dataclass(slots=True)
class _Lease:
    name: str
    state: LeaseState = LeaseState.FREE
    epoch: int | None = None
    renewed_at: float = 0.0  # the local clock when the last successful renewal (or take) began
    deadline: Any = None  # the timer (IDelayedCall) that stops the work unless a renewal comes first


class LeaseKeeper:
    def __init__(self, run, reactor, store, node: str, names: list[str], ttl: float, renew: float,
                 on_gain: Callable[[str, int], object], on_loss: Callable[[str], object],
                 db_now: Callable[[], float] | None = None):
        if not 0 < renew * 2 <= ttl:
            raise ValueError(f"lease_renew ({renew:g}s) must be at most half of lease_ttl ({ttl:g}s)")
        self.run, self.reactor, self.store, self.node = run, reactor, store, node
        self.ttl, self.renew = ttl, renew
        self.on_gain, self.on_loss = on_gain, on_loss
        self.live = 1  # the live nodes at the last tick
        self.db_now = db_now
        self.leases = {name: _Lease(name) for name in names}
        self.churn = 0  # leases taken or lost by this node
        self.fenced = 0  # leases this node found taken by another while it thought it held them
        self._loop: task.LoopingCall | None = None
        self._ticking = False

    def set_names(self, names: list[str]):
        """The leases wanted now (a reload changed the destinations): those held and still wanted
        are handed to their new work again (``on_gain``); those no longer wanted are let go (their
        work is gone already); new ones are free to be taken."""
        wanted = set(names)
        for name in [n for n in self.leases if n not in wanted]:
            lease = self.leases.pop(name)
            if lease.state is LeaseState.HELD and lease.epoch is not None:
                if lease.deadline is not None and lease.deadline.active():
                    lease.deadline.cancel()
                self.run(self.store.release_lease, name, self.node, lease.epoch, **self._now()).addErrback(lambda f: None)
        for name in names:
            kept = self.leases.get(name)
            if kept is None:
                self.leases[name] = _Lease(name)
            elif kept.state is LeaseState.HELD and kept.epoch is not None:
                self.on_gain(name, kept.epoch)

    def _now(self) -> dict:
        return {} if self.db_now is None else {"now": self.db_now()}

    @property
    def held(self) -> list[str]:
        return [lease.name for lease in self.leases.values() if lease.state is LeaseState.HELD]

    def start(self) -> None:
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = self.reactor
        self._loop.start(self.renew, now=True)

    @defer.inlineCallbacks
    def stop(self):
        """Stop the work of every lease held, then let them go (a clean stop: the others need not
        wait for the ttl)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for lease in [lease for lease in self.leases.values() if lease.state is not LeaseState.FREE]:
            yield self._let_go(lease)

    def _arm(self, lease: _Lease, began: float) -> None:
        """Renewed (or taken) at ``began``: the work stops ``ttl - renew`` after it unless renewed again."""
        lease.renewed_at = began
        if lease.deadline is not None and lease.deadline.active():
            lease.deadline.cancel()
        delay = max(0.0, began + self.ttl - self.renew - self.reactor.seconds())
        lease.deadline = self.reactor.callLater(delay, self._overdue, lease)

    def _overdue(self, lease: _Lease) -> None:
        if lease.state is LeaseState.HELD:
            self._lose(lease, f"not renewed for {self.reactor.seconds() - lease.renewed_at:.1f}s "
                              "(the store does not answer): it may expire")

    def _lose(self, lease: _Lease, why: str):
        """Stop the lease's work at once (it is not ours, or may not be)."""
        if lease.deadline is not None and lease.deadline.active():
            lease.deadline.cancel()
        was = lease.state
        lease.state, lease.epoch = LeaseState.FREE, None
        self.churn += 1
        emit("lease_changed", change="lost", held=len(self.held), lease=lease.name)
        log.warn("lease {name}: {why}; its work stops", name=lease.name, why=why)
        if was is LeaseState.HELD:
            return defer.maybeDeferred(self.on_loss, lease.name)
        return defer.succeed(None)

    @defer.inlineCallbacks
    def _let_go(self, lease: _Lease):
        epoch = lease.epoch
        if lease.deadline is not None and lease.deadline.active():
            lease.deadline.cancel()
        lease.state = LeaseState.DRAINING
        yield defer.maybeDeferred(self.on_loss, lease.name)  # drained: nothing of it in flight
        lease.state, lease.epoch = LeaseState.FREE, None
        self.churn += 1
        emit("lease_changed", change="released", held=len(self.held), lease=lease.name)
        if epoch is not None:
            try:
                yield self.run(self.store.release_lease, lease.name, self.node, epoch, **self._now())
            except Exception as exc:  # noqa: BLE001 - it expires on its own
                log.warn("lease {name}: not released ({error}); it expires in {ttl:g}s", name=lease.name,
                         error=str(exc), ttl=self.ttl)

    @defer.inlineCallbacks
    def tick(self):
        if self._ticking:  # the store is slow: one tick at a time
            return
        self._ticking = True
        try:
            yield self._renew_held()
            yield self._take_share()
        finally:
            self._ticking = False

    @defer.inlineCallbacks
    def _renew_held(self):
        for lease in [lease for lease in self.leases.values() if lease.state is LeaseState.HELD]:
            began = self.reactor.seconds()
            try:
                kept = yield self.run(self.store.renew_lease, lease.name, self.node, lease.epoch, self.ttl, **self._now())
            except Exception as exc:  # noqa: BLE001 - the store is down: its deadline stops the work in time
                log.warn("lease {name}: not renewed ({error})", name=lease.name, error=str(exc))
                continue
            if lease.state is not LeaseState.HELD:
                continue  # its deadline passed while the renewal was under way
            if kept:
                self._arm(lease, began)
            else:
                self.fenced += 1
                yield self._lose(lease, "taken by another node (this one was paused or cut off past its ttl)")

    def share(self) -> int:
        """This node's fair share of the leases."""
        return math.ceil(len(self.leases) / max(1, self.live))

    @defer.inlineCallbacks
    def _take_share(self):
        try:
            _, nodes = yield self.run(self.store.nodes, **self._now())
            rows = yield self.run(self.store.leases, **self._now())
        except Exception as exc:  # noqa: BLE001 - the store is down: nothing is taken or let go now
            log.warn("leases: the store does not answer ({error})", error=str(exc))
            return
        live = {n["node_id"] for n in nodes if n["state"] == "running" and n["heartbeat_age"] <= self.ttl} | {self.node}
        self.live = len(live)
        share = self.share()
        owners = {r["name"]: r["owner"] for r in rows if r["name"] in self.leases and r["left"] > 0}
        held = [lease for lease in self.leases.values() if lease.state is LeaseState.HELD]
        others = [sum(1 for owner in owners.values() if owner == node) for node in live if node != self.node]
        if len(held) > share + 1:
            shed = held[share + 1:]
        elif len(held) > share and others and min(others) < share - 1:
            shed = held[-1:]  # one at a time: the one below its share takes it, then we look again
        else:
            shed = []
        for lease in shed:
            yield self._let_go(lease)
        if shed:
            return
        last_owner = {r["name"]: r["owner"] for r in rows}
        for lease in self.leases.values():
            if lease.state is not LeaseState.FREE or lease.name in owners:
                continue
            orphan = last_owner.get(lease.name) not in live and lease.name in last_owner  # a dead node's
            if len(held) >= share + (1 if orphan else 0):
                continue
            began = self.reactor.seconds()
            try:
                epoch = yield self.run(self.store.acquire_lease, lease.name, self.node, self.ttl, **self._now())
            except Exception as exc:  # noqa: BLE001 - the store is down: nothing is taken now
                log.warn("lease {name}: cannot be taken now ({error})", name=lease.name, error=str(exc))
                return
            if epoch is None:
                continue  # another node took it meanwhile
            lease.state, lease.epoch = LeaseState.HELD, epoch
            self._arm(lease, began)
            self.churn += 1
            emit("lease_changed", change="taken", held=len(self.held), lease=lease.name)
            held.append(lease)
            log.info("lease {name}: taken (epoch {epoch})", name=lease.name, epoch=epoch)
            yield defer.maybeDeferred(self.on_gain, lease.name, epoch)

    def view(self) -> dict:
        return {"node": self.node, "held": {lease.name: lease.epoch for lease in self.leases.values()
                                            if lease.state is LeaseState.HELD},
                "share": self.share(), "churn": self.churn, "fenced": self.fenced}
