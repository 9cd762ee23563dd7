"""The operations API: JSON over HTTP on the admin listener, under ``/api/v1/``.

Every request carries ``Authorization: Bearer TOKEN``: a token made with ``hl7relay token create``
(its role decides what it may do), or the local token the engine writes (0600) into its data
folder at each start, which the CLI on the same host uses (role admin; the CLI names the OS user
in ``X-Hl7relay-Actor`` for the audit log, which only the local token may do). Reads come from
memory (counters, states, queues); every action that changes the engine is written to the audit
log with who, from where, the target, the reason (``{"reason": "..."}`` in the body) and the result.

Routes (``ROUTES`` is the single table the dispatcher, the permission checks and the OpenAPI
document at ``/api/v1/openapi.json`` are made from):
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from sqlalchemy.exc import SQLAlchemyError

from hl7relay.ops.auth import can, new_token, token_hash
from hl7relay.outcomes import STORED_STATUSES, MessageStatus
from hl7relay.ops.support import masked_view
from hl7relay.errors import ReadOnlyEnvironment
from hl7relay.store.database import MAX_ROW_ID, StoreError, TokenUseUpdate

__all__ = ["ROUTES", "ApiResource", "write_local_token", "read_local_token", "write_endpoint", "LOCAL_TOKEN_FILE", "ENDPOINT_FILE",
           "openapi_document"]

log = Logger(namespace="hl7relay.api")
LOCAL_TOKEN_FILE = "api-token"
ENDPOINT_FILE = "api-endpoint"  # where the running engine's admin listener is bound (port 0 included)
_MAX_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: str  # with {name} parts
    permission: str
    handler: str  # ApiResource method
    summary: str
    action: str | None = None  # audit action, for routes that change the engine

    @property
    def regex(self):
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.pattern) + "$")


ROUTES = (
    Route("GET", "/api/v1/status", "read", "get_status", "the engine, its channels, destinations and queues"),
    Route("GET", "/api/v1/channels", "read", "get_channels", "every channel: state, address, connections, queues"),
    Route("GET", "/api/v1/channels/{channel}", "read", "get_channel", "one channel"),
    Route("GET", "/api/v1/channels/{channel}/connections", "read", "get_connections",
          "the channel's listener: bound address, open connections, peers seen and their last message"),
    Route("POST", "/api/v1/channels/{channel}/enable", "control", "post_enable", "open a disabled channel",
          "channel.enable"),
    Route("POST", "/api/v1/channels/{channel}/disable", "control", "post_disable",
          "stop accepting on a channel (its queued deliveries wait)", "channel.disable"),
    Route("GET", "/api/v1/channels/{channel}/destinations/{destination}", "read", "get_destination",
          "a destination's queue: head, depth, oldest age, last error"),
    Route("POST", "/api/v1/channels/{channel}/destinations/{destination}/pause", "control", "post_pause",
          "send nothing more (the queue keeps filling)", "destination.pause"),
    Route("POST", "/api/v1/channels/{channel}/destinations/{destination}/resume", "control", "post_resume",
          "send again", "destination.resume"),
    Route("POST", "/api/v1/channels/{channel}/destinations/{destination}/retry", "control", "post_retry",
          "skip the backoff of what waits to be retried", "destination.retry"),
    Route("GET", "/api/v1/sync", "read", "get_sync", "the sync status: per destination its state, queue, last "
          "success, last error and its class, an API's token expiry and rate limiter"),
    Route("GET", "/api/v1/alerts", "read", "get_alerts", "the engine's alerts: firing, pending, resolved, silences"),
    Route("POST", "/api/v1/alerts/silence", "control", "post_silence",
          "silence an alert rule: {rule, channel, destination, minutes, reason}", action="alert.silence"),
    Route("POST", "/api/v1/alerts/unsilence", "control", "post_unsilence", "end a silence: {rule, channel, destination}",
          action="alert.unsilence"),
    Route("GET", "/api/v1/stats", "read", "get_stats",
          "the last ?minutes= (1-60) per channel and destination: rates, latency percentiles, queues, the store, "
          "the slowest messages (?channel=)"),
    Route("GET", "/api/v1/logs", "read", "get_logs",
          "the engine's last log lines, oldest first (?after=SEQ ?limit= ?level= ?channel= ?message_id= ?since= ?text=)"),
    Route("GET", "/api/v1/traces", "read", "get_traces", "the open message traces"),
    Route("POST", "/api/v1/traces", "read", "post_trace",
          "start a message trace: {direction: in|out|both, channel, destination, message_type, minutes: 1-60}",
          action="trace.start"),
    Route("GET", "/api/v1/traces/{trace}", "read", "get_trace",
          "a trace and its rows after ?after=SEQ (no content: the messages route gives it, masked)"),
    Route("POST", "/api/v1/traces/{trace}/stop", "read", "post_trace_stop", "end a trace now"),
    Route("GET", "/api/v1/messages", "read", "get_messages",
          "search stored messages, newest first (?channel= ?status= ?message_type= ?control_id= ?patient_id= "
          "?facility= ?delivery_status= ?since= ?until= (epoch) ?text= ?before= ?limit=); masked"),
    Route("GET", "/api/v1/messages/{message_id}", "read", "get_message",
          "one message: every stage, validation findings, each destination's ACK; masked unless ?show_phi=1&reason=..."),
    Route("POST", "/api/v1/messages/{message_id}/replay", "replay", "post_replay",
          "replay through the channel's current configuration, or as_processed: the one that processed it ({reason, "
          "destinations?, force?, dry_run?, as_processed?})", "replay"),
    Route("POST", "/api/v1/prune", "prune", "post_prune",
          "delete old messages ({older_than_days, errors_older_than_days?, channel?, dry_run?}); queued ones never", "prune"),
    Route("POST", "/api/v1/reload", "reload", "post_reload",
          "lint the channel files, then apply them without a restart (422 with the problems: nothing changed)", "reload"),
    Route("GET", "/api/v1/nodes", "read", "get_nodes",
          "the engines on this store (PostgreSQL): heartbeat, version, the snapshot each runs, the leases each holds "
          "(a cluster's queue partitions), and any drift"),
    Route("GET", "/api/v1/config", "read", "get_config",
          "the snapshot the engine runs, whether the channel files differ from it, and the last ?limit= snapshots"),
    Route("POST", "/api/v1/config/rollback", "reload", "post_rollback",
          "run a stored snapshot's configuration again ({snapshot, reason}): lint, then apply; recorded as a new "
          "snapshot (422 with the problems, 404 no such snapshot, 409 another environment's: nothing changed)",
          "config.rollback"),
    Route("GET", "/api/v1/audit", "audit", "get_audit", "the audit log, newest first (?limit=, ?action=, ?before=)"),
    Route("GET", "/api/v1/openapi.json", "read", "get_openapi", "this API's OpenAPI document"),
)


# what a rollback does not undo, said with it (the CLI and the console say it too)
ROLLBACK_NOTE = ("what was already sent stays sent: messages processed since go to their destinations as they were; "
                 "hl7relay replay sends chosen ones again, with the configuration running now or --as-processed")


class Bulk(dict):
    """A response of many rows: written as compact JSON."""


class RawJSON(str):
    """A response that is JSON text already."""


class ApiError(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status
        self.text = text


def write_local_token(data_dir) -> str:
    """A fresh local token, written 0600 into the data folder; returns it."""
    from hl7relay.privatefile import write_private

    token = new_token()
    write_private(Path(data_dir) / LOCAL_TOKEN_FILE, token + "\n")
    return token


def read_local_token(data_dir) -> str:
    """The local token a supervisor wrote for its workers (hl7relay run --workers N)."""
    return (Path(data_dir) / LOCAL_TOKEN_FILE).read_text().strip()


def write_endpoint(data_dir, host: str, port: int, scheme: str = "http") -> None:
    """Where the admin listener is, for the CLI on this host (it may have been given port 0)."""
    from hl7relay.privatefile import write_private

    write_private(Path(data_dir) / ENDPOINT_FILE, f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}\n")


def openapi_document() -> dict:
    paths: dict = {}
    for route in ROUTES:
        parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                      for name in re.findall(r"\{(\w+)\}", route.pattern)]
        operation = {
            "summary": route.summary, "operationId": route.handler,
            "x-permission": route.permission,
            "parameters": parameters,
            "security": [{"bearer": []}],
            "responses": {"200": {"description": "OK", "content": {"application/json": {}}},
                          "401": {"description": "no or unknown token"},
                          "403": {"description": "the token's role may not do this"},
                          "404": {"description": "no such channel or destination"},
                          "409": {"description": "rollback: a snapshot of another environment"},
                          "422": {"description": "reload, rollback: the channel files have problems; nothing changed"}},
        }
        if route.method == "POST":
            operation["requestBody"] = {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "properties": {"reason": {"type": "string"}}}}}}
        paths.setdefault(route.pattern, {})[route.method.lower()] = operation
    return {"openapi": "3.0.3", "info": {"title": "hl7relay operations API", "version": "1"},
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}, "paths": paths}


class ApiResource(resource.Resource):
    """``/api`` on the admin site."""

    isLeaf = True

    def __init__(self, controls, local_token: str | None = None):
        super().__init__()
        self.controls = controls
        self.local_token_hash = token_hash(local_token) if local_token else None
        from hl7relay.ops.support import SupportStore

        self._off_reactor = SupportStore(controls).run  # searches and replays: never on the reactor

    # -- plumbing ---------------------------------------------------------------------------------
    def render(self, request):
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        d = defer.maybeDeferred(self._dispatch, request)

        def done(body):
            if isinstance(body, RawJSON):  # already JSON
                request.write(body.encode() + b"\n")
            elif isinstance(body, Bulk):  # rows by the thousand (a trace, the logs): compact, 3x faster on the reactor
                request.write(json.dumps(body, separators=(",", ":"), default=str).encode() + b"\n")
            else:
                request.write(json.dumps(body, indent=1, default=str).encode() + b"\n")
            request.finish()

        def failed(failure):
            if failure.check(ApiError):
                request.setResponseCode(failure.value.status)
                body = {"error": failure.value.text}
            elif failure.check(ReadOnlyEnvironment):
                request.setResponseCode(409)
                body = {"error": failure.getErrorMessage()}
            elif failure.check(KeyError):
                request.setResponseCode(404)
                body = {"error": str(failure.value.args[0]) if failure.value.args else "not found"}
            elif failure.check(StoreError, SQLAlchemyError):
                log.error("API: the store did not answer: {error}", error=failure.getErrorMessage())
                request.setResponseCode(503)
                body = {"error": "the message store is not answering; try again in a moment"}
            else:
                log.failure("API request failed", failure)
                request.setResponseCode(500)
                body = {"error": "internal error (logged)"}
            request.write(json.dumps(body).encode() + b"\n")
            request.finish()

        d.addCallbacks(done, failed)
        return server.NOT_DONE_YET

    @defer.inlineCallbacks
    def _dispatch(self, request):
        path = request.path.decode("utf-8", "replace").rstrip("/")
        method = request.method.decode("ascii", "replace")
        matches = [(route, route.regex.match(path)) for route in ROUTES]
        matches = [(route, m) for route, m in matches if m]
        if not matches:
            raise ApiError(404, f"no route {path}")
        route = next((r for r, m in matches if r.method == method), None)
        if route is None:
            request.setHeader(b"Allow", ", ".join(sorted({r.method for r, _ in matches})).encode())
            raise ApiError(405, f"{method} is not allowed on {path}")
        params = next(m for r, m in matches if r is route).groupdict()
        caller = yield self._authenticate(request)
        if not can(caller["role"], route.permission):
            raise ApiError(403, f"{caller['actor']} ({caller['role']}) may not {route.permission}")
        body = self._body(request) if method == "POST" else {}
        if route.action:  # the audit entry of an action, from the route table: handlers add only details
            reason = body.get("reason", "")
            caller = dict(caller, audit={"actor": caller["actor"], "role": caller["role"], "source": caller["source"], "action": route.action,
                                         "target": "/".join(params.values()) or "channels",
                                         "reason": reason if isinstance(reason, str) else str(reason)})
        result = yield getattr(self, route.handler)(request, caller, body, **params)
        return result

    @defer.inlineCallbacks
    def _authenticate(self, request):
        header = request.getHeader(b"authorization") or b""
        scheme, _, token = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "send Authorization: Bearer TOKEN (hl7relay token create)")
        hashed = token_hash(token.strip())
        peer = request.getClientAddress()
        source = getattr(peer, "host", "?")
        if self.local_token_hash is not None and hashed == self.local_token_hash:
            actor = (request.getHeader(b"x-hl7relay-actor") or b"local").decode("utf-8", "replace")[:200]
            return {"actor": actor, "role": "admin", "source": f"local:{source}"}
        row = yield self.controls.writer.read(self.controls.writer.store.find_token, hashed)
        if row is None:
            raise ApiError(401, "unknown or revoked token")
        now = self.controls.clock()
        if (row["last_used_at"] or 0) < now - 60:  # for `hl7relay token list`; at most a write a minute per token
            self.controls.writer.update(TokenUseUpdate(row["name"], now), lazy=True).addErrback(lambda _: None)
        return {"actor": f"token:{row['name']}", "role": row["role"], "source": source}

    @staticmethod
    def _body(request) -> dict:
        data = request.content.read(_MAX_BODY + 1) if request.content is not None else b""
        if len(data) > _MAX_BODY:
            raise ApiError(413, "request body too large")
        if not data.strip():
            return {}
        try:
            body = json.loads(data)
        except ValueError:
            raise ApiError(400, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body is a JSON object")
        return body

    # -- handlers ---------------------------------------------------------------------------------
    def get_status(self, request, caller, body):
        return masked_view(self.controls.status())

    def get_channels(self, request, caller, body):
        return [masked_view(self.controls.channel_view(name)) for name in self.controls.channel_names()]

    def get_channel(self, request, caller, body, channel):
        return masked_view(self.controls.channel_view(channel))

    def get_connections(self, request, caller, body, channel):
        return self.controls.connections_view(channel)

    def post_enable(self, request, caller, body, channel):
        return self.controls.set_channel_enabled(channel, True, caller["actor"], caller["audit"]).addCallback(masked_view)

    def post_disable(self, request, caller, body, channel):
        return self.controls.set_channel_enabled(channel, False, caller["actor"], caller["audit"]).addCallback(masked_view)

    def get_sync(self, request, caller, body):
        return [masked_view(row) for row in self.controls.sync_view()]

    def get_destination(self, request, caller, body, channel, destination):
        return masked_view(self.controls.queue_view(channel, destination))

    def post_pause(self, request, caller, body, channel, destination):
        return self.controls.set_destination_paused(channel, destination, True, caller["actor"], caller["audit"]).addCallback(masked_view)

    def post_resume(self, request, caller, body, channel, destination):
        return self.controls.set_destination_paused(channel, destination, False, caller["actor"], caller["audit"]).addCallback(masked_view)

    def post_retry(self, request, caller, body, channel, destination):
        return self.controls.retry_now(channel, destination, caller["actor"], caller["audit"]).addCallback(masked_view)

    @defer.inlineCallbacks
    def post_reload(self, request, caller, body):
        result = yield self.controls.reload_from_files(caller["actor"], caller["audit"])
        if "errors" in result:
            request.setResponseCode(422)
        return result

    @defer.inlineCallbacks
    def get_nodes(self, request, caller, body):
        from hl7relay.nodes import ALIVE_SECONDS, drift

        now, rows = yield self._off_reactor(lambda store: store.nodes())
        leases = yield self._off_reactor(lambda store: store.leases())
        drifting = drift(rows)
        for row in rows:
            row["alive"] = row["state"] == "running" and row["heartbeat_age"] <= ALIVE_SECONDS
            row["leases"] = [lease["name"] for lease in leases if lease["owner"] == row["node_id"] and lease["left"] > 0]
        return {"now": now, "nodes": rows, "drift": [r["node_id"] for r in drifting],
                "leases": leases}

    @defer.inlineCallbacks
    def get_config(self, request, caller, body):
        limit = self._number(self._args(request), "limit", 20, low=1, high=500)
        rows = yield self._off_reactor(lambda store: store.snapshots(limit))
        return {"running": self.controls.configuration_view(), "snapshots": rows}

    @defer.inlineCallbacks
    def post_rollback(self, request, caller, body):
        number, reason = body.get("snapshot"), body.get("reason")
        if isinstance(number, bool) or not isinstance(number, int) or not 0 < number <= MAX_ROW_ID:
            raise ApiError(400, "snapshot is a snapshot's id (hl7relay config history)")
        if not isinstance(reason, str) or not reason.strip():
            raise ApiError(400, "a rollback needs a reason ({\"reason\": \"...\"}): it is recorded with the snapshot")
        audit = dict(caller["audit"], target=f"snapshot {number}")
        result = yield self.controls.rollback(number, caller["actor"], reason.strip(), audit)
        if "missing" in result:
            raise ApiError(404, result["missing"])
        if "refused" in result:
            raise ApiError(409, result["refused"])
        if "errors" in result:
            request.setResponseCode(422)
        else:
            result["note"] = ROLLBACK_NOTE
        return result

    @staticmethod
    def _args(request) -> dict:
        return {k.decode(): v[0].decode("utf-8", "replace") for k, v in (request.args or {}).items() if v}

    @staticmethod
    def _number(args: dict, name: str, default=None, kind=int, low=None, high=None):
        if name not in args:
            return default
        try:
            value = kind(args[name])
        except ValueError:
            raise ApiError(400, f"{name} must be a number") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise ApiError(400, f"{name} must be between {low} and {high}")
        return value

    @defer.inlineCallbacks
    def _phi(self, request, caller, args, target: str):
        """?show_phi=1 needs the phi permission and a reason, and writes an audit entry first."""
        if args.get("show_phi") not in ("1", "true", "yes"):
            return False
        if not can(caller["role"], "phi"):
            raise ApiError(403, f"{caller['actor']} ({caller['role']}) may not see patient data unmasked")
        reason = args.get("reason", "").strip()
        if not reason:
            raise ApiError(400, "show_phi needs a reason (?reason=...): it is written to the audit log")
        yield self._off_reactor(lambda store: store.audit({"actor": caller["actor"], "role": caller["role"], "source": caller["source"],
                                                           "action": "phi.view", "target": target, "reason": reason}))
        return True

    def _alerts(self):
        if self.controls.alerts is None:
            raise ApiError(503, "alerts are not running in this engine")
        return self.controls.alerts

    def get_alerts(self, request, caller, body):
        return self._alerts().view()

    @defer.inlineCallbacks
    def post_silence(self, request, caller, body):
        alerts = self._alerts()
        try:
            minutes = float(body.get("minutes", 60))
            entry = alerts.silence(str(body.get("rule") or ""), body.get("channel") or None, body.get("destination") or None,
                                   minutes * 60, caller["actor"], str(body.get("reason") or ""))
        except (TypeError, ValueError) as exc:
            raise ApiError(400, str(exc)) from None
        where = "/".join(x for x in (entry["channel"], entry["destination"]) if x) or "everywhere"
        yield self._off_reactor(lambda store: store.audit(dict(caller["audit"], target=f"{entry['rule']} {where}",
                                                               detail=f"for {minutes:g} minutes")))
        return entry

    @defer.inlineCallbacks
    def post_unsilence(self, request, caller, body):
        rule, channel, destination = str(body.get("rule") or ""), body.get("channel") or None, body.get("destination") or None
        if not self._alerts().unsilence(rule, channel, destination):
            raise ApiError(404, f"no silence of {rule!r} for {channel or 'every channel'}"
                                + (f"/{destination}" if destination else ""))
        where = "/".join(x for x in (channel, destination) if x) or "everywhere"
        yield self._off_reactor(lambda store: store.audit(dict(caller["audit"], target=f"{rule} {where}")))
        return {"rule": rule, "channel": channel, "destination": destination, "silenced": False}

    def get_stats(self, request, caller, body):
        if self.controls.performance is None:
            raise ApiError(503, "the performance analyzer is not running in this engine")
        args = self._args(request)
        channel = args.get("channel") or None
        if channel is not None and not self.controls.has_channel(channel):
            raise ApiError(404, f"no channel {channel!r}")
        return self.controls.performance.view(self._number(args, "minutes", 60, int, 1, 60), channel)

    def get_logs(self, request, caller, body):
        from hl7relay.logs import LOG_RING
        from hl7relay.ops.phi import mask_log_text

        args = self._args(request)
        level = args.get("level") or None
        if level is not None and level not in ("trace", "debug", "info", "warn", "error"):
            raise ApiError(400, "level is trace, debug, info, warn or error")
        after = self._number(args, "after", 0, int, 0)
        channel = args.get("channel") or None
        if channel is not None and not self.controls.has_channel(channel) and not any(
                line.get("channel") == channel for line in LOG_RING.lines):
            known = ", ".join(self.controls.channel_names()) or "none"
            raise ApiError(404, f"no channel '{channel}': this engine runs {known}")
        lines = LOG_RING.read(after, self._number(args, "limit", 100, int, 1, 5000),
                              level, args.get("channel") or None, self._number(args, "message_id", None, int, 1),
                              self._number(args, "since", None, float), args.get("text") or None)
        out = []
        for line in lines:
            line = dict(line, text=mask_log_text(line))  # values a line about a message quotes
            if line["phi"]:  # a log_phi channel's content line: the messages route shows content, with its rules
                line["text"] = (f"(message content: hl7relay messages show {line.get('message_id', '')} "
                                "[--show-phi --reason R])")
            out.append(line)
        return Bulk(lines=out, next_after=out[-1]["seq"] if out else after)

    # -- the message tracer ---------------------------------------------------------------------
    def get_traces(self, request, caller, body):
        now = self.controls.reactor.seconds()
        return [session.view(now) for session in self.controls.tracer.sessions.values()]

    @defer.inlineCallbacks
    def post_trace(self, request, caller, body):
        channel, destination = body.get("channel") or None, body.get("destination") or None
        if channel is not None and not self.controls.has_channel(channel):
            raise ApiError(400, f"no channel {channel!r}")
        if destination is not None and not any(destination == name for owner, name, _ in self.controls.destinations()
                                               if channel is None or owner == channel):
            raise ApiError(400, f"no destination {destination!r}" + (f" in channel {channel!r}" if channel else ""))
        from hl7relay.ops.trace import CONTENT_KINDS

        kind = body.get("kind") or None
        scope = self.controls.carrying(CONTENT_KINDS.get(kind, frozenset())) if kind is not None else None
        try:
            minutes = float(body.get("minutes", 5))
            session = self.controls.tracer.start(caller["actor"], str(body.get("direction") or "both"), channel, destination,
                                               body.get("message_type") or None, minutes * 60, kind, scope)
        except (TypeError, ValueError) as exc:
            raise ApiError(400, str(exc)) from None
        audit = dict(caller["audit"], target=f"trace {session.id}", detail=", ".join(
            f"{k}={v}" for k, v in (("direction", session.direction), ("channel", channel), ("destination", destination),
                                    ("message_type", session.message_type), ("kind", kind),
                                    ("minutes", f"{minutes:g}")) if v))
        yield self._off_reactor(lambda store: store.audit(audit))
        return session.view(self.controls.reactor.seconds())

    def get_trace(self, request, caller, body, trace):
        from hl7relay.ops.trace import COLUMNS

        args = self._args(request)
        after = self._number(args, "after", 0, int, 0)
        limit = self._number(args, "limit", 1000, int, 1, 5000)
        session = self.controls.tracer.get(trace)
        rows, _ = session.read_json(after, limit)  # JSON text from the trace's ring (errors masked when taken)
        head = json.dumps({"trace": session.view(self.controls.reactor.seconds()), "columns": COLUMNS}, default=str)
        return RawJSON(head[:-1] + ',"rows":' + rows + "}")

    def post_trace_stop(self, request, caller, body, trace):
        return self.controls.tracer.stop(trace).view(self.controls.reactor.seconds())

    @defer.inlineCallbacks
    def get_messages(self, request, caller, body):
        from hl7relay.ops.search import SEARCH_FILTERS, MessageQuery, Searcher, SearchRefused, search_messages
        from hl7relay.ops.support import row_view

        args = self._args(request)
        query = MessageQuery({name: args[name] for name in SEARCH_FILTERS if args.get(name)},
                             failed=args.get("failed") in ("1", "true", "yes"),
                             since=self._number(args, "since", None, float), until=self._number(args, "until", None, float),
                             before=self._number(args, "before", None, int, 1, MAX_ROW_ID),
                             limit=self._number(args, "limit", 50, int, 1, 500),
                             text=args.get("text") or None)  # a substring of the raw message (scans at most 100,000)
        limit = query.limit
        target = "messages " + " ".join(f"{k}={v}" for k, v in sorted(query.filters.items())) + (
            f" text={query.text}" if query.text else "")
        searcher = Searcher(caller["actor"], caller["role"], caller["source"], can(caller["role"], "phi"),
                            args.get("reason", "").strip())
        show_phi = yield self._phi(request, caller, args, target.strip())
        try:
            rows = yield self._off_reactor(lambda store: search_messages(store, query, searcher))
        except SearchRefused as refused:
            raise ApiError(403, str(refused)) from None
        out = {"messages": [row_view(row, show_phi) for row in rows],
               "next_before": rows[-1]["id"] if len(rows) == limit else None}
        stopped_at = getattr(rows, "stopped_at", None)
        if stopped_at is not None:
            # a text search that reached its scan limit: older messages were not searched, and the
            # next page goes on from where it stopped
            out["search_stopped"] = {"scanned": rows.scanned, "at_message": stopped_at,
                                     "text": "older messages were not searched: narrow since/until or page on"}
            out["next_before"] = stopped_at
        return out

    @defer.inlineCallbacks
    def get_message(self, request, caller, body, message_id):
        from hl7relay.ops.support import message_view

        number = self._id(message_id)
        args = self._args(request)
        stored = yield self._off_reactor(lambda store: store.get_message(number))
        if stored is None:
            raise ApiError(404, f"no message {number}")
        show_phi = yield self._phi(request, caller, args, f"message {number}")
        return message_view(stored, show_phi)

    @staticmethod
    def _id(text: str) -> int:
        if not text.isdigit() or int(text) > MAX_ROW_ID:  # beyond any row id: no such message
            raise ApiError(404, f"no message {text!r}")
        return int(text)

    @defer.inlineCallbacks
    def post_replay(self, request, caller, body, message_id):
        from hl7relay.channels.channel import Channel
        from hl7relay.ops.phi import mask_message
        from hl7relay.ops.replay import commit_replay, plan_replay

        number = self._id(message_id)
        reason = body.get("reason")
        dry_run = bool(body.get("dry_run"))
        if not dry_run and (not isinstance(reason, str) or not reason.strip()):
            raise ApiError(400, "a replay needs a reason ({\"reason\": \"...\"}), or dry_run")
        destinations = body.get("destinations")
        if destinations is not None and (not isinstance(destinations, list) or not all(isinstance(d, str) for d in destinations)):
            raise ApiError(400, "destinations is a list of names")
        channels: dict[str, Channel] = self.controls.channels()
        render = lambda data: mask_message(data).split("\n")  # noqa: E731 - diffs are masked here, always
        paths = self.controls.channel_paths()

        def replay(store):
            from hl7relay.ops.replay import SnapshotChannels

            as_processed = SnapshotChannels(store, paths) if body.get("as_processed") else None
            plan = plan_replay(store, channels, number, destinations, bool(body.get("force")), render, as_processed)
            result = {"message_id": number, "destinations": sorted(plan.outputs), "skipped": plan.skipped,
                      "changed": plan.changes, "dry_run": dry_run, "snapshot": plan.snapshot_id}
            if not plan.skipped and not dry_run:
                result["replay_id"] = commit_replay(store, channels, plan, reason, caller["actor"], audit=caller["audit"])
            return result

        result = yield self._off_reactor(replay)
        if result["skipped"].startswith("no message"):
            raise ApiError(404, result["skipped"])
        return result

    @defer.inlineCallbacks
    def post_prune(self, request, caller, body):
        import time as _time

        days = body.get("older_than_days")
        if isinstance(days, bool) or not isinstance(days, (int, float)) or days <= 0:
            raise ApiError(400, "older_than_days is a number of days, more than 0")
        errors_days = body.get("errors_older_than_days", 3 * days)
        if isinstance(errors_days, bool) or not isinstance(errors_days, (int, float)) or errors_days <= 0:
            raise ApiError(400, "errors_older_than_days is a number of days, more than 0")
        channel = body.get("channel")
        dry_run = bool(body.get("dry_run"))
        now = _time.time()

        def prune(store):
            normal = store.prune(now - days * 86400, set(STORED_STATUSES) - {MessageStatus.ERROR.value}, channel,
                                 dry_run=dry_run)
            errors = store.prune(now - errors_days * 86400, {MessageStatus.ERROR.value}, channel, dry_run=dry_run)
            if not dry_run:
                store.audit(dict(caller["audit"], target=channel or "all channels",
                                 detail=f"deleted {normal + errors} message(s): older than {days:g}d, errors {errors_days:g}d"))
            return {"deleted" if not dry_run else "would_delete": normal + errors, "dry_run": dry_run}

        result = yield self._off_reactor(prune)
        return result

    def get_audit(self, request, caller, body):
        args = {k.decode(): v[0].decode("utf-8", "replace") for k, v in (request.args or {}).items() if v}
        try:
            limit = min(1000, max(1, int(args.get("limit", "100"))))
            before = int(args["before"]) if "before" in args else None
            if before is not None and not 1 <= before <= MAX_ROW_ID:
                raise ValueError(before)
        except ValueError:
            raise ApiError(400, "limit and before are whole numbers (before: an entry number)") from None
        store = self.controls.writer.store
        return self.controls.writer.read(functools.partial(store.audit_entries, action=args.get("action"),
                                                         actor=args.get("actor"), before_id=before, limit=limit))

    def get_openapi(self, request, caller, body):
        return openapi_document()


__doc__ += "\n".join(f"    {r.method:<5} {r.pattern:<62} {r.permission:<8} {r.summary}" for r in ROUTES)
