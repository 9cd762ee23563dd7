"""HL7 v2 → FHIR conversion cost per message, beside the channel's cost without it (same run).

    python bench/bench_fhir.py [--instructions]

For ADT_A01 (the 1 KB message of the other benches), SIU_S12 and ORU_R01 (the samples): the
channel without conversion (parse, a filter, a set step, a file destination's copy) and the same
channel with a ``fhir`` transformer on that destination (a transaction Bundle, serialized as it
is stored). The difference is the conversion's own cost. ``--instructions`` counts instructions
per conversion with callgrind (valgrind), repeatable to about 1% whatever the machine does.
Target (issue #28): the conversion adds no more than 1x the engine's CPU per message without it
(bench_engine.py's figure: the channel plus the store, the MLLP answer and the delivery).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import SAMPLES, adt_a01_1kb, per_call_us  # noqa: E402

from hl7relay import Message  # noqa: E402
from hl7relay.channels import load_channel, process  # noqa: E402

MESSAGES = {"ADT_A01": adt_a01_1kb, "SIU_S12": lambda: (SAMPLES / "siu_s12.hl7").read_bytes(),
            "ORU_R01": lambda: (SAMPLES / "oru_r01.hl7").read_bytes()}
CHANNEL = """name: bench
timezone: America/New_York
source: {{type: mllp, port: 0}}
filters: [{{field: {{path: MSH-11, equals: P}}}}]
transformers: [{{set: {{path: MSH-5, value: LAB}}}}]
destinations:
  - name: d
    type: file
    directory: out
{steps}"""


def channel(folder: Path, fhir: bool):
    path = folder / ("fhir.yaml" if fhir else "plain.yaml")
    path.write_text(CHANNEL.format(steps="    transformers: [{fhir: {bundle: transaction}}]\n" if fhir else ""))
    loaded, errors = load_channel(path, {})
    assert not errors, errors
    return loaded


def run_once(loaded, data: bytes) -> bytes:
    processed = process(loaded, Message.from_bytes(data))
    return processed.outputs[0].message.to_bytes()


def instructions(name: str, fhir: bool, count: int) -> int:
    """callgrind's total for ``count`` runs, less its total for none (start-up, imports)."""
    totals = []
    for n in (0, count):
        with tempfile.TemporaryDirectory() as out:
            target = Path(out) / "cg.out"
            subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={target}", sys.executable,
                            __file__, "--inner", name, "--count", str(n)] + (["--fhir"] if fhir else []),
                           check=True, capture_output=True, env=dict(os.environ, PYTHONHASHSEED="0"))
            text = target.read_text(errors="replace")
            totals.append(int(re.search(r"^totals: (\d+)", text, re.M).group(1)))
    return (totals[1] - totals[0]) // count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instructions", action="store_true", help="count instructions with callgrind too")
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--fhir", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        if args.inner:  # one measured process under callgrind
            loaded = channel(Path(folder), args.fhir)
            data = MESSAGES[args.inner]()
            run_once(loaded, data)  # the maps loaded, caches warm: not counted
            for _ in range(args.count):
                run_once(loaded, data)
            return
        plain, fhir = channel(Path(folder), False), channel(Path(folder), True)
        print(f"{'message':8} {'bytes':>6} {'channel µs':>11} {'with fhir µs':>13} {'conversion µs':>14} {'ratio':>6}"
              + (f" {'channel Minstr':>15} {'conversion Minstr':>18}" if args.instructions else ""))
        for name, make in MESSAGES.items():
            data = make()
            base = per_call_us(lambda data=data: run_once(plain, data), number=500)
            with_fhir = per_call_us(lambda data=data: run_once(fhir, data), number=500)
            line = (f"{name:8} {len(data):>6} {base:>11.1f} {with_fhir:>13.1f} {with_fhir - base:>14.1f} "
                    f"{(with_fhir - base) / base:>5.1f}x")
            if args.instructions:
                if not shutil.which("valgrind"):
                    sys.exit("--instructions needs valgrind")
                plain_i = instructions(name, False, 50)
                fhir_i = instructions(name, True, 50)
                line += f" {plain_i / 1e6:>15.3f} {(fhir_i - plain_i) / 1e6:>18.3f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
