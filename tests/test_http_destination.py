"""The ``http`` destination against a real HTTPS API on loopback (tests/apiserver.py): an OAuth 2.0
token endpoint issuing short-lived tokens, and an API answering what each test scripts. The
destination is built from channel YAML and credentials.yaml as an installation writes them, and
runs in a real destination queue over a real store; the reactor is the test's own, driven by hand.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from collections import deque

import pytest
from twisted.internet import defer
from twisted.internet.epollreactor import EPollReactor
from twisted.logger import formatEvent, globalLogPublisher

from apiserver import FakeAPI, serve, spin
from hl7relay.apiclient.credentials import read_credentials, set_credentials_source
from hl7relay.channels import load_channel
from hl7relay.queues import DestinationQueue
from hl7relay.resources import Resources
from hl7relay.store.database import DeliveryRecord, MessageRecord, Store
from hl7relay.store.writer import StoreWriter

SECRET = "client-secret-7f3a9c-never-shown"
MSG = "MSH|^~\\&|PMS|CLINIC|LAB|HOSP|20240101||ADT^A08|{id}|P|2.5.1\rPID|1||{key}^^^H^MR||DOE^JANE\r"


@pytest.fixture(scope="module")
def pki(make_pki):
    return make_pki()


@pytest.fixture
def world(tmp_path, pki):
    """(api, build): ``build(destination_yaml, credentials_yaml=None)`` -> a running Destination."""
    reactor = EPollReactor()  # the test's own, driven by spin(); started (its resolver threads) but never run
    reactor.startRunning(installSignalHandlers=False)
    api = FakeAPI(reactor, client_secret=SECRET)
    port = serve(reactor, api, pki["server"], pki["server_key"])
    api.token_url = f"https://127.0.0.1:{port}/token"
    store = Store(f"sqlite:///{tmp_path / 'h.db'}")
    store.migrate()
    writer = StoreWriter(store, executor=lambda fn, *a: defer.maybeDeferred(fn, *a))
    (tmp_path / "client_secret.txt").write_text(SECRET)
    lines: list[str] = []

    def observe(event):
        lines.append(formatEvent(event) + "".join(str(v) for v in event.values() if isinstance(v, str)))

    globalLogPublisher.addObserver(observe)
    built = []

    def build(destination: str, credentials: str | None = None, credential: str = "pms-api", **queue_options):
        default = (f"pms-api: {{type: oauth2_client_credentials, token_url: '{api.token_url}', client_id: hl7relay, "
                   f"client_secret: '${{file:client_secret.txt}}', tls_ca: '{pki['ca']}', scope: patient/*.write}}")
        (tmp_path / "credentials.yaml").write_text(credentials if credentials is not None else default)
        set_credentials_source(lambda: read_credentials([(tmp_path / "credentials.yaml", True)]))
        base = (f"url: 'https://127.0.0.1:{port}/api/patients/{{PID-3.1}}/events', tls_ca: '{pki['ca']}', "
                f"credentials: {credential}")
        (tmp_path / "ch.yaml").write_text(f"name: ch\nsource: {{type: mllp, port: 0}}\n"
                                          f"destinations:\n  - {{name: pms, type: http, {base}"
                                          + (f", {destination}" if destination else "") + "}\n")
        channel, errors = load_channel(tmp_path / "ch.yaml", {})
        assert not errors, errors
        config = channel.destinations[0].config
        import dataclasses

        if queue_options:
            config.queue = dataclasses.replace(config.queue, **queue_options)
        resources = Resources(reactor, writer, time.time)
        delivery = config.runner(config, resources)
        queue = DestinationQueue("ch", "pms", delivery.deliver, config.queue, writer, reactor, time.time,
                                 poll_interval=0.2, keyed=delivery.keyed)
        queue.start()
        built.append((queue, delivery))
        return Running(store, queue, delivery, reactor, resources)

    yield api, build, lines, tmp_path
    globalLogPublisher.removeObserver(observe)
    set_credentials_source(None)
    for queue, delivery in built:
        queue.stop()
        delivery.close()
        if delivery.authorizer is not None:
            delivery.authorizer.close()
    for _ in range(20):
        reactor.iterate(0)
    reactor.stop()  # its shutdown: the resolver's threads end
    for _ in range(20):
        reactor.iterate(0)
    reactor.removeAll()
    store.close()


class Running:
    def __init__(self, store, queue, delivery, reactor, resources):
        self.store, self.queue, self.delivery, self.reactor, self.resources = store, queue, delivery, reactor, resources
        self.count = 0

    def enqueue(self, *keys: str) -> None:
        records = []
        for key in keys:
            self.count += 1
            content = MSG.format(id=f"M{self.count}", key=key).encode()
            records.append(MessageRecord("ch", content, "PROCESSED", received_at=time.time(), control_id=f"M{self.count}",
                                         deliveries=[DeliveryRecord("pms", "QUEUED", content, key)]))
        self.store.commit(records, [])
        self.queue.nudge()
        self.queue._poll()

    def deliveries(self) -> dict:
        return {r["control_id"]: self.store.get_message(r["id"])["deliveries"][0] for r in self.store.latest(1000)}

    def statuses(self) -> list[str]:
        return [d["status"] for _, d in sorted(self.deliveries().items(), key=lambda kv: int(kv[0][1:]))]

    def settle(self, count: int, status: str = "SENT", limit: float = 30.0) -> None:
        spin(self.reactor, lambda: self.statuses().count(status) >= count, limit,
             lambda: f"{self.statuses()} {self.queue.view()} {list(self.deliveries().values())[:1]}")


def _no_secret_anywhere(api, running, lines, tmp_path):
    """No token, no client secret in the log lines, the store (its bytes), the queue's view or the
    authorizer's view."""
    values = [SECRET, *api.tokens]
    running.store.close()
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("h.db*"))
    shown = json.dumps([running.queue.view(), running.delivery.authorizer.view() if running.delivery.authorizer else {}])
    for value in values:
        assert value.encode() not in stored
        assert value not in shown
        assert not [line for line in lines if value in line]


def test_fifty_concurrent_deliveries_cause_one_token_fetch(world):
    api, build, lines, tmp_path = world
    running = build("order: none, parallel: 50")
    running.enqueue(*[f"P{i}" for i in range(50)])
    running.settle(50)
    assert len(api.token_requests) == 1 and api.refused == 0
    assert len({seen.token for seen in api.requests}) == 1 and len(api.requests) == 50
    assert sorted(seen.path for seen in api.requests)[0].startswith("/api/patients/P")
    first = running.deliveries()["M1"]
    assert first["last_ack"].startswith("HTTP 201 POST https://127.0.0.1:") and '"status": "created"' in first["last_ack"]
    view = running.delivery.authorizer.view()
    assert view["scopes"] == ["patient/*.write"] and 0 < view["token_expires_in"] <= 60 and view["token_fetches"] == 1
    _no_secret_anywhere(api, running, lines, tmp_path)


def test_a_token_is_refreshed_before_it_expires_and_no_401_is_seen(world):
    api, build, lines, tmp_path = world
    api.token_lifetime = 1.5
    running = build("")
    for i in range(12):
        running.enqueue(f"P{i}")
        running.settle(i + 1)
        deadline = time.monotonic() + 0.3
        spin(running.reactor, lambda deadline=deadline: time.monotonic() > deadline)
    assert api.refused == 0  # every request carried a live token
    assert len(api.token_requests) >= 2  # ... because new ones were fetched as the old ones aged
    _no_secret_anywhere(api, running, lines, tmp_path)


def test_a_401_fetches_a_new_token_once_and_the_request_is_sent_again(world):
    api, build, lines, tmp_path = world
    running = build("")
    running.enqueue("P1")
    running.settle(1)
    api.revoke()  # the API forgot the token (revoked, restarted)
    running.enqueue("P2")
    running.settle(2)
    assert api.refused == 1 and len(api.token_requests) == 2
    assert [seen.path.split("/")[3] for seen in api.requests] == ["P1", "P2", "P2"]
    assert running.deliveries()["M2"]["attempts"] == 1
    _no_secret_anywhere(api, running, lines, tmp_path)


def test_a_second_401_holds_the_queue_and_nothing_is_dead_lettered(world):
    api, build, lines, tmp_path = world
    running = build("max_attempts: 1")
    api.refuse_all = True
    running.enqueue("P1", "P2", "P3")
    spin(running.reactor, lambda: running.queue.view()["held"] is not None)
    deadline = time.monotonic() + 1.0
    spin(running.reactor, lambda: time.monotonic() > deadline)  # held: nothing more is tried meanwhile
    assert len(api.requests) == 2 and len(api.token_requests) == 2  # one request, one new token, one resend
    assert running.statuses() == ["QUEUED"] * 3
    view = running.queue.view()
    assert view["state"] == "held" and view["held"].startswith("401 Unauthorized: not authorised")
    api.refuse_all = False  # the credentials were fixed
    running.queue.resume()
    running.settle(3)
    _no_secret_anywhere(api, running, lines, tmp_path)


def test_a_429_is_waited_out_as_retry_after_says_and_never_dead_lettered(world):
    api, build, lines, tmp_path = world
    api.script = deque([(429, {"Retry-After": "1"}, b"slow down")] * 3)
    running = build("max_attempts: 1, give_up_after: 0.5")
    running.enqueue("P1")
    running.settle(1, limit=20)
    times = [seen.at for seen in api.requests]
    assert len(times) == 4 and all(b - a >= 0.95 for a, b in zip(times, times[1:]))
    delivery = running.deliveries()["M1"]
    assert delivery["attempts"] == 1 and delivery["status"] == "SENT"


def test_a_400_is_a_dead_letter_after_one_try_with_the_apis_words(world):
    api, build, lines, tmp_path = world
    api.script = deque([(400, {"Content-Type": "application/json"}, b'{"error": "MRN P1 unknown"}')])
    running = build("")
    running.enqueue("P1", "P2")
    spin(running.reactor, lambda: running.statuses() == ["ERROR", "SENT"])
    dead = running.deliveries()["M1"]
    assert dead["attempts"] == 1 and dead["last_error"] == '400 Bad Request: {"error": "MRN P1 unknown"}'
    assert [seen.path.split("/")[3] for seen in api.requests] == ["P1", "P2"]  # tried once, never again


def test_a_409_is_a_conflict_and_a_500_is_retried_with_the_same_idempotency_key(world):
    api, build, lines, tmp_path = world
    api.script = deque([(500, {}, b"oops"), (500, {}, b"oops"), (409, {}, b"changed by someone else")])
    running = build("idempotency_header: Idempotency-Key, retry_initial: 0.05, retry_max: 0.1")
    running.enqueue("P1", "P2")
    spin(running.reactor, lambda: running.statuses() == ["ERROR", "SENT"])
    keys = [seen.headers["idempotency-key"] for seen in api.requests]
    assert keys[0] == keys[1] == keys[2] != keys[3]  # one delivery, one key, however often it was sent
    assert running.deliveries()["M1"]["last_error"].startswith("409 Conflict: conflict: changed by someone else")
    assert running.deliveries()["M1"]["attempts"] == 3


def test_the_rate_limit_holds_at_the_server_across_parallel_workers(world):
    api, build, lines, tmp_path = world
    running = build("rate_limit: 10, rate_burst: 2, order: none, parallel: 4")
    running.enqueue(*[f"P{i}" for i in range(14)])
    running.settle(14)
    times = sorted(seen.at for seen in api.requests)
    assert len(times) == 14
    for i in range(len(times)):
        for j in range(i + 1, len(times)):
            # a bucket of 2 that refills 10 a second: no window holds more than 2 + 10 a second of requests
            # (give or take two: a new connection's TLS handshake comes between the bucket and the
            # server's clock, and delays one request into the next's; seen on a loaded 2-core machine:
            # 5 in 0.199 s. Without the limit all 14 arrive within a few milliseconds)
            assert j - i + 1 <= 4 + 10 * (times[j] - times[i]), (i, j, times[j] - times[i])
    assert times[-1] - times[0] >= (14 - 3) / 10


def test_per_key_order_holds_through_a_429_storm(world):
    api, build, lines, tmp_path = world
    storm = [(429, {"Retry-After": "0"}, b"")] * 6 + [(503, {}, b"")] + [(429, {"Retry-After": "0"}, b"")] * 3
    api.script = deque(storm)
    running = build("order: per_key, order_key: PID-3.1, parallel: 4, retry_initial: 0.05, retry_max: 0.1")
    keys = ["A", "B", "C", "A", "B", "A", "C", "A", "B", "C"]
    running.enqueue(*keys)
    running.settle(len(keys))
    delivered = [(seen.path.split("/")[3], json_control_id(seen.body)) for seen in api.requests[len(storm):]]
    for key in "ABC":
        ids = [int(control[1:]) for k, control in delivered if k == key]
        assert ids == sorted(ids), (key, ids)


def json_control_id(body: bytes) -> str:
    return body.decode().split("|")[9]


def test_private_key_jwt_is_verified_by_the_token_endpoint(world, pki):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    api, build, lines, tmp_path = world
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "pms.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    api.public_key = key.public_key()
    running = build("", "epic: {type: oauth2_client_credentials, auth: private_key_jwt, client_id: hl7relay, "
                        f"token_url: '{api.token_url}', private_key: '${{file:pms.key}}', tls_ca: '{pki['ca']}'}}",
                    credential="epic")
    running.enqueue("P1")
    running.settle(1)
    [(_, form, headers)] = api.token_requests
    assert form["client_assertion_type"].endswith("jwt-bearer") and "client_secret" not in form
    assert "authorization" not in headers


def test_an_api_key_in_a_query_parameter_is_sent_and_never_shown(world):
    api, build, lines, tmp_path = world
    api.api_key = "k-5551234-never-shown"
    (tmp_path / "key.txt").write_text(api.api_key)
    running = build("", "lab-key: {type: api_key, key: '${file:key.txt}', query: api_key}", credential="lab-key")
    running.enqueue("P1")
    running.settle(1)
    assert api.requests[0].path.endswith("?api_key=k-5551234-never-shown") and not api.token_requests
    assert "api_key" not in running.deliveries()["M1"]["last_ack"]  # the URL kept has no query
    running.store.close()
    assert b"k-5551234" not in b"".join(p.read_bytes() for p in tmp_path.glob("h.db*"))


def test_a_redirect_is_not_followed_and_is_a_dead_letter(world):
    api, build, lines, tmp_path = world
    api.script = deque([(302, {"Location": "https://elsewhere.example/api"}, b"")])
    running = build("")
    running.enqueue("P1")
    spin(running.reactor, lambda: running.statuses() == ["ERROR"])
    assert len(api.requests) == 1  # nothing went to the other address
    assert "a redirect to https://elsewhere.example/api is not followed" in running.deliveries()["M1"]["last_error"]


# -- hl7relay check --credentials, and the vault, as an installation uses them -------------------------

def _cli(reactor, folder, *args, stdin: str | None = None):
    """Run hl7relay in ``folder`` while this test's reactor serves the API: (exit code, output)."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "hl7relay", *args], cwd=folder, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if stdin is not None:
        process.stdin.write(stdin)
    process.stdin.close()
    spin(reactor, lambda: process.poll() is not None, limit=60)
    return process.returncode, process.stdout.read()


def test_check_credentials_obtains_a_token_or_says_the_endpoints_error(world, pki):
    api, build, lines, tmp_path = world
    folder = tmp_path / "site"
    (folder / "config").mkdir(parents=True)
    (folder / "config" / "credentials.yaml").write_text(
        f"pms-api:\n  type: oauth2_client_credentials\n  token_url: '{api.token_url}'\n  client_id: hl7relay\n"
        f"  client_secret: '${{secret:PMS_CLIENT_SECRET}}'\n  scope: patient/*.write\n  tls_ca: '{pki['ca']}'\n"
        f"  check_url: '{api.token_url.replace('/token', '/api/ping')}'\n")
    reactor = build("").reactor
    code, out = _cli(reactor, folder, "secret", "set", "PMS_CLIENT_SECRET", stdin=SECRET + "\n")
    assert code == 0, out
    code, out = _cli(reactor, folder, "check", "--credentials", "pms-api")
    assert code == 0, out
    assert "TOKEN ok" not in out and "TOKEN OK" in out and "expires in 60 s; scopes: patient/*.write" in out
    assert "API   OK       GET https://127.0.0.1:" in out and out.rstrip().endswith("authenticated")
    assert api.requests[-1].path == "/api/ping" and api.requests[-1].token in api.tokens
    assert SECRET not in out and not any(token in out for token in api.tokens)
    api.token_error = (401, {"error": "invalid_client", "error_description": "clock skew too large: iat in the future"})
    code, out = _cli(reactor, folder, "check", "--credentials", "pms-api")
    assert code == 1 and "the token endpoint answered 401 invalid_client: clock skew too large" in out, out
    code, out = _cli(reactor, folder, "check", "--credentials", "pms-apl")
    assert code == 2 and out.strip().splitlines()[-1] == "no credentials named 'pms-apl' (did you mean 'pms-api')"
    (folder / "config" / "credentials.yaml").write_text("pms-api: {type: bearer, token: abc123literal}\n")
    (folder / "channels").mkdir()
    (folder / "channels" / "adt.yaml").write_text("name: adt\nsource: {type: mllp, port: 0}\n"
                                                  "destinations: [{name: pms, type: http, url: 'https://pms.example/api', "
                                                  "credentials: pms-api}]\n")
    code, out = _cli(reactor, folder, "lint", "channels")
    assert code == 1 and ("credentials.yaml:1:32: token is written in the file: keep it in the vault "
                          "(hl7relay secret set NAME) and write token: ${secret:NAME}") in out, out
    assert "abc123literal" not in out


# -- the engine itself: hl7relay run with an http destination, from secret set to the sync status --------

@pytest.mark.parametrize("forwarding", ["inline", "process"])
def test_the_engine_delivers_to_the_api_and_shows_its_sync_status(world, pki, samples, forwarding):
    import os
    import signal
    import subprocess
    import sys

    from test_runtime import READY, wait_for_line

    api, build, lines, tmp_path = world
    reactor = build("").reactor  # the API's reactor (the destination built here stays idle)
    folder = tmp_path / "site"
    (folder / "config").mkdir(parents=True)
    (folder / "channels").mkdir()
    (folder / "config" / "credentials.yaml").write_text(
        f"pms-api:\n  type: oauth2_client_credentials\n  token_url: '{api.token_url}'\n  client_id: hl7relay\n"
        f"  client_secret: '${{secret:PMS_CLIENT_SECRET}}'\n  scope: patient/*.write\n  tls_ca: '{pki['ca']}'\n")
    (folder / "channels" / "adt.yaml").write_text(
        "name: adt\nsource: {type: mllp, port: 0}\ndestinations:\n"
        f"  - {{name: pms, type: http, url: '{api.token_url.replace('/token', '/api/patients/{PID-3.1}/adt')}', "
        f"credentials: pms-api, tls_ca: '{pki['ca']}', idempotency_header: Idempotency-Key, rate_limit: 20}}\n")
    code, out = _cli(reactor, folder, "secret", "set", "PMS_CLIENT_SECRET", stdin=SECRET)
    assert code == 0, out
    from hl7relay.ops.auth import hash_password
    from hl7relay.store.database import Store

    users = Store(f"sqlite:///{folder / 'data' / 'hl7relay.db'}")  # made by secret set
    for name, role in (("admin", "admin"), ("viewer", "viewer")):
        users.add_user(name, role, hash_password("a long enough password"),
                       {"actor": "test", "action": "user.add", "target": name})
    users.close()
    engine = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--admin-port", "auto", "--console-port", "auto",
                               "--forwarding", forwarding], cwd=folder, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        startup = "".join(wait_for_line(engine, READY))
        port = startup.split("MLLP on 127.0.0.1:")[1].split()[0]
        trace = _engine_api(folder, "POST", "/api/v1/traces", {"kind": "api", "minutes": 1})
        assert trace["kind"] == "api"
        code, out = _cli(reactor, folder, "send", "--port", port, str(samples / "adt_a01.hl7"),
                         str(samples / "adt_a08.hl7"))
        assert code == 0, out
        spin(reactor, lambda: len(api.requests) == 2, limit=30)
        spin(reactor, lambda: len(_engine_api(folder, "GET", f"/api/v1/traces/{trace['id']}")["rows"]) == 2)
        page = _engine_api(folder, "GET", f"/api/v1/traces/{trace['id']}")
        rows = [dict(zip(page["columns"], values)) for values in page["rows"]]
        assert {(r["direction"], r["status"], r["ack"]) for r in rows} == {("out", "SENT", "HTTP 201")}
        assert rows[0]["peer"].startswith("POST https://127.0.0.1:") and rows[0]["peer"].endswith("/adt")
        assert len(api.token_requests) == 1 and api.requests[0].path.startswith("/api/patients/")
        assert api.requests[0].headers["content-type"] == "application/hl7-v2"
        assert api.requests[0].body.startswith(b"MSH|")
        code, out = _cli(reactor, folder, "status")
        assert code == 0, out
        sync = out.split("sync status (the running engine):\n")[1].splitlines()[0]
        assert sync.startswith("  adt -> pms (POST https://127.0.0.1:") and "/api/patients/" in sync
        assert ": ok; queued 0; last sent " in sync and "token (pms-api) expires in " in sync
        assert "rate limit 20/s" in sync
        assert SECRET not in out and not any(token in out for token in api.tokens)
        console = re.search(r"console: (https?://[^/\s]+)/", startup).group(1)
        _console_pages(reactor, console, api)
    finally:
        engine.send_signal(signal.SIGTERM)
        spin(reactor, lambda: engine.poll() is not None, limit=30)
        output = engine.stdout.read().decode()
        engine.stdout.close()
    assert engine.returncode == 0, output
    assert SECRET not in output and not any(token in output for token in api.tokens)
    audit = Store(f"sqlite:///{folder / 'data' / 'hl7relay.db'}")
    [checked] = audit.audit_entries(action="credential.check")
    assert (checked["actor"], checked["target"]) == ("user:admin", "pms-api") and "TOKEN ok" in checked["detail"]
    assert [e["target"] for e in audit.audit_entries(action="secret.set")] == ["PMS_CLIENT_SECRET"]
    audit.close()
    stored = b"".join(p.read_bytes() for p in (folder / "data").glob("hl7relay.db*"))
    assert SECRET.encode() not in stored and not any(token.encode() in stored for token in api.tokens)


def _console_pages(reactor, console: str, api) -> None:
    """The Sync status page for anyone, the Credentials page and its test for admins (the engine asks
    this test's API for a token meanwhile, so each request runs on a thread while the reactor spins)."""
    from test_console import Browser

    def call(fn, *args):
        out = []
        worker = threading.Thread(target=lambda: out.append(fn(*args)))
        worker.start()
        spin(reactor, lambda: not worker.is_alive(), limit=60)
        return out[0]

    viewer, admin = Browser(console), Browser(console)
    assert call(viewer.login, "viewer")[0] == 303 and call(admin.login, "admin")[0] == 303
    status, _, page = call(viewer.get, "/sync")
    assert status == 200 and 'id="sync-adt-pms"' in page and "adt → pms" in page and "pms-api: expires in" in page
    assert call(viewer.get, "/credentials")[0] == 403 and 'href="/credentials"' not in page
    status, _, page = call(admin.get, "/credentials")
    assert status == 200 and 'id="credential-pms-api"' in page and "adt -&gt; pms" in page
    fetched = len(api.token_requests)
    status, _, page = call(admin.post, "/credentials/check", {"credential": "pms-api"})
    assert status == 200 and "pms-api: authenticated" in page and "token obtained from https://127.0.0.1:" in page
    assert len(api.token_requests) == fetched + 1
    for value in [SECRET, *api.tokens]:
        assert value not in page


def test_check_url_goes_dns_tcp_tls_then_an_http_round_trip(world, pki):
    api, build, lines, tmp_path = world
    reactor = build("").reactor
    url = api.token_url.replace("/token", "/api/ping?api_key=never-shown")
    code, out = _cli(reactor, tmp_path, "check", url, "--tls-ca", pki["ca"])
    assert code == 0, out
    assert [line.split()[0] for line in out.splitlines()[1:5]] == ["DNS", "TCP", "TLS", "HTTP"]
    assert "HTTP  OK       GET https://127.0.0.1:" in out and "/api/ping: HTTP 401" in out
    assert "never-shown" not in out and out.rstrip().endswith("reachable")
    code, out = _cli(reactor, tmp_path, "check", url)  # the test CA is not in the system's trust store
    assert code == 1 and "TLS   FAILED" in out and "NOT reachable" in out
    code, out = _cli(reactor, tmp_path, "check", "https://", "--tls-ca", pki["ca"])
    assert code == 2 and out.strip() == "https://: no host in the URL"


def test_the_readme_walk_through_lints_as_written(tmp_path):
    """The README's credentials.yaml and destination, verbatim, with the secret set as it says."""
    import subprocess
    import sys
    import textwrap

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    walk = readme.split("### Connecting a PMS's REST API with OAuth 2.0")[1].split("### Receiving over HTTPS")[0]
    blocks = [textwrap.dedent(block.split("```", 1)[0]) for block in walk.split("```yaml\n")[1:]]
    credentials, destination = blocks[0], blocks[1]
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "credentials.yaml").write_text(credentials)
    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "results.yaml").write_text("name: results\nsource: {type: mllp, port: 0}\n" + destination)

    def hl7relay(*args, stdin=None):
        return subprocess.run([sys.executable, "-m", "hl7relay", *args], cwd=tmp_path, input=stdin, text=True,
                              capture_output=True, timeout=60)

    assert hl7relay("lint", "channels").returncode == 1  # the secret is not set yet: said, not a traceback
    assert hl7relay("secret", "set", "pms-client-secret", stdin="s3cret-from-the-pms").returncode == 0
    result = hl7relay("lint", "channels")
    assert result.returncode == 0 and result.stdout.strip() == "1 channel OK: results", result.stdout + result.stderr
    wrong = hl7relay("check", "--credentials", "pms-api", "lab")
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1


def test_a_token_endpoint_that_refuses_the_client_holds_the_queue(world):
    api, build, lines, tmp_path = world
    api.token_error = (401, {"error": "invalid_client", "error_description": "unknown client"})
    running = build("")
    running.enqueue("P1", "P2")
    spin(running.reactor, lambda: running.queue.view()["held"] is not None)
    held = running.queue.view()["held"]
    assert held.startswith("not authorised: pms-api: the token endpoint answered 401 invalid_client: unknown client")
    assert running.statuses() == ["QUEUED", "QUEUED"] and not api.requests  # nothing reached the API
    assert running.queue.view()["last_error_class"] == "auth"
    assert running.delivery.authorizer.view()["token_error"].endswith("invalid_client: unknown client")


def _engine_api(folder, method: str, path: str, body: dict | None = None):
    """The running engine's API with its local token (as the CLI calls it)."""
    import urllib.request

    from hl7relay.ops.api import ENDPOINT_FILE, LOCAL_TOKEN_FILE

    endpoint = (folder / "data" / ENDPOINT_FILE).read_text().strip()
    token = (folder / "data" / LOCAL_TOKEN_FILE).read_text().strip()
    request = urllib.request.Request(endpoint + path, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def test_check_an_http_destination_by_name_reaches_its_host_and_gets_a_token(world, pki):
    api, build, lines, tmp_path = world
    reactor = build("").reactor
    folder = tmp_path / "site"
    (folder / "config").mkdir(parents=True)
    (folder / "channels").mkdir()
    (tmp_path / "client_secret.txt").rename(folder / "config" / "client_secret.txt")
    (folder / "config" / "credentials.yaml").write_text(
        f"pms-api: {{type: oauth2_client_credentials, token_url: '{api.token_url}', client_id: hl7relay, "
        f"client_secret: '${{file:client_secret.txt}}', tls_ca: '{pki['ca']}'}}\n")
    (folder / "channels" / "adt.yaml").write_text(
        "name: adt\nsource: {type: mllp, port: 0}\ndestinations:\n"
        f"  - {{name: pms, type: http, url: '{api.token_url.replace('/token', '/api/{PID-3.1}')}', "
        f"credentials: pms-api, tls_ca: '{pki['ca']}'}}\n")
    code, out = _cli(reactor, folder, "check", "pms")
    assert code == 0, out
    assert out.splitlines()[0].startswith("adt/pms: POST https://127.0.0.1:")
    assert [line.split()[0] for line in out.splitlines()[1:5]] == ["DNS", "TCP", "TLS", "TOKEN"]
    assert not api.requests and len(api.token_requests) == 1  # nothing sent to the API itself
    code, out = _cli(reactor, folder, "check", "pms", "--mllp")
    assert code == 2 and out.strip() == "adt/pms is an http destination: --mllp does not apply"


def test_the_console_shows_an_api_key_credential_and_its_destination(world, pki, samples):
    import os
    import signal
    import subprocess
    import sys

    from test_runtime import READY, wait_for_line

    from hl7relay.ops.auth import hash_password
    from hl7relay.store.database import Store

    api, build, lines, tmp_path = world
    reactor = build("").reactor
    api.api_key = "k-static-never-shown"
    folder = tmp_path / "site"
    (folder / "config").mkdir(parents=True)
    (folder / "channels").mkdir()
    (folder / "config" / "key.txt").write_text(api.api_key)
    ping = api.token_url.replace("/token", "/api/ping")
    (folder / "config" / "credentials.yaml").write_text(
        f"lab-key: {{type: api_key, key: '${{file:key.txt}}', check_url: '{ping}', tls_ca: '{pki['ca']}'}}\n")
    (folder / "channels" / "adt.yaml").write_text(
        "name: adt\nsource: {type: mllp, port: 0}\ndestinations:\n"
        f"  - {{name: lab, type: http, url: '{api.token_url.replace('/token', '/api/lab')}', credentials: lab-key, "
        f"tls_ca: '{pki['ca']}'}}\n")
    (folder / "data").mkdir()
    users = Store(f"sqlite:///{folder / 'data' / 'hl7relay.db'}")
    users.migrate()
    users.add_user("admin", "admin", hash_password("a long enough password"),
                   {"actor": "test", "action": "user.add", "target": "admin"})
    users.close()
    engine = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--admin-port", "0", "--console-port", "auto"],
                              cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        startup = "".join(wait_for_line(engine, READY))
        port = startup.split("MLLP on 127.0.0.1:")[1].split()[0]
        code, out = _cli(reactor, folder, "send", "--port", port, str(samples / "adt_a01.hl7"))
        assert code == 0, out
        spin(reactor, lambda: len(api.requests) == 1)
        from test_console import Browser

        admin = Browser(re.search(r"console: (https?://[^/\s]+)/", startup).group(1))

        def call(fn, *args):
            out = []
            worker = threading.Thread(target=lambda: out.append(fn(*args)))
            worker.start()
            spin(reactor, lambda: not worker.is_alive(), limit=60)
            return out[0]

        assert call(admin.login, "admin")[0] == 303
        status, _, page = call(admin.get, "/sync")
        assert status == 200 and 'id="sync-adt-lab"' in page and "<td>lab-key</td>" in page
        status, _, page = call(admin.get, "/credentials")
        assert status == 200 and 'id="credential-lab-key"' in page and "api_key" in page
        status, _, page = call(admin.post, "/credentials/check", {"credential": "lab-key"})
        assert status == 200 and "lab-key: authenticated" in page and "/api/ping: HTTP 201" in page
        assert api.api_key not in page
    finally:
        engine.send_signal(signal.SIGTERM)
        spin(reactor, lambda: engine.poll() is not None, limit=30)
        output = engine.stdout.read().decode()
        engine.stdout.close()
    assert engine.returncode == 0 and "Traceback" not in output, output


def test_a_credential_check_says_authenticated_only_when_the_credential_was_proven():
    from hl7relay.ops.check import Step, credential_verdict

    reached = [Step("DNS", "ok", ""), Step("TCP", "ok", ""), Step("TLS", "ok", "")]
    assert credential_verdict(reached + [Step("TOKEN", "ok", "")]) == "authenticated"
    assert credential_verdict(reached + [Step("API", "ok", "HTTP 200")]) == "authenticated"
    assert credential_verdict(reached + [Step("API", "warning", "HTTP 405")]).startswith("not confirmed")
    assert credential_verdict(reached + [Step("TOKEN", "ok", ""), Step("API", "warning", "HTTP 404")]) == "authenticated"
    assert credential_verdict(reached + [Step("API", "failed", "HTTP 401")]) == "NOT authenticated"
    assert credential_verdict([Step("DNS", "failed", "")]) == "NOT authenticated"


def test_a_fhir_bundle_from_the_pipeline_is_posted_as_fhir_json_from_its_stored_content(world):
    """The channel's fhir transformer makes the destination's content; the queue sends it from the
    store (as after a restart: parsed again from the stored bytes) with FHIR's content type."""
    from hl7relay.channels import process
    from hl7relay.hl7.message import Message

    api, build, lines, tmp_path = world
    running = build("transformers: [{fhir: {bundle: transaction}}]")
    channel, errors = load_channel(tmp_path / "ch.yaml", {})
    assert not errors
    message = Message.from_bytes(MSG.format(id="F1", key="4711").encode())
    output = process(channel, message).outputs[0].message
    content = output.to_bytes()
    running.store.commit([MessageRecord("ch", message.to_bytes(), "PROCESSED", received_at=time.time(), control_id="M1",
                                        deliveries=[DeliveryRecord("pms", "QUEUED", content, None)])], [])
    running.queue.nudge()
    running.queue._poll()
    running.settle(1)
    seen = api.requests[-1]
    assert seen.headers["content-type"] == "application/fhir+json"
    bundle = json.loads(seen.body)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    assert any(e["request"]["url"] == "Patient?identifier=H%7C4711" for e in bundle["entry"])
    assert seen.path == "/api/patients//events"  # HL7 paths name nothing in a FHIR document
