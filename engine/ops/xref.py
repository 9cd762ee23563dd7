"""``hl7relay verify --xref``: the FHIR cross-reference table against the FHIR server.

For each fhir destination, every row of ``fhir_xref`` is read back from the server
(``GET Type/id``): a resource the server no longer has is **missing**, one with a newer version
than we wrote was **changed** there since, one replaced by another (``Patient.link`` of type
``replaced-by``) was **merged**; and each PMS identifier is searched for
(``GET Type?identifier=system|value``): more than one resource carrying it is a
**duplicate-identifier**. Nothing is changed on the server; ``--repair`` only queues the
messages that wrote missing resources again (replays, audited).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import quote

from twisted.internet import defer

__all__ = ["XrefFinding", "verify_xref", "PROBLEMS"]

MISSING, CHANGED, MERGED, DUPLICATE, UNREACHABLE = "missing", "changed", "merged", "duplicate-identifier", "unreachable"
PROBLEMS = frozenset({MISSING, MERGED, DUPLICATE, UNREACHABLE})  # CHANGED is a warning: someone edited it there


@dataclass(frozen=True, slots=True)
class XrefFinding:
    kind: str
    channel: str
    destination: str
    resource_type: str
    fhir_id: str
    identifier: str
    detail: str
    message_id: int | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "channel": self.channel, "destination": self.destination,
                "resource_type": self.resource_type, "fhir_id": self.fhir_id, "identifier": self.identifier,
                "detail": self.detail, "message_id": self.message_id}


@defer.inlineCallbacks
def verify_xref(rows: list[dict], config, reactor, timeout: float = 10.0):
    """Findings for one destination's rows (its config: base_url, tls, credential)."""
    from hl7relay.apiclient.credentials import Authorizer
    from hl7relay.apiclient.http import HTTPClient, HTTPFailure

    client = HTTPClient(reactor, config.tls, config.connect_timeout, 4)
    authorizer = Authorizer(config.credential, reactor) if config.credential is not None else None
    findings: list[XrefFinding] = []
    base = config.base_url.rstrip("/")

    @defer.inlineCallbacks
    def get(path: str):
        headers = {"Accept": "application/fhir+json", "User-Agent": "hl7relay"}
        url = f"{base}/{path}"
        if authorizer is not None:
            authorization = yield authorizer.authorize()
            headers.update(authorization.headers)
            if authorization.query:
                url += ("&" if "?" in url else "?") + "&".join(f"{k}={quote(v, safe='')}" for k, v in authorization.query.items())
        answer = yield client.request("GET", url, headers, None, timeout)
        return answer

    def finding(kind, row, detail):
        findings.append(XrefFinding(kind, row["channel"], row["destination"], row["resource_type"], row["fhir_id"],
                                    row["identifier"], detail, row.get("message_id")))

    try:
        for row in rows:
            try:
                answer = yield get(f"{row['resource_type']}/{quote(row['fhir_id'], safe='')}")
            except HTTPFailure as exc:
                finding(UNREACHABLE, row, str(exc))
                return findings  # the server is not there: the rest would say the same
            if answer.status in (404, 410):
                finding(MISSING, row, f"HTTP {answer.status}: the server no longer has it")
                continue
            if answer.status != 200:
                finding(UNREACHABLE, row, f"HTTP {answer.status} reading it")
                continue
            resource = _json(answer.body)
            version = str((resource.get("meta") or {}).get("versionId", ""))
            replaced = [link for link in resource.get("link") or () if isinstance(link, dict)
                        and link.get("type") == "replaced-by"]
            if replaced:
                target = (replaced[0].get("other") or {}).get("reference", "?")
                finding(MERGED, row, f"replaced by {target} on the server")
            elif version and row["version_id"] and version != row["version_id"]:
                finding(CHANGED, row, f"version {version} on the server, {row['version_id']} written by us")
        seen = set()
        for row in rows:
            key = (row["resource_type"], row["identifier"])
            if not row["identifier"] or key in seen:
                continue
            seen.add(key)
            answer = yield get(f"{row['resource_type']}?identifier={quote(row['identifier'], safe='')}")
            if answer.status != 200:
                continue
            found = _json(answer.body)
            ids = [(e.get("resource") or {}).get("id") for e in found.get("entry") or ()]
            total = found.get("total", len(ids))
            if total and total > 1:
                finding(DUPLICATE, row, f"{total} {row['resource_type']} resources carry {row['identifier']}: "
                                        + ", ".join(str(i) for i in ids[:5]))
        return findings
    finally:
        if authorizer is not None:
            authorizer.close()
        yield client.close()


def _json(body: bytes) -> dict:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
