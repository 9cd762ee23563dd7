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
    return data.lstrip()[:1] in (b"{", b"[")


def parse_content(data: bytes):
    """Stored delivery content as what it is: FHIR JSON, else an HL7 message (ParseError if neither)."""
    if is_json(data):
        return FHIRContent(bytes(data))
    return Message.from_bytes(data)
