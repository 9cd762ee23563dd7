"""Validation throughput: messages/s for structure + datatype validation of 1 KB messages.

Target (issue #2): at least 5,000 messages/s on one core. Every message is a fresh parse, as it
would be on the wire. Also measures the corpus mix when ../shared/corpus is present.

    python bench/bench_validate.py [--cold] [--json FILE]

The validator remembers field values it found clean (per version and delimiters: headers, codes,
facilities, clinicians repeat in real traffic). These loops repeat their messages, so nearly every
field is answered from that memory; --cold turns it off and measures values never seen before.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SAMPLES, adt_a01_1kb, per_call_us  # noqa: E402

from hl7relay import Message, split_messages  # noqa: E402
from hl7relay.validation import Validator  # noqa: E402

TARGET = 5000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--cold", action="store_true",
                        help="remember no clean field values (each run here repeats its messages, so the memory "
                             "answers nearly every field; --cold is the cost of values never seen before)")
    args = parser.parse_args()
    validator = Validator()
    results = {}
    if args.cold:
        from hl7relay.validation.profile import Profile

        Profile.clean_values = lambda self, delimiters, strict=False: {}  # nothing remembered: every value checked
        print("field values remembered as clean: off (--cold)")
    cases = {"ADT^A01 1 KB": adt_a01_1kb(), "ORU^R01": (SAMPLES / "oru_r01.hl7").read_bytes(),
             "SIU^S12": (SAMPLES / "siu_s12.hl7").read_bytes()}
    start = time.perf_counter()
    for data in cases.values():
        validator.validate(Message.from_bytes(data))  # compile the definitions once, outside the timing
    compile_ms = (time.perf_counter() - start) * 1000
    print(f"validation (parse + structure + fields + datatypes), first use compiled v2.5.1 in {compile_ms:.0f} ms")
    for name, data in cases.items():
        report = validator.validate(Message.from_bytes(data))
        assert report.valid, [str(f) for f in report.findings]
        us = per_call_us(lambda data=data: validator.validate(Message.from_bytes(data)), number=1000)
        results[name] = {"bytes": len(data), "us_per_message": us, "messages_per_s": 1e6 / us}
        verdict = "ok" if 1e6 / us >= TARGET else f"BELOW the {TARGET}/s target"
        print(f"  {name:14s} {len(data):5d} B  {us:7.1f} µs  {1e6 / us:8.0f} msgs/s  {verdict}")
    corpus = SAMPLES.parent.parent / "shared" / "corpus"
    if corpus.is_dir():
        chunks = [c.data for f in sorted(corpus.glob("*.hl7")) for c in split_messages(f.read_bytes()).messages]
        for data in chunks:
            validator.validate(Message.from_bytes(data))
        start = time.perf_counter()
        for _ in range(3):
            for data in chunks:
                validator.validate(Message.from_bytes(data))
        elapsed = time.perf_counter() - start
        rate = 3 * len(chunks) / elapsed
        total = sum(map(len, chunks))
        results["corpus"] = {"messages": len(chunks), "mean_bytes": total / len(chunks), "messages_per_s": rate}
        print(f"  corpus mix     {len(chunks)} messages, mean {total / len(chunks):.0f} B: {rate:8.0f} msgs/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
