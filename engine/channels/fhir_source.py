"""The ``fhir`` source: appointments changed on a FHIR server, told to the PMS as SIU.

It polls ``Appointment?_lastUpdated=ge{cursor}`` and compares each appointment with what it last
saw of it (``fhir_source_state``): new and booked → S12, its time changed → S13, another change
→ S14, cancelled → S15, no-show → S26, entered in error → S17. A version this engine wrote
itself (a fhir destination's cross-reference has it) is remembered but never told back: no echo.
The SIU is built by the same maps read backwards (hl7relay.fhir.reverse), then goes through the
channel like any received message (stored before anything else happens); the cursor moves past an
appointment only once its message is stored, so a restart tells nothing twice outside the moment
between the two commits.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import ClassVar
from urllib.parse import quote, urlsplit

from twisted.internet import defer, task
from twisted.logger import Logger

from hl7relay.channels.sources import TLS_OPTIONS, Source, tls_config
from hl7relay.spec import Option, register

__all__ = ["FHIRSourceConfig", "FHIRSource", "appointment_event"]

log = Logger(namespace="hl7relay.engine")
_OPEN = ("proposed", "pending", "booked", "arrived", "checked-in", "waitlist")
_FAILED = object()
_STATUS_EVENTS = {"cancelled": "cancelled", "noshow": "noshow", "entered-in-error": "entered-in-error"}


@dataclass(slots=True)
class FHIRSourceConfig:
    base_url: str
    credential: object
    tls: object
    poll_interval: float
    since: str
    timeout: float
    sender: tuple
    receiver: tuple
    notify: tuple | None = None  # (host, port, token, TLSConfig or None): rest-hook notifications
    runner: ClassVar[type[Source]]


@register("source", "fhir", "poll a FHIR server for changed appointments; each change goes on as an SIU", [
    Option("url", "str", description="the FHIR server's base URL, e.g. https://fhir.example/r4"),
    Option("credentials", "str", None, "the name of a credential in the settings"),
    *TLS_OPTIONS,
    Option("poll_interval", "duration", 60.0, "seconds between polls"),
    Option("since", "str", "", "where the first poll starts (an instant, e.g. 2026-01-01T00:00:00Z; default: "
                               "when the channel first runs: earlier changes are not told)"),
    Option("timeout", "duration", 30.0, "seconds to wait for the server's answer"),
    Option("sending_application", "str", "HL7RELAY", "MSH-3 of the SIU"),
    Option("sending_facility", "str", "", "MSH-4 of the SIU"),
    Option("receiving_application", "str", "", "MSH-5 of the SIU (the PMS)"),
    Option("receiving_facility", "str", "", "MSH-6 of the SIU"),
    Option("notify_port", "int", None, "also poll at once when the server's Subscription (rest-hook) POSTs here "
                                       "(0: any free port, said at start; poll_interval still runs, for what a "
                                       "notification misses)"),
    Option("notify_host", "str", "127.0.0.1", "address the notifications are received on"),
    Option("notify_token", "str", None, "the bearer token the Subscription's header carries (${secret:NAME})",
           secret=True),
    Option("notify_tls_cert", "str", None, "PEM certificate of the notification listener (needed off this machine)"),
    Option("notify_tls_key", "str", None, "PEM private key of notify_tls_cert"),
])
def _fhir_source(options, context=None):
    from hl7relay.apiclient.credentials import lookup_credential

    base = options["url"].rstrip("/")
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or "{" in base:
        raise ValueError(f"url {options['url']!r} is not a FHIR server's base URL (http(s), no query)")
    credential = lookup_credential(options["credentials"]) if options["credentials"] else None
    if options["poll_interval"] <= 0 or options["timeout"] <= 0:
        raise ValueError("poll_interval and timeout must be more than 0 seconds")
    if options["since"] and not _instant(options["since"]):
        raise ValueError(f"since: {options['since']!r} is not an instant (e.g. 2026-01-01T00:00:00Z)")
    notify = None
    if options["notify_port"] is not None:
        if not options["notify_token"]:
            raise ValueError("notify_port needs notify_token: who may tell this channel to poll")
        listen_tls = None
        if options["notify_tls_cert"]:
            from hl7relay.mllp.tls import TLSConfig

            listen_tls = TLSConfig(options["notify_tls_cert"], options["notify_tls_key"], None)
        elif options["notify_host"] not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("notifications off this machine need notify_tls_cert and notify_tls_key (https)")
        notify = (options["notify_host"], options["notify_port"], options["notify_token"], listen_tls)
    return FHIRSourceConfig(base, credential, tls_config({**options, "tls": parts.scheme == "https"}, False,
                                                           getattr(context, "base_dir", None)),
                            options["poll_interval"], options["since"], options["timeout"],
                            (options["sending_application"], options["sending_facility"]),
                            (options["receiving_application"], options["receiving_facility"]), notify)


def _instant(text: str) -> bool:
    try:
        datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _digest(appointment: dict) -> str:
    body = {k: v for k, v in appointment.items() if k not in ("meta", "id", "text")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def appointment_event(before: dict | None, now: dict) -> str | None:
    """What became of an appointment since ``before`` (the state last seen; None: never seen), as
    a key of hl7relay.fhir.reverse.SIU_EVENTS, or None when the PMS need not hear of it."""
    status = now.get("status", "")
    if before is None:
        return "new" if status in _OPEN else None  # one cancelled before we ever saw it: the PMS never knew it
    if status != before["status"] and status in _STATUS_EVENTS:
        return _STATUS_EVENTS[status]
    if (now.get("start", ""), now.get("end", "")) != (before["start"], before["end"]):
        return "rescheduled"
    if _digest(now) != before["content_hash"] or status != before["status"]:
        return "modified"
    return None


class FHIRSource(Source):
    def __init__(self, config: FHIRSourceConfig, running):
        super().__init__(config, running)
        from hl7relay.apiclient.credentials import Authorizer
        from hl7relay.apiclient.http import HTTPClient

        self.loop: task.LoopingCall | None = None
        self.busy = False
        self.client: HTTPClient | None = None
        self.authorizer: Authorizer | None = None
        self.polls = 0
        self.told = 0
        self.problem = ""  # the last poll's failure, said once
        self.listener = None
        self.notifications = 0
        self.again = False  # a notification came while a poll ran: one more right after

    def open(self) -> str:
        from hl7relay.apiclient.credentials import Authorizer
        from hl7relay.apiclient.http import HTTPClient

        self.client = HTTPClient(self.reactor, self.config.tls, 10.0, 2)
        self.authorizer = Authorizer(self.config.credential, self.reactor) if self.config.credential else None
        self.loop = task.LoopingCall(self.poll)
        self.loop.clock = self.reactor
        self.loop.start(self.config.poll_interval, now=True).addErrback(
            lambda f: log.failure("fhir source of {channel}: its polling stopped", f, channel=self.running.channel.name))
        self.address = self.config.base_url
        said = f"FHIR appointments from {self.config.base_url} every {self.config.poll_interval:g}s"
        if self.config.notify is not None:
            said += f"; notifications on {self._listen()}"
        return said

    def _listen(self) -> str:
        """The rest-hook listener: a POST with the token polls at once (another comes after a busy one)."""
        from twisted.web import resource

        from hl7relay.webserver import bounded_site

        host, port, token, tls = self.config.notify
        source = self

        class Notified(resource.Resource):
            isLeaf = True

            def render_POST(self, request):
                import hmac

                said = (request.getHeader("authorization") or "").removeprefix("Bearer ")
                request.setHeader(b"Content-Type", b"application/json")
                if not hmac.compare_digest(said.encode(), token.encode()):
                    request.setResponseCode(401)
                    return b'{"error": "not this channel\'s token"}'
                request.content.read()
                source.notified()
                request.setResponseCode(202)
                return b'{"polling": true}'

            def render_GET(self, request):
                request.setResponseCode(405)
                return b""

        site = bounded_site(Notified())
        site.log = lambda request: None  # type: ignore[method-assign]  # no access log of a token's requests
        from hl7relay.mllp.tls import server_options
        from hl7relay.sharedports import listen

        listener = listen(self.reactor, port, site, host, server_options(tls) if tls is not None else None)
        self.listener = listener
        bound = listener.getHost()
        return f"{'https' if tls else 'http'}://{bound.host}:{bound.port}/"

    def notified(self) -> None:
        """The server says something changed: poll now (or right after the poll under way)."""
        self.notifications += 1
        if self.busy:
            self.again = True
        else:
            self.poll()

    def close(self, close_connections: bool):
        if self.loop is not None and self.loop.running:
            self.loop.stop()
        if self.listener is not None:
            self.listener.stopListening()
            self.listener = None
        if self.authorizer is not None:
            self.authorizer.close()
        if self.client is not None:
            return self.client.close()
        return None

    def poll(self):
        if self.busy:
            return None
        self.busy = True
        d = defer.ensureDeferred(self._poll())

        def failed(failure):  # said once, and once more when it is over: not a line per poll
            problem = failure.getErrorMessage()
            if problem != self.problem:
                log.warn("fhir source of {channel}: polling fails: {error}", channel=self.running.channel.name,
                         error=problem)
            self.problem = problem

        def done(result):
            if self.problem and result is not _FAILED:
                log.info("fhir source of {channel}: polling works again", channel=self.running.channel.name)
                self.problem = ""
            self.busy = False
            self.polls += 1
            if self.again:
                self.again = False
                self.reactor.callLater(0, self.poll)

        d.addCallbacks(lambda _: None, lambda f: (failed(f), _FAILED)[1])
        return d.addBoth(done)

    async def _get(self, path: str):
        from hl7relay.apiclient.http import HTTPFailure

        headers = {"Accept": "application/fhir+json", "User-Agent": "hl7relay"}
        url = path if path.startswith(("http://", "https://")) else f"{self.config.base_url}/{path}"
        if not url.startswith(self.config.base_url + "/"):
            # a reference to another server: our credentials never go there
            raise RuntimeError(f"{url.split('?')[0]} is not on {self.config.base_url}: not followed")
        if self.authorizer is not None:
            authorization = await self.authorizer.authorize()
            headers.update(authorization.headers)
        assert self.client is not None  # open() made it
        try:
            answer = await self.client.request("GET", url, headers, None, self.config.timeout)
        except HTTPFailure as exc:
            raise RuntimeError(f"GET {url.split('?')[0]}: {exc}") from None
        if answer.status != 200:
            raise RuntimeError(f"GET {url.split('?')[0]}: HTTP {answer.status}")
        return json.loads(answer.body)

    async def _poll(self):
        from hl7relay.ack.outcome import Status
        from hl7relay.fhir.maps import default_maps
        from hl7relay.fhir.reverse import SIU_EVENTS, Reverser, appointment_siu
        from hl7relay.hl7.message import Message
        from hl7relay.mllp.listener import Peer
        from hl7relay.store.records import SourceStateUpdate

        writer = self.running.resources.writer
        channel = self.running.channel.name
        states = await writer.read(writer.store.source_states, channel, "Appointment")
        cursor_row = states.pop("", None)
        cursor = cursor_row["version_id"] if cursor_row else (
            self.config.since or datetime.now(timezone.utc).isoformat(timespec="seconds"))
        if cursor_row is None:  # the starting point is kept: a restart does not move it to its own "now"
            await writer.update(SourceStateUpdate(channel, "Appointment", "", cursor, "", "", "", "", time.time()))
        # ge, not gt: another change in the same instant as the cursor's is not missed (one already
        # seen compares equal to what was last seen, and says nothing)
        found = await self._get(f"Appointment?_lastUpdated={quote('ge' + cursor, safe='')}&_sort=_lastUpdated")
        appointments = sorted((e["resource"] for e in found.get("entry") or ()
                               if (e.get("resource") or {}).get("resourceType") == "Appointment"),
                              key=lambda a: (a.get("meta") or {}).get("lastUpdated", ""))
        if not appointments:
            return
        ours = {(x["fhir_id"], x["version_id"]) for x in
                await writer.read(writer.store.xrefs, None, None, "Appointment")}
        reverser = Reverser(default_maps())
        for appointment in appointments:
            meta = appointment.get("meta") or {}
            fhir_id, version = str(appointment.get("id", "")), str(meta.get("versionId", ""))
            event = None if (fhir_id, version) in ours else appointment_event(states.get(fhir_id), appointment)
            if event is not None:
                cache: dict = {}  # the participants' resources (a patient, practitioners, locations)
                for participant in appointment.get("participant") or ():
                    reference = (participant.get("actor") or {}).get("reference")
                    if reference and reference not in cache:
                        try:
                            cache[reference] = await self._get(reference)
                        except RuntimeError:
                            cache[reference] = None
                now_text = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S+0000")
                control = f"F{fhir_id}-{version}"[:20]
                text = appointment_siu(reverser, appointment, cache.get, SIU_EVENTS[event], control, now_text,
                                       self.config.sender, self.config.receiver)
                outcome = await self.running.handle(Message(text), Peer(f"fhir:{urlsplit(self.config.base_url).netloc}", 0))
                if outcome.status is Status.INTERNAL_ERROR:  # not stored: the cursor stays, the next poll tries again
                    log.error("fhir source of {channel}: Appointment/{id} could not be stored; tried again next poll",
                              channel=channel, id=fhir_id)
                    return
                self.told += 1
            state = SourceStateUpdate(channel, "Appointment", fhir_id, version, appointment.get("status", ""),
                                      appointment.get("start", ""), appointment.get("end", ""), _digest(appointment),
                                      time.time())
            moved = SourceStateUpdate(channel, "Appointment", "", meta.get("lastUpdated", cursor), "", "", "", "",
                                      time.time())
            await writer.update(state, moved)
            states[fhir_id] = {"status": state.status, "start": state.start, "end": state.end,
                               "content_hash": state.content_hash}


FHIRSourceConfig.runner = FHIRSource
