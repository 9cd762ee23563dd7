"""Signing in and out: the sign-in form, its throttles, the session cookie."""

from __future__ import annotations

import re

from twisted.internet import defer, threads

from hl7relay.ops.auth import verify_password

from hl7relay.console.base import ConsoleBase, HTTPError, LOGIN_COOKIE, SESSION_COOKIE, _NO_USER_HASH, app, page


class SignInPages(ConsoleBase):
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
        request.redirect((target if local_path(target) else "/").encode("utf-8"))
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


# a path of this console's own: "/" then a plain path (no scheme, host, backslash, control
# character or whitespace: a browser drops tabs and newlines from a URL, so "/<TAB>/evil.example"
# would have become "//evil.example", another site), then an optional query
_LOCAL_PATH = re.compile(r"/(?![/\\])[A-Za-z0-9._~!$&'()*+,;=:@%/-]*(\?[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*)?")


def local_path(target: str) -> bool:
    """Whether a sign-in's ``next`` is a plain path on this console (else it goes to the dashboard)."""
    return bool(_LOCAL_PATH.fullmatch(target)) and len(target) <= 2000
