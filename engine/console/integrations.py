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
