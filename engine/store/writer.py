"""Group commit: concurrent messages from many connections share one transaction.

Store calls block, so they run on one writer thread. While a commit is on disk, new records
queue; when it returns, everything queued goes in the next single transaction. Durability then
costs one disk flush per batch, not per message, and a busy engine batches more. If a batch
fails, each record is tried alone, so one bad record cannot fail its neighbours.

The writer is the engine's one way in to the store: :meth:`~StoreWriter.write` (a message) and
:meth:`~StoreWriter.update` (typed updates: deliveries, the ACK, audit entries, the operators'
switches, destinations' states, token uses) for writes, :meth:`~StoreWriter.read` for queries.
"""

from __future__ import annotations

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

import time

from hl7relay.events import emit
from hl7relay.store.database import MessageRecord, Store, StoreError
from hl7relay.store.records import Update


__all__ = ["StoreWriter", "as_store_error"]

log = Logger(namespace="hl7relay.store")


def as_store_error(failure):
    """An errback: a failed store call fails as StoreError (the callers' one type for it)."""
    if failure.check(StoreError):
        return failure
    raise StoreError(f"store query failed: {failure.getErrorMessage()}")


class StoreWriter:
    def __init__(self, store: Store, reactor=None, executor=None, lazy_delay: float = 0.0,
                 overlap_commits: bool = True, commit_runner=None):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.store = store
        self.reactor = reactor
        self._pool = None
        self._committer: ThreadPool | None = None  # the thread that runs SQLite's COMMIT (overlapped commits)
        self._commit_runner = None
        self.inline = False
        self._scheduled = False  # a flush is due on the next reactor turn (inline commits)
        if executor is None and store.engine.dialect.name == "sqlite":
            # A local SQLite batch is written here, on the reactor thread, once per read burst:
            # building and binding its rows holds the GIL, and on a thread it fought the reactor
            # for it (measured: 476 vs 746 msgs/s). Only the COMMIT, the disk flush that holds no
            # GIL (1-3 ms, more with a WAL checkpoint), runs on a thread of its own, so the next
            # batch's messages are read, processed and built meanwhile (overlap_commits).
            # A network database (PostgreSQL) keeps its thread for the whole commit.
            self.inline = True
            executor = lambda fn, *args: defer.maybeDeferred(fn, *args)  # noqa: E731
            if overlap_commits and getattr(store, "splits_commits", False):
                self._commit_runner = commit_runner or self._on_commit_thread  # fn -> Deferred (tests: by hand)
        self._reader: ThreadPool | None = None  # read_aside's thread, once used
        self._pooled = None
        if executor is None:
            self._pool = ThreadPool(1, 1, name="hl7relay-store")
            self._pool.start()
            executor = self._pooled = lambda fn, *args: threads.deferToThreadPool(reactor, self._pool, fn, *args)  # noqa: E731
        self.executor = executor
        # Updates that nobody waits for (delivery results) ride along with the next commit of
        # messages, or go on their own after lazy_delay seconds: under load that saves a disk
        # flush per delivery. 0 commits them at once.
        self.lazy_delay = lazy_delay
        self._lazy_timer = None
        # why the latest commit failed when nothing in it could be committed (disk full, database
        # gone): /readyz reports it until a commit, or a probe write, succeeds again
        self.commit_failure: str | None = None
        self._urgent = 0  # updates queued that someone waits for
        self._records: list[tuple[MessageRecord, defer.Deferred]] = []
        self._updates: list[tuple[tuple, defer.Deferred]] = []
        self._busy = False
        self._idle_waiters: list[defer.Deferred] = []
        self.batches = 0
        self.last_batch_size = 0
        self.largest_batch = 0

    def write(self, record: MessageRecord) -> defer.Deferred:
        """Commit a message; fires with its id once it is durable, or fails with StoreError."""
        d: defer.Deferred = defer.Deferred()
        self._records.append((record, d))
        self._schedule()
        return d

    def update(self, *updates: Update | tuple, lazy: bool = False) -> defer.Deferred:
        """Commit updates (see Store._update for their form); fires once durable. ``lazy``: no
        commit of their own unless nothing else commits within ``lazy_delay`` seconds."""
        d: defer.Deferred = defer.Deferred()
        self._updates.append((updates, d))
        if lazy and self.lazy_delay > 0:
            if self._lazy_timer is None:
                self._lazy_timer = self.reactor.callLater(self.lazy_delay, self._lazy_due)
        else:
            self._urgent += 1
            self._schedule()
        return d

    def _lazy_due(self):
        self._lazy_timer = None
        self._schedule()

    def _schedule(self):
        if not self.inline:
            self._flush()
        elif not self._busy and not self._scheduled:
            # committing on this thread: wait for the rest of this read burst, so it forms one batch
            self._scheduled = True

            def go():
                self._scheduled = False
                self._flush()

            self.reactor.callLater(0, go)

    def read(self, fn, *args) -> defer.Deferred:
        """Run a store query on the writer thread, after what is already queued. Only queries:
        a write goes in as an update, so it joins the group commit (and the forwarder's queues,
        whose updates the engine commits, write the same way)."""
        return self.executor(fn, *args).addErrback(as_store_error)

    def read_aside(self, fn, *args) -> defer.Deferred:
        """A query that need not wait behind the commits (a cluster's partition polls, read again
        and again, tolerate seeing the store just before a commit): on a network database a
        thread of its own, so the commits the ACKs wait for never queue behind it; elsewhere
        :meth:`read`."""
        if self._pool is None or self.executor is not self._pooled:
            return self.read(fn, *args)
        if self._reader is None:
            self._reader = ThreadPool(1, 1, name="hl7relay-reads")
            self._reader.start()
        return threads.deferToThreadPool(self.reactor, self._reader, fn, *args).addErrback(as_store_error)

    @property
    def pending(self) -> int:
        return len(self._records) + len(self._updates) + (1 if self._busy else 0)

    def _flush(self):
        if not self._records and not self._urgent and self._lazy_timer is not None:
            return  # only lazy updates: they wait for messages to ride with, or for their timer
        if self._busy or not (self._records or self._updates):
            if not self._busy and self._idle_waiters:
                waiters, self._idle_waiters = self._idle_waiters, []
                for waiter in waiters:
                    waiter.callback(None)
            return
        records, self._records = self._records, []
        updates, self._updates = self._updates, []
        self._urgent = 0
        if self._lazy_timer is not None:  # the lazy updates go in this commit
            self._lazy_timer.cancel()
            self._lazy_timer = None
        self._busy = True
        size = len(records) + len(updates)
        self.batches += 1
        self.last_batch_size = size
        self.largest_batch = max(self.largest_batch, size)
        flat_updates = [u for group, _ in updates for u in group]
        started = time.perf_counter()
        d = self._commit([r for r, _ in records], flat_updates)
        d.addBoth(self._timed, started, size)
        d.addCallbacks(self._committed, self._batch_failed, callbackArgs=(records, updates), errbackArgs=(records, updates))
        d.addBoth(self._done)

    def _on_commit_thread(self, fn) -> defer.Deferred:
        if self._committer is None:
            # started at the first commit, stopped by close() or the reactor's shutdown: a
            # process that fails before its first message has no thread to keep it alive
            self._committer = ThreadPool(1, 1, name="hl7relay-commit")
            self._committer.start()
            self.reactor.addSystemEventTrigger("during", "shutdown", self._stop_committer)
        return threads.deferToThreadPool(self.reactor, self._committer, fn)

    def _stop_committer(self) -> None:
        pool, self._committer = self._committer, None
        if pool is not None:
            pool.stop()

    def _commit(self, records: list[MessageRecord], updates: list) -> defer.Deferred:
        """One batch: ids of its records once durable. Overlapped (SQLite): the statements run
        now, the COMMIT on the committer thread; the writer stays busy until it returns, so the
        next batch waits for it while its messages are being processed."""
        if self._commit_runner is None:
            return self.executor(self.store.commit, records, updates)
        try:
            ids = self.store.write_batch(records, updates)
        except Exception:  # noqa: BLE001 - StoreError, or a bug: the batch fails as a whole (retried one by one)
            return defer.fail()
        return self._commit_runner(self.store.finish_batch).addCallback(lambda _: ids)

    @staticmethod
    def _timed(result, started, size):
        emit("store_commit", seconds=time.perf_counter() - started, size=size)
        return result

    def _committed(self, ids, records, updates):
        self.commit_failure = None
        fenced = getattr(self.store, "last_fenced", None)
        if fenced:  # results written under a lease that moved on: left out (their new owner sends them)
            log.warn("fencing: {count} delivery results written under a lease another node holds now were left out",
                     count=len(fenced))
            emit("writes_fenced", count=len(fenced))
            self.store.last_fenced = []
        for (_, waiter), message_id in zip(records, ids):
            waiter.callback(message_id)
        for _, waiter in updates:
            waiter.callback(None)

    @defer.inlineCallbacks
    def _batch_failed(self, failure, records, updates):
        if len(records) + len(updates) == 1:
            self.commit_failure = failure.getErrorMessage()
            waiter = (records or updates)[0][1]
            waiter.errback(failure if failure.check(StoreError) else StoreError(str(failure.value)))
            return
        succeeded = 0
        log.warn("a batch of {size} failed ({reason}); retrying one by one", size=len(records) + len(updates),
                 reason=failure.getErrorMessage())
        for record, waiter in records:
            try:
                [message_id] = yield self.executor(self.store.commit, [record], [])
                succeeded += 1
                waiter.callback(message_id)
            except Exception as exc:  # the store said no for this one: the caller answers AR, never AA
                waiter.errback(exc if isinstance(exc, StoreError) else StoreError(str(exc)))
        for group, waiter in updates:
            try:
                yield self.executor(self.store.commit, [], list(group))
                succeeded += 1
                waiter.callback(None)
            except Exception as exc:
                waiter.errback(exc if isinstance(exc, StoreError) else StoreError(str(exc)))
        # one bad row is that row's problem; nothing committing at all is the store's (disk full...)
        self.commit_failure = None if succeeded else failure.getErrorMessage()

    def _done(self, _):
        self._busy = False
        self._flush()

    @defer.inlineCallbacks
    def probe(self):
        """After a failed commit: can the store take a write again? Clears the failure when it can."""
        if self.commit_failure is None:
            return None
        try:
            yield self.read(self.store.probe_write)
        except Exception as exc:  # noqa: BLE001 - still failing: say why
            self.commit_failure = str(exc) or type(exc).__name__
        else:
            self.commit_failure = None
        return self.commit_failure

    def drain(self) -> defer.Deferred:
        """Fires when nothing is queued or being committed."""
        if not self._busy and not self._records and not self._updates:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._idle_waiters.append(d)
        if self._lazy_timer is not None:  # lazy updates do not wait for their timer
            self._lazy_timer.cancel()
            self._lazy_timer = None
        if not self._busy:
            self._flush()
        return d

    def _stop_reader(self) -> None:
        if self._reader is not None:
            self._reader.stop()
            self._reader = None

    def close_now(self) -> None:
        """Stop the store's threads and close it, nothing to drain: an engine whose start failed
        (a taken port) exits rather than waiting on a thread the reactor never ran to stop."""
        self._stop_reader()
        if self._pool is not None:
            self._pool.stop()
        self._stop_committer()
        self.store.close()

    def close(self) -> defer.Deferred:
        d = self.drain()

        def stop(_):
            self._stop_reader()
            if self._pool is not None:
                self._pool.stop()
            self._stop_committer()
            self.store.close()

        d.addCallback(stop)
        return d
