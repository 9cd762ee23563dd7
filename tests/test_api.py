"""The operations API against a real `hl7relay run`: every route x every role, and what it does."""

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hl7relay.controls import Controls
from hl7relay.ops.api import ROUTES, openapi_document
from hl7relay.ops.auth import token_hash
from hl7relay.mllp.framing import MLLPFramer, frame
from hl7relay.store.database import Store

ADT = ("MSH|^~\\&|PMS|CLINIC|HL7RELAY|LAB|20240105093512||ADT^A01^ADT_A01|{id}|P|2.5.1\r"
       "EVN|A01|20240105093512\rPID|1||100234^^^CLINIC^MR||SAMPLEPATIENT^JANE\rPV1|1|O\r")
TOKENS = {"viewer": "hl7r_viewer-token-for-tests-0123456789abcdef", "operator": "hl7r_operator-token-for-tests-0123456789",
          "admin": "hl7r_admin-token-for-tests-0123456789abcdefgh"}


@pytest.fixture(scope="module", params=["inline", "process"])
def engine(tmp_path_factory, running_engine, request):
    """The engine, with its destinations served in its own process and by a forwarder process:
    every route and control must work the same either way."""
    def prepare(store):
        for role, token in TOKENS.items():
            store.add_token(role, role, token_hash(token), "test", {"actor": "test", "action": "token.create", "target": role})

    running = running_engine(tmp_path_factory.mktemp("api"), "--admin-port", "auto", "--console-port", "0",
                             "--forwarding", request.param, prepare=prepare)
    folder = running.folder
    base = (folder / "data" / "api-endpoint").read_text().strip()
    local = (folder / "data" / "api-token").read_text().strip()
    assert oct((folder / "data" / "api-token").stat().st_mode & 0o777) == "0o600"
    import socket

    with socket.create_connection(("127.0.0.1", running.mllp_port)) as pms:  # one message with a patient name in it
        pms.sendall(frame(ADT.format(id="API1").encode()))
        framer, got = MLLPFramer(), []
        while not got:
            got = framer.feed(pms.recv(65536))
    yield {"base": base, "local": local, "folder": folder, "store": running.store}
    assert running.stop() == 0


def call(engine, method, path, token=None, body=None, headers=None):
    request = urllib.request.Request(engine["base"] + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None))
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    from secret_scan import record_output

    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    record_output(text)
    return status, text


ROLE_ORDER = ["viewer", "operator", "admin"]
PERMISSION_LEAST = {"read": "viewer", "control": "operator", "audit": "admin", "reload": "admin", "replay": "operator",
                    "prune": "admin"}
BODIES = {"post_replay": {"reason": "matrix", "force": True}, "post_prune": {"older_than_days": 3650, "reason": "matrix"},
          "post_silence": {"rule": "HL7RelayQueueStuck", "channel": "adt", "minutes": 5, "reason": "matrix"},
          "post_unsilence": {"rule": "HL7RelayQueueGrowing"}, "post_rollback": {"snapshot": 1, "reason": "matrix"}}


def _concrete(pattern):
    return pattern.replace("{channel}", "adt").replace("{destination}", "lab").replace("{message_id}", "1")


@pytest.mark.parametrize("route", ROUTES, ids=[f"{r.method} {r.pattern}" for r in ROUTES])
def test_every_route_for_every_role(engine, route):
    path = _concrete(route.pattern)
    if "{trace}" in path:  # a trace of its own, started by an admin
        status, body = call(engine, "POST", "/api/v1/traces", token=TOKENS["admin"], body={"minutes": 1})
        assert status == 200, body
        path = path.replace("{trace}", json.loads(body)["id"])
    assert call(engine, route.method, path)[0] == 401  # no credentials
    assert call(engine, route.method, path, token="hl7r_made-up")[0] == 401
    least = PERMISSION_LEAST[route.permission]
    for role in ROLE_ORDER:
        if route.handler == "post_unsilence":  # something to unsilence, made by an admin
            call(engine, "POST", "/api/v1/alerts/silence", token=TOKENS["admin"],
                 body={"rule": "HL7RelayQueueGrowing", "minutes": 5, "reason": "matrix"})
        body = BODIES.get(route.handler, {"reason": "matrix"}) if route.method == "POST" else None
        status, body = call(engine, route.method, path, token=TOKENS[role], body=body)
        expected = 200 if ROLE_ORDER.index(role) >= ROLE_ORDER.index(least) else 403
        assert status == expected, (role, status, body)
        assert "SAMPLEPATIENT" not in body  # no response carries the sample patient's name
        if route.pattern.endswith("/disable") and status == 200:
            call(engine, "POST", "/api/v1/channels/adt/enable", token=TOKENS["admin"])  # leave it open
        if route.pattern.endswith("/pause") and status == 200:
            call(engine, "POST", "/api/v1/channels/adt/destinations/lab/resume", token=TOKENS["admin"])


def test_wrong_method_unknown_route_and_unknown_names(engine):
    admin = TOKENS["admin"]
    assert call(engine, "POST", "/api/v1/status", token=admin)[0] == 405
    assert call(engine, "GET", "/api/v1/nothing", token=admin)[0] == 404
    status, body = call(engine, "GET", "/api/v1/channels/nope", token=admin)
    assert status == 404 and "no channel 'nope'" in body
    assert call(engine, "POST", "/api/v1/channels/adt/destinations/nope/pause", token=admin)[0] == 404
    assert call(engine, "POST", "/api/v1/channels/adt/disable", token=admin, body=["not", "an", "object"])[0] == 400


def test_pause_is_audited_with_the_token_and_the_reason(engine):
    status, body = call(engine, "POST", "/api/v1/channels/adt/destinations/lab/pause", token=TOKENS["operator"],
                        body={"reason": "lab maintenance window"})
    assert status == 200 and json.loads(body)["paused"] is True
    assert ("adt", "lab", "paused") in engine["store"].controls()
    entry = engine["store"].audit_entries(action="destination.pause")[0]
    assert (entry["actor"], entry["reason"], entry["source"], entry["target"]) == (
        "token:operator", "lab maintenance window", "127.0.0.1", "adt/lab")
    used = {t["name"]: t["last_used_at"] for t in engine["store"].list_tokens()}
    assert used["operator"] is not None  # what `hl7relay token list` shows
    call(engine, "POST", "/api/v1/channels/adt/destinations/lab/resume", token=TOKENS["operator"])
    status, body = call(engine, "GET", "/api/v1/channels/adt", token=TOKENS["viewer"])
    view = json.loads(body)
    assert view["enabled"] and view["destinations"]["lab"]["depth"] == 1 and not view["destinations"]["lab"]["paused"]


def test_only_the_local_token_names_its_actor(engine):
    status, _ = call(engine, "POST", "/api/v1/channels/adt/destinations/lab/retry", token=engine["local"],
                     headers={"X-Hl7relay-Actor": "os:alice"})
    assert status == 200 and engine["store"].audit_entries(action="destination.retry")[0]["actor"] == "os:alice"
    call(engine, "POST", "/api/v1/channels/adt/destinations/lab/retry", token=TOKENS["operator"],
         headers={"X-Hl7relay-Actor": "os:mallory"})
    assert engine["store"].audit_entries(action="destination.retry")[0]["actor"] == "token:operator"


def test_the_cli_drives_the_running_engine(engine):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "hl7relay", *args], cwd=engine["folder"], capture_output=True,
                              text=True, timeout=60)

    result = cli("channel", "disable", "adt", "--reason", "go-live rehearsal")
    assert result.returncode == 0 and "adt: DISABLED" in result.stdout, result.stdout + result.stderr
    assert "DISABLED" in cli("channel", "show").stdout
    assert cli("channel", "enable", "adt").returncode == 0
    result = cli("destination", "pause", "adt", "lab")
    assert result.returncode == 0 and "PAUSED" in result.stdout
    result = cli("destination", "show", "adt", "lab", "--format", "json")
    assert json.loads(result.stdout)["paused"] is True
    assert cli("destination", "resume", "adt", "lab").returncode == 0
    result = cli("channel", "show", "nope")
    assert result.returncode == 1 and "404" in result.stderr and "Traceback" not in result.stderr
    assert engine["store"].audit_entries(action="channel.disable")[0]["reason"] == "go-live rehearsal"


def test_the_openapi_document_describes_every_route():
    document = openapi_document()
    described = {(method.upper(), path) for path, operations in document["paths"].items() for method in operations}
    assert described == {(r.method, r.pattern) for r in ROUTES}
    assert all(op["x-permission"] in PERMISSION_LEAST for ops in document["paths"].values() for op in ops.values())


def test_channels_carry_their_counters_and_rates_from_memory(engine):
    status, body = call(engine, "GET", "/api/v1/channels/adt", token=TOKENS["viewer"])
    counters = json.loads(body)["counters"]
    assert status == 200 and counters["since_start"]["received"] >= 1 and counters["since_start"]["processed"] >= 1
    assert counters["today"]["received"] >= 1 and counters["per_minute_5m"] > 0 and counters["ack_p95_ms"] > 0


def test_messages_are_masked_and_phi_needs_the_permission_a_reason_and_an_audit_entry(engine):
    status, body = call(engine, "GET", "/api/v1/messages?control_id=API1", token=TOKENS["viewer"])
    rows = json.loads(body)["messages"]
    assert status == 200 and rows and {r["control_id"] for r in rows} == {"API1"}  # the original and its replays
    assert {r["patient_id"] for r in rows} == {"1***"}
    status, body = call(engine, "GET", "/api/v1/messages/1", token=TOKENS["viewer"])
    message = json.loads(body)
    assert status == 200 and "SAMPLEPATIENT" not in body and message["deliveries"][0]["destination"] == "lab"
    for role in ("viewer", "operator"):
        assert call(engine, "GET", "/api/v1/messages/1?show_phi=1&reason=x", token=TOKENS[role])[0] == 403
    assert call(engine, "GET", "/api/v1/messages/1?show_phi=1", token=TOKENS["admin"])[0] == 400
    status, body = call(engine, "GET", "/api/v1/messages/1?show_phi=1&reason=INC-7", token=TOKENS["admin"])
    assert status == 200 and "SAMPLEPATIENT" in body
    entry = engine["store"].audit_entries(action="phi.view")[0]
    assert (entry["actor"], entry["target"], entry["reason"]) == ("token:admin", "message 1", "INC-7")
    assert call(engine, "GET", "/api/v1/messages/99999", token=TOKENS["viewer"])[0] == 404
    huge = "99999999999999999999999"  # beyond any row id: a clear answer, not an overflow
    assert call(engine, "GET", f"/api/v1/messages/{huge}", token=TOKENS["viewer"])[0] == 404
    assert call(engine, "GET", f"/api/v1/messages?before={huge}", token=TOKENS["viewer"])[0] == 400
    assert call(engine, "GET", f"/api/v1/audit?before={huge}", token=TOKENS["admin"])[0] == 400
    assert call(engine, "GET", "/api/v1/messages?limit=lots", token=TOKENS["viewer"])[0] == 400


def test_a_content_search_needs_the_phi_permission_and_is_audited_with_its_text(engine):
    """A viewer's free-text search for a name told which messages held it, unaudited."""
    for role in ("viewer", "operator"):
        status, body = call(engine, "GET", "/api/v1/messages?text=SAMPLEPATIENT", token=TOKENS[role])
        assert status == 403 and "may not search message content" in body
    status, body = call(engine, "GET", "/api/v1/messages?text=SAMPLEPATIENT&reason=INC-8", token=TOKENS["admin"])
    assert status == 200 and json.loads(body)["messages"]
    entry = engine["store"].audit_entries(action="messages.search_text")[0]
    assert (entry["actor"], entry["reason"], entry["detail"]) == ("token:admin", "INC-8", "text 'SAMPLEPATIENT'")
    # one search for the API, the console and the CLI: a search by patient id is audited here too
    before = len(engine["store"].audit_entries(action="messages.search", limit=1000))
    assert call(engine, "GET", "/api/v1/messages?patient_id=100234", token=TOKENS["viewer"])[0] == 200
    entries = engine["store"].audit_entries(action="messages.search", limit=1000)
    assert len(entries) == before + 1 and (entries[0]["actor"], entries[0]["target"]) == ("token:viewer", "patient_id")
    status, body = call(engine, "GET", "/api/v1/messages?failed=1", token=TOKENS["viewer"])
    assert status == 200 and all("failed_deliveries" in row for row in json.loads(body)["messages"])


def test_replay_and_prune_through_the_api_are_audited(engine):
    status, body = call(engine, "POST", "/api/v1/messages/1/replay", token=TOKENS["operator"], body={"dry_run": True, "force": True})
    assert status == 200 and json.loads(body)["destinations"] == ["lab"] and "replay_id" not in json.loads(body)
    assert call(engine, "POST", "/api/v1/messages/1/replay", token=TOKENS["operator"], body={"force": True})[0] == 400
    status, body = call(engine, "POST", "/api/v1/messages/1/replay", token=TOKENS["operator"],
                        body={"force": True, "reason": "lab lost it"})
    assert status == 200 and json.loads(body)["replay_id"] > 1
    entry = engine["store"].audit_entries(action="replay")[0]
    assert (entry["actor"], entry["reason"], entry["target"]) == ("token:operator", "lab lost it", "message 1")
    status, body = call(engine, "POST", "/api/v1/prune", token=TOKENS["admin"], body={"older_than_days": 3650, "dry_run": True})
    assert status == 200 and json.loads(body) == {"would_delete": 0, "dry_run": True}
    assert call(engine, "POST", "/api/v1/prune", token=TOKENS["admin"], body={"older_than_days": 0})[0] == 400


def test_a_large_search_does_not_hold_up_acks(tmp_path):
    """Support reads run on their own connection off the reactor thread: while a text search
    scans 100,000 stored messages, the engine keeps storing and acknowledging (an ordering check:
    ACKs arrive before the search answers; no timing threshold)."""
    import socket
    import threading

    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "adt.yaml").write_text("name: adt\nsource: {type: mllp, port: 0}\n")
    store = Store(f"sqlite:///{tmp_path / 'data' / 'hl7relay.db'}")
    store.migrate()
    from hl7relay.store.database import MessageRecord

    filler = ADT.format(id="F").encode() + b"NTE|1||" + b"x" * 900 + b"\r"
    for start in range(0, 100_000, 5000):
        store.commit([MessageRecord("adt", filler, "PROCESSED", 1.0, control_id=f"F{i}") for i in range(start, start + 5000)], [])
    store.add_token("a", "admin", token_hash(TOKENS["admin"]), "test", {"actor": "test", "action": "token.create"})
    store.close()
    process = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--admin-port", "auto", "--console-port", "0"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    sys.path.insert(0, str(Path(__file__).parent))
    from test_runtime import READY, wait_for_line

    try:
        startup = "".join(wait_for_line(process, READY))
        port = int(startup.split("MLLP on 127.0.0.1:")[1].split()[0])
        engine = {"base": (tmp_path / "data" / "api-endpoint").read_text().strip()}
        searched = threading.Event()
        result = {}

        def search():
            result["answer"] = call(engine, "GET", "/api/v1/messages?text=NOT-IN-ANY-MESSAGE&limit=5", token=TOKENS["admin"])
            searched.set()

        acks_during_search = 0
        with socket.create_connection(("127.0.0.1", port)) as pms:
            framer = MLLPFramer()
            threading.Thread(target=search).start()
            for n in range(200):
                pms.sendall(frame(ADT.format(id=f"D{n}").encode()))
                got = []
                while not got:
                    got = framer.feed(pms.recv(65536))
                if searched.is_set():
                    break
                acks_during_search += 1
        searched.wait(timeout=120)
        assert result["answer"][0] == 200 and json.loads(result["answer"][1])["messages"] == []
        assert acks_during_search >= 3, acks_during_search
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        process.stdout.close()


def test_the_admin_listener_can_take_tls(tmp_path, server_certificate):
    import ssl

    ca, certificate, key = server_certificate
    (tmp_path / "engine.yaml").write_text(f"admin: {{host: 127.0.0.1, port: auto, tls_cert: {certificate}, "
                                          f"tls_key: {key}, tls_ca: {ca}}}\nconsole: {{port: 0}}\n")
    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "adt.yaml").write_text("name: adt\nsource: {type: mllp, port: 0}\n")
    process = subprocess.Popen([sys.executable, "-m", "hl7relay", "run", "--config", "engine.yaml"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    sys.path.insert(0, str(Path(__file__).parent))
    from test_runtime import READY, wait_for_line

    try:
        startup = "".join(wait_for_line(process, READY))
        assert "admin: https://127.0.0.1:" in startup and "(TLS)" in startup
        endpoint = (tmp_path / "data" / "api-endpoint").read_text().strip()
        assert endpoint.startswith("https://")
        result = subprocess.run([sys.executable, "-m", "hl7relay", "channel", "show", "--config", "engine.yaml"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "adt: enabled" in result.stdout, result.stdout + result.stderr
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(endpoint.replace("https:", "http:") + "/healthz", timeout=10).read()
        context = ssl.create_default_context(cafile=str(ca))
        with urllib.request.urlopen(endpoint + "/healthz", timeout=10, context=context) as response:
            assert response.read() == b"ok\n"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        process.stdout.close()


def test_an_oversized_body_is_refused_before_it_is_read(engine):
    import socket
    import urllib.parse

    where = urllib.parse.urlsplit(engine["base"])
    with socket.create_connection((where.hostname, where.port), timeout=30) as connection:
        connection.sendall(b"POST /api/v1/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000000\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = connection.recv(65536)
            if not data:
                break
            answer += data
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert call(engine, "GET", "/api/v1/status", token=TOKENS["viewer"])[0] == 200


def test_a_store_that_does_not_answer_gets_a_503(unit_engine):
    from sqlalchemy.exc import OperationalError
    from twisted.internet import defer
    from twisted.web.test.requesthelper import DummyRequest

    from hl7relay.ops.api import ApiResource

    engine = unit_engine[0]
    api = ApiResource(Controls(engine), local_token="hl7r_local-token-for-this-test")
    api._off_reactor = lambda fn, *a, **k: defer.fail(OperationalError("SELECT", {}, Exception("connection refused")))
    request = DummyRequest([b"api", b"v1", b"messages"])
    request.path = b"/api/v1/messages"
    request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer hl7r_local-token-for-this-test"])
    api.render(request)
    assert request.responseCode == 503 and b"not answering" in b"".join(request.written)
    request = DummyRequest([b"api", b"v1", b"status"])
    request.path = b"/api/v1/status"
    request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer hl7r_local-token-for-this-test"])
    api.render(request)
    assert request.responseCode in (None, 200) and b'"channels"' in b"".join(request.written)  # from memory
