"""A FHIR R4 server for tests that behaves like one, on loopback (served over HTTPS by
apiserver.serve): every write validated (fhir.resources' R4B models), an OperationOutcome for
what it refuses, transaction (all or nothing) and batch Bundles, conditional update by
identifier (``PUT Patient?identifier=system|value``: none -> create, one -> update, several ->
412), ``urn:uuid:`` references rewritten to the ids it assigns, versionId/ETag/If-Match, search
by identifier and ``_lastUpdated``, and scripted faults (a status with its body, slow, reset).
"""

from __future__ import annotations

import copy
import itertools
import json
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.web import resource, server

from fhir.resources.R4B import get_fhir_model_class

JSON = b"application/fhir+json"


def outcome(code: str, text: str, severity: str = "error", expression: str = "") -> dict:
    issue = {"severity": severity, "code": code, "diagnostics": text}
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


class Refused(Exception):
    def __init__(self, status: int, document: dict):
        super().__init__(status)
        self.status, self.document = status, document


@dataclass
class Stored:
    resource: dict
    version: int
    updated: str


@dataclass(eq=False)
class FakeFHIR(resource.Resource):
    reactor: object
    script: deque = field(default_factory=deque)  # ("status", headers, body) | ("slow", seconds) | ("reset",)
    resources: dict = field(default_factory=dict)  # (type, id) -> Stored
    requests: list = field(default_factory=list)  # (method, path, body)
    _ids: object = field(default_factory=lambda: itertools.count(1))
    _clock: object = field(default_factory=lambda: itertools.count(1))

    isLeaf = True

    def __post_init__(self):
        resource.Resource.__init__(self)

    # -- what tests read --------------------------------------------------------------------
    def of_type(self, kind: str) -> list[Stored]:
        return [s for (t, _), s in sorted(self.resources.items()) if t == kind]

    def find(self, kind: str, system: str, value: str) -> list[tuple[str, Stored]]:
        out = []
        for (t, rid), stored in sorted(self.resources.items()):
            if t != kind:
                continue
            for identifier in stored.resource.get("identifier") or ():
                if identifier.get("value") == value and identifier.get("system", "") == system:
                    out.append((rid, stored))
                    break
        return out

    # -- HTTP -------------------------------------------------------------------------------
    def render(self, request):
        body = request.content.read()
        path = request.uri.decode()
        self.requests.append((request.method.decode(), path, body))
        if self.script:
            answer = self.script.popleft()
            if answer[0] == "slow":
                call = self.reactor.callLater(answer[1], self._late, request, body, path)
                request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
                return server.NOT_DONE_YET
            if answer[0] == "reset":
                request.transport.abortConnection()
                return server.NOT_DONE_YET
            status, headers, text = answer
            request.setResponseCode(status)
            request.setHeader(b"Content-Type", JSON)
            for name, value in (headers or {}).items():
                request.setHeader(name.encode(), str(value).encode())
            return text if isinstance(text, bytes) else json.dumps(text).encode()
        return self._handle(request, body, path)

    def _late(self, request, body: bytes, path: str) -> None:
        request.write(self._handle(request, body, path))
        request.finish()

    def _handle(self, request, body: bytes, path: str) -> bytes:
        request.setHeader(b"Content-Type", JSON)
        method = request.method.decode()
        headers = {k.decode().lower(): v[-1].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        try:
            if method == "POST" and urlsplit(path).path.rstrip("/") in ("", "/fhir"):
                status, document, extra = 200, self._bundle(json.loads(body or b"{}")), {}
            elif method == "GET":
                status, document, extra = self._read(path)
            elif method == "PUT":
                status, entry, _ = self._write("PUT", path, json.loads(body), headers.get("if-match"), {})
                document, extra = entry["resource"], {"ETag": entry["response"]["etag"],
                                                       "Location": entry["response"]["location"]}
            else:
                raise Refused(405, outcome("not-supported", f"{method} {path} is not supported here"))
        except Refused as refused:
            request.setResponseCode(refused.status)
            return json.dumps(refused.document).encode()
        except ValueError as exc:
            request.setResponseCode(400)
            return json.dumps(outcome("structure", f"not JSON: {exc}")).encode()
        request.setResponseCode(status)
        for name, value in extra.items():
            request.setHeader(name.encode(), value.encode())
        return json.dumps(document).encode()

    # -- Bundles ----------------------------------------------------------------------------
    def _bundle(self, bundle: dict) -> dict:
        kind = bundle.get("type")
        if bundle.get("resourceType") != "Bundle" or kind not in ("transaction", "batch"):
            raise Refused(400, outcome("invalid", "POST to the base takes a transaction or batch Bundle"))
        entries = bundle.get("entry") or []
        if kind == "transaction":
            saved = copy.deepcopy(self.resources)
            try:
                responses = self._entries(entries)
            except Refused:
                self.resources = saved  # all or nothing
                raise
        else:
            responses = []
            for entry in entries:
                try:
                    responses += self._entries([entry])
                except Refused as refused:
                    responses.append({"response": {"status": str(refused.status), "outcome": refused.document}})
        return {"resourceType": "Bundle", "type": f"{kind}-response", "entry": responses}

    def _entries(self, entries: list) -> list:
        assigned = {}  # fullUrl (urn:uuid) -> Type/id, for references
        plans = []
        for entry in entries:
            request = entry.get("request") or {}
            method, url = request.get("method"), request.get("url", "")
            resource_ = entry.get("resource") or {}
            kind = resource_.get("resourceType", "")
            rid = self._target(method, url, kind)
            assigned[entry.get("fullUrl", "")] = f"{kind}/{rid}"
            plans.append((method, url, resource_, rid, request.get("ifMatch")))
        out = []
        for method, _url, resource_, rid, if_match in plans:
            resolved = json.loads(json.dumps(resource_), object_hook=lambda d: {
                **d, **({"reference": assigned.get(d["reference"], d["reference"])} if isinstance(d.get("reference"), str) else {})})
            status, entry, _ = self._write(method, f"{resource_.get('resourceType')}/{rid}", resolved, if_match, {})
            out.append({"response": entry["response"]})
        return out

    def _target(self, method: str, url: str, kind: str) -> str:
        """The id a PUT lands on: by id, or by identifier (conditional update)."""
        parts = urlsplit(url)
        if method != "PUT":
            raise Refused(405, outcome("not-supported", f"{method} in a Bundle is not supported here"))
        if parts.query:
            query = parse_qs(parts.query)
            if set(query) != {"identifier"}:
                raise Refused(400, outcome("not-supported", f"conditional update by {sorted(query)}"))
            system, _, value = unquote(query["identifier"][0]).rpartition("|")
            found = self.find(kind, system, value)
            if len(found) > 1:
                raise Refused(412, outcome("multiple-matches", f"{len(found)} {kind} resources match {system}|{value}"))
            return found[0][0] if found else str(next(self._ids))
        return parts.path.rsplit("/", 1)[-1]

    def _write(self, method: str, path: str, document: dict, if_match: str | None, extra: dict):
        kind, _, rid = urlsplit(path).path.strip("/").rpartition("/")
        kind = kind.rsplit("/", 1)[-1]
        if document.get("resourceType") != kind:
            raise Refused(400, outcome("invalid", f"the body is a {document.get('resourceType')}, the URL says {kind}"))
        if document.get("id") not in (None, rid):
            raise Refused(400, outcome("invalid", f"id {document.get('id')} in the body is not {rid}"))
        body = {k: v for k, v in document.items() if k not in ("id", "meta")}
        try:
            get_fhir_model_class(kind).model_validate({**body, "resourceType": kind})
        except Exception as exc:  # noqa: BLE001 - the validator's words are the answer
            first = str(exc).splitlines()
            raise Refused(422, outcome("invalid", " ".join(first[:3])[:300], expression=kind)) from None
        current = self.resources.get((kind, rid))
        if if_match is not None and (current is None or if_match.strip('W/"') != str(current.version)):
            raise Refused(412, outcome("conflict", f"If-Match {if_match} but {kind}/{rid} is at version "
                                                   f"{current.version if current else 'none'}"))
        version = current.version + 1 if current else 1
        updated = datetime.fromtimestamp(1_700_000_000 + next(self._clock), timezone.utc).isoformat()
        stored = {**body, "resourceType": kind, "id": rid, "meta": {"versionId": str(version), "lastUpdated": updated}}
        self.resources[(kind, rid)] = Stored(stored, version, updated)
        response = {"status": "200 OK" if current else "201 Created", "location": f"{kind}/{rid}/_history/{version}",
                    "etag": f'W/"{version}"', "lastModified": updated}
        return (200 if current else 201), {"resource": stored, "response": response}, extra

    def _read(self, path: str):
        parts = urlsplit(path)
        segments = [p for p in parts.path.split("/") if p and p != "fhir"]
        if len(segments) == 2:
            stored = self.resources.get((segments[0], segments[1]))
            if stored is None:
                raise Refused(404, outcome("not-found", f"{segments[0]}/{segments[1]} is not known"))
            return 200, stored.resource, {"ETag": f'W/"{stored.version}"'}
        if len(segments) != 1:
            raise Refused(400, outcome("not-supported", f"GET {path}"))
        kind, query = segments[0], parse_qs(parts.query)
        matches = [s for (t, _), s in sorted(self.resources.items()) if t == kind]
        if "identifier" in query:
            system, _, value = query["identifier"][0].rpartition("|")
            matches = [s for _, s in self.find(kind, system, value)]
        def named(resource, part):
            return [str(v).lower() for n in resource.get("name") or () for v in
                    ([n.get("family")] if part == "family" else n.get("given") or ()) if v]

        for param, test in (("family", lambda r, v: v.lower() in named(r, "family")),
                            ("given", lambda r, v: v.lower() in named(r, "given")),
                            ("birthdate", lambda r, v: r.get("birthDate") == v),
                            ("gender", lambda r, v: r.get("gender") == v)):
            if param in query:
                matches = [s for s in matches if test(s.resource, query[param][0])]
        unknown = set(query) - {"identifier", "_lastUpdated", "family", "given", "birthdate", "gender", "_sort", "_count"}
        if unknown:
            raise Refused(400, outcome("not-supported", f"search by {', '.join(sorted(unknown))} is not supported here"))
        if "_lastUpdated" in query:
            bound = query["_lastUpdated"][0]
            if bound[:2] not in ("gt", "ge"):
                raise Refused(400, outcome("not-supported", "_lastUpdated takes gt or ge here"))
            matches = [s for s in matches if (s.updated > bound[2:] if bound[:2] == "gt" else s.updated >= bound[2:])]
        if query.get("_sort", [""])[0] == "_lastUpdated":
            matches.sort(key=lambda s: s.updated)
        elif "_sort" in query:
            raise Refused(400, outcome("not-supported", f"_sort by {query['_sort'][0]}"))
        return 200, {"resourceType": "Bundle", "type": "searchset", "total": len(matches),
                     "entry": [{"resource": s.resource} for s in matches]}, {}

