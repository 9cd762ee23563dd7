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
from urllib.parse import urlsplit

from hl7relay.channels.http_destination import HTTPDelivery, HTTPDestinationConfig, _http
from hl7relay.fhir.content import FHIR_JSON, failed_entries, operation_outcome_text
from hl7relay.outcomes import DeliveryOutcome, DeliveryResult
from hl7relay.spec import Option, lookup, register
from hl7relay.store.records import XrefUpdate

__all__ = ["FHIRDestinationConfig", "FHIRDelivery"]

_NOT_FOR_FHIR = ("url", "method", "body", "content_type", "success_when", "idempotency_header")
_BUNDLES = ("transaction", "batch", "message")


@dataclass
class FHIRDestinationConfig(HTTPDestinationConfig):
    step: object = None  # the fhir transformer that makes its Bundle
    base_url: str = ""


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
    for name in ("bundle", "map", "maps", "timezone"):
        http_options.pop(name, None)
    config = _http(http_options, context)
    step = fhir_step({"map": options["map"], "bundle": "batch" if bundle == "batch" else bundle,
                      "maps": options["maps"], "timezone": options["timezone"]}, context)
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return FHIRDestinationConfig(**fields, step=step, base_url=base)


register("destination", "fhir", "send each message to a FHIR R4 server as a Bundle (HL7 v2 converted by the maps)",
         _options())(build)


def cross_references(sent: bytes, answer: bytes, now: float, message_id) -> tuple:
    """What each sent resource became on the server, from a transaction- or batch-response:
    entries answer in the order they were sent (FHIR says so), each with its location
    ``Type/id/_history/version``. The channel and destination are the queue's to fill in."""
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


class FHIRDelivery(HTTPDelivery):
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
            return dataclasses.replace(result, records=cross_references(body, answer.body, self.resources.clock(), None))
        return self._outcome(result, answer)

    def deliver(self, message, message_id=None):
        def stamped(result):  # the cross-references name the message they came from
            if isinstance(result, DeliveryResult) and result.records:
                records = tuple(dataclasses.replace(r, message_id=message_id) for r in result.records)
                return dataclasses.replace(result, records=records)
            return result

        return super().deliver(message, message_id).addCallback(stamped)

    @staticmethod
    def _outcome(result, answer):
        said = operation_outcome_text(answer.body)
        if said:
            kind = "conflict: " if result.outcome is DeliveryOutcome.CONFLICT else ""
            return dataclasses.replace(result, error=f"HTTP {answer.status}: {kind}{said}")
        return result


FHIRDestinationConfig.runner = FHIRDelivery  # type: ignore[attr-defined]
