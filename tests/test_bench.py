"""The benchmarks keep working: bench_pipeline runs the benchmark channel end to end in one process and
checks that every message was stored, ACKed and delivered (its own assertions), so it cannot rot unseen."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_bench_pipeline_stores_acks_and_delivers_every_message():
    result = subprocess.run([sys.executable, str(BENCH / "bench_pipeline.py"), "--rounds", "3", "--repeat", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validation off:" in result.stdout and "µs CPU per message" in result.stdout
