"""The web console: sessions and back-off alone, the dashboard from memory, and every route against
a real `hl7relay run` (roles, CSRF, Origin, headers, masking, the audit log)."""

import http.cookiejar
import re
import socket
import urllib.error
import urllib.parse
import urllib.request

import pytest

from hl7relay.controls import Controls
from hl7relay.console.sessions import LoginThrottle, Sessions
from hl7relay.mllp.framing import MLLPFramer, frame
from hl7relay.ops.auth import hash_password

PASSWORD = "a long enough password"
ADT = ("MSH|^~\\&|PMS|CLINIC|HL7RELAY|LAB|20240105093512||ADT^A01^ADT_A01|{id}|P|2.5.1\r"
       "EVN|A01|20240105093512\rPID|1||100234^^^CLINIC^MR||SAMPLEPATIENT^JANE\rPV1|1|O\r")
USERS = {"viewer": ("viewer", False), "operator": ("operator", False), "phi-operator": ("operator", True),
         "admin": ("admin", False)}
EXTRA_USERS = {"guessed": "admin", "changer": "viewer", "two-places": "viewer"}  # the target of the wrong-password test, so the others are not held back


class Clock:
    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self):
        return self.now


# -- sessions and back-off, alone ------------------------------------------------------------------
def test_sessions_end_when_idle_after_their_absolute_limit_and_on_sign_out():
    clock = Clock()
    sessions = Sessions(clock, idle=900, absolute=3600)
    session_id, session = sessions.create("alice", "admin", False, "127.0.0.1")
    assert sessions.get(session_id) is session and session_id not in repr(sessions._sessions)  # kept hashed
    clock.now += 899
    assert sessions.get(session_id) is session  # activity moves the idle limit
    clock.now += 901
    assert sessions.get(session_id) is None  # idle too long
    session_id, _ = sessions.create("alice", "admin", False, "127.0.0.1")
    for _ in range(5):
        clock.now += 800
        sessions.get(session_id)
    assert sessions.get(session_id) is None  # active all along, but past the absolute limit
    first, _ = sessions.create("alice", "admin", False, "a")
    second, _ = sessions.create("alice", "admin", False, "b")
    other, _ = sessions.create("bob", "viewer", False, "c")
    sessions.end(first)
    assert sessions.get(first) is None and sessions.get(second) is not None
    assert sessions.end_all("alice") == 1 and sessions.get(second) is None and sessions.get(other) is not None
    assert sessions.get("") is None and sessions.get("made-up") is None


def test_csrf_tokens_are_per_session():
    sessions = Sessions(Clock())
    _, one = sessions.create("a", "viewer", False, "x")
    _, two = sessions.create("a", "viewer", False, "x")
    assert one.csrf != two.csrf and Sessions.csrf_ok(one, one.csrf)
    assert not Sessions.csrf_ok(one, two.csrf) and not Sessions.csrf_ok(one, "") and not Sessions.csrf_ok(one, None)


def test_failed_sign_ins_back_off():
    clock = Clock()
    throttle = LoginThrottle(clock, free=3)
    for _ in range(3):
        assert throttle.wait("alice") == 0
        throttle.failed("alice")
    assert throttle.wait("alice") == 0  # three free
    throttle.failed("alice")
    assert throttle.wait("alice") == 1 and throttle.wait("bob") == 0
    clock.now += 1
    throttle.failed("alice")
    assert throttle.wait("alice") == 2  # doubling
    throttle.succeeded("alice")
    assert throttle.wait("alice") == 0
    for _ in range(40):
        throttle.failed("bob")
    assert throttle.wait("bob") == 15 * 60  # capped


# -- the dashboard reads memory only ------------------------------------------------------------------
def test_the_dashboard_does_not_read_the_store(unit_engine, manual_executor):
    from hl7relay.console.app import Console
    from hl7relay.hl7.message import Message

    engine, channel, store, clock = unit_engine
    engine.handle(channel, Message(ADT.format(id="D1")), "peer")
    manual_executor.run_all()

    class NoStore:
        def __getattr__(self, name):
            raise AssertionError(f"the dashboard read the store ({name})")

    engine.writer.store, engine.writer.read = NoStore(), NoStore()
    console = Console(Controls(engine), clock, clock=clock.seconds)
    html = console.render_channels()
    assert 'data-channel="adt"' in html and 'data-count="received">1 / 1<' in html and 'data-destination="lab"' in html
    assert "SAMPLEPATIENT" not in html
    renders = []
    console.dashboard_data = lambda original=console.dashboard_data: renders.append(1) or original()
    for _ in range(100):  # a hundred live views in one tick: the render already made serves them
        console.render_channels()
    assert renders == []
    clock.advance(0.6)
    console.render_channels()
    console.render_channels()
    assert renders == [1]


# -- against a real engine ---------------------------------------------------------------------------
class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class Browser:
    """A cookie-keeping client that does not follow redirects (so they can be checked)."""

    def __init__(self, base):
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), NoRedirect())
        self.csrf = None

    def request(self, method, path, form=None, headers=None):
        data = urllib.parse.urlencode(form).encode() if form is not None else (b"" if method == "POST" else None)
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers or {})
        from secret_scan import record_output

        try:
            with self.opener.open(request, timeout=30) as response:
                answer = response.status, dict(response.headers), response.read().decode()
        except urllib.error.HTTPError as exc:
            answer = exc.code, dict(exc.headers), exc.read().decode()
        record_output(answer[2])
        return answer

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, form=None, csrf=True, **kw):
        form = dict(form or {})
        if csrf and self.csrf:
            form.setdefault("csrf", self.csrf)
        return self.request("POST", path, form, **kw)

    def login(self, name, password=PASSWORD):
        _, _, body = self.get("/login")
        token = re.search(r'name="login_token" value="([^"]+)"', body).group(1)
        status, headers, body = self.request("POST", "/login", {"login_token": token, "name": name, "password": password,
                                                                "next": "/"})
        if status == 303:
            _, _, page = self.get("/")
            self.csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        return status, headers, body


@pytest.fixture(scope="module")
def engine(tmp_path_factory, running_engine):
    def prepare(store):
        for name, (role, phi) in USERS.items():
            store.add_user(name, role, hash_password(PASSWORD), {"actor": "test", "action": "user.add", "target": name})
            if phi:
                store.update_user(name, {"actor": "test", "action": "user.phi", "target": name}, phi=True)
        for name, role in EXTRA_USERS.items():
            store.add_user(name, role, hash_password(PASSWORD), {"actor": "test", "action": "user.add", "target": name})

    running = running_engine(tmp_path_factory.mktemp("console"), "--admin-port", "0", "--console-port", "auto",
                             prepare=prepare)
    with socket.create_connection(("127.0.0.1", running.mllp_port)) as pms:  # one message with a patient name in it
        pms.sendall(frame(ADT.format(id="CON1").encode()))
        framer, got = MLLPFramer(), []
        while not got:
            got = framer.feed(pms.recv(65536))
    yield {"base": running.console, "folder": running.folder, "store": running.store, "mllp_port": running.mllp_port}
    assert running.stop() == 0


def signed_in(engine, name):
    browser = Browser(engine["base"])
    status, _, _ = browser.login(name)
    assert status == 303
    return browser


def test_anonymous_visitors_are_sent_to_sign_in_and_see_the_way_to_the_first_account(engine):
    browser = Browser(engine["base"])
    for path in ("/", "/messages", "/messages/1"):
        status, headers, _ = browser.get(path)
        assert status == 303 and headers["Location"].startswith("/login?next=")
    assert browser.get("/live/dashboard")[0] == 401
    assert browser.post("/messages/1/reveal", {"reason": "x"})[0] == 401
    status, headers, body = browser.get("/login")
    assert status == 200 and "hl7relay user add NAME --role admin" not in body  # there are users
    assert "samesite=strict" in headers["Set-Cookie"].lower() and "HttpOnly" in headers["Set-Cookie"]


def test_sign_in_sets_a_strict_cookie_and_sign_out_ends_the_session(engine):
    browser = Browser(engine["base"])
    status, headers, _ = browser.login("viewer")
    cookie = headers["Set-Cookie"]
    assert status == 303 and headers["Location"] == "/"
    assert "hl7relay_session=" in cookie and "HttpOnly" in cookie and "samesite=strict" in cookie.lower() and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback here; under TLS the cookie says Secure
    assert browser.get("/")[0] == 200
    kept = list(browser.jar)
    assert browser.post("/logout")[0] == 303
    assert browser.get("/")[0] == 303
    replayed = Browser(engine["base"])  # the old cookie, sent again after sign-out, is worth nothing
    for cookie in kept:
        replayed.jar.set_cookie(cookie)
    assert replayed.get("/")[0] == 303


def test_sign_out_everywhere_ends_every_session_of_the_user(engine):
    first, second = signed_in(engine, "operator"), signed_in(engine, "operator")
    assert first.post("/logout", {"everywhere": "1"})[0] == 303
    assert second.get("/")[0] == 303


def test_wrong_passwords_are_refused_audited_and_back_off(engine):
    store = engine["store"]
    before = len(store.audit_entries(action="login", limit=1000))
    browser = Browser(engine["base"])
    codes = [browser.login("guessed", "wrong password!")[0] for _ in range(4)]
    assert codes == [401, 401, 401, 401]
    status, _, body = browser.login("guessed", "wrong password!")
    assert status == 429 and "try again in" in body
    entries = store.audit_entries(action="login", limit=1000)[: len(store.audit_entries(action="login", limit=1000)) - before]
    assert [e["result"] for e in entries] == ["refused", "failed", "failed", "failed", "failed"]
    assert all(e["actor"] == "user:guessed" and e["source"] == "127.0.0.1" for e in entries)
    assert browser.login("guessed")[0] == 429  # even the right password waits its turn
    assert Browser(engine["base"]).login("nobody", "wrong password!")[0] == 401  # the address has more room
    assert Browser(engine["base"]).login("viewer")[0] == 303


def test_every_response_carries_the_security_headers(engine):
    browser = signed_in(engine, "admin")
    for path in ("/", "/messages", "/messages/1", "/login", "/nope", "/static/console.css"):
        _, headers, _ = browser.get(path)
        assert headers["X-Content-Type-Options"] == "nosniff" and headers["Referrer-Policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert "script-src 'self'" in headers["Content-Security-Policy"] and "unsafe" not in headers["Content-Security-Policy"]
        if not path.startswith("/static/"):
            assert headers["Cache-Control"] == "no-store"


ROUTES = [  # (method, path, least role, status when allowed); "phi": operator with the PHI permission, or admin
    ("GET", "/", "viewer", 200),
    ("GET", "/messages", "viewer", 200),
    ("GET", "/messages?channel=adt&status=PROCESSED", "viewer", 200),
    ("GET", "/messages/1", "viewer", 200),
    ("POST", "/messages/1/reveal", "phi", 200),
    ("POST", "/messages/1/download", "phi", 200),
    ("POST", "/messages/1/replay", "operator", 200),  # the dry run
    ("GET", "/channels", "viewer", 200),
    ("POST", "/channels/adt/disable", "operator", 303),
    ("POST", "/channels/adt/destinations/lab/pause", "operator", 303),
    ("POST", "/channels/adt/destinations/lab/retry", "operator", 303),
    ("POST", "/reload", "admin", 303),
    ("GET", "/dead-letters", "operator", 200),
    ("GET", "/audit", "admin", 200),
    ("GET", "/audit?format=json&action=login", "admin", 200),
    ("GET", "/users", "admin", 200),
    ("POST", "/users/add", "admin", 400),  # allowed: refused for what it lacks (no name), after the role check
    ("POST", "/users/viewer/enable", "admin", 303),
    ("POST", "/tokens/nope/revoke", "admin", 404),
    ("GET", "/account", "viewer", 200),
    ("GET", "/sync", "viewer", 200),
    ("GET", "/files", "viewer", 200),
    ("GET", "/configuration", "viewer", 200),
    ("POST", "/configuration/1/rollback", "admin", 303),  # to the engine's own first snapshot: the same files
    ("GET", "/credentials", "admin", 200),
    ("POST", "/credentials/check", "admin", 404),  # allowed: no credential of that name (none here)
]
ALLOWED = {"viewer": {"viewer", "operator", "phi-operator", "admin"}, "phi": {"phi-operator", "admin"},
           "operator": {"operator", "phi-operator", "admin"}, "admin": {"admin"}}
UNDO = {"/channels/adt/disable": "/channels/adt/enable", "/channels/adt/destinations/lab/pause": "/channels/adt/destinations/lab/resume"}


@pytest.mark.parametrize("method, path, least, allowed", ROUTES)
def test_every_route_for_every_role(engine, method, path, least, allowed):
    anonymous = Browser(engine["base"])
    # a channel disabled is confirmed on a page of its own: here the second step, where it happens
    form = {"reason": "route matrix"} | ({"confirm": "1"} if path.endswith("/disable") else {})
    if method == "GET":
        status, headers, _ = anonymous.get(path)
        assert status == 303 and headers["Location"].startswith("/login?next=")
    else:
        assert anonymous.post(path, form)[0] == 401
        admin = signed_in(engine, "admin")  # every POST: without the CSRF token, or from another site, refused
        assert admin.post(path, form, csrf=False)[0] == 403
        assert admin.post(path, form, headers={"Origin": "http://evil.example"})[0] == 403
    for user in USERS:
        browser = signed_in(engine, user)
        if method == "GET":
            status, _, body = browser.get(path)
        else:
            status, _, body = browser.post(path, form)
        assert status == (allowed if user in ALLOWED[least] else 403), (user, status)
        if not path.endswith(("/reveal", "/download")):
            assert "SAMPLEPATIENT" not in body  # masked everywhere but in a reveal or a download
        if status == allowed and path in UNDO:
            assert browser.post(UNDO[path], {"reason": "route matrix: undo"})[0] == 303


def test_controls_act_and_write_one_audit_row_each(engine):
    store = engine["store"]
    browser = signed_in(engine, "operator")
    cases = [("/channels/adt/destinations/lab/pause", "destination.pause", "adt/lab", "paused"),
             ("/channels/adt/destinations/lab/resume", "destination.resume", "adt/lab", "ok|down|failing|idle"),
             ("/channels/adt/destinations/lab/retry", "destination.retry", "adt/lab", None),
             ("/channels/adt/disable", "channel.disable", "adt", "disabled"),
             ("/channels/adt/enable", "channel.enable", "adt", "running")]
    for path, action, target, state in cases:
        before = len(store.audit_entries(action=action, limit=1000))
        if action == "channel.disable":  # confirmed on a page of its own first, the reason carried over
            status, _, page = browser.post(path, {"reason": f"INC-5 {action}"})
            assert status == 200 and "Disable channel adt?" in page and "stops accepting messages" in page
            assert f'value="INC-5 {action}"' in page and len(store.audit_entries(action=action, limit=1000)) == before
        status, headers, _ = browser.post(path, {"reason": f"INC-5 {action}", "confirm": "1"})
        assert status == 303 and headers["Location"].startswith("/channels?done=")
        entries = store.audit_entries(action=action, limit=1000)
        assert len(entries) == before + 1, action
        assert (entries[0]["actor"], entries[0]["target"], entries[0]["reason"]) == ("user:operator", target, f"INC-5 {action}")
        _, _, page = browser.get(headers["Location"])
        assert 'role="status"' in page
        if state:
            section = page.split('id="channel-adt"')[1]
            assert re.search(state, section), (action, state)
    assert browser.post("/channels/nope/disable", {})[0] == 404
    assert browser.post("/channels/adt/disable", {})[0] == 400  # never one keypress: it says why
    assert browser.post("/channels/adt/disable", {"reason": "  "})[0] == 400 and "running" in browser.get("/channels")[2]
    assert browser.post("/channels/adt/destinations/nope/pause", {})[0] == 404
    assert browser.post("/channels/adt/explode", {})[0] == 404
    status, _, page = signed_in(engine, "viewer").get("/channels")
    assert status == 200 and "Disable channel" not in page and "Retry now" not in page and "Reload channel files" not in page
    assert "lint clean" in page and "name: adt" in page  # the file as it is on disk


def test_a_reload_with_a_broken_file_changes_nothing_and_says_why(engine):
    admin = signed_in(engine, "admin")
    broken = engine["folder"] / "channels" / "broken.yaml"
    broken.write_text("name: broken\nsource: {type: mllp, prot: 1}\n")
    try:
        status, _, body = admin.post("/reload", {"reason": "try"})
        assert status == 422 and "unknown key &#39;prot&#39;" in body and "nothing changed" in body
        assert engine["store"].audit_entries(action="reload")[0]["result"] == "refused"
    finally:
        broken.unlink()
    assert admin.post("/reload", {"reason": "fixed"})[0] == 303
    assert engine["store"].audit_entries(action="reload")[0]["result"] == "ok"


def test_every_post_needs_the_csrf_token_and_our_origin(engine):
    browser = signed_in(engine, "admin")
    assert browser.post("/messages/1/reveal", {"reason": "x"}, csrf=False)[0] == 403
    assert browser.post("/messages/1/reveal", {"reason": "x", "csrf": "forged"}, csrf=False)[0] == 403
    assert browser.post("/messages/1/reveal", {"reason": "x"}, headers={"Origin": "http://evil.example"})[0] == 403
    # a browser on our own page under no-referrer says Origin: null; Fetch Metadata tells where it came from
    assert browser.post("/messages/1/reveal", {"reason": "x"}, headers={"Origin": "null", "Sec-Fetch-Site": "cross-site"})[0] == 403
    assert browser.post("/messages/1/reveal", {"reason": "x"}, headers={"Origin": "null"})[0] == 403
    assert browser.post("/messages/1/reveal", {"reason": "x"}, headers={"Sec-Fetch-Site": "same-site"})[0] == 403
    assert browser.post("/logout", csrf=False)[0] == 403
    assert browser.get("/")[0] == 200  # still signed in: the forged sign-out did nothing
    other = signed_in(engine, "admin")
    assert browser.post("/messages/1/reveal", {"reason": "x", "csrf": other.csrf}, csrf=False)[0] == 403
    assert browser.post("/messages/1/reveal", {"reason": "x"}, headers={"Origin": engine["base"]})[0] == 200
    # the sign-in form is protected too: a login token from another visit does not sign in
    stranger = Browser(engine["base"])
    assert stranger.request("POST", "/login", {"login_token": "made-up", "name": "admin", "password": PASSWORD})[0] == 403


def test_a_reveal_needs_a_reason_and_writes_exactly_one_audit_row(engine):
    store = engine["store"]
    browser = signed_in(engine, "phi-operator")
    count = len(store.audit_entries(action="phi.view", limit=1000))
    assert browser.post("/messages/1/reveal", {"reason": " "})[0] == 400
    assert len(store.audit_entries(action="phi.view", limit=1000)) == count
    status, _, body = browser.get("/messages/1")
    assert status == 200 and "SAMPLEPATIENT" not in body and "Show patient data" in body
    status, _, body = browser.post("/messages/1/reveal", {"reason": "INC-42 wrong ward"})
    assert status == 200 and "SAMPLEPATIENT^JANE" in body
    entries = store.audit_entries(action="phi.view", limit=1000)
    assert len(entries) == count + 1
    assert (entries[0]["actor"], entries[0]["target"], entries[0]["reason"]) == ("user:phi-operator", "message 1", "INC-42 wrong ward")
    assert entries[0]["role"] == "operator" and entries[0]["source"] == "127.0.0.1"
    viewer = signed_in(engine, "viewer")
    status, _, body = viewer.get("/messages/1")
    assert "Show patient data" not in body and "/reveal" not in body  # no control for who may not use it
    assert viewer.post("/messages/1/reveal", {"reason": "curious"})[0] == 403
    assert len(store.audit_entries(action="phi.view", limit=1000)) == count + 1


def test_messages_are_found_by_control_id_and_a_patient_id_search_is_audited(engine):
    store = engine["store"]
    browser = signed_in(engine, "viewer")
    status, _, body = browser.get("/messages?control_id=CON1")
    assert status == 200 and 'href="/messages/1"' in body and "1***" in body and "100234" not in body
    assert "No messages match" in browser.get("/messages?control_id=NOPE")[2]
    status, _, body = browser.get("/messages?delivery_status=QUEUED")  # the lab never answers: still queued
    assert status == 200 and 'href="/messages/1"' in body and "<option selected>QUEUED</option>" in body
    assert "No messages match" in browser.get("/messages?control_id=CON1&delivery_status=SENT")[2]
    assert "No messages match" in browser.get("/messages?control_id=CON1&failed=1")[2]  # queued: nothing failed
    count = len(store.audit_entries(action="messages.search", limit=1000))
    status, _, body = browser.get("/messages?patient_id=100234")
    assert status == 200 and 'href="/messages/1"' in body
    assert len(store.audit_entries(action="messages.search", limit=1000)) == count + 1
    assert browser.get("/messages?since=yesterday")[0] == 400
    assert browser.get("/messages/999999")[0] == 404
    huge = "99999999999999999999999"  # beyond any row id: a clear answer, not an overflow
    assert browser.get(f"/messages/{huge}")[0] == 404 and browser.get(f"/messages?before={huge}")[0] == 400
    assert browser.get("/messages?before=-1")[0] == 400


def test_a_content_search_needs_the_phi_permission_and_is_audited_with_its_text(engine):
    """A viewer's free-text search for a name told which messages held it, unaudited."""
    store = engine["store"]
    viewer = signed_in(engine, "viewer")
    assert 'name="text"' not in viewer.get("/messages")[2]  # no field for who may not use it
    assert viewer.get("/messages?text=SAMPLEPATIENT")[0] == 403
    assert not store.audit_entries(action="messages.search_text", limit=10)
    permitted = signed_in(engine, "phi-operator")
    status, _, body = permitted.get("/messages?text=SAMPLEPATIENT")
    assert status == 200 and 'name="text"' in body and 'href="/messages/1"' in body
    entry = store.audit_entries(action="messages.search_text", limit=10)[0]
    assert (entry["actor"], entry["detail"]) == ("user:phi-operator", "text 'SAMPLEPATIENT'")


def test_the_live_dashboard_streams_server_sent_events(engine):
    browser = signed_in(engine, "viewer")
    request = urllib.request.Request(engine["base"] + "/live/dashboard")
    with browser.opener.open(request, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        data = b""
        while b"</table>" not in data:
            data += response.read1(65536)
    assert b"event: channels\n" in data and b'data: <tr class="channel" data-channel="adt">' in data


def test_a_disabled_user_is_refused(engine):
    store = engine["store"]
    store.add_user("leaver", "viewer", hash_password(PASSWORD), {"actor": "test", "action": "user.add"})
    assert signed_in(engine, "leaver").get("/")[0] == 200
    store.update_user("leaver", {"actor": "test", "action": "user.disable"}, disabled=True)
    assert Browser(engine["base"]).login("leaver")[0] == 401


def test_dead_letters_are_grouped_dry_run_then_replayed_with_one_audit_row(engine):
    from hl7relay.store.database import DeliveryRecord, MessageRecord

    store = engine["store"]
    raw = ADT.format(id="DEAD{}").encode()
    records = []
    for i in range(3):  # their errors are recorded below, as a queue records them
        record = MessageRecord("adt", raw.replace(b"DEAD{}", f"DEAD{i}".encode()), "PROCESSED", 1_700_000_000.0 + i,
                               "10.0.0.9:1", "UTF-8", control_id=f"DEAD{i}", message_type="ADT^A01", patient_id="100234")
        record.deliveries.append(DeliveryRecord("lab", "ERROR"))
        records.append(record)
    ids = store.commit(records, [])
    from hl7relay.store.database import DeliveryUpdate

    store.commit([], [DeliveryUpdate(i, "lab", {"last_error": e, "attempts": 1, "updated_at": 1_700_000_100.0})
                      for i, e in zip(ids, ["AE: SAMPLEPATIENT unknown", "AE: SAMPLEPATIENT unknown", "gave up after 10 attempts"])])
    operator = signed_in(engine, "operator")
    status, _, found = operator.get("/messages?failed=1")  # the same from the messages page, with why
    assert status == 200 and "DEAD0" in found and "lab: gave up after 10 attempts" in found
    assert "SAMPLEPATIENT" not in found and 'name="failed" value="1" checked' in found
    status, _, page = operator.get("/dead-letters")
    assert status == 200 and "SAMPLEPATIENT" not in page  # a peer's error text is masked like any other
    tokens = re.findall(r'name="group" value="([^"]+)"', page)
    assert len(tokens) == 2 and ">2</a>" in page and ">1</a>" in page
    ae = tokens[[i for i, row in enumerate(page.split('name="group"')[1:]) if "gave up" not in row.split("</tr>")[0]][0]]
    audits = len(store.audit_entries(action="replay.bulk", limit=1000))
    status, _, preview = operator.post("/dead-letters/replay", {"group": ae})
    assert status == 200 and re.search(r'id="would-replay">2<', preview) and "DEAD0" in preview and "DEAD1" in preview
    assert len(store.audit_entries(action="replay.bulk", limit=1000)) == audits and store.replays_of(ids[0]) == []
    assert operator.post("/dead-letters/replay", {"group": ae, "confirm": "1"})[0] == 400  # no reason
    status, headers, _ = operator.post("/dead-letters/replay", {"group": ae, "confirm": "1", "reason": "INC-77 lab fixed"})
    assert status == 303 and "replayed+2" in headers["Location"]
    entries = store.audit_entries(action="replay.bulk", limit=1000)
    assert len(entries) == audits + 1 and entries[0]["reason"] == "INC-77 lab fixed" and entries[0]["actor"] == "user:operator"
    assert entries[0]["detail"].startswith("replayed 2, skipped 0")
    for original in ids[:2]:
        [replay] = store.replays_of(original)
        assert replay["replay_operator"] == "user:operator"
        assert [d["status"] for d in store.get_message(original)["deliveries"]] == ["REPLAYED"]
        _, _, detail = operator.get(f"/messages/{original}")
        assert f'href="/messages/{replay["id"]}"' in detail and "Replayed as" in detail
    _, _, page = operator.get("/dead-letters")
    assert len(re.findall(r'name="group" value=', page)) == 1 and "gave up after 10 attempts" in page
    assert operator.post("/dead-letters/replay", {"group": "bm90IGEgZ3JvdXA="})[0] == 400
    assert operator.post("/dead-letters/replay", {})[0] == 400
    assert signed_in(engine, "viewer").post("/dead-letters/replay", {"group": tokens[0]})[0] == 403


def test_an_admin_manages_users_and_tokens_each_change_audited(engine):
    store = engine["store"]
    admin = signed_in(engine, "admin")

    def audited(action, target):
        entries = [e for e in store.audit_entries(action=action, limit=1000) if e["target"] == target]
        return len(entries)

    status, _, page = admin.get("/users")
    assert status == 200 and 'data-user="viewer"' in page and PASSWORD not in page and "scrypt" not in page
    assert admin.post("/users/add", {"name": "newbie", "role": "viewer", "password": "short"})[0] == 400
    assert admin.post("/users/add", {"name": "new bie", "role": "viewer", "password": PASSWORD})[0] == 400
    assert admin.post("/users/add", {"name": "newbie", "role": "root", "password": PASSWORD})[0] == 400
    status, headers, _ = admin.post("/users/add", {"name": "newbie", "role": "viewer", "password": PASSWORD})
    assert status == 303 and audited("user.add", "newbie") == 1
    assert admin.post("/users/add", {"name": "newbie", "role": "viewer", "password": PASSWORD})[0] == 409
    newbie = signed_in(engine, "newbie")
    assert newbie.get("/users")[0] == 403
    assert admin.post("/users/newbie/phi", {"phi": "on"})[0] == 400  # a viewer cannot be given it
    assert admin.post("/users/newbie/role", {"role": "operator"})[0] == 400  # a role change says why
    assert store.get_user("newbie")["role"] == "viewer"
    # a role change is confirmed on a page of its own that says what it gives, the reason carried over
    status, _, page = admin.post("/users/newbie/role", {"role": "operator", "reason": "INC-9 on call"})
    assert status == 200 and "Make newbie an operator?" in page and "newbie is a viewer now" in page
    assert 'name="confirm" value="1"' in page and 'value="INC-9 on call"' in page
    assert store.get_user("newbie")["role"] == "viewer" and audited("user.role", "newbie") == 0
    assert admin.post("/users/newbie/role", {"role": "operator", "reason": "INC-9 on call", "confirm": "1"})[0] == 303
    assert store.get_user("newbie")["role"] == "operator" and audited("user.role", "newbie") == 1
    assert newbie.get("/")[0] == 303  # a changed account signs in again
    assert admin.post("/users/newbie/phi", {"phi": "on"})[0] == 303 and store.get_user("newbie")["phi"] is True
    assert admin.post("/users/newbie/passwd", {"password": "another long password"})[0] == 303
    assert Browser(engine["base"]).login("newbie")[0] == 401
    newbie = Browser(engine["base"])
    assert newbie.login("newbie", "another long password")[0] == 303
    assert admin.post("/users/newbie/disable")[0] == 303
    assert newbie.get("/")[0] == 303 and Browser(engine["base"]).login("newbie", "another long password")[0] == 401
    assert admin.post("/users/newbie/enable")[0] == 303
    assert admin.post("/users/admin/disable")[0] == 400 and admin.post("/users/admin/remove")[0] == 400  # not yourself
    assert admin.post("/users/newbie/remove")[0] == 303 and store.get_user("newbie") is None
    assert admin.post("/users/newbie/remove")[0] == 404
    for action in ("user.role", "user.phi", "user.passwd", "user.disable", "user.enable", "user.remove"):
        assert audited(action, "newbie") == 1, action
    assert "another long password" not in str(store.audit_entries(limit=1000))

    status, _, page = admin.post("/tokens/create", {"name": "nightly", "role": "viewer"})
    token = re.search(r"<pre>(hl7r_[^<]+)</pre>", page).group(1)
    assert status == 200 and audited("token.create", "nightly") == 1
    from hl7relay.ops.auth import token_hash

    assert store.find_token(token_hash(token))["role"] == "viewer"
    _, _, page = admin.get("/users")
    assert token not in page and 'data-token="nightly"' in page  # shown that once only
    assert admin.post("/tokens/create", {"name": "nightly", "role": "viewer"})[0] == 409
    assert admin.post("/tokens/nightly/revoke")[0] == 303 and store.find_token(token_hash(token)) is None
    assert audited("token.revoke", "nightly") == 1
    assert signed_in(engine, "operator").post("/tokens/create", {"name": "x", "role": "admin"})[0] == 403


def test_anyone_changes_their_own_password(engine):
    store = engine["store"]
    changer = signed_in(engine, "changer")
    status, _, page = changer.post("/account/password", {"current": "wrong!", "new": "a new long password",
                                                          "again": "a new long password"})
    assert status == 400 and "not right" in page
    assert store.audit_entries(action="user.passwd")[0]["result"] == "failed"
    assert changer.post("/account/password", {"current": PASSWORD, "new": "a new long password", "again": "typo"})[0] == 400
    status, headers, _ = changer.post("/account/password", {"current": PASSWORD, "new": "a new long password",
                                                            "again": "a new long password"})
    assert status == 303 and headers["Location"] == "/account?done=password"
    entry = store.audit_entries(action="user.passwd")[0]
    assert (entry["actor"], entry["target"], entry["result"]) == ("user:changer", "changer", "ok")
    assert Browser(engine["base"]).login("changer")[0] == 401
    assert Browser(engine["base"]).login("changer", "a new long password")[0] == 303


def test_the_audit_log_is_filtered_and_exported(engine):
    admin = signed_in(engine, "admin")
    status, _, page = admin.get("/audit?action=login")
    assert status == 200 and "<td>login</td>" in page and "<td>user.add</td>" not in page
    status, headers, body = admin.get("/audit?format=json&action=login&actor=user:admin")
    entries = __import__("json").loads(body)
    assert status == 200 and headers["Content-Type"].startswith("application/json") and "attachment" in headers["Content-Disposition"]
    assert entries and {e["action"] for e in entries} == {"login"} and {e["actor"] for e in entries} == {"user:admin"}
    assert admin.get("/audit?before=x")[0] == 400


def test_a_download_is_the_raw_message_with_a_reason_and_an_audit_row(engine):
    store = engine["store"]
    browser = signed_in(engine, "phi-operator")
    before = len(store.audit_entries(action="phi.download", limit=1000))
    assert browser.post("/messages/1/download", {"reason": ""})[0] == 400
    status, headers, body = browser.post("/messages/1/download", {"reason": "INC-3 vendor asked for the file"})
    assert status == 200 and headers["Content-Disposition"] == 'attachment; filename="message-1.hl7"'
    assert body.startswith("MSH|") and "SAMPLEPATIENT^JANE" in body and headers["Cache-Control"] == "no-store"
    entries = store.audit_entries(action="phi.download", limit=1000)
    assert len(entries) == before + 1 and entries[0]["reason"] == "INC-3 vendor asked for the file"
    assert browser.post("/messages/99999/download", {"reason": "x"})[0] == 404



def test_a_group_larger_than_one_replay_says_how_many_are_left_out(engine):
    """The preview said "1000 message(s)" for a group of 20,000: it says which part it is."""
    from hl7relay.store.database import DeliveryRecord, MessageRecord

    store = engine["store"]
    records = []
    for i in range(1003):
        record = MessageRecord("adt", ADT.format(id=f"BIG{i}").encode(), "PROCESSED", 1_700_000_000.0 + i, "10.0.0.9:1",
                               "UTF-8", control_id=f"BIG{i}", message_type="ADT^A01")
        record.deliveries.append(DeliveryRecord("big-lab", "ERROR"))
        records.append(record)
    store.commit(records, [])
    operator = signed_in(engine, "operator")
    page = operator.get("/dead-letters")[2]
    [token] = [t for t in re.findall(r'name="group" value="([^"]+)"', page)
               if "big-lab" in page.split(f'value="{t}"')[1].split("</tr>")[0]]
    status, _, preview = operator.post("/dead-letters/replay", {"group": token})
    assert status == 200 and "the oldest 1,000 of 1,003" in preview
    assert re.search(r'id="not-this-time">3 more in the selected groups', preview)
    assert preview.index('id="confirm"') < preview.index("BIG0")  # the counts and the confirm come first
    assert "BIG999" in preview and "BIG1000<" not in preview  # the oldest first

def test_a_large_bulk_replay_is_confirmed_by_ticking_its_count(engine):
    """A reason and one click replayed a thousand messages: from LARGE_REPLAY on, the dry run's own
    count must be ticked too, and a count that changed since the dry run replays nothing."""
    from hl7relay.console.messages import LARGE_REPLAY
    from hl7relay.store.database import DeliveryRecord, DeliveryUpdate, MessageRecord

    store = engine["store"]
    ids = store.commit([MessageRecord("adt", ADT.format(id=f"LARGE{i}").encode(), "PROCESSED", 1_700_000_000.0 + i,
                                      control_id=f"LARGE{i}", message_type="ADT^A01", deliveries=[DeliveryRecord("lab", "ERROR")])
                        for i in range(LARGE_REPLAY)], [])
    store.commit([], [DeliveryUpdate(i, "lab", {"last_error": "AR: large test", "updated_at": 1_700_000_100.0}) for i in ids])
    operator = signed_in(engine, "operator")
    page = operator.get("/dead-letters")[2]
    [token] = [t for t in re.findall(r'name="group" value="([^"]+)"', page)
               if "AR: large test" in page.split(f'value="{t}"')[1].split("</tr>")[0]]
    status, _, preview = operator.post("/dead-letters/replay", {"group": token})
    assert status == 200 and f'name="count" value="{LARGE_REPLAY}" required' in preview
    audits = len(store.audit_entries(action="replay.bulk", limit=1000))
    for count in (None, str(LARGE_REPLAY - 1)):  # not ticked (a forced POST), or a count from an older dry run
        form = {"group": token, "confirm": "1", "reason": "INC-90"} | ({"count": count} if count else {})
        status, _, again = operator.post("/dead-letters/replay", form)
        assert status == 409 and f"Not replayed: {LARGE_REPLAY} message(s) would be replayed now" in again
    assert len(store.audit_entries(action="replay.bulk", limit=1000)) == audits and store.replays_of(ids[0]) == []
    # a small group needs no count (the dry run and a reason are enough): see the test above


def test_a_message_is_replayed_from_its_page_after_a_dry_run(engine):
    store = engine["store"]
    operator = signed_in(engine, "operator")
    status, _, page = operator.get("/messages/1")
    assert 'id="replay"' in page
    # message 1 is still queued for the lab (nobody answers there): a replay beside it would arrive
    # twice, so it takes "Deliver again to the ones that already have it"
    status, _, page = operator.post("/messages/1/replay", {"destination": "lab"})
    assert status == 200 and "still queued for lab" in page and 'id="plan"' not in page
    assert "--force" not in page and "to send a copy as well" in page  # the page's own words, not the CLI's
    status, _, page = operator.post("/messages/1/replay", {"destination": "lab", "force": "1"})
    assert status == 200 and 'id="plan"' in page and "SAMPLEPATIENT" not in page
    before = len(store.audit_entries(action="replay", limit=1000))
    assert operator.post("/messages/1/replay", {"destination": "lab", "force": "1", "confirm": "1"})[0] == 400
    assert len(store.audit_entries(action="replay", limit=1000)) == before
    status, headers, _ = operator.post("/messages/1/replay", {"destination": "lab", "force": "1", "confirm": "1",
                                                              "reason": "INC-8"})
    assert status == 303
    replay_id = int(headers["Location"].rsplit("/", 1)[1])
    assert store.get_message(replay_id)["replay_of"] == 1
    status, _, page = operator.post("/messages/1/replay", {"destination": "lab", "force": "1", "as_processed": "1"})
    processed_under = store.get_message(1)["snapshot_id"]
    assert status == 200 and 'id="plan"' in page  # the dry run, through the snapshot that processed it
    assert f'Through the configuration that processed it (<a href="/configuration/{processed_under}">snapshot ' in page
    entries = store.audit_entries(action="replay", limit=1000)
    assert len(entries) == before + 1 and (entries[0]["actor"], entries[0]["role"], entries[0]["reason"]) == (
        "user:operator", "operator", "INC-8")
    assert operator.post("/messages/1/replay", {"destination": "nope"})[0] == 200  # the dry run says why not
    assert "has no destination nope" in operator.post("/messages/1/replay", {"destination": "nope"})[2]
    assert operator.post("/messages/424242/replay", {})[0] == 404
    assert 'id="replay"' not in signed_in(engine, "viewer").get("/messages/1")[2]


# -- the live view's stream, alone ------------------------------------------------------------------
class StreamRequest:
    """What LiveStream uses of a twisted.web request."""

    def __init__(self):
        from twisted.internet import defer

        self.headers, self.written, self.producer = {}, [], None
        self.finished = defer.Deferred()

    def setHeader(self, name, value):
        self.headers[name] = value

    def registerProducer(self, producer, streaming):
        self.producer = (producer, streaming)

    def write(self, data):
        self.written.append(data)

    def notifyFinish(self):
        return self.finished


def test_a_live_stream_sends_changes_skips_while_paused_beats_and_stops_with_the_page():
    from twisted.internet import task

    from hl7relay.console.base import LiveStream

    class FakeConsole:
        streams = 0

    console, clock = FakeConsole(), task.Clock()
    console.reactor, console.clock = clock, clock.seconds
    state = {"html": "<p>1</p>"}
    request = StreamRequest()
    stream = LiveStream(console, request, lambda: state["html"], "channels", interval=1.0, heartbeat=15.0)
    assert request.producer == (stream, True) and request.headers[b"Content-Type"].startswith(b"text/event-stream")
    assert console.streams == 1 and request.written[-1] == b"event: channels\ndata: <p>1</p>\n\n"
    count = len(request.written)
    clock.advance(1)
    assert len(request.written) == count  # unchanged: nothing sent
    stream.pauseProducing()  # the browser reads slower than updates come
    for n in range(2, 6):
        state["html"] = f"<p>{n}</p>"
        clock.advance(1)
    assert len(request.written) == count  # nothing buffered while paused
    stream.resumeProducing()
    clock.advance(1)
    assert b"4 update(s) skipped" in request.written[-1] and b"data: <p>5</p>" in request.written[-1]
    count = len(request.written)
    clock.advance(15)
    assert request.written[count:] == [b": heartbeat\n\n"]  # quiet, but alive
    request.finished.errback(Exception("the page went away"))
    count = len(request.written)
    state["html"] = "<p>6</p>"
    clock.advance(5)
    assert len(request.written) == count and console.streams == 0 and not clock.getDelayedCalls()



def test_a_live_stream_ends_with_its_session_and_when_the_account_changes():
    """The dashboard's stream kept sending for 36 s after "sign out everywhere": it ends at its
    next tick when the session does, and within 30 s when the account is disabled or demoted
    elsewhere (the command line), saying so to the page."""
    from twisted.internet import defer, task

    from hl7relay.console.base import LiveStream
    from hl7relay.console.sessions import Sessions

    clock = task.Clock()
    users = {"ada": {"disabled": False, "role": "admin", "phi": False}}

    class Store:
        def get_user(self, name):
            return users.get(name)

    class Writer:
        store = Store()

        def read(self, fn, *args):
            return defer.maybeDeferred(fn, *args)

    class FakeConsole:
        streams = 0
        reactor = clock
        controls = type("Controls", (), {"writer": Writer()})()

    console = FakeConsole()
    console.clock = clock.seconds
    console.sessions = Sessions(clock.seconds)

    def open_stream():
        session_id, session = console.sessions.create("ada", "admin", False, "127.0.0.1")
        session.checked_at = clock.seconds()
        request = StreamRequest()
        request.getCookie = lambda name: session_id.encode()
        request.unregisterProducer = lambda: None
        stream = LiveStream(console, request, lambda: "<p>live</p>", "channels", interval=1.0, session=session)
        return session_id, request, stream

    session_id, request, stream = open_stream()
    clock.advance(1)
    assert console.streams == 1 and not stream.done.called
    console.sessions.end_all("ada")  # sign out everywhere
    clock.advance(1)
    assert stream.done.called and console.streams == 0
    assert request.written[-1].startswith(b"event: ended\ndata: ") and b"Signed out" in request.written[-1]
    count = len(request.written)
    clock.advance(10)
    assert len(request.written) == count  # nothing after the end
    second_id, request, stream = open_stream()
    users["ada"]["role"] = "viewer"  # demoted from the command line: only the store knows
    for _ in range(29):
        clock.advance(1)
    assert not stream.done.called
    for _ in range(3):  # read again after 30 s: the session ends, and the stream with it
        clock.advance(1)
    assert stream.done.called and b"event: ended" in request.written[-1]
    assert console.sessions.get(second_id) is None

def test_the_console_over_tls_marks_its_cookies_secure(tmp_path, running_engine, server_certificate):
    import ssl

    ca, certificate, key = server_certificate
    (tmp_path / "engine.yaml").write_text(f"console: {{host: 127.0.0.1, port: auto, tls_cert: {certificate}, "
                                          f"tls_key: {key}}}\nadmin: {{port: 0}}\n")
    folder = tmp_path / "engine"
    folder.mkdir()

    def prepare(store):
        store.add_user("tls-admin", "admin", hash_password(PASSWORD), {"actor": "test", "action": "user.add"})

    running = running_engine(folder, "--config", str(tmp_path / "engine.yaml"), prepare=prepare)
    try:
        assert running.console.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(ca))
        with urllib.request.urlopen(running.console + "/login", timeout=10, context=context) as response:
            assert "Secure" in response.headers["Set-Cookie"] and response.status == 200
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(running.console.replace("https:", "http:") + "/login", timeout=10).read()
    finally:
        assert running.stop() == 0



def test_an_unchanged_dashboard_renders_the_same_so_it_is_not_sent_again(unit_engine):
    """The table carried its clock ("Updated 14:05:09"), so the live view re-sent it every second."""
    from hl7relay.console.app import Console

    engine, _, _, clock = unit_engine
    console = Console(Controls(engine), clock, clock=clock.seconds)
    first = console.render_channels()
    clock.advance(5)
    assert console.render_channels() == first

def test_with_no_users_the_sign_in_page_shows_how_to_make_the_first(unit_engine, manual_executor):
    from twisted.web.test.requesthelper import DummyRequest

    from hl7relay.console.app import Console

    engine, _, _, clock = unit_engine
    console = Console(Controls(engine), clock)
    request = DummyRequest([b"login"])
    request.addCookie = lambda *args, **kwargs: None  # what the page sets is checked against a real engine above
    pages = []
    console._login_form(request).addCallback(pages.append)
    manual_executor.run_all()
    assert "hl7relay user add NAME --role admin" in pages[0].decode() and 'id="no-users"' in pages[0].decode()


def test_oversized_request_bodies_are_refused_before_they_are_read(engine):
    host, port = urllib.parse.urlsplit(engine["base"]).hostname, urllib.parse.urlsplit(engine["base"]).port

    def exchange(head: bytes, body_chunks):
        with socket.create_connection((host, port), timeout=30) as connection:
            connection.sendall(head)
            try:
                for chunk in body_chunks:
                    connection.sendall(chunk)
            except OSError:  # the server closed its end: what a refusal looks like from here
                pass
            answer = b""
            while True:
                try:
                    data = connection.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                answer += data
            return answer

    declared = exchange(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                        b"Content-Length: 10000000000\r\n\r\n", [b"a" * 65536])
    assert declared.startswith(b"HTTP/1.1 413 ")
    chunked = exchange(b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                       (b"10000\r\n" + b"a" * 65536 + b"\r\n" for _ in range(40)))  # 2.5 MB, no length declared
    assert chunked.startswith(b"HTTP/1.1 413 ")
    assert Browser(engine["base"]).get("/login")[0] == 200  # and the console carries on


def test_idle_connections_are_closed_and_live_views_are_not():
    from twisted.internet import address, task
    from twisted.internet.testing import StringTransport
    from twisted.web import resource, server

    from hl7relay.ops.admin import AdminSite
    from hl7relay.webserver import IDLE_TIMEOUT, bounded_site

    class Forever(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            return server.NOT_DONE_YET  # like a live view's stream

    site = bounded_site(Forever())
    clock = task.Clock()

    def connect():
        protocol = site.buildProtocol(address.IPv4Address("TCP", "127.0.0.1", 5000))
        protocol.callLater = clock.callLater
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    _, idle = connect()
    streaming_protocol, streaming = connect()
    streaming_protocol.dataReceived(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(IDLE_TIMEOUT + 1)
    assert idle.disconnecting and not streaming.disconnecting

    class Engine:  # what AdminSite's resources keep a reference to
        pass

    assert AdminSite(Engine(), metrics=None).timeOut == IDLE_TIMEOUT == 60.0


def test_a_store_that_does_not_answer_gets_a_clear_503(unit_engine):
    from sqlalchemy.exc import OperationalError
    from twisted.internet import defer
    from twisted.web.test.requesthelper import DummyRequest

    from hl7relay.console.app import Console

    engine, _, _, clock = unit_engine
    console = Console(Controls(engine), clock)
    console.support.run = lambda fn, *a, **k: defer.fail(OperationalError("SELECT", {}, Exception("server closed the connection")))
    session_id, _ = console.sessions.create("ada", "admin", False, "127.0.0.1")
    request = DummyRequest([b"messages"])
    request.getCookie = lambda name: session_id.encode() if name == b"hl7relay_session" else None
    pages = []
    d = console.messages(request)
    d.addCallback(pages.append)
    assert request.responseCode == 503 and b"not answering" in pages[0]
    assert b"adt" in console.render_channels().encode()  # the dashboard, from memory, is unaffected



def test_a_text_search_that_stopped_at_its_limit_says_so_instead_of_no_match(unit_engine):
    from twisted.internet import defer
    from twisted.web.test.requesthelper import DummyRequest

    from hl7relay.console.app import Console
    from hl7relay.store.messages import SearchRows

    engine, _, _, clock = unit_engine
    console = Console(Controls(engine), clock)
    stopped = SearchRows()
    stopped.scanned, stopped.stopped_at = 100_000, 1234
    console.support.run = lambda fn, *a, **k: defer.succeed((stopped, {}))
    session_id, _ = console.sessions.create("ada", "admin", False, "127.0.0.1")
    request = DummyRequest([b"messages"])
    request.args = {b"text": [b"DOE"]}
    request.getCookie = lambda name: session_id.encode() if name == b"hl7relay_session" else None
    pages = []
    console.messages(request).addCallback(pages.append)
    page = pages[0].decode()
    assert 'id="search-stopped"' in page and "read the newest 100,000 messages" in page
    assert "/messages?text=DOE&amp;before=1234" in page  # where to go on from
    assert "No match among the messages searched." in page and "No messages match." not in page

# -- the troubleshooting pages (issue #16) ----------------------------------------------------------------
def test_try_a_message_shows_each_step_and_the_ack(engine):
    viewer = signed_in(engine, "viewer")
    status, _, page = viewer.get("/try")
    assert status == 200 and re.search(r"<option\s*>adt</option>", page), page
    message = ADT.format(id="TRY1").replace("\r", "\n")
    status, _, page = viewer.post("/try", {"channel": "adt", "message": message})
    assert status == 200 and "ADT^A01^ADT_A01 TRY1" in page
    assert 'id="status-1">PROCESSED<' in page and "MSA|AA|TRY1" in page
    assert "lab (mllp)" in page and "SAMPLEPATIENT" in page  # what the user pasted is shown to them as pasted
    assert 'id="no-steps-1"' in page  # this channel has no step: said, not an empty table
    assert viewer.post("/try", {"channel": "nope", "message": message})[0] == 400
    status, _, page = viewer.post("/try", {"channel": "adt", "message": "no hl7 here"})
    assert status == 400 and "Paste a message starting with MSH" in page
    assert engine["store"].count(control_id="TRY1") == 0  # nothing stored
    assert viewer.post("/try", {"channel": "adt", "message": message}, csrf=False)[0] == 403


def test_performance_logs_alerts_and_connections_pages(engine):
    viewer = signed_in(engine, "viewer")
    status, _, page = viewer.get("/performance?minutes=15")
    assert status == 200 and 'id="perf-channels"' in page and "<td>adt</td>" in page
    assert re.search(r'<td class="n">\d+</td>', page) and 'hx-trigger="every 5s"' in page
    status, _, part = viewer.get("/performance?minutes=5", headers={"HX-Request": "true"})
    assert status == 200 and part.startswith('<div id="performance"') and "<html" not in part
    assert viewer.get("/performance?channel=nope")[0] == 404
    status, _, page = viewer.get("/logs?level=info")
    assert status == 200 and 'id="logs"' in page and "SAMPLEPATIENT" not in page
    assert viewer.get("/logs?level=loud")[0] == 400
    status, _, page = viewer.get("/alerts")
    assert status == 200 and 'id="alerts"' in page and "Silence</button>" not in page  # a viewer cannot silence
    operator = signed_in(engine, "operator")
    status, headers, _ = operator.post("/alerts/silence", {"rule": "HL7RelayDestinationDown", "channel": "adt",
                                                          "destination": "lab", "minutes": "30", "reason": "lab upgrade"})
    assert status == 303 and "/alerts?done=" in headers["Location"]
    status, _, page = operator.get("/alerts")
    assert "lab upgrade" in page and "user:operator" in page
    assert engine["store"].audit_entries(action="alert.silence")[0]["reason"] == "lab upgrade"
    assert operator.post("/alerts/silence", {"rule": "Nope", "reason": "x"})[0] == 400
    assert viewer.post("/alerts/silence", {"rule": "HL7RelayDestinationDown", "reason": "x"})[0] == 403
    assert operator.post("/alerts/unsilence", {"rule": "HL7RelayDestinationDown", "channel": "adt",
                                               "destination": "lab"})[0] == 303
    status, _, page = viewer.get("/connections")
    assert status == 200 and re.search(r"adt: listening on 127\.0\.0\.1:\d+", page) and "<td>127.0.0.1</td>" in page
    assert 'id="check-needs-operator"' in page and 'action="/connections/check"' not in page
    # a check connects to a production destination (and may send it a message): an operator's, and a
    # viewer's forced POST is refused and written to the audit log
    assert viewer.post("/connections/check", {"target": "adt/lab"})[0] == 403
    [refused] = engine["store"].audit_entries(action="console.refused", limit=1)
    assert (refused["actor"], refused["target"], refused["result"]) == ("user:viewer", "POST /connections/check", "refused")
    assert refused["detail"] == "permission: needs control"
    status, _, page = operator.post("/connections/check", {"target": "adt/lab"})
    assert status == 200 and 'id="check-steps"' in page and "Connection refused" in page  # port 9: nobody there
    assert engine["store"].audit_entries(action="connection.check")[0]["target"] == "adt/lab"
    assert operator.post("/connections/check", {"target": "adt/nope"})[0] == 404


def test_the_tracer_page_follows_a_trace_of_ones_own(engine):
    viewer = signed_in(engine, "viewer")
    status, _, page = viewer.get("/tracer")
    assert status == 200 and 'action="/tracer"' in page
    status, headers, _ = viewer.post("/tracer", {"direction": "in", "channel": "adt", "minutes": "1"})
    assert status == 303
    trace = headers["Location"]
    status, headers, _ = viewer.post("/tracer", {"kind": "api", "minutes": "1"})  # the adt channel is MLLP
    assert status == 303
    api_trace = headers["Location"]
    assert "carried as api" in viewer.get(api_trace)[2]
    status, _, page = viewer.get(trace)
    assert status == 200 and 'hx-trigger="load, every 1s"' in page
    with socket.create_connection(("127.0.0.1", engine_mllp_port(engine))) as pms:
        pms.sendall(frame(ADT.format(id="TRC1").encode()))
        framer, got = MLLPFramer(), []
        while not got:
            got = framer.feed(pms.recv(65536))
    status, _, rows = viewer.get(trace + "/rows")
    assert status == 200 and "TRC1" in rows and "<td>IN</td>" in rows and "SAMPLEPATIENT" not in rows
    status, _, rows = viewer.get(trace + "/rows")
    assert "TRC1" not in rows  # only what is new since the page last asked
    assert "TRC1" not in viewer.get(api_trace + "/rows")[2]  # not carried over HTTP
    assert viewer.post("/tracer", {"kind": "fax"})[0] == 400
    admin = signed_in(engine, "admin")
    assert admin.get(trace)[0] == 404  # someone else's trace
    assert viewer.post(trace + "/stop")[0] == 303
    status, _, _ = viewer.get(trace + "/rows")
    assert status == 286  # ended: htmx stops polling
    assert viewer.post("/tracer", {"minutes": "500"})[0] == 400


def engine_mllp_port(engine):
    """Where the channel listens now (port 0: a channel disabled and enabled again by an earlier test
    listens on a new port), as the Connections page says."""
    page = signed_in(engine, "viewer").get("/connections")[2]
    return int(re.search(r"adt: listening on 127\.0\.0\.1:(\d+)", page).group(1))


def test_the_database_page_verifies_and_repairs_for_admins(engine):
    import sqlite3

    from hl7relay.store.database import DeliveryRecord, MessageRecord

    store = engine["store"]
    [orphan] = store.commit([MessageRecord("adt", b"MSH|^~\\&|A|B|||1||ADT^A08|ORPH1|P|2.5\r", "PROCESSED", 1.0,
                                           control_id="ORPH1", deliveries=[DeliveryRecord("lab", "SENT")])], [])
    outside = sqlite3.connect(engine["folder"] / "data" / "hl7relay.db")
    with outside:  # a message deleted behind the engine's back: its delivery row stays
        outside.execute("DELETE FROM messages WHERE id = ?", (orphan,))
    outside.close()
    assert signed_in(engine, "operator").get("/database")[0] == 403
    admin = signed_in(engine, "admin")
    status, _, page = admin.get("/database")  # quick: the checks run when asked
    assert status == 200 and 'id="checks"' not in page and "not run yet" in page
    status, headers, _ = admin.post("/database/check")
    assert status == 303 and headers["Location"] == "/database"
    status, _, page = admin.get("/database")
    assert status == 200 and 'id="checks"' in page and "deliveries of missing messages" in page
    assert "1 delivery row of messages no longer stored" in page and "Apply the safe repairs" in page
    status, headers, _ = admin.post("/database/repair")
    assert status == 303 and "deleted+1+row" in headers["Location"]
    status, _, page = admin.get(headers["Location"])
    assert "every delivery row belongs to a stored message" in page
    assert "deleted 1 row" in store.audit_entries(action="store.repair")[0]["detail"]


def test_sign_in_goes_only_to_a_plain_path_of_our_own(engine):
    browser = Browser(engine["base"])
    _, _, body = browser.get("/login")
    for target, expected in (("/messages?channel=adt", "/messages?channel=adt"), ("/\t/evil.example", "/"),
                             ("//evil.example", "/"), ("/\\evil.example", "/"), ("https://evil.example/", "/"),
                             ("/\n/evil.example", "/"), ("/ok path", "/")):
        browser = Browser(engine["base"])
        _, _, body = browser.get("/login")
        token = re.search(r'name="login_token" value="([^"]+)"', body).group(1)
        status, headers, _ = browser.request("POST", "/login", {"login_token": token, "name": "viewer",
                                                                "password": PASSWORD, "next": target})
        assert status == 303 and headers["Location"] == expected, target


def test_refused_attempts_of_a_signed_in_user_are_audited(engine):
    store = engine["store"]
    viewer = signed_in(engine, "viewer")
    before = len(store.audit_entries(action="console.refused", limit=1000))
    assert viewer.post("/channels/adt/disable", {"reason": "x"})[0] == 403  # the role
    assert viewer.post("/logout", csrf=False)[0] == 403  # the token
    assert viewer.post("/logout", headers={"Origin": "http://evil.example"})[0] == 403  # another site's form
    assert Browser(engine["base"]).post("/logout", csrf=False)[0] == 401  # nobody to name: not written
    entries = store.audit_entries(action="console.refused", limit=1000)[:3]
    assert len(store.audit_entries(action="console.refused", limit=1000)) == before + 3
    assert [(e["actor"], e["target"], e["detail"].split(":")[0]) for e in reversed(entries)] == [
        ("user:viewer", "POST /channels/adt/disable", "permission"), ("user:viewer", "POST /logout", "csrf"),
        ("user:viewer", "POST /logout", "origin")]
    assert viewer.get("/")[0] == 200  # still signed in


def test_changing_ones_own_password_ends_ones_other_sessions(engine):
    here, elsewhere = signed_in(engine, "two-places"), signed_in(engine, "two-places")
    new = "a brand new long password"
    status, _, _ = here.post("/account/password", {"current": PASSWORD, "new": new, "again": new})
    assert status == 303
    assert here.get("/")[0] == 200 and elsewhere.get("/")[0] == 303  # the other one signs in again
    assert here.post("/account/password", {"current": new, "new": PASSWORD, "again": PASSWORD})[0] == 303


def test_the_last_active_admin_stays_one(engine):
    store = engine["store"]
    admin = signed_in(engine, "admin")
    assert admin.post("/users/guessed/disable")[0] == 303  # the other admin, for a moment
    try:
        assert admin.post("/users/admin/role", {"role": "viewer", "reason": "test"})[0] == 409
        status, _, page = admin.post("/users/admin/role", {"role": "operator", "reason": "test"})
        assert status == 409 and "admin is the last active admin" in page
        assert store.get_user("admin")["role"] == "admin"
    finally:
        assert admin.post("/users/guessed/enable")[0] == 303


def test_the_message_page_shows_fields_by_name_masked_values_keep_their_field(engine):
    viewer = signed_in(engine, "viewer")
    status, _, page = viewer.get("/messages/1")
    assert status == 200 and 'id="fields-raw"' in page and "SAMPLEPATIENT" not in page
    received = page.split('id="fields-raw"')[1].split("</details>")[0]
    rows = re.findall(r'<td class="path">([A-Z0-9]+-\d+)</td><td class="muted">([^<]*)</td><td class="value">([^<]*)</td>', received)
    by_path = {path: (name, value) for path, name, value in rows}
    assert by_path["PID-5"] == ("Patient Name", "***") and by_path["MSH-9"][0] == "Message Type"
    assert by_path["MSH-10"][1] == "CON1"
    revealed = signed_in(engine, "phi-operator").post("/messages/1/reveal", {"reason": "INC-3 the viewer"})[2]
    assert re.search(r'<td class="path">PID-5</td><td class="muted">Patient Name</td><td class="value">SAMPLEPATIENT', revealed)


def test_what_changed_between_the_stages_is_shown_masked_with_the_fields_named():
    from hl7relay.console.messages import _fields_and_changes
    from hl7relay.ops.support import message_view

    raw = ADT.format(id="CH1").encode()
    transformed = raw.replace(b"|P|2.5", b"|T|2.5")
    to_lab = transformed.replace(b"SAMPLEPATIENT", b"OTHERNAME")
    stored = {"id": 9, "channel": "adt", "raw": raw, "status": "PROCESSED", "error": "", "patient_id": "100234",
              "replay_reason": None, "deliveries": [],
              "stages": {"transformed": transformed, "destination:lab": to_lab}}
    fields, changes = _fields_and_changes(stored, message_view(stored, False), False)
    assert set(fields) == {"raw", "transformed", "destination:lab"}
    (first, first_diff), (second, second_diff) = changes
    assert first == "Received → Transformed" and "changed: MSH-11" in first_diff
    assert second == "Transformed → lab" and "changed: PID-5" in second_diff
    assert "SAMPLEPATIENT" not in second_diff and "OTHERNAME" not in second_diff  # masked, the field still named


def test_messages_page_back_up_with_newer(engine):
    from hl7relay.store.database import MessageRecord

    engine["store"].commit([MessageRecord("pager", ADT.format(id=f"PG{n}").encode(), "PROCESSED", 1_700_000_000.0 + n,
                                          control_id=f"PG{n}", message_type="ADT^A01") for n in range(60)], [])
    viewer = signed_in(engine, "viewer")
    first = viewer.get("/messages?channel=pager")[2]
    assert 'id="newer"' not in first and 'id="older"' in first and ">PG59<" in first
    older = re.search(r'href="([^"]+)"[^>]*id="older"', first).group(1).replace("&amp;", "&")
    second = viewer.get(older)[2]
    assert ">PG9<" in second and ">PG59<" not in second and 'id="older"' not in second
    newer = re.search(r'href="([^"]+)"[^>]*id="newer"', second).group(1).replace("&amp;", "&")
    back = viewer.get(newer)[2]
    assert ">PG59<" in back and ">PG10<" in back and ">PG9<" not in back


def test_the_listed_messages_export_as_csv_masked_and_audited(engine):
    import csv
    import io

    viewer = signed_in(engine, "viewer")
    page = viewer.get("/messages")[2]
    link = re.search(r'href="([^"]+)" id="export-csv"', page).group(1).replace("&amp;", "&")
    status, headers, body = viewer.get(link)
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(body)))
    assert rows and {"id", "control_id", "patient_id", "status", "deliveries"} <= set(rows[0])
    con1 = next(r for r in rows if r["control_id"] == "CON1")
    assert "SAMPLEPATIENT" not in body and con1["patient_id"] != "100234"  # masked as the page shows it
    assert engine["store"].audit_entries(action="messages.export", limit=1)[0]["actor"] == "user:viewer"


def test_a_csv_export_by_patient_id_does_not_write_the_id_into_the_audit_log(engine):
    viewer = signed_in(engine, "viewer")
    status, _, body = viewer.get("/messages.csv?patient_id=100234")
    assert status == 200 and body.startswith("id,received_at")
    entry = engine["store"].audit_entries(action="messages.export", limit=1)[0]
    assert "100234" not in entry["detail"] and "patient_id=(given)" in entry["detail"]


def test_a_stored_message_is_tried_again_with_a_reason_and_an_audit_entry(engine):
    operator = signed_in(engine, "phi-operator")
    page = operator.get("/messages/1")[2]
    assert 'formaction="/messages/1/try"' in page
    assert operator.post("/messages/1/try", {"reason": " "})[0] == 400
    status, _, page = operator.post("/messages/1/try", {"reason": "INC-21 does the new mapping take it"})
    assert status == 200 and 'id="status-1">PROCESSED<' in page and "SAMPLEPATIENT" in page  # shown: a PHI permission
    entry = engine["store"].audit_entries(action="phi.view", limit=1)[0]
    assert (entry["target"], entry["reason"]) == ("message 1 (try)", "INC-21 does the new mapping take it")
    assert signed_in(engine, "viewer").post("/messages/1/try", {"reason": "curious"})[0] == 403
    assert operator.post("/messages/424242/try", {"reason": "x"})[0] == 404


def test_the_messages_list_says_how_many_it_shows(engine):
    from hl7relay.store.database import MessageRecord

    engine["store"].commit([MessageRecord("adt", ADT.format(id="COUNT1").encode(), "PROCESSED", 1_700_000_600.0,
                                          control_id="COUNT1", message_type="ADT^A01")], [])
    viewer = signed_in(engine, "viewer")
    page = viewer.get("/messages?control_id=COUNT1")[2]
    assert re.search(r'id="count"><span id="total">1</span> message, newest first', page)
    engine["store"].commit([MessageRecord("counted", ADT.format(id=f"MANY{n}").encode(), "PROCESSED", 1_700_000_700.0 + n,
                                          control_id=f"MANY{n}", message_type="ADT^A01") for n in range(60)], [])
    page = viewer.get("/messages?channel=counted")[2]
    assert re.search(r'id="count">50 on this page, of <span id="total">60</span> messages, newest first', page)
    older = re.search(r'href="(/messages\?channel=counted&amp;before=\d+)"', page).group(1).replace("&amp;", "&")
    page = viewer.get(older)[2]
    assert re.search(r'id="count">10 on this page, of <span id="total">60</span> messages', page)
    page = viewer.get("/messages?channel=counted&message_type=ADT^A01&control_id=MANY7")[2]
    assert re.search(r'id="count"><span id="total">1</span> message, newest first', page) and "Older" not in page


def test_messages_ticked_in_the_list_are_replayed_after_the_same_dry_run(engine):
    from hl7relay.store.database import DeliveryRecord, MessageRecord

    store = engine["store"]
    store.commit([MessageRecord("adt", ADT.format(id="TICK1").encode(), "PROCESSED", 1_700_000_500.0, control_id="TICK1",
                                message_type="ADT^A01", deliveries=[DeliveryRecord("lab", "ERROR")])], [])
    operator = signed_in(engine, "operator")
    page = operator.get("/messages?control_id=TICK1")[2]
    assert 'form="select"' in page and "Replay selected" in page
    assert 'form="select"' not in signed_in(engine, "viewer").get("/messages?control_id=TICK1")[2]
    [message_id] = re.findall(r'name="id" value="(\d+)" form="select"', page)
    # a message still queued for its destination is not sent a second copy without being told to
    queued = re.findall(r'name="id" value="(\d+)" form="select"', operator.get("/messages?control_id=CON1")[2])[-1]
    assert "still queued for lab" in operator.post("/messages/replay", {"id": queued})[2]
    assert operator.post("/messages/replay", {})[0] == 400  # nothing ticked
    status, _, preview = operator.post("/messages/replay", {"id": message_id})
    assert status == 200 and "Replay selected messages: dry run" in preview and re.search(r'id="would-replay">1<', preview)
    assert 'name="id" value="%s"' % message_id in preview and "SAMPLEPATIENT" not in preview
    before = len(store.replays_of(int(message_id)))
    assert operator.post("/messages/replay", {"id": message_id, "confirm": "1"})[0] == 400  # a reason first
    status, headers, _ = operator.post("/messages/replay", {"id": message_id, "confirm": "1", "reason": "INC-30 resend"})
    assert status == 303 and "replayed+1" in headers["Location"]
    assert len(store.replays_of(int(message_id))) == before + 1
    entry = store.audit_entries(action="replay.bulk", limit=1)[0]
    assert entry["target"] == "selected messages (1)" and entry["reason"] == "INC-30 resend"
    assert "Selected messages: replayed 1, skipped 0." in operator.get(headers["Location"])[2]
    assert signed_in(engine, "viewer").post("/messages/replay", {"id": message_id})[0] == 403


def test_a_delivery_given_up_counts_as_a_dead_letter_at_once_on_the_strip(unit_engine):
    """The strip said "0 dead letters" beside a message that had just become one: the count is
    read every 30 s, and a delivery given up now adds to it at once."""
    from hl7relay import events
    from hl7relay.console.app import Console

    engine, _, _, clock = unit_engine
    console = Console(Controls(engine), clock, clock=clock.seconds)
    console._dead_letters = 4  # as last counted
    events.subscribe(console._dead_letter_event, events=("delivery_failed",))  # as resource() does
    try:
        events.emit("delivery_failed", channel="adt", destination="lab", message_id=9, attempts=1, seconds=0.1,
                    ack="AE", error="application_error")
        assert console.health()["dead"] == 5
    finally:
        events.unsubscribe(console._dead_letter_event)


def test_the_files_page_shows_the_ledger_and_each_files_messages_masked(engine):
    """Files the file sources read: the totals and a row a file; a file's messages in file order
    with their statuses (errors masked); a message read from a file says which, where."""
    import time

    from hl7relay.store.database import FileSeenUpdate, FileUpdate, MessageRecord

    store = engine["store"]
    store.commit([], [FileSeenUpdate("adt", "file:///srv/in", "night.hl7", 2048, 1.0, "f" * 64, time.time())])
    entry = store.file_entry("adt", "file:///srv/in", "night.hl7", "f" * 64)
    good, bad = store.commit([
        MessageRecord("adt", ADT.format(id="FV1").encode(), "PROCESSED", control_id="FV1", message_type="ADT^A01",
                      peer="file:night.hl7", source_file=(entry["id"], 0, 3)),
        MessageRecord("adt", b"MSH\rPID|1||X||DOE^JANE", "ERROR", peer="file:night.hl7",
                      error="night.hl7 line 7: not an HL7 message: it must start with 'MSH', got 'MSH\\rPID|1||X||DOE^JANE'",
                      source_file=(entry["id"], 1, 7))], [])
    store.commit([], [FileUpdate(entry["id"], {"state": "errors", "messages": 2, "done_at": time.time(),
                                               "problems": "E line 9: segment 'ZZZ' is outside any message"})])
    browser = signed_in(engine, "viewer")
    status, _, body = browser.get("/files")
    assert status == 200 and f'data-file="{entry["id"]}" data-state="errors"' in body and "night.hl7" in body
    assert re.search(r"1 with errors", body)
    status, _, body = browser.get(f"/files/{entry['id']}")
    assert status == 200 and "segment &#39;ZZZ&#39; is outside any message" in body
    assert f'<a href="/messages/{good}">{good}</a>' in body and f'<a href="/messages/{bad}">{bad}</a>' in body
    assert "line 7" in body and "DOE^JANE" not in body  # the quoted message is masked
    status, _, body = browser.get(f"/messages/{bad}")
    assert status == 200 and f'<a href="/files/{entry["id"]}">file {entry["id"]}</a> night.hl7: message 2 of 2, line 7' in body
    assert browser.get("/files/999999")[0] == 404
    assert browser.get("/files?hours=soon")[0] == 400
    assert "file-reimport" not in body  # only a duplicate is offered to be imported again
    assert browser.post(f"/files/{entry['id']}/reimport", {"reason": "x"})[0] == 403  # a viewer may not
    operator = signed_in(engine, "operator")
    status, _, said = operator.post(f"/files/{entry['id']}/reimport", {"reason": "resent"})
    assert status == 409 and "only a duplicate is imported again" in said


def test_the_configuration_page_lists_the_snapshots_and_shows_what_changed(engine):
    """The engine recorded its start; two more snapshots written here: the page lists them, a
    snapshot's page shows what changed since the one before, and a message links to its own."""
    import time

    from hl7relay.snapshots import Snapshot

    store = engine["store"]
    before = Snapshot(time.time(), "a" * 64, "test", "host", "user:ana", "reload", "", False,
                      {"channels/adt.yaml": "name: adt\nport: 2575\n", "channels/lookups/x.csv": "I,IP\n"})
    after = Snapshot(time.time(), "b" * 64, "test", "host", "user:ana", "reload", "1a2b3c4d5e6f7a8b", True,
                     {"channels/adt.yaml": "name: adt\nport: 2576\n", "channels/lookups/x.csv": "I,IP\n"})
    first, second = store.record_snapshot(before), store.record_snapshot(after)
    browser = signed_in(engine, "viewer")
    status, _, body = browser.get("/configuration")
    assert status == 200 and f'data-snapshot="{second}"' in body and f'data-snapshot="{first}"' in body
    assert 'data-snapshot="1"' in body  # the engine's own, at its start
    status, _, body = browser.get(f"/configuration/{second}")
    assert status == 200 and f"Changed since <a href=\"/configuration/{first}\">snapshot {first}</a>" in body
    assert 'data-path="channels/adt.yaml"' in body and 'data-path="channels/lookups/x.csv"' not in body
    assert '<span class="removed">-port: 2575</span>' in body and '<span class="added">+port: 2576</span>' in body
    assert "with changes not committed" in body
    status, _, body = browser.get(f"/configuration/{second}?against={second}")
    assert status == 200 and 'id="no-change"' in body
    assert browser.get("/configuration/999999")[0] == 404 and browser.get(f"/configuration/{first}?against=x")[0] == 400
    status, _, page = browser.get("/messages/1")
    assert status == 200 and '<a href="/configuration/1">snapshot 1</a>' in page  # the message the fixture sent
    assert 'id="nodes"' not in browser.get("/configuration")[2]  # one engine on SQLite: no node table
    store.register_node("node-a", "host-a", 11, "0.1.0", first, "a" * 64)
    store.register_node("node-b", "host-b", 12, "0.1.0", second, "b" * 64)
    _, _, body = browser.get("/configuration")
    assert 'data-node="node-a"' in body and 'data-node="node-b"' in body
    assert "Configuration drift: the nodes run different snapshots (node-a: " in body
    with store.engine.begin() as connection:
        connection.exec_driver_sql("DELETE FROM nodes")


def test_an_admin_rolls_back_to_a_snapshot_with_a_reason_and_it_is_audited(engine):
    """The snapshot page offers the rollback to admins only; without a reason it is refused; a
    snapshot whose files do not load changes nothing; one that does runs (recorded as a new
    snapshot) and the audit log says who, to what and why."""
    import time

    from hl7relay.snapshots import Snapshot

    store = engine["store"]
    viewer = signed_in(engine, "viewer")
    assert 'id="rollback"' not in viewer.get("/configuration/1")[2]
    assert viewer.post("/configuration/1/rollback", {"reason": "x"})[0] == 403
    admin = signed_in(engine, "admin")
    assert 'id="rollback"' in admin.get("/configuration/1")[2] or 'id="rollback-none"' in admin.get("/configuration/1")[2]
    assert admin.post("/configuration/1/rollback", {"reason": " "})[0] == 400
    assert admin.post("/configuration/999999/rollback", {"reason": "x"})[0] == 404
    folder = str(engine["folder"] / "channels")
    broken = store.record_snapshot(Snapshot(time.time(), "c" * 64, "", "host", "user:ana", "reload", "", False,
                                            {f"{folder}/adt.yaml": "name: adt\nsource: {type: mllp, prot: 0}\n"}))
    status, _, page = admin.post(f"/configuration/{broken}/rollback", {"reason": "try the broken one"})
    assert status == 422 and "refused, nothing changed" in page and "unknown key" in page
    elsewhere = store.record_snapshot(Snapshot(time.time(), "d" * 64, "prod", "host", "user:ana", "reload", "", False, {}))
    status, _, page = admin.post(f"/configuration/{elsewhere}/rollback", {"reason": "x"})
    assert status == 409 and "ran in environment prod" in page
    before = len(store.audit_entries(action="config.rollback", limit=1000))
    status, headers, _ = admin.post("/configuration/1/rollback", {"reason": "INC-30 back to the start"})
    assert status == 303 and headers["Location"].startswith("/configuration?done=rollback&to=1&now=")
    now = int(headers["Location"].rsplit("now=", 1)[1])
    _, _, page = admin.get(headers["Location"])
    assert "Rolled back to snapshot 1" in page and "already sent stays sent" in page
    assert f'The engine runs <a href="/configuration/{now}">snapshot {now}</a>, rolled back to snapshot 1' in page
    assert "INC-30 back to the start" in page  # the reason, with the snapshot
    entries = store.audit_entries(action="config.rollback", limit=1000)
    assert len(entries) == before + 1 and entries[1]["result"] == "refused"  # the refused ones are audited too
    assert (entries[0]["actor"], entries[0]["target"], entries[0]["reason"], entries[0]["result"]) == (
        "user:admin", "snapshot 1", "INC-30 back to the start", "ok")
    assert store.snapshot(now)["from_snapshot"] == 1 and store.snapshot(now)["reason"] == "rollback"
    assert 'id="rollback-none"' in admin.get(f"/configuration/{now}")[2]  # what runs is not offered again
