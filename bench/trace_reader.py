"""Reads a message trace of the engine at DATA_DIR for the whole run, every row, as hl7relay trace
does (a page of 1,000 after another while they are full, else every half second), without printing
them: the bench measures what a trace costs the engine, not a terminal. Prints, on SIGTERM, the
rows read and the rows the engine dropped. EVERY (seconds, default 0.5) is the wait after a page
that was not full: engine_instructions.py, whose engine runs ~50x slower under valgrind, waits
longer so that each request carries as many rows as at full speed.

    python bench/trace_reader.py DATA_DIR [EVERY]
"""

import json
import signal
import sys
import time
import urllib.request
from pathlib import Path

data = Path(sys.argv[1])
every = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
base = (data / "api-endpoint").read_text().strip()
headers = {"Authorization": "Bearer " + (data / "api-token").read_text().strip(), "Content-Type": "application/json"}


def call(method, path, body=None):
    request = urllib.request.Request(base + path, method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


PAGE = 1000


class Stop(Exception):
    pass


def stop(*_):
    raise Stop  # also out of a sleep: the rows still buffered are read below


after = rows = dropped = requests = 0


def read_page() -> int:
    global after, rows, dropped, requests
    requests += 1
    page = call("GET", f"/api/v1/traces/{trace}?after={after}&limit={PAGE}")
    rows += len(page["rows"])
    after = page["rows"][-1][0] if page["rows"] else after
    dropped = page["trace"]["dropped"]
    return len(page["rows"])


trace = call("POST", "/api/v1/traces", {"minutes": 60})["id"]
signal.signal(signal.SIGTERM, stop)
print("tracing", flush=True)
try:
    while True:
        if read_page() < PAGE:
            time.sleep(every)
except Stop:
    pass
signal.signal(signal.SIGTERM, signal.SIG_IGN)
while read_page() == PAGE:  # the rows left
    pass
print(json.dumps({"trace_rows": rows, "trace_dropped": dropped, "trace_requests": requests}), flush=True)
