"""A cluster against one engine: nodes and workers on one PostgreSQL store, the same channel as bench_engine.py.

    python bench/bench_cluster.py [--nodes 3] [--workers 2] [--connections 4] [--messages 1500] [--postgres URL]

Rows, in the same run: the bare baseline (bench/mllp_durable.py: frame, a psycopg group commit of
the bytes, ACK: no engine); one engine on SQLite and one on PostgreSQL without `cluster:`; one node
in a cluster (its queues in 8 partitions, all its own); `hl7relay run --workers 1` and `--workers
N` (one host's worker processes on one shared port, the same two load generators for both); then
--nodes nodes, the load generator split over them (one loadgen per node, --connections each).
Reported: msgs/s ACKed (stored first), end-to-end msgs/s (the sink has them), CPU per message of
every engine process together, and what bounds the row on this machine (its cores: the nodes, the
load generators, the sink and PostgreSQL all share them). Each row gets a schema of its own,
dropped after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import adt_a01_1kb  # noqa: E402
from bench_engine import (CHANNEL, children, cpu_seconds, free_port, load, sink_stats, start_sink,  # noqa: E402
                          stop, wait_port)


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of every core so far (/proc/stat): a row's share of the machine."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_since(before: tuple[float, float]) -> float:
    after = machine_busy()
    return (after[0] - before[0]) / max(1.0, after[1] - before[1])


def loads_together(ports: list[int], connections: int, per_connection: int, message: Path) -> tuple[list, float, float]:
    """One load generator per port in ``ports``, all at once: (their results, seconds, machine busy)."""
    results: list[dict] = []
    started, machine = time.monotonic(), machine_busy()
    threads = [threading.Thread(target=lambda port=port: results.append(load(port, connections, per_connection,
                                                                              message))) for port in ports]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.monotonic() - started, busy_since(machine)


def _schema(url: str):
    import sqlalchemy as sa

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(url)
    with admin.begin() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    return admin, schema, url + ("&" if "?" in url else "?") + f"options=-csearch_path%3D{schema}"


def run_nodes(work: Path, nodes: int, mode: str, connections: int, per_connection: int, message: Path,
              url: str, workers: int = 1, loads: int | None = None) -> dict:
    """``nodes`` engines (``mode``: sqlite, single: PostgreSQL without cluster, cluster), each
    ``hl7relay run --workers workers`` when workers is given; ``loads`` load generators per node."""
    admin, schema, store_url = _schema(url)
    cluster = mode == "cluster"
    name = f"{nodes}-{mode}-{workers}"
    sink_port = free_port()
    stats = work / f"sink-{name}.json"
    sink = start_sink(sink_port, 1, stats)
    engines, ports = [], []
    try:
        for index in range(nodes):
            folder = work / f"{name}-node{index}"
            (folder / "channels").mkdir(parents=True)
            port = free_port()
            (folder / "channels" / "bench.yaml").write_text(CHANNEL.format(port=port, sink=sink_port, validators="",
                                                                          parallel=8))
            store = f"sqlite:///{folder / 'data' / 'hl7relay.db'}" if mode == "sqlite" else store_url
            settings = f'store: {{url: "{store}"}}\nchannels: [channels]\nlog_level: error\n'
            if cluster:
                settings += f"cluster: {{node_id: node{index}, partitions: 8, lease_ttl: 10, lease_renew: 3}}\n"
            (folder / "hl7relay.yaml").write_text(settings)
            extra = ["--workers", str(workers)] if workers > 1 or (cluster and loads) else []
            engines.append(subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--config", "hl7relay.yaml",
                                             "--admin-port", str(free_port()), "--console-port", "0", *extra],
                                            cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            ports.append(port)
        for port, engine in zip(ports, engines):
            try:
                wait_port(port)
            except RuntimeError as exc:
                said = engine.stderr.read() if engine.poll() is not None else "?"
                raise RuntimeError(f"a node did not start: {said}") from exc
        if cluster:  # the partitions shared out before the clock starts
            from hl7relay.store.database import Store

            store = Store(store_url, create=False)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                owners = [row["owner"] for row in store.leases() if row["left"] > 0]
                if len(owners) == 8 and len(set(owners)) == nodes * workers:
                    break
                time.sleep(0.2)
            store.close()
        targets = [port for port in ports for _ in range(loads or 1)]
        for port in targets:  # warm up
            load(port, connections, 50, message)
        warm_deadline = time.monotonic() + 60
        while sink_stats(sink, stats)["received"] < 50 * connections * len(targets) and time.monotonic() < warm_deadline:
            time.sleep(0.1)
        warm = sink_stats(sink, stats)["received"]
        pids = [p for engine in engines for p in (engine.pid, *children(engine.pid))]
        before = {p: cpu_seconds(p) for p in pids}
        started = time.monotonic()
        results, acked_seconds, busy = loads_together(targets, connections, per_connection, message)
        acked = sum(r["acked"] for r in results)
        deadline = time.monotonic() + 180
        delivered = sink_stats(sink, stats)
        while delivered["received"] < warm + acked and time.monotonic() < deadline:
            time.sleep(0.2)
            delivered = sink_stats(sink, stats)
        e2e_seconds = time.monotonic() - started
        cpu = sum(cpu_seconds(p) - before.get(p, 0.0) for p in pids if Path(f"/proc/{p}").exists())
        return {"nodes": nodes, "mode": mode, "workers": workers, "loads": len(targets), "acked": acked,
                "msgs_per_s": acked / acked_seconds,
                "end_to_end_msgs_per_s": (delivered["received"] - warm) / e2e_seconds,
                "delivered": delivered["received"] - warm, "cpu_us_per_msg": cpu / max(1, acked) * 1e6,
                "p99_ms": max(r["p99_ms"] for r in results), "machine_busy": busy}
    finally:
        for engine in engines:
            stop(engine)
        stop(sink)
        with admin.begin() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")


def run_bare(work: Path, connections: int, per_connection: int, message: Path, url: str, loads: int) -> dict:
    """bench/mllp_durable.py on PostgreSQL: frame, one psycopg commit of the bytes per reactor turn, ACK."""
    admin, schema, store_url = _schema(url)
    port = free_port()
    server = subprocess.Popen([sys.executable, str(HERE / "mllp_durable.py"), str(port), store_url],
                              stdout=subprocess.PIPE, text=True)
    try:
        server.stdout.readline()
        for _ in range(loads):
            load(port, connections, 50, message)
        before = cpu_seconds(server.pid)
        results, seconds, busy = loads_together([port] * loads, connections, per_connection, message)
        acked = sum(r["acked"] for r in results)
        return {"nodes": 0, "mode": "bare", "workers": 0, "loads": loads, "acked": acked, "msgs_per_s": acked / seconds,
                "end_to_end_msgs_per_s": None, "delivered": 0,
                "cpu_us_per_msg": (cpu_seconds(server.pid) - before) / max(1, acked) * 1e6,
                "p99_ms": max(r["p99_ms"] for r in results), "machine_busy": busy}
    finally:
        stop(server)
        with admin.begin() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")


def _label(row: dict) -> str:
    if row["mode"] == "bare":
        return "bare psycopg group commit (no engine)"
    if row["mode"] in ("sqlite", "single"):
        return f"1 engine on {'SQLite' if row['mode'] == 'sqlite' else 'PostgreSQL'}, no cluster"
    if row["loads"] > row["nodes"]:
        return f"hl7relay run --workers {row['workers']}"
    return f"{row['nodes']} node{'s' * (row['nodes'] > 1)} in a cluster"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=4, help="per load generator")
    parser.add_argument("--messages", type=int, default=1500, help="per connection")
    parser.add_argument("--postgres", default=os.environ.get("HL7RELAY_TEST_POSTGRES_URL",
                                                            "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import tempfile

    template = Path(tempfile.mkdtemp(prefix="hl7relay-bench-cluster-"))
    message = template / "message.hl7"  # as bench_engine.py makes it: control and patient ids per message
    message.write_bytes(adt_a01_1kb().replace(b"MSG00001", b"@@ID@@").replace(b"|100234^", b"|@@PID@@^")
                        .replace(b"|AL|NE|", b"|||"))
    rows = []
    plan = [("bare", 0, 0, 1), ("sqlite", 1, 1, None), ("single", 1, 1, None), ("cluster", 1, 1, None),
            ("cluster", 1, 1, args.workers), ("cluster", 1, args.workers, args.workers),
            ("cluster", args.nodes, 1, None)]
    for index, (mode, nodes, workers, loads) in enumerate(plan):
        work = template / f"row{index}"
        work.mkdir()
        if mode == "bare":
            row = run_bare(work, args.connections, args.messages, message, args.postgres, 1)
        else:
            row = run_nodes(work, nodes, mode, args.connections, args.messages, message, args.postgres, workers, loads)
        rows.append(row)
        e2e = f"{row['end_to_end_msgs_per_s']:,.0f}" if row["end_to_end_msgs_per_s"] is not None else "-"
        print(f"{_label(row):42} {row['msgs_per_s']:7,.0f} msgs/s ACKed, {e2e:>6} msgs/s end to end, "
              f"{row['cpu_us_per_msg']:5,.0f} µs CPU/msg (all its processes), ACK p99 {row['p99_ms']:.1f} ms, "
              f"machine {row['machine_busy']:.0%} busy ({row['loads']} load generator{'s' * (row['loads'] > 1)} x "
              f"{args.connections} connections)", flush=True)
    bare, sqlite, single = rows[0], rows[1], rows[2]
    one_worker, two_workers = rows[4], rows[5]
    print(f"  PostgreSQL engine / bare psycopg: {single['msgs_per_s'] / bare['msgs_per_s']:.0%} ACKed, "
          f"{single['cpu_us_per_msg'] / bare['cpu_us_per_msg']:.1f}x CPU/msg; PostgreSQL / SQLite engine: "
          f"{single['msgs_per_s'] / sqlite['msgs_per_s']:.2f}x ACKed")
    print(f"  --workers {args.workers} / --workers 1: {two_workers['msgs_per_s'] / one_worker['msgs_per_s']:.2f}x ACKed, "
          f"{two_workers['end_to_end_msgs_per_s'] / one_worker['end_to_end_msgs_per_s']:.2f}x end to end (target >= 1.6x)")
    for row in rows[6:]:
        print(f"  {row['nodes']} nodes / 1 node in a cluster: {row['msgs_per_s'] / rows[3]['msgs_per_s']:.2f}x ACKed, "
              f"{row['end_to_end_msgs_per_s'] / rows[3]['end_to_end_msgs_per_s']:.2f}x end to end; / 1 engine: "
              f"{row['msgs_per_s'] / single['msgs_per_s']:.2f}x ACKed")
    print(f"this machine: {os.cpu_count()} cores shared by the engines, the load generators, the sink and "
          "PostgreSQL: a row with more processes than cores measures the cores, not the cluster")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
