"""A batch file imported by the file source, beside the same channel's MLLP path in the same run.

    python bench/bench_files.py [--messages 100000] [--connections 1,8] [--mllp-messages 20000]

One engine (`hl7relay run`, durable SQLite, metrics on, pinned to core 0) with two channels of the
same pipeline (a filter, three transformer steps, no destination: stored only):

1. `bench-mllp`: the load generator (bench/loadgen.py, core 1) sends --mllp-messages of the 1 KB
   ADT^A01 over each number of --connections, each waiting for every ACK: msgs/s stored and ACKed,
   and the engine's CPU per message.
2. `bench-files`: a batch file of --messages of the same message (FHS/BHS ... BTS/FTS) is dropped
   into the file source's folder (written as .part, then renamed: complete: rename); timed from
   the rename to the ledger's `done`: msgs/s stored, CPU per message, and the engine's peak RSS
   before and after (the file is split as a stream: memory must not grow with it).

Target (issue #29): the file import >= 100% of the MLLP path's msgs/s (a file needs no ACK round
trip), against the fastest MLLP row; peak RSS not growing with the file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import adt_a01_1kb  # noqa: E402
from bench_engine import cpu_seconds, free_port, load, pinned, rss_mb, stop, wait_port  # noqa: E402

PIPELINE = """\
filters: [{message_type: ADT}]
transformers:
  - set: {path: MSH-5, value: LAB}
  - upper: PID-5.1
  - map: {path: PV1-2, table: {I: IP, O: OP, E: ER}, default: U}
"""


def batch_file(path: Path, count: int, template: bytes) -> int:
    """FHS/BHS, ``count`` messages with their own control ids, BTS/FTS; written in pieces."""
    with open(path, "wb") as out:
        out.write(b"FHS|^~\\&|PMS|CLINIC\rBHS|^~\\&|PMS|CLINIC\r")
        for n in range(count):
            out.write(template.replace(b"@@ID@@", f"F{n:07d}".encode()).replace(b"@@PID@@", f"P{n % 250:03d}".encode()))
        out.write(f"BTS|{count}\rFTS|1\r".encode())
    return path.stat().st_size


def ledger_state(db: Path) -> str | None:
    try:
        with sqlite3.connect(db, timeout=30) as connection:
            row = connection.execute("SELECT state FROM file_ledger ORDER BY id DESC LIMIT 1").fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000, help="messages in the batch file")
    parser.add_argument("--mllp-messages", type=int, default=20_000, help="messages sent over MLLP per round")
    parser.add_argument("--connections", default="1,8", help="MLLP connections, one round each")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hl7relay-bench-files-"))
    try:
        results = run(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def run(work: Path, args) -> dict:
    template = (adt_a01_1kb().replace(b"MSG00001", b"@@ID@@").replace(b"|100234^", b"|@@PID@@^")
                .replace(b"|AL|NE|", b"|||"))
    message = work / "message.hl7"
    message.write_bytes(template)
    channels, inbox, data = work / "channels", work / "inbox", work / "data"
    channels.mkdir()
    inbox.mkdir()
    port = free_port()
    (channels / "mllp.yaml").write_text(f"name: bench-mllp\nsource: {{type: mllp, port: {port}, max_connections: 256}}\n"
                                        + PIPELINE)
    (channels / "files.yaml").write_text(f"name: bench-files\nsource: {{type: file, directory: '{inbox}', glob: '*.hl7', "
                                         f"complete: rename, poll_interval: 0.1}}\n" + PIPELINE)
    size = batch_file(work / "batch.part", args.messages, template)
    engine = subprocess.Popen(pinned(0, [sys.executable, "-m", "hl7relay", "run", "--channels", str(channels),
                                         "--data-dir", str(data), "--admin-port", str(free_port()),
                                         "--console-port", "0", "--log-level", "error"]),
                              cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    results: dict = {"messages": args.messages, "file_bytes": size, "message_bytes": len(template), "mllp": {}}
    try:
        wait_port(port)
        for connections in [int(c) for c in args.connections.split(",")]:
            load(port, connections, 200, message)  # warm-up
            before = cpu_seconds(engine.pid)
            result = load(port, connections, max(1, args.mllp_messages // connections), message)
            result["cpu_us_per_msg"] = (cpu_seconds(engine.pid) - before) / max(1, result["acked"]) * 1e6
            results["mllp"][connections] = result
        results["rss_before_mb"] = rss_mb(engine.pid)[1]
        before = cpu_seconds(engine.pid)
        os.rename(work / "batch.part", inbox / "batch.hl7")
        started = time.monotonic()
        deadline = started + 3600
        while ledger_state(data / "hl7relay.db") not in ("done", "errors"):
            if time.monotonic() > deadline or engine.poll() is not None:
                raise RuntimeError("the file import did not finish")
            time.sleep(0.05)
        seconds = time.monotonic() - started
        results["file"] = {"seconds": seconds, "msgs_per_s": args.messages / seconds,
                           "cpu_us_per_msg": (cpu_seconds(engine.pid) - before) / args.messages * 1e6,
                           "state": ledger_state(data / "hl7relay.db")}
        results["rss_after_mb"] = rss_mb(engine.pid)[1]
    finally:
        stop(engine)
    return results


def report(results: dict) -> None:
    print(f"{'path':<34} {'msgs/s':>9} {'µs CPU/msg':>11} {'ACK p99 ms':>11}")
    for connections, r in results["mllp"].items():
        print(f"{'MLLP, ' + str(connections) + ' connection(s)':<34} {r['msgs_per_s']:>9.0f} {r['cpu_us_per_msg']:>11.0f} "
              f"{r['p99_ms']:>11.2f}")
    f = results["file"]
    print(f"{'file, ' + format(results['messages'], ',') + ' messages':<34} {f['msgs_per_s']:>9.0f} "
          f"{f['cpu_us_per_msg']:>11.0f} {'-':>11}")
    best = max(r["msgs_per_s"] for r in results["mllp"].values())
    ratio = f["msgs_per_s"] / best
    print(f"\nfile import vs the fastest MLLP row: {ratio:.0%} (target >= 100%: {'met' if ratio >= 1 else 'NOT MET'})")
    growth = results["rss_after_mb"] - results["rss_before_mb"]
    print(f"peak RSS: {results['rss_before_mb']:.0f} MB before the file, {results['rss_after_mb']:.0f} MB after "
          f"({growth:+.0f} MB for a {results['file_bytes'] / 1e6:.0f} MB file)")


if __name__ == "__main__":
    main()
