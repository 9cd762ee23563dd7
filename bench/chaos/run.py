"""hl7relay's chaos suite: the failures a clinic's integration team tests an engine with, run
against the real engine (processes, loopback sockets, SQLite or a private PostgreSQL cluster).

    python bench/chaos/run.py              # the bounded run (CI: a few minutes)
    python bench/chaos/run.py --full       # >= 10 kill -9 rounds, >= 10,000 fuzz frames, a 2-minute outage...
    python bench/chaos/run.py --only kill9,fuzz --json results.json

Each scenario prints its figures (ACKed, lost, duplicates, inversions, unanswered, stop time, RSS)
and fails on a loss, a hang, an unanswered frame, a duplicate outside the documented window or an
order inversion. Exit status: 0 when every scenario passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (ADT, ROOT, ChaosFailure, Engine, Load, Sink, cluster_node, delivery_figures,  # noqa: E402
                     first_frame, free_port, mutations, relay_channel, stored_control_ids, wait_for, worker_pids,
                     write_channel)

from hl7relay.mllp.framing import MLLPFramer, frame  # noqa: E402

SCENARIOS: dict = {}


def scenario(name: str):
    def register(fn):
        SCENARIOS[name] = fn
        return fn
    return register


def check(figures: dict, **limits) -> None:
    """Fail on what must never happen."""
    problems = [f"{name} {figures[name]}" for name in ("lost", "unanswered", "hangs", "outside_window", "inversions")
                if figures.get(name)]
    problems += [f"{name} {figures[name]} > {limit}" for name, limit in limits.items() if figures.get(name, 0) > limit]
    if problems:
        raise ChaosFailure(", ".join(problems), figures)


# -- kill -9 under load, a slow destination ----------------------------------------------------------
@scenario("kill9")
def kill9(work: Path, full: bool) -> dict:
    rounds = 10 if full else 2
    per_round = 1500 if full else 400
    sink = Sink(delay=0.005).up()
    write_channel(work, "relay", relay_channel(sink.port, "per_key", parallel=4))
    kills, loads, backlog_at_kill, rss = [], [], [], 0.0
    for number in range(rounds):
        forwarding = "process" if number % 2 else "inline"
        engine = Engine(work, "--forwarding", forwarding)
        load = Load(engine.ports["relay"], connections=8, prefix=f"R{number}-").start()
        load.wait_answered(per_round, 300)
        rss = max(rss, engine.rss_mb())
        kills.append(time.monotonic())
        engine.kill9()
        load.finish()
        loads.append(load)
        accepted = load.accepted()
        backlog_at_kill.append(len({a.control_id for a in accepted} - set(sink.ids())))
        stored = stored_control_ids(work / "data" / "hl7relay.db")
        missing = [a.control_id for a in accepted if a.control_id not in stored]
        if missing:
            raise ChaosFailure(f"round {number}: {len(missing)} ACKed messages not in the store: {missing[:5]}")
    engine = Engine(work)
    accepted = [a for load in loads for a in load.accepted()]
    wanted = {a.control_id for a in accepted}
    wait_for(lambda: wanted <= set(sink.ids()), 600, "every ACKed message at the destination")
    code, stop = engine.terminate()
    sink.down()
    figures = delivery_figures(accepted, sink.received, kills, answered_at=sink.answered_at)
    if figures["outside_window"] or figures["lost"]:  # the raw timeline, for whoever reads the failure
        (work / "timeline.json").write_text(json.dumps({"kills": kills, "received": sink.received,
                                                        "answered_at": sink.answered_at}))
    figures.update(rounds=rounds, max_backlog_at_kill=max(backlog_at_kill), stop_s=round(stop, 2), rss_mb=round(rss),
                   hangs=sum(len(load.hangs) for load in loads), exit=code)
    check(figures)
    return figures


# -- a destination outage, in order and per key -----------------------------------------------------------
@scenario("outage")
def outage(work: Path, full: bool) -> dict:
    seconds = 120 if full else 6
    results = {}
    for order in ("per_key", "in_order"):
        folder = work / order
        folder.mkdir()
        sink = Sink().up()
        write_channel(folder, "relay", relay_channel(sink.port, order, parallel=4))
        engine = Engine(folder)
        load = Load(engine.ports["relay"], connections=4, prefix=f"O{order[0]}", interval=0.01).start()
        load.wait_answered(100, 60)
        sink.down()
        outage_started = time.monotonic()
        while time.monotonic() - outage_started < seconds:
            time.sleep(0.2)
        sink.up()
        load.finish()
        accepted = load.accepted()
        wanted = {a.control_id for a in accepted}
        wait_for(lambda wanted=wanted, sink=sink: wanted <= set(sink.ids()), 300,
                 f"every message delivered after the outage ({order})")
        code, stop = engine.terminate()
        sink.down()
        # what was on the wire when the destination went away may have reached it unanswered:
        # sent again (at-least-once), only those
        figures = delivery_figures(accepted, sink.received, [outage_started], answered_at=sink.answered_at)
        figures.update(outage_s=seconds, hangs=len(load.hangs), stop_s=round(stop, 2), exit=code)
        check(figures, duplicates=4)
        results[order] = figures
    return {f"{order}_{k}": v for order, figures in results.items() for k, v in figures.items()}


# -- reload under load ---------------------------------------------------------------------------------------
@scenario("reload")
def reload(work: Path, full: bool) -> dict:
    reloads = 20 if full else 4
    sink = Sink(delay=0.002).up()
    write_channel(work, "relay", relay_channel(sink.port, "per_key", parallel=4))
    engine = Engine(work)
    load = Load(engine.ports["relay"], connections=4, interval=0.005).start()
    load.wait_answered(100, 60)
    channel = work / "channels" / "relay.yaml"
    for number in range(reloads):
        text = channel.read_text()
        # a changed destination: its queue is retired and a new one opened, under load
        channel.write_text(text.replace("retry_max: 1}", "retry_max: 2}") if number % 2 == 0
                           else text.replace("retry_max: 2}", "retry_max: 1}"))
        engine.reload()
        wait_for(lambda number=number: engine.output().count("reload: ") > number, 60, f"reload {number + 1}")
        time.sleep(0.3)
    load.finish()
    accepted = load.accepted()
    wanted = {a.control_id for a in accepted}
    wait_for(lambda: wanted <= set(sink.ids()), 300, "every message delivered")
    rss = engine.rss_mb()
    code, stop = engine.terminate()
    sink.down()
    figures = delivery_figures(accepted, sink.received)
    figures.update(reloads=reloads, hangs=len(load.hangs), stop_s=round(stop, 2), rss_mb=round(rss), exit=code)
    check(figures, duplicates=0)
    return figures


# -- after_delivery: the shipped ORU channel, the PMS refusing, then down ----------------------------------------
ORU = ("MSH|^~\\&|LAB|LABFAC|HL7RELAY|CLINIC|20240105093512||ORU^R01^ORU_R01|{id}|P|2.5.1\r"
       "PID|1||{key}^^^CLINIC^MR||CHAOS^TEST\rOBR|1||ORD{id}|GLU^Glucose|||202401050900\r"
       "OBX|1|NM|GLU^Glucose||95|mg/dL|||||F\r")


@scenario("after_delivery")
def after_delivery(work: Path, full: bool) -> dict:
    down_for = 60 if full else 4
    results = {}
    for forwarding in ("inline", "process"):
        folder = work / forwarding
        shutil.copytree(ROOT / "channels", folder / "channels")
        pms = Sink(script=["AR"] * 20).up()
        env = {"ADT_PORT": "0", "SIU_PORT": "0", "ORU_PORT": "0", "PMS_PORT": str(pms.port), "LAB_PORT": "9"}
        engine = Engine(folder, "--forwarding", forwarding, env=env)
        load = Load(engine.ports["oru-to-pms"], connections=4, template=ORU, resend_until_accepted=True,
                    prefix=f"A{forwarding[0]}").start()
        load.wait_answered(50, 120)
        pms.down()
        down_at = time.monotonic()
        time.sleep(down_for)
        pms.up()
        load.wait_answered(load.accepted_count() + 50, 120)
        load.finish()
        code, stop = engine.terminate()
        # a restart sends nothing withdrawn or already accepted again
        engine = Engine(folder, "--forwarding", forwarding, env=env)
        after = Load(engine.ports["oru-to-pms"], connections=1, template=ORU, prefix=f"Z{forwarding[0]}").start(limit=5)
        after.finish()
        code2, _ = engine.terminate()
        pms.down()
        accepted = load.accepted() + after.accepted()
        # the PMS's ACKs on the wire when it went down never reached the engine: the lab was
        # answered AR and sent those again (a lost ACK: at-least-once); no other copy twice
        copies = delivery_figures(accepted, pms.accepted, [down_at])
        figures = {"acked": copies["acked"],
                   "refused_or_unreachable": sum(1 for a in load.answers if a.code not in ("AA", "CA")),
                   "lost": copies["lost"], "accepted_twice": copies["duplicates"],
                   "outside_window": copies["outside_window"],
                   "unanswered": len(load.hangs) + len(after.hangs), "stop_s": round(stop, 2), "exit": code or code2}
        check(figures, accepted_twice=8)
        results[forwarding] = figures
    return {f"{mode}_{k}": v for mode, figures in results.items() for k, v in figures.items()}


# -- hostile connections ---------------------------------------------------------------------------------------
def _one_answer(port: int, payload: bytes, timeout: float = 30.0) -> bytes | None:
    """The answer to one message on a new connection; None when there was none (refused, reset)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
            connection.sendall(frame(payload))
            return first_frame(connection)
    except OSError:
        return None


@scenario("hostile")
def hostile(work: Path, full: bool) -> dict:
    write_channel(work, "ch", "name: ch\nsource: {type: mllp, host: 127.0.0.1, port: 0, read_timeout: 3}\n")
    engine = Engine(work)
    port = engine.ports["ch"]
    figures, unanswered = {}, 0
    message = ADT.format(id="H1", key="K1").encode()
    # idle connections from one address, past its limit (16): its longest-idle one makes room
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(24)]
    answer = _one_answer(port, message)
    unanswered += answer is None
    # a leaky client: a connection per message, never closed
    leaked, leaky_answered = [], 0
    for n in range(40 if full else 20):
        connection = socket.create_connection(("127.0.0.1", port), timeout=30)
        connection.sendall(frame(ADT.format(id=f"L{n}", key="K1").encode()))
        leaky_answered += first_frame(connection) is not None
        leaked.append(connection)
    unanswered += len(leaked) - leaky_answered
    figures["leaky_connections_answered"] = leaky_answered
    # slowloris: a frame a byte at a time, slower than read_timeout allows
    slow = socket.create_connection(("127.0.0.1", port), timeout=30)
    slow.sendall(b"\x0bMSH|^~\\&|")
    started = time.monotonic()
    reset = False
    while time.monotonic() - started < 8:
        try:
            slow.sendall(b"x")
            if slow.recv(1, socket.MSG_DONTWAIT) == b"":
                reset = True
                break
        except BlockingIOError:
            pass
        except OSError:
            reset = True
            break
        time.sleep(0.25)
    figures["slowloris_reset"] = reset
    unanswered += _one_answer(port, ADT.format(id="H2", key="K1").encode()) is None  # others still served
    # junk outside any frame, then a message on the same connection
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(os.urandom(4096).replace(b"\x0b", b"").replace(b"\x1c", b"") + frame(message))
        unanswered += first_frame(connection) is None
    # an oversized frame: answered AR, that connection closed
    big = frame(b"MSH|^~\\&|PMS|CLINIC|||20240101||ADT^A08|BIG1|P|2.5.1\rNTE|1||" + b"x" * (20 * 1024 * 1024) + b"\r")
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        try:
            connection.sendall(big)
        except OSError:
            pass  # closed on us once the limit was passed: the answer is already waiting
        answer = first_frame(connection)
        code = answer.split(b"MSA|")[1][:2].decode() if answer else ""
    figures["oversized_answer"] = code or "none"
    unanswered += code != "AR"
    for connection in idle + leaked + [slow]:
        connection.close()
    figures["rss_mb"] = round(engine.rss_mb())
    code, stop = engine.terminate()
    figures.update(unanswered=unanswered, stop_s=round(stop, 2), exit=code)
    if not reset:
        raise ChaosFailure("a slowloris frame was not reset after read_timeout")
    check(figures)
    return figures


# -- fuzzed frames through the shipped channels -------------------------------------------------------------------
@scenario("fuzz")
def fuzz(work: Path, full: bool) -> dict:
    count = 10_000 if full else 1_500
    shutil.copytree(ROOT / "channels", work / "channels")
    lab, pms = Sink().up(), Sink().up()
    env = {"ADT_PORT": "0", "SIU_PORT": "0", "ORU_PORT": "0", "LAB_PORT": str(lab.port), "PMS_PORT": str(pms.port)}
    engine = Engine(work, env=env)
    bases = [(ROOT / "samples" / name).read_bytes() for name in ("adt_a01.hl7", "siu_s12.hl7", "oru_r01.hl7",
                                                                  "adt_a08.hl7")]
    corpus = ROOT.parent / "shared" / "corpus"
    if corpus.is_dir():
        bases += [path.read_bytes() for path in sorted(corpus.glob("*.hl7"))[:60] if path.stat().st_size < 20000]
    bases = [b.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\x1c")[0].strip(b"\x0b") for b in bases]
    ports = list(engine.ports.values())
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=60) for port in ports]
    framers = [MLLPFramer() for _ in ports]
    answered = unanswered = 0
    started = time.monotonic()
    for number, payload in enumerate(mutations(7, count, bases)):
        which = number % len(ports)
        broken = False
        try:
            sockets[which].sendall(frame(payload))
            if first_frame(sockets[which], framers[which]) is None:
                raise OSError("closed")
            answered += 1
        except OSError as exc:
            # a listener closes a connection only after answering (an oversized frame): a close
            # or a timeout without an answer is an unanswered frame
            unanswered += 1
            broken = True
            print(f"    no answer to frame {number} ({exc or 'closed'}): {payload[:200]!r}", flush=True)
        if broken:
            sockets[which].close()
            sockets[which] = socket.create_connection(("127.0.0.1", ports[which]), timeout=60)
            framers[which] = MLLPFramer()
            if unanswered > 20:
                break
    elapsed = time.monotonic() - started
    for connection in sockets:
        connection.close()
    rss = engine.rss_mb()
    code, stop = engine.terminate()
    lab.down()
    pms.down()
    figures = {"frames": answered + unanswered, "answered": answered, "unanswered": unanswered,
               "frames_per_s": round((answered + unanswered) / elapsed), "rss_mb": round(rss), "stop_s": round(stop, 2),
               "exit": code}
    check(figures)
    if code != 0:
        raise ChaosFailure(f"the engine exited {code} after the fuzz")
    return figures


# -- disk full -----------------------------------------------------------------------------------------------
@scenario("disk_full")
def disk_full(work: Path, full: bool) -> dict:
    data = work / "data"
    data.mkdir(mode=0o700)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(data)],
                             capture_output=True, text=True).returncode == 0
    if not mounted:
        raise ChaosFailure("cannot mount a small tmpfs here (needs root): disk_full not run")
    try:
        write_channel(work, "ch", "name: ch\nsource: {type: mllp, host: 127.0.0.1, port: 0}\n"
                                  "storage: {stages: [transformed, acks]}\n")
        engine = Engine(work)
        port = engine.ports["ch"]
        load = Load(port, connections=4, template=ADT.replace("PV1|1|O\r", "PV1|1|O\rNTE|1||" + "x" * 2000 + "\r"),
                    answer_timeout=30).start()
        # the disk fills up: the store's next commits fail, and are answered AR, never AA
        wait_for(lambda: sum(1 for a in load.answers if a.code == "AR") >= 20, 120, "AR answers once the disk is full")
        not_ready = engine.readyz()
        shrink = _free_space(data)  # an operator makes room: no restart needed
        wait_for(lambda: engine.readyz() == 200, 60, "/readyz ready again after space was freed")
        after = load.accepted_count()
        load.wait_answered(after + 20, 120)
        load.finish()
        accepted = load.accepted()
        code, stop = engine.terminate()
        stored = stored_control_ids(data / "hl7relay.db")
        lost = [a.control_id for a in accepted if a.control_id not in stored]
        figures = {"acked": len(accepted), "refused_AR": sum(1 for a in load.answers if a.code == "AR"),
                   "acked_not_stored": len(lost), "lost": len(lost), "readyz_when_full": not_ready,
                   "freed_kb": shrink, "hangs": len(load.hangs), "stop_s": round(stop, 2), "exit": code}
        if not_ready == 200:
            raise ChaosFailure("/readyz said ready while the disk was full")
        check(figures)
        return figures
    finally:
        subprocess.run(["umount", "-l", str(data)], capture_output=True)


def _free_space(data: Path) -> int:
    """Grow the tmpfs (as an operator adds space): returns the KB added."""
    subprocess.run(["mount", "-o", "remount,size=64m", str(data)], capture_output=True)
    return 58 * 1024


# -- PostgreSQL stopped ------------------------------------------------------------------------------------------
def _pg_bin() -> Path | None:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return versions[-1].parent if versions else None


class PrivatePostgres:
    """A PostgreSQL cluster of the scenario's own (initdb in a temporary folder, a free port), so a
    scenario may stop it or fill it without touching anyone else's database."""

    def __init__(self):
        binaries = _pg_bin()
        if binaries is None:
            raise ChaosFailure("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
        self.binaries = binaries
        # a folder of its own outside the work folder (private to root): the server runs as postgres
        self.folder = Path(tempfile.mkdtemp(prefix="hl7relay-chaos-pg-"))
        self.as_postgres = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            shutil.chown(self.folder, "postgres", "postgres")
            self.as_postgres = ["runuser", "-u", "postgres", "--"]
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        subprocess.run([*self.as_postgres, str(binaries / "initdb"), "-D", str(self.folder / "data"), "-A", "trust",
                        "-U", "postgres"], check=True, capture_output=True)
        self.options = f"-p {port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=on"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        if self.pg_ctl("-o", self.options, "-l", str(self.folder / "log"), "start").returncode != 0:
            raise ChaosFailure("could not start the private PostgreSQL cluster")

    def pg_ctl(self, *args):
        return subprocess.run([*self.as_postgres, str(self.binaries / "pg_ctl"), "-D", str(self.folder / "data"), "-w",
                               *args], capture_output=True, text=True)

    def remove(self) -> None:
        self.pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)


@scenario("postgres_down")
def postgres_down(work: Path, full: bool) -> dict:
    server = PrivatePostgres()
    pg_ctl, options, cluster = server.pg_ctl, server.options, server.folder
    try:
        url = server.url
        sink = Sink().up()
        write_channel(work, "relay", relay_channel(sink.port, "per_key", parallel=4))
        engine = Engine(work, "--store", url)
        load = Load(engine.ports["relay"], connections=4, answer_timeout=60).start()
        load.wait_answered(200, 60)
        pg_ctl("-m", "immediate", "stop")
        down_at = time.monotonic()
        wait_for(lambda: sum(1 for a in load.answers if a.code == "AR" and a.sent_at > down_at) >= 5, 120,
                 "AR answers while PostgreSQL is down")
        accepted_while_down = [a for a in load.accepted() if a.sent_at > down_at + 1.0]
        not_ready = engine.readyz()
        pg_ctl("-o", options, "-l", str(cluster / "log"), "start")
        up_at = time.monotonic()
        wait_for(lambda: any(a.code == "AA" and a.sent_at > up_at for a in load.answers), 120,
                 "AA again once PostgreSQL is back")
        load.wait_answered(load.accepted_count() + 100, 120)
        load.finish()
        accepted = load.accepted()
        wanted = {a.control_id for a in accepted}
        wait_for(lambda: wanted <= set(sink.ids()), 300, "every ACKed message delivered")
        code, stop = engine.terminate()
        sink.down()
        figures = delivery_figures(accepted, sink.received)
        figures.update(refused_AR=sum(1 for a in load.answers if a.code == "AR"), readyz_when_down=not_ready,
                       aa_while_down=len(accepted_while_down), hangs=len(load.hangs), stop_s=round(stop, 2), exit=code)
        if accepted_while_down:
            raise ChaosFailure(f"{len(accepted_while_down)} messages answered AA while the database was down")
        check(figures, duplicates=0)
        return figures
    finally:
        server.remove()


# -- a cluster: three nodes on one PostgreSQL, one killed (-9) and started again per round -------------------
@scenario("cluster")
def cluster(work: Path, full: bool) -> dict:
    rounds, per_round, ttl, renew = (20, 1000, 4, 1) if full else (10, 150, 4, 1)
    server = PrivatePostgres()
    sink = Sink(delay=0.002).up()
    names = ("node-a", "node-b", "node-c")

    def start(name):
        return cluster_node(work / name, name, server.url, sink.port, ttl, renew)

    try:
        from hl7relay.store.database import Store

        nodes = {name: start(name) for name in names}
        store = Store(server.url, create=False)

        def owners():
            return {row["name"]: row["owner"] for row in store.leases() if row["left"] > 0}

        wait_for(lambda: len(owners()) == 8 and len(set(owners().values())) == 3, 60, "every partition owned, by all three")
        loads, kills, takeovers = [], [], []
        for number in range(rounds):
            victim = names[number % 3]
            round_loads = [Load(engine.ports["relay"], connections=2, prefix=f"{name[-1]}{number}-",
                                key_prefix=f"{name[-1]}K").start() for name, engine in nodes.items()]
            loads += round_loads
            wait_for(lambda loads=round_loads: sum(load.accepted_count() for load in loads) >= per_round, 120,
                     f"round {number}: {per_round} messages ACKed")
            held = {lease for lease, owner in owners().items() if owner == victim}
            kills.append(time.monotonic())
            nodes[victim].kill9()
            wait_for(lambda held=held, victim=victim: all(owners().get(lease) not in (None, victim) for lease in held),
                     60, f"round {number}: {victim}'s partitions taken over")
            takeovers.append(time.monotonic() - kills[-1])
            for load in round_loads:
                load.finish()
            nodes[victim] = start(victim)
        accepted = [a for load in loads for a in load.accepted()]
        wanted = {a.control_id for a in accepted}
        wait_for(lambda: wanted <= set(sink.ids()), 300, "every ACKed message delivered")
        for engine in nodes.values():
            engine.terminate()
        store.close()
        figures = delivery_figures(accepted, sink.received, kills, window=1.0, answered_at=sink.answered_at)
        figures.update(rounds=rounds, max_takeover_s=round(max(takeovers), 1), lease_ttl=ttl, lease_renew=renew,
                       hangs=sum(len(load.hangs) for load in loads))
        if max(takeovers) > ttl + renew + 1.5:  # the look itself polls the store every 50 ms, and a node must see the death
            raise ChaosFailure(f"a takeover took {max(takeovers):.1f}s (lease_ttl {ttl} + lease_renew {renew})", figures)
        check(figures)
        return figures
    finally:
        sink.down()
        server.remove()


# -- one host's workers: `hl7relay run --workers 2`, a worker killed (-9) per round --------------------------
@scenario("workers")
def workers(work: Path, full: bool) -> dict:
    """The supervisor starts the killed worker again; meanwhile the other takes its partitions and
    the senders' new connections (the shared port); nothing acknowledged is lost or reordered."""
    rounds, per_round = (10, 1000) if full else (6, 150)
    server = PrivatePostgres()
    sink = Sink(delay=0.002).up()
    port = free_port()
    engine = cluster_node(work / "host", "host", server.url, sink.port, 4, 1, workers=2, listen_port=port)
    try:
        from hl7relay.store.database import Store

        store = Store(server.url, create=False)

        def owners():
            return {row["name"]: row["owner"] for row in store.leases() if row["left"] > 0}

        both = {"host-w1", "host-w2"}
        wait_for(lambda: len(owners()) == 8 and set(owners().values()) == both, 60, "every partition owned, by both")
        loads, kills = [], []
        for number in range(rounds):
            victim = 1 + number % 2
            load = Load(port, connections=4, prefix=f"{number}-", key_prefix=f"R{number}K").start()
            loads.append(load)
            wait_for(lambda load=load: load.accepted_count() >= per_round, 120, f"round {number}: {per_round} ACKed")
            restarts = engine.output().count(f"worker {victim} (host-w{victim}) is running again")
            kills.append(time.monotonic())
            os.kill(worker_pids(engine.pid)[victim], 9)
            wait_for(lambda victim=victim, restarts=restarts: engine.output().count(
                f"worker {victim} (host-w{victim}) is running again") > restarts, 120,
                f"round {number}: worker {victim} started again")
            wait_for(lambda: set(owners().values()) == both, 60, f"round {number}: the partitions shared again")
            load.wait_answered(load.accepted_count() + 50, 120)  # the senders reconnected and go on
            load.finish()
        accepted = [a for load in loads for a in load.accepted()]
        wanted = {a.control_id for a in accepted}
        wait_for(lambda: wanted <= set(sink.ids()), 300, "every ACKed message delivered")
        code, stop = engine.terminate()
        store.close()
        figures = delivery_figures(accepted, sink.received, kills, window=1.0, answered_at=sink.answered_at)
        figures.update(rounds=rounds, restarts=engine.output().count("is running again"), exit=code,
                       stop_s=round(stop, 2), hangs=sum(len(load.hangs) for load in loads))
        if code != 0 or "stopped: every worker stopped" not in engine.output():
            raise ChaosFailure("SIGTERM did not stop every worker cleanly", figures)
        check(figures)
        return figures
    finally:
        sink.down()
        server.remove()


@scenario("cluster_postgres_down")
def cluster_postgres_down(work: Path, full: bool) -> dict:
    """Two nodes; PostgreSQL stopped (immediate) under load, then started: AR (never AA) while it is
    down, the nodes stop delivering before their leases can have expired, and recover on their own."""
    ttl, renew = 4, 1
    server = PrivatePostgres()
    sink = Sink(delay=0.002).up()
    try:
        nodes = {name: cluster_node(work / name, name, server.url, sink.port, ttl, renew) for name in ("node-a", "node-b")}
        loads = [Load(engine.ports["relay"], connections=2, prefix=f"{name[-1]}-", key_prefix=f"{name[-1]}K",
                      answer_timeout=60).start() for name, engine in nodes.items()]
        wait_for(lambda: sum(load.accepted_count() for load in loads) >= 400, 60, "400 messages ACKed")
        server.pg_ctl("-m", "immediate", "stop")
        down_at = time.monotonic()
        for load in loads:
            wait_for(lambda load=load: sum(1 for a in load.answers if a.code == "AR" and a.sent_at > down_at) >= 3,
                     120, "AR answers from every node while PostgreSQL is down")
        accepted_while_down = [a for load in loads for a in load.accepted() if a.sent_at > down_at + 1.0]
        not_ready = [engine.readyz() for engine in nodes.values()]
        time.sleep(ttl)  # down longer than a lease: every node must have stopped delivering
        server.pg_ctl("-o", server.options, "-l", str(server.folder / "log"), "start")
        up_at = time.monotonic()
        for load in loads:
            wait_for(lambda load=load: any(a.code == "AA" and a.sent_at > up_at for a in load.answers), 120,
                     "AA again from every node once PostgreSQL is back")
        wait_for(lambda: sum(load.accepted_count() for load in loads) >= 800, 120, "800 messages ACKed")
        for load in loads:
            load.finish()
        accepted = [a for load in loads for a in load.accepted()]
        wanted = {a.control_id for a in accepted}
        wait_for(lambda: wanted <= set(sink.ids()), 300, "every ACKed message delivered")
        stops = [engine.terminate()[1] for engine in nodes.values()]
        # a copy sent again was on the wire when the database went, or delivered in the seconds before
        # the nodes stopped (their leases' deadline: lease_ttl - lease_renew)
        figures = delivery_figures(accepted, sink.received, [down_at], window=ttl, answered_at=sink.answered_at)
        figures.update(refused_AR=sum(1 for load in loads for a in load.answers if a.code == "AR"),
                       readyz_when_down=max(not_ready), aa_while_down=len(accepted_while_down),
                       hangs=sum(len(load.hangs) for load in loads), stop_s=round(max(stops), 2))
        if accepted_while_down:
            raise ChaosFailure(f"{len(accepted_while_down)} messages answered AA while the database was down", figures)
        check(figures)
        return figures
    finally:
        sink.down()
        server.remove()


# -- SIGTERM under sustained load -------------------------------------------------------------------------------
@scenario("sigterm")
def sigterm(work: Path, full: bool) -> dict:
    rounds = 5 if full else 2
    sink = Sink(delay=0.01).up()
    write_channel(work, "relay", relay_channel(sink.port, "per_key", parallel=4))
    stops, after_term, all_accepted, loads = [], [], [], []
    for number in range(rounds):
        engine = Engine(work, "--stop-timeout", "5")
        load = Load(engine.ports["relay"], connections=8, prefix=f"T{number}-").start()
        load.wait_answered(300, 120)
        term_at = time.monotonic()
        code, stop = engine.terminate(timeout=30)
        if code != 0:
            raise ChaosFailure(f"round {number}: the engine exited {code} on SIGTERM")
        load.finish()
        loads.append(load)
        stops.append(stop)
        # reading stops at once: at most the message in flight on each connection is answered after
        after_term.append(sum(1 for a in load.accepted() if a.sent_at > term_at))
        accepted = load.accepted()
        all_accepted += accepted
        stored = stored_control_ids(work / "data" / "hl7relay.db")
        missing = [a.control_id for a in accepted if a.control_id not in stored]
        if missing:
            raise ChaosFailure(f"round {number}: {len(missing)} ACKed messages not stored")
        if stop > 5 + 3:
            raise ChaosFailure(f"round {number}: the stop took {stop:.1f}s with stop_timeout 5")
        if after_term[-1] > load.connections:
            raise ChaosFailure(f"round {number}: {after_term[-1]} messages accepted after SIGTERM "
                               f"(at most one in flight per connection: {load.connections})")
    engine = Engine(work)
    wanted = {a.control_id for a in all_accepted}
    wait_for(lambda: wanted <= set(sink.ids()), 300, "every ACKed message delivered")
    engine.terminate()
    sink.down()
    figures = delivery_figures(all_accepted, sink.received)
    figures.update(rounds=rounds, max_stop_s=round(max(stops), 2), max_accepted_after_sigterm=max(after_term),
                   hangs=sum(len(load.hangs) for load in loads))
    check(figures, duplicates=0)
    return figures


# what each scenario did, in words, for the table
_WHAT = {
    "kill9": lambda f: f"{f.get('rounds')} rounds of kill -9 under load (8 connections, a destination taking 5 ms), "
                       f"inline and forwarder in turn; backlog at a kill up to {f.get('max_backlog_at_kill')}",
    "outage": lambda f: f"the destination down {f.get('per_key_outage_s')} s under load, order per_key, then in_order",
    "reload": lambda f: f"{f.get('reloads')} reloads changing the destination under load",
    "after_delivery": lambda f: "the shipped ORU channel: the PMS refusing 20, then down; the lab resending until AA; "
                                "a restart; inline, then forwarder",
    "hostile": lambda f: "24 idle connections from one address, a leaky client, slowloris, junk, a 20 MB frame",
    "fuzz": lambda f: f"{f.get('frames')} mutated frames (samples, corpus) through the shipped channels",
    "disk_full": lambda f: "the data folder a 6 MB tmpfs: filled under load, then grown",
    "postgres_down": lambda f: "a private PostgreSQL cluster stopped (immediate) under load, then started",
    "sigterm": lambda f: f"{f.get('rounds')} SIGTERMs under sustained load (8 connections), stop_timeout 5 s",
    "cluster_postgres_down": lambda f: "two nodes; PostgreSQL stopped (immediate) under load for longer than a lease, "
                                       "then started",
    "cluster": lambda f: f"three nodes on one PostgreSQL, a sender on each; {f.get('rounds')} rounds of kill -9 of one "
                         f"and its restart; takeover at most {f.get('max_takeover_s')} s (lease_ttl {f.get('lease_ttl')} "
                         f"+ lease_renew {f.get('lease_renew')})",
}


def markdown_table(results: dict, full: bool) -> str:
    rows = ["| scenario | what | ACKed | lost | duplicates (all in the window) | inversions | unanswered | stop | RSS |",
            "|---|---|---|---|---|---|---|---|---|"]

    def total(f, name):
        values = [v for k, v in f.items() if k == name or k.endswith("_" + name)]
        return sum(v for v in values if isinstance(v, (int, float))) if values else None

    for name, f in results.items():
        if f.get("verdict") != "ok":
            rows.append(f"| {name} | FAILED: {f.get('failure', '')} | | | | | | | |")
            continue
        acked = total(f, "acked") or f.get("answered")
        dup = total(f, "duplicates")
        if dup is None:
            dup = total(f, "accepted_twice")
        stop = f.get("stop_s") or f.get("max_stop_s") or f.get("per_key_stop_s") or f.get("inline_stop_s")
        cells = [name, _WHAT.get(name, lambda f: "")(f), f"{acked:,}" if acked is not None else "-",
                 str(total(f, "lost") or 0), "-" if dup is None else str(dup), str(total(f, "inversions") or 0),
                 str((total(f, "unanswered") or 0) + (total(f, "hangs") or 0)),
                 f"{stop:.2f} s" if stop is not None else "-", f"{f['rss_mb']} MB" if f.get("rss_mb") else "-"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# -- the runner --------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the full run (long): the figures the README shows")
    parser.add_argument("--only", help="comma-separated scenarios: " + ", ".join(SCENARIOS))
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work folders (logs, stores)")
    parser.add_argument("--markdown", action="store_true", help="end with the figures as a Markdown table (the README's)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"no scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    root = Path(tempfile.mkdtemp(prefix="hl7relay-chaos-"))
    results, failed = {}, []
    print(f"chaos: {'full' if args.full else 'bounded'} run of {', '.join(names)} in {root}", flush=True)
    for name in names:
        work = root / name
        work.mkdir()
        started = time.monotonic()
        try:
            figures = SCENARIOS[name](work, args.full)
            verdict = "ok"
        except ChaosFailure as exc:
            figures, verdict = {"failure": str(exc), **exc.figures}, "FAILED"
            failed.append(name)
        except Exception as exc:  # noqa: BLE001 - a harness error fails the scenario, with where
            figures, verdict = {"failure": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}, "FAILED"
            failed.append(name)
        finally:
            left = Engine.end_all()  # never leave an engine behind, passed or failed
            Sink.down_all()
        if left:
            figures["engines_left_running"] = left
        figures["seconds"] = round(time.monotonic() - started, 1)
        results[name] = {"verdict": verdict, **figures}
        shown = ", ".join(f"{k} {v}" for k, v in figures.items() if k != "trace")
        print(f"{verdict:6} {name}: {shown}", flush=True)
        if "trace" in figures:
            print(figures["trace"], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"full": args.full, "at": time.strftime("%Y-%m-%d %H:%M"),
                                               "results": results}, indent=2))
    if not args.keep and not failed:
        shutil.rmtree(root, ignore_errors=True)
    elif failed:
        print(f"chaos: the work folders (engine logs, stores) are kept in {root}", flush=True)
    if args.markdown:
        print(markdown_table(results, args.full))
    passed = len(names) - len(failed)
    print(f"chaos: {passed} passed, {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
