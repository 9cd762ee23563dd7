"""The ``fhir`` destination: each message as a FHIR R4 Bundle to a FHIR server, on the http
destination's machinery (credentials and token refresh, rate limit, Retry-After, queue options).

The conversion is the destination's own ``fhir`` transformer (added last to its transformers when
they do not end with one), so what is stored as its content is the Bundle it sends. A transaction
or batch Bundle goes to the server's base URL, a message Bundle to ``$process-message``. An
OperationOutcome answer becomes the delivery's error, in its own words; a batch entry that failed
fails the delivery; 409 and 412 are conflicts, as for any API.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from hl7relay.channels.http_destination import HTTPDelivery, HTTPDestinationConfig, _http
from twisted.internet import defer

from hl7relay.fhir.content import FHIR_JSON, FHIRContent, failed_entries, operation_outcome_text
from hl7relay.outcomes import DeliveryOutcome, DeliveryResult
from hl7relay.spec import ComponentSpec, Option, lookup, register
from hl7relay.store.records import MatchHoldUpdate, XrefUpdate

__all__ = ["FHIRDestinationConfig", "FHIRDelivery"]

_NOT_FOR_FHIR = ("url", "method", "body", "content_type", "success_when", "idempotency_header")
_BUNDLES = ("transaction", "batch", "message")


_MATCH_FIELDS = ("family", "given", "birthDate", "gender")
_MATCH = ComponentSpec("setting", "match", "how the Bundle's patient is found on the server", (
    Option("identifiers", "list", [], "identifier systems searched first (default: each of the patient's)", item="str"),
    Option("fallback", "list", [], f"then these demographics together: {', '.join(_MATCH_FIELDS)}", item="str"),
    Option("on_ambiguous", "enum", "hold", "several candidates: hold the message for a person (never a guess)",
           ("hold",)),
), title="match")


@dataclass
class FHIRDestinationConfig(HTTPDestinationConfig):
    step: object = None  # the fhir transformer that makes its Bundle
    base_url: str = ""
    match: dict | None = None  # {identifiers, fallback, on_ambiguous}
    if_match: bool = False  # update what we wrote before only if it is still the version we wrote
    owner: tuple = ("", "")  # (channel, destination): set by the channel loader; its records name them


def _options():
    from hl7relay.channels import http_destination  # noqa: F401 - registers http first

    http = lookup("destination", "http")
    assert http is not None
    return [
        Option("url", "str", description="the FHIR server's base URL, e.g. https://fhir.example/r4"),
        *[o for o in http.options if o.name not in _NOT_FOR_FHIR],
        Option("bundle", "enum", "transaction", "transaction (all or nothing), batch, or message "
                                                "($process-message)", _BUNDLES),
        Option("map", "str", "", "the message map (default: chosen by MSH-9)"),
        Option("maps", "str", None, "a map file adding to or replacing the shipped maps (relative to the channel file)"),
        Option("timezone", "str", None, "for HL7 times without an offset (default: the channel's timezone)"),
        Option("if_match", "bool", False, "update a resource this destination wrote before only if the server still "
               "has the version it wrote (If-Match); someone else's change since is a conflict for a person"),
        Option("match", "section", None, "find the patient on the server before sending: {identifiers: [SYSTEM], "
               "fallback: [family, given, birthDate, gender], on_ambiguous: hold}", section=_MATCH),
    ]


def build(options, context=None) -> FHIRDestinationConfig:
    from hl7relay.transformers.fhir import fhir_step

    base = options["url"].rstrip("/")
    parts = urlsplit(base)
    if "{" in base or parts.query:
        raise ValueError("url: a FHIR server's base URL (no {HL7 paths}, no query)")
    bundle = options["bundle"]
    target = base + "/$process-message" if bundle == "message" else base
    http_options = {**options, "url": target, "method": "POST", "body": None, "content_type": FHIR_JSON,
                    "success_when": None, "idempotency_header": None}
    for name in ("bundle", "map", "maps", "timezone", "match", "if_match"):
        http_options.pop(name, None)
    match = options.get("match")
    if match is not None:
        unknown = [f for f in match["fallback"] if f not in _MATCH_FIELDS]
        if unknown:
            raise ValueError(f"match: fallback: {', '.join(unknown)} (one of {', '.join(_MATCH_FIELDS)})")
        if bundle != "transaction":
            raise ValueError("match: works on transaction bundles (the patient's entry is rewritten to the match)")
    config = _http(http_options, context)
    step = fhir_step({"map": options["map"], "bundle": bundle,
                      "maps": options["maps"], "timezone": options["timezone"]}, context)
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    if options["if_match"] and bundle == "message":
        raise ValueError("if_match: works on transaction and batch bundles (a message bundle has no requests)")
    return FHIRDestinationConfig(**fields, step=step, base_url=base, match=match, if_match=options["if_match"])


register("destination", "fhir", "send each message to a FHIR R4 server as a Bundle (HL7 v2 converted by the maps)",
         _options())(build)


def cross_references(sent: bytes, answer: bytes, now: float, message_id) -> tuple:
    """What each sent resource became on the server, from a transaction- or batch-response:
    entries answer in the order they were sent (FHIR says so), each with its location
    ``Type/id/_history/version``. The delivery fills in its channel, destination and message."""
    try:
        request, response = json.loads(sent), json.loads(answer)
    except (ValueError, UnicodeDecodeError):
        return ()
    if not isinstance(response, dict) or response.get("resourceType") != "Bundle":
        return ()
    out = []
    for entry, answered in zip(request.get("entry") or (), response.get("entry") or ()):
        resource = entry.get("resource") or {}
        location = str((answered.get("response") or {}).get("location", ""))
        parts = location.split("/")
        if len(parts) < 2 or not str((answered.get("response") or {}).get("status", "")).startswith("2"):
            continue
        kind, fhir_id = parts[0], parts[1]
        version = parts[3] if len(parts) >= 4 and parts[2] == "_history" else \
            str((answered.get("response") or {}).get("etag", "")).strip('W/"')
        identifier = next((i for i in resource.get("identifier") or () if isinstance(i, dict) and i.get("value")), None)
        said = f"{identifier.get('system', '')}|{identifier['value']}" if identifier else ""
        local = str(entry.get("fullUrl", "")).removeprefix("urn:uuid:")
        digest = hashlib.sha256(json.dumps(resource, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        out.append(XrefUpdate("", "", kind, local, said, fhir_id, version, digest, message_id, now))
    return tuple(out)


class _SearchFailed(Exception):
    def __init__(self, result: DeliveryResult):
        super().__init__(result.error)
        self.result = result


_SEARCH_NAMES = {"family": "family", "given": "given", "birthDate": "birthdate", "gender": "gender"}


def _demographics(patient: dict, fields: list) -> str | None:
    """A search on every fallback field, or None when the patient lacks one (no partial matching)."""
    name = (patient.get("name") or [{}])[0]
    values = {"family": name.get("family"), "given": (name.get("given") or [None])[0],
              "birthDate": patient.get("birthDate"), "gender": patient.get("gender")}
    if any(not values.get(f) for f in fields):
        return None
    return "&".join(f"{_SEARCH_NAMES[f]}={quote(str(values[f]), safe='')}" for f in fields)


def _candidate(resource: dict) -> dict:
    name = (resource.get("name") or [{}])[0]
    return {"id": resource.get("id"), "name": " ".join([*(name.get("given") or []), name.get("family", "")]).strip(),
            "birthDate": resource.get("birthDate", ""), "gender": resource.get("gender", ""),
            "identifiers": [f"{i.get('system', '')}|{i.get('value', '')}" for i in resource.get("identifier") or ()]}


def with_patient(bundle: dict, entry: dict, server_id: str, existing: dict | None) -> dict:
    """The Bundle with its patient entry updating ``Patient/server_id`` (the server's identifiers
    kept beside ours: a match must not take away what others know the patient by)."""
    patient = dict(entry["resource"], id=server_id)
    if existing is not None:
        ours = {(i.get("system"), i.get("value")) for i in patient.get("identifier") or ()}
        patient["identifier"] = [*(patient.get("identifier") or []),
                                 *(i for i in existing.get("identifier") or () if (i.get("system"), i.get("value")) not in ours)]
    changed = dict(entry, resource=patient, request={"method": "PUT", "url": f"Patient/{server_id}"})
    return dict(bundle, entry=[changed if e is entry else e for e in bundle["entry"]])


class FHIRDelivery(HTTPDelivery):
    def __init__(self, config, resources):
        super().__init__(config, resources)
        # since the engine started, for the sync status: how patients were found, what waits for a person
        self.patients = {"matched": 0, "new": 0, "held": 0}
        self.written = 0  # resources the server confirmed (cross-referenced)

    def view(self) -> dict:
        return {**super().view(), "fhir": {"bundle": self.config.step.converter.bundle_type if self.config.step else "",
                                           "patients": dict(self.patients), "written": self.written,
                                           "match": self.config.match is not None, "if_match": self.config.if_match}}

    def _answered(self, answer, url, headers, body, authorization, retried):
        result = super()._answered(answer, url, headers, body, authorization, retried)
        if not isinstance(result, DeliveryResult):
            return result  # a 401 sent again: its answer comes back through here
        if result.ok:
            failed = failed_entries(answer.body)
            if failed:
                return DeliveryResult(False, True, ack=result.ack,
                                      error=f"HTTP {answer.status}, but {len(failed)} entr{'y' if len(failed) == 1 else 'ies'} "
                                            f"failed: " + "; ".join(failed[:3]))
            records = cross_references(body, answer.body, self.resources.clock(), None)
            self.written += len(records)
            return dataclasses.replace(result, records=records)
        return self._outcome(result, answer)

    def deliver(self, message, message_id=None):
        channel, destination = self.config.owner

        def stamped(result):  # the cross-references and holds name where they came from
            if isinstance(result, DeliveryResult) and result.records:
                records = tuple(dataclasses.replace(r, message_id=message_id, channel=channel, destination=destination)
                                for r in result.records)
                return dataclasses.replace(result, records=records)
            return result

        if isinstance(message, FHIRContent) and (self.config.match is not None or self.config.if_match):
            d = self._matched(message) if self.config.match is not None else defer.succeed(message)
            if self.config.if_match:
                d.addCallback(lambda found: found if isinstance(found, DeliveryResult) else self._if_match(found))
            d.addCallback(lambda found: found if isinstance(found, DeliveryResult)
                          else HTTPDelivery.deliver(self, found, message_id))
        else:
            d = super().deliver(message, message_id)
        return d.addCallback(stamped)

    @defer.inlineCallbacks
    def _if_match(self, content: FHIRContent):
        """Each resource this destination wrote before goes to the id the server gave it, only if
        the server still has the version we wrote (If-Match): a change made there since is a 412,
        a conflict for a person, never overwritten."""
        writer = self.resources.writer
        channel, destination = self.config.owner
        rows = yield writer.read(writer.store.xrefs, channel, destination)
        known = {(r["resource_type"], r["local_key"]): r for r in rows}
        bundle = content.json()
        entries = []
        for entry in bundle.get("entry") or ():
            resource = entry.get("resource") or {}
            row = known.get((resource.get("resourceType"), str(entry.get("fullUrl", "")).removeprefix("urn:uuid:")))
            if row is not None and row["version_id"]:
                entry = dict(entry, resource=dict(resource, id=row["fhir_id"]),
                             request={"method": "PUT", "url": f"{row['resource_type']}/{row['fhir_id']}",
                                      "ifMatch": f'W/"{row["version_id"]}"'})
            entries.append(entry)
        return FHIRContent.from_json(dict(bundle, entry=entries), content.problems)

    # -- patient matching ---------------------------------------------------------------------
    @defer.inlineCallbacks
    def _matched(self, content: FHIRContent):
        """The content with its patient entry pointed at the one server patient it matches, as it
        is when none matches, or a DeliveryResult: held for a person (several match) or failed."""
        bundle = content.json()
        entry = next((e for e in bundle.get("entry") or () if (e.get("resource") or {}).get("resourceType") == "Patient"
                      and "?" in str((e.get("request") or {}).get("url", ""))), None)
        if entry is None:
            return content  # no patient, or one already decided (PUT Patient/id)
        patient = entry["resource"]
        wanted = self.config.match["identifiers"]
        found: dict[str, dict] = {}
        try:
            for identifier in patient.get("identifier") or ():
                system, value = identifier.get("system", ""), identifier.get("value")
                if value and (not wanted or system in wanted):
                    found.update((yield self._search(f"identifier={quote(f'{system}|{value}', safe='')}")))
            how = "identifier"
            if not found and self.config.match["fallback"]:
                query = _demographics(patient, self.config.match["fallback"])
                if query is not None:
                    found = yield self._search(query)
                    how = "demographics"
        except _SearchFailed as failed:
            return failed.result
        if not found:
            self.patients["new"] += 1
            return content
        if len(found) > 1:
            self.patients["held"] += 1
            candidates = [_candidate(resource) for resource in found.values()]
            local = str(entry.get("fullUrl", "")).removeprefix("urn:uuid:")
            hold = MatchHoldUpdate("", "", None, local, json.dumps(candidates), self.resources.clock())
            return DeliveryResult(False, True, error=f"held for matching: {len(found)} patients on the server match by "
                                                     f"{how} ({', '.join('Patient/' + i for i in sorted(found))}); "
                                                     "hl7relay fhir resolve picks one",
                                  outcome=DeliveryOutcome.HELD_FOR_MATCHING, records=(hold,))
        self.patients["matched"] += 1
        [(server_id, existing)] = found.items()
        return FHIRContent.from_json(with_patient(bundle, entry, server_id, existing), content.problems)

    @defer.inlineCallbacks
    def _search(self, query: str):
        from hl7relay.apiclient.http import HTTPFailure

        url = f"{self.config.base_url}/Patient?{query}"
        headers = {"Accept": FHIR_JSON, "User-Agent": "hl7relay"}
        if self.authorizer is not None:
            from hl7relay.apiclient.oauth import TokenError

            try:
                authorization = yield self.authorizer.authorize()
            except TokenError as exc:
                raise _SearchFailed(DeliveryResult(False, error=f"not authorised: {exc}",
                                                   outcome=DeliveryOutcome.NOT_AUTHORISED)) from None
            headers.update(authorization.headers)
        yield self.bucket.acquire()
        try:
            answer = yield self.client.request("GET", url, headers, None, self.config.timeout)
        except HTTPFailure as exc:
            raise _SearchFailed(DeliveryResult(False, error=f"searching for the patient: {exc}",
                                               outcome=DeliveryOutcome.UNREACHABLE if exc.unreachable
                                               else DeliveryOutcome.TIMED_OUT)) from None
        if answer.status != 200:
            said = operation_outcome_text(answer.body) or answer.body[:200].decode("utf-8", "replace")
            raise _SearchFailed(DeliveryResult(False, error=f"searching for the patient: HTTP {answer.status}: {said}"))
        result = json.loads(answer.body)
        return {str(e["resource"]["id"]): e["resource"] for e in result.get("entry") or ()
                if isinstance(e.get("resource"), dict) and e["resource"].get("resourceType") == "Patient"
                and e["resource"].get("id")}

    @staticmethod
    def _outcome(result, answer):
        said = operation_outcome_text(answer.body)
        if said:
            kind = "conflict: " if result.outcome is DeliveryOutcome.CONFLICT else ""
            return dataclasses.replace(result, error=f"HTTP {answer.status}: {kind}{said}")
        return result


FHIRDestinationConfig.runner = FHIRDelivery  # type: ignore[attr-defined]
