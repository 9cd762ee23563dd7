"""The forwarder process: the engine's destination queues and connections, on a reactor of their own.

Started by the engine (:class:`hl7relay.forwarder.parent.ForwarderProcess`) as
``python -m hl7relay.forwarder.child`` with its stdin (fd 0) carrying the engine's messages, the
first of them its settings (the store URL may hold a password: not on a command line), and fd 3
carrying its own (:mod:`.wire`). It reads the store (queued rows: after a
restart, replays, a backlog that did not fit in memory) and never writes it: results, withdrawals
and destination states go to the engine, which records them in its group commits and says when
they are durable. It stops when the engine says so, or when its stdin closes (the engine is
gone: what it had not recorded is delivered again after the restart, as the queues promise).
"""

from __future__ import annotations

import os
import sys
import time

from twisted.internet import defer, task, threads
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from hl7relay.events import subscribe
from hl7relay.forwarder.wire import Decoder, WireError, encode, write_now
from hl7relay.queues import DestinationQueue
from hl7relay.resources import Resources
from hl7relay.store.database import StoreError
from hl7relay.store.writer import as_store_error

__all__ = ["Forwarder", "ChildWriter", "main"]

log = Logger(namespace="hl7relay.forwarder")

# events that count; identical ones in a turn go once with how many (a delivery's event carries its message id
# and round trip now, for the tracer and the performance analyzer, so those go one by one)
_COUNTED = frozenset({"delivery_sent", "delivery_failed", "delivery_retried"})
VIEW_INTERVAL = 0.25  # how often the queues' views go to the engine (its status, API and console read them)


class _Link:
    """Requests to the engine and their answers."""

    def __init__(self, send, on_flush):
        self.send = send
        self.on_flush = on_flush  # runs a function just before this turn's messages are written
        self.pending: dict[int, defer.Deferred] = {}
        self._next = 0

    def request(self, kind: str, *args) -> defer.Deferred:
        self._next += 1
        d = self.pending[self._next] = defer.Deferred()
        self.send((kind, self._next, *args))
        return d

    def answered(self, request: int, value, error: str | None) -> None:
        d = self.pending.pop(request, None)
        if d is not None:
            d.errback(StoreError(error)) if error is not None else d.callback(value)

    def fail_all(self, reason: str) -> None:
        pending, self.pending = self.pending, {}
        for d in pending.values():
            d.errback(StoreError(reason))


class ChildWriter:
    """What the queues use as their store writer here: reads run in this process, writes are
    the engine's (it answers once they are committed)."""

    def __init__(self, store, link: _Link):
        self.store = store
        self.link = link
        self._inline = store.engine.dialect.name == "sqlite"
        self._groups: dict[bool, list] = {False: [], True: []}  # updates waiting for this turn's flush, by laziness

    def read(self, fn, *args) -> defer.Deferred:
        d = defer.maybeDeferred(fn, *args) if self._inline else threads.deferToThread(fn, *args)
        return d.addErrback(as_store_error)

    def update(self, *updates, lazy: bool = False) -> defer.Deferred:
        """Recorded by the engine; the updates of one reactor turn go as one request (one reply)."""
        group = self._groups[lazy]
        d = defer.Deferred()
        if not group:
            self.link.on_flush(lambda: self._send_group(lazy))
        group.append((updates, d))
        return d

    def _send_group(self, lazy: bool) -> None:
        group, self._groups[lazy] = self._groups[lazy], []
        if not group:
            return
        waiters = [d for _, d in group]

        def answered(result):
            for d in waiters:
                d.errback(result) if isinstance(result, Failure) else d.callback(None)

        self.link.request("update", tuple(u for updates, _ in group for u in updates), lazy).addBoth(answered)


class Forwarder(Protocol):
    """The forwarder's side of the pipes: the engine's messages in, its own out."""

    def __init__(self, store, reactor, clock=time.time, output=None, decoder=None):
        self.reactor = reactor
        self.clock = clock
        self.decoder = decoder or Decoder()
        self._before_flush: list = []
        self.link = _Link(self.send, self._on_flush)
        self.writer = ChildWriter(store, self.link)
        self.queues: dict[int, DestinationQueue] = {}
        self.deliveries: dict[tuple[str, str], object] = {}  # (channel, destination) -> its Delivery
        # what a destination's runner is given (destinations.py); no channels run here
        self.resources = Resources(reactor, self.writer, clock)
        self._out: list = []
        self._events: dict = {}  # (event, fields) -> how many times this turn
        self._flush_due = False
        self._views: dict = {}
        self.output = output  # writes bytes to the engine (fd 3); a transport's write in tests
        self.stopped = defer.Deferred()
        self._view_loop = task.LoopingCall(self._send_views)
        self._view_loop.clock = reactor
        subscribe(self._event)

    # -- wiring -------------------------------------------------------------------------------------
    def connectionMade(self):
        self._view_loop.start(VIEW_INTERVAL, now=False)

    def send(self, message: tuple) -> None:
        self._out.append(message)
        self._flush_soon()

    def _on_flush(self, hook) -> None:
        self._before_flush.append(hook)
        self._flush_soon()

    def _flush_soon(self) -> None:
        if not self._flush_due:
            self._flush_due = True
            self.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        hooks, self._before_flush = self._before_flush, []
        for hook in hooks:
            hook()
        events, self._events = self._events, {}
        self._out.extend(("event", name, dict(fields), count) for (name, fields), count in events.items())
        out, self._out = self._out, []
        if out and self.output is not None:
            self.output(encode(out))

    def _event(self, name: str, fields: dict) -> None:
        if name in _COUNTED:
            # a count: the same event with the same labels in one turn goes once, with how many
            key = (name, tuple(fields.items()))
            self._events[key] = self._events.get(key, 0) + 1
        else:  # a state (queue depth, destination up): each goes, in order, so the last one stands
            self._out.append(("event", name, fields, 1))
        self._flush_soon()

    def dataReceived(self, data: bytes):
        try:
            messages = self.decoder.feed(data)
        except WireError as exc:
            log.error("forwarder: unreadable input from the engine ({error}); stopping", error=str(exc))
            self.transport.loseConnection()
            return
        self.handle(messages)

    def handle(self, messages: list) -> None:
        for message in messages:
            try:
                getattr(self, "_on_" + message[0])(*message[1:])
            except Exception:  # noqa: BLE001 - one bad message must not stop the deliveries
                log.failure("forwarder: handling {kind} failed", kind=message[0])

    def connectionLost(self, reason=None):
        # the engine closed our stdin: it stopped (or died); finish what is on the wire, bounded
        for queue in self.queues.values():
            queue.stop()
        if self._view_loop.running:
            self._view_loop.stop()
        self.link.fail_all("the engine is gone")
        d = self._wait_in_flight(list(self.queues.values()), 5.0)
        d.addBoth(lambda _: self._close_deliveries(list(self.deliveries)))
        d.addBoth(lambda _: self.stopped.callback(None))

    # -- the engine's messages ----------------------------------------------------------------------
    def _on_open(self, queue_id, channel, destination, config, paused, poll_interval):
        key = (channel, destination)
        for old_id, old in list(self.queues.items()):  # a queue stopped earlier (a disabled channel) is replaced
            if (old.channel, old.destination) == key and old.stopped and not old.in_flight:
                del self.queues[old_id]
        delivery = self.deliveries.get(key)
        if delivery is None:
            delivery = self.deliveries[key] = config.runner(config, self.resources)
        queue = DestinationQueue(channel, destination, delivery.deliver, config.queue, self.writer, self.reactor,
                                 self.clock, poll_interval, keyed=getattr(delivery, "keyed", False),
                                 describe=getattr(delivery, "view", None))
        queue.paused = paused
        self.queues[queue_id] = queue
        queue.start()

    def _on_stop(self, queue_id):
        queue = self.queues.get(queue_id)
        if queue is not None:
            queue.stop()

    def _on_enqueue(self, queue_id, message_id, content, order_key, received_at):
        queue = self.queues.get(queue_id)
        if queue is not None:
            queue.enqueue(message_id, content, order_key, received_at)

    def _on_first_result(self, queue_id, message_id):
        queue = self.queues.get(queue_id)
        if queue is not None:
            queue.first_result(message_id).addCallback(lambda result: self.send(("result", queue_id, message_id, result)))

    def _on_release(self, queue_id, message_id):
        queue = self.queues.get(queue_id)
        if queue is not None:
            queue.release(message_id)

    def _on_withdraw(self, request, queue_id, message_id, reason):
        queue = self.queues.get(queue_id)
        d = queue.withdraw(message_id, reason) if queue is not None else None
        if d is None:
            self._answer(request, False)
            return
        d.addCallbacks(lambda _: self._answer(request, True), lambda f: self._answer(request, None, f.getErrorMessage()))

    def _on_pause(self, request, queue_id):
        queue = self.queues.get(queue_id)
        if queue is not None:
            queue.pause()
        self._answer(request, self._controlled(queue_id, queue, 0))

    def _on_resume(self, request, queue_id):
        queue = self.queues.get(queue_id)
        if queue is not None:
            queue.resume()
        self._answer(request, self._controlled(queue_id, queue, 0))

    def _on_retry_now(self, request, queue_id):
        queue = self.queues.get(queue_id)
        count = 0
        if queue is not None:
            delivery = self.deliveries.get((queue.channel, queue.destination))
            if delivery is not None:
                delivery.skip_backoff()
            count = queue.retry_now()
        self._answer(request, self._controlled(queue_id, queue, count))

    def _controlled(self, queue_id: int, queue, count: int) -> tuple:
        """An operator's control is answered with its count and the queue's view after it."""
        if queue is None:
            return count, None
        view = self._views[queue_id] = queue.view()
        return count, view

    def _on_retire(self, request, queue_ids, timeout):
        """Stop these queues, wait (bounded) for their deliveries on the wire, close their
        connections; answered once their results were sent (the engine records them before it
        opens their successors)."""
        queues = [self.queues.pop(q) for q in queue_ids if q in self.queues]
        for queue in queues:
            queue.stop()
        keys = {(q.channel, q.destination) for q in queues}
        self._stopping(keys)
        d = self._wait_in_flight(queues, timeout)
        d.addCallback(lambda _: self._close_deliveries(keys))
        d.addCallback(lambda _: self._answer(request, sum(len(q.in_flight) for q in queues)))

    def _on_shutdown(self, request, timeout):
        queues = list(self.queues.values())
        for queue in queues:
            queue.stop()
        self._stopping(list(self.deliveries))
        d = self._wait_in_flight(queues, timeout)

        def done(_):
            unanswered = sum(len(q.in_flight) for q in queues)
            self._close_deliveries(list(self.deliveries))
            self._send_views(force=True)
            self._answer(request, unanswered)

        d.addCallback(done)

    def _on_reply(self, request, value, error=None):
        self.link.answered(request, value, error)

    # -- helpers --------------------------------------------------------------------------------------
    def _answer(self, request, value, error=None) -> None:
        self.send(("reply", request, value, error))

    @defer.inlineCallbacks
    def _wait_in_flight(self, queues, timeout: float):
        deadline = self.reactor.seconds() + timeout
        while any(q.in_flight for q in queues) and self.reactor.seconds() < deadline:
            yield task.deferLater(self.reactor, 0.05, lambda: None)

    def _stopping(self, keys) -> None:
        """Their queues stop: what a delivery holds is finished now (a batch is written)."""
        for key in keys:
            delivery = self.deliveries.get(key)
            if delivery is not None:
                delivery.stopping()

    def _close_deliveries(self, keys) -> None:
        open_keys = {(q.channel, q.destination) for q in self.queues.values() if not q.stopped}
        for key in keys:
            if key in open_keys:
                continue
            delivery = self.deliveries.pop(key, None)
            if delivery is not None:
                delivery.close()

    def _send_views(self, force: bool = False) -> None:
        views = {queue_id: queue.view() for queue_id, queue in self.queues.items()}
        changed = {q: v for q, v in views.items() if self._views.get(q) != v}
        self._views = views
        if changed or force:
            self.send(("views", changed))


def main() -> int:
    from twisted.internet import reactor, stdio

    from hl7relay.logs import start_logging
    from hl7relay.store.database import Store

    os.umask(0o077)
    decoder, messages = Decoder(), []
    while not messages:  # the settings, before anything else (blocking: nothing runs yet)
        data = os.read(0, 65536)
        if not data:
            return 0  # the engine is gone before it said anything
        messages = decoder.feed(data)
    kind, settings = messages.pop(0)
    if kind != "settings":
        print(f"hl7relay forwarder: expected its settings first, got {kind!r}", file=sys.stderr)
        return 2
    # dies with its engine: one killed (kill -9, OOM) cannot close our stdin in time for the
    # deliveries we would start meanwhile, which its successor sends again
    if not _die_with_parent(settings.get("engine_pid")):
        return 0
    start_logging(settings.get("log_level", "info"), settings.get("log_format", "text"),
                  settings.get("channel_levels") or {})
    from hl7relay.store.lock import forwarder_lock

    held = forwarder_lock(settings["store"])  # PostgreSQL: a new engine waits while we run
    store = Store(settings["store"])  # migrated by the engine before it started us
    forwarder = Forwarder(store, reactor, decoder=decoder)
    transport = stdio.StandardIO(forwarder, stdin=0, stdout=3, reactor=reactor)
    forwarder.output = lambda data: write_now(transport._writer, data)
    reactor.callWhenRunning(forwarder.handle, messages)  # what came with the settings
    forwarder.stopped.addBoth(lambda _: reactor.stop())
    # Signals are the engine's business: it stops us (its message, or our stdin closing when it
    # is gone). A Ctrl-C or a SIGTERM sent to the whole process group must not cut deliveries
    # short before the engine has recorded their results.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    reactor.run(installSignalHandlers=False)
    store.close()
    if held is not None:
        held.close()
    return 0


def _die_with_parent(engine_pid) -> bool:
    """Ask Linux for SIGKILL when the engine ends; False when it has ended already."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the closed stdin still stops us
        pass
    return engine_pid is None or os.getppid() == engine_pid


if __name__ == "__main__":
    sys.exit(main())
