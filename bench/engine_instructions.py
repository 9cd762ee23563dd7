"""Instructions the engine executes per message under real MLLP load, counted by callgrind.

    python bench/engine_instructions.py [--validation] [--messages 200] [--connections 8] [--trace]

msgs/s over loopback on a shared VM moves by tens of percent from run to run, and
bench_pipeline.py (one process, no sockets) leaves out the reactor, the socket writes and the
MLLP sender. This runs `hl7relay run` under valgrind's callgrind with the benchmark channel of
bench_engine.py (durable SQLite, metrics on, an MLLP destination to bench/mllp_sink.py), warms
it up, zeroes the counters, sends --connections x --messages messages, waits until the sink has
every one, and reads the counters: user-space instructions per message, repeatable to about 1%
whatever else the machine does, so two versions of the engine can be compared exactly. Time in
the kernel and waiting on the disk are not in it (bench_engine.py reports those). The engine runs
~50x slower under valgrind: the default takes a few minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import adt_a01_1kb  # noqa: E402
from bench_engine import CHANNEL, TraceReader, children, free_port, load, sink_stats, start_sink, stop, wait_port  # noqa: E402


def wait_delivered(sink, stats: Path, expected: int, timeout: float = 1800) -> None:
    deadline = time.monotonic() + timeout
    while sink_stats(sink, stats)["received"] < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the sink has not received {expected} messages")
        time.sleep(0.5)


def callgrind(pid: int, option: str) -> None:
    subprocess.run(["callgrind_control", option, str(pid)], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--validation", action="store_true")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--messages", type=int, default=200, help="per connection, measured")
    parser.add_argument("--forwarding", choices=("inline", "process"), default="inline",
                        help="process: the forwarder process is counted too, on its own line")
    parser.add_argument("--trace", action="store_true",
                        help="with a trace of everything open and every row read (bench/trace_reader.py), as "
                             "bench_engine.py's tracing row: what a trace costs, in instructions (issue #16)")
    args = parser.parse_args()
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        sys.exit("needs valgrind (with callgrind_control)")
    work = Path(tempfile.mkdtemp(prefix="hl7relay-instructions-"))
    message = work / "message.hl7"
    message.write_bytes(adt_a01_1kb().replace(b"MSG00001", b"@@ID@@").replace(b"|100234^", b"|@@PID@@^")
                        .replace(b"|AL|NE|", b"|||"))
    engine_port, sink_port = free_port(), free_port()
    channels = work / "channels"
    channels.mkdir()
    validators = "validators: [{structure: {on_error: warn}}]" if args.validation else ""
    (channels / "bench.yaml").write_text(CHANNEL.format(port=engine_port, sink=sink_port, validators=validators,
                                                        parallel=8))
    stats = work / "sink.json"
    sink = start_sink(sink_port, 1, stats)
    process = args.forwarding == "process"
    engine = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={work / 'callgrind.out.%p'}",
         *(["--trace-children=yes"] if process else []), sys.executable, "-m", "hl7relay", "run",
         "--channels", str(channels), "--data-dir", str(work / "data"), "--admin-port", str(free_port()),
         "--console-port", "0", "--log-level", "error", *(["--forwarding", "process"] if process else [])],
        cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONHASHSEED": "0"})
    reader = None
    try:
        wait_port(engine_port, timeout=300)
        warm = load(engine_port, args.connections, 30, message)["acked"]  # caches, first connections
        wait_delivered(sink, stats, warm)
        time.sleep(1)  # the lazy delivery records and a queue poll settle
        # a page every 25 s when not full: under valgrind the rows come ~50x slower, so that a
        # request carries about the 1,000 rows it carries at full speed (~1.5 M instructions each)
        if args.trace:
            reader = TraceReader(work, work / "data", every=25)
        pids = {"engine's process": engine.pid}
        if process:
            [pids["forwarder process"]] = children(engine.pid)
        for pid in pids.values():
            callgrind(pid, "--zero")
        measured = load(engine_port, args.connections, args.messages, message)
        wait_delivered(sink, stats, warm + measured["acked"])
        if reader is not None:
            trace = reader.stop()  # (reads the last rows before the counters are read)
            assert trace["trace_dropped"] == 0 and trace["trace_rows"] >= 2 * measured["acked"], trace
        for pid in pids.values():
            callgrind(pid, "--dump")
        time.sleep(1)
        instructions = {}
        for name, pid in pids.items():
            dumps = sorted(work.glob(f"callgrind.out.{pid}*"), key=lambda p: p.stat().st_mtime)
            totals = [int(m.group(1)) for p in dumps if (m := re.search(r"^(?:summary|totals): (\d+)", p.read_text(),
                                                                          re.MULTILINE))]
            instructions[name] = totals[-1]
    finally:
        if reader is not None and reader.process.poll() is None:
            reader.process.kill()
        stop(engine)
        stop(sink)
        shutil.rmtree(work, ignore_errors=True)
    count = measured["acked"]
    if reader is not None:
        print(f"trace: {trace['trace_rows']} rows read in {trace['trace_requests']} requests")
    for name, total in instructions.items():
        print(f"validation {'on' if args.validation else 'off'}{', a trace open and read' if args.trace else ''}: "
              f"{total / count / 1e6:.3f} M instructions per message "
              f"in the {name} ({count} messages in, stored, ACKed, delivered; answers {measured['answers']})")


if __name__ == "__main__":
    main()
