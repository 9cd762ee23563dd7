"""Messages and dead letters: the search (one search service with the API and the CLI), a
message masked or revealed with a reason, download, replay."""

from __future__ import annotations

import re
import time
from urllib.parse import urlencode

from twisted.internet import defer

from hl7relay.outcomes import DeliveryStatus
from hl7relay.ops.auth import can
from hl7relay.ops.search import SEARCH_FILTERS, MessageQuery, Searcher, SearchRefused, search_messages
from hl7relay.ops.support import message_view, row_view
from hl7relay.store.database import MAX_ROW_ID

from hl7relay.console.base import (
    ConsoleBase, HTTPError, PAGE_SIZE, STATUSES, _group_of, _group_token, _masked_error, _token_digest, app, page,
)


_SETTLING_SECONDS = 600.0  # how long a message page refreshes deliveries that are still QUEUED
BULK_REPLAY_LIMIT = 1000  # dead letters of one group replayed at once (the oldest first)
CSV_LIMIT = 10_000  # rows of a Messages CSV export (the newest of the filters)
SELECTED_LIMIT = PAGE_SIZE  # messages ticked in the list and replayed at once
LARGE_REPLAY = 100  # a bulk replay of this many messages or more is confirmed by ticking its count too
TOTAL_MOST = 10_000  # the Messages page counts its matches up to this many ("of 10,000+" beyond)

class MessagePages(ConsoleBase):
    def _search(self, request, session, limit: int, count_most: int = 0) -> tuple[MessageQuery, Searcher, dict]:
        """The Messages page's filters as a query (the page, its "Newer" and "Older" links and the
        CSV export read them alike), who searches, and the filters to carry in links."""
        filters = {name: self._field(request, name).strip() for name in SEARCH_FILTERS}
        filters = {k: v for k, v in filters.items() if v}
        text = self._field(request, "text").strip()
        since, until = self._time(request, "since"), self._time(request, "until")
        before, after = self._field(request, "before"), self._field(request, "after")
        for name, value in (("before", before), ("after", after)):
            if value and not (value.isdigit() and int(value) <= MAX_ROW_ID):
                raise HTTPError(400, f"{name} is a message number")
        search = MessageQuery(filters, failed=self._field(request, "failed") == "1", since=since, until=until,
                              before=int(before) if before else None, after=int(after) if after and not text else None,
                              limit=limit, text=text or None, count_most=count_most)
        searcher = Searcher(f"user:{session.user}", session.role, self._source(request),
                            can(session.role, "phi", session.phi), self._field(request, "reason").strip())
        query = {k: v for k, v in ((n, self._field(request, n)) for n in (*SEARCH_FILTERS, "failed", "text", "since", "until"))
                 if v}
        return search, searcher, query

    @defer.inlineCallbacks
    def _found(self, search: MessageQuery, searcher: Searcher):
        def work(store):
            found = search_messages(store, search, searcher)
            return found, store.delivery_summary([row["id"] for row in found])  # one indexed read for the page

        try:
            return (yield self.support.run(work))
        except SearchRefused:
            raise HTTPError(403, "searching message content needs the permission to see patient data") from None

    @app.route("/messages", methods=["GET"])
    @page("read")
    @defer.inlineCallbacks
    def messages(self, request, session):
        search, searcher, query = self._search(request, session, PAGE_SIZE, TOTAL_MOST)
        rows, summaries = yield self._found(search, searcher)
        text = search.text
        paged_newer = search.after is not None
        older = ("/messages?" + urlencode(dict(query, before=rows[-1]["id"] if rows else search.after))
                 if len(rows) == PAGE_SIZE or (paged_newer and search.after) else None)
        if older and search.before is None and not paged_newer and rows.total is not None and rows.total <= len(rows):
            older = None  # counted: all of them are on this first page
        # the way back up: from a page reached by "Older", or a full page reached by "Newer"
        newer = ("/messages?" + urlencode(dict(query, after=rows[0]["id"] if rows else search.before))
                 if not text and ((search.before is not None) or (paged_newer and rows.newer_exists)) else None)
        stopped_at = getattr(rows, "stopped_at", None)  # a text search that reached its scan limit
        continue_at = "/messages?" + urlencode(dict(query, before=stopped_at)) if stopped_at else None
        return self._render("messages.html", request, session=session, rows=[row_view(r, False) for r in rows],
                            stopped_at=stopped_at, scanned=getattr(rows, "scanned", 0), continue_at=continue_at,
                            total=rows.total, total_capped=rows.total_capped,
                            summaries=summaries, csv="/messages.csv?" + urlencode(query),
                            can_replay=can(session.role, "replay"),
                            done=done if re.fullmatch(r"replayed \d+, skipped \d+", done := self._field(request, "done")) else None,
                            query=query, older=older, newer=newer, channels=self.controls.channel_names(), statuses=STATUSES,
                            can_search_text=can(session.role, "phi", session.phi),
                            delivery_statuses=[status.value for status in DeliveryStatus],
                            active="messages")

    @app.route("/messages.csv", methods=["GET"])
    @page("read")
    @defer.inlineCallbacks
    def messages_csv(self, request, session):
        """The listed messages' metadata as CSV (masked as the page shows them; no content), the
        newest CSV_LIMIT of the filters; the export is written to the audit log."""
        import csv
        import io

        search, searcher, query = self._search(request, session, CSV_LIMIT)
        rows, summaries = yield self._found(search, searcher)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["id", "received_at", "channel", "message_type", "control_id", "patient_id", "status",
                         "deliveries", "ack_code", "error"])
        for row in (row_view(r, False) for r in rows):
            deliveries = " ".join(f"{status}={count}" for status, count in sorted(summaries.get(row["id"], {}).items()))
            writer.writerow([row["id"], time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(row["received_at"])),
                             row["channel"], row["message_type"], row["control_id"], row["patient_id"], row["status"],
                             deliveries, row["ack_code"], row["error"]])
        # the filters it was made with, as the search's own audit names them: a patient id is said to
        # have been given, not written down
        filters = " ".join(f"{k}={'(given)' if k == 'patient_id' else v}" for k, v in sorted(query.items()))
        yield self._audit(dict(self._action(request, session, "messages.export", "messages"),
                               detail=f"{filters} rows={len(rows)}".strip()[:2000]))
        request.setHeader(b"Content-Type", b"text/csv; charset=utf-8")
        request.setHeader(b"Content-Disposition", b'attachment; filename="messages.csv"')
        return out.getvalue().encode("utf-8")

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

    @app.route("/messages/<int:message_id>/try", methods=["POST"])
    @page("phi", post=True)
    @defer.inlineCallbacks
    def try_stored(self, request, session, message_id):
        """A stored message's dry run through its channel as it is configured now (Try a message,
        with the stored message): it shows the content, so a reason and an audit entry first."""
        from hl7relay.channels.dryrun import dry_run
        from hl7relay.errors import ParseError
        from hl7relay.hl7.message import Message

        audit = self._action(request, session, "phi.view", f"message {message_id} (try)")
        if not audit["reason"]:
            raise HTTPError(400, "trying a stored message shows its content: give a reason (it goes to the audit log)")
        stored = yield self.support.run(lambda store: store.get_message(message_id))
        if stored is None:
            raise HTTPError(404, f"no message {message_id}")
        if not self.controls.has_channel(stored["channel"]):
            raise HTTPError(409, f"channel {stored['channel']!r} is not running: nothing to try it through")
        yield self._audit(audit)
        try:
            runs = [{"run": dry_run(self.controls.channel(stored["channel"]), Message.from_bytes(stored["raw"])), "error": ""}]
        except ParseError as exc:
            runs = [{"run": None, "error": f"cannot parse: {exc}"}]
        text = stored["raw"].decode("utf-8", "replace").replace("\r", "\n")
        return self._render("try.html", request, session=session, active="try", channels=self.controls.channel_names(),
                            chosen=stored["channel"], text=text, runs=runs, error=None)

    @app.route("/messages/<int:message_id>/deliveries", methods=["GET"])
    @page("read")
    @defer.inlineCallbacks
    def deliveries(self, request, session, message_id):
        """The message's deliveries table alone (masked), for the page to refresh until they settle."""
        stored = yield self.support.run(lambda store: store.get_message(message_id))
        if stored is None:
            raise HTTPError(404, f"no message {message_id}")
        return self._render("_deliveries.html", request, session=session, message=message_view(stored, False),
                            settling=self._settling(stored))

    def _settling(self, stored: dict) -> bool:
        """Whether the page should refresh the deliveries: some still QUEUED, the message recent."""
        return (any(d["status"] == DeliveryStatus.QUEUED for d in stored["deliveries"])
                and self.clock() - stored["received_at"] < _SETTLING_SECONDS)

    @app.route("/messages/<int:message_id>/replay", methods=["POST"])
    @page("replay", post=True)
    @defer.inlineCallbacks
    def replay(self, request, session, message_id):
        """A dry run first (what each chosen destination would get, and how it differs from what
        was sent), then, confirmed with a reason, the replay (audited in its own transaction)."""
        from hl7relay.ops.replay import commit_replay, plan_replay

        chosen = [v.decode("utf-8", "replace") for v in (request.args or {}).get(b"destination", [])] or None
        force = self._field(request, "force") == "1"
        as_processed = self._field(request, "as_processed") == "1"
        confirm, reason, channels, render = self._replay_form(request)
        audit = self._action(request, session, "replay", f"message {message_id}")
        paths = self.controls.channel_paths()

        def work(store):
            from hl7relay.ops.replay import SnapshotChannels

            plan = plan_replay(store, channels, message_id, chosen, force, render,
                               SnapshotChannels(store, paths) if as_processed else None)
            if confirm and not plan.skipped:
                return plan, commit_replay(store, channels, plan, reason, audit["actor"], audit=audit)
            return plan, None

        plan, replay_id = yield self.support.run(work)
        if plan.skipped.startswith("no message"):
            raise HTTPError(404, plan.skipped)
        if replay_id is not None:
            yield self._recount_dead_letters()
            request.redirect(f"/messages/{replay_id}".encode())
            request.setResponseCode(303)
            return b""
        channel = channels.get(plan.channel)
        return self._render("replay_message.html", request, 409 if confirm else 200, session=session, plan=plan,
                            destinations=[d.name for d in channel.destinations] if channel else [],
                            delivered=set(plan.delivered), dead=set(plan.dead), force=force, as_processed=as_processed,
                            active="messages")

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
            if stored is None:
                return None, [], None, None, {}, []
            view = message_view(stored, reason is not None)
            # the viewer's fields and the changes between stages, off the reactor (the standard's
            # field names are compiled once per version, on first use)
            return (stored, store.replays_of(message_id), view, store.file_of_message(message_id),
                    *_fields_and_changes(stored, view, reason is not None))

        stored, replays, view, source_file, fields, changes = yield self.support.run(load)
        if stored is None:
            raise HTTPError(404, f"no message {message_id}")
        return self._render("message.html", request, session=session, message=view, revealed=reason, replays=replays,
                            fields=fields, changes=changes, settling=self._settling(stored), active="messages",
                            source_file=source_file)

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
        remain = self._field(request, "remain")
        # the groups a bulk replay left dead letters in come back ticked, so "Replay the selected
        # groups…" dry-runs their next BULK_REPLAY_LIMIT (named by a digest: an error text may name a
        # patient, and a URL is kept in histories and logs)
        again = {v.decode("ascii", "replace") for v in (request.args or {}).get(b"again", [])[:50]}
        for group in groups:
            group["ticked"] = _token_digest(group["token"]) in again
        return self._render("dead_letters.html", request, session=session, groups=groups, channel=channel,
                            channels=self.controls.channel_names(), active="dead-letters", limit=BULK_REPLAY_LIMIT,
                            done=done if re.fullmatch(r"replayed \d+, skipped \d+", done or "") else None,
                            remain=int(remain) if remain.isdigit() and len(remain) < 10 else 0)

    @app.route("/messages/replay", methods=["POST"])
    @page("replay", post=True)
    @defer.inlineCallbacks
    def replay_selected(self, request, session):
        """Replay the messages ticked in the Messages list: the same dry run as a dead-letter group
        (each message to its default destinations: where it is a dead letter, or all when none),
        then, confirmed with a reason, the replays and one audit entry."""
        from hl7relay.ops.replay import plan_replay

        ids = []
        for value in (request.args or {}).get(b"id", [])[:SELECTED_LIMIT + 1]:
            if not value.isdigit() or int(value) > MAX_ROW_ID:
                raise HTTPError(400, "a selected message is not a message number")
            ids.append(int(value))
        if not ids:
            raise HTTPError(400, "tick at least one message to replay")
        if len(ids) > SELECTED_LIMIT:
            raise HTTPError(400, f"at most {SELECTED_LIMIT} messages at a time (the Dead letters page replays groups)")
        ids = sorted(set(ids))
        confirm, reason, channels, render = self._replay_form(request)
        actor, role, source = f"user:{session.user}", session.role, self._source(request)

        def work(store):
            plans = [plan_replay(store, channels, i, None, False, render) for i in ids]
            if not confirm:
                return plans, 0, 0
            audit = {"actor": actor, "role": role, "source": source, "target": f"selected messages ({len(plans)})"}
            return (plans, *_replay_all(store, channels, plans, reason, audit))

        plans, replayed, skipped = yield self.support.run(work)
        if confirm:
            yield self._recount_dead_letters()
            request.redirect(b"/messages?" + urlencode({"done": f"replayed {replayed}, skipped {skipped}"}).encode())
            request.setResponseCode(303)
            return b""
        group = {"channel": "selected", "destination": "their failed destinations (or all)", "total": len(plans),
                 "plans": plans, "error": "", "token": ""}
        return self._render("replay_preview.html", request, session=session, groups=[group], limit=SELECTED_LIMIT,
                            title="Replay selected messages", action="/messages/replay", ids=ids, cancel="/messages",
                            active="messages")

    @app.route("/dead-letters/replay", methods=["POST"])
    @page("replay", post=True)
    @defer.inlineCallbacks
    def replay_dead_letters(self, request, session):
        from hl7relay.ops.replay import plan_replay

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

        large_confirmed = self._field(request, "count")  # the count ticked under a large dry run

        def work(store):
            selected = []
            for channel, destination, error in groups:
                ids = store.dead_letter_ids(channel, destination, error, limit=BULK_REPLAY_LIMIT)
                plans = [plan_replay(store, channels, i, [destination], False, render) for i in ids]
                # a group larger than one replay says so: the oldest BULK_REPLAY_LIMIT of how many
                total = store.dead_letter_count(channel, destination, error) if len(ids) == BULK_REPLAY_LIMIT else len(ids)
                selected.append({"channel": channel, "destination": destination, "total": total,
                                 "error": _masked_error(store, error, ids[0] if ids else None),
                                 "token": _group_token({"channel": channel, "destination": destination, "error": error}),
                                 "plans": plans})
            would = sum(1 for g in selected for p in g["plans"] if not p.skipped)
            if not confirm or (would >= LARGE_REPLAY and large_confirmed != str(would)):
                return selected, None, 0  # a dry run; or a large one whose count was not ticked (or changed since)
            targets = ", ".join(f"{g['channel']}/{g['destination']} ({len(g['plans'])})" for g in selected)
            audit = {"actor": actor, "role": role, "source": source, "target": f"dead letters {targets}"[:500]}
            replayed, skipped = _replay_all(store, channels, [p for g in selected for p in g["plans"]], reason, audit)
            for g in selected:  # what is left of each group: its next BULK_REPLAY_LIMIT
                g["remain"] = store.dead_letter_count(*_group_of(g["token"]))
            return selected, replayed, skipped

        selected, replayed, skipped = yield self.support.run(work)
        if replayed is not None:
            yield self._recount_dead_letters()
            remain = sum(g["remain"] for g in selected)
            query = [("done", f"replayed {replayed}, skipped {skipped}")]
            if remain:
                query += [("remain", str(remain))] + [("again", _token_digest(g["token"])) for g in selected if g["remain"]]
            request.redirect(b"/dead-letters?" + urlencode(query).encode())
            request.setResponseCode(303)
            return b""
        return self._render("replay_preview.html", request, 409 if confirm else 200, session=session, groups=selected,
                            limit=BULK_REPLAY_LIMIT, large=LARGE_REPLAY, recount=confirm, active="dead-letters")


def _replay_all(store, channels, plans: list, reason: str, audit: dict) -> tuple[int, int]:
    """Commit the replays a bulk dry run planned (the skipped ones stay skipped), then one
    ``replay.bulk`` audit entry naming them; (replayed, skipped)."""
    from hl7relay.ops.replay import commit_replay

    replayed = skipped = 0
    for plan in plans:
        if plan.skipped:
            skipped += 1
        else:
            commit_replay(store, channels, plan, reason, audit["actor"])
            replayed += 1
    ids = " ".join(str(p.original_id) for p in plans if not p.skipped)
    store.audit(dict(audit, action="replay.bulk", reason=reason, detail=f"replayed {replayed}, skipped {skipped}: {ids}"[:2000]))
    return replayed, skipped


def _fields_and_changes(stored: dict, view: dict, revealed: bool) -> tuple[dict, list]:
    """The HL7 viewer's tables (the received message and each stage that is a message, as the
    page shows them: masked unless revealed) and what changed from one stage to the next:
    received to transformed, and to each destination's own output."""
    from hl7relay.errors import ParseError
    from hl7relay.hl7.message import Message
    from hl7relay.ops.phi import mask_message
    from hl7relay.ops.replay import diff_messages
    from hl7relay.ops.support import segment_table

    try:
        version = Message.from_bytes(stored["raw"]).msh(12, 1)
    except ParseError:
        version = ""
    fields = {"raw": segment_table(view["raw"], version)}
    for name, content in view["stages"].items():
        if content.startswith("MSH"):
            fields[name] = segment_table(content, version)
    render = (lambda data: data.decode("utf-8", "replace").replace("\r", "\n").rstrip().split("\n")) if revealed else (
        lambda data: mask_message(data).split("\n"))
    stages = stored["stages"]
    changes = []
    before, label = stored["raw"], "received"
    if "transformed" in stages and stages["transformed"] != stored["raw"]:
        changes.append(("Received → Transformed", diff_messages(stored["raw"], stages["transformed"], render,
                                                                ("received", "transformed"))))
        before, label = stages["transformed"], "transformed"
    for name, content in stages.items():
        if name.startswith("destination:") and content != before:
            destination = name[len("destination:"):]
            changes.append((f"{label.title()} → {destination}",
                            diff_messages(before, content, render, (label, f"sent to {destination}"))))
    return fields, changes
