"""``hl7relay run --workers N`` (issue #31): the supervisor's states on a task.Clock, the shared
listeners, and N real worker processes on PostgreSQL (a worker killed under load is restarted, its
partitions taken over, nothing lost or reordered; SIGTERM stops them all; the supervisor's kill -9
stops them cleanly)."""

from __future__ import annotations

import signal
import socket

import pytest
from twisted.internet import error, task
from twisted.python.failure import Failure

from hl7relay import workers as workers_module
from hl7relay.workers import Supervisor, WorkerState


class _Process:
    def __init__(self, protocol, argv):
        self.protocol, self.argv, self.signals = protocol, argv, []

    def signalProcess(self, signum):
        self.signals.append(signum)

    # what the reactor would call
    def ready(self):
        self.protocol.childDataReceived(workers_module.READY_FD, b"ready\n")

    def end(self, exit_code=None, signum=None):
        reason = error.ProcessDone(0) if exit_code == 0 else error.ProcessTerminated(exit_code, signum)
        self.protocol.processEnded(Failure(reason))


class _Reactor(task.Clock):
    def __init__(self):
        super().__init__()
        self.spawned: list[_Process] = []

    def spawnProcess(self, protocol, executable, args, env=None, childFDs=None):
        assert childFDs == {0: "w", 1: 1, 2: 2, 3: "r"}  # stdin: the supervisor's life; fd 3: "ready"
        process = _Process(protocol, args)
        self.spawned.append(process)
        return process


def _supervisor(count=2):
    reactor, said = _Reactor(), []
    supervisor = Supervisor(reactor, count, lambda n: ["hl7relay", "run", "--worker", str(n)], "host",
                            lambda text, event, level="info": said.append((event, text)), stop_timeout=10)
    return reactor, supervisor, said


def test_all_ready_fires_once_every_worker_said_ready():
    reactor, supervisor, _ = _supervisor(3)
    ready = []
    supervisor.start().addCallback(ready.append)
    assert [p.argv[-1] for p in reactor.spawned] == ["1", "2", "3"]
    reactor.spawned[0].ready()
    reactor.spawned[2].ready()
    assert not ready
    reactor.spawned[1].ready()
    assert ready == [supervisor] and all(w.state is WorkerState.READY for w in supervisor.workers)


def test_a_worker_that_cannot_start_stops_the_others_and_the_start_fails():
    reactor, supervisor, _ = _supervisor(2)
    failures = []
    supervisor.start().addErrback(failures.append)
    reactor.spawned[1].ready()
    reactor.spawned[0].end(1)  # e.g. a port taken: what it printed says why
    assert failures and "worker 1 could not start (exit 1)" in failures[0].getErrorMessage()
    assert reactor.spawned[1].signals == [signal.SIGTERM]
    reactor.advance(60)
    assert len(reactor.spawned) == 2  # not started again
    reactor.spawned[1].end(0)
    assert not supervisor.clean()


def test_a_dead_worker_is_started_again_later_and_again_sooner_once_it_ran_steadily():
    reactor, supervisor, said = _supervisor(2)
    supervisor.start()
    for process in reactor.spawned:
        process.ready()
    reactor.advance(100)
    reactor.spawned[1].end(None, signal.SIGKILL)
    assert said[-1][0] == "worker_died" and "signal KILL" in said[-1][1] and "again in 1s" in said[-1][1]
    assert supervisor.workers[1].state is WorkerState.WAITING
    reactor.advance(0.9)
    assert len(reactor.spawned) == 2
    reactor.advance(0.1)
    assert len(reactor.spawned) == 3 and reactor.spawned[2].argv[-1] == "2"
    # dying again and again soon after each start: each wait doubles, up to the most
    delays = []
    for _ in range(7):
        reactor.spawned[-1].ready()
        reactor.advance(2)
        reactor.spawned[-1].end(1)
        delays.append(supervisor.workers[1].delay)
        reactor.advance(supervisor.workers[1].delay)
    assert delays == [2, 4, 8, 16, 30, 30, 30]
    reactor.spawned[-1].ready()
    assert said[-1][0] == "worker_restarted"
    reactor.advance(workers_module.STEADY)
    reactor.spawned[-1].end(1)
    assert supervisor.workers[1].delay == workers_module.RESTART_FIRST  # it had run steadily


def test_stop_sends_sigterm_kills_one_past_its_timeout_and_starts_nothing_again():
    reactor, supervisor, _ = _supervisor(3)
    supervisor.start()
    for process in reactor.spawned:
        process.ready()
    reactor.spawned[2].end(None, signal.SIGKILL)  # dead, waiting for its restart
    stopped = []
    supervisor.stop().addCallback(stopped.append)
    assert [p.signals for p in reactor.spawned] == [[signal.SIGTERM], [signal.SIGTERM], []]
    reactor.spawned[0].end(0)
    reactor.advance(10 + workers_module.KILL_GRACE)
    assert reactor.spawned[1].signals == [signal.SIGTERM, signal.SIGKILL]
    assert reactor.spawned[0].signals == [signal.SIGTERM]  # it had ended: not killed
    reactor.spawned[1].end(None, signal.SIGKILL)
    assert stopped and len(reactor.spawned) == 3  # the dead one was not started again
    assert not supervisor.clean()
    assert [w["last_exit"] for w in supervisor.view()] == ["exit 0", "signal KILL", "signal KILL"]


def test_a_clean_stop_is_every_worker_ending_with_exit_0():
    reactor, supervisor, _ = _supervisor(2)
    supervisor.start()
    for process in reactor.spawned:
        process.ready()
    supervisor.stop()
    for process in reactor.spawned:
        process.end(0)
    assert supervisor.clean()


def test_shared_ports_take_connections_in_each_process_and_a_taken_port_says_so():
    from twisted.internet import protocol
    from twisted.internet.testing import MemoryReactor

    from hl7relay import sharedports

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    reactor = MemoryReactor()
    factory = protocol.Factory()
    sharedports.share_ports(True)
    try:
        sharedports.listen(reactor, port, factory, "127.0.0.1")
        sharedports.listen(reactor, port, factory, "127.0.0.1")  # a second worker's, beside it
        assert len(reactor.adoptedPorts) == 2
        plain = socket.socket()
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        with pytest.raises(error.CannotListenError):  # held by something that does not share it
            sharedports.listen(reactor, plain.getsockname()[1], factory, "127.0.0.1")
        plain.close()
    finally:
        sharedports.share_ports(False)
    sharedports.listen(reactor, port, factory, "127.0.0.1")  # not shared: the reactor's own listenTCP
    assert reactor.tcpServers[-1][0] == port


# -- real workers ----------------------------------------------------------------------------------
def _harness():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "chaos"))
    import harness

    return harness


def _free_port() -> int:
    return _harness().free_port()


def _worker_pids(supervisor_pid: int) -> dict[int, int]:
    return _harness().worker_pids(supervisor_pid)


def test_two_workers_share_the_listener_and_one_killed_under_load_is_restarted_with_nothing_lost(tmp_path):
    """`hl7relay run --workers 2` on PostgreSQL: both workers take connections on the one port
    and hold partitions; kill -9 of worker 2 under load: the supervisor starts it again, its
    partitions are taken over meanwhile and shared again after; every ACKed message reaches the
    receiver once (a copy only within the kill's window), per patient in order; SIGTERM of the
    supervisor stops both, exit 0."""
    import os
    import time

    from test_store import POSTGRES_URL, _postgres_store

    h = _harness()
    store = _postgres_store()
    sink = h.Sink(delay=0.002).up()
    port = _free_port()
    engine = h.cluster_node(tmp_path / "host", "host", POSTGRES_URL, sink.port, workers=2, listen_port=port)
    try:
        def owners():
            return {row["name"]: row["owner"] for row in store.leases() if row["left"] > 0}

        h.wait_for(lambda: len(owners()) == 8 and set(owners().values()) == {"host-w1", "host-w2"}, 60,
                   "every partition owned, by both workers")
        load = h.Load(port, connections=8).start()
        h.wait_for(lambda: load.accepted_count() >= 400, 120, "400 messages ACKed")
        # the kernel spreads the 8 connections over the two sockets: each worker received some
        admins = [int(p) for p in __import__("re").findall(r"admin: http://127\.0\.0\.1:(\d+)/", engine.output())]
        received = [_received(a) for a in admins]
        assert len(received) == 2 and all(n > 0 for n in received), received
        victim = _worker_pids(engine.pid)[2]
        kill_at = time.monotonic()
        os.kill(victim, 9)
        h.wait_for(lambda: "worker 2 (host-w2) is running again (restart 1)" in engine.output(), 60,
                   "worker 2 started again")
        h.wait_for(lambda: set(owners().values()) == {"host-w1", "host-w2"}, 60, "the partitions shared again")
        h.wait_for(lambda: load.accepted_count() >= 1200, 120, "1,200 messages ACKed")
        load.finish()
        accepted = load.accepted()
        wanted = {a.control_id for a in accepted}
        h.wait_for(lambda: wanted <= set(sink.ids()), 120, "every ACKed message at the receiver")
        figures = h.delivery_figures(accepted, sink.received, [kill_at], answered_at=sink.answered_at)
        assert figures["lost"] == 0 and figures["inversions"] == 0 and figures["outside_window"] == 0, figures
        assert "signal KILL" in engine.output()
        code, _ = engine.terminate()
        assert code == 0 and "stopped: every worker stopped" in engine.output(), engine.output()[-2000:]
        assert not _worker_pids(engine.pid)
    finally:
        if engine.process.poll() is None:
            engine.terminate()
        sink.down()
        store.close()


def _received(admin_port: int) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('hl7relay_messages_received_total{channel="relay"}'))


def test_workers_stop_on_their_own_when_their_supervisor_is_killed(tmp_path):
    """kill -9 of the supervisor: its workers see their standard input close and stop as on
    SIGTERM (messages in flight finished, leases let go), rather than run on unsupervised."""
    import os

    from test_store import POSTGRES_URL, _postgres_store

    h = _harness()
    store = _postgres_store()
    engine = h.cluster_node(tmp_path / "host", "host", POSTGRES_URL, _free_port(), workers=2,
                            listen_port=_free_port())
    try:
        pids = _worker_pids(engine.pid)
        assert sorted(pids) == [1, 2]
        os.kill(engine.pid, 9)
        engine.process.wait(timeout=30)
        h.wait_for(lambda: not any(h._alive(pid) for pid in pids.values()), 60, "both workers ended")
        text = engine.output()
        assert text.count("stopped: in-flight messages finished, store flushed") == 2, text[-2000:]
        h.wait_for(lambda: [node["state"] for node in store.nodes()[1] if node["node_id"].startswith("host-")]
                   == ["stopped", "stopped"], 30, "both nodes stopped in the registry")
    finally:
        engine.log.close()
        store.close()


def test_workers_need_postgresql_and_a_count_from_1(tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "one"
    _harness().write_channel(folder, "relay", _harness().relay_channel(_free_port()))

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "hl7relay", "run", "--channels", "channels", "--data-dir", "data",
                               "--admin-port", "0", "--console-port", "0", *extra], cwd=folder, capture_output=True,
                              text=True, timeout=60)

    sqlite = run("--workers", "2")
    assert sqlite.returncode == 1 and sqlite.stderr.strip().splitlines() == [
        "--workers 2: the workers share a PostgreSQL store (store: {url: postgresql+psycopg://USER@HOST/DB}); "
        "several processes cannot share a SQLite file"], sqlite.stderr
    for bad in ("0", "two", "65"):
        answer = run("--workers", bad)
        assert answer.returncode == 2 and "Traceback" not in answer.stderr
        said = "'two' is not a whole number" if bad == "two" else "1 to 64 engine processes"
        assert answer.stderr.strip().splitlines()[-1].endswith(f"{said} (see hl7relay run --help)"), answer.stderr
