"""API integrations: the sync status of every destination, and the credentials (admins test them)."""

from __future__ import annotations

from twisted.internet import defer

from hl7relay.console.base import ConsoleBase, HTTPError, app, page
from hl7relay.ops.support import masked_view


class IntegrationPages(ConsoleBase):
    @app.route("/sync", methods=["GET"])
    @page("read")
    def sync(self, request, session):
        """The sync status: per destination its state, queue, last success, last error and its
        class; an API's token expiry and rate limiter."""
        rows = [masked_view(row) for row in self.controls.sync_view()]
        return self._render("sync.html", request, session=session, active="sync", rows=rows,
                            now=self.controls.clock())

    @app.route("/credentials", methods=["GET"])
    @page("credentials")
    def credentials(self, request, session):
        return self._credentials_page(request, session, None, "")

    def _credentials_page(self, request, session, steps, tested: str) -> bytes:
        from hl7relay.apiclient.credentials import loaded_credentials
        from hl7relay.apiclient.http import safe_url

        tokens = {}
        used: dict[str, list[str]] = {}
        for row in self.controls.sync_view():
            credential = (row.get("api") or {}).get("credential")
            if credential:
                tokens[credential["credential"]] = credential
                used.setdefault(credential["credential"], []).append(f"{row['channel']} -> {row['destination']}")
        listed = []
        for name, c in sorted(loaded_credentials().items()):
            listed.append({"name": name, "type": c.type, "used_by": used.get(name, []), "token": tokens.get(name),
                           "endpoint": safe_url(c.oauth.token_url) if c.oauth is not None else "",
                           "client_id": c.oauth.client_id if c.oauth is not None else "",
                           "auth": c.oauth.auth if c.oauth is not None else "",
                           "scope": c.oauth.scope if c.oauth is not None else "",
                           "check_url": safe_url(c.check_url) if c.check_url else "",
                           "testable": c.oauth is not None or bool(c.check_url)})
        from hl7relay.ops.check import credential_verdict

        return self._render("credentials.html", request, session=session, active="credentials", credentials=listed,
                            steps=steps, tested=tested, verdict=credential_verdict(steps) if steps else "")

    @app.route("/credentials/check", methods=["POST"])
    @page("credentials", post=True)  # it asks the token endpoint for a token: an admin's test
    @defer.inlineCallbacks
    def credentials_check(self, request, session):
        from hl7relay.apiclient.credentials import loaded_credentials
        from hl7relay.ops.check import check_credential

        name = self._field(request, "credential")
        credential = loaded_credentials().get(name)
        if credential is None:
            raise HTTPError(404, f"no credentials named {name!r}")
        if credential.oauth is None and not credential.check_url:
            raise HTTPError(400, f"{name}: a {credential.type} credential has nothing to test without check_url")
        steps = yield check_credential(credential, self.reactor, 10.0)
        yield self._audit(dict(self._action(request, session, "credential.check", name),
                               detail="; ".join(f"{s.name} {s.status}" for s in steps)))
        return self._credentials_page(request, session, steps, name)

    # -- FHIR: messages held for matching -----------------------------------------------------------
    @app.route("/matching", methods=["GET"])
    @page("read")
    def matching(self, request, session):
        """Messages whose patient matched several on the FHIR server: the candidates (masked
        unless a person with the PHI permission shows them, with a reason), resolved by an operator."""
        return self._matching_page(request, session, False)

    @defer.inlineCallbacks
    def _matching_page(self, request, session, show_phi: bool, said: str = "", status: int = 200):
        from hl7relay.ops.matching import held

        rows = yield self.support.run(lambda store: held(store, show_phi))
        return self._render("matching.html", request, status, session=session, active="matching", rows=rows,
                            shown=show_phi, said=said)

    @app.route("/matching/show", methods=["POST"])
    @page("phi", post=True)
    @defer.inlineCallbacks
    def matching_show(self, request, session):
        reason = self._field(request, "reason").strip()
        if not reason:
            raise HTTPError(400, "say why the candidates' names are shown (the reason goes to the audit log)")
        yield self._audit(self._action(request, session, "phi.view", "held for matching"))
        page = yield self._matching_page(request, session, True)
        return page

    @app.route("/matching/<int:message_id>/resolve", methods=["POST"])
    @page("replay", post=True)
    @defer.inlineCallbacks
    def matching_resolve(self, request, session, message_id):
        from hl7relay.ops.matching import ResolveError, resolve_hold

        choice = self._field(request, "patient")
        destination = self._field(request, "destination") or None
        reason = self._field(request, "reason").strip()
        channels = self.controls.channels()
        audit = self._action(request, session, "fhir.match.resolve", f"message {message_id}")
        try:
            _, done = yield self.support.run(lambda store: resolve_hold(
                store, channels, message_id, destination, None if choice == "new" else (choice or None),
                choice == "new", reason, audit))
        except ResolveError as exc:
            page = yield self._matching_page(request, session, False, str(exc), 400 if exc.usage else 409)
            return page
        page = yield self._matching_page(request, session, False, f"message {message_id}: {done}")
        return page
