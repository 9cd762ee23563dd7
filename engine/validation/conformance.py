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
a present segment. Findings use the HL7 table 0357 codes of the base checks (100 segment, 101
required, 102 forbidden, 103 value, 104 length) and say the profile's name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from hl7relay.outcomes import ErrorCode, Severity
from hl7relay.spec import did_you_mean
from hl7relay.yamlsource import ConfigError, Document, load_document
from hl7relay.errors import PathError
from hl7relay.hl7.message import HEADER_SEGMENTS, Message
from hl7relay.hl7.path import Path as HL7Path, parse_path
from hl7relay.validation.profile import ACCEPTED_VERSIONS
from hl7relay.validation.validator import Finding

__all__ = ["ConformanceProfile", "load_conformance_profile", "is_profile_file"]

_TOP_KEYS = ["profile", "description", "version", "messages"]
_MESSAGE_KEYS = ["segments", "fields"]
_SEGMENT_KEYS = ["min", "max", "severity"]
_FIELD_KEYS = ["required", "forbidden", "values", "value_set", "max_length", "severity"]
_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")
_MESSAGE_KEY = re.compile(r"\*|[A-Z0-9]{3}(\^[A-Z0-9]{3})?")


def is_profile_file(path) -> bool:
    """A YAML file whose top level says ``profile:`` (how lint tells profiles from channels)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
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
    max_length: int | None = None
    severity: Severity = Severity.ERROR


@dataclass(slots=True)
class MessageRules:
    key: str  # TYPE^EVENT, TYPE or *
    segments: list = field(default_factory=list)
    fields: list = field(default_factory=list)


@dataclass(slots=True)
class ConformanceProfile:
    name: str
    file: str
    version: str | None = None
    description: str = ""
    messages: list = field(default_factory=list)  # MessageRules

    def rules_for(self, message: Message) -> list[MessageRules]:
        kind, event = message.get("MSH-9.1").strip(), message.get("MSH-9.2").strip()
        keys = {"*", kind, f"{kind}^{event}"}
        return [rules for rules in self.messages if rules.key in keys]

    def check(self, message: Message) -> list[Finding]:
        """What the profile finds in ``message`` (the base standard is checked apart)."""
        findings: list[Finding] = []
        name = self.name
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
        return findings

    def _check_field(self, message: Message, rule: FieldRule, positions, findings: list) -> None:
        p = rule.path
        name = self.name
        occurrences = range(1, len(positions) + 1) if p.occurrence == 1 and "[" not in rule.text.split("-", 1)[0] \
            else [p.occurrence]
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
            if rule.forbidden and present:
                findings.append(Finding(rule.severity, ErrorCode.DATA_TYPE_ERROR,
                                        f"profile {name}: {rule.text} must be empty", repetition=present[0][0], **where))
            for r, value in present:
                if rule.values is not None and value not in rule.values:
                    findings.append(Finding(rule.severity, ErrorCode.TABLE_VALUE_NOT_FOUND,
                                            f"profile {name}: {value[:40]!r} is not an allowed value of {rule.text}",
                                            repetition=r, **where))
                if rule.max_length is not None and len(value) > rule.max_length:
                    findings.append(Finding(rule.severity, ErrorCode.VALUE_TOO_LONG,
                                            f"profile {name}: {rule.text} is {len(value)} characters; at most "
                                            f"{rule.max_length}", repetition=r, **where))


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
        lines = target.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        doc.error(path, f"value_set: cannot read {target}: {getattr(exc, 'strerror', None) or exc}")
        return None
    values = frozenset(line.split("#", 1)[0].strip() for line in lines) - {""}
    if not values:
        doc.error(path, f"value_set {target} holds no values")
        return None
    return values


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
            try:
                hl7_path = parse_path(str(text))
            except PathError as exc:
                doc.error(fpath, f"invalid HL7 path: {exc}", key=True)
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
            if "max_length" in spec:
                rule.max_length = _whole(spec["max_length"], "max_length", doc, fpath + ("max_length",), 1)
            severity = _severity(spec.get("severity"), doc, fpath + ("severity",))
            if severity is not None:
                rule.severity = severity
            if not set(spec) - {"severity"}:
                doc.error(fpath, f"{text}: no rule (required, forbidden, values, value_set or max_length)")
                continue
            rules.fields.append(rule)
        profile.messages.append(rules)
    if doc.errors:
        return None, list(doc.errors)
    return profile, []
