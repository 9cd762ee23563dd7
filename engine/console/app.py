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
import json
import re
import time
from pathlib import Path
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from klein import Klein
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from werkzeug.exceptions import MethodNotAllowed, NotFound

from sqlalchemy.exc import SQLAlchemyError

from hl7relay.console.sessions import LoginThrottle, Sessions
from hl7relay.outcomes import STORED_STATUSES, DeliveryStatus
from hl7relay.ops.auth import ROLES, can, hash_password, verify_password
from hl7relay.ops.phi import mask_known, mask_text, person_values
from hl7relay.ops.search import SEARCH_FILTERS, MessageQuery, Searcher, SearchRefused, search_messages
from hl7relay.ops.support import SupportStore, masked_view, message_view, row_view
from hl7relay.store.database import MAX_ROW_ID, StoreError

__all__ = ["Console", "CSP"]

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


class Console:
    app = Klein()

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
        self._channels_html = None  # (when, html): the dashboard's table, shared by the live views
        self._trace_cursors: dict = {}  # (user, trace id) -> the last row a tracer page has shown
        self.templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                                     trim_blocks=True, lstrip_blocks=True)
        self.templates.filters.update(when=when, age=age)
        self.templates.globals.update(can=can, ROLES=ROLES)

    def resource(self):
        return self.app.resource()

    # -- plumbing ---------------------------------------------------------------------------------
    def _headers(self, request) -> None:
        for name, value in ((b"Cache-Control", b"no-store"), (b"Content-Security-Policy", CSP.encode()),
                            (b"X-Content-Type-Options", b"nosniff"), (b"Referrer-Policy", b"no-referrer"),
                            (b"X-Frame-Options", b"DENY"), (b"Cross-Origin-Opener-Policy", b"same-origin")):
            request.setHeader(name, value)

    def _render(self, name: str, request=None, code: int = 200, **values) -> bytes:
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
        if post and not self._origin_ok(request):
            raise HTTPError(403, "this form was sent from another site")
        session = self.sessions.get((request.getCookie(SESSION_COOKIE) or b"").decode("latin-1"))
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
            raise HTTPError(403, "the form's security token is missing or stale: reload the page")
        if not can(session.role, permission, session.phi):
            raise HTTPError(403, f"{session.user} ({session.role}) may not do this")
        return session

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

    # -- static files -------------------------------------------------------------------------------
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

    # -- sign in and out ----------------------------------------------------------------------------
    @app.route("/login", methods=["GET"])
    @page(permission=None)
    def login_page(self, request, session):
        if session is not None:
            request.redirect(b"/")
            return b""
        return self._login_form(request)

    def _login_form(self, request, status: int = 200, error: str = ""):
        import secrets

        token = secrets.token_urlsafe(24)
        request.addCookie(LOGIN_COOKIE, token.encode(), path=b"/login", httpOnly=True, sameSite="strict",
                          secure=self.tls)
        nexts = self._field(request, "next")
        d = self.controls.writer.read(self.controls.writer.store.list_users)
        d.addCallback(lambda users: self._render("login.html", request, status, login_token=token, error=error,
                                                 next=nexts, no_users=not users, session=None))
        return d

    @app.route("/login", methods=["POST"])
    @page(permission=None, post=True)
    @defer.inlineCallbacks
    def login(self, request, session):
        import hmac

        token = (request.getCookie(LOGIN_COOKIE) or b"").decode("latin-1")
        if not token or not hmac.compare_digest(token, self._field(request, "login_token")):
            raise HTTPError(403, "the sign-in form is stale: reload the page")
        name = self._field(request, "name").strip()[:64]
        password = self._field(request, "password")
        source = self._source(request)
        user_key, address_key = name.lower(), source
        audit = {"actor": f"user:{name}", "source": source, "action": "login", "target": "console"}
        wait = max(self.user_throttle.wait(user_key), self.address_throttle.wait(address_key))
        if wait > 0:
            yield self._audit(dict(audit, result="refused", detail=f"backing off: {wait:.0f} s after failed sign-ins"))
            result = yield self._login_form(request, 429, f"Too many failed sign-ins: try again in {wait:.0f} s.")
            return result
        user = yield self.controls.writer.read(self.controls.writer.store.get_user, name) if name else defer.succeed(None)
        stored = user["password_hash"] if user else _NO_USER_HASH
        reactor = self.reactor
        matches = yield threads.deferToThreadPool(reactor, reactor.getThreadPool(), verify_password, password, stored)
        if user is None or not matches or user["disabled"]:
            self.user_throttle.failed(user_key)
            self.address_throttle.failed(address_key)
            why = "no such user" if user is None else ("disabled" if matches else "wrong password")
            yield self._audit(dict(audit, result="failed", detail=why))
            result = yield self._login_form(request, 401, "Wrong name or password, or the account is disabled.")
            return result
        self.user_throttle.succeeded(user_key)  # not the address: one good password does not excuse a spray
        session_id, _ = self.sessions.create(user["name"], user["role"], bool(user["phi"]), source)
        now = self.clock()
        yield self.support.run(lambda store: store.record_login(user["name"], now, dict(audit, actor=f"user:{user['name']}",
                                                                                        role=user["role"])))
        request.addCookie(SESSION_COOKIE, session_id.encode(), path=b"/", httpOnly=True, sameSite="strict", secure=self.tls)
        request.addCookie(LOGIN_COOKIE, b"", path=b"/login", httpOnly=True, sameSite="strict", secure=self.tls,
                          max_age=b"0")
        target = self._field(request, "next")
        safe = target.startswith("/") and not target.startswith("//") and not target.startswith("/\\")
        request.redirect((target if safe else "/").encode("utf-8"))
        request.setResponseCode(303)
        return b""

    @app.route("/logout", methods=["POST"])
    @page(permission="read", post=True)
    @defer.inlineCallbacks
    def logout(self, request, session):
        everywhere = self._field(request, "everywhere") == "1"
        if everywhere:
            ended = self.sessions.end_all(session.user)
        else:
            self.sessions.end((request.getCookie(SESSION_COOKIE) or b"").decode("latin-1"))
            ended = 1
        yield self._audit(dict(self._action(request, session, "logout", "console"),
                               detail=f"signed out everywhere ({ended} session(s))" if everywhere else ""))
        request.addCookie(SESSION_COOKIE, b"", path=b"/", httpOnly=True, sameSite="strict", secure=self.tls, max_age=b"0")
        request.redirect(b"/login")
        request.setResponseCode(303)
        return b""

    # -- dashboard ----------------------------------------------------------------------------------
    def dashboard_data(self) -> list[dict]:
        """Every channel with its counters and destinations: from memory only (no store read)."""
        status = masked_view(self.controls.status())
        return [dict(view, destinations=sorted(view["destinations"].items())) for _, view in sorted(status["channels"].items())]

    def render_channels(self) -> str:
        """The dashboard's table; rendered at most every half second however many live views are
        open (a hundred open dashboards cost one render a tick, not a hundred, on the ACKing thread)."""
        now = self.clock()
        cached = self._channels_html
        if cached is not None and 0 <= now - cached[0] < 0.5:
            return cached[1]
        html = self.templates.get_template("_channels.html").render(channels=self.dashboard_data(), now=now)
        self._channels_html = (now, html)
        return html

    @app.route("/", methods=["GET"])
    @page("read")
    def dashboard(self, request, session):
        return self._render("dashboard.html", request, session=session, channels_html=self.render_channels(),
                            active="dashboard")

    @app.route("/live/dashboard", methods=["GET"])
    @page("read")
    def live_dashboard(self, request, session):
        if self.streams >= MAX_STREAMS:
            raise HTTPError(503, "too many live views open")
        return LiveStream(self, request, self.render_channels, "channels").done

    # -- messages -------------------------------------------------------------------------------------
    @app.route("/messages", methods=["GET"])
    @page("read")
    @defer.inlineCallbacks
    def messages(self, request, session):
        filters = {name: self._field(request, name).strip() for name in SEARCH_FILTERS}
        filters = {k: v for k, v in filters.items() if v}
        text = self._field(request, "text").strip()
        since, until = self._time(request, "since"), self._time(request, "until")
        before = self._field(request, "before")
        if before and not (before.isdigit() and int(before) <= MAX_ROW_ID):
            raise HTTPError(400, "before is a message number")
        search = MessageQuery(filters, failed=self._field(request, "failed") == "1", since=since, until=until,
                              before=int(before) if before else None, limit=PAGE_SIZE, text=text or None)
        searcher = Searcher(f"user:{session.user}", session.role, self._source(request),
                            can(session.role, "phi", session.phi), self._field(request, "reason").strip())
        try:
            rows = yield self.support.run(lambda store: search_messages(store, search, searcher))
        except SearchRefused:
            raise HTTPError(403, "searching message content needs the permission to see patient data") from None
        query = {k: v for k, v in ((n, self._field(request, n)) for n in (*SEARCH_FILTERS, "failed", "text", "since", "until"))
                 if v}
        older = "/messages?" + urlencode(dict(query, before=rows[-1]["id"])) if len(rows) == PAGE_SIZE else None
        return self._render("messages.html", request, session=session, rows=[row_view(r, False) for r in rows],
                            query=query, older=older, channels=self.controls.channel_names(), statuses=STATUSES,
                            can_search_text=can(session.role, "phi", session.phi),
                            delivery_statuses=[status.value for status in DeliveryStatus],
                            active="messages")

    def _time(self, request, name: str):
        value = self._field(request, name).strip()
        if not value:
            return None
        for layout in ("%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
            try:
                return time.mktime(time.strptime(value, layout))  # the site's time zone, as shown
            except ValueError:
                continue
        raise HTTPError(400, f"{name}: a date and time such as 2026-11-30T14:05")

    @app.route("/messages/<int:message_id>", methods=["GET"])
    @page("read")
    def message(self, request, session, message_id):
        return self._message(request, session, message_id, None)

    @app.route("/messages/<int:message_id>/reveal", methods=["POST"])
    @page("phi", post=True)
    @defer.inlineCallbacks
    def reveal(self, request, session, message_id):
        audit = self._action(request, session, "phi.view", f"message {message_id}")
        if not audit["reason"]:
            raise HTTPError(400, "showing patient data needs a reason: it is written to the audit log")
        yield self._audit(audit)
        result = yield self._message(request, session, message_id, audit["reason"])
        return result

    @app.route("/messages/<int:message_id>/download", methods=["POST"])
    @page("phi", post=True)
    @defer.inlineCallbacks
    def download(self, request, session, message_id):
        """The message as received, byte for byte: patient data, so a reason and an audit entry first."""
        audit = self._action(request, session, "phi.download", f"message {message_id}")
        if not audit["reason"]:
            raise HTTPError(400, "downloading a message needs a reason: it is written to the audit log")
        stored = yield self.support.run(lambda store: store.get_message(message_id))
        if stored is None:
            raise HTTPError(404, f"no message {message_id}")
        yield self._audit(audit)
        request.setHeader(b"Content-Type", b"application/octet-stream")
        request.setHeader(b"Content-Disposition", f'attachment; filename="message-{message_id}.hl7"'.encode())
        return stored["raw"]

    @app.route("/messages/<int:message_id>/replay", methods=["POST"])
    @page("replay", post=True)
    @defer.inlineCallbacks
    def replay(self, request, session, message_id):
        """A dry run first (what each chosen destination would get, and how it differs from what
        was sent), then, confirmed with a reason, the replay (audited in its own transaction)."""
        from hl7relay.ops.replay import commit_replay, plan_replay

        chosen = [v.decode("utf-8", "replace") for v in (request.args or {}).get(b"destination", [])] or None
        force = self._field(request, "force") == "1"
        confirm, reason, channels, render = self._replay_form(request)
        audit = self._action(request, session, "replay", f"message {message_id}")

        def work(store):
            plan = plan_replay(store, channels, message_id, chosen, force, render)
            if confirm and not plan.skipped:
                return plan, commit_replay(store, channels, plan, reason, audit["actor"], audit=audit)
            return plan, None

        plan, replay_id = yield self.support.run(work)
        if plan.skipped.startswith("no message"):
            raise HTTPError(404, plan.skipped)
        if replay_id is not None:
            request.redirect(f"/messages/{replay_id}".encode())
            request.setResponseCode(303)
            return b""
        channel = channels.get(plan.channel)
        return self._render("replay_message.html", request, 409 if confirm else 200, session=session, plan=plan,
                            destinations=[d.name for d in channel.destinations] if channel else [],
                            chosen=set(chosen or []), force=force, active="messages")

    def _replay_form(self, request):
        """What both replay forms share: (confirmed, reason, the running channels, how a diff's
        sides are shown). A confirmed replay needs a reason: it goes to the audit log."""
        from hl7relay.ops.phi import mask_message

        confirm = self._field(request, "confirm") == "1"
        reason = self._field(request, "reason").strip()[:500]
        if confirm and not reason:
            raise HTTPError(400, "a replay needs a reason: it is written to the audit log")
        channels = self.controls.channels()
        return confirm, reason, channels, lambda data: mask_message(data).split("\n")  # diffs are masked, always

    @defer.inlineCallbacks
    def _message(self, request, session, message_id: int, reason: str | None):
        def load(store):
            stored = store.get_message(message_id)
            return stored, (store.replays_of(message_id) if stored is not None else [])

        stored, replays = yield self.support.run(load)
        if stored is None:
            raise HTTPError(404, f"no message {message_id}")
        view = message_view(stored, reason is not None)
        return self._render("message.html", request, session=session, message=view, revealed=reason, replays=replays,
                            active="messages")


    # -- dead letters ---------------------------------------------------------------------------------------
    @app.route("/dead-letters", methods=["GET"])
    @page("replay")
    @defer.inlineCallbacks
    def dead_letters(self, request, session):
        channel = self._field(request, "channel") or None

        def load(store):
            groups = store.dead_letters(channel=channel)
            for group in groups:
                group["token"] = _group_token(group)
                group["error"] = _masked_error(store, group["error"], group["sample_id"])
            return groups

        groups = yield self.support.run(load)
        done = self._field(request, "done")
        return self._render("dead_letters.html", request, session=session, groups=groups, channel=channel,
                            channels=self.controls.channel_names(), active="dead-letters",
                            done=done if re.fullmatch(r"replayed \d+, skipped \d+", done or "") else None)

    @app.route("/dead-letters/replay", methods=["POST"])
    @page("replay", post=True)
    @defer.inlineCallbacks
    def replay_dead_letters(self, request, session):
        from hl7relay.ops.replay import commit_replay, plan_replay

        groups = []
        for token in (request.args or {}).get(b"group", [])[:50]:
            try:
                groups.append(_group_of(token.decode("ascii")))
            except ValueError:
                raise HTTPError(400, "a selected group is not one this page offered") from None
        if not groups:
            raise HTTPError(400, "select at least one group of dead letters")
        confirm, reason, channels, render = self._replay_form(request)
        actor, role, source = f"user:{session.user}", session.role, self._source(request)

        def work(store):
            selected = []
            for channel, destination, error in groups:
                ids = store.dead_letter_ids(channel, destination, error)
                plans = [plan_replay(store, channels, i, [destination], False, render) for i in ids]
                selected.append({"channel": channel, "destination": destination,
                                 "error": _masked_error(store, error, ids[0] if ids else None),
                                 "token": _group_token({"channel": channel, "destination": destination, "error": error}),
                                 "plans": plans})
            if not confirm:
                return selected, 0, 0
            replayed = skipped = 0
            for group in selected:
                for plan in group["plans"]:
                    if plan.skipped:
                        skipped += 1
                    else:
                        commit_replay(store, channels, plan, reason, actor)
                        replayed += 1
            targets = ", ".join(f"{g['channel']}/{g['destination']} ({len(g['plans'])})" for g in selected)
            ids = " ".join(str(p.original_id) for g in selected for p in g["plans"] if not p.skipped)
            store.audit({"actor": actor, "role": role, "source": source, "action": "replay.bulk",
                         "target": f"dead letters {targets}"[:500], "reason": reason,
                         "detail": f"replayed {replayed}, skipped {skipped}: {ids}"[:2000]})
            return selected, replayed, skipped

        selected, replayed, skipped = yield self.support.run(work)
        if confirm:
            request.redirect(b"/dead-letters?" + urlencode({"done": f"replayed {replayed}, skipped {skipped}"}).encode())
            request.setResponseCode(303)
            return b""
        return self._render("replay_preview.html", request, session=session, groups=selected, active="dead-letters")

    # -- audit log --------------------------------------------------------------------------------------------
    @app.route("/audit", methods=["GET"])
    @page("audit")
    @defer.inlineCallbacks
    def audit_log(self, request, session):
        actor = self._field(request, "actor").strip() or None
        action = self._field(request, "action").strip() or None
        since = self._time(request, "since")
        before = self._field(request, "before")
        if before and not (before.isdigit() and int(before) <= MAX_ROW_ID):
            raise HTTPError(400, "before is an entry number")
        export = self._field(request, "format") == "json"
        limit = 1000 if export else 100
        entries = yield self.support.run(lambda store: store.audit_entries(
            since=since, actor=actor, action=action, before_id=int(before) if before else None, limit=limit))
        if export:
            request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
            request.setHeader(b"Content-Disposition", b'attachment; filename="hl7relay-audit.json"')
            return json.dumps(entries, indent=1).encode("utf-8")
        query = {k: v for k, v in (("actor", actor), ("action", action), ("since", self._field(request, "since"))) if v}
        older = "/audit?" + urlencode(dict(query, before=entries[-1]["id"])) if len(entries) == limit else None
        return self._render("audit.html", request, session=session, entries=entries, query=query, older=older,
                            export="/audit?" + urlencode(dict(query, format="json")), active="audit")

    # -- users and tokens -------------------------------------------------------------------------------
    @app.route("/users", methods=["GET"])
    @page("users")
    @defer.inlineCallbacks
    def users(self, request, session):
        users, tokens = yield self.support.run(lambda store: (store.list_users(), store.list_tokens()))
        done = USER_DONE.get(self._field(request, "done"))
        return self._render("users.html", request, session=session, users=users, tokens=tokens, active="users",
                            done=done.format(target=self._field(request, "target")) if done else None, new_token=None)

    @app.route("/users/add", methods=["POST"])
    @page("users", post=True)
    @defer.inlineCallbacks
    def user_add(self, request, session):
        from hl7relay.ops.auth import MIN_PASSWORD
        from hl7relay.ops.auth import valid_name
        from hl7relay.store.database import StoreError

        name, role = self._field(request, "name").strip(), self._field(request, "role")
        password = self._field(request, "password")
        if not valid_name(name):
            raise HTTPError(400, "a user name is letters, digits and . _ @ -, up to 64, starting with a letter or digit")
        if role not in ROLES:
            raise HTTPError(400, f"role is one of {', '.join(ROLES)}")
        if len(password) < MIN_PASSWORD:
            raise HTTPError(400, f"a password needs at least {MIN_PASSWORD} characters")
        hashed = yield threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), hash_password, password)
        audit = dict(self._action(request, session, "user.add", name), detail=f"role {role}")
        try:
            yield self.support.run(lambda store: store.add_user(name, role, hashed, audit))
        except StoreError as exc:
            raise HTTPError(409, str(exc)) from None
        return self._to_users(request, "user.add", name)

    @app.route("/users/<name>/<action>", methods=["POST"])
    @page("users", post=True)
    @defer.inlineCallbacks
    def user_change(self, request, session, name, action):
        from hl7relay.ops.auth import MIN_PASSWORD
        from hl7relay.ops.auth import PHI_GRANTABLE

        user = yield self.support.run(lambda store: store.get_user(name))
        if user is None:
            raise HTTPError(404, f"no user {name!r}")
        audit = self._action(request, session, f"user.{action}", name)
        if action in ("disable", "enable"):
            if action == "disable" and name == session.user:
                raise HTTPError(400, "you cannot disable yourself (another admin can)")
            values = {"disabled": action == "disable"}
        elif action == "role":
            role = self._field(request, "role")
            if role not in ROLES:
                raise HTTPError(400, f"role is one of {', '.join(ROLES)}")
            values, audit["detail"] = {"role": role}, f"role {role}"
        elif action == "phi":
            on = self._field(request, "phi") == "on"
            if on and ROLES.index(user["role"]) < ROLES.index(PHI_GRANTABLE):
                raise HTTPError(400, f"{name} is a {user['role']}: only an {PHI_GRANTABLE} or an admin may see patient data")
            values, audit["detail"] = {"phi": on}, f"phi {'on' if on else 'off'}"
        elif action == "passwd":
            password = self._field(request, "password")
            if len(password) < MIN_PASSWORD:
                raise HTTPError(400, f"a password needs at least {MIN_PASSWORD} characters")
            hashed = yield threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), hash_password, password)
            values = {"password_hash": hashed}
        elif action == "remove":
            if name == session.user:
                raise HTTPError(400, "you cannot remove yourself (another admin can)")
            yield self.support.run(lambda store: store.remove_user(name, audit))
            self.sessions.end_all(name)
            return self._to_users(request, "user.remove", name)
        else:
            raise HTTPError(404, "no such action")
        yield self.support.run(lambda store: store.update_user(name, audit, **values))
        if action in ("disable", "passwd", "role", "phi"):
            self.sessions.end_all(name)  # signed in again with what the account is now
        return self._to_users(request, f"user.{action}", name)

    @app.route("/tokens/create", methods=["POST"])
    @page("users", post=True)
    @defer.inlineCallbacks
    def token_create(self, request, session):
        from hl7relay.ops.auth import new_token, token_hash, valid_name
        from hl7relay.store.database import StoreError

        name, role = self._field(request, "name").strip(), self._field(request, "role")
        if not valid_name(name) or role not in ROLES:
            raise HTTPError(400, f"a token needs a name (letters, digits, . _ @ -) and a role: {', '.join(ROLES)}")
        token = new_token()
        audit = dict(self._action(request, session, "token.create", name), detail=f"role {role}")
        try:
            yield self.support.run(lambda store: store.add_token(name, role, token_hash(token), audit["actor"], audit))
        except StoreError as exc:
            raise HTTPError(409, str(exc)) from None
        users, tokens = yield self.support.run(lambda store: (store.list_users(), store.list_tokens()))
        # shown once, on this page only (no-store): only its hash is kept
        return self._render("users.html", request, session=session, users=users, tokens=tokens, active="users",
                            done=None, new_token={"name": name, "token": token})

    @app.route("/tokens/<name>/revoke", methods=["POST"])
    @page("users", post=True)
    @defer.inlineCallbacks
    def token_revoke(self, request, session, name):
        audit = self._action(request, session, "token.revoke", name)
        revoked = yield self.support.run(lambda store: store.revoke_token(name, audit))
        if not revoked:
            raise HTTPError(404, f"no token {name!r}")
        return self._to_users(request, "token.revoke", name)

    @staticmethod
    def _to_users(request, done: str, target: str):
        request.redirect(b"/users?" + urlencode({"done": done, "target": target}).encode())
        request.setResponseCode(303)
        return b""

    # -- your account -----------------------------------------------------------------------------------
    @app.route("/account", methods=["GET"])
    @page("read")
    def account(self, request, session):
        return self._render("account.html", request, session=session, active="account",
                            done=self._field(request, "done") == "password", error=None)

    @app.route("/account/password", methods=["POST"])
    @page("read", post=True)
    @defer.inlineCallbacks
    def account_password(self, request, session):
        from hl7relay.ops.auth import MIN_PASSWORD

        current, new = self._field(request, "current"), self._field(request, "new")
        user = yield self.support.run(lambda store: store.get_user(session.user))
        pool = self.reactor.getThreadPool()
        matches = user is not None and (yield threads.deferToThreadPool(self.reactor, pool, verify_password, current,
                                                                        user["password_hash"]))
        if not matches:
            yield self._audit(dict(self._action(request, session, "user.passwd", session.user), result="failed",
                                   detail="wrong current password"))
            return self._render("account.html", request, 400, session=session, active="account", done=False,
                                error="The current password is not right; nothing changed.")
        if len(new) < MIN_PASSWORD or new != self._field(request, "again"):
            return self._render("account.html", request, 400, session=session, active="account", done=False,
                                error=f"The new password needs at least {MIN_PASSWORD} characters, typed the same twice.")
        hashed = yield threads.deferToThreadPool(self.reactor, pool, hash_password, new)
        yield self.support.run(lambda store: store.update_user(
            session.user, self._action(request, session, "user.passwd", session.user), password_hash=hashed))
        request.redirect(b"/account?done=password")
        request.setResponseCode(303)
        return b""

    # -- channels and their controls ---------------------------------------------------------------------
    @app.route("/channels", methods=["GET"])
    @page("read")
    @defer.inlineCallbacks
    def channels(self, request, session):
        views = []
        for name, channel in sorted(self.controls.channels().items()):
            view = masked_view(self.controls.channel_view(name))
            view["file"] = str(channel.file)
            view["text"], view["findings"] = yield threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), _file_and_findings, channel.file)
            view["configured"] = [{"name": d.name, "type": d.type, "queue": d.config.queue,
                                   "target": _target(d.config)} for d in channel.destinations]
            views.append(view)
        done = DONE.get(self._field(request, "done"))
        return self._render("channels.html", request, session=session, channels=views, active="channels",
                            done=done.format(target=self._field(request, "target")) if done else None,
                            reload_errors=None)

    @app.route("/channels/<channel>/<action>", methods=["POST"])
    @page("control", post=True)
    @defer.inlineCallbacks
    def channel_control(self, request, session, channel, action):
        if action not in ("enable", "disable"):
            raise HTTPError(404, "no such action")
        self._known(channel)
        audit = self._action(request, session, f"channel.{action}", channel)
        yield self.controls.set_channel_enabled(channel, action == "enable", audit["actor"], audit)
        return self._back(request, f"channel.{action}", channel)

    @app.route("/channels/<channel>/destinations/<destination>/<action>", methods=["POST"])
    @page("control", post=True)
    @defer.inlineCallbacks
    def destination_control(self, request, session, channel, destination, action):
        if action not in ("pause", "resume", "retry"):
            raise HTTPError(404, "no such action")
        self._known(channel, destination)
        audit = self._action(request, session, f"destination.{action}", f"{channel}/{destination}")
        if action == "retry":
            yield self.controls.retry_now(channel, destination, audit["actor"], audit)
        else:
            yield self.controls.set_destination_paused(channel, destination, action == "pause", audit["actor"], audit)
        return self._back(request, f"destination.{action}", f"{channel}/{destination}")

    @app.route("/reload", methods=["POST"])
    @page("reload", post=True)
    @defer.inlineCallbacks
    def reload(self, request, session):
        audit = self._action(request, session, "reload", "channels")
        result = yield self.controls.reload_from_files(audit["actor"], audit)
        if "errors" in result:
            request.setResponseCode(422)
            return self._render("error.html", request, 422, status=422, session=session,
                                text="Reload refused, nothing changed: " + "; ".join(result["errors"]))
        return self._back(request, "reload", "channels")

    def _known(self, channel: str, destination: str | None = None) -> None:
        if not self.controls.has_channel(channel):
            raise HTTPError(404, f"no channel {channel!r}")
        if destination is not None and not any(owner == channel and name == destination
                                               for owner, name, _ in self.controls.destinations()):
            raise HTTPError(404, f"no destination {destination!r}")

    # -- troubleshooting: try a message, performance, logs, alerts, connections, the tracer ------------------
    @app.route("/try", methods=["GET"])
    @page("read")
    def try_form(self, request, session):
        return self._render("try.html", request, session=session, active="try", channels=self.controls.channel_names(),
                            chosen="", text="", runs=None, error=None)

    @app.route("/try", methods=["POST"])
    @page("read", post=True)
    def try_message(self, request, session):
        """The channel dry run on a pasted message: the engine's pipeline, nothing sent or stored.
        What it shows is what the user pasted, so it is not masked."""
        from hl7relay.channels.dryrun import dry_run
        from hl7relay.errors import ParseError
        from hl7relay.hl7.batch import split_messages
        from hl7relay.hl7.message import Message

        name, text = self._field(request, "channel"), self._field(request, "message")
        values = dict(session=session, active="try", channels=self.controls.channel_names(), chosen=name, text=text)
        if not self.controls.has_channel(name):
            return self._render("try.html", request, 400, runs=None, error="Choose a channel.", **values)
        data = text.replace("\r\n", "\r").replace("\n", "\r").encode("utf-8")
        chunks = split_messages(data).messages[:20]
        if not chunks:
            return self._render("try.html", request, 400, runs=None, error="Paste a message starting with MSH.", **values)
        runs = []
        for chunk in chunks:
            try:
                runs.append({"run": dry_run(self.controls.channel(name), Message.from_bytes(chunk.data)), "error": ""})
            except ParseError as exc:
                runs.append({"run": None, "error": f"cannot parse: {exc}"})
        return self._render("try.html", request, runs=runs, error=None, **values)

    @app.route("/performance", methods=["GET"])
    @page("read")
    def performance(self, request, session):
        if self.controls.performance is None:
            raise HTTPError(503, "the performance analyzer is not running in this engine")
        minutes = self._field(request, "minutes")
        minutes = int(minutes) if minutes.isdigit() and 1 <= int(minutes) <= 60 else 60
        channel = self._field(request, "channel") or None
        if channel is not None and not self.controls.has_channel(channel):
            raise HTTPError(404, f"no channel {channel!r}")
        view = self.controls.performance.view(minutes, channel)
        template = "_performance.html" if request.getHeader(b"hx-request") else "performance.html"
        return self._render(template, request, session=session, active="performance", view=view, minutes=minutes,
                            channel=channel or "", channels=self.controls.channel_names())

    @app.route("/logs", methods=["GET"])
    @page("read")
    def logs(self, request, session):
        from hl7relay.logs import LOG_RING
        from hl7relay.ops.phi import mask_log_text

        level = self._field(request, "level") or None
        if level not in (None, "trace", "debug", "info", "warn", "error"):
            raise HTTPError(400, "level is trace, debug, info, warn or error")
        message_id = self._field(request, "message_id")
        lines = LOG_RING.read(0, 300, level, self._field(request, "channel") or None,
                              int(message_id) if message_id.isdigit() else None, None,
                              self._field(request, "text") or None)
        shown = [dict(line, text="(message content: see the message's page)" if line["phi"] else mask_log_text(line))
                 for line in reversed(lines)]
        query = {k: self._field(request, k) for k in ("level", "channel", "message_id", "text")}
        template = "_logs.html" if request.getHeader(b"hx-request") else "logs.html"
        return self._render(template, request, session=session, active="logs", lines=shown, query=query,
                            channels=self.controls.channel_names())

    @app.route("/alerts", methods=["GET"])
    @page("read")
    def alerts(self, request, session):
        if self.controls.alerts is None:
            raise HTTPError(503, "alerts are not running in this engine")
        from hl7relay.ops.alerts import RULES

        return self._render("alerts.html", request, session=session, active="alerts", view=self.controls.alerts.view(),
                            rules=[r.name for r in RULES], channels=self.controls.channel_names(),
                            done=self._field(request, "done"))

    @app.route("/alerts/<action>", methods=["POST"])
    @page("control", post=True)
    @defer.inlineCallbacks
    def alerts_control(self, request, session, action):
        if action not in ("silence", "unsilence") or self.controls.alerts is None:
            raise HTTPError(404, "no such action")
        rule = self._field(request, "rule")
        channel, destination = self._field(request, "channel") or None, self._field(request, "destination") or None
        where = "/".join(x for x in (channel, destination) if x) or "everywhere"
        if action == "silence":
            minutes = self._field(request, "minutes")
            try:
                self.controls.alerts.silence(rule, channel, destination, float(minutes or 60) * 60, f"user:{session.user}",
                                           self._field(request, "reason"))
            except ValueError as exc:
                raise HTTPError(400, str(exc)) from None
        elif not self.controls.alerts.unsilence(rule, channel, destination):
            raise HTTPError(404, f"no silence of {rule} for {where}")
        yield self._audit(self._action(request, session, f"alert.{action}", f"{rule} {where}"))
        request.redirect(b"/alerts?" + urlencode({"done": f"{rule} {where}: {action}d"}).encode())
        request.setResponseCode(303)
        return b""

    @app.route("/connections", methods=["GET"])
    @page("read")
    def connections(self, request, session):
        return self._connections_page(request, session, None, "")

    def _connections_page(self, request, session, steps, target: str) -> bytes:
        inbound = [self.controls.connections_view(name) for name in self.controls.channel_names()]
        outbound = [f"{name}/{destination}" for name, destination, type_ in self.controls.destinations() if type_ == "mllp"]
        return self._render("connections.html", request, session=session, active="connections", inbound=inbound,
                            outbound=outbound, steps=steps, target=target)

    @app.route("/connections/check", methods=["POST"])
    @page("read", post=True)
    @defer.inlineCallbacks
    def connections_check(self, request, session):
        from hl7relay.ops.check import check_destination, default_check_message

        target = self._field(request, "target")
        channel, _, name = target.partition("/")
        running = self.controls.channels().get(channel)
        destination = next((d for d in running.destinations if d.name == name and d.type == "mllp"), None) \
            if running is not None else None
        if destination is None:
            raise HTTPError(404, f"no MLLP destination {target!r}")
        config = destination.config
        round_trip = None
        if self._field(request, "mllp") or config.check_round_trip:
            round_trip = open(config.check_message, "rb").read() if config.check_message else default_check_message()
        # blocking sockets with timeouts: on a thread, never on the reactor
        steps = yield threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), check_destination,
                                                config.sender.host, config.sender.port, config.sender.tls, round_trip,
                                                min(config.sender.connect_timeout, 10.0))
        yield self._audit(dict(self._action(request, session, "connection.check", target),
                               detail="; ".join(f"{s.name} {s.status}" for s in steps)))
        return self._connections_page(request, session, steps, target)

    @app.route("/database", methods=["GET"])
    @page("audit")
    @defer.inlineCallbacks
    def database(self, request, session):
        """hl7relay verify, for admins: the checks on a store connection of their own, off the reactor."""
        from hl7relay.store.verify import verify

        channels = list(self.controls.channels().values())
        now = time.time()
        checks = yield self.support.run(lambda store: verify(store, channels, now, full=False))
        return self._render("database.html", request, session=session, active="database", checks=checks,
                            done=self._field(request, "done"))

    @app.route("/database/repair", methods=["POST"])
    @page("audit", post=True)
    @defer.inlineCallbacks
    def database_repair(self, request, session):
        from hl7relay.store.verify import repair, verify

        channels = list(self.controls.channels().values())
        now = time.time()

        def fix(store):
            checks = verify(store, channels, now)
            return repair(store, [c for c in checks if c.key and c.key != "migrate"], now, channels)

        done = yield self.support.run(fix)  # (a schema migration is left to hl7relay run / verify --repair)
        yield self._audit(dict(self._action(request, session, "store.repair", "store"), detail="; ".join(done) or "nothing"))
        request.redirect(b"/database?" + urlencode({"done": "; ".join(done) or "nothing to repair"}).encode())
        request.setResponseCode(303)
        return b""

    @app.route("/tracer", methods=["GET"])
    @page("read")
    def tracer(self, request, session):
        now = self.controls.reactor.seconds()
        mine = [s.view(now) for s in self.controls.tracer.sessions.values() if s.actor == f"user:{session.user}"]
        return self._render("tracer.html", request, session=session, active="tracer", traces=mine, trace=None,
                            channels=self.controls.channel_names(), error=None)

    @app.route("/tracer", methods=["POST"])
    @page("read", post=True)
    @defer.inlineCallbacks
    def tracer_start(self, request, session):
        channel = self._field(request, "channel") or None
        if channel is not None and not self.controls.has_channel(channel):
            raise HTTPError(404, f"no channel {channel!r}")
        try:
            minutes = float(self._field(request, "minutes") or 5)
            trace = self.controls.tracer.start(f"user:{session.user}", self._field(request, "direction") or "both", channel,
                                             self._field(request, "destination") or None,
                                             self._field(request, "message_type") or None, minutes * 60)
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
        yield self._audit(dict(self._action(request, session, "trace.start", f"trace {trace.id}"),
                               detail=f"direction={trace.direction}, channel={channel}, minutes={minutes:g}"))
        request.redirect(f"/tracer/{trace.id}".encode())
        request.setResponseCode(303)
        return b""

    @app.route("/tracer/<trace_id>", methods=["GET"])
    @page("read")
    def tracer_view(self, request, session, trace_id):
        trace = self._own_trace(session, trace_id)
        self._trace_cursors[(session.user, trace_id)] = 0
        return self._render("tracer.html", request, session=session, active="tracer", traces=None,
                            trace=trace.view(self.controls.reactor.seconds()), channels=self.controls.channel_names(), error=None)

    @app.route("/tracer/<trace_id>/rows", methods=["GET"])
    @page("read")
    def tracer_rows(self, request, session, trace_id):
        """The rows since this page last asked (htmx polls every second, appending them)."""
        from hl7relay.ops.trace import COLUMNS

        trace = self._own_trace(session, trace_id)
        key = (session.user, trace_id)
        rows = [dict(zip(COLUMNS, values)) for values in trace.read_rows(self._trace_cursors.get(key, 0), 500)]
        if rows:
            self._trace_cursors[key] = rows[-1]["seq"]  # (error texts were masked when the rows were taken)
        view = trace.view(self.controls.reactor.seconds())
        if view["done"] and not rows:
            request.setResponseCode(286)  # htmx: stop polling
        return self._render("_trace_rows.html", request, 286 if view["done"] and not rows else 200, rows=rows)

    @app.route("/tracer/<trace_id>/stop", methods=["POST"])
    @page("read", post=True)
    def tracer_stop(self, request, session, trace_id):
        self._own_trace(session, trace_id)
        self.controls.tracer.stop(trace_id)
        request.redirect(f"/tracer/{trace_id}".encode())
        request.setResponseCode(303)
        return b""

    def _own_trace(self, session, trace_id: str):
        try:
            trace = self.controls.tracer.get(trace_id)
        except KeyError:
            raise HTTPError(404, "no such trace (ended)") from None
        if trace.actor != f"user:{session.user}":
            raise HTTPError(404, "no such trace (ended)")  # another user's trace is not yours to read
        return trace

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
        errors = [f"{type(exc).__name__}: {exc}"]
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

    def __init__(self, console: Console, request, render, event: str, interval: float = 1.0,
                 heartbeat: float = 15.0):
        self.console = console
        self.request = request
        self.render = render
        self.event = event
        self.heartbeat = heartbeat
        self.paused = False
        self.skipped = 0
        self.last = None
        self.last_sent = 0.0
        # fires only if Klein cancels it (the connection was lost); the stream ends with the page
        self.done = defer.Deferred(lambda _: self._stop())
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

