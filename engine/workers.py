"""``hl7relay run --workers N``: N engine processes on one host, one PostgreSQL store.

Each worker is a whole engine (``hl7relay run --worker K``), a node of the cluster of its own
(node id ``NODE-wK``): it opens the channels' listeners on the shared ports (sharedports.py), takes
its fair share of the destination queues' partitions by lease (leases.py), answers each message
after its commit. The supervisor here holds no message and no lease: it starts the workers, says
when all are ready, restarts one that dies (its partitions are meanwhile taken over by the others,
as a dead host's would be) and, on SIGTERM or Ctrl-C, stops them all, each with its stop timeout.

A worker learns that the supervisor is gone when its standard input closes (a ``kill -9`` of the
supervisor stops the workers cleanly rather than leaving them orphaned), and tells the supervisor
that it is ready on descriptor 3.
"""

from __future__ import annotations

import enum
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import defer, error, protocol

__all__ = ["Supervisor", "WorkerState", "READY_FD", "worker_node_id", "watch_parent", "say_ready"]

READY_FD = 3
RESTART_FIRST = 1.0  # seconds before a dead worker is started again
RESTART_MAX = 30.0  # doubling while it keeps dying soon after its start
STEADY = 30.0  # a worker that ran this long before dying starts again after RESTART_FIRST
KILL_GRACE = 15.0  # beyond a worker's stop timeout before it is killed


def worker_node_id(node_id: str, number: int) -> str:
    return f"{node_id}-w{number}"


class WorkerState(enum.Enum):
    STARTING = "starting"  # spawned, not yet ready
    READY = "ready"
    WAITING = "waiting"  # died; started again after a delay
    STOPPING = "stopping"  # asked to stop
    EXITED = "exited"


@dataclass(slots=True)
class Worker:
    number: int
    state: WorkerState = WorkerState.STARTING
    process: Any = None  # the IProcessTransport while it runs
    started: float = 0.0
    was_ready: bool = False
    restarts: int = 0
    delay: float = RESTART_FIRST
    exit: str = ""  # how it last ended ("exit 1", "signal KILL")
    ended: defer.Deferred | None = field(default=None)
    timer: Any = None  # the delayed restart


class _WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, supervisor: "Supervisor", worker: Worker):
        self.supervisor, self.worker = supervisor, worker
        self.seen = b""

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == READY_FD:
            self.seen = (self.seen + data)[-64:]
            if b"ready\n" in self.seen:
                self.seen = b""
                self.supervisor._ready(self.worker)

    def processEnded(self, reason) -> None:
        value = reason.value
        if isinstance(value, error.ProcessTerminated) and value.signal is not None:
            how = f"signal {signal.Signals(value.signal).name.removeprefix('SIG')}"
        else:
            how = f"exit {getattr(value, 'exitCode', 0) or 0}"
        self.supervisor._ended(self.worker, how)


class Supervisor:
    """Starts ``count`` workers with ``argv(number)`` and keeps them running.

    ``announce(text, event, level)`` says what happens (logs.announce); ``on_failed(message)`` is
    called when a worker cannot start at all (the first start: a port taken, the store down), after
    which the others are stopped and the supervisor's exit is not clean."""

    def __init__(self, reactor, count: int, argv: Callable[[int], list[str]], node_id: str,
                 announce: Callable[..., None], stop_timeout: float, env: dict | None = None):
        self.reactor, self.count, self.argv, self.node_id = reactor, count, argv, node_id
        self.announce, self.stop_timeout = announce, stop_timeout
        self.env = dict(os.environ if env is None else env)
        self.workers = [Worker(number) for number in range(1, count + 1)]
        self.stopping = False
        self.failed: str | None = None
        self.all_ready: defer.Deferred = defer.Deferred()

    # -- running ----------------------------------------------------------------------------------
    def start(self) -> defer.Deferred:
        """Start every worker; fires once each said ready (errback if one could not start)."""
        for worker in self.workers:
            self._spawn(worker)
        return self.all_ready

    def _spawn(self, worker: Worker) -> None:
        argv = self.argv(worker.number)
        worker.state, worker.started, worker.ended = WorkerState.STARTING, self.reactor.seconds(), defer.Deferred()
        worker.process = self.reactor.spawnProcess(
            _WorkerProtocol(self, worker), argv[0], argv, env=self.env,
            childFDs={0: "w", 1: 1, 2: 2, READY_FD: "r"})

    def _ready(self, worker: Worker) -> None:
        if worker.state is not WorkerState.STARTING:
            return
        worker.state = WorkerState.READY
        if worker.was_ready:
            self.announce(f"worker {worker.number} ({worker_node_id(self.node_id, worker.number)}) is running "
                          f"again (restart {worker.restarts})", "worker_restarted")
        worker.was_ready = True
        if not self.all_ready.called and all(w.was_ready for w in self.workers):
            self.all_ready.callback(self)

    def _ended(self, worker: Worker, how: str) -> None:
        worker.process, worker.exit = None, how
        ended, worker.ended = worker.ended, None
        if self.stopping or worker.state is WorkerState.STOPPING:
            worker.state = WorkerState.EXITED
        elif not worker.was_ready:
            # the first start failed: the configuration or the host is wrong, not the worker; what it
            # printed says why. Restarting it would only repeat that.
            worker.state = WorkerState.EXITED
            if self.failed is None:
                self.failed = f"worker {worker.number} could not start ({how})"
                self.stop()
                if not self.all_ready.called:
                    self.all_ready.errback(RuntimeError(self.failed))
        else:
            lived = self.reactor.seconds() - worker.started
            worker.delay = RESTART_FIRST if lived >= STEADY or worker.restarts == 0 else \
                min(RESTART_MAX, worker.delay * 2)
            worker.restarts += 1
            worker.state = WorkerState.WAITING
            self.announce(f"worker {worker.number} ({worker_node_id(self.node_id, worker.number)}) ended ({how}) "
                          f"after {lived:.0f}s; starting it again in {worker.delay:g}s (its partitions move to the "
                          "other workers meanwhile)", "worker_died", "warn")
            worker.timer = self.reactor.callLater(worker.delay, self._restart, worker)
        if ended is not None:
            ended.callback(how)

    def _restart(self, worker: Worker) -> None:
        worker.timer = None
        if not self.stopping:
            self._spawn(worker)

    # -- stopping ---------------------------------------------------------------------------------
    def stop(self) -> defer.Deferred:
        """SIGTERM to every worker (each finishes its messages in flight, up to its stop timeout);
        fires when all have ended. One that does not end in time is killed."""
        self.stopping = True
        waits = []
        for worker in self.workers:
            if worker.timer is not None and worker.timer.active():
                worker.timer.cancel()
                worker.timer = None
            if worker.process is None:
                worker.state = WorkerState.EXITED
                continue
            worker.state = WorkerState.STOPPING
            ended: defer.Deferred = worker.ended if worker.ended is not None else defer.succeed(None)
            waits.append(ended)
            self.send_signal(worker, signal.SIGTERM)
            killer = self.reactor.callLater(self.stop_timeout + KILL_GRACE, self.send_signal, worker, signal.SIGKILL)
            ended.addBoth(_cancelling, killer)
        return defer.DeferredList(waits)

    @staticmethod
    def send_signal(worker: Worker, signum: int) -> None:
        try:
            if worker.process is not None:
                worker.process.signalProcess(signum)
        except (error.ProcessExitedAlready, OSError):
            pass

    def clean(self) -> bool:
        """Whether every worker ended on its own stop (exit 0) and none failed to start."""
        return self.failed is None and all(w.exit == "exit 0" for w in self.workers)

    def view(self) -> list[dict]:
        return [{"worker": w.number, "node": worker_node_id(self.node_id, w.number), "state": w.state.value,
                 "restarts": w.restarts, "last_exit": w.exit or None} for w in self.workers]


def _cancelling(result, timer):
    if timer.active():
        timer.cancel()
    return result


# -- the worker's side ----------------------------------------------------------------------------
class _ParentWatch:
    """Reads the worker's standard input, which only the supervisor holds open: its end is the
    supervisor's end (killed or gone), and the worker then stops as on SIGTERM."""

    def __init__(self, on_gone: Callable[[], None]):
        self.on_gone = on_gone

    def fileno(self) -> int:
        return 0

    def doRead(self):
        from twisted.internet import fdesc

        return fdesc.readFromFD(0, lambda data: None)

    def connectionLost(self, reason) -> None:
        self.on_gone()

    def logPrefix(self) -> str:
        return "supervisor"


def watch_parent(reactor, on_gone: Callable[[], None]) -> None:
    reactor.addReader(_ParentWatch(on_gone))


def say_ready() -> None:
    try:
        os.write(READY_FD, b"ready\n")
    except OSError:  # started by hand with --worker: nobody listens
        print("warning: --worker without a supervisor (hl7relay run --workers N starts the workers)",
              file=sys.stderr)
