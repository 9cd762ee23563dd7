"""Transformer steps over repeated segments: the cost per OBX of one ``OBX[*]`` step against one
single-path step per OBX (``OBX[1]``, ``OBX[2]``, ...), measured in the same run.

    python bench/bench_transformers.py [--results 1,10,100]

Each call parses a fresh ORU (as on the wire) and applies the channel's steps; the parse alone is
measured too and taken off, so the figures are the steps' own cost. The target (issue #26): a
``[*]`` step costs no more per OBX than a single-path step does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import per_call_us  # noqa: E402

from hl7relay import Message  # noqa: E402
from hl7relay.channels import load_channel  # noqa: E402

STEPS = {  # one step kind each: a lookup, a plain write, a read-modify-write
    "map": '  - map: {{path: "OBX[{n}]-6.2", table: {{"10*3/uL": K/uL}}}}\n',
    "set": '  - set: {{path: "OBX[{n}]-11", value: C}}\n',
    "upper": '  - upper: "OBX[{n}]-3.2"\n',
}


def oru(results: int) -> str:
    head = ("MSH|^~\\&|LAB|LABFAC|PMS|CLINIC|20240105160000||ORU^R01^ORU_R01|T1|P|2.5.1\r"
            "PID|1||100234^^^CLINIC^MR||DOE^JANE\rOBR|1|ORD1|LAB1|58410-2^CBC panel^LN|||20240105090000\r")
    return head + "".join(f"OBX|{n}|NM|{n}-1^Test {n}^LN||7.2|10*3/uL^10*3/uL^UCUM|4.0-11.0|N|||F\r"
                          for n in range(1, results + 1))


def steps_of(folder: Path, body: str) -> list:
    path = folder / "bench.yaml"
    path.write_text("name: bench\nsource: {type: mllp, port: 0}\ntransformers:\n" + body +
                    "destinations: [{name: d, type: file, directory: out}]\n")
    channel, errors = load_channel(path, {})
    assert not errors, errors
    return channel.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="1,10,100", help="OBX counts, comma-separated")
    args = parser.parse_args()
    print(f"{'step':6} {'OBX':>4} {'[*] µs/OBX':>11} {'one path per OBX µs/OBX':>24} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as folder:
        for kind, template in STEPS.items():
            for results in (int(n) for n in args.results.split(",")):
                text = oru(results)
                number = max(200, 20000 // results)
                parse = per_call_us(lambda text=text: Message(text).to_text(), number=number)
                star = steps_of(Path(folder), template.format(n="*"))
                each = steps_of(Path(folder), "".join(template.format(n=n) for n in range(1, results + 1)))

                def run(steps, text=text):
                    message = Message(text)
                    for step in steps:
                        step.apply(message)
                    return message.to_text()

                # the same edits both ways, and every OBX changed: otherwise the figures compare nothing
                assert run(star) == run(each) != text, kind
                star_us = (per_call_us(lambda star=star: run(star), number=number) - parse) / results
                each_us = (per_call_us(lambda each=each: run(each), number=number) - parse) / results
                print(f"{kind:6} {results:>4} {star_us:>11.2f} {each_us:>24.2f} {star_us / each_us:>6.2f}")


if __name__ == "__main__":
    main()
