"""MLLP load: N connections, each sending messages back to back and waiting for each ACK.

    python bench/loadgen.py HOST PORT CONNECTIONS MESSAGES_PER_CONNECTION MESSAGE_FILE
Prints JSON: sent, acked, non-AA answers, seconds, msgs/s and ACK latency percentiles (ms).
"""

import asyncio
import json
import sys
import time

VT, END = b"\x0b", b"\x1c\x0d"


async def connection(host, port, template, prefix, count, latencies, answers):
    reader, writer = await asyncio.open_connection(host, port)
    buffer = b""
    for i in range(count):
        control_id = f"{prefix}{i:07d}".encode()
        patient = f"{prefix}{i % 250:03d}".encode()
        writer.write(VT + template.replace(b"@@ID@@", control_id).replace(b"@@PID@@", patient) + END)
        started = time.perf_counter()
        while END not in buffer:
            chunk = await reader.read(65536)
            if not chunk:
                raise ConnectionError("closed by the server")
            buffer += chunk
        ack, buffer = buffer.split(END, 1)
        latencies.append(time.perf_counter() - started)
        code = ack.split(b"MSA|", 1)[1][:2] if b"MSA|" in ack else b"??"
        answers[code] = answers.get(code, 0) + 1
    writer.close()


async def main():
    host, port, connections, per_connection, message_file = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    template = open(message_file, "rb").read()
    latencies, answers = [], {}
    started = time.perf_counter()
    await asyncio.gather(*(connection(host, port, template, f"L{c}-", per_connection, latencies, answers)
                           for c in range(connections)))
    seconds = time.perf_counter() - started
    latencies.sort()

    def pct(p):
        return 1000 * latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))]

    print(json.dumps({"sent": connections * per_connection, "acked": len(latencies), "answers": {k.decode(): v for k, v in answers.items()},
                      "seconds": seconds, "msgs_per_s": len(latencies) / seconds,
                      "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99), "max_ms": 1000 * latencies[-1]}))


asyncio.run(main())
