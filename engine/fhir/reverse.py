"""FHIR → HL7 v2: the same segment and data type maps, read backwards.

A rule goes back when it can: a value read from its FHIR target becomes its field or component
(a list at the segment's level gives the field's repetitions; a list inside a data type, its
item at that position); a template of one path (``"{SCH-11.4}"``) writes that path; a code goes
back through its vocabulary (the first v2 code with that FHIR code). Constants, conditional
rules and ``back: false`` rules do not go back. A time keeps the sender's own text when the
conversion kept it (the originalText extension), so v2 → FHIR → v2 gives the time it was given.
"""

from __future__ import annotations

import re

from hl7relay.fhir.convert import ORIGINAL_TEXT
from hl7relay.fhir.maps import MapSet, Rule, parse_value_path
from hl7relay.hl7.escape import DEFAULT_DELIMITERS, escape

__all__ = ["Reverser", "appointment_siu", "SIU_EVENTS"]

_ONE_PLACEHOLDER = re.compile(r"^\{([^{}]+)\}$")
_V2_TABLE_URI = re.compile(r"^http://terminology\.hl7\.org/CodeSystem/v2-(\d{4})$")
_FHIR_TIME = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?"
                        r"(Z|[+-]\d{2}:\d{2})?)?)?)?$")


class Reverser:
    """``fields(segment_map, resource, resolve)``: a segment's fields, built from a resource."""

    def __init__(self, maps: MapSet):
        self.maps = maps
        self.d = DEFAULT_DELIMITERS
        self._backwards = {name: {fhir: v2 for v2, (fhir, _, _) in codes.items()}
                           for name, codes in reversed(list(maps.vocabulary.items()))}
        self._first_code: dict[str, dict] = {}
        for name, codes in maps.vocabulary.items():
            first: dict = {}
            for v2, (fhir, _, _) in codes.items():
                first.setdefault(fhir, v2)
            self._first_code[name] = first
        self._systems = {uri: name for name, uri in reversed(list(maps.systems.items()))}

    # -- a segment --------------------------------------------------------------------------
    def fields(self, segment_map: str, resource: dict, resolve=lambda reference: None) -> dict[int, list]:
        """field number -> repetitions (each a list of components, each a list of subcomponents)."""
        out: dict[int, list] = {}
        rules = [r for r in self.maps.segments[segment_map].rules if self._goes_back(r) and r.number]
        sharing: dict[str, set] = {}  # list name -> the fields that fill it: then each takes its own item back
        for rule in rules:
            if rule.target[0][1]:
                sharing.setdefault(rule.target[0][0], set()).add(rule.number)
        for rule in rules:
            target_path = self._placeholder_target(rule)
            name, slot = rule.target[0]
            if slot and len(sharing[name]) > 1:
                values = [v for v in [_read(resource, rule.target)] if v is not None]
            elif slot:
                values = self._read_list(resource, rule.target)
            else:
                values = [v for v in [_read(resource, rule.target)] if v is not None]
            for index, value in enumerate(values):
                encoded = self._encode(rule, value, resource, resolve, rule.target)
                if encoded is None:
                    continue
                if target_path is not None:  # "{SCH-11.4}": into that component of the field
                    reps = out.setdefault(target_path.field, [[]])
                    _place(reps[0], target_path.component or 1, target_path.sub, encoded)
                    continue
                reps = out.setdefault(rule.number, [])
                while len(reps) <= index:
                    reps.append([])
                if not reps[index]:
                    reps[index] = encoded if isinstance(encoded, list) else [[encoded]]
        return out

    def segment(self, name: str, segment_map: str, resource: dict, resolve=lambda reference: None,
                set_id: int | None = None, extra: dict | None = None) -> str:
        fields = self.fields(segment_map, resource, resolve)
        for number, value in (extra or {}).items():
            fields[number] = [[escape(str(value), self.d)]] if not isinstance(value, list) else value
        if set_id is not None:
            fields[1] = [[str(set_id)]]
        return self.join(name, fields)

    def join(self, name: str, fields: dict[int, list]) -> str:
        rep_sep, comp_sep, sub_sep = self.d.repetition or "~", self.d.component or "^", self.d.subcomponent or "&"
        top = max(fields, default=0)
        texts = [name]
        for number in range(1, top + 1):
            reps = fields.get(number) or []
            texts.append(rep_sep.join(_trim(comp_sep.join(_trim(sub_sep.join(_trim(sub)) for sub in rep))
                                            for rep in reps)) if reps else "")
        return self.d.field.join(_trim(texts))

    # -- values -------------------------------------------------------------------------------
    def _goes_back(self, rule: Rule) -> bool:
        if rule.back is False or (rule.when is not None and rule.back is not True):
            return False
        if rule.value is not None:
            return self._placeholder_target(rule) is not None
        return True

    @staticmethod
    def _placeholder_target(rule: Rule):
        if rule.value is None:
            return None
        match = _ONE_PLACEHOLDER.match(rule.value)
        return parse_value_path(match.group(1)) if match else None

    def _read_list(self, resource: dict, target: tuple) -> list:
        name, _ = target[0]
        items = resource.get(name)
        if not isinstance(items, list):
            return []
        rest = target[1:]
        out = []
        for item in items:
            value = _read(item, rest) if rest else item
            if value is not None:
                out.append(value)
        return out

    def _encode(self, rule: Rule, value, owner: dict, resolve, target: tuple):
        """A field's value as components (list of lists), or one leaf string."""
        type_name = rule.type
        if type_name in self.maps.datatypes:
            element_map = self.maps.datatypes[type_name]
            if element_map.resource:
                if not isinstance(value, dict) or "reference" not in value:
                    return None
                referenced = resolve(value["reference"])
                return None if referenced is None else self._components(element_map, referenced, resolve)
            if isinstance(value, dict):
                encoded = self._components(element_map, value, resolve)
                if rule.vocabulary:
                    code = _coding_code(value)
                    back = self._first_code[rule.vocabulary].get(code) if code else None
                    if back is not None:
                        encoded = [[escape(back, self.d)]] + encoded[1:]
                return encoded
            # a primitive made by a data type map ($value): its component 1
            leaf = self._leaf(element_map_primitive(element_map), value, rule.vocabulary, owner, target)
            return None if leaf is None else [[leaf]]
        leaf = self._leaf(type_name, value, rule.vocabulary, owner, target)
        return leaf

    def _components(self, element_map, value: dict, resolve) -> list:
        components: list[list[str]] = []
        for rule in element_map.rules:
            if not self._goes_back(rule) or not rule.number:
                continue
            placeholder = self._placeholder_target(rule)
            got = _read(value, rule.target, positional=True) if rule.target[0][0] not in ("$value", "$merge") else \
                (value if rule.target[0][0] == "$merge" else None)
            if got is None:
                continue
            encoded = self._encode(rule, got, value, resolve, rule.target)
            if encoded is None:
                continue
            number = placeholder.component if placeholder is not None and placeholder.component else rule.number
            while len(components) < number:
                components.append([])
            if components[number - 1]:
                continue  # the first rule that gives a component wins
            if isinstance(encoded, list):  # a data type inside a component: its components are subcomponents
                components[number - 1] = [sub[0] if sub else "" for sub in encoded]
            else:
                components[number - 1] = [encoded]
        return components

    def _leaf(self, kind: str, value, vocabulary: str, owner: dict, target: tuple) -> str | None:
        if isinstance(value, (dict, list)):
            return None
        if isinstance(value, bool):
            text = "Y" if value else "N"
        elif kind in ("date", "dateTime", "instant"):
            original = _original(owner, target)
            said = original if original is not None else _dtm(str(value))
            if said is None:
                return None
            text = said
        elif kind == "time":
            text = str(value).replace(":", "")
        elif kind == "system":
            text = self._system(str(value))
        else:
            text = str(value)
        if vocabulary:
            text = self._first_code[vocabulary].get(text, text if kind not in ("code",) else None) or ""
            if not text:
                return None
        return escape(text, self.d)

    def _system(self, uri: str) -> str:
        known = self._systems.get(uri)
        if known:
            return known
        table = _V2_TABLE_URI.match(uri)
        return f"HL7{table.group(1)}" if table else uri


def element_map_primitive(element_map) -> str:
    """The primitive kind a $value data type map makes (its first rule's type)."""
    for rule in element_map.rules:
        if rule.target and rule.target[0][0] == "$value":
            return rule.type or "string"
    return "string"


def _read(node, target: tuple, positional: bool = True):
    for name, slot in target:
        if not isinstance(node, dict):
            return None
        node = node.get(name)
        if slot:
            if not isinstance(node, list) or len(node) < (slot if positional else 1):
                return None
            node = node[slot - 1] if positional else node[0]
    return node


def _coding_code(value: dict) -> str | None:
    if "coding" in value and value["coding"]:
        return value["coding"][0].get("code")
    return value.get("code")


def _original(owner: dict, target: tuple) -> str | None:
    """The sender's own text kept beside a value (``_start.extension``), if any."""
    node: object = owner
    for name, slot in target[:-1]:
        node = node.get(name) if isinstance(node, dict) else None
        if slot and isinstance(node, list):
            node = node[slot - 1] if len(node) >= slot else None
    name = target[-1][0]
    kept = node.get("_" + name) if isinstance(node, dict) else None
    for extension in (kept or {}).get("extension") or ():
        if extension.get("url") == ORIGINAL_TEXT and isinstance(extension.get("valueString"), str):
            return extension["valueString"]
    return None


def _dtm(value: str) -> str | None:
    match = _FHIR_TIME.match(value)
    if match is None:
        return None
    y, m, d, hh, mm, ss, fraction, zone = match.groups()
    text = "".join(p for p in (y, m, d, hh, mm, ss) if p)
    if fraction:
        text += "." + fraction[:4]
    if zone:
        text += "+0000" if zone == "Z" else zone.replace(":", "")
    return text


def _place(rep: list, component: int, sub: int, encoded) -> None:
    while len(rep) < component:
        rep.append([])
    leaf = encoded if isinstance(encoded, str) else (encoded[0][0] if encoded and encoded[0] else "")
    if sub:
        while len(rep[component - 1]) < sub:
            rep[component - 1].append("")
        rep[component - 1][sub - 1] = leaf
    else:
        rep[component - 1] = [leaf]


def _trim(parts) -> list:
    parts = list(parts)
    while parts and not parts[-1]:
        parts.pop()
    return parts


# what the fhir source says happened to an appointment, as the SIU trigger event (issue #28)
_SCH_PEOPLE = {"placer contact person", "filler contact person", "entered by"}  # SCH-12/16/20's participant types
SIU_EVENTS = {"new": "S12", "rescheduled": "S13", "modified": "S14", "cancelled": "S15", "noshow": "S26",
              "entered-in-error": "S17"}


def appointment_siu(reverser: Reverser, appointment: dict, resolve, event: str, control_id: str, now: str,
                    sender: tuple = ("HL7RELAY", ""), receiver: tuple = ("", "")) -> str:
    """An SIU message (SIU_S12 structure) for ``appointment``: SCH, the patient's PID, then RGS
    with an AIS, an AIP per practitioner and an AIL per location taking part. ``resolve`` finds
    a referenced resource (None when it cannot)."""
    d = reverser.d
    msh = d.field.join(["MSH", d.encoding_characters, escape(sender[0], d),
                        escape(sender[1], d), escape(receiver[0], d), escape(receiver[1], d), now, "",
                        f"SIU^{event}^SIU_S12", escape(control_id, d), "P", "2.5.1"])
    segments = [msh, reverser.segment("SCH", "SCH[Appointment]", appointment, resolve)]
    by_kind: dict[str, list] = {"Patient": [], "Practitioner": [], "Location": []}
    booked: dict[str, dict] = {}  # one participant per actor (two AIPs for one person are one booking)
    for participant in appointment.get("participant") or ():
        reference = (participant.get("actor") or {}).get("reference")
        people = {t.get("text") for t in participant.get("type") or ()} & _SCH_PEOPLE
        if reference and (reference not in booked or not people):
            booked[reference] = participant
    for reference, participant in booked.items():
        actor = resolve(reference)
        if actor is not None and actor.get("resourceType") in by_kind:
            by_kind[actor["resourceType"]].append(participant)
    # the contacts and the enterer of SCH-12/16/20 are participants too, but not resources booked (AIP)
    by_kind["Practitioner"] = [p for p in by_kind["Practitioner"]
                               if not {t.get("text") for t in p.get("type") or ()} & _SCH_PEOPLE]
    for participant in by_kind["Patient"][:1]:
        segments.append(reverser.segment("PID", "PID[Patient]", resolve(participant["actor"]["reference"]), resolve,
                                         set_id=1))
    segments.append(d.field.join(["RGS", "1", "A"]))
    if appointment.get("serviceType"):
        segments.append(reverser.segment("AIS", "AIS[Appointment]", appointment, resolve, set_id=1,
                                         extra={2: "A"}))
    for segment, segment_map, participants in (("AIP", "AIP[Appointment]", by_kind["Practitioner"]),
                                               ("AIL", "AIL[Appointment]", by_kind["Location"])):
        slot = next(r.target[0][1] for r in reverser.maps.segments[segment_map].rules if r.target[0][0] == "participant")
        for number, participant in enumerate(participants, start=1):
            alone = {"participant": [{}] * (slot - 1) + [participant]}
            segments.append(reverser.segment(segment, segment_map, alone, resolve, set_id=number, extra={2: "A"}))
    return "\r".join(segments) + "\r"
