"""Console page timings on a large store: the server's time per page, as an operator meets them.

    python bench/console_pages.py [--messages 200000] [--dead 20000] [--repeat 7] [--keep DIR]

Builds a store of ``--messages`` messages (ADT and ORU over three channels, ``--dead`` of them with
a dead letter), starts ``hl7relay run`` on it (every port its own choosing), signs in as an admin
and asks for each page ``--repeat`` times, printing the median and the slowest answer per page
(loopback HTTP: what is measured is the server's work). The target (issue #25): no page over
300 ms but a text search, which says how far it read.
"""

from __future__ import annotations

import argparse
import http.cookiejar
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
READY = "ready; Ctrl-C or SIGTERM stops"
PASSWORD = "a long enough password"
MESSAGE = ("MSH|^~\\&|PMS|CLINIC|HL7RELAY|LAB|20240105093512||{type}|{id}|P|2.5.1\r"
           "PID|1||{pid}^^^HOSP^MR||DOE{n}^JANE||19800412|F\rPV1|1|O|CLINIC^EXAM3\r")
CHANNELS = ("adt", "oru", "siu")


def build_store(folder: Path, messages: int, dead: int) -> None:
    sys.path.insert(0, str(REPO))
    from hl7relay.ops.auth import hash_password
    from hl7relay.store.database import DeliveryRecord, MessageRecord, Store

    store = Store(f"sqlite:///{folder / 'data' / 'hl7relay.db'}")
    store.migrate()
    store.add_user("bench", "admin", hash_password(PASSWORD), {"actor": "bench", "action": "user.add", "target": "bench"})
    start = time.time() - messages  # one a second, up to now
    every = max(1, messages // max(1, dead)) if dead else 0
    batch = []
    for n in range(messages):
        channel = CHANNELS[n % 3]
        kind = "ORU^R01^ORU_R01" if channel == "oru" else "ADT^A01^ADT_A01"
        raw = MESSAGE.format(type=kind, id=f"B{n}", pid=100000 + n % 5000, n=n).encode()
        failed = bool(every) and n % every == 0
        record = MessageRecord(channel, raw, "PROCESSED", start + n, "10.0.0.9:4000", "UTF-8", control_id=f"B{n}",
                               message_type=kind.rsplit("^", 1)[0], patient_id=str(100000 + n % 5000), ack_code="AA")
        record.deliveries.append(DeliveryRecord("lab", "ERROR" if failed else "SENT"))
        batch.append(record)
        if len(batch) == 5000:
            store.commit(batch, [])
            batch = []
    if batch:
        store.commit(batch, [])
    store.close()


def start_engine(folder: Path) -> tuple[subprocess.Popen, str]:
    for name in CHANNELS:
        (folder / "channels" / f"{name}.yaml").write_text(
            f"name: {name}\nsource: {{type: mllp, port: 0}}\n"
            "destinations: [{name: lab, type: mllp, host: 127.0.0.1, port: 9, retry_initial: 30, retry_max: 30}]\n")
    process = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--admin-port", "0", "--console-port", "auto"],
                               cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if READY in line:
            console = re.search(r"console: (https?://[^/\s]+)/", "".join(seen))
            if console:
                return process, console.group(1)
    process.kill()
    raise SystemExit("the engine did not start:\n" + "".join(seen[-20:]))


class Client:
    def __init__(self, base: str):
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()),
                                                  _NoRedirect())
        self.csrf = ""

    def request(self, method: str, path: str, form: dict | None = None) -> tuple[int, str, float]:
        data = urllib.parse.urlencode(form or {}).encode() if method == "POST" else None
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Origin": self.base} if method == "POST" else {})
        started = time.perf_counter()
        try:
            with self.opener.open(request, timeout=120) as response:
                body = response.read().decode("utf-8", "replace")
                status = response.status
        except urllib.error.HTTPError as error:
            body, status = error.read().decode("utf-8", "replace"), error.code
        return status, body, time.perf_counter() - started

    def sign_in(self) -> None:
        _, body, _ = self.request("GET", "/login")
        token = re.search(r'name="login_token" value="([^"]+)"', body).group(1)
        status, _, _ = self.request("POST", "/login", {"login_token": token, "name": "bench", "password": PASSWORD})
        assert status == 303, status
        _, page, _ = self.request("GET", "/")
        self.csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--dead", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--keep", type=Path, help="build the store here and keep it (reused when it is there)")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="hl7relay-console-bench-"))
    (folder / "channels").mkdir(parents=True, exist_ok=True)
    if not (folder / "data" / "hl7relay.db").exists():
        started = time.perf_counter()
        build_store(folder, args.messages, args.dead)
        print(f"store: {args.messages:,} messages, {args.dead:,} dead letters, built in {time.perf_counter() - started:.0f} s")
    process, base = start_engine(folder)
    try:
        client = Client(base)
        client.sign_in()
        pages = [("GET", "/", None), ("GET", "/messages", None), ("GET", "/messages?channel=adt", None),
                 ("GET", "/messages?failed=1", None), ("GET", "/messages?delivery_status=ERROR", None),
                 ("GET", "/messages?patient_id=100042", None), ("GET", "/messages?control_id=B4242", None),
                 ("GET", "/messages?message_type=ADT", None), ("GET", "/messages/4242", None),
                 ("GET", "/dead-letters", None), ("GET", "/channels", None), ("GET", "/audit", None),
                 ("GET", "/users", None), ("GET", "/performance", None), ("GET", "/logs", None), ("GET", "/alerts", None),
                 ("GET", "/connections", None), ("GET", "/tracer", None), ("GET", "/database", None),
                 ("GET", "/messages?text=DOE4242%5E", None), ("GET", "/messages?text=nowhere-at-all", None)]
        print(f"{'page':<44} {'p50 ms':>8} {'max ms':>8}  status")
        for method, path, form in pages:
            timings, status = [], 0
            for _ in range(args.repeat):
                status, _, seconds = client.request(method, path, form)
                timings.append(seconds * 1000)
            print(f"{method + ' ' + path:<44} {statistics.median(timings):>8.1f} {max(timings):>8.1f}  {status}")
        status, _, seconds = client.request("POST", "/database/check", {"csrf": client.csrf})
        print(f"{'POST /database/check (the checks themselves)':<44} {seconds * 1000:>8.1f} {'':>8}  {status}")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
