"""Nodes and leases on one store (issue #31, first step): epochs, expiry by the database's clock,
fencing of a late writer, and the nodes' registry; on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from hl7relay.store.database import Store

T0 = 1_800_000_000.0




def test_a_lease_is_one_owners_until_it_expires_and_each_new_owner_has_a_new_epoch(store):
    assert store.acquire_lease("queue:adt/lab/0", "node-a", 10, now=T0) == 1
    assert store.acquire_lease("queue:adt/lab/0", "node-b", 10, now=T0 + 5) is None  # a's, live
    assert store.acquire_lease("queue:adt/lab/0", "node-a", 10, now=T0 + 5) == 1  # a renews: the same epoch
    assert store.renew_lease("queue:adt/lab/0", "node-a", 1, 10, now=T0 + 12)  # live until T0+15
    assert store.acquire_lease("queue:adt/lab/0", "node-b", 10, now=T0 + 21.9) is None
    assert store.acquire_lease("queue:adt/lab/0", "node-b", 10, now=T0 + 22.1) == 2  # expired: b's, epoch 2
    assert not store.renew_lease("queue:adt/lab/0", "node-a", 1, 10, now=T0 + 23)  # a woke late: not a's
    assert store.acquire_lease("queue:adt/lab/0", "node-a", 10, now=T0 + 23) is None
    [row] = store.leases(now=T0 + 23)
    assert (row["owner"], row["epoch"], round(row["left"], 1)) == ("node-b", 2, 9.1)
    assert store.release_lease("queue:adt/lab/0", "node-b", 2, now=T0 + 24)  # a clean stop lets go at once
    assert store.acquire_lease("queue:adt/lab/0", "node-a", 10, now=T0 + 24) == 3
    assert store.acquire_lease("singleton:pruner", "node-a", 10, now=T0) == 1  # each name its own


def test_a_writer_whose_lease_moved_on_is_fenced_and_writes_nothing(store):
    from hl7relay.store.schema import audit_log

    def write(connection):
        connection.execute(audit_log.insert().values(at=T0, actor="node", role="", source="", action="fenced.test",
                                                     target="", reason="", result="ok", detail=""))

    assert store.acquire_lease("queue:adt/lab/1", "node-a", 10, now=T0) == 1
    assert store.write_under_lease("queue:adt/lab/1", "node-a", 1, write, now=T0 + 1)
    # node-a is paused past its lease (SIGSTOP); node-b takes the partition
    assert store.acquire_lease("queue:adt/lab/1", "node-b", 10, now=T0 + 30) == 2
    assert not store.write_under_lease("queue:adt/lab/1", "node-a", 1, write, now=T0 + 31)  # late: refused
    assert not store.write_under_lease("queue:adt/lab/1", "node-a", 1, write, now=T0 + 5)  # the epoch, not only time
    assert store.write_under_lease("queue:adt/lab/1", "node-b", 2, write, now=T0 + 31)
    assert not store.write_under_lease("queue:adt/lab/1", "node-b", 2, write, now=T0 + 40.5)  # its own expired
    with store.engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(audit_log)
                                  .where(audit_log.c.action == "fenced.test")).scalar() == 2


def test_nodes_register_beat_say_their_snapshot_and_stop(store):
    assert store.register_node("node-a", "host1", 100, "0.1.0", 7, "a" * 64, now=T0) == T0
    store.register_node("node-b", "host2", 200, "0.1.0", 7, "a" * 64, now=T0)
    store.heartbeat("node-a", 8, "b" * 64, now=T0 + 3)  # reloaded: drift until b reloads too
    store.heartbeat("node-b", now=T0 + 2)
    now, rows = store.nodes(now=T0 + 4)
    assert now == T0 + 4
    assert [(r["node_id"], r["state"], r["snapshot_id"], r["heartbeat_age"]) for r in rows] == [
        ("node-a", "running", 8, 1.0), ("node-b", "running", 7, 2.0)]
    store.node_stopped("node-b", now=T0 + 5)
    store.register_node("node-a", "host1", 101, "0.1.1", 8, "b" * 64, now=T0 + 6)  # a restart: the same row
    _, rows = store.nodes(now=T0 + 6)
    assert [(r["node_id"], r["state"], r["pid"], r["started_at"]) for r in rows] == [
        ("node-a", "running", 101, T0 + 6), ("node-b", "stopped", 200, T0)]


def test_the_database_clock_decides_and_two_nodes_racing_for_a_lease_get_one_owner(store):
    """No ``now`` given: the database's clock. Eight nodes take one fresh lease at once: one owner."""
    results = {}
    barrier = threading.Barrier(8)

    def take(node):
        barrier.wait()
        results[node] = store.acquire_lease("queue:race/x/0", node, 30)

    threads = [threading.Thread(target=take, args=(f"node-{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    winners = [node for node, epoch in results.items() if epoch is not None]
    assert len(results) == 8 and len(winners) == 1 and results[winners[0]] == 1
    [row] = store.leases()
    assert row["owner"] == winners[0] and 29 < row["left"] <= 30



def test_an_engine_on_postgresql_registers_its_node_beats_and_says_drift(tmp_path):
    """A real `hl7relay run` on PostgreSQL: its node row (host, pid, the snapshot it runs), the
    status and the API list it; a second node running another snapshot is drift; a clean stop marks
    it stopped."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from test_store import POSTGRES_URL, _postgres_store

    store = _postgres_store()  # an empty schema (skips without a server, fails under CI)
    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "adt.yaml").write_text("name: adt\nsource: {type: mllp, port: 0}\n")
    log = tmp_path / "engine.log"
    engine = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--store", POSTGRES_URL, "--admin-port", "auto",
                               "--console-port", "0"], cwd=tmp_path, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + 60
        while "ready; Ctrl-C" not in log.read_text():
            assert time.monotonic() < deadline and engine.poll() is None, log.read_text()
            time.sleep(0.05)
        while not store.nodes()[1]:  # registered once the reactor runs
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        [node] = store.nodes()[1]
        assert (node["node_id"], node["pid"], node["state"], node["snapshot_id"]) == (
            socket.gethostname(), engine.pid, "running", 1)
        assert node["snapshot_sha256"] == store.snapshot(1)["source_sha256"]  # the channel files' own hash
        store.register_node("other-host", "other-host", 4242, "0.0.9", None, "f" * 64)  # runs something else
        status = subprocess.run([sys.executable, "-m", "hl7relay", "status", "--store", POSTGRES_URL], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert f"node {socket.gethostname()} (" in status.stdout and f"pid {engine.pid}" in status.stdout
        assert "configuration DRIFT: the nodes run different snapshots" in status.stdout, status.stdout
        base = (tmp_path / "data" / "api-endpoint").read_text().strip()
        request = urllib.request.Request(base + "/api/v1/nodes", headers={
            "Authorization": "Bearer " + (tmp_path / "data" / "api-token").read_text().strip()})
        with urllib.request.urlopen(request, timeout=30) as answer:
            nodes = json.loads(answer.read())
        assert sorted(nodes["drift"]) == sorted([socket.gethostname(), "other-host"])
        assert len(nodes["nodes"]) == 2 and all(n["alive"] for n in nodes["nodes"])
    finally:
        engine.send_signal(signal.SIGTERM)
        assert engine.wait(timeout=60) == 0
    states = {n["node_id"]: n["state"] for n in store.nodes()[1]}
    assert states == {socket.gethostname(): "stopped", "other-host": "running"}
    store.close()


def test_a_commit_leaves_out_the_delivery_results_written_under_a_lease_that_moved_on(store):
    """A group commit with new messages, results under a lease still held and results under one
    another node took since: the last are left out (counted), the rest commits."""
    from hl7relay.store.database import DeliveryRecord, DeliveryUpdate, MessageRecord

    raw = b"MSH|^~\\&|A|B|||1||ADT^A04|{}|P|2.5\r"
    ids = store.commit([MessageRecord("adt", raw.replace(b"{}", str(i).encode()), "PROCESSED", 1.0, control_id=str(i),
                                      deliveries=[DeliveryRecord("lab", "QUEUED")]) for i in range(3)], [])
    kept = store.acquire_lease("queue:adt/lab/0", "node-a", 60)
    lost = store.acquire_lease("queue:adt/lab/1", "node-a", 60)
    assert store.release_lease("queue:adt/lab/1", "node-a", lost)
    assert store.acquire_lease("queue:adt/lab/1", "node-b", 60) == lost + 1  # node-b took partition 1
    sent = {"status": "SENT", "attempts": 1, "updated_at": 2.0}
    new = store.commit([MessageRecord("adt", raw.replace(b"{}", b"9"), "PROCESSED", 2.0, control_id="9")], [
        DeliveryUpdate(ids[0], "lab", sent, ("queue:adt/lab/0", "node-a", kept)),
        DeliveryUpdate(ids[1], "lab", sent, ("queue:adt/lab/1", "node-a", lost)),  # node-a's, late
        DeliveryUpdate(ids[2], "lab", sent)])  # not under a lease (one engine, or not partitioned)
    assert len(new) == 1 and store.last_fenced == [(ids[1], "lab")] and store.fenced_updates == 1
    statuses = [store.get_message(i)["deliveries"][0]["status"] for i in ids]
    assert statuses == ["SENT", "QUEUED", "SENT"]  # the fenced one stays for partition 1's new owner


def _cluster_node(folder, name, url, sink_port):
    """A node (lease_ttl 4 s, lease_renew 1 s) in ``folder/name``: the chaos suite's."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "chaos"))
    from harness import cluster_node

    return cluster_node(folder / name, name, url, sink_port)


def test_three_nodes_share_the_partitions_and_a_killed_ones_are_taken_over_with_nothing_lost(tmp_path):
    """Three `hl7relay run` nodes on one PostgreSQL store, a sender on each, one MLLP receiver: every
    partition has one owner; kill -9 of a node under load: its partitions are taken over within
    lease_ttl + lease_renew (plus a poll), every ACKed message reaches the receiver, per patient in
    order, a copy sent twice only within the window of the kill. Three rounds, a node killed and
    started again in each."""
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "chaos"))
    from harness import Load, Sink, delivery_figures, wait_for
    from test_store import POSTGRES_URL, _postgres_store

    store = _postgres_store()
    sink = Sink(delay=0.002).up()
    nodes = {name: _cluster_node(tmp_path, name, POSTGRES_URL, sink.port) for name in ("node-a", "node-b", "node-c")}
    loads, kills, takeovers = [], [], []
    try:
        def owners():
            return {row["name"]: row["owner"] for row in store.leases() if row["left"] > 0}

        wait_for(lambda: len(owners()) == 8 and len(set(owners().values())) == 3, 60, "every partition owned, by all three")
        for number in range(3):
            running = {name: engine for name, engine in nodes.items() if engine is not None}
            round_loads = [Load(engine.ports["relay"], connections=2, prefix=f"{name[-1]}{number}-",
                                key_prefix=f"{name[-1]}K").start() for name, engine in running.items()]
            loads += round_loads
            wait_for(lambda loads=round_loads: sum(load.accepted_count() for load in loads) >= 300, 120,
                     "300 messages ACKed")
            victim = f"node-{'abc'[number]}"
            held = {lease for lease, owner in owners().items() if owner == victim}
            kills.append(time.monotonic())
            nodes[victim].kill9()
            nodes[victim] = None
            started = time.monotonic()
            wait_for(lambda held=held, victim=victim: held and all(owners().get(lease) not in (None, victim)
                                                                   for lease in held), 30, f"{victim}'s partitions taken over")
            takeovers.append(round(time.monotonic() - started, 1))
            for load in round_loads:
                load.finish()
            nodes[victim] = _cluster_node(tmp_path, victim, POSTGRES_URL, sink.port)  # it comes back
        accepted = [a for load in loads for a in load.accepted()]
        wanted = {a.control_id for a in accepted}
        wait_for(lambda: wanted <= set(sink.ids()), 120, "every ACKed message at the receiver")
        figures = delivery_figures(accepted, sink.received, kills, answered_at=sink.answered_at)
        assert figures["lost"] == 0 and figures["inversions"] == 0 and figures["outside_window"] == 0, figures
        assert max(takeovers) <= 4 + 1 + 1.5, takeovers  # lease_ttl + lease_renew, and the look's own second
    finally:
        for engine in nodes.values():
            if engine is not None:
                engine.terminate()
        sink.down()
        store.close()


def test_a_node_paused_past_its_lease_has_its_late_writes_fenced_and_nothing_reordered(tmp_path):
    """SIGSTOP of a node for twice its lease while its deliveries are on the wire, then SIGCONT:
    the others took its partitions; its late results are left out of the store (counted, in its
    metrics), nothing is lost and no patient's messages are reordered at the receiver."""
    import signal
    import sys
    import time
    import urllib.request
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "chaos"))
    from harness import Load, Sink, delivery_figures, wait_for
    from test_store import POSTGRES_URL, _postgres_store

    store = _postgres_store()
    # slow: the paused node's partitions have deliveries on the wire when it stops (2 per partition), and
    # their ACKs wait in its socket buffer until it wakes, before its lease deadline (I/O comes before timers)
    sink = Sink(delay=0.3).up()
    nodes = {name: _cluster_node(tmp_path, name, POSTGRES_URL, sink.port) for name in ("node-a", "node-b")}
    try:
        def owners():
            return {row["name"]: row["owner"] for row in store.leases() if row["left"] > 0}

        wait_for(lambda: len(owners()) == 8 and len(set(owners().values())) == 2, 60, "every partition owned, by both")
        # a steady trickle (the receiver takes 0.3 s a message, 16 connections): ~40 messages a second
        loads = [Load(engine.ports["relay"], connections=2, prefix=f"{name[-1]}-", key_prefix=f"{name[-1]}K",
                      interval=0.1).start() for name, engine in nodes.items()]
        wait_for(lambda: sum(load.accepted_count() for load in loads) >= 100, 60, "100 messages ACKed")
        wait_for(lambda: len(sink.received) >= 20, 60, "deliveries flowing")
        paused = nodes["node-a"]
        held = {lease for lease, owner in owners().items() if owner == "node-a"}
        paused.process.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        wait_for(lambda: all(owners().get(lease) == "node-b" for lease in held), 30, "node-a's partitions taken over")
        time.sleep(max(0.0, 2 * 4 - (time.monotonic() - stopped_at)))  # paused for twice lease_ttl
        paused.process.send_signal(signal.SIGCONT)
        resumed_at = time.monotonic()
        for load in loads:
            load.finish()
        accepted = [a for load in loads for a in load.accepted()]
        wanted = {a.control_id for a in accepted}
        wait_for(lambda: wanted <= set(sink.ids()), 120, "every ACKed message at the receiver")
        with urllib.request.urlopen(paused.admin + "/metrics", timeout=30) as answer:
            metrics = answer.read().decode()
        fenced = float(next(line.split()[-1] for line in metrics.splitlines()
                            if line.startswith("hl7relay_fenced_writes_total")))
        assert fenced >= 1, "the paused node's late results were not fenced"
        assert 'hl7relay_lease_changes_total{change="lost"}' in metrics
        figures = delivery_figures(accepted, sink.received, [stopped_at, resumed_at], window=1.0,
                                   answered_at=sink.answered_at)
        assert figures["lost"] == 0 and figures["inversions"] == 0, figures
    finally:
        for engine in nodes.values():
            if engine.process.poll() is None:
                engine.process.send_signal(signal.SIGCONT)
                engine.terminate()
        sink.down()
        store.close()


def test_a_cluster_needs_postgresql_inline_forwarding_and_on_store_answers(tmp_path):
    import subprocess
    import sys

    from test_store import POSTGRES_URL

    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "adt.yaml").write_text("name: adt\nsource: {type: mllp, port: 0}\n")

    def run(config: str, *extra):
        (tmp_path / "hl7relay.yaml").write_text(config)
        return subprocess.run([sys.executable, "-m", "hl7relay", "run", "--config", "hl7relay.yaml", "--admin-port", "0",
                               "--console-port", "0", *extra], cwd=tmp_path, capture_output=True, text=True, timeout=60)

    sqlite = run("channels: [channels]\ncluster: {node_id: a}\n")
    assert sqlite.returncode == 1 and "cluster: needs a PostgreSQL store" in sqlite.stderr
    process = run(f"store: {{url: '{POSTGRES_URL}'}}\nchannels: [channels]\nforwarding: process\ncluster: {{node_id: a}}\n")
    assert process.returncode == 1 and "forwarding: process is not supported in a cluster" in process.stderr
    renew = run(f"store: {{url: '{POSTGRES_URL}'}}\nchannels: [channels]\ncluster: {{lease_ttl: 4, lease_renew: 3}}\n")
    assert renew.returncode == 1 and "hl7relay.yaml:3:" in renew.stderr and "at most half of lease_ttl" in renew.stderr
    typo = run(f"store: {{url: '{POSTGRES_URL}'}}\nchannels: [channels]\ncluster: {{partitons: 4}}\n")
    assert typo.returncode == 1 and "hl7relay.yaml:3:11: unknown key 'partitons'" in typo.stderr and "(did you mean 'partitions')" in typo.stderr
    (tmp_path / "channels" / "adt.yaml").write_text("name: adt\nsource: {type: mllp, port: 0}\n"
                                                    "response: {when: after_delivery}\n"
                                                    "destinations: [{name: lab, type: file, directory: out}]\n")
    waiting = run(f"store: {{url: '{POSTGRES_URL}'}}\nchannels: [channels]\ncluster: {{node_id: a}}\n")
    assert waiting.returncode == 1 and "channel adt answers after_delivery" in waiting.stderr


def test_the_store_lock_lets_nodes_share_and_refuses_an_engine_outside_the_cluster_and_a_second_same_node():
    from test_store import POSTGRES_URL, _postgres_store

    from hl7relay.store.lock import StoreLock, StoreLocked

    _postgres_store().close()
    a, b, again, single = (StoreLock(POSTGRES_URL, "node-a"), StoreLock(POSTGRES_URL, "node-b"),
                           StoreLock(POSTGRES_URL, "node-a"), StoreLock(POSTGRES_URL))
    a.acquire()
    b.acquire()  # another node: shares the store
    try:
        with pytest.raises(StoreLocked):
            again.acquire(0.2)  # the same node id twice
        with pytest.raises(StoreLocked):
            single.acquire(0.2)  # an engine outside the cluster would deliver every partition
    finally:
        a.release()
        b.release()
    single.acquire()  # alone again
    with pytest.raises(StoreLocked, match="not in the cluster"):
        StoreLock(POSTGRES_URL, "node-c").acquire(0.2)
    single.release()


def test_a_file_source_is_read_by_one_node_and_by_another_when_that_one_dies(tmp_path):
    """In a cluster a folder is read by the node holding the channel's source lease: each file's
    messages are stored once; kill -9 of that node and the other reads the files that come next."""
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "chaos"))
    from harness import wait_for, write_channel
    from test_store import POSTGRES_URL, _postgres_store

    store = _postgres_store()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    nodes = {}
    for name in ("node-a", "node-b"):
        folder = tmp_path / name
        write_channel(folder, "batch", f"name: batch\nsource: {{type: file, directory: '{inbox}', poll_interval: 0.2, "
                                       "settle: 0.2}\n")
        nodes[name] = _cluster_node(tmp_path, name, POSTGRES_URL, 9)  # the relay channel beside it sends nothing
    try:
        def reader():
            return {row["name"]: row["owner"] for row in store.leases() if row["left"] > 0}.get("source:batch")

        wait_for(reader, 30, "the source's lease taken")

        def drop(number):
            text = "".join(f"MSH|^~\\&|PMS|C|LAB|L|20240105||ADT^A04^ADT_A01|F{number}-{i}|P|2.5.1\r"
                           f"PID|1||{i}^^^H^MR||DOE^JANE\r" for i in range(5))
            (inbox / f".f{number}.tmp").write_text(text)
            (inbox / f".f{number}.tmp").rename(inbox / f"f{number}.hl7")

        def stored():
            with store.engine.connect() as connection:
                return sorted(row[0] for row in connection.exec_driver_sql("SELECT control_id FROM messages"))

        for number in range(3):
            drop(number)
        wait_for(lambda: len(stored()) == 15, 60, "three files' messages stored")
        first = reader()
        nodes[first].kill9()
        other = "node-b" if first == "node-a" else "node-a"
        wait_for(lambda: reader() == other, 30, "the other node reading the folder")
        for number in range(3, 5):
            drop(number)
        wait_for(lambda: len(stored()) == 25, 60, "the next files' messages stored")
        time.sleep(1)  # one more look: nothing read twice
        assert stored() == sorted(f"F{n}-{i}" for n in range(5) for i in range(5))
    finally:
        for engine in nodes.values():
            if engine.process.poll() is None:
                engine.terminate()
        store.close()


def test_a_store_url_with_every_database_host_connects_to_the_one_that_answers():
    """The README's multi-host URL: the first host refuses (a failed primary), the next answers."""
    import socket

    from test_store import POSTGRES_URL, _postgres_store

    _postgres_store().close()
    url = sa.engine.make_url(POSTGRES_URL)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    hosts = f"host=127.0.0.1:{dead_port}&host={url.host}:{url.port or 5432}&target_session_attrs=read-write"
    store = Store(f"postgresql+psycopg://{url.username}@/{url.database}?{hosts}")
    try:
        assert store.migrate() >= 20 and store.acquire_lease("queue:x/y/0", "node-a", 5) == 1
    finally:
        store.close()


def test_a_rolling_reload_shows_drift_until_every_node_runs_the_same_files(tmp_path):
    """Two nodes (settings files of their own: node ids differ); a change reloaded on one is drift
    in status until the other runs it too."""
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "chaos"))
    from harness import wait_for
    from test_store import POSTGRES_URL, _postgres_store

    store = _postgres_store()
    sink_port = 9  # nothing is sent here: only the configuration matters
    nodes = {name: _cluster_node(tmp_path, name, POSTGRES_URL, sink_port) for name in ("node-a", "node-b")}

    def status():
        return subprocess.run([sys.executable, "-m", "hl7relay", "status", "--store", POSTGRES_URL], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60).stdout

    def running():
        return {row["node_id"]: row["snapshot_sha256"] for row in store.nodes()[1] if row["state"] == "running"}

    try:
        wait_for(lambda: len(running()) == 2, 30, "both nodes registered")
        assert len(set(running().values())) == 1 and "DRIFT" not in status()
        for number, name in enumerate(("node-a", "node-b")):
            channel = tmp_path / name / "channels" / "relay.yaml"
            channel.write_text(channel.read_text().replace("retry_max: 1", "retry_max: 2"))
            nodes[name].reload()
            if number == 0:
                wait_for(lambda: len(set(running().values())) == 2, 30, "node-a's new snapshot in its heartbeat")
                assert "configuration DRIFT: the nodes run different snapshots" in status()
        wait_for(lambda: len(set(running().values())) == 1, 30, "both nodes on the new files")
        assert "DRIFT" not in status()
        channel = tmp_path / "node-a" / "channels" / "relay.yaml"
        channel.write_text(channel.read_text() + "response: {when: after_delivery}\n")
        nodes["node-a"].reload()  # refused: nothing changes
        wait_for(lambda: "reload refused" in nodes["node-a"].output(), 30, "the reload refused")
        assert "answers after_delivery, which a cluster does not do yet" in nodes["node-a"].output()
    finally:
        for engine in nodes.values():
            engine.terminate()
        store.close()


def test_reload_cluster_reaches_every_node_through_the_store_and_says_what_each_did(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "chaos"))
    from harness import wait_for
    from test_store import POSTGRES_URL, _postgres_store

    store = _postgres_store()
    nodes = {name: _cluster_node(tmp_path, name, POSTGRES_URL, 9) for name in ("node-a", "node-b")}

    def reload_cluster(reason):
        return subprocess.run([sys.executable, "-m", "hl7relay", "reload", "--cluster", "--store", POSTGRES_URL,
                               "--reason", reason, "--wait", "30"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=90)

    try:
        wait_for(lambda: len([n for n in store.nodes()[1] if n["state"] == "running"]) == 2, 30, "both nodes registered")
        for name in nodes:
            channel = tmp_path / name / "channels" / "relay.yaml"
            channel.write_text(channel.read_text().replace("retry_max: 1", "retry_max: 3"))
        done = reload_cluster("CHG-7 slower retries")
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.splitlines() == ["node-a: reloaded: changed relay", "node-b: reloaded: changed relay"]
        wait_for(lambda: len({n["snapshot_sha256"] for n in store.nodes()[1] if n["state"] == "running"}) == 1, 30,
                 "one snapshot on both")
        broken = tmp_path / "node-b" / "channels" / "relay.yaml"
        broken.write_text(broken.read_text().replace("retry_max: 3", "retry_max: 3, retyr: 1"))
        refused = reload_cluster("CHG-8")
        assert refused.returncode == 1
        lines = refused.stdout.splitlines()
        assert lines[0] == "node-a: reloaded: unchanged relay"
        assert lines[1].startswith("node-b: refused: channels/relay.yaml:") and "unknown key 'retyr'" in lines[1]
        audit = store.audit_entries(action="reload", limit=50)
        assert {e["actor"] for e in audit} >= {"cluster:os:" + __import__("getpass").getuser()}
    finally:
        for engine in nodes.values():
            engine.terminate()
        store.close()


def test_reload_cluster_is_heard_at_once_through_listen_notify_not_at_the_next_heartbeat(tmp_path):
    """Nodes that beat every 20 s (lease_renew) still answer `reload --cluster` within seconds:
    each hears the command's NOTIFY on a connection of its own. When the database drops those
    connections, the next heartbeat carries the command out and listens again."""
    import subprocess
    import sys
    from pathlib import Path

    import sqlalchemy as sa

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "chaos"))
    from harness import cluster_node, wait_for
    from test_store import POSTGRES_URL, _postgres_store

    store = _postgres_store()
    nodes = {name: cluster_node(tmp_path / name, name, POSTGRES_URL, 9, ttl=40, renew=20) for name in ("node-a", "node-b")}

    def reload_cluster(wait):
        return subprocess.run([sys.executable, "-m", "hl7relay", "reload", "--cluster", "--store", POSTGRES_URL,
                               "--reason", "CHG-9", "--wait", str(wait)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=90)

    def listeners():
        with store.engine.connect() as connection:
            return connection.execute(sa.text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                              "AND query = 'LISTEN hl7relay_commands'")).scalars().all()

    try:
        wait_for(lambda: len([n for n in store.nodes()[1] if n["state"] == "running"]) == 2, 30, "both nodes registered")
        wait_for(lambda: len(listeners()) == 2, 30, "both nodes listening")
        done = reload_cluster(8)  # a heartbeat is 20 s away: only the notification answers within 8
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.splitlines() == ["node-a: reloaded: unchanged relay", "node-b: reloaded: unchanged relay"]
        with store.engine.begin() as connection:
            for pid in listeners():
                connection.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        done = reload_cluster(45)
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for(lambda: len(listeners()) == 2, 30, "both nodes listening again")
    finally:
        for engine in nodes.values():
            engine.terminate()
        store.close()


def test_nodes_starting_together_on_a_new_database_migrate_one_at_a_time():
    from test_store import POSTGRES_URL, _postgres_store

    from hl7relay.store.schema import MIGRATIONS

    _postgres_store().close()  # an empty schema
    stores = [Store(POSTGRES_URL) for _ in range(4)]
    versions: list = []
    barrier = threading.Barrier(4)

    def migrate(store):
        barrier.wait()
        versions.append(store.migrate())

    threads = [threading.Thread(target=migrate, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for store in stores:
        store.close()
    assert versions == [MIGRATIONS[-1][0]] * 4


def test_a_message_sent_again_to_another_node_is_a_duplicate_there_and_delivered_once(tmp_path):
    """duplicates: holds across nodes (the original is looked for in the shared store): a PMS
    that did not get its ACK from node-a sends the message again to node-b (its failover host);
    node-b stores it as DUPLICATE, answers the original's code, and the receiver gets it once."""
    import socket
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "chaos"))
    from harness import ADT, Engine, Sink, first_frame, relay_channel, wait_for, write_channel
    from test_store import POSTGRES_URL, _postgres_store

    from hl7relay.mllp.framing import frame

    store = _postgres_store()
    sink = Sink(delay=0.0).up()
    nodes = {}
    for name in ("node-a", "node-b"):
        folder = tmp_path / name
        write_channel(folder, "relay", relay_channel(sink.port, "per_key", parallel=2,
                                                     extra="duplicates: {key: [MSH-3, MSH-4, MSH-10], window: 3600}\n"))
        (folder / "hl7relay.yaml").write_text(
            f'store: {{url: "{POSTGRES_URL}"}}\nchannels: [channels]\n'
            f"cluster: {{node_id: {name}, partitions: 4, lease_ttl: 4, lease_renew: 1}}\n")
        nodes[name] = Engine(folder, "--config", "hl7relay.yaml")

    def send(name, text):
        with socket.create_connection(("127.0.0.1", nodes[name].ports["relay"]), timeout=30) as connection:
            connection.sendall(frame(text.encode()))
            answer = first_frame(connection)
        return answer.decode().split("\r")[1].split("|")[1]

    try:
        original = ADT.format(id="DUP-1", key="P1")
        assert send("node-a", original) == "AA"
        assert send("node-b", original) == "AA"  # answered as the original was
        assert send("node-b", ADT.format(id="DUP-2", key="P1")) == "AA"
        wait_for(lambda: sorted(sink.ids()) == ["DUP-1", "DUP-2"], 30, "both messages at the receiver")
        statuses = sorted((m["status"], m["control_id"]) for m in store.search(channel="relay", limit=10))
        assert statuses == [("DUPLICATE", "DUP-1"), ("PROCESSED", "DUP-1"), ("PROCESSED", "DUP-2")], statuses
        assert sink.ids().count("DUP-1") == 1
    finally:
        for engine in nodes.values():
            engine.terminate()
        sink.down()
        store.close()


def test_a_node_splitting_the_queues_otherwise_than_the_others_is_refused(store):
    """partitions must be the same on every node: a node starting with another count is refused
    while a node with the old count runs, and while deliveries split the old way are queued."""
    import time

    from hl7relay.store.database import DeliveryRecord, DeliveryUpdate, MessageRecord

    store.register_node("node-a", "host1", 100, "0.1.0", partitions=16)
    assert store.partitions_problem("node-b", 16, alive=10) is None
    assert store.partitions_problem("node-b", 8, alive=10) == (
        "partitions: 8 here, but node node-a runs with 16: every node must split the queues the same way")
    store.node_stopped("node-a")
    assert store.partitions_problem("node-b", 8, alive=10) is None  # nothing queued: a clean change
    raw = b"MSH|^~\\&|A|B|||1||ADT^A04|1|P|2.5\r"
    store.commit([MessageRecord("adt", raw, "PROCESSED", 1.0, control_id="1",
                                deliveries=[DeliveryRecord("lab", "QUEUED", partition=5)])], [])
    assert store.partitions_problem("node-b", 8, alive=10) == (
        "partitions: 8 here, but 1 deliveries are queued in the 16 partitions the nodes used before: a patient's "
        "queued and new messages would be in different partitions and could overtake each other; keep "
        "partitions: 16 until the queues are empty")
    assert store.partitions_problem("node-a", 16, alive=10) is None  # the old count: fine
    assert store.partitions_problem("node-a", 12, alive=10).startswith(  # 5 < 12, but split the old way
        "partitions: 12 here, but 1 deliveries are queued in the 16 partitions")
    # a node long dead with the old count does not hold back nodes that all moved on since; a row
    # in a partition none of them has would never be delivered: refused whatever came before
    store.register_node("node-a", "host1", 100, "0.1.0", now=time.time() - 3600, partitions=16)
    store.register_node("node-b", "host2", 101, "0.1.0", partitions=8)
    store.commit([MessageRecord("adt", raw.replace(b"|1|P", b"|2|P"), "PROCESSED", 1.0, control_id="2",
                                deliveries=[DeliveryRecord("lab", "QUEUED", partition=11)])], [])
    assert store.partitions_problem("node-c", 8, alive=10) == (
        "partitions: 8 here, but 1 deliveries are queued in partitions 8 and above, which no node would deliver; "
        "use the partitions the nodes used before until the queues are empty")
    store.commit([], [DeliveryUpdate(i, "lab", {"status": "SENT", "attempts": 1, "updated_at": 2.0}) for i in (1, 2)])
    assert store.partitions_problem("node-c", 8, alive=10) is None


def test_a_replay_in_a_cluster_is_queued_in_its_keys_partition(store, tmp_path):
    """A replay stored outside the engine (hl7relay replay, the API, the console) goes to the
    partition the engine would choose for its key, so it keeps its place in the patient's order."""
    import zlib

    from hl7relay.channels.channel import load_channel
    from hl7relay.ops.replay import commit_replay, plan_replay
    from hl7relay.store.database import DeliveryRecord, MessageRecord

    (tmp_path / "adt.yaml").write_text(
        "name: adt\nsource: {type: mllp, port: 0}\ndestinations:\n"
        "  - {name: lab, type: mllp, host: 127.0.0.1, port: 9, order: per_key, order_key: PID-3.1}\n")
    channel, errors = load_channel(tmp_path / "adt.yaml")
    assert not errors and channel is not None
    raw = b"MSH|^~\\&|A|B|||1||ADT^A08|7|P|2.5\rPID|1||MRN123^^^X^MR||DOE^J\r"
    [original] = store.commit([MessageRecord("adt", raw, "PROCESSED", 1.0, control_id="7",
                                             deliveries=[DeliveryRecord("lab", "ERROR")])], [])
    plan = plan_replay(store, {"adt": channel}, original)
    single = commit_replay(store, {"adt": channel}, plan, "before a cluster", "tester")
    assert store.get_message(single)["deliveries"][0]["queue_partition"] == 0
    store.register_node("node-a", "host1", 100, "0.1.0", partitions=8)
    plan = plan_replay(store, {"adt": channel}, original, force=True)
    replay = commit_replay(store, {"adt": channel}, plan, "CHG-1 resend", "tester")
    assert store.get_message(replay)["deliveries"][0]["queue_partition"] == zlib.crc32(b"MRN123") % 8
