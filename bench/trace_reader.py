"""Reads a message trace of the engine at DATA_DIR for the whole run, every row, as hl7relay trace
does (a page of 1,000 after another while they are full, else every half second), without printing
them: the bench measures what a trace costs the engine, not a terminal. Prints, on SIGTERM, the
rows read and the rows the engine dropped.

    python bench/trace_reader.py DATA_DIR
"""

import json
import signal
import sys
import time
import urllib.request
from pathlib import Path

data = Path(sys.argv[1])
base = (data / "api-endpoint").read_text().strip()
headers = {"Authorization": "Bearer " + (data / "api-token").read_text().strip(), "Content-Type": "application/json"}


def call(method, path, body=None):
    request = urllib.request.Request(base + path, method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


PAGE = 1000
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
trace = call("POST", "/api/v1/traces", {"minutes": 60})["id"]
print("tracing", flush=True)
after = rows = dropped = 0
while not stop:
    page = call("GET", f"/api/v1/traces/{trace}?after={after}&limit={PAGE}")
    rows += len(page["rows"])
    after = page["rows"][-1][0] if page["rows"] else after
    dropped = page["trace"]["dropped"]
    if len(page["rows"]) < PAGE:
        time.sleep(0.5)
print(json.dumps({"trace_rows": rows, "trace_dropped": dropped}), flush=True)
