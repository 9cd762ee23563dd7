"""v2 → FHIR maps as data: YAML files an analyst can read, and compiled once for the converter.

A map file has up to five sections, each keyed by name; a channel's own file (``fhir: {maps:
FILE}``) replaces the shipped maps of the same names and adds others:

- ``messages``: per message structure, which segment goes through which segment map into which
  resource (``resource: Patient`` names one resource per message, ``each: true`` one per segment),
  the references between them (``links``; ``"*"``: every resource the message makes, for a
  Provenance's ``target``), and values a resource takes when nothing set them
  (``defaults``);
- ``segments``: per segment map (the guide's names, ``PID[Patient]``), field rules;
- ``datatypes``: per data type map (``CX[Identifier]``), component rules; ``resource:`` makes the
  data type a resource of its own (``XCN[Practitioner]``), referenced where it is used;
- ``vocabulary``: concept maps, v2 code → FHIR code, display and system;
- ``systems``: v2 coding system names (HL7 table 0396, ``LN``) → FHIR system URIs.

A rule: ``{v2: PID-3, fhir: "identifier[2]", type: "CX[Identifier]"}``; ``type`` is a data type
map or a FHIR primitive (string, code, id, uri, date, dateTime, instant, time, decimal, integer,
positiveInt, unsignedInt, boolean); ``vocabulary`` a concept map; ``value`` a constant or a
template (``"{XTN.6} {XTN.7}"``) or ``$now``, the time of the conversion; ``repeats: false``
takes only a field's first repetition (a field the standard does not repeat, whatever a sender put
in it); ``back: false`` keeps a rule out of FHIR -> v2 (where several fields fill one list, the
one that takes it back); ``when`` a condition (``PID-7 longer than 8``, ``CWE.3 = HL70276``,
``PV1-45 not valued``, ``MSH-4 any valued`` (any component, where ``valued`` asks the first),
``OBX-2 in (ST, TX)``, ``PID-11 count > 1``; joined by ``and``).
In a target, ``name[n]`` is a list element: rules naming the same ``n`` fill the same element, and
each repetition of the source field (each segment, for resources merged from several) adds one.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

from hl7relay.yamlsource import ConfigError, Document, Mark, load_document

__all__ = ["MapSet", "MapError", "Rule", "Condition", "MessageRule", "MessageMap", "ElementMap",
           "load_maps", "default_maps", "PRIMITIVES", "MAPS_DIR", "ALL_RESOURCES", "NOW"]

MAPS_DIR = Path(__file__).with_name("maps")
ALL_RESOURCES = "*"  # a link to every resource the message makes (a Provenance's targets)
NOW = "$now"  # a value: the time of the conversion (a Provenance's recorded)
PRIMITIVES = frozenset({"string", "code", "id", "uri", "date", "dateTime", "instant", "time", "decimal",
                        "integer", "positiveInt", "unsignedInt", "boolean", "markdown", "system"})
_SECTIONS = ("messages", "segments", "datatypes", "vocabulary", "systems")
_RULE_KEYS = {"v2", "fhir", "type", "vocabulary", "value", "when", "note", "back", "repeats"}
_STEP = re.compile(r"^(?P<name>_?[A-Za-z][A-Za-z0-9]*|\$value|\$merge)(?:\[(?P<slot>[1-9][0-9]*)\])?$")
_SOURCE = re.compile(r"^(?P<segment>[A-Z][A-Z0-9]{2})(?:-(?P<field>[1-9][0-9]*))?$|"
                     r"^(?P<datatype>[A-Z]{2,3})(?:\.(?P<component>[1-9][0-9]*))?$")
_PATH = re.compile(r"^(?:(?P<segment>[A-Z][A-Z0-9]{2})-(?P<field>[1-9][0-9]*)|(?P<datatype>[A-Z]{2,3}))"
                   r"(?:\.(?P<component>[1-9][0-9]*))?(?:\.(?P<sub>[1-9][0-9]*))?$")
_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


class MapError(ValueError):
    """Map files with problems; ``problems`` are file:line:col errors."""

    def __init__(self, problems: list[ConfigError]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True, slots=True)
class ValuePath:
    """``PID-11.9`` (a field of the segment, a component) or ``CX.4`` (a component of the element)."""

    segment: str | None
    field: int  # 0: the element itself (data type paths)
    component: int
    sub: int
    text: str
    datatype: str | None = None


@dataclass(frozen=True, slots=True)
class Clause:
    path: ValuePath
    test: str  # valued (the first component), any_valued (any component), not_valued, eq, ne, in, not_in, longer, count_gt, count_eq
    values: tuple = ()


@dataclass(frozen=True, slots=True)
class Condition:
    clauses: tuple  # all must hold
    text: str


@dataclass(frozen=True, slots=True)
class Rule:
    source: str  # PID-3, CX.4, or a segment/data type name for the whole of it
    number: int  # the field or component (0: the whole)
    target: tuple  # ((name, slot or 0), ...)
    type: str  # "" (string), a primitive, or a data type map
    vocabulary: str
    value: str | None  # a constant or a template
    when: Condition | None
    mark: Mark
    # FHIR -> v2: None takes the rule back when it has no condition; False never (where several
    # fields fill one list); True even with its condition (the one of several alternatives)
    back: bool | None = None
    repeats: bool = True  # false: a field the standard does not repeat; a sender's "~" in it is not a second element
    many: bool = field(init=False, default=False, compare=False)  # takes every repetition (a list target)

    def __post_init__(self) -> None:
        object.__setattr__(self, "many", self.repeats and any(slot for _name, slot in self.target))


@dataclass(slots=True)
class ElementMap:
    """A segment map or a data type map: rules in order."""

    name: str
    rules: list
    resource: str = ""  # segment maps: the resource type; data type maps: set when it is a resource
    mark: Mark | None = None
    _by_number: dict | None = field(default=None, repr=False, compare=False)

    def by_number(self) -> dict[int, list]:
        """The rules by field (or component) number, each number's in their order; 0: the whole."""
        if self._by_number is None:
            index: dict[int, list] = {}
            for rule in self.rules:
                index.setdefault(rule.number, []).append(rule)
            self._by_number = index
        return self._by_number


@dataclass(frozen=True, slots=True)
class MessageRule:
    segment: str
    map: str  # "" for a rule that only links or sets defaults
    resource: str  # the resource's name in this message (Patient, Appointment...)
    each: bool  # one resource per segment
    when: Condition | None
    links: tuple  # ((target path, resource name, nearest: bool), ...)
    referenced_by: tuple  # ((resource name, target path), ...): that resource refers to this one
    defaults: tuple  # ((target path, value), ...)
    identity: tuple  # HL7 paths whose values identify the resource when it has no identifier
    mark: Mark


@dataclass(slots=True)
class MessageMap:
    name: str
    events: tuple  # MSH-9 types^events this structure serves, e.g. ("ADT^A01", "ADT^A04")
    rules: list
    measured_as: str  # the guide's message map it is measured against
    mark: Mark | None = None


@dataclass(slots=True)
class MapSet:
    messages: dict = field(default_factory=dict)
    segments: dict = field(default_factory=dict)
    datatypes: dict = field(default_factory=dict)
    vocabulary: dict = field(default_factory=dict)  # name -> {v2 code: (code, display, system)}
    systems: dict = field(default_factory=dict)  # v2 coding system name -> URI
    files: list = field(default_factory=list)

    def for_message(self, message_type: str, event: str, structure: str) -> MessageMap | None:
        if structure and structure in self.messages:
            return self.messages[structure]
        wanted = f"{message_type}^{event}"
        for message_map in self.messages.values():
            if wanted in message_map.events:
                return message_map
        return None

    def merged(self, other: "MapSet") -> "MapSet":
        return MapSet({**self.messages, **other.messages}, {**self.segments, **other.segments},
                      {**self.datatypes, **other.datatypes}, {**self.vocabulary, **other.vocabulary},
                      {**self.systems, **other.systems}, self.files + other.files)


# -- parsing the small languages ---------------------------------------------------------------
@functools.lru_cache(maxsize=2048)  # templates are read per value: each path parsed once
def parse_value_path(text: str) -> ValuePath | None:
    match = _PATH.match(text.strip())
    if match is None:
        return None
    return ValuePath(match["segment"], int(match["field"] or 0), int(match["component"] or 0),
                     int(match["sub"] or 0), text.strip(), match["datatype"])


def _values(text: str) -> tuple:
    inner = text.strip()
    if inner.startswith("(") and inner.endswith(")"):
        inner = inner[1:-1]
    return tuple(v.strip().strip('"') for v in inner.split(",") if v.strip())


_CLAUSE = re.compile(r"^(?P<path>\S+)\s+(?:(?P<valued>valued)|(?P<any_valued>any valued)|(?P<not_valued>not valued)|"
                     r"(?P<op>=|!=)\s*(?P<value>.+)|(?P<not_in>not in)\s+(?P<not_in_values>.+)|"
                     r"in\s+(?P<in_values>.+)|longer than\s+(?P<longer>[0-9]+)|"
                     r"count\s*(?P<count_op>[>=])\s*(?P<count>[0-9]+))$")


def parse_condition(text: str) -> tuple[Condition | None, str]:
    """A condition, or None and what is wrong with it."""
    clauses = []
    for part in re.split(r"\s+and\s+", text.strip()):
        match = _CLAUSE.match(part.strip())
        if match is None:
            return None, (f"cannot read condition {part.strip()!r} (PATH valued | any valued | not valued | = V | != V | "
                          f"in (A, B) | not in (A, B) | longer than N | count > N | count = N)")
        path = parse_value_path(match["path"])
        if path is None:
            return None, f"not a v2 path: {match['path']!r} (e.g. PID-7, PID-11.9, CWE.3)"
        if match["valued"]:
            clauses.append(Clause(path, "valued"))
        elif match["any_valued"]:
            clauses.append(Clause(path, "any_valued"))
        elif match["not_valued"]:
            clauses.append(Clause(path, "not_valued"))
        elif match["op"]:
            clauses.append(Clause(path, "eq" if match["op"] == "=" else "ne", (match["value"].strip().strip('"'),)))
        elif match["not_in"]:
            clauses.append(Clause(path, "not_in", _values(match["not_in_values"])))
        elif match["in_values"] is not None:
            clauses.append(Clause(path, "in", _values(match["in_values"])))
        elif match["longer"]:
            clauses.append(Clause(path, "longer", (int(match["longer"]),)))
        else:
            clauses.append(Clause(path, "count_gt" if match["count_op"] == ">" else "count_eq", (int(match["count"]),)))
    return Condition(tuple(clauses), text.strip()), ""


def parse_target(text: str) -> tuple | None:
    steps = []
    for part in text.split("."):
        match = _STEP.match(part)
        if match is None:
            return None
        steps.append((match["name"], int(match["slot"] or 0)))
    return tuple(steps)


# -- loading ----------------------------------------------------------------------------------
class _Loader:
    def __init__(self, doc: Document):
        self.doc = doc
        self.out = MapSet(files=[doc.file])

    def error(self, path: tuple, message: str, key: bool = False) -> None:
        self.doc.error(path, message, key)

    def mark(self, path: tuple) -> Mark:
        return self.doc.mark(path)

    def load(self) -> MapSet:
        data = self.doc.data
        if data is None:
            return self.out
        if not isinstance(data, dict):
            self.error((), "a map file is a mapping of sections: " + ", ".join(_SECTIONS))
            return self.out
        for section, value in data.items():
            if section not in _SECTIONS:
                self.error((section,), f"unknown section {section!r} ({', '.join(_SECTIONS)})", key=True)
                continue
            if not isinstance(value, dict):
                self.error((section,), f"{section}: a mapping of names")
                continue
            for name, body in value.items():
                getattr(self, "_" + section)(str(name), body, (section, name))
        return self.out

    def _when(self, item: dict, where: tuple) -> tuple:
        """(the rule's condition or None, whether it reads): a condition that does not is an error here."""
        if "when" not in item:
            return None, True
        when, problem = parse_condition(str(item["when"]))
        if when is None:
            self.error(where + ("when",), problem)
            return None, False
        return when, True

    def _rules(self, body, path: tuple, datatype: bool) -> list:
        rules: list[Rule] = []
        if not isinstance(body, list):
            self.error(path, "rules: a list of {v2, fhir, ...}")
            return rules
        for index, item in enumerate(body):
            where = path + (index,)
            if not isinstance(item, dict):
                self.error(where, "a rule is a mapping: {v2: PID-3, fhir: identifier[1], type: CX[Identifier]}")
                continue
            unknown = [k for k in item if k not in _RULE_KEYS]
            for key in unknown:
                self.error(where + (key,), f"unknown key {key!r} ({', '.join(sorted(_RULE_KEYS))})", key=True)
            source = str(item.get("v2", ""))
            match = _SOURCE.match(source)
            if match is None or (datatype and match["datatype"] is None) or (not datatype and match["segment"] is None):
                example = "CX.4" if datatype else "PID-3"
                self.error(where + ("v2",) if "v2" in item else where, f"v2: {source!r} is not a {'component' if datatype else 'field'} like {example}")
                continue
            number = int((match["component"] if datatype else match["field"]) or 0)
            target = parse_target(str(item.get("fhir", "")))
            if target is None:
                self.error(where + ("fhir",) if "fhir" in item else where,
                           f"fhir: {item.get('fhir')!r} is not a FHIR path like name[1].given[2]")
                continue
            type_name = str(item.get("type", "") or "")
            when, ok = self._when(item, where)
            if not ok:
                continue
            value = item.get("value")
            rules.append(Rule(source, number, target, type_name, str(item.get("vocabulary", "") or ""),
                              None if value is None else str(value), when, self.mark(where),
                              None if item.get("back") is None else bool(item.get("back")),
                              item.get("repeats", True) is not False))
        return rules

    def _segments(self, name: str, body, path: tuple) -> None:
        if not isinstance(body, dict) or "resource" not in body:
            self.error(path, f"segment map {name}: {{resource: TYPE, fields: [rules]}}")
            return
        for key in body:
            if key not in ("resource", "fields", "note"):
                self.error(path + (key,), f"unknown key {key!r} (resource, fields, note)", key=True)
        rules = self._rules(body.get("fields", []), path + ("fields",), datatype=False)
        self.out.segments[name] = ElementMap(name, rules, str(body["resource"]), self.mark(path))

    def _datatypes(self, name: str, body, path: tuple) -> None:
        if isinstance(body, list):
            body = {"components": body}
        if not isinstance(body, dict):
            self.error(path, f"data type map {name}: a list of rules, or {{resource: TYPE, components: [rules]}}")
            return
        for key in body:
            if key not in ("resource", "components", "note"):
                self.error(path + (key,), f"unknown key {key!r} (resource, components, note)", key=True)
        rules = self._rules(body.get("components", []), path + ("components",), datatype=True)
        self.out.datatypes[name] = ElementMap(name, rules, str(body.get("resource", "") or ""), self.mark(path))

    def _vocabulary(self, name: str, body, path: tuple) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("codes"), dict):
            self.error(path, f"vocabulary {name}: {{system: URI, codes: {{V2CODE: CODE or [CODE, DISPLAY]}}}}")
            return
        system = str(body.get("system", "") or "")
        codes = {}
        for code, target in body["codes"].items():
            if isinstance(target, list) and 1 <= len(target) <= 3:
                parts = [str(t) for t in target] + [""] * (3 - len(target))
                codes[str(code)] = (parts[0], parts[1], parts[2] or system)
            elif isinstance(target, (str, int, float, bool)):
                codes[str(code)] = (str(target), "", system)
            else:
                self.error(path + ("codes", code), "a code maps to CODE or [CODE, DISPLAY] or [CODE, DISPLAY, SYSTEM]")
        self.out.vocabulary[name] = codes

    def _systems(self, name: str, body, path: tuple) -> None:
        if not isinstance(body, str):
            self.error(path, f"systems: {name} maps to a URI")
            return
        self.out.systems[name] = body

    def _messages(self, name: str, body, path: tuple) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("segments"), list):
            self.error(path, f"message map {name}: {{events: [ADT^A01], segments: [rules]}}")
            return
        for key in body:
            if key not in ("events", "segments", "measured_as", "note"):
                self.error(path + (key,), f"unknown key {key!r} (events, segments, measured_as, note)", key=True)
        rules = []
        for index, item in enumerate(body["segments"]):
            where = path + ("segments", index)
            if not isinstance(item, dict) or "segment" not in item or "resource" not in item:
                self.error(where, "a message rule: {segment: PID, map: PID[Patient], resource: Patient}")
                continue
            allowed = {"segment", "map", "resource", "each", "when", "links", "referenced_by", "defaults",
                       "identity", "note"}
            for key in item:
                if key not in allowed:
                    self.error(where + (key,), f"unknown key {key!r} ({', '.join(sorted(allowed))})", key=True)
            when, ok = self._when(item, where)
            if not ok:
                continue
            links = []
            for target, spec in (item.get("links") or {}).items():
                also: dict = {}
                if isinstance(spec, dict):  # {resource: Patient, also: {status: accepted}}
                    also = spec.get("also") or {}
                    spec = spec.get("resource", "")
                spec = str(spec)
                resource, nearest = (spec[1:], True) if spec.startswith("~") else (spec, False)
                parsed = parse_target(str(target))
                if parsed is None or not resource or not isinstance(also, dict):
                    self.error(where + ("links", target), "a link: PATH: RESOURCE (~RESOURCE: the nearest before), "
                                                          "or PATH: {resource: R, also: {KEY: VALUE}}", key=True)
                    continue
                links.append((parsed, resource, nearest, tuple(also.items())))
            referenced = []
            for resource, target in (item.get("referenced_by") or {}).items():
                parsed = parse_target(str(target))
                if parsed is None:
                    self.error(where + ("referenced_by", resource), f"not a FHIR path: {target!r}")
                    continue
                referenced.append((str(resource), parsed))
            defaults = []
            for target, value in (item.get("defaults") or {}).items():
                parsed = parse_target(str(target))
                if parsed is None:
                    self.error(where + ("defaults", target), f"not a FHIR path: {target!r}", key=True)
                    continue
                defaults.append((parsed, value))
            identity = []
            for index2, text in enumerate(item.get("identity") or []):
                parsed_path = parse_value_path(str(text))
                if parsed_path is None:
                    self.error(where + ("identity", index2), f"not a v2 path: {text!r}")
                    continue
                identity.append(parsed_path)
            rules.append(MessageRule(str(item["segment"]), str(item.get("map", "") or ""), str(item["resource"]),
                                     bool(item.get("each", False)), when, tuple(links), tuple(referenced),
                                     tuple(defaults), tuple(identity), self.mark(where)))
        events = tuple(str(e) for e in body.get("events") or ())
        self.out.messages[name] = MessageMap(name, events, rules, str(body.get("measured_as", name)), self.mark(path))


def _check_references(maps: MapSet, problems: list) -> None:
    """Every map, data type and vocabulary a rule names exists (checked on the merged set)."""
    def check_rules(element_map: ElementMap) -> None:
        for rule in element_map.rules:
            if rule.type and rule.type not in PRIMITIVES and rule.type not in maps.datatypes:
                problems.append(ConfigError(rule.mark, f"{element_map.name}: unknown type {rule.type!r} "
                                                       "(a data type map or a FHIR primitive)"))
            if rule.vocabulary and rule.vocabulary not in maps.vocabulary:
                problems.append(ConfigError(rule.mark, f"{element_map.name}: unknown vocabulary {rule.vocabulary!r}"))
            for placeholder in _PLACEHOLDER.findall(rule.value or ""):
                if parse_value_path(placeholder) is None:
                    problems.append(ConfigError(rule.mark, f"{element_map.name}: not a v2 path in value: {{{placeholder}}}"))

    for element_map in list(maps.segments.values()) + list(maps.datatypes.values()):
        check_rules(element_map)
    for message_map in maps.messages.values():
        for rule in message_map.rules:
            if rule.map and rule.map not in maps.segments:
                problems.append(ConfigError(rule.mark, f"{message_map.name}: unknown segment map {rule.map!r}"))
            names = {r.resource for r in message_map.rules}
            for _target, resource, _nearest, _also in rule.links:
                if resource != ALL_RESOURCES and resource not in names:
                    problems.append(ConfigError(rule.mark, f"{message_map.name}: a link to {resource!r}, which no rule "
                                                           f"of the message makes ({', '.join(sorted(names))}, or "
                                                           f"{ALL_RESOURCES!r} for every resource)"))


def load_maps(path: str | Path, base: MapSet | None = None, display_name: str | None = None) -> MapSet:
    """A map file, on top of ``base`` (the shipped maps, unless given); MapError lists problems."""
    doc = load_document(path, environ={}, display_name=display_name)
    loaded = _Loader(doc).load() if not doc.errors else MapSet()
    problems = list(doc.errors)
    merged = (base if base is not None else MapSet()).merged(loaded)
    if not problems:
        _check_references(merged, problems)
    if problems:
        raise MapError(problems)
    return merged


_DEFAULT: MapSet | None = None


def default_maps() -> MapSet:
    """The shipped maps (``maps/*.yaml``), loaded once per process."""
    global _DEFAULT
    if _DEFAULT is None:
        maps = MapSet()
        for name in ("vocabulary.yaml", "datatypes.yaml", "segments.yaml", "messages.yaml"):
            maps = maps.merged(_load_part(MAPS_DIR / name))
        problems: list = []
        _check_references(maps, problems)
        if problems:
            raise MapError(problems)
        _DEFAULT = maps
    return _DEFAULT


def _load_part(path: Path) -> MapSet:
    doc = load_document(path, environ={})
    if doc.errors:
        raise MapError(list(doc.errors))
    loaded = _Loader(doc).load()
    if doc.errors:
        raise MapError(list(doc.errors))
    return loaded
