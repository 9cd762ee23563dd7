"""The audit log, users and tokens (admins), and one's own account."""

from __future__ import annotations

import json
from urllib.parse import quote, urlencode

from twisted.internet import defer, threads

from hl7relay.ops.auth import ROLES, hash_password, verify_password
from hl7relay.store.database import MAX_ROW_ID, StoreError
from hl7relay.store.records import LastAdminError

from hl7relay.console.base import SESSION_COOKIE, USER_DONE, ConsoleBase, HTTPError, app, page


# what a role change gives or takes, said on its confirmation page
ROLE_MEANS = {"viewer": "can read the dashboard, messages (masked) and channels, and change nothing",
              "operator": "can also pause, resume and retry destinations, enable and disable channels, and replay "
                          "messages",
              "admin": "can also manage users and tokens, reload channels, prune the store, read the audit log and see "
                       "patient data (with a reason, audited)"}


def _article(role: str) -> str:
    return "an" if role[0] in "aeiou" else "a"


class AccountPages(ConsoleBase):
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
            if not audit["reason"]:
                raise HTTPError(400, "a role change needs a reason: it goes to the audit log")
            if user["role"] == "admin" and role != "admin" and not user["disabled"]:
                admins = yield self.support.run(lambda store: [u["name"] for u in store.list_users()
                                                               if u["role"] == "admin" and not u["disabled"]])
                if admins == [name]:  # said now, not after a confirmation the store would refuse
                    raise HTTPError(409, str(LastAdminError(name)))
            if role != user["role"] and self._field(request, "confirm") != "1":
                return self._render(
                    "confirm.html", request, session=session, title=f"Make {name} {_article(role)} {role}",
                    consequence=f"{name} is {_article(user['role'])} {user['role']} now; as {_article(role)} {role} they "
                                f"{ROLE_MEANS[role]}. Their sessions end, so they sign in again with the new role.",
                    action=f"/users/{quote(name)}/role", fields=[("role", role)], reason=audit["reason"],
                    button=f"Make {name} {_article(role)} {role}", cancel="/users", active="users")
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
            try:
                yield self.support.run(lambda store: store.remove_user(name, audit))
            except LastAdminError as exc:
                raise HTTPError(409, str(exc)) from None
            self.sessions.end_all(name)
            return self._to_users(request, "user.remove", name)
        else:
            raise HTTPError(404, "no such action")
        try:
            yield self.support.run(lambda store: store.update_user(name, audit, **values))
        except LastAdminError as exc:
            raise HTTPError(409, str(exc)) from None
        if action in ("disable", "passwd", "role", "phi"):
            self.sessions.end_all(name)  # signed in again with what the account is now
        return self._to_users(request, f"user.{action}", name)

    @app.route("/tokens/create", methods=["POST"])
    @page("users", post=True)
    @defer.inlineCallbacks
    def token_create(self, request, session):
        from hl7relay.ops.auth import new_token, token_hash, valid_name

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
        # a password changed because it leaked: whoever signed in with the old one is out (this page stays)
        self.sessions.end_all(session.user, keep=(request.getCookie(SESSION_COOKIE) or b"").decode("latin-1"))
        request.redirect(b"/account?done=password")
        request.setResponseCode(303)
        return b""
