"""The ``http`` source on a real engine: HTTPS with the test CA, sender tokens, answers after commit,
limits, idempotency, and kill -9 under load (nothing answered 2xx is lost)."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from test_durability import processes, start, stored_ids, wait_for  # noqa: F401 - processes is a fixture

MSG = ("MSH|^~\\&|PMS|CLINIC|LAB|LABFAC|20240105||ADT^A08^ADT_A01|{id}|P|2.5.1\n"
       "EVN|A08|20240105\nPID|1||{id}^^^H^MR||DOE^JANE\nPV1|1|O\n")


@pytest.fixture(scope="module")
def pki(make_pki):
    return make_pki()


def hl7relay(folder, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hl7relay", *args], cwd=folder, capture_output=True, text=True,
                          timeout=60)


def write_site(folder, pki, port=0, extra=""):
    (folder / "channels").mkdir(parents=True, exist_ok=True)
    (folder / "channels" / "pms.yaml").write_text(
        "name: pms-in\n"
        f"source: {{type: http, port: {port}, tls_cert: '{pki['server']}', tls_key: '{pki['server_key']}', "
        f"tokens: [pms], max_body: 4096{extra}}}\n"
        "destinations: [{name: out, type: file, directory: out}]\n")


def token(folder, name, role) -> str:
    from hl7relay.store.database import Store

    if not (folder / "data" / "hl7relay.db").exists():  # a new installation: the store the engine will use
        Store(f"sqlite:///{folder / 'data' / 'hl7relay.db'}").migrate()
    result = hl7relay(folder, "token", "create", name, "--role", role)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


class Sender:
    def __init__(self, url, pki, token=None):
        self.url, self.token = url, token
        self.context = ssl.create_default_context(cafile=pki["ca"])

    def post(self, body: bytes, content_type="application/hl7-v2", token=None, **headers):
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": content_type, **headers})
        if (token or self.token) is not None:
            request.add_header("Authorization", f"Bearer {token or self.token}")
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=20) as answer:
                return answer.status, dict(answer.headers), answer.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()


@pytest.fixture
def site(tmp_path, pki, processes):  # noqa: F811 - the fixture imported above
    folder = tmp_path
    folder.joinpath("data").mkdir()
    write_site(folder, pki, extra=", rate_limit: 2, rate_burst: 5")
    sender_token = token(folder, "pms", "sender")
    viewer_token = token(folder, "looker", "viewer")
    stranger_token = token(folder, "other", "sender")
    engine = start("run", "--channels", "channels", "--admin-port", "auto", "--console-port", "0",
                   log=open(folder / "engine.log", "w"))
    processes.append(engine)
    found = []
    wait_for(lambda: "HTTP TLS on 127.0.0.1:" in (folder / "engine.log").read_text()
             and found.append((folder / "engine.log").read_text()) is None, 30, "the http source")
    port = found[0].split("HTTP TLS on 127.0.0.1:")[1].split()[0]
    yield {"folder": folder, "url": f"https://127.0.0.1:{port}/hl7", "token": sender_token, "viewer": viewer_token,
           "stranger": stranger_token, "engine": engine}


def test_a_posted_message_is_committed_then_answered_with_its_ack(site, pki):
    sender = Sender(site["url"], pki, site["token"])
    status, headers, body = sender.post(MSG.format(id="H1").encode())
    assert status == 200 and headers["Content-Type"] == "application/hl7-v2"
    assert b"\rMSA|AA|H1" in body and body.startswith(b"MSH|")
    assert "H1" in stored_ids(site["folder"] / "data" / "hl7relay.db")
    status, headers, body = sender.post(json.dumps({"message": MSG.format(id="H2")}).encode(), "application/json")
    answer = json.loads(body)
    assert status == 200 and answer["status"] == "accepted" and answer["ack_code"] == "AA"
    assert answer["control_id"] == "H2" and "MSA|AA|H2" in answer["ack"]
    status, _, body = sender.post(b"not a message")
    assert status == 400 and b"MSA|AR|" in body
    assert sender.post(MSG.format(id="H3").encode(), "text/csv")[0] == 415
    assert sender.post(b"MSH|" + b"x" * 5000)[0] == 413  # over max_body: refused before it is read


def test_only_a_sender_token_the_channel_names_may_post(site, pki):
    anonymous = Sender(site["url"], pki)
    status, headers, _ = anonymous.post(MSG.format(id="A1").encode())
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert anonymous.post(MSG.format(id="A2").encode(), token="made-up")[0] == 401
    assert anonymous.post(MSG.format(id="A3").encode(), token=site["viewer"])[0] == 403  # not a sender token
    assert anonymous.post(MSG.format(id="A4").encode(), token=site["stranger"])[0] == 403  # not one this channel names
    ids = stored_ids(site["folder"] / "data" / "hl7relay.db")
    assert not [i for i in ids if i.startswith("A")]
    # a sender token is good for nothing else: the operations API refuses it
    endpoint = (site["folder"] / "data" / "api-endpoint").read_text().strip()
    request = urllib.request.Request(f"{endpoint}/api/v1/status", headers={"Authorization": f"Bearer {site['token']}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403


def test_an_idempotency_key_gets_the_first_answer_and_the_rate_limit_says_when(site, pki):
    sender = Sender(site["url"], pki, site["token"])
    first = sender.post(MSG.format(id="I1").encode(), **{"Idempotency-Key": "abc-1"})
    again = sender.post(MSG.format(id="I1").encode(), **{"Idempotency-Key": "abc-1"})
    assert first[0] == again[0] == 200 and first[2] == again[2]
    assert stored_ids(site["folder"] / "data" / "hl7relay.db").count("I1") == 1
    answers = [sender.post(MSG.format(id=f"R{i}").encode()) for i in range(12)]  # 2 a second, 5 at once
    limited = [a for a in answers if a[0] == 429]
    assert limited and limited[0][1]["Retry-After"] == "1" and b"more than 2 requests a second" in limited[0][2]
    assert len(limited) < 12 and answers[0][0] == 200
    stored = stored_ids(site["folder"] / "data" / "hl7relay.db")
    assert all((f"R{i}" in stored) == (answers[i][0] == 200) for i in range(12))  # refused ones were not kept


def test_kill_9_under_load_loses_nothing_answered_2xx(tmp_path, pki, processes):  # noqa: F811
    folder = tmp_path
    folder.joinpath("data").mkdir()
    write_site(folder, pki)
    sender_token = token(folder, "pms", "sender")
    run = ["run", "--channels", "channels", "--admin-port", "0", "--console-port", "0"]
    engine = start(*run, log=open(folder / "engine.log", "w"))
    processes.append(engine)
    wait_for(lambda: "HTTP TLS on 127.0.0.1:" in (folder / "engine.log").read_text(), 30, "the http source")
    port = (folder / "engine.log").read_text().split("HTTP TLS on 127.0.0.1:")[1].split()[0]
    sender = Sender(f"https://127.0.0.1:{port}/hl7", pki, sender_token)
    answered, stop = [], threading.Event()

    def post_many(prefix):
        for i in range(500):
            if stop.is_set():
                return
            try:
                status, _, body = sender.post(MSG.format(id=f"{prefix}-{i:03d}").encode())
            except OSError:
                return  # the engine was killed under us: only what was answered counts
            if status == 200 and f"MSA|AA|{prefix}-{i:03d}".encode() in body:
                answered.append(f"{prefix}-{i:03d}")

    threads = [threading.Thread(target=post_many, args=(f"K{c}",)) for c in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(answered) >= 60, 60, "60 answers")
    engine.send_signal(signal.SIGKILL)  # no shutdown: only what was committed survives
    engine.wait(timeout=30)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert set(answered) <= set(stored_ids(folder / "data" / "hl7relay.db"))


def test_while_the_store_fails_the_answer_is_503_with_retry_after():
    from twisted.internet import defer, task

    from hl7relay.ack import AckPolicy, Outcome
    from hl7relay.channels.http_source import HTTPSource, HTTPSourceConfig
    from hl7relay.httpwire import RequestFramer
    from hl7relay.resources import Resources

    class FailingStore:
        policy = AckPolicy()
        resources = Resources(task.Clock())

        def handle(self, message, peer):
            return defer.succeed(Outcome.internal_error("the store is not answering"))

        def unreadable(self, text):
            return self.policy.unreadable(text)

    class Connection:
        client = ("127.0.0.1", 5000)

        def client_subject(self):
            return "pms"

    config = HTTPSourceConfig("127.0.0.1", 0, "/hl7", None, (), 1024, 0.0, 1, 60.0, "UTF-8")
    source = HTTPSource(config, FailingStore())

    async def mutual_tls(request, connection):
        return "cert:pms"

    source.endpoint._sender = mutual_tls
    data = MSG.format(id="F1").encode()
    [request] = RequestFramer().feed(b"POST /hl7 HTTP/1.1\r\nContent-Type: application/hl7-v2\r\n"
                                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    replies = []
    defer.ensureDeferred(source.endpoint.post(request, Connection())).addCallback(replies.append)
    [reply] = replies
    assert reply.status == 503 and reply.headers["Retry-After"] == "5" and b"MSA|AR|F1" in reply.body

    class FailingReads:  # the store cannot be read: a token cannot be checked either
        store = None

        def read(self, fn, *args):
            from hl7relay.store.database import StoreError

            return defer.fail(StoreError("database is locked"))

    FailingStore.resources.writer = FailingReads()
    with_tokens = HTTPSource(HTTPSourceConfig("127.0.0.1", 0, "/hl7", None, ("pms",), 1024, 0.0, 1, 60.0, "UTF-8"),
                             FailingStore())
    [request] = RequestFramer().feed(b"POST /hl7 HTTP/1.1\r\nAuthorization: Bearer abc\r\n"
                                     b"Content-Type: application/hl7-v2\r\nContent-Length: %d\r\n\r\n%s"
                                     % (len(data), data))
    replies = []
    defer.ensureDeferred(with_tokens.endpoint.post(request, Connection())).addCallback(replies.append)
    assert replies[0].status == 503 and replies[0].headers["Retry-After"] == "5"  # not "unknown token"


def test_simulate_posts_to_an_http_source_and_listen_rehearses_a_failing_api(site, pki, tmp_path):
    (tmp_path / "sender.token").write_text(site["token"] + "\n")
    result = hl7relay(site["folder"], "simulate", "--url", site["url"], "--token-file", str(tmp_path / "sender.token"),
                      "--tls-ca", pki["ca"], "--count", "4", "--connections", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sent 4 messages" in result.stdout and "to https://127.0.0.1:" in result.stdout and "answers: AA 4" in result.stdout
    assert site["token"] not in result.stdout + result.stderr
    wrong = hl7relay(site["folder"], "simulate", "--url", site["url"], "--port", "2575")
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1
    listener = subprocess.Popen([sys.executable, "-m", "hl7relay", "listen", "--http", "--port", "0", "--status", "429",
                                 "--retry-after", "7", "--fail-first", "2"], stdout=subprocess.PIPE, text=True)
    try:
        first = listener.stdout.readline()
        assert first.startswith("hl7relay listen: HTTP on 127.0.0.1:"), first
        url = first.split("(")[1].split(")")[0]
        answers = []
        for i in range(3):
            request = urllib.request.Request(url, data=MSG.format(id=f"L{i}").encode(), method="POST",
                                             headers={"Content-Type": "application/hl7-v2"})
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    answers.append((answer.status, answer.headers.get("Retry-After"), json.loads(answer.read())))
            except urllib.error.HTTPError as error:
                answers.append((error.code, error.headers.get("Retry-After"), json.loads(error.read())))
        assert answers[0][:2] == answers[1][:2] == (429, "7") and answers[2] == (201, None, {"received": "L2"})
        lines = [listener.stdout.readline() for _ in range(3)]
        assert "ADT^A08^ADT_A01 L0" in lines[0] and lines[0].rstrip().endswith("-> 429 Retry-After 7")
        assert lines[2].rstrip().endswith("-> 201")
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=30)
        listener.stdout.close()
    wrong = hl7relay(site["folder"], "listen", "--status", "429")
    assert wrong.returncode == 2 and wrong.stderr.strip() == ("hl7relay listen: --status and --retry-after answer "
                                                              "HTTP requests: add --http")


def test_check_inbound_shows_who_posted(site, pki):
    sender = Sender(site["url"], pki, site["token"])
    assert sender.post(MSG.format(id="W1").encode())[0] == 200
    result = hl7relay(site["folder"], "check", "--inbound", "pms-in")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pms-in: listening on 127.0.0.1:" in result.stdout
    assert "peer 127.0.0.1: 1 connection(s), 1 message(s), last message" in result.stdout


def test_mutual_tls_authenticates_a_sender_without_a_token(tmp_path, pki, processes):  # noqa: F811
    (tmp_path / "data").mkdir()
    write_site(tmp_path, pki, extra=f", tls_ca: '{pki['ca']}', require_client_cert: true")
    engine = start("run", "--channels", "channels", "--admin-port", "0", "--console-port", "0",
                   log=open(tmp_path / "engine.log", "w"))
    processes.append(engine)
    wait_for(lambda: "HTTP TLS on 127.0.0.1:" in (tmp_path / "engine.log").read_text(), 30, "the http source")
    port = (tmp_path / "engine.log").read_text().split("HTTP TLS on 127.0.0.1:")[1].split()[0]
    sender = Sender(f"https://127.0.0.1:{port}/hl7", pki)
    sender.context.load_cert_chain(pki["client"], pki["client_key"])
    status, _, body = sender.post(MSG.format(id="M1").encode())
    assert status == 200 and b"MSA|AA|M1" in body
    stranger = Sender(f"https://127.0.0.1:{port}/hl7", pki)  # no client certificate: the handshake is refused
    with pytest.raises(OSError):
        stranger.post(MSG.format(id="M2").encode())
    peers = stored_peers(tmp_path / "data" / "hl7relay.db")
    assert peers == ["cert:hl7relay client@127.0.0.1"], peers


def stored_peers(db):
    import sqlite3

    with sqlite3.connect(db) as connection:
        return [row[0].rsplit(":", 1)[0] for row in connection.execute("SELECT peer FROM messages")]
