"""The web console: pages rendered on the server (Jinja2), routed by Klein, served by the
engine's own reactor on a listener of its own (127.0.0.1:9103 by default).

Every response carries ``Cache-Control: no-store``, a strict Content-Security-Policy (scripts and
styles from this origin only: no inline script, no eval), ``frame-ancestors 'none'``, ``nosniff``
and ``Referrer-Policy: no-referrer``. Every POST needs the session's CSRF token (a form field or
the ``X-CSRF-Token`` header htmx sends) and, when the browser says where it comes from, an
``Origin`` equal to the console's own. Sign-in uses a double-submitted token of its own.
Numbers on the dashboard come from memory (the engine's counters and queues), never from a table
scan: the live view re-renders them once a second over server-sent events.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import time
from pathlib import Path
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from klein import Klein
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from werkzeug.exceptions import MethodNotAllowed, NotFound

from sqlalchemy.exc import SQLAlchemyError

from hl7relay import events
from hl7relay.console.sessions import LoginThrottle, Session, Sessions
from hl7relay.outcomes import STORED_STATUSES
from hl7relay.ops.auth import ROLES, can, hash_password
from hl7relay.ops.phi import mask_known, mask_text, person_values
from hl7relay.ops.support import SupportStore
from hl7relay.store.database import MAX_ROW_ID, StoreError


__all__ = ["ConsoleBase", "CSP", "app", "page", "HTTPError"]

log = Logger(namespace="hl7relay.console")
HERE = Path(__file__).parent
SESSION_COOKIE = b"hl7relay_session"
LOGIN_COOKIE = b"hl7relay_login"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_CONTENT_TYPES = {".js": b"text/javascript; charset=utf-8", ".css": b"text/css; charset=utf-8", ".svg": b"image/svg+xml"}
STATIC = {p.name: p for p in (HERE / "static").iterdir() if p.suffix in _CONTENT_TYPES}
STATUSES = STORED_STATUSES
PAGE_SIZE = 50
DEAD_LETTERS_EVERY = 30.0  # seconds between counts of the dead letters (the health strip)
DEAD_LETTERS_FRESH = 5.0  # a page shown longer after the last count asks for a new one (for the next page)
MAX_STREAMS = 100  # live dashboards open at once
# a password hash to check against when the user does not exist, so both cost the same time
_NO_USER_HASH = hash_password("no such user: the comparison only spends the same time")


class HTTPError(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status
        self.text = text


def when(timestamp) -> str:
    """A time in the site's time zone with its offset: 2026-11-30 14:05:09 +0100."""
    if timestamp is None or timestamp == "":
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(float(timestamp)))


def age(seconds) -> str:
    if seconds is None:
        return ""
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def page(permission: str | None = "read", post: bool = False):
    """A console route: security headers; the session (anonymous GETs go to the sign-in page);
    the permission; for POSTs the CSRF token and Origin; a message number beyond any row id is
    no message (404), for every route that takes one. The handler gets the session."""

    def decorate(handler):
        @functools.wraps(handler)
        def route(self, request, *args, **kwargs):
            self._headers(request)
            d = defer.maybeDeferred(self._admit, request, permission, post)
            if kwargs.get("message_id", 0) > MAX_ROW_ID:
                d.addCallback(lambda _: defer.fail(HTTPError(404, f"no message {kwargs['message_id']}")))
            d.addCallback(lambda session: handler(self, request, session, *args, **kwargs))
            d.addErrback(self._failed, request)
            return d

        return route

    return decorate



app = Klein()  # the console's routes, declared by the page modules (console/*.py) on this one app


class ConsoleBase:
    """What every page shares: the session and permission checks (``page``), rendering,
    the audit, the engine's controls."""

    app = app

    def __init__(self, controls, reactor=None, tls: bool = False, idle: float = 15 * 60, absolute: float = 12 * 3600,
                 clock=None):
        self.controls = controls
        self.reactor = reactor or controls.reactor
        self.clock = clock or time.time
        self.tls = tls
        self.sessions = Sessions(self.clock, idle, absolute)
        # a user's password is guessed at from anywhere: 3 free tries; an address may be a whole
        # clinic behind one NAT: 10 free tries before it waits too
        self.user_throttle = LoginThrottle(self.clock, free=3)
        self.address_throttle = LoginThrottle(self.clock, free=10)
        self.support = SupportStore(controls)
        self.streams = 0
        self._channels_html: tuple[float, str] | None = None  # (when, html): the dashboard's table, shared by the live views
        self._trace_cursors: dict = {}  # (user, trace id) -> the last row a tracer page has shown
        self._health_loop: task.LoopingCall | None = None
        self._dead_letters: int | None = None  # every dead letter in the store, as last counted
        self._counted_at = 0.0
        self._counting = False
        self._database_checks: tuple[float, list] | None = None  # (when, the checks) of the Database page's last run
        self.templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                                     trim_blocks=True, lstrip_blocks=True)
        self.templates.filters.update(when=when, age=age)
        self.templates.globals.update(can=can, ROLES=ROLES)

    def resource(self):
        if self._health_loop is None:
            # the dead letters' count for the health strip, read off the reactor every 30 s while the
            # console serves (a page never waits for it, and never scans for it)
            self._health_loop = task.LoopingCall(self._count_dead_letters)
            self._health_loop.clock = self.reactor
            self._health_loop.start(DEAD_LETTERS_EVERY, now=True)
            # a delivery given up is one more dead letter at once (the next count agrees): the strip
            # must not say "0 dead letters" beside a message that has just become one
            events.subscribe(self._dead_letter_event, events=("delivery_failed",))
        return self.app.resource()

    def _dead_letter_event(self, event: str, fields: dict) -> None:
        if self._dead_letters is not None:
            self._dead_letters += 1

    def _count_dead_letters(self) -> None:
        if self._counting:
            return
        self._counting = True
        self._counted_at = self.clock()

        def counted(total):
            self._dead_letters = total

        def failed(failure):
            log.warn("console: could not count the dead letters: {error}", error=failure.getErrorMessage())

        def done(_):
            self._counting = False

        self.support.run(lambda store: store.dead_letter_total()).addCallbacks(counted, failed).addBoth(done)

    @defer.inlineCallbacks
    def _recount_dead_letters(self):
        """After a replay: the strip must not say "1,003 dead letters" above "1 remains"."""
        self._dead_letters = yield self.support.run(lambda store: store.dead_letter_total())

    def health(self) -> dict:
        """What the strip on every page says, from memory: alerts firing, destinations down or
        failing, the oldest queued delivery's age, and the dead letters (counted every 30 s)."""
        if self._health_loop is not None and self.clock() - self._counted_at > DEAD_LETTERS_FRESH:
            self._count_dead_letters()  # for the next page: this one shows the count it has
        alerts = self.controls.alerts
        firing = [a for a in alerts.view()["alerts"] if a["state"] == "firing"] if alerts is not None else []
        down, failing, oldest = [], [], None
        for channel, destination, view in self.controls.queue_views():
            state = view.get("state")
            if state == "down":
                down.append(f"{channel}/{destination}")
            elif state == "failing":
                failing.append(f"{channel}/{destination}")
            age = view.get("oldest_age")
            if age is not None and (oldest is None or age > oldest):
                oldest = age
        return {"firing": len(firing), "down": sorted(down), "failing": sorted(failing), "oldest_age": oldest,
                "dead": self._dead_letters, "alerts_running": alerts is not None}

    def _headers(self, request) -> None:
        for name, value in ((b"Cache-Control", b"no-store"), (b"Content-Security-Policy", CSP.encode()),
                            (b"X-Content-Type-Options", b"nosniff"), (b"Referrer-Policy", b"no-referrer"),
                            (b"X-Frame-Options", b"DENY"), (b"Cross-Origin-Opener-Policy", b"same-origin")):
            request.setHeader(name, value)

    def _render(self, name: str, request=None, code: int = 200, **values) -> bytes:
        # whole pages carry the health strip; a fragment a page refreshes (_deliveries.html) does not
        if values.get("session") is not None and "health" not in values and not name.startswith("_"):
            values["health"] = self.health()
        values.setdefault("environment", getattr(self.controls, "environment", None))
        if request is not None:
            request.setResponseCode(code)
            request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return self.templates.get_template(name).render(**values).encode("utf-8")

    def _source(self, request) -> str:
        return getattr(request.getClientAddress(), "host", "?")

    def _origin_ok(self, request) -> bool:
        """Whether a POST comes from the console's own pages. ``Origin`` must be ours; with
        ``Referrer-Policy: no-referrer`` a browser sends ``Origin: null`` on our own forms, so then
        the Fetch Metadata header ``Sec-Fetch-Site`` (which every current browser sends) decides.
        With neither, the client is not a browser and the CSRF token alone decides."""
        origin = request.getHeader(b"origin")
        if origin is not None and origin != b"null":
            host = request.getHeader(b"host") or b""
            return origin.decode("latin-1") == f"{'https' if self.tls else 'http'}://{host.decode('latin-1')}"
        site = request.getHeader(b"sec-fetch-site")
        if site is not None:
            return site == b"same-origin"
        return origin is None

    @staticmethod
    def _field(request, name: str) -> str:
        values = (request.args or {}).get(name.encode())
        return values[0].decode("utf-8", "replace") if values else ""

    @defer.inlineCallbacks
    def _admit(self, request, permission, post):
        cookie = (request.getCookie(SESSION_COOKIE) or b"").decode("latin-1")
        if post and not self._origin_ok(request):
            # with a session: a page of another site made this browser post with its cookie (which
            # does not count as the user's activity)
            yield self._refused(request, self.sessions.get(cookie, touch=False), "origin", "the form was sent from another site")
            raise HTTPError(403, "this form was sent from another site")
        session = self.sessions.get(cookie)
        if session is not None and self.clock() - session.checked_at > 30:
            # the account may have changed (role, PHI, disabled, removed): read it at most every 30 s
            user = yield self.controls.writer.read(self.controls.writer.store.get_user, session.user)
            if user is None or user["disabled"]:
                self.sessions.end_all(session.user)
                session = None
            else:
                session.role, session.phi, session.checked_at = user["role"], bool(user["phi"]), self.clock()
        if permission is None:
            return session
        if session is None:
            if post or request.getHeader(b"hx-request") or request.path.startswith(b"/live/"):
                raise HTTPError(401, "signed out: sign in again")
            target = request.uri.decode("latin-1")
            request.redirect(b"/login?" + urlencode({"next": target}).encode())
            raise HTTPError(303, "")
        if post and not Sessions.csrf_ok(session, self._field(request, "csrf") or
                                         (request.getHeader(b"x-csrf-token") or b"").decode("latin-1")):
            yield self._refused(request, session, "csrf", "the form's security token was missing or stale")
            raise HTTPError(403, "the form's security token is missing or stale: reload the page")
        if not can(session.role, permission, session.phi):
            yield self._refused(request, session, "permission", f"needs {permission}")
            raise HTTPError(403, f"{session.user} ({session.role}) may not do this")
        return session

    def _refused(self, request, session, why: str, detail: str):
        """An attempt refused for a signed-in user (another site's form, a stale token, a role
        without the permission) goes to the audit log: someone tried, and the log says who and
        what. Without a session there is nobody to name, and nothing is written (no log flood)."""
        if session is None:
            return defer.succeed(None)
        entry = {"actor": f"user:{session.user}", "role": session.role, "source": self._source(request),
                 "action": "console.refused", "target": f"{request.method.decode('latin-1')} "
                                                       f"{request.path.decode('latin-1', 'replace')[:200]}",
                 "result": "refused", "detail": f"{why}: {detail}"}
        return self._audit(entry).addErrback(lambda f: log.error("console: could not audit a refused attempt: {e}",
                                                                 e=f.getErrorMessage()))

    def _failed(self, failure: Failure, request):
        if failure.check(defer.CancelledError):
            return None  # the browser went away (a live view closed): nothing to answer
        if failure.check(HTTPError):
            error = failure.value
            if error.status == 303:
                request.setResponseCode(303)
                return b""
            return self._render("error.html", request, error.status, status=error.status, text=error.text, session=None)
        if failure.check(StoreError, SQLAlchemyError):
            # the store is down or full: say so (the dashboard, from memory, still works)
            log.error("console: the store did not answer: {error}", error=failure.getErrorMessage())
            return self._render("error.html", request, 503, status=503, session=None,
                                text="The message store is not answering right now; the dashboard still shows the "
                                     "engine's live state. Try again in a moment.")
        log.failure("console request failed", failure)
        return self._render("error.html", request, 500, status=500, text="internal error (logged)", session=None)

    def _audit(self, entry: dict):
        return self.support.run(lambda store: store.audit(entry))

    @app.handle_errors(NotFound, MethodNotAllowed)
    def unknown(self, request, failure):
        self._headers(request)
        status = 405 if failure.check(MethodNotAllowed) else 404
        text = "this page does not take that method" if status == 405 else "no such page"
        return self._render("error.html", request, status, status=status, text=text, session=None)

    @app.route("/static/<name>", methods=["GET"])
    def static(self, request, name):
        """The console's own files, by name only (no folders, no listing)."""
        self._headers(request)
        path = STATIC.get(name)
        if path is None:
            request.setResponseCode(404)
            return b"not found\n"
        request.setHeader(b"Content-Type", _CONTENT_TYPES[path.suffix])
        request.setHeader(b"Cache-Control", b"public, max-age=3600")  # versioned names; no patient data
        return path.read_bytes()

    def _known(self, channel: str, destination: str | None = None) -> None:
        if not self.controls.has_channel(channel):
            raise HTTPError(404, f"no channel {channel!r}")
        if destination is not None and not any(owner == channel and name == destination
                                               for owner, name, _ in self.controls.destinations()):
            raise HTTPError(404, f"no destination {destination!r}")

    def _action(self, request, session, action: str, target: str) -> dict:
        """The audit entry of an action taken in the console (written with the action itself)."""
        return {"actor": f"user:{session.user}", "role": session.role, "source": self._source(request), "action": action, "target": target,
                "reason": self._field(request, "reason").strip()[:500]}

    @staticmethod
    def _back(request, done: str, target: str):
        request.redirect(b"/channels?" + urlencode({"done": done, "target": target}).encode())
        request.setResponseCode(303)
        return b""


DONE = {"channel.enable": "Channel {target} enabled.", "channel.disable": "Channel {target} disabled: not accepting; "
        "its queued deliveries wait.", "destination.pause": "Destination {target} paused: its queue keeps filling.",
        "destination.resume": "Destination {target} resumed.", "destination.retry": "Destination {target}: "
        "waiting deliveries retried now.", "reload": "Channel files reloaded."}


USER_DONE = {"user.add": "User {target} added.", "user.disable": "User {target} disabled; their sessions ended.",
             "user.enable": "User {target} enabled.", "user.role": "Role of {target} changed; their sessions ended.",
             "user.phi": "PHI permission of {target} changed; their sessions ended.",
             "user.passwd": "Password of {target} reset; their sessions ended.", "user.remove": "User {target} removed.",
             "token.revoke": "Token {target} revoked."}


def _masked_error(store, error: str, message_id: int | None) -> str:
    """A dead letter's error text, masked: quoted values, and the person values of a message of its
    group (a peer's text such as "AE: DOE JANE unknown" names the patient without quotes)."""
    stored = store.get_message(message_id) if message_id is not None else None
    return mask_known(mask_text(error), person_values(stored["raw"]) if stored else ())


def _group_token(group: dict) -> str:
    """A group of dead letters as a form value (it only selects: the server reads the store again)."""
    data = json.dumps([group["channel"], group["destination"], group["error"]]).encode("utf-8")
    return base64.urlsafe_b64encode(data).decode("ascii")


def _token_digest(token: str) -> str:
    """A group of dead letters named in a URL without its error text (which may name a patient)."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()[:16]


def _group_of(token: str) -> tuple[str, str, str]:
    try:
        channel, destination, error = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (ValueError, TypeError) as exc:
        raise ValueError("not a group") from exc
    if not all(isinstance(v, str) for v in (channel, destination, error)):
        raise ValueError("not a group")
    return channel, destination, error


def _file_and_findings(path) -> tuple[str, list[str]]:
    """A channel file as it is on disk now (secrets stay references: ${VAR}, ${file:...}) and what
    lint says of it."""
    from hl7relay.channels import load_channel

    try:
        with open(path, "rb") as f:
            text = f.read(256 * 1024).decode("utf-8", "replace")
    except OSError as exc:
        return "", [f"cannot read {path}: {exc.strerror}"]
    try:
        _, errors = load_channel(path)
    except Exception as exc:  # noqa: BLE001 - shown, not raised: the page is for finding problems
        errors = [f"{type(exc).__name__}: {exc}"]  # type: ignore[list-item]
    return text, [str(e) for e in errors]


def _target(config) -> str:
    config = getattr(config, "sender", config)  # an MLLP destination's peer is its sender's
    for attributes in (("host", "port"), ("directory",), ("channel",)):
        values = [getattr(config, a, None) for a in attributes]
        if all(v is not None for v in values):
            return ":".join(str(v) for v in values) + (" (TLS)" if getattr(config, "tls", None) else "")
    return ""


class LiveStream:
    """One browser's server-sent events: the fragment re-rendered every ``interval`` seconds and
    sent when it changed; a heartbeat comment when nothing was sent for ``heartbeat`` seconds.

    It is the request's streaming producer: when the browser reads slower than updates come, the
    transport pauses it and the updates in between are dropped (the next one sent says how many),
    so a slow client costs one pending update, never a growing buffer."""

    def __init__(self, console: ConsoleBase, request, render, event: str, interval: float = 1.0,
                 heartbeat: float = 15.0, session: Session | None = None):
        self.console = console
        # whose stream it is: it ends when their session does (signed out, everywhere too; ended by
        # an admin's change of the account; expired), and the account is read again every 30 s
        # (disabled or demoted from the command line)
        self.session = session
        self.cookie = (request.getCookie(SESSION_COOKIE) or b"").decode("latin-1") if session is not None else None
        self._rechecking = False
        self.request = request
        self.render = render
        self.event = event
        self.heartbeat = heartbeat
        self.paused = False
        self.skipped = 0
        self.last = None
        self.last_sent = 0.0
        # fires only if Klein cancels it (the connection was lost); the stream ends with the page
        self.done: defer.Deferred = defer.Deferred(lambda _: self._stop())
        console.streams += 1
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"X-Accel-Buffering", b"no")
        request.registerProducer(self, True)
        request.write(b"retry: 3000\n\n")
        self.loop = task.LoopingCall(self.tick)
        self.loop.clock = console.reactor
        self.loop.start(interval, now=True)
        request.notifyFinish().addBoth(self._finished)

    def tick(self):
        if self.session is not None and not self._session_holds():
            return
        if self.paused:
            self.skipped += 1
            return
        now = self.console.clock()
        html = self.render()
        if html == self.last:
            if now - self.last_sent >= self.heartbeat:
                self.request.write(b": heartbeat\n\n")
                self.last_sent = now
            return
        self.last = html
        if self.skipped:
            html = f'<p class="note">{self.skipped} update(s) skipped: this browser fell behind</p>\n' + html
            self.skipped = 0
        data = "".join(f"data: {line}\n" for line in html.splitlines())
        self.request.write(f"event: {self.event}\n{data}\n".encode("utf-8"))
        self.last_sent = now

    def _session_holds(self) -> bool:
        """Whether the stream may go on; ends it (saying so to the page) when not."""
        console = self.console
        session = self.session
        if session is None or console.sessions.get(self.cookie, touch=False) is not session:  # a page left open is no activity
            self._end("Signed out: this view stopped. Sign in again to see it live.")
            return False
        if console.clock() - session.checked_at > 30 and not self._rechecking:
            self._rechecking = True

            def rechecked(user):
                self._rechecking = False
                if user is None or user["disabled"] or user["role"] != session.role or bool(user["phi"]) != session.phi:
                    console.sessions.end_all(session.user)  # signed in again with what the account is now
                else:
                    session.checked_at = console.clock()

            def failed(_):
                self._rechecking = False  # the store did not answer: tried again on the next tick

            console.controls.writer.read(console.controls.writer.store.get_user, session.user).addCallbacks(rechecked, failed)
        return True

    def _end(self, text: str) -> None:
        """Say why to the page, then end the response (Klein finishes it when ``done`` fires)."""
        self._stop()
        if self.done.called:
            return
        self.request.write(f'event: ended\ndata: <p class="note status-warn" id="stream-ended-note">{text} '
                           '<a href="/login">Sign in</a></p>\n\n'.encode("utf-8"))
        self.request.unregisterProducer()
        self.done.callback(None)

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        self._stop()

    def _finished(self, _):
        self._stop()

    def _stop(self):
        if self.loop.running:
            self.loop.stop()
            self.console.streams -= 1

