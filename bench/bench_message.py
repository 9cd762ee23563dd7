"""Message model micro-benchmarks: µs per 1 KB ADT^A01, next to python-hl7's hl7.parse.

    python bench/bench_message.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import adt_a01_1kb, per_call_us  # noqa: E402

from hl7relay import Message  # noqa: E402

FIVE = ("PID-3.1", "PID-5.1", "PID-7", "PID-8", "PV1-3.1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    data = adt_a01_1kb()
    text = data.decode()

    def read_msh():
        m = Message.from_bytes(data)
        return m.get("MSH-9"), m.get("MSH-10"), m.get("MSH-12")

    def read_five():
        m = Message.from_bytes(data)
        return [m.get(p) for p in FIVE]

    def set_two_and_serialize():
        m = Message.from_bytes(data)
        m.set("PID-5.1", "SMITH")
        m.set("PV1-2", "I")
        return m.to_bytes()

    results = {
        "message_bytes": len(data),
        "read_msh_us": per_call_us(read_msh),
        "read_5_fields_us": per_call_us(read_five),
        "set_2_fields_and_serialize_us": per_call_us(set_two_and_serialize),
    }
    try:
        import hl7
    except ImportError:
        results["hl7_parse_us"] = None
    else:
        reference = text.rstrip("\r")
        results["hl7_parse_us"] = per_call_us(lambda: hl7.parse(reference), number=300)
    results["python"] = platform.python_version()

    print(f"message model, {results['message_bytes']} byte ADT^A01 (bytes in, decoded by MSH-18), µs per message:")
    print(f"  read MSH-9/10/12               {results['read_msh_us']:8.1f}")
    print(f"  read 5 fields                  {results['read_5_fields_us']:8.1f}")
    print(f"  set 2 fields + serialize       {results['set_2_fields_and_serialize_us']:8.1f}")
    if results["hl7_parse_us"] is not None:
        print(f"  hl7.parse (python-hl7), same run {results['hl7_parse_us']:6.1f}"
              f"   ({results['hl7_parse_us'] / results['read_5_fields_us']:.0f}x read 5 fields)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
