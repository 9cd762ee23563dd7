"""A cluster against one engine: nodes on one PostgreSQL store, the same channel as bench_engine.py.

    python bench/bench_cluster.py [--nodes 3] [--connections 4] [--messages 1500] [--postgres URL]

Rows, in the same run: one engine on PostgreSQL without `cluster:` (its single-engine queues);
one node in a cluster (its queues in 8 partitions, all its own); then --nodes nodes, the load
generator split over them (one loadgen per node, --connections each). Reported: msgs/s ACKed
(stored first), end-to-end msgs/s (the sink has them), CPU per message of every engine process
together, and what bounds the row on this machine (its cores: the nodes, the load generators, the
sink and PostgreSQL all share them). Each row gets a schema of its own, dropped after.
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


def _schema(url: str):
    import sqlalchemy as sa

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(url)
    with admin.begin() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    return admin, schema, url + ("&" if "?" in url else "?") + f"options=-csearch_path%3D{schema}"


def run_nodes(work: Path, nodes: int, cluster: bool, connections: int, per_connection: int, message: Path,
              url: str) -> dict:
    admin, schema, store_url = _schema(url)
    name = f"{nodes}-{'cluster' if cluster else 'single'}"
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
            settings = f'store: {{url: "{store_url}"}}\nchannels: [channels]\nlog_level: error\n'
            if cluster:
                settings += f"cluster: {{node_id: node{index}, partitions: 8, lease_ttl: 10, lease_renew: 3}}\n"
            (folder / "hl7relay.yaml").write_text(settings)
            engines.append(subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--config", "hl7relay.yaml",
                                             "--admin-port", str(free_port()), "--console-port", "0"], cwd=folder,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
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
                if len(owners) == 8 and len(set(owners)) == nodes:
                    break
                time.sleep(0.2)
            store.close()
        for port in ports:  # warm up
            load(port, connections, 50, message)
        warm_deadline = time.monotonic() + 60
        while sink_stats(sink, stats)["received"] < 50 * connections * nodes and time.monotonic() < warm_deadline:
            time.sleep(0.1)
        warm = sink_stats(sink, stats)["received"]
        pids = [p for engine in engines for p in (engine.pid, *children(engine.pid))]
        before = {p: cpu_seconds(p) for p in pids}
        results: list[dict] = []
        started = time.monotonic()
        threads = [threading.Thread(target=lambda port=port: results.append(load(port, connections, per_connection,
                                                                                  message))) for port in ports]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        acked_seconds = time.monotonic() - started
        acked = sum(r["acked"] for r in results)
        deadline = time.monotonic() + 180
        delivered = sink_stats(sink, stats)
        while delivered["received"] < warm + acked and time.monotonic() < deadline:
            time.sleep(0.2)
            delivered = sink_stats(sink, stats)
        e2e_seconds = time.monotonic() - started
        cpu = sum(cpu_seconds(p) - before.get(p, 0.0) for p in pids if Path(f"/proc/{p}").exists())
        return {"nodes": nodes, "cluster": cluster, "acked": acked, "msgs_per_s": acked / acked_seconds,
                "end_to_end_msgs_per_s": (delivered["received"] - warm) / e2e_seconds,
                "delivered": delivered["received"] - warm, "cpu_us_per_msg": cpu / max(1, acked) * 1e6,
                "p99_ms": max(r["p99_ms"] for r in results)}
    finally:
        for engine in engines:
            stop(engine)
        stop(sink)
        with admin.begin() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--connections", type=int, default=4, help="per node")
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
    for nodes, cluster in ((1, False), (1, True), (args.nodes, True)):
        work = template / f"{nodes}-{cluster}"
        work.mkdir()
        rows.append(run_nodes(work, nodes, cluster, args.connections, args.messages, message, args.postgres))
        row = rows[-1]
        print(f"{row['nodes']} {'node(s) in a cluster' if cluster else 'engine, no cluster'}: {row['msgs_per_s']:,.0f} "
              f"msgs/s ACKed, {row['end_to_end_msgs_per_s']:,.0f} msgs/s end to end, {row['cpu_us_per_msg']:,.0f} µs "
              f"CPU/msg (all engine processes), ACK p99 {row['p99_ms']:.1f} ms", flush=True)
    base = rows[0]
    for row in rows[1:]:
        print(f"  {row['nodes']} node(s) / 1 engine: {row['msgs_per_s'] / base['msgs_per_s']:.2f}x ACKed, "
              f"{row['end_to_end_msgs_per_s'] / base['end_to_end_msgs_per_s']:.2f}x end to end")
    print(f"this machine: {os.cpu_count()} cores shared by the engines, {args.nodes} load generators, the sink and "
          "PostgreSQL: a row with more nodes than cores measures the cores, not the cluster")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
