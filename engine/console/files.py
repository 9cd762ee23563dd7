"""Files: what the file sources read, from the store's file ledger, and each file's messages."""

from __future__ import annotations

import time

from twisted.internet import defer

from hl7relay.console.base import ConsoleBase, HTTPError, _masked_error, app, page


class FilePages(ConsoleBase):
    @app.route("/files", methods=["GET"])
    @page("read")
    @defer.inlineCallbacks
    def files(self, request, session):
        """Files seen in the last --hours (24): the totals by state, then one row a file."""
        channel = self._field(request, "channel") or None
        hours_text = self._field(request, "hours") or "24"
        try:
            hours = float(hours_text)
        except ValueError:
            raise HTTPError(400, f"hours: {hours_text!r} is not a number") from None
        if not 0 < hours <= 24 * 366:
            raise HTTPError(400, "hours: more than 0, at most a year (8784)")
        since = self.controls.clock() - hours * 3600
        rows = yield self.support.run(lambda store: store.files(channel=channel, since=since, limit=500))
        from hl7relay.ops.files import file_totals

        totals = file_totals(rows)
        return self._render("files.html", request, session=session, active="files", rows=rows, totals=totals,
                            channel=channel, channels=self.controls.channel_names(), hours=hours_text)

    @app.route("/files/<int:file_id>", methods=["GET"])
    @page("read")
    def file_page(self, request, session, file_id):
        return self.file(request, session, file_id)

    @defer.inlineCallbacks
    def file(self, request, session, file_id, said: str = ""):
        def load(store):
            entry = store.file(file_id)
            if entry is None:
                return None, []
            rows = store.file_message_rows(file_id, limit=5000)
            for row in rows:
                if row["error"]:
                    row["error"] = _masked_error(store, row["error"], row["id"])
            return entry, rows

        entry, rows = yield self.support.run(load)
        if entry is None:
            raise HTTPError(404, f"no file {file_id} in the ledger")
        problems = [p for p in (entry.get("problems") or "").splitlines() if p]
        return self._render("file.html", request, session=session, active="files", entry=entry, rows=rows,
                            problems=problems, now=time.time(), said=said)

    @app.route("/files/<int:file_id>/reimport", methods=["POST"])
    @page("replay", post=True)
    @defer.inlineCallbacks
    def file_reimport(self, request, session, file_id):
        """A duplicate file imported anyway, by an operator with a reason (audited)."""
        from hl7relay.ops.files import ReimportError, reimport

        reason = self._field(request, "reason").strip()
        channels = self.controls.channels()
        audit = self._action(request, session, "file.reimport", f"file {file_id}")
        try:
            said = yield self.support.run(lambda store: reimport(store, channels, file_id, reason, audit))
        except ReimportError as exc:
            raise HTTPError(400 if exc.usage else 409, str(exc)) from None
        page = yield self.file(request, session, file_id, said=said)
        return page
