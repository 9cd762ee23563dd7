"""HL7 v2 → FHIR R4: a message through its message map into a Bundle, with no I/O.

Resource ids are deterministic (uuid5 of the type and the first identifier's system and value,
else of the message map's ``identity`` values, else of the resource's content), so the same
message twice gives the same resources; a transaction bundle updates by identifier
(``PUT Patient?identifier=system|value``) and references resolve through ``urn:uuid:`` full URLs.
A DTM without an offset takes the converter's time zone. Provenance resources say where the
resources came from (the message, by its sender and control id) and when they were made (the
converter's clock); they come last in the Bundle and name every resource as a target.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from hl7relay.errors import HL7RelayError
from hl7relay.fhir.maps import (
    _PLACEHOLDER, ALL_RESOURCES, NOW, Condition, ElementMap, MapSet, MessageMap, Rule, parse_value_path,
)
from hl7relay.hl7.escape import unescape
from hl7relay.hl7.message import HEADER_SEGMENTS, Message

__all__ = ["Converter", "Conversion", "ConversionError", "BUNDLE_TYPES", "resource_id"]

BUNDLE_TYPES = ("message", "transaction", "batch", "collection")
ORIGINAL_TEXT = "http://hl7.org/fhir/StructureDefinition/originalText"
_NAMESPACE = uuid.UUID("6b1f7c1e-6f0a-5d8e-9a53-6c7e1a2b7f10")  # hl7relay's: the ids are ours
_DTM = re.compile(r"^(?P<y>\d{4})(?P<m>\d{2})?(?P<d>\d{2})?(?P<H>\d{2})?(?P<M>\d{2})?(?P<S>\d{2})?"
                  r"(?:\.(?P<f>\d{1,4}))?(?P<z>[+-]\d{4})?$")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_V2_TABLE = re.compile(r"^HL7(\d{4})$")


class ConversionError(HL7RelayError):
    """The message cannot be converted: no message map for its type, or nothing came of it."""


@dataclass(slots=True)
class Conversion:
    bundle: dict
    problems: list = field(default_factory=list)  # what was left out, and why (unmapped codes, bad dates)

    def to_bytes(self) -> bytes:
        return json.dumps(self.bundle, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def resource_id(resource_type: str, *parts: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, "|".join((resource_type,) + parts)))


class _Slots(dict):
    """A list being built: element key (slot, segment, repetition) -> element."""


class _Node(dict):
    """An element being built (plain dicts and lists in it are finished values)."""


class _Element:
    """One value at a level of the encoding: 0 a repetition (components), 1 a component, 2 a leaf.
    Its parts are split once, when first asked for."""

    __slots__ = ("text", "level", "seps", "_parts")

    def __init__(self, text: str, level: int, seps: tuple):
        self.text, self.level, self.seps = text, level, seps
        self._parts: list | None = None

    def parts(self) -> list:
        parts = self._parts
        if parts is None:
            sep = self.seps[self.level] if self.level < 2 else None
            parts = self.text.split(sep) if sep and sep in self.text else [self.text]
            self._parts = parts
        return parts

    def raw(self, n: int) -> str:
        """Part ``n``'s text as it stands (escapes kept): "" when absent."""
        if self.level >= 2:
            return self.text if n == 1 else ""
        parts = self.parts()
        return parts[n - 1] if n <= len(parts) else ""

    def part(self, n: int) -> "_Element":
        if self.level >= 2:
            return self if n == 1 else _Element("", 2, self.seps)
        return _Element(self.raw(n), self.level + 1, self.seps)

    def leaf(self) -> str:
        text, level, seps = self.text, self.level, self.seps
        while level < 2 and text:
            sep = seps[level]
            if sep and sep in text:
                text = text.split(sep, 1)[0]
            level += 1
        return text


@dataclass(slots=True)
class _Resource:
    name: str
    type: str
    node: dict
    identity: list
    nearest_ids: list = field(default_factory=list)
    parents: list = field(default_factory=list)  # resources whose ids are part of this one's identity
    id: str = ""
    full_url: str = ""
    from_datatype: bool = False
    cited_by: set = field(default_factory=set)  # data type resources: the types of the resources naming them


class _Run:
    """One message's conversion."""

    def __init__(self, converter: "Converter", message: Message):
        self.converter = converter
        self.maps = converter.maps
        self.message = message
        d = message.delimiters
        self.rep_sep = d.repetition
        self.seps = (d.component, d.subcomponent)
        self.delimiters = d
        self.escape = d.escape
        self.codec = message.codec
        self.problems: list[str] = []
        self.original_time: str | None = None  # a DTM just read without an offset
        self.resources: list[_Resource] = []
        self.by_name: dict[str, list[_Resource]] = {}
        self.datatype_resources: dict[str, _Resource] = {}
        self.resource_type = ""  # of the resource whose segment map is being applied
        # the context of the rule being applied
        self.segment = ""
        self.fields: list = []
        self.field_number = 0
        self.repetition: _Element | None = None
        self.datatype = ""
        self.element: _Element | None = None
        self.field_cache: dict = {}  # (segment, number) -> (repetitions, count): the fields read while on one segment

    # -- values ---------------------------------------------------------------------------
    def text(self, element: _Element) -> str:
        value = element.text if element.level >= 2 else element.leaf()
        if self.escape and self.escape in value:
            return unescape(value, self.delimiters, self.codec)
        return value

    def _field(self, segment: str, number: int) -> tuple[list, int]:
        """The repetitions of a field (raw) of the current segment, else of the message's first one."""
        key = (segment, number)
        found = self.field_cache.get(key)
        if found is None:
            found = self.field_cache[key] = self._read_field(segment, number)
        return found

    def _read_field(self, segment: str, number: int) -> tuple[list, int]:
        if segment == self.segment:
            fields = self.fields
        else:
            names = self.message.segment_names()
            if segment not in names:
                return [], 0
            fields = self.message.fields(names.index(segment))
        raw = fields[number] if number < len(fields) else ""
        if segment in HEADER_SEGMENTS and number <= 2:
            return [raw], 1
        reps = [r for r in (raw.split(self.rep_sep) if self.rep_sep and raw else [raw] if raw else [])]
        return reps, sum(1 for r in reps if r)

    def resolve(self, path) -> tuple[_Element | None, int]:
        """A path's element in the current context and how many repetitions it has."""
        if path.segment is not None:
            if path.segment == self.segment and path.field == self.field_number and self.repetition is not None:
                element, count = self.repetition, len(self._field(path.segment, path.field)[0])
            else:
                reps, count = self._field(path.segment, path.field)
                element = _Element(reps[0] if reps else "", 0, self.seps)
        else:
            if self.element is None or path.datatype != self.datatype:
                return None, 0
            element, count = self.element, 1
        if path.component:
            element = element.part(path.component)
            if path.sub:
                element = element.part(path.sub)
        return element, count

    def holds(self, condition: Condition | None) -> bool:
        if condition is None:
            return True
        for clause in condition.clauses:
            element, count = self.resolve(clause.path)
            value = self.text(element) if element is not None else ""
            valued = bool(value) and value != '""'
            test = clause.test
            if test == "valued":
                ok = valued
            elif test == "not_valued":
                ok = not valued
            elif test == "eq":
                ok = value == clause.values[0]
            elif test == "ne":
                ok = value != clause.values[0]
            elif test == "in":
                ok = value in clause.values
            elif test == "not_in":
                ok = value not in clause.values
            elif test == "any_valued":  # any component or subcomponent: "^FAC^ISO" is valued
                raw = element.text if element is not None else ""
                ok = raw != '""' and any(c not in self.seps and c != self.rep_sep for c in raw)
            elif test == "longer":
                ok = len(element.leaf() if element is not None else "") > clause.values[0]
            elif test == "count_gt":
                ok = count > clause.values[0]
            else:
                ok = count == clause.values[0]
            if not ok:
                return False
        return True

    def template(self, text: str) -> str | None:
        if "{" not in text:
            return text
        empty = True

        def replace(match):
            nonlocal empty
            path = parse_value_path(match.group(1))
            element, _ = self.resolve(path)
            value = self.text(element) if element is not None else ""
            if value:
                empty = False
            return value

        out = _PLACEHOLDER.sub(replace, text)
        return None if empty else out

    # -- primitives -----------------------------------------------------------------------
    def primitive(self, kind: str, text: str, where: tuple):
        if not text or text == '""':
            return None
        if kind in ("", "string", "markdown", "uri"):
            return text
        if kind in ("code", "id"):
            return " ".join(text.split()) or None  # FHIR's code: no leading, trailing or double spaces
        if kind == "system":
            return self.system(text)
        if kind in ("date", "dateTime", "instant"):
            return self.when(kind, text, where)
        if kind == "time":
            digits = text.split("+")[0].split("-")[0]
            if not re.fullmatch(r"\d{2}(\d{2}(\d{2}(\.\d+)?)?)?", digits):
                self.problems.append(f"{_where(where)}: {text!r} is not a time (HHMM[SS])")
                return None
            return f"{digits[0:2]}:{digits[2:4] or '00'}:{digits[4:6] or '00'}"
        if kind == "decimal":
            if not _NUMBER.match(text.strip()):
                self.problems.append(f"{_where(where)}: {text!r} is not a number")
                return None
            number = float(text)
            return int(number) if number.is_integer() and "." not in text else number
        if kind in ("integer", "positiveInt", "unsignedInt"):
            try:
                number = int(text.strip())
            except ValueError:
                self.problems.append(f"{_where(where)}: {text!r} is not an integer")
                return None
            if (kind == "positiveInt" and number < 1) or (kind == "unsignedInt" and number < 0):
                self.problems.append(f"{_where(where)}: {number} is not a {kind}")
                return None
            return number
        if kind == "boolean":
            flag = {"Y": True, "N": False, "true": True, "false": False}.get(text.strip())
            if flag is None:
                self.problems.append(f"{_where(where)}: {text!r} is not Y or N")
            return flag
        return text

    def system(self, name: str) -> str:
        known = self.maps.systems.get(name)
        if known:
            return known
        table = _V2_TABLE.match(name)
        if table:
            return f"http://terminology.hl7.org/CodeSystem/v2-{table.group(1)}"
        return name

    def when(self, kind: str, text: str, where: tuple):
        match = _DTM.match(text.strip())
        if match is None:
            self.problems.append(f"{_where(where)}: {text!r} is not an HL7 date/time (YYYY[MM[DD[HHMM[SS[.S]]]]][+/-ZZZZ])")
            return None
        y, m, d, hour = match["y"], match["m"], match["d"], match["H"]
        try:
            datetime.date(int(y), int(m or 1), int(d or 1))
        except ValueError:
            self.problems.append(f"{_where(where)}: {text!r} is not a date")
            return None
        if kind == "date" or hour is None:
            if kind == "instant":
                self.problems.append(f"{_where(where)}: {text!r} has no time of day")
                return None
            return "-".join(p for p in (y, m, d) if p)
        if m is None or d is None:
            return y
        minute, second, fraction = match["M"] or "00", match["S"] or "00", match["f"]
        try:
            moment = datetime.datetime(int(y), int(m), int(d), int(hour), int(minute), int(second))
        except ValueError:
            self.problems.append(f"{_where(where)}: {text!r} is not a time of day")
            return None
        offset = match["z"]
        if offset is None:
            self.original_time = text  # kept beside the value: the offset is the channel's assumption
            zone_offset = self.converter.zone.utcoffset(moment) or datetime.timedelta(0)
            total = int(zone_offset.total_seconds() // 60)
            sign = "+" if total >= 0 else "-"
            offset = f"{sign}{abs(total) // 60:02d}{abs(total) % 60:02d}"
        if match["S"] is None:
            self.original_time = text  # FHIR needs the seconds: the sender's precision is kept beside
        stamp = f"{y}-{m}-{d}T{hour}:{minute}:{second}" + (f".{fraction}" if fraction else "")
        return f"{stamp}{offset[:3]}:{offset[3:]}"

    # -- building -------------------------------------------------------------------------
    def produce(self, rule: Rule, element: _Element, where: tuple):
        if rule.value == NOW:
            value = self.converter.now()
        elif rule.value is not None:
            text = self.template(rule.value)
            if text is None:
                return None
            value = self.primitive(rule.type if rule.type in _PRIMITIVE_KINDS else "", text, where)
        elif rule.type and rule.type in self.maps.datatypes:
            value = self.datatype_value(self.maps.datatypes[rule.type], element, where)
        else:
            value = self.primitive(rule.type, self.text(element), where)
        if value is not None and rule.vocabulary:
            value = self.translate(rule.vocabulary, element, value, where)
        return value

    def translate(self, vocabulary: str, element: _Element, value, where: tuple):
        code = self.text(element.part(1) if element.level < 2 else element)
        mapped = self.maps.vocabulary[vocabulary].get(code)
        if isinstance(value, dict):
            if mapped is None:
                return value  # the v2 coding stays; the concept map has no FHIR code for it
            coding = {k: v for k, v in (("system", mapped[2]), ("code", mapped[0]), ("display", mapped[1])) if v}
            if "coding" in value:  # CodeableConcept: the FHIR code first, the v2 one kept after it
                value["coding"] = [coding] + [c for c in value["coding"] if c.get("code") != mapped[0]]
                return value
            return {**value, **coding}
        if mapped is None:
            self.problems.append(f"{_where(where)}: code {code!r} is not in {vocabulary}; left out")
            return None
        return mapped[0]

    def datatype_value(self, element_map: ElementMap, element: _Element, where: tuple):
        saved = (self.datatype, self.element)
        self.datatype, self.element = _short_name(element_map.name), element
        node = _Node()
        try:
            leaf = element.level >= 2
            parts = [element.text] if leaf else element.parts()
            level, seps = element.level + 1, element.seps
            index = element_map.by_number()
            present = [(0, element)] if 0 in index else []
            present += [(n, element if leaf else _Element(text, level, seps)) for n, text in enumerate(parts, start=1)
                        if text and text != '""' and n in index]
            for number, part in present:
                for rule in index[number]:
                    if rule.when is not None and not self.holds(rule.when):
                        continue
                    value = self.produce(rule, part, (*where, number) if number else where)
                    if value is not None:
                        _write(node, rule.target, value, ())
                        if self.original_time is not None and rule.target[-1][0] != "$value":
                            self.keep_original(node, rule.target, ())
        finally:
            self.datatype, self.element = saved
        value = _finish(node)
        if value is None:
            return None
        if isinstance(value, dict) and "$value" in value:
            return value["$value"]
        if element_map.resource:
            return {"reference": self.datatype_resource(element_map.resource, value).full_url}
        return value

    def datatype_resource(self, resource_type: str, content: dict) -> _Resource:
        content = {"resourceType": resource_type, **content}
        rid = _identified(resource_type, content) or resource_id(resource_type, _canonical(content))
        found = self.datatype_resources.get(rid)
        if found is not None:  # the same one named twice (SCH-12 and AIP-3): what each said, together
            _merge_into(found.node, content)
        if found is None:
            found = _Resource(resource_type, resource_type, content, [], id=rid, full_url=f"urn:uuid:{rid}",
                              from_datatype=True)
            self.datatype_resources[rid] = found
            self.resources.append(found)
        found.cited_by.add(self.resource_type)
        return found

    def apply_segment(self, segment_map: ElementMap, node: dict, occurrence: int) -> None:
        """The segment map's rules on the fields the segment has (a field it lacks costs nothing)."""
        fields = self.fields
        index = segment_map.by_number()
        whole = index.get(0)
        if whole:
            self._apply(whole, node, occurrence, 0, [(0, _Element("", 0, self.seps))])
        for number in range(1, len(fields)):
            rules = index.get(number)
            if rules is None or not fields[number]:
                continue
            repetitions, _ = self._field(self.segment, number)
            elements = [(i, _Element(raw, 0, self.seps)) for i, raw in enumerate(repetitions) if raw and raw != '""']
            if elements:
                self._apply(rules, node, occurrence, number, elements)

    def _apply(self, rules: list, node: dict, occurrence: int, number: int, elements: list) -> None:
        where = (self.segment, number)
        self.field_number = number
        try:
            for rule in rules:
                # a list target takes each repetition; anything else the first (when it is valued)
                for index, element in (elements if rule.many else elements[:1] if elements[0][0] == 0 else ()):
                    self.repetition = element if number else None
                    if rule.when is not None and not self.holds(rule.when):
                        continue
                    self.original_time = None
                    value = self.produce(rule, element, where)
                    if value is not None:
                        _write(node, rule.target, value, (occurrence, index))
                        if self.original_time is not None:
                            self.keep_original(node, rule.target, (occurrence, index))
        finally:
            self.field_number, self.repetition = 0, None

    def keep_original(self, node: dict, target: tuple, key: tuple) -> None:
        """A time given without an offset keeps its HL7 text beside the FHIR value (which carries
        the channel's zone), so what the sender said is never lost to an assumption."""
        original, self.original_time = self.original_time, None
        name, slot = target[-1]
        if slot or any(step.startswith("_") or step == "extension" for step, _ in target):
            return  # an extension's value carries no extension of its own
        _write(node, target[:-1] + ((f"_{name}", 0),),
               {"extension": [{"url": ORIGINAL_TEXT, "valueString": original}]}, key)

    def run(self, message_map: MessageMap) -> list[_Resource]:
        names = self.message.segment_names()
        counts: dict[str, int] = {}
        bundle_node = _Node()
        for position, name in enumerate(names):
            rules = [r for r in message_map.rules if r.segment == name]
            if not rules:
                continue
            occurrence = counts.get(name, 0)
            counts[name] = occurrence + 1
            self.segment, self.fields = name, self.message.fields(position)
            self.field_cache = {}
            for rule in rules:
                if not self.holds(rule.when):
                    continue
                node: dict
                if rule.resource == "Bundle":
                    resource = None
                    node = bundle_node
                else:
                    resource = self.resource_for(rule)
                    node = resource.node
                if rule.map:
                    self.resource_type = resource.type if resource is not None else "Bundle"
                    self.apply_segment(self.maps.segments[rule.map], node, occurrence)
                if resource is None:
                    continue
                for path in rule.identity:
                    element, _ = self.resolve(path)
                    resource.identity.append(self.text(element) if element is not None else "")
                for target, link_name, nearest, also in rule.links:
                    if nearest:
                        earlier = self.by_name.get(link_name)
                        if earlier:
                            resource.nearest_ids.append((target, earlier[-1], also))
                    elif not any(t == target for t, *_ in resource.nearest_ids):
                        resource.nearest_ids.append((target, link_name, also))
                for by_name, target in rule.referenced_by:
                    earlier = self.by_name.get(by_name)
                    if earlier:
                        earlier[-1].nearest_ids.append((target, resource, ()))
                        resource.parents.append(earlier[-1])
                for target, value in rule.defaults:
                    if not _has(node, target):
                        _write(node, target, value, ())
        self.segment, self.fields, self.field_cache = "", [], {}
        self.bundle_fields: dict = _finish(bundle_node) or {}
        return self.resources

    def resource_for(self, rule) -> _Resource:
        existing = self.by_name.get(rule.resource)
        if existing and not rule.each:
            return existing[0]
        resource_type = self.maps.segments[rule.map].resource if rule.map else rule.resource
        resource = _Resource(rule.resource, resource_type, _Node(), [])
        self.by_name.setdefault(rule.resource, []).append(resource)
        self.resources.append(resource)
        return resource


_ABOUT_THE_MESSAGE = frozenset({"MessageHeader", "Provenance"})  # not what the message is about: never a target or focus
_PRIMITIVE_KINDS = frozenset({"string", "code", "id", "uri", "date", "dateTime", "instant", "time", "decimal",
                              "integer", "positiveInt", "unsignedInt", "boolean", "markdown", "system"})


def _where(where: tuple) -> str:
    """("PID", 11, 9) -> "PID-11.9": said only when there is a problem to say."""
    segment, number, *parts = where
    return segment + (f"-{number}" if number else "") + "".join(f".{n}" for n in parts)


@functools.lru_cache(maxsize=512)
def _short_name(map_name: str) -> str:
    return map_name.split("[", 1)[0]


def _write(node: dict, target: tuple, value, key: tuple) -> None:
    if target[0][0] == "$merge":  # the value's parts into this element (FN inside XPN)
        if isinstance(value, dict):
            _put({"": node}, "", value)
        return
    first_list = True
    for depth, (name, slot) in enumerate(target):
        last = depth == len(target) - 1
        if slot:
            slots = node.get(name)
            if not isinstance(slots, _Slots):
                # a finished list (from a data type) keeps its items, in front
                slots = _Slots({(0, i): item for i, item in enumerate(slots)}) if isinstance(slots, list) else _Slots()
                node[name] = slots
            element_key = (slot,) + (key if first_list else ())
            first_list = False
            if last:
                _put(slots, element_key, value)
                return
            child = slots.get(element_key)
            if not isinstance(child, _Node):
                child = _Node(child) if isinstance(child, dict) else _Node()  # a finished element opened again
                slots[element_key] = child
            node = child
        else:
            if last:
                _put(node, name, value)
                return
            child = node.get(name)
            if not isinstance(child, _Node):
                child = _Node(child) if isinstance(child, dict) else _Node()
                node[name] = child
            node = child


def _put(container: dict, key, value) -> None:
    existing = container.get(key)
    if isinstance(existing, dict) and isinstance(value, dict):
        if not isinstance(existing, _Node):
            existing = _Node(existing)
            container[key] = existing
        for k, v in value.items():
            _put(existing, k, v)
    else:
        container[key] = value


def _has(node: dict, target: tuple) -> bool:
    for name, slot in target:
        child = node.get(name)
        if slot:
            if not isinstance(child, _Slots) or (slot,) not in child:
                return False
            child = child[(slot,)]
        if child is None:
            return False
        node = child
    return True


def _finish(value):
    """Slots to lists in key order; empty values and extensions without a value left out."""
    if isinstance(value, _Slots):
        items = [_finish(value[k]) for k in sorted(value)]
        items = [i for i in items if i is not None]
        return items or None
    if isinstance(value, _Node):
        out = {}
        for k, v in value.items():
            done = _finish(v)
            if done is not None:
                out[k] = done
        if not out or (len(out) == 1 and "url" in out):
            return None
        return out
    if value == "" or value is None:
        return None
    return value  # a primitive, or a value finished where it was made


def _merge_into(kept: dict, more: dict) -> None:
    """``more``'s values where ``kept`` has none; lists merged item by item (same position)."""
    for key, value in more.items():
        mine = kept.get(key)
        if mine is None:
            kept[key] = value
        elif isinstance(mine, dict) and isinstance(value, dict):
            _merge_into(mine, value)
        elif isinstance(mine, list) and isinstance(value, list):
            for index, item in enumerate(value):
                if index >= len(mine):
                    mine.append(item)
                elif isinstance(mine[index], dict) and isinstance(item, dict):
                    _merge_into(mine[index], item)


def _canonical(content) -> str:
    return json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _first_identifier(content: dict) -> dict | None:
    for identifier in content.get("identifier") or ():
        if isinstance(identifier, dict) and identifier.get("value"):
            return identifier
    return None


def _identified(resource_type: str, content: dict) -> str:
    identifier = _first_identifier(content)
    if identifier is None:
        return ""
    return resource_id(resource_type, identifier.get("system", ""), identifier["value"])


class Converter:
    """Compiled once per channel: the maps, the bundle type, the time zone."""

    def __init__(self, maps: MapSet, *, bundle: str = "message", timezone: str = "UTC", map_name: str = "",
                 clock: Callable[[], float] = time.time):
        if bundle not in BUNDLE_TYPES:
            raise ValueError(f"bundle: {bundle!r} is not one of {', '.join(BUNDLE_TYPES)}")
        try:
            self.zone = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"timezone: {timezone!r} is not a time zone (e.g. Europe/London, UTC)") from exc
        if map_name and map_name not in maps.messages:
            raise ValueError(f"map: no message map {map_name!r} ({', '.join(sorted(maps.messages))})")
        self.maps, self.bundle_type, self.map_name, self.clock = maps, bundle, map_name, clock

    def now(self) -> str:
        """The time of the conversion, an instant in the converter's zone (seconds: FHIR's instant)."""
        moment = datetime.datetime.fromtimestamp(int(self.clock()), self.zone)
        return moment.isoformat()

    def message_map(self, message: Message) -> MessageMap:
        if self.map_name:
            return self.maps.messages[self.map_name]
        found = self.maps.for_message(message.msh(9, 1), message.msh(9, 2), message.msh(9, 3))
        if found is None:
            kind = "^".join(p for p in (message.msh(9, 1), message.msh(9, 2)) if p)
            raise ConversionError(f"no FHIR map for {kind or 'this message'} (maps: {', '.join(sorted(self.maps.messages))})")
        return found

    def convert(self, message: Message) -> Conversion:
        message_map = self.message_map(message)
        run = _Run(self, message)
        resources = run.run(message_map)
        for resource in resources:
            if resource.from_datatype:
                continue
            content = _finish(resource.node) or {}
            if resource.type == "Provenance":
                _agents_with_who(content)
            resource.node = {"resourceType": resource.type, **content}
        for resource in resources:  # ids in creation order: a nearest link's target has its id already
            if resource.from_datatype:
                continue
            rid = _identified(resource.type, resource.node)
            if not rid and resource.identity and any(resource.identity):
                parents = [t.id for _, t, _ in resource.nearest_ids if isinstance(t, _Resource) and t.id]
                parents += [p.id for p in resource.parents if p.id]
                # two resources of one type from the same fields (the Provenances) differ by their names
                named = (resource.name,) if resource.name != resource.type else ()
                rid = resource_id(resource.type, *named, *parents, *resource.identity)
            resource.id = rid or resource_id(resource.type, _canonical(resource.node))
            resource.full_url = f"urn:uuid:{resource.id}"
        made = [r for r in resources if not r.from_datatype and r.type not in _ABOUT_THE_MESSAGE]
        for resource in resources:
            for target, linked, also in resource.nearest_ids:
                if linked == ALL_RESOURCES:
                    for each in made:
                        _link(resource.node, target, each.full_url, also)
                    continue
                if isinstance(linked, str):
                    found = run.by_name.get(linked)
                    if not found:
                        continue
                    linked = found[0]
                _link(resource.node, target, linked.full_url, also)
        if not made:
            raise ConversionError("nothing in the message maps to a FHIR resource")
        return Conversion(self.bundle(message, run, resources), run.problems)

    def bundle(self, message: Message, run: _Run, resources: list) -> dict:
        entries = []
        headers = [r for r in resources if r.type == "MessageHeader"]
        if self.bundle_type == "message":
            for header in headers:
                header.node["focus"] = [{"reference": r.full_url} for r in resources
                                        if not r.from_datatype and r.type not in _ABOUT_THE_MESSAGE][:1]
        # what the message is about first, then what those resources refer to (organizations,
        # practitioners, locations), then the Provenances, which are about everything before them
        ordered = (headers if self.bundle_type == "message" else []) + \
            [r for r in resources if r.type not in _ABOUT_THE_MESSAGE and not r.from_datatype] + \
            [r for r in resources if r.from_datatype] + [r for r in resources if r.type == "Provenance"]
        if self.bundle_type != "message":  # the header's own organizations go with it
            ordered = [r for r in ordered if not r.from_datatype or r.cited_by - {"MessageHeader"}]
        for resource in ordered:
            entry = {"fullUrl": resource.full_url}
            body = dict(resource.node)
            if self.bundle_type in ("transaction", "batch"):
                identifier = _first_identifier(body) if not resource.from_datatype or "identifier" in body else None
                if identifier is not None and identifier.get("system"):
                    search = quote(f"{identifier['system']}|{identifier['value']}", safe="")
                    entry["request"] = {"method": "PUT", "url": f"{resource.type}?identifier={search}"}
                else:
                    body = {"resourceType": body["resourceType"], "id": resource.id,
                            **{k: v for k, v in body.items() if k != "resourceType"}}
                    entry["request"] = {"method": "PUT", "url": f"{resource.type}/{resource.id}"}
            else:
                body = {"resourceType": body["resourceType"], "id": resource.id,
                        **{k: v for k, v in body.items() if k != "resourceType"}}
            entry["resource"] = body
            entries.append(entry)
        bundle: dict = {"resourceType": "Bundle",
                  "id": resource_id("Bundle", message.msh(3, 1), message.msh(4, 1), message.control_id),
                  "type": self.bundle_type}
        fields = dict(run.bundle_fields)
        fields.pop("type", None)
        if self.bundle_type in ("transaction", "batch"):  # a transaction's time is the server's
            fields.pop("timestamp", None)
        bundle.update(fields)
        bundle["entry"] = entries
        return bundle


_UNKNOWN_AGENT = {"who": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                                         "valueCode": "unknown"}]}}


def _agents_with_who(content: dict) -> None:
    """R4: a Provenance agent is its ``who`` (required): an agent whose who came to nothing (an
    MSH-4 of "&A") is left out, and a Provenance with none left has an unknown one."""
    agents = [a for a in content.get("agent") or () if isinstance(a, dict) and a.get("who")]
    content["agent"] = agents or [dict(_UNKNOWN_AGENT)]


def _link(node: dict, target: tuple, reference: str, also: tuple = ()) -> None:
    """Write a reference: a list step on the way (``participant[1].actor``) appends a new element
    (with the ``also`` values beside the reference); a list at the end (``result[1]``) appends."""
    *path, (name, slot) = target
    holder = node
    for step, step_slot in path:
        child = node.get(step)
        if step_slot:
            items = child if isinstance(child, list) else []
            child = {}
            items.append(child)
            node[step] = items
        elif not isinstance(child, dict):
            child = {}
            node[step] = child
        node = child
    if slot:
        existing = node.get(name)
        references = existing if isinstance(existing, list) else []
        references.append({"reference": reference})
        node[name] = references
    else:
        node[name] = {"reference": reference}
    if also and node is not holder:
        node.update(dict(also))
