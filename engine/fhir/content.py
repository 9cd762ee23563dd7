"""A FHIR JSON document where the pipeline otherwise carries an HL7 message: what a ``fhir``
transformer hands its destination, stored as the delivery's content and sent as it is."""

from __future__ import annotations

import json

from hl7relay.hl7.message import Message

__all__ = ["FHIRContent", "parse_content", "is_json"]

FHIR_JSON = "application/fhir+json"


class FHIRContent:
    """The bytes of a FHIR resource or Bundle (UTF-8 JSON). HL7 paths name nothing in it: ``get``
    answers "" (a url template or an order key of HL7 paths finds no value)."""

    __slots__ = ("data", "problems", "_parsed")
    content_type = FHIR_JSON
    raw = property(lambda self: self.data)

    def __init__(self, data: bytes, problems: tuple = ()):
        self.data = data
        self.problems = tuple(problems)
        self._parsed = None

    @classmethod
    def from_json(cls, document: dict, problems=()) -> "FHIRContent":
        return cls(json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8"), tuple(problems))

    def json(self):
        if self._parsed is None:
            self._parsed = json.loads(self.data)
        return self._parsed

    def to_bytes(self) -> bytes:
        return self.data

    def to_text(self) -> str:
        """Indented JSON, lines ended by CR as segments are, so the dry run shows it line by line."""
        return "\r".join(json.dumps(self.json(), indent=2, ensure_ascii=False).splitlines()) + "\r"

    def copy(self) -> "FHIRContent":
        return self  # never changed in place

    def get(self, path) -> str:
        return ""

    @property
    def charset(self) -> str:
        return "UNICODE UTF-8"

    def __repr__(self) -> str:
        return f"<FHIRContent {len(self.data)} bytes>"


def is_json(data: bytes) -> bool:
    return data[:64].lstrip()[:1] in (b"{", b"[")  # (its head only: the content is not copied)


def parse_content(data: bytes):
    """Stored delivery content as what it is: FHIR JSON, else an HL7 message (ParseError if neither)."""
    if is_json(data):
        return FHIRContent(bytes(data))
    return Message.from_bytes(data)


def operation_outcome_text(body: bytes) -> str | None:
    """An OperationOutcome's issues as one line (``error invalid: Patient.birthDate: bad date``),
    or None when the body is not one."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict) or document.get("resourceType") != "OperationOutcome":
        return None
    said = []
    for issue in document.get("issue") or ():
        if not isinstance(issue, dict):
            continue
        where = ", ".join(str(e) for e in (issue.get("expression") or issue.get("location") or ()))
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or ""
        said.append(" ".join(p for p in (f"{issue.get('severity', '')} {issue.get('code', '')}".strip(),
                                         f"{where}:" if where else "", str(text)) if p))
    return "; ".join(said) or "an OperationOutcome without issues"


def failed_entries(body: bytes) -> list[str]:
    """The entries of a batch- or transaction-response Bundle that did not succeed, said one each."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return []
    if not isinstance(document, dict) or document.get("resourceType") != "Bundle":
        return []
    failed = []
    for index, entry in enumerate(document.get("entry") or (), start=1):
        response = entry.get("response") if isinstance(entry, dict) else None
        status = str((response or {}).get("status", ""))
        if response is not None and not status.startswith("2"):
            outcome = response.get("outcome")
            detail = operation_outcome_text(json.dumps(outcome).encode()) if isinstance(outcome, dict) else ""
            failed.append(f"entry {index}: {status}" + (f": {detail}" if detail else ""))
    return failed
