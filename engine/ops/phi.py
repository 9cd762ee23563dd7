"""Keeping patient data out of what support tools print, unless asked (``--show-phi``).

Segments that describe a person (PID, PD1, NK1, GT1, IN1-IN3, MRG...) keep their set id and
shape but every value becomes ``***``; free text that may name a patient (NTE-3, OBX-5) too.
"""

from __future__ import annotations

import re

from hl7relay.errors import ParseError
from hl7relay.fhir.content import is_json
from hl7relay.hl7.message import Message

__all__ = ["mask_message", "mask_fhir", "mask_value", "mask_text", "mask_known", "mask_log_text", "person_values", "MASK"]

MASK = "***"
_PERSON_SEGMENTS = frozenset({"PID", "PD1", "NK1", "GT1", "IN1", "IN2", "IN3", "MRG", "ACC", "PV2", "ROL", "PRT"})
_FREE_TEXT = {"NTE": {3}, "OBX": {5}, "TXA": {}, "DG1": {4}}
_ERROR_TEXT = {"ERR": {8}, "MSA": {3}}  # an ACK's sentences: the values they quote are masked (mask_text)


def mask_value(value: str) -> str:
    if not value:
        return value
    return value[:1] + MASK if len(value) > 3 else MASK


_QUOTED = re.compile(r"'((?:[^'\\]|\\.)*)'" + r'|"((?:[^"\\]|\\.)*)"')


_FIELD_PATH = re.compile(r"\b([A-Z][A-Z0-9]{2})(?:\[\d+\])?-(\d+)")


def _about_person(segment: str, field: int) -> bool:
    """Whether a field's values may describe a patient (or be free text that can)."""
    return segment in _PERSON_SEGMENTS or field in _FREE_TEXT.get(segment, ())


def mask_text(text: str) -> str:
    """An error text with the values it quotes masked, by field. Our own errors name the field
    and quote the value they are about (``PID-7: '19800412' is not an HL7 date/time``): a value of
    a field that describes a person (PID, NK1, GT1, IN1, OBX-5, NTE-3...), or of no field named
    before it, is masked; one of another field (``MSH-9.2: 'A99' is not an event``) is the
    answer a support engineer needs, and stays. Paths and codes are not quoted."""
    if not text or ("'" not in text and '"' not in text):
        return text

    def masked(match):
        value = match.group(1) if match.group(1) is not None else match.group(2)
        fields = list(_FIELD_PATH.finditer(text, 0, match.start()))
        named = fields[-1] if fields else None  # the last field named before the value
        if named is not None and not _about_person(named.group(1), int(named.group(2))):
            return match.group(0)
        return "'" + mask_value(value) + "'"

    return _QUOTED.sub(masked, text)


def person_values(data: bytes) -> set[str]:
    """The values of a message's person segments (names, ids, dates, addresses: every component
    of 3 characters or more), to find them where they are not quoted: a peer's error text such as
    ``AE: patient DOE JANE not found`` names the patient without quotes."""
    try:
        message = Message.from_bytes(data)
    except ParseError:
        return set()
    d = message.delimiters
    splitter = re.compile("|".join(re.escape(c) for c in (d.component, d.repetition, d.subcomponent) if c))
    values = set()
    for position, name in enumerate(message.segment_names()):
        if name in _PERSON_SEGMENTS:
            for field in list(message.fields(position))[2:]:
                values.update(v for v in splitter.split(field) if len(v.strip()) >= 3)
    return values


def mask_known(text: str, values) -> str:
    """``text`` with every occurrence of ``values`` (longest first) masked."""
    if not text or not values:
        return text
    found = [v for v in values if v in text]
    if not found:
        return text
    pattern = re.compile("|".join(re.escape(v) for v in sorted(found, key=len, reverse=True)))
    return pattern.sub(lambda m: mask_value(m.group(0)), text)


# FHIR: resources that are a person, and elements of others that carry free text or results
_PERSON_RESOURCES = frozenset({"Patient", "RelatedPerson", "Person", "Practitioner"})
_FREE_ELEMENTS = frozenset({"text", "comment", "note", "description", "valueString", "valueQuantity",
                            "valueCodeableConcept", "valueDateTime", "valuePeriod", "valueTime", "valueRange",
                            "valueRatio", "valueAttachment", "conclusion", "patientInstruction"})
# the parts of any element that are structure, never a person's data
_STRUCTURE_KEYS = frozenset({"resourceType", "id", "fullUrl", "reference", "url", "system", "method", "use",
                             "status", "type", "mode", "versionId", "lastUpdated", "profile"})


def _mask_json(value, person: bool):
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "url" and isinstance(item, str) and "?identifier=" in item:
                out[key] = item.split("?identifier=", 1)[0] + "?identifier=" + MASK  # a conditional update's MRN
            elif key in _STRUCTURE_KEYS and not isinstance(item, (dict, list)):
                out[key] = item
            elif key == "resource" and isinstance(item, dict):
                out[key] = _mask_json(item, item.get("resourceType") in _PERSON_RESOURCES)
            else:
                out[key] = _mask_json(item, person or key in _FREE_ELEMENTS)
        return out
    if isinstance(value, list):
        return [_mask_json(item, person) for item in value]
    if person and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return MASK
    return value


def mask_fhir(data: bytes) -> str:
    """A FHIR JSON document with person resources' values and results' values masked (indented)."""
    import json

    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return f"<{len(data)} bytes that are not HL7 nor JSON; not shown without --show-phi>"
    person = isinstance(document, dict) and document.get("resourceType") in _PERSON_RESOURCES
    return json.dumps(_mask_json(document, person), indent=2, ensure_ascii=False)


def mask_message(data: bytes) -> str:
    """The message as text with patient data masked (segments joined by newlines for reading)."""
    if is_json(data):
        return mask_fhir(data)
    try:
        message = Message.from_bytes(data)
    except ParseError:
        return f"<{len(data)} bytes that are not an HL7 message; not shown without --show-phi>"
    fs = message.delimiters.field
    lines = []
    for position, name in enumerate(message.segment_names()):
        fields = list(message.fields(position))
        if name in _PERSON_SEGMENTS:
            fields = fields[:2] + [MASK if f else f for f in fields[2:]]
        elif name in _FREE_TEXT:
            for number in _FREE_TEXT[name]:
                if number < len(fields) and fields[number]:
                    fields[number] = MASK
        elif name in _ERROR_TEXT:
            for number in _ERROR_TEXT[name]:
                if number < len(fields) and fields[number]:
                    fields[number] = mask_text(fields[number])
        if name in ("MSH", "FHS", "BHS"):
            lines.append(fields[0] + fs + fs.join(fields[2:]))
        else:
            lines.append(fs.join(fields))
    return "\n".join(lines)


def mask_log_text(line: dict) -> str:
    """A log line's text as the log viewer shows it. Only lines about a message (a message id or
    control id, or marked ``about_message``) may quote its values: theirs are masked. The rest
    (configuration, lint, lifecycle) quote keys, names and paths a person needs to read:
    ``unknown key 'fitler'`` stays as it is."""
    text = line["text"]
    if line.get("message_id") or line.get("control_id") or line.get("about_message"):
        return mask_text(text)
    return text
