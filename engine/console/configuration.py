"""Configuration: the snapshots the engine recorded at each start, reload and rollback, what
changed, and a rollback to one (admins, with a reason, audited)."""

from __future__ import annotations

import difflib
from urllib.parse import urlencode

from twisted.internet import defer

from hl7relay.console.base import ConsoleBase, HTTPError, app, page
from hl7relay.ops.api import ROLLBACK_NOTE


class ConfigurationPages(ConsoleBase):
    @app.route("/configuration", methods=["GET"])
    @page("read")
    @defer.inlineCallbacks
    def configuration(self, request, session):
        rows = yield self.support.run(lambda store: store.snapshots(200))
        running = yield self.support.run(lambda store: self.controls.configuration_view())
        _, nodes = yield self.support.run(lambda store: store.nodes())
        from hl7relay.nodes import ALIVE_SECONDS, drift

        for node in nodes:
            node["lost"] = node["state"] == "running" and node["heartbeat_age"] > ALIVE_SECONDS
        done = None
        if self._field(request, "done") == "rollback":
            done = (f"Rolled back to snapshot {self._field(request, 'to')}: the engine now runs it as snapshot "
                    f"{self._field(request, 'now')}. {ROLLBACK_NOTE.capitalize()}.")
        return self._render("configuration.html", request, session=session, active="configuration", rows=rows,
                            running=running, done=done, nodes=nodes, drift=drift(nodes))

    @app.route("/configuration/<int:snapshot_id>/rollback", methods=["POST"])
    @page("reload", post=True)
    @defer.inlineCallbacks
    def rollback(self, request, session, snapshot_id):
        audit = self._action(request, session, "config.rollback", f"snapshot {snapshot_id}")
        if not audit["reason"]:
            raise HTTPError(400, "a rollback needs a reason: it is recorded with the snapshot and in the audit log")
        result = yield self.controls.rollback(snapshot_id, audit["actor"], audit["reason"], audit)
        for key, status in (("missing", 404), ("refused", 409)):
            if key in result:
                raise HTTPError(status, result[key])
        if "errors" in result:
            request.setResponseCode(422)
            return self._render("error.html", request, 422, status=422, session=session,
                                text=f"Rollback to snapshot {snapshot_id} refused, nothing changed: " + "; ".join(result["errors"]))
        request.redirect(b"/configuration?" + urlencode({"done": "rollback", "to": snapshot_id,
                                                         "now": result.get("snapshot") or "?"}).encode())
        request.setResponseCode(303)
        return b""

    @app.route("/configuration/<int:snapshot_id>", methods=["GET"])
    @page("read")
    @defer.inlineCallbacks
    def configuration_snapshot(self, request, session, snapshot_id):
        """A snapshot's files, and what changed since another (``against``: the one before by default)."""
        against_text = self._field(request, "against")
        if against_text and not against_text.isdigit():
            raise HTTPError(400, f"against: {against_text!r} is not a snapshot number")

        def load(store):
            snapshot = store.snapshot(snapshot_id)
            if snapshot is None:
                return None, None
            if against_text:
                other = store.snapshot(int(against_text))
            else:
                earlier = [r for r in store.snapshots(1000) if r["id"] < snapshot_id]
                other = store.snapshot(earlier[0]["id"]) if earlier else None
            return snapshot, other

        snapshot, other = yield self.support.run(load)
        if snapshot is None:
            raise HTTPError(404, f"no snapshot {snapshot_id}")
        if against_text and other is None:
            raise HTTPError(404, f"no snapshot {against_text}")
        changes = []
        if other is not None:
            before, after = other["files"], snapshot["files"]
            for path in sorted(set(before) | set(after)):
                if before.get(path) != after.get(path):
                    lines = list(difflib.unified_diff(before.get(path, "").splitlines(), after.get(path, "").splitlines(),
                                                      lineterm="", n=2))[2:]
                    changes.append({"path": path, "lines": lines, "added": path not in before,
                                    "removed": path not in after})
        running = self.controls.configuration_view()
        return self._render("configuration_snapshot.html", request, session=session, active="configuration",
                            snapshot=snapshot, other=other, changes=changes, files=sorted(snapshot["files"].items()),
                            running=running)
