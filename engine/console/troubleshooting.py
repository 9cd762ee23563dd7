"""Troubleshooting: try a message, performance, logs, alerts, connections, the database, the tracer."""

from __future__ import annotations

import time
from urllib.parse import urlencode

from twisted.internet import defer, threads

from hl7relay.console.base import ConsoleBase, HTTPError, app, page


class TroubleshootingPages(ConsoleBase):
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
    @page("control", post=True)  # it connects to a production destination and may send it a message
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
    def database(self, request, session):
        """hl7relay verify, for admins: the last run's results (the checks read the whole store's
        indexes, seconds on a large one: they run when asked, not at every visit)."""
        checked = self._database_checks
        return self._render("database.html", request, session=session, active="database",
                            checks=checked[1] if checked else None, checked_at=checked[0] if checked else None,
                            done=self._field(request, "done"))

    @app.route("/database/check", methods=["POST"])
    @page("audit", post=True)
    @defer.inlineCallbacks
    def database_check(self, request, session):
        """Run the checks (on a store connection of their own, off the reactor) and show them."""
        yield self._run_database_checks()
        request.redirect(b"/database")
        request.setResponseCode(303)
        return b""

    @defer.inlineCallbacks
    def _run_database_checks(self):
        from hl7relay.store.verify import verify

        channels = list(self.controls.channels().values())
        now = time.time()
        checks = yield self.support.run(lambda store: verify(store, channels, now, full=False))
        self._database_checks = (now, checks)

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
        yield self._run_database_checks()  # the page shows the store as the repairs left it
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
        from hl7relay.ops.trace import CONTENT_KINDS

        kind = self._field(request, "kind") or None
        try:
            minutes = float(self._field(request, "minutes") or 5)
            trace = self.controls.tracer.start(f"user:{session.user}", self._field(request, "direction") or "both", channel,
                                             self._field(request, "destination") or None,
                                             self._field(request, "message_type") or None, minutes * 60, kind,
                                             self.controls.carrying(CONTENT_KINDS.get(kind or "", frozenset())))
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
        yield self._audit(dict(self._action(request, session, "trace.start", f"trace {trace.id}"),
                               detail=f"direction={trace.direction}, channel={channel}, kind={kind}, minutes={minutes:g}"))
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
