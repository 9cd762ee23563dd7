"""The engine under MLLP load, next to the raw stack's ceiling measured in the same run.

    python bench/bench_engine.py [--connections 8] [--messages 2500] [--parallel 8] [--repeat 1] [--json results.json]

1. Baseline: a raw Twisted MLLP server that only frames and ACKs (bench/mllp_sink.py) on core 0,
   driven by the load generator (bench/loadgen.py) on core 1: the ceiling for msgs/s accepted.
2. Baseline: the same server, but it commits each message's bytes to a SQLite file (WAL,
   synchronous=FULL: fsync before the ACK, one group commit per reactor turn) before it ACKs
   (bench/mllp_durable.py): the ceiling for msgs/s accepted *and stored* on this disk.
3. Baseline: a raw Twisted relay that frames, ACKs and forwards each message to the sink over
   --parallel connections (bench/mllp_relay.py): the ceiling for end to end (two MLLP hops).
4. The engine (`hl7relay run`, durable SQLite, metrics on) on core 0 with a benchmark channel: a
   filter, three transformer steps, validation off and then on, one MLLP destination (per patient
   order, --parallel connections) to a sink on core 1; then with `--forwarding process` (the
   destination served by a forwarder process of its own, pinned to core 0 with the engine: every
   process of the engine shares one core, as the baselines do); then with no destination; then
   on PostgreSQL.
   Reported: msgs/s accepted and stored, ACK latency p50/p95/p99, end-to-end msgs/s through the
   destination, RSS (every process of the engine together), the ratios to the baselines, and the
   CPU the engine used per message, all its processes together (from the load's start until the
   last delivery: steadier than msgs/s on a shared VM, whose disk sync time moves run to run).

Targets (issue #15), ratios within each round so that the VM's mood cancels out: stored and
ACKed >= 50% of raw durable (>= 65% without a destination), end to end >= 40% of the raw relay,
ACK p99 <= 2x raw durable's, validation on <= 150 µs CPU more than off, the PostgreSQL row >= 3x
the 330 msgs/s it had, RSS of all engine processes <= 150 MB; instructions per message are
bench/engine_instructions.py's. The table says met / NOT MET for each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import adt_a01_1kb  # noqa: E402



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(core: int, argv: list[str]) -> list[str]:
    return (["taskset", "-c", str(core)] if shutil.which("taskset") and os.cpu_count() and os.cpu_count() > 1 else []) + argv


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def load(port: int, connections: int, per_connection: int, message: Path) -> dict:
    out = subprocess.run(pinned(1, [sys.executable, str(HERE / "loadgen.py"), "127.0.0.1", str(port), str(connections),
                                    str(per_connection), str(message)]), capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def start_sink(port: int, core: int, stats: Path) -> subprocess.Popen:
    process = subprocess.Popen(pinned(core, [sys.executable, str(HERE / "mllp_sink.py"), str(port), str(stats)]),
                               stdout=subprocess.PIPE, text=True)
    process.stdout.readline()
    return process


def sink_stats(process: subprocess.Popen, stats: Path) -> dict:
    stats.unlink(missing_ok=True)
    process.send_signal(signal.SIGUSR1)
    for _ in range(100):
        if stats.exists() and stats.stat().st_size:
            try:
                return json.loads(stats.read_text())
            except json.JSONDecodeError:
                pass
        time.sleep(0.02)
    return {"received": 0, "first": None, "last": None}


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def rss_mb(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU the process has used (Linux /proc): steadier than msgs/s on a shared VM."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The process's child processes (the engine's forwarder), from /proc."""
    found = []
    try:
        for task_dir in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task_dir / "children").read_text().split()]
    except OSError:
        pass
    return found


def tree_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of the process and of each of its children, by pid."""
    out = {}
    for p in [pid, *children(pid)]:
        try:
            out[p] = cpu_seconds(p)
        except OSError:
            pass
    return out


CHANNEL = """\
name: bench
source: {{type: mllp, port: {port}, max_connections: 256}}
filters: [{{message_type: ADT}}]
transformers:
  - set: {{path: MSH-5, value: LAB}}
  - upper: PID-5.1
  - map: {{path: PV1-2, table: {{I: IP, O: OP, E: ER}}, default: U}}
{validators}
destinations:
  - {{name: sink, type: mllp, host: 127.0.0.1, port: {sink}, retry_initial: 0.1, retry_max: 1,
     order: per_key, order_key: PID-3.1, parallel: {parallel}}}
"""


def end_to_end(engine_port: int, sink: subprocess.Popen, stats: Path, connections: int, per_connection: int,
               message: Path, server_pid: int | None = None) -> dict:
    """Warm up, then load; msgs/s ACKed and msgs/s that reached the sink, counted from the load's start.

    With ``server_pid``, also the CPU it used per message, from the load's start until the last delivery."""
    warm = load(engine_port, connections, max(50, per_connection // 20), message)["acked"]
    deadline = time.monotonic() + 60
    while sink is not None and sink_stats(sink, stats)["received"] < warm and time.monotonic() < deadline:
        time.sleep(0.1)  # the warm-up's deliveries must not be counted in the measured run
    cpu_before = tree_cpu_seconds(server_pid) if server_pid else {}
    if sink is None:  # no destination: stored and ACKed only
        result = load(engine_port, connections, per_connection, message)
        if server_pid:
            _cpu(result, server_pid, cpu_before)
        return result
    warm = sink_stats(sink, stats)["received"]
    result = load(engine_port, connections, per_connection, message)
    expected = warm + result["acked"]
    started = time.monotonic() - result["seconds"]
    deadline = time.monotonic() + 120
    delivered = sink_stats(sink, stats)
    while delivered["received"] < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        delivered = sink_stats(sink, stats)
    rate = (delivered["received"] - warm) / max(1e-9, (delivered["last"] or time.monotonic()) - started)
    result.update(end_to_end_msgs_per_s=rate, delivered=delivered["received"] - warm)
    if server_pid:
        _cpu(result, server_pid, cpu_before)
    return result


def _cpu(result: dict, pid: int, before: dict) -> None:
    """CPU per message of the server and of its children together, and of the server alone."""
    after = tree_cpu_seconds(pid)
    acked = max(1, result["acked"])
    result["cpu_us_per_msg"] = sum(after[p] - before.get(p, 0.0) for p in after) / acked * 1e6
    result["main_cpu_us_per_msg"] = (after.get(pid, 0.0) - before.get(pid, 0.0)) / acked * 1e6


def run_relay(work: Path, connections: int, per_connection: int, message: Path, parallel: int) -> dict:
    """The second baseline: frame + ACK + forward over `parallel` connections (bench/mllp_relay.py)."""
    relay_port, sink_port = free_port(), free_port()
    stats = work / "sink-relay.json"
    sink = start_sink(sink_port, 1, stats)
    relay = subprocess.Popen(pinned(0, [sys.executable, str(HERE / "mllp_relay.py"), str(relay_port), str(sink_port),
                                        str(parallel)]), stdout=subprocess.PIPE, text=True)
    try:
        relay.stdout.readline()
        return end_to_end(relay_port, sink, stats, connections, per_connection, message, relay.pid)
    finally:
        stop(relay)
        stop(sink)


def run_durable(work: Path, connections: int, per_connection: int, message: Path) -> dict:
    """The third baseline: frame + commit the bytes to SQLite with fsync + ACK (bench/mllp_durable.py)."""
    port = free_port()
    server = subprocess.Popen(pinned(0, [sys.executable, str(HERE / "mllp_durable.py"), str(port),
                                         str(work / "durable.db")]), stdout=subprocess.PIPE, text=True)
    try:
        server.stdout.readline()
        load(port, connections, max(50, per_connection // 20), message)
        before = cpu_seconds(server.pid)
        result = load(port, connections, per_connection, message)
        result["cpu_us_per_msg"] = (cpu_seconds(server.pid) - before) / max(1, result["acked"]) * 1e6
        return result
    finally:
        stop(server)


class TraceReader:
    """bench/trace_reader.py: a trace of everything, in and out, open on the engine for the whole
    run and every row read as ``hl7relay trace`` reads them, without printing them (issue #16: a
    trace costs the engine at most 5% of its throughput), on the load's core."""

    def __init__(self, folder: Path, data: Path, every: float = 0.5):
        deadline = time.monotonic() + 30
        while not (data / "api-endpoint").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # the admin listener starts after the channels
        self.process = subprocess.Popen(pinned(1, [sys.executable, str(HERE / "trace_reader.py"), str(data), str(every)]),
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "tracing"

    def stop(self) -> dict:
        time.sleep(1.0)  # the last rows
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=60)
        return json.loads(out.strip().splitlines()[-1])


def run_engine(work: Path, validation: bool, connections: int, per_connection: int, message: Path,
               parallel: int = 8, store: str | None = None, forwarding: str = "inline", destination: bool = True,
               trace: bool = False) -> dict:
    """The engine as deployed (``hl7relay run``), pinned to core 0 with every process it starts."""
    engine_port, sink_port = free_port(), free_port()
    name = f"{validation}-{'postgresql' if store else 'sqlite'}-{forwarding}-{destination}-{trace}"
    channels = work / f"channels-{name}"
    channels.mkdir()
    validators = "validators: [{structure: {on_error: warn}}]" if validation else ""
    text = CHANNEL.format(port=engine_port, sink=sink_port, validators=validators, parallel=parallel)
    (channels / "bench.yaml").write_text(text if destination else text.split("destinations:")[0])
    stats = work / f"sink-{name}.json"
    sink = start_sink(sink_port, 1, stats) if destination else None
    data = work / f"data-{name}"
    engine = subprocess.Popen(pinned(0, [sys.executable, "-m", "hl7relay", "run", "--channels", str(channels),
                                         "--data-dir", str(data), "--admin-port", str(free_port()),  # metrics on, as deployed
                                         "--console-port", "0", "--log-level", "error",
                                         *(["--forwarding", forwarding] if forwarding != "inline" else []),
                                         *(["--store", store] if store else [])]),
                              cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    reader = None
    try:
        wait_port(engine_port)
        if trace:
            reader = TraceReader(work, data)
        result = end_to_end(engine_port, sink, stats, connections, per_connection, message, engine.pid)
        if reader is not None:
            result.update(reader.stop())
        pids = [engine.pid, *children(engine.pid)]  # every process of the engine
        sizes = [rss_mb(pid) for pid in pids]
        result.update(rss_mb=sum(r for r, _ in sizes), rss_peak_mb=sum(p for _, p in sizes), processes=len(pids))
    finally:
        stop(engine)
        if sink is not None:
            stop(sink)
    return result


ROWS = (("baseline", "raw MLLP (frame + ACK)"), ("durable_baseline", "raw durable (+ fsync)"),
        ("relay_baseline", "raw relay (+ forward)"), ("engine_validation_off", "engine, validation off"),
        ("engine_validation_on", "engine, validation on"), ("engine_forwarder", "engine, forwarder process"),
        ("engine_no_destination", "engine, no destination"), ("engine_tracing", "engine, a trace open (val. off)"),
        ("engine_postgresql", "engine, PostgreSQL (val. off)"))
PG_BEFORE_MSGS_PER_S = 330  # the PostgreSQL row when issue #15 was written: its target is 3x that


def targets(summary: dict) -> list[tuple[str, str, str, bool]]:
    """Issue #15's targets, as (what, figure, target, met), from one summary's medians."""
    durable = summary["durable_baseline"]
    out = []
    for key in ("engine_validation_off", "engine_forwarder"):
        r = summary.get(key)
        if r is None:
            continue
        label = "inline" if key == "engine_validation_off" else "forwarder process"
        out.append((f"stored+ACKed vs raw durable ({label})", f"{r['vs_durable']:.0%}", ">= 50%", r["vs_durable"] >= 0.5))
        out.append((f"end to end vs raw relay ({label})", f"{r['vs_relay']:.0%}", ">= 40%", r["vs_relay"] >= 0.4))
        out.append((f"ACK p99 vs raw durable p99 ({label})", f"{r['p99_ms'] / durable['p99_ms']:.1f}x", "<= 2x",
                    r["p99_ms"] <= 2 * durable["p99_ms"]))
    if "engine_no_destination" in summary:
        r = summary["engine_no_destination"]
        out.append(("stored+ACKed, no destination, vs raw durable", f"{r['vs_durable']:.0%}", ">= 65%", r["vs_durable"] >= 0.65))
    if "engine_validation_on" in summary:
        extra = summary["engine_validation_on"]["cpu_us_per_msg"] - summary["engine_validation_off"]["cpu_us_per_msg"]
        out.append(("validation on: extra CPU per message", f"{extra:.0f} µs", "<= 150 µs", extra <= 150))
    if "engine_postgresql" in summary:
        r = summary["engine_postgresql"]
        out.append(("PostgreSQL store: msgs/s", f"{r['msgs_per_s']:.0f}", f">= {3 * PG_BEFORE_MSGS_PER_S}",
                    r["msgs_per_s"] >= 3 * PG_BEFORE_MSGS_PER_S))
    if "tracing_cost" in summary:  # issue #16: the tracer under load
        cost = summary["tracing_cost"]["median"]
        out.append(("a trace open: throughput lost (issue #16)", f"{cost:.1%}", "<= 5%", cost <= 0.05))
    peak = max(r["rss_peak_mb"] for key, r in summary.items() if key.startswith("engine"))
    out.append(("RSS of all engine processes (peak)", f"{peak:.0f} MB", "<= 150 MB", peak <= 150))
    return out


def run_engine_postgresql(work: Path, args, message: Path) -> dict | None:
    """The engine with its store on PostgreSQL (a schema of its own, dropped after), validation
    off; None when no server answers at --postgres."""
    import uuid

    import sqlalchemy as sa

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    try:
        admin = sa.create_engine(args.postgres)
        with admin.begin() as connection:
            connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    except Exception as exc:  # noqa: BLE001 - no server: no row
        print(f"PostgreSQL row skipped: {type(exc).__name__}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return None
    url = args.postgres + ("&" if "?" in args.postgres else "?") + f"options=-csearch_path%3D{schema}"
    try:
        return run_engine(work, False, args.connections, args.messages, message, args.parallel, store=url)
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")


def one_round(work: Path, args, message: Path) -> dict:
    """Every server once, one after the other, and each one's ratios to the baselines of this round."""
    work.mkdir()
    port, stats = free_port(), work / "raw.json"
    raw_server = start_sink(port, 0, stats)
    try:
        load(port, args.connections, 200, message)
        results = {"baseline": load(port, args.connections, args.messages, message)}
    finally:
        stop(raw_server)
    results["durable_baseline"] = run_durable(work, args.connections, args.messages, message)
    results["relay_baseline"] = run_relay(work, args.connections, args.messages, message, args.parallel)
    engines = {
        "engine_validation_off": lambda: run_engine(work, False, args.connections, args.messages, message, args.parallel),
        "engine_validation_on": lambda: run_engine(work, True, args.connections, args.messages, message, args.parallel),
        "engine_forwarder": lambda: run_engine(work, False, args.connections, args.messages, message, args.parallel,
                                               forwarding="process"),
        "engine_no_destination": lambda: run_engine(work, False, args.connections, args.messages, message,
                                                    args.parallel, destination=False),
        "engine_tracing": lambda: run_engine(work, False, args.connections, args.messages, message, args.parallel,
                                             trace=True),
    }
    for key, run in engines.items():
        if args.rows is None or key in args.rows or key == "engine_validation_off":  # the ratios' reference
            results[key] = run()
    if args.postgres and (args.rows is None or "engine_postgresql" in args.rows):
        postgresql = run_engine_postgresql(work, args, message)
        if postgresql is not None:
            results["engine_postgresql"] = postgresql
    raw, durable, relay = results["baseline"], results["durable_baseline"], results["relay_baseline"]
    for key, r in results.items():
        r["vs_raw"] = r["msgs_per_s"] / raw["msgs_per_s"]
        if key == "durable_baseline" or key.startswith("engine"):
            r["vs_durable"] = r["msgs_per_s"] / durable["msgs_per_s"]
        if "end_to_end_msgs_per_s" in r:
            r["vs_relay"] = r["end_to_end_msgs_per_s"] / relay["end_to_end_msgs_per_s"]
    return results


def summarize(runs: list[dict]) -> dict:
    """Per server: the median of every figure over the rounds, the range of msgs/s, the worst RSS,
    and the answers and deliveries of all rounds together."""
    summary = {}
    for key, _ in ROWS:
        rounds = [run[key] for run in runs if key in run]
        if not rounds:
            continue
        merged = {}
        for field, value in rounds[0].items():
            if field == "answers":
                merged[field] = {code: sum(r[field].get(code, 0) for r in rounds) for code in rounds[0][field]}
            elif field in ("sent", "acked", "delivered"):
                merged[field] = sum(r[field] for r in rounds)
            elif field == "rss_peak_mb":
                merged[field] = max(r[field] for r in rounds)
            elif isinstance(value, (int, float)):
                merged[field] = statistics.median(r[field] for r in rounds)
        merged["msgs_per_s_range"] = (min(r["msgs_per_s"] for r in rounds), max(r["msgs_per_s"] for r in rounds))
        summary[key] = merged
    # a trace's cost, round by round (the two rows of a round ran minutes apart on the same VM,
    # the rounds maybe not): the median of those, not the ratio of two medians
    paired = [1 - run["engine_tracing"]["msgs_per_s"] / run["engine_validation_off"]["msgs_per_s"]
              for run in runs if "engine_tracing" in run and "engine_validation_off" in run]
    if paired:
        summary["tracing_cost"] = {"median": statistics.median(paired), "rounds": paired}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--messages", type=int, default=2500, help="per connection")
    parser.add_argument("--parallel", type=int, default=8, help="the destination's deliveries in flight (connections)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every server; figures are the medians (a VM's disk and scheduling move "
                             "single runs by tens of percent)")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument("--rows", type=lambda text: set(text.split(",")), metavar="ROW,ROW",
                        help="only these engine rows (the baselines and engine_validation_off always run), e.g. "
                             "engine_tracing")
    parser.add_argument("--postgres", default=os.environ.get("HL7RELAY_TEST_POSTGRES_URL",
                                                            "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
                        help="a PostgreSQL database for the engine row on PostgreSQL ('' skips it)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hl7relay-bench-"))
    message = work / "message.hl7"
    # every message its own control id; patients spread over 250 per connection (order is kept per patient)
    message.write_bytes(adt_a01_1kb().replace(b"MSG00001", b"@@ID@@").replace(b"|100234^", b"|@@PID@@^")
                        .replace(b"|AL|NE|", b"|||"))
    try:
        runs = [one_round(work / f"round-{i}", args, message) for i in range(args.repeat)]
        size = message.stat().st_size
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(runs)
    print(f"{args.connections} connections x {args.messages} messages of {size} B; engine on core 0, load on core 1"
          + (f"; medians of {args.repeat} rounds" if args.repeat > 1 else ""))
    print(f"{'':26}{'msgs/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'e2e/s':>9}{'RSS MB':>9}{'vs raw':>8}"
          f"{'vs durable':>11}{'vs relay':>9}{'CPU µs':>8}" + ("   msgs/s range" if args.repeat > 1 else ""))
    for key, name in ROWS:
        if key not in summary:
            continue
        r = summary[key]
        low, high = r["msgs_per_s_range"]
        print(f"{name:26}{r['msgs_per_s']:9.0f}{r['p50_ms']:9.2f}{r['p95_ms']:9.2f}{r['p99_ms']:9.2f}"
              + (f"{r['end_to_end_msgs_per_s']:9.0f}" if "end_to_end_msgs_per_s" in r else f"{'':9}")
              + (f"{r['rss_mb']:9.1f}" if "rss_mb" in r else f"{'':9}")
              + f"{r['vs_raw']:8.0%}"
              + (f"{r['vs_durable']:11.0%}" if "vs_durable" in r else f"{'':11}")
              + (f"{r['vs_relay']:9.0%}" if "vs_relay" in r else f"{'':9}")
              + (f"{r['cpu_us_per_msg']:8.0f}" if "cpu_us_per_msg" in r else f"{'':8}")
              + (f"   {low:,.0f}–{high:,.0f}" if args.repeat > 1 else ""))
    for key, name in ROWS:
        r = summary.get(key)
        if r is not None and key.startswith("engine"):
            forwarder = f"; the forwarder's share of the CPU {1 - r['main_cpu_us_per_msg'] / r['cpu_us_per_msg']:.0%}" \
                if r.get("processes", 1) > 1 else ""
            traced = f"; trace rows read {r['trace_rows']:.0f}, dropped {r['trace_dropped']:.0f}" if "trace_rows" in r else ""
            print(f"{name}: answers {r['answers']}" + (f", delivered {r['delivered']}/{r['acked']}" if "delivered" in r else "")
                  + forwarder + traced)
    if "tracing_cost" in summary:
        print("a trace open, throughput lost round by round: "
              + ", ".join(f"{cost:.1%}" for cost in summary["tracing_cost"]["rounds"]))
    print(f"\n{'target (issues #15, #16)':48}{'figure':>10}{'target':>12}")
    met = targets(summary)
    for what, figure, target, ok in met:
        print(f"{what:48}{figure:>10}{target:>12}  {'met' if ok else 'NOT MET'}")
    summary["targets"] = [{"what": w, "figure": f, "target": t, "met": ok} for w, f, t, ok in met]
    if args.json:
        Path(args.json).write_text(json.dumps({"connections": args.connections, "messages": args.connections * args.messages,
                                               "message_bytes": size, "repeat": args.repeat, "median": summary,
                                               "rounds": runs}, indent=2))


if __name__ == "__main__":
    main()
