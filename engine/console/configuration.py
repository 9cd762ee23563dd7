"""Configuration: the snapshots the engine recorded at each start and reload, and what changed."""

from __future__ import annotations

import difflib

from twisted.internet import defer

from hl7relay.console.base import ConsoleBase, HTTPError, app, page


class ConfigurationPages(ConsoleBase):
    @app.route("/configuration", methods=["GET"])
    @page("read")
    @defer.inlineCallbacks
    def configuration(self, request, session):
        rows = yield self.support.run(lambda store: store.snapshots(200))
        return self._render("configuration.html", request, session=session, active="configuration", rows=rows)

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
        return self._render("configuration_snapshot.html", request, session=session, active="configuration",
                            snapshot=snapshot, other=other, changes=changes, files=sorted(snapshot["files"].items()))
