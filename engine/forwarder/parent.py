"""The engine's side of its forwarder process: starting it, talking to it, and the queues'
stand-ins (:class:`RemoteQueue`) that the engine and its trips use in place of
:class:`~hl7relay.queues.DestinationQueue`.

What the child reports is applied here: results and withdrawals go into the engine's group
commits (the child learns when they are durable, which is when its queues forget them), events
are emitted as if the queues ran here (metrics, stats), and queue views are kept for the status,
API and console. If the child dies, it is started again after ``restart_delay`` and its queues
are opened again: what was queued is in the store and is read back by their first poll.
"""

from __future__ import annotations

import os
import sys

from twisted.internet import defer, protocol
from twisted.logger import Logger

from hl7relay.events import relay
from hl7relay.forwarder.wire import Decoder, WireError, encode, write_now
from hl7relay.outcomes import DeliveryResult

__all__ = ["ForwarderProcess", "RemoteQueue"]

log = Logger(namespace="hl7relay.forwarder")



class RemoteQueue:
    """A destination queue that runs in the forwarder: what the engine calls on a queue
    (:class:`hl7relay.queues.Queue`), sent there."""

    remote = True

    def __init__(self, forwarder: "ForwarderProcess", channel: str, destination: str, config, poll_interval: float):
        self.forwarder = forwarder
        self.channel = channel
        self.destination = destination
        self.config = config
        self.options = config.queue
        self.poll_interval = poll_interval
        self.queue_id = forwarder.new_queue_id()
        self.paused = False
        self.stopped = False
        self.started = False
        self._view: dict | None = None
        self._waiters: dict[int, list[defer.Deferred]] = {}

    # -- lifecycle (the engine's) ------------------------------------------------------------------
    def start(self) -> None:
        self.started = True
        self.stopped = False
        self.forwarder.open(self)

    def stop(self) -> None:
        self.stopped = True
        self.forwarder.send(("stop", self.queue_id))

    # -- a message's deliveries -----------------------------------------------------------------------
    def partition_of(self, order_key, content) -> int:
        return 0  # the forwarder runs one engine's queues (not a cluster's)

    def enqueue(self, message_id: int, content: bytes, order_key, received_at: float, message=None) -> None:
        if not self.stopped:
            self.forwarder.send(("enqueue", self.queue_id, message_id, content, order_key, received_at))

    def first_result(self, message_id: int) -> defer.Deferred:
        d = defer.Deferred()
        self._waiters.setdefault(message_id, []).append(d)
        self.forwarder.send(("first_result", self.queue_id, message_id))
        return d

    def result(self, message_id: int, result: DeliveryResult) -> None:
        for waiter in self._waiters.pop(message_id, ()):
            waiter.callback(result)

    def release(self, message_id: int) -> None:
        self.forwarder.send(("release", self.queue_id, message_id))

    def withdraw(self, message_id: int, reason: str) -> defer.Deferred:
        return self.forwarder.request("withdraw", self.queue_id, message_id, reason)

    def orphaned(self, reason: str) -> None:
        """The forwarder died: whoever waits for a first result hears it now (AE: the delivery
        stays queued and the restarted forwarder sends it; a sender told to resend would make two)."""
        waiters, self._waiters = self._waiters, {}
        for ds in waiters.values():
            for d in ds:
                d.callback(DeliveryResult(False, application_error=True, error=reason))

    # -- operators' controls ----------------------------------------------------------------------------
    def pause(self) -> defer.Deferred:
        """Fires once the forwarder has paused the queue, its view then current."""
        self.paused = True
        return self._control("pause")

    def resume(self) -> defer.Deferred:
        self.paused = False
        return self._control("resume")

    def retry_now(self) -> defer.Deferred:
        """Fires with how many waiting deliveries were made due (the view then current)."""
        return self._control("retry_now").addCallback(lambda answer: answer[0])

    def _control(self, action: str) -> defer.Deferred:
        def answered(answer):
            if answer is not None and answer[1] is not None:
                self._view = answer[1]
            return answer if answer is not None else (0, None)

        return self.forwarder.request(action, self.queue_id).addCallback(answered)

    @property
    def in_flight(self) -> range:
        return range((self._view or {}).get("in_flight", 0))

    def view(self) -> dict:
        view = self._view or {
            "channel": self.channel, "destination": self.destination, "connected": None, "depth": 0, "in_memory": 0,
            "on_disk": 0, "in_flight": 0, "oldest_age": None, "head": None, "last_error": "", "last_error_at": None,
            "sent": 0, "failed": 0, "retried": 0, "state": "idle"}
        # paused here at once (the forwarder's view says so on its next report)
        return dict(view, paused=self.paused, state="paused" if self.paused else view.get("state", "idle"))


class ForwarderProcess(protocol.ProcessProtocol):
    """Starts the forwarder, carries messages both ways, and restarts it when it dies."""

    def __init__(self, writer, settings: dict, reactor=None, restart_delay: float = 1.0, argv: list[str] | None = None,
                 lock_fd: int | None = None):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.writer = writer
        self.settings = settings  # store URL, log settings: what the child needs to start
        self.restart_delay = restart_delay
        self.argv = argv or [sys.executable, "-m", "hl7relay.forwarder.child"]
        self.queues: dict[int, RemoteQueue] = {}
        self.pid: int | None = None
        self.restarts = 0
        self.stopping = False
        self._decoder = Decoder()
        self._out: list = []
        self._flush_due = False
        self._requests: dict[int, defer.Deferred] = {}
        self._next_request = 0
        self._next_queue = 0
        self._ended: defer.Deferred | None = None
        # the store's lock (SQLite), inherited: the store stays locked while the forwarder lives,
        # so a new engine cannot start beside a forwarder that outlived a killed engine
        self.lock_fd = lock_fd

    def queue(self, channel: str, destination: str, config, poll_interval: float) -> RemoteQueue:
        """The engine's stand-in for a destination queue that runs in the forwarder."""
        return RemoteQueue(self, channel, destination, config, poll_interval)

    def new_queue_id(self) -> int:
        self._next_queue += 1
        return self._next_queue

    # -- the process ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._decoder = Decoder()
        self._ended = defer.Deferred()
        argv = list(self.argv)
        child_fds = {0: "w", 1: 1, 2: 2, 3: "r"}
        if self.lock_fd is not None:
            from hl7relay.store.lock import LOCK_FD

            child_fds[LOCK_FD] = self.lock_fd
        self.reactor.spawnProcess(self, argv[0], argv, env=dict(os.environ), childFDs=child_fds)

    def connectionMade(self):
        self.pid = self.transport.pid
        # the settings go first, through the pipe: the store URL may hold a password, and a
        # command line is readable by every user of the machine (/proc/PID/cmdline)
        write_now(self.transport.pipes.get(0), encode([("settings", self.settings)]))
        # after a restart: open again what was open, before what was said to those queues meanwhile
        waiting, self._out = self._out, []
        for queue in self.queues.values():
            if queue.started and not queue.stopped:
                self.open(queue)
        self._out.extend(waiting)
        self._flush()

    def childDataReceived(self, fd: int, data: bytes):
        try:
            messages = self._decoder.feed(data)
        except WireError as exc:
            log.error("forwarder: unreadable output ({error}); restarting it", error=str(exc))
            self.transport.signalProcess("KILL")
            return
        for message in messages:
            try:
                getattr(self, "_on_" + message[0])(*message[1:])
            except Exception:  # noqa: BLE001 - one bad report must not stop the engine
                log.failure("forwarder: handling {kind} failed", kind=message[0])

    def processEnded(self, reason):
        self.pid = None
        ended, self._ended = self._ended, None
        requests, self._requests = self._requests, {}
        for d in requests.values():
            d.errback(RuntimeError("the forwarder process stopped"))
        self._out = []
        if self.stopping:
            if ended is not None:
                ended.callback(None)
            return
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        log.error("the forwarder process ended ({how}); starting it again in {delay:g}s; queued deliveries wait in the "
                  "store", how=f"signal {signal}" if signal else f"exit code {code}", delay=self.restart_delay)
        for queue in self.queues.values():
            queue.orphaned("the forwarder process restarted; the delivery stays queued")
            queue._view = None
        self.restarts += 1
        if ended is not None:
            ended.callback(None)
        self.reactor.callLater(self.restart_delay, self._restart)

    def _restart(self):
        if not self.stopping:
            self.start()

    # -- sending ----------------------------------------------------------------------------------------
    def send(self, message: tuple) -> None:
        self._out.append(message)
        if not self._flush_due:
            self._flush_due = True
            self.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        if self.pid is None or self.transport is None:
            return  # kept until the (re)started child is connected
        out, self._out = self._out, []
        if out and not self.stopping:
            write_now(self.transport.pipes.get(0), encode(out))

    def request(self, kind: str, *args) -> defer.Deferred:
        self._next_request += 1
        d = self._requests[self._next_request] = defer.Deferred()
        self.send((kind, self._next_request, *args))
        return d

    def open(self, queue: RemoteQueue) -> None:
        self.queues[queue.queue_id] = queue
        self.send(("open", queue.queue_id, queue.channel, queue.destination, queue.config, queue.paused,
                   queue.poll_interval))

    # -- what the engine asks ---------------------------------------------------------------------------
    def retire(self, queues: list[RemoteQueue], timeout: float) -> defer.Deferred:
        """Stop these queues and wait (bounded) for their deliveries on the wire; their results
        are handed to the writer before this fires."""
        for queue in queues:
            queue.stopped = True
            self.queues.pop(queue.queue_id, None)
        if self.pid is None:
            return defer.succeed(0)
        d = self.request("retire", [q.queue_id for q in queues], timeout)
        return d.addErrback(lambda _: 0)

    def stop(self, timeout: float) -> defer.Deferred:
        """Stop every queue, wait (bounded) for the deliveries on the wire, then end the child;
        fires with how many deliveries were left unanswered."""
        if self.pid is None:
            self.stopping = True
            return defer.succeed(0)
        d = self.request("shutdown", timeout)
        d.addErrback(lambda _: 0)

        def end(unanswered):
            self.stopping = True
            ended = self._ended
            self.transport.closeStdin()  # the child stops when its stdin closes
            timer = self.reactor.callLater(10, lambda: self.pid is not None and self.transport.signalProcess("KILL"))
            done = ended if ended is not None else defer.succeed(None)

            def finished(_):
                if timer.active():
                    timer.cancel()
                return unanswered

            return done.addBoth(finished)

        return d.addCallback(end)

    # -- what the child reports -------------------------------------------------------------------------
    def _on_reply(self, request, value, error=None):
        d = self._requests.pop(request, None)
        if d is not None:
            d.errback(RuntimeError(error)) if error is not None else d.callback(value)

    def _on_update(self, request, updates, lazy):
        """Delivery results, withdrawals, destinations' states: what one turn of the forwarder had,
        in one commit's worth (the engine is the store's one writer)."""
        d = self.writer.update(*updates, lazy=lazy)
        d.addCallbacks(lambda _: self.send(("reply", request, None, None)),
                       lambda f: self.send(("reply", request, None, f.getErrorMessage())))

    def _on_event(self, name, fields, count=1):
        for _ in range(count):
            relay(name, fields)

    def _on_views(self, views):
        for queue_id, view in views.items():
            queue = self.queues.get(queue_id)
            if queue is not None:
                queue._view = view

    def _on_result(self, queue_id, message_id, result):
        queue = self.queues.get(queue_id)
        if queue is not None:
            queue.result(message_id, result)
