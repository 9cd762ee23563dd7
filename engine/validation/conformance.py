"""Conformance profiles: the rules an interface specifies on top of the base standard.

Real interfaces are specified by a profile (US ELR 2.5.1, PHLIP, a PMS vendor's spec): fields the
base makes optional are required, some are forbidden, values come from a value set, lengths are
tighter, a segment must appear a given number of times. A profile is a YAML file, checked like a
channel file (every problem as ``file:line:col``)::

    profile: us-elr-lab-results          # its name
    description: what it is for
    version: "2.5.1"                     # optional: messages must declare this MSH-12
    messages:
      "ORU^R01":                         # TYPE^EVENT, TYPE (any event) or "*" (every message)
        segments:
          OBR: {min: 1}                  # times the segment appears in the message
          NTE: {max: 0}                  # max 0: not allowed
        fields:
          MSH-21: {required: true, values: ["PHLabReport-NoAck^HL7^2.16.840.1.113883.9.11^ISO"]}
          PID-8: {value_set: value_sets/administrative_sex.txt}   # one value per line, # comments
          PID-5.1: {max_length: 50}
          PID-19: {forbidden: true}
          OBX-2: {values: [NM, ST, CWE], severity: warning}

A field rule applies to every occurrence of its segment and every repetition of the field (a path
naming a repetition or occurrence narrows it). ``required`` asks for a value in each occurrence of
a present segment (and, for a component, in each repetition of the field that is there). Beyond
those, what real guides state::

    msh_21: ["PHLabReport-NoAck"]          # applies only to messages whose MSH-21 names one of these
    messages:
      "ORU^R01":
        fields:
          OBX-1: {sequence: true}         # 1, 2, 3... in the order of the segments
          OBX-11: {values: [f, c], ignore_case: true}
          PID-7: {pattern: "^\\d{8}"}       # a regular expression the value must match
        unique:
          - [OBX-3, OBX-4]                # no two OBX with the same OBX-3 and OBX-4
        conditions:                       # when ... then ..., within each segment when both are in it
          - when: {OBX-2: [NM, SN]}       # values, or present / absent
            then: {required: [OBX-6]}     # required, forbidden, values ({PATH: [...]}), pattern ({PATH: RE})

Paths are checked against the profile's version at lint time (a segment the version does not
have, a field or component beyond its definition). Findings use the HL7 table 0357 codes of the
base checks (100 segment, 101 required, 102 forbidden, 103 value, 104 length) and say the
profile's name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from hl7relay.outcomes import ErrorCode, Severity
from hl7relay.spec import did_you_mean
from hl7relay.yamlsource import ConfigError, Document, load_document, read_config_text
from hl7relay.errors import PathError
from hl7relay.hl7.message import HEADER_SEGMENTS, Message
from hl7relay.hl7.path import Path as HL7Path, parse_path
from hl7relay.validation.profile import ACCEPTED_VERSIONS
from hl7relay.validation.validator import Finding, as_written

__all__ = ["ConformanceProfile", "ProfileSet", "load_conformance_profile", "is_profile_file"]

_TOP_KEYS = ["profile", "description", "version", "msh_21", "messages"]
_MESSAGE_KEYS = ["segments", "fields", "unique", "conditions"]
_SEGMENT_KEYS = ["min", "max", "severity"]
_FIELD_KEYS = ["required", "forbidden", "values", "value_set", "ignore_case", "pattern", "sequence", "max_length", "severity"]
_CONDITION_KEYS = ["when", "then", "severity"]
_THEN_KEYS = ["required", "forbidden", "values", "pattern"]
_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")
_MESSAGE_KEY = re.compile(r"\*|[A-Z0-9]{3}(\^[A-Z0-9]{3})?")


def is_profile_file(path) -> bool:
    """A YAML file whose top level says ``profile:`` (how lint tells profiles from channels)."""
    try:
        text = read_config_text(path, errors="replace")
    except OSError:
        return False
    return re.search(r"^profile\s*:", text, re.MULTILINE) is not None


@dataclass(slots=True)
class SegmentRule:
    segment: str
    min: int = 0
    max: int | None = None
    severity: Severity = Severity.ERROR


@dataclass(slots=True)
class FieldRule:
    path: HL7Path
    text: str  # the path as written
    required: bool = False
    forbidden: bool = False
    values: frozenset | None = None
    ignore_case: bool = False  # values compared without case (values are kept upper-cased then)
    pattern: re.Pattern | None = None
    sequence: bool = False  # 1, 2, 3... over the segment's occurrences
    max_length: int | None = None
    severity: Severity = Severity.ERROR


@dataclass(slots=True)
class UniqueRule:
    paths: tuple  # of (HL7Path, text), all in one segment
    severity: Severity = Severity.ERROR


@dataclass(slots=True)
class ConditionRule:
    when: tuple  # of (HL7Path, text, frozenset of values | "present" | "absent")
    required: tuple = ()  # of (HL7Path, text)
    forbidden: tuple = ()
    values: tuple = ()  # of (HL7Path, text, frozenset)
    patterns: tuple = ()  # of (HL7Path, text, re.Pattern)
    severity: Severity = Severity.ERROR


@dataclass(slots=True)
class MessageRules:
    key: str  # TYPE^EVENT, TYPE or *
    segments: list = field(default_factory=list)
    fields: list = field(default_factory=list)
    unique: list = field(default_factory=list)
    conditions: list = field(default_factory=list)


@dataclass(slots=True)
class ConformanceProfile:
    name: str
    file: str
    version: str | None = None
    description: str = ""
    messages: list = field(default_factory=list)  # MessageRules
    msh_21: frozenset = frozenset()  # profile identifiers (MSH-21.1) it applies to; empty: every message

    def applies_to(self, message: Message) -> bool:
        """Whether the message names this profile in MSH-21 (any repetition), when the profile says
        which identifiers it is for; else always."""
        if not self.msh_21:
            return True
        return any(message.get(HL7Path("MSH", 1, 21, r, 1, None)).strip() in self.msh_21
                   for r in range(1, _repetition_count(message, 0, 21) + 1))

    def rules_for(self, message: Message) -> list[MessageRules]:
        kind, event = message.get("MSH-9.1").strip(), message.get("MSH-9.2").strip()
        keys = {"*", kind, f"{kind}^{event}"}
        return [rules for rules in self.messages if rules.key in keys]

    def check(self, message: Message) -> list[Finding]:
        """What the profile finds in ``message`` (the base standard is checked apart)."""
        findings: list[Finding] = []
        name = self.name
        if not self.applies_to(message):
            return findings
        if self.version and message.get("MSH-12.1").strip() != self.version:
            findings.append(Finding(Severity.ERROR, ErrorCode.UNSUPPORTED_VERSION_ID,
                                    f"profile {name}: MSH-12 must be {self.version}, not {message.get('MSH-12.1')!r}",
                                    "MSH", 1, 1, 12))
        rules = self.rules_for(message)
        if not rules:
            return findings
        names = message.segment_names()
        positions: dict[str, list[int]] = {}
        for position, segment in enumerate(names):
            positions.setdefault(segment, []).append(position)
        for group in rules:
            for rule in group.segments:
                count = len(positions.get(rule.segment, ()))
                if count < rule.min:
                    findings.append(Finding(rule.severity, ErrorCode.SEGMENT_SEQUENCE_ERROR,
                                            f"profile {name}: {rule.segment} must appear at least {rule.min} time"
                                            f"{'s' * (rule.min != 1)}; it appears {count}", rule.segment))
                elif rule.max is not None and count > rule.max:
                    what = "is not allowed" if rule.max == 0 else f"may appear at most {rule.max} time{'s' * (rule.max != 1)}"
                    first = positions[rule.segment][rule.max]
                    findings.append(Finding(rule.severity, ErrorCode.SEGMENT_SEQUENCE_ERROR,
                                            f"profile {name}: {rule.segment} {what}; it appears {count}",
                                            rule.segment, first + 1, rule.max + 1))
            for rule in group.fields:
                self._check_field(message, rule, positions.get(rule.path.segment, ()), findings)
            for unique in group.unique:
                self._check_unique(message, unique, positions.get(unique.paths[0][0].segment, ()), findings)
            for condition in group.conditions:
                self._check_condition(message, condition, positions, findings)
        return findings

    def _check_unique(self, message: Message, rule: UniqueRule, positions, findings: list) -> None:
        seen: dict[tuple, int] = {}
        texts = " + ".join(text for _, text in rule.paths)
        for occurrence, position in enumerate(positions, start=1):
            key = tuple(message.get(p._replace(occurrence=occurrence)) for p, _ in rule.paths)
            if not any(key):
                continue
            if key in seen:
                segment = rule.paths[0][0].segment
                findings.append(Finding(rule.severity, ErrorCode.DATA_TYPE_ERROR,
                                        f"profile {self.name}: {texts} repeats {segment} {seen[key]}'s "
                                        f"({' + '.join(as_written(v) for v in key)})", segment, position + 1, occurrence,
                                        rule.paths[0][0].field))
            else:
                seen[key] = occurrence

    def _check_condition(self, message: Message, rule: ConditionRule, positions: dict, findings: list) -> None:
        segments = {p.segment for p, *_ in rule.when} | {p.segment for p, *_ in (*rule.required, *rule.forbidden,
                                                                                    *rule.values, *rule.patterns)}
        # one segment on both sides: the condition holds or not in each occurrence of it
        occurrences = range(1, len(positions.get(next(iter(segments)), ())) + 1) if len(segments) == 1 else [None]
        for occurrence in occurrences:
            def at(p: HL7Path, occurrence=occurrence) -> HL7Path:
                return p._replace(occurrence=occurrence) if occurrence is not None else p

            if not all(_holds(message.get(at(p)), expected) for p, _, expected in rule.when):
                continue
            because = " and ".join(_condition_text(text, expected) for _, text, expected in rule.when)
            for p, text in rule.required:
                value = message.get(at(p))
                if not value or value == '""':
                    findings.append(self._at(message, at(p), rule.severity, ErrorCode.REQUIRED_FIELD_MISSING,
                                             f"{text} is required when {because}"))
            for p, text in rule.forbidden:
                value = message.get(at(p))
                if value and value != '""':
                    findings.append(self._at(message, at(p), rule.severity, ErrorCode.DATA_TYPE_ERROR,
                                             f"{text} must be empty when {because}"))
            for p, text, allowed in rule.values:
                value = message.get(at(p))
                if value and value not in allowed:
                    findings.append(self._at(message, at(p), rule.severity, ErrorCode.TABLE_VALUE_NOT_FOUND,
                                             f"{as_written(value[:40])} is not an allowed value of {text} when {because}"))
            for p, text, pattern in rule.patterns:
                value = message.get(at(p))
                if value and not pattern.search(value):
                    findings.append(self._at(message, at(p), rule.severity, ErrorCode.DATA_TYPE_ERROR,
                                             f"{text} {as_written(value[:40])} does not match {pattern.pattern!r} when {because}"))

    def _at(self, message: Message, p: HL7Path, severity: Severity, code: ErrorCode, text: str) -> Finding:
        names = message.segment_names()
        positions = [i for i, n in enumerate(names) if n == p.segment]
        position = positions[p.occurrence - 1] + 1 if p.occurrence <= len(positions) else None
        return Finding(severity, code, f"profile {self.name}: {text}", p.segment, position, p.occurrence if position else None,
                       p.field, p.repetition, p.component, p.subcomponent)

    def _check_field(self, message: Message, rule: FieldRule, positions, findings: list) -> None:
        p = rule.path
        name = self.name
        occurrences = range(1, len(positions) + 1) if p.occurrence == 1 and "[" not in rule.text.split("-", 1)[0] \
            else [p.occurrence]
        previous = 0  # the sequence rule: the last number seen
        for occurrence in occurrences:
            if occurrence > len(positions):
                continue
            position = positions[occurrence - 1]
            at = p._replace(occurrence=occurrence)
            repetitions = [p.repetition] if p.repetition is not None else \
                range(1, _repetition_count(message, position, p.field) + 1)
            values = [(r, message.get(at._replace(repetition=r))) for r in repetitions] or [(1, "")]
            where = dict(segment=p.segment, position=position + 1, sequence=occurrence, field=p.field,
                         component=p.component, subcomponent=p.subcomponent)
            present = [(r, v) for r, v in values if v and v != '""']
            if rule.required and not present:
                findings.append(Finding(rule.severity, ErrorCode.REQUIRED_FIELD_MISSING,
                                        f"profile {name}: {rule.text} is required", repetition=None, **where))
            elif rule.required and p.component is not None and p.repetition is None:
                # a component is required in each repetition the field has: say which one lacks it
                for r, value in values:
                    if not value or value == '""':
                        findings.append(Finding(rule.severity, ErrorCode.REQUIRED_FIELD_MISSING,
                                                f"profile {name}: {rule.text} is required (repetition {r} has none)",
                                                repetition=r, **where))
            if rule.sequence:
                # each one the one before plus 1: one number out of step is one finding, not one for
                # every segment after it
                expected = str(previous + 1)
                got = values[0][1] if values else ""
                if got != expected:
                    findings.append(Finding(rule.severity, ErrorCode.DATA_TYPE_ERROR,
                                            f"profile {name}: {rule.text} is {as_written(got)}; {p.segment} {occurrence} "
                                            f"should be {expected} (numbered 1, 2, 3... in order)", repetition=None, **where))
                previous = int(got) if got.isdigit() and len(got) < 10 else previous + 1
            if rule.forbidden and present:
                findings.append(Finding(rule.severity, ErrorCode.DATA_TYPE_ERROR,
                                        f"profile {name}: {rule.text} must be empty", repetition=present[0][0], **where))
            for r, value in present:
                if rule.values is not None and (value.upper() if rule.ignore_case else value) not in rule.values:
                    findings.append(Finding(rule.severity, ErrorCode.TABLE_VALUE_NOT_FOUND,
                                            f"profile {name}: {as_written(value[:40])} is not an allowed value of {rule.text}",
                                            repetition=r, **where))
                if rule.pattern is not None and not rule.pattern.search(value):
                    findings.append(Finding(rule.severity, ErrorCode.DATA_TYPE_ERROR,
                                            f"profile {name}: {rule.text} {as_written(value[:40])} does not match "
                                            f"{rule.pattern.pattern!r}", repetition=r, **where))
                if rule.max_length is not None and len(value) > rule.max_length:
                    findings.append(Finding(rule.severity, ErrorCode.VALUE_TOO_LONG,
                                            f"profile {name}: {rule.text} is {len(value)} characters; at most "
                                            f"{rule.max_length}", repetition=r, **where))


@dataclass(frozen=True, slots=True)
class ProfileSet:
    """Several profiles, each checking the messages it is for (its ``msh_21``, or every message)."""

    profiles: tuple

    def check(self, message: Message) -> list[Finding]:
        findings: list[Finding] = []
        for profile in self.profiles:
            findings += profile.check(message)
        return findings


def _holds(value: str, expected) -> bool:
    valued = bool(value) and value != '""'
    if expected == "present":
        return valued
    if expected == "absent":
        return not valued
    return value in expected


def _condition_text(text: str, expected) -> str:
    if expected in ("present", "absent"):
        return f"{text} is {'valued' if expected == 'present' else 'empty'}"
    return f"{text} is {' or '.join(sorted(expected))}"


def _repetition_count(message: Message, position: int, number: int) -> int:
    fields = message.fields(position)
    if number >= len(fields) or not fields[number]:
        return 0
    rep = message.delimiters.repetition
    if message.segment_names()[position] in HEADER_SEGMENTS and number <= 2:
        return 1
    return fields[number].count(rep) + 1 if rep else 1


def _severity(value, doc: Document, path: tuple) -> Severity | None:
    if value in (None, "error"):
        return Severity.ERROR
    if value == "warning":
        return Severity.WARNING
    doc.error(path, f"severity must be error or warning, not {value!r}")
    return None


def _unknown_keys(data: dict, allowed: list, doc: Document, path: tuple, what: str) -> None:
    for key in data:
        if key not in allowed:
            doc.error(path + (key,), f"unknown key {key!r} in {what}{did_you_mean(str(key), allowed)}", key=True)


def _whole(value, name: str, doc: Document, path: tuple, low: int = 0) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        doc.error(path, f"{name} must be a whole number, {low} or more, not {value!r}")
        return None
    return value


def _value_set(file, doc: Document, path: tuple, base: Path) -> frozenset | None:
    if not isinstance(file, str) or not file:
        doc.error(path, "value_set is a file name (one value per line)")
        return None
    target = Path(file) if Path(file).is_absolute() else base / file
    try:
        lines = read_config_text(target).splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        doc.error(path, f"value_set: cannot read {target}: {getattr(exc, 'strerror', None) or exc}")
        return None
    values = frozenset(line.split("#", 1)[0].strip() for line in lines) - {""}
    if not values:
        doc.error(path, f"value_set {target} holds no values")
        return None
    return values


class _PathChecker:
    """Paths of a profile, parsed and, when the profile names its version, checked against that
    version's definitions: a typo (``PDI-3``) is a lint error, not a rule that never runs."""

    def __init__(self, version: str | None):
        self.profile = None
        if version is not None:
            from hl7relay.validation.profile import definition_version, get_profile

            self.profile = get_profile(definition_version(version) or version)

    def path(self, text, doc: Document, where: tuple, key: bool = False) -> HL7Path | None:
        try:
            p = parse_path(str(text))
        except PathError as exc:
            doc.error(where, f"invalid HL7 path: {exc}", key=key)
            return None
        if self.profile is None or p.segment.startswith("Z"):
            return p
        profile = self.profile
        if p.segment not in profile.segment_names:
            doc.error(where, f"{text}: v{profile.version} has no segment {p.segment}"
                             + did_you_mean(p.segment, sorted(profile.segment_names)), key=key)
            return None
        seg = profile.segment(p.segment)
        if seg is None or p.field > len(seg.fields) or seg.fields[p.field - 1] is None:
            count = len(seg.fields) if seg is not None else 0
            doc.error(where, f"{text}: {p.segment} has {count} fields in v{profile.version}", key=key)
            return None
        element = seg.fields[p.field - 1].element
        if p.component is not None and element is not None and hasattr(element, "components"):
            if p.component > len(element.components):
                doc.error(where, f"{text}: {p.segment}-{p.field} is {element.datatype}, which has "
                                 f"{len(element.components)} components", key=key)
                return None
        return p


def _pattern(value, doc: Document, where: tuple) -> re.Pattern | None:
    if not isinstance(value, str) or not value:
        doc.error(where, "pattern is a regular expression (quoted)")
        return None
    try:
        return re.compile(value)
    except re.error as exc:
        doc.error(where, f"pattern: invalid regular expression: {exc}")
        return None


def _load_unique(items, rules: MessageRules, checker: _PathChecker, doc: Document, where: tuple) -> None:
    if items is None:
        return
    if not isinstance(items, list):
        doc.error(where, "unique is a list of path lists: - [OBX-3, OBX-4]")
        return
    for i, item in enumerate(items):
        texts = item if isinstance(item, list) else [item]
        found = [(checker.path(t, doc, where + (i, j)), str(t)) for j, t in enumerate(texts)]
        paths = [(p, text) for p, text in found if p is not None]
        if len(paths) != len(found):
            continue
        if not paths or len({p.segment for p, _ in paths}) != 1:
            doc.error(where + (i,), "the paths of a unique rule are fields of one segment: - [OBX-3, OBX-4]")
            continue
        rules.unique.append(UniqueRule(tuple(paths)))


def _load_conditions(items, rules: MessageRules, checker: _PathChecker, doc: Document, where: tuple) -> None:
    if items is None:
        return
    if not isinstance(items, list):
        doc.error(where, "conditions is a list of - when: {PATH: [values] | present | absent}, then: {...}")
        return
    for i, item in enumerate(items):
        at = where + (i,)
        if not isinstance(item, dict):
            doc.error(at, "a condition is a mapping: when, then, severity")
            continue
        _unknown_keys(item, _CONDITION_KEYS, doc, at, "a condition")
        when, then = item.get("when"), item.get("then")
        if not isinstance(when, dict) or not when:
            doc.error(at + ("when",), "when is a mapping of paths to values (a list), present or absent")
            continue
        if not isinstance(then, dict) or not then:
            doc.error(at + ("then",), f"then is a mapping of {', '.join(_THEN_KEYS)}")
            continue
        _unknown_keys(then, _THEN_KEYS, doc, at + ("then",), "a condition's then")
        tests = []
        for text, expected in when.items():
            p = checker.path(text, doc, at + ("when", text), key=True)
            if expected in ("present", "absent"):
                value = expected
            elif isinstance(expected, list) and expected and all(isinstance(v, (str, int)) for v in expected):
                value = frozenset(str(v) for v in expected)
            elif isinstance(expected, (str, int)) and not isinstance(expected, bool):
                value = frozenset({str(expected)})
            else:
                doc.error(at + ("when", text), f"{text}: a value, a list of values, present or absent")
                continue
            if p is not None:
                tests.append((p, str(text), value))
        condition = ConditionRule(tuple(tests))
        for kind in ("required", "forbidden"):
            texts = then.get(kind, [])
            texts = [texts] if isinstance(texts, str) else texts
            if not isinstance(texts, list):
                doc.error(at + ("then", kind), f"{kind} is a list of paths")
                continue
            found = [(checker.path(t, doc, at + ("then", kind, j)), str(t)) for j, t in enumerate(texts)]
            setattr(condition, kind, tuple((p, t) for p, t in found if p is not None))
        for kind in ("values", "pattern"):
            spec = then.get(kind, {})
            if not isinstance(spec, dict):
                doc.error(at + ("then", kind), f"{kind} maps paths to " + ("lists of values" if kind == "values" else "patterns"))
                continue
            out: list[tuple] = []
            for text, value in spec.items():
                p = checker.path(text, doc, at + ("then", kind, text), key=True)
                if kind == "values":
                    ok = isinstance(value, list) and value and all(isinstance(v, (str, int)) for v in value)
                    if not ok:
                        doc.error(at + ("then", kind, text), f"{text}: a list of allowed values")
                    elif p is not None:
                        out.append((p, str(text), frozenset(str(v) for v in value)))
                else:
                    compiled = _pattern(value, doc, at + ("then", kind, text))
                    if p is not None and compiled is not None:
                        out.append((p, str(text), compiled))
            setattr(condition, "values" if kind == "values" else "patterns", tuple(out))
        severity = _severity(item.get("severity"), doc, at + ("severity",))
        if severity is not None:
            condition.severity = severity
        if tests and (condition.required or condition.forbidden or condition.values or condition.patterns):
            rules.conditions.append(condition)


def load_conformance_profile(path, display_name: str | None = None) -> tuple[ConformanceProfile | None, list[ConfigError]]:
    """Read and check a profile file; every problem comes back with its position."""
    doc = load_document(path, environ={}, display_name=display_name)
    if doc.errors:
        return None, list(doc.errors)
    data = doc.data
    if not isinstance(data, dict):
        doc.error((), "a profile is a mapping: profile, description, version, messages")
        return None, list(doc.errors)
    _unknown_keys(data, _TOP_KEYS, doc, (), "a profile")
    name = data.get("profile")
    if not isinstance(name, str) or not name.strip():
        doc.error(("profile",), "the profile needs a name: profile: NAME")
        name = "?"
    version = data.get("version")
    if version is not None:
        version = str(version)
        if version not in ACCEPTED_VERSIONS:
            doc.error(("version",), f"version {version!r} is not an HL7 version hl7relay knows "
                                    f"({', '.join(ACCEPTED_VERSIONS)})")
    description = data.get("description") or ""
    profile = ConformanceProfile(name, doc.file, version, str(description))
    if "msh_21" in data:
        identifiers = data["msh_21"]
        if isinstance(identifiers, str):
            identifiers = [identifiers]
        if not isinstance(identifiers, list) or not identifiers or not all(isinstance(i, str) and i for i in identifiers):
            doc.error(("msh_21",), "msh_21 is a list of the profile identifiers (MSH-21.1) the profile is for")
        else:
            profile.msh_21 = frozenset(i.split("^", 1)[0] for i in identifiers)
    checker = _PathChecker(version if version in ACCEPTED_VERSIONS else None)
    messages = data.get("messages")
    if not isinstance(messages, dict) or not messages:
        doc.error(("messages",), "messages is a mapping of TYPE^EVENT (or TYPE, or \"*\") to its rules")
        return None, list(doc.errors)
    base = Path(path).parent
    for key, body in messages.items():
        where = ("messages", key)
        if not _MESSAGE_KEY.fullmatch(str(key)):
            doc.error(where, f"{key!r} is not a message type: write TYPE^EVENT (ORU^R01), TYPE (ORU) or \"*\"", key=True)
            continue
        if not isinstance(body, dict):
            doc.error(where, f"{key}: segments and fields rules, as mappings")
            continue
        _unknown_keys(body, _MESSAGE_KEYS, doc, where, f"the rules of {key}")
        rules = MessageRules(str(key))
        for segment, spec in (body.get("segments") or {}).items() if isinstance(body.get("segments") or {}, dict) else ():
            spath = where + ("segments", segment)
            if not _SEGMENT_ID.fullmatch(str(segment)):
                doc.error(spath, f"{segment!r} is not a segment id (three letters or digits)", key=True)
                continue
            if not isinstance(spec, dict):
                doc.error(spath, f"{segment}: {{min: N, max: N}}")
                continue
            _unknown_keys(spec, _SEGMENT_KEYS, doc, spath, f"segment {segment}")
            low = _whole(spec.get("min", 0), "min", doc, spath + ("min",))
            high = None if spec.get("max") is None else _whole(spec["max"], "max", doc, spath + ("max",))
            severity = _severity(spec.get("severity"), doc, spath + ("severity",))
            if low is not None and high is not None and high < low:
                doc.error(spath, f"{segment}: max {high} is less than min {low}")
            elif low is not None and severity is not None:
                rules.segments.append(SegmentRule(str(segment), low, high, severity))
        fields = body.get("fields") or {}
        if not isinstance(fields, dict):
            doc.error(where + ("fields",), "fields is a mapping of HL7 paths to rules")
            fields = {}
        for text, spec in fields.items():
            fpath = where + ("fields", text)
            hl7_path = checker.path(text, doc, fpath, key=True)
            if hl7_path is None:
                continue
            if not isinstance(spec, dict):
                doc.error(fpath, f"{text}: a mapping of {', '.join(_FIELD_KEYS)}")
                continue
            _unknown_keys(spec, _FIELD_KEYS, doc, fpath, f"field {text}")
            rule = FieldRule(hl7_path, str(text))
            for flag in ("required", "forbidden"):
                if flag in spec:
                    if not isinstance(spec[flag], bool):
                        doc.error(fpath + (flag,), f"{flag} is true or false")
                    else:
                        setattr(rule, flag, spec[flag])
            if rule.required and rule.forbidden:
                doc.error(fpath, f"{text} cannot be both required and forbidden")
            if "values" in spec:
                values = spec["values"]
                if not isinstance(values, list) or not values or not all(
                        isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in values):
                    doc.error(fpath + ("values",), "values is a list of allowed values")
                else:
                    rule.values = frozenset(str(v) for v in values)
            if "value_set" in spec:
                if rule.values is not None:
                    doc.error(fpath + ("value_set",), "give values or value_set, not both")
                else:
                    rule.values = _value_set(spec["value_set"], doc, fpath + ("value_set",), base)
            for flag in ("ignore_case", "sequence"):
                if flag in spec:
                    if not isinstance(spec[flag], bool):
                        doc.error(fpath + (flag,), f"{flag} is true or false")
                    else:
                        setattr(rule, flag, spec[flag])
            if rule.ignore_case and rule.values is not None:
                rule.values = frozenset(v.upper() for v in rule.values)
            elif rule.ignore_case:
                doc.error(fpath + ("ignore_case",), "ignore_case applies to values or value_set: give one")
            if "pattern" in spec:
                rule.pattern = _pattern(spec["pattern"], doc, fpath + ("pattern",))
            if "max_length" in spec:
                rule.max_length = _whole(spec["max_length"], "max_length", doc, fpath + ("max_length",), 1)
            severity = _severity(spec.get("severity"), doc, fpath + ("severity",))
            if severity is not None:
                rule.severity = severity
            if not set(spec) - {"severity", "ignore_case"}:
                doc.error(fpath, f"{text}: no rule (required, forbidden, values, value_set, pattern, sequence or max_length)")
                continue
            rules.fields.append(rule)
        _load_unique(body.get("unique"), rules, checker, doc, where + ("unique",))
        _load_conditions(body.get("conditions"), rules, checker, doc, where + ("conditions",))
        profile.messages.append(rules)
    if doc.errors:
        return None, list(doc.errors)
    return profile, []
