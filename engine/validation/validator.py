"""Validate a message against the standard for its version.

Reports every finding, not only the first: envelope (MSH-1/MSH-2 and the header fields), message
type/event/processing id/version, segment order against the message structure (groups,
optional, repeating and required segments; Z-segments are allowed anywhere after MSH), required
fields, datatype formats, table values and lengths. Each finding carries an HL7 table 0357 code,
a severity, where it is (segment number and an ERR-2 style location) and a plain sentence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hl7relay.outcomes import ErrorCode, Severity
from hl7relay.hl7.escape import unescape
from hl7relay.hl7.message import Message
from hl7relay.hl7.path import Path
from hl7relay.validation.profile import (
    ACCEPTED_VERSIONS, FieldDef, Leaf, Node, Profile, definition_version, get_profile,
)

__all__ = ["Finding", "Report", "Validator", "validate", "segment_groups", "SegmentGroups"]

E, W, I = Severity.ERROR, Severity.WARNING, Severity.INFORMATION  # noqa: E741 - HL7's own letters (table 0516)
_SEGMENT_NAME = re.compile(r"[A-Z][A-Z0-9]{2}")
# Table 0396 (coding systems) also admits HL7nnnn (an HL7 table), 99zzz and L (local codes).
# a coding system no table lists that is still one: HL7's own tables, a local one, an ISO OID
_CODING_SYSTEM = re.compile(r"HL7\d{4}|99[A-Za-z0-9]+|L|[0-2](\.(0|[1-9]\d*))+")
_PROCESSING_IDS = frozenset({"D", "P", "T"})  # HL7 table 0103
_MSH_REQUIRED = {7: "date/time of message", 9: "message type", 10: "message control id",
                 11: "processing id", 12: "version id"}


@dataclass(slots=True)
class Finding:
    severity: Severity
    code: ErrorCode
    text: str
    segment: str | None = None  # segment id, e.g. PID
    position: int | None = None  # 1-based segment number in the message
    sequence: int | None = None  # which PID (1-based) among the message's PIDs
    field: int | None = None
    repetition: int | None = None
    component: int | None = None
    subcomponent: int | None = None

    @property
    def location(self) -> str:
        """ERR-2 (ERL) form: ``SEG^sequence^field^repetition^component^subcomponent``."""
        parts = [self.segment or "", self.sequence, self.field, self.repetition, self.component, self.subcomponent]
        while parts and parts[-1] is None:
            parts.pop()
        return "^".join("" if p is None else str(p) for p in parts)

    @property
    def path(self) -> str:
        """HL7 path form, as analysts write it: ``PID-5.1``, ``OBX[2]-5``."""
        if not self.segment:
            return "message"
        sequence = self.sequence or 1
        if self.field is None:
            return self.segment if sequence == 1 else f"{self.segment}[{sequence}]"
        repetition = self.repetition if self.repetition and self.repetition > 1 else None
        return str(Path(self.segment, sequence, self.field, repetition, self.component, self.subcomponent))

    def __str__(self) -> str:
        return f"{self.severity.value} {int(self.code)} {self.path}: {self.text}"

    def to_dict(self) -> dict:
        return {
            "severity": self.severity.value, "code": int(self.code), "code_text": self.code.text,
            "segment": self.segment, "position": self.position, "location": self.location,
            "path": self.path, "text": self.text,
        }


@dataclass(slots=True)
class Report:
    """What validating one message found."""

    findings: list[Finding] = field(default_factory=list)
    version: str | None = None  # the version the message was checked against
    structure: str | None = None  # the message structure used, e.g. ADT_A01
    message_type: str = ""
    control_id: str = ""

    @property
    def valid(self) -> bool:
        return not any(f.severity is E for f in self.findings)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is E]

    def to_dict(self) -> dict:
        return {
            "valid": self.valid, "message_type": self.message_type, "control_id": self.control_id,
            "version": self.version, "structure": self.structure,
            "findings": [f.to_dict() for f in self.findings],
        }


class Validator:
    """Checks messages; ``version`` overrides MSH-12, ``strict`` turns warnings about table values,
    lengths, line endings and character set names into errors; ``profile`` (a
    :class:`~hl7relay.validation.conformance.ConformanceProfile`) adds its rules."""

    def __init__(self, version: str | None = None, strict: bool = False, profile=None,
                 table_values: dict[str, frozenset] | None = None):
        if version is not None and definition_version(version) is None:
            raise ValueError(f"unsupported HL7 version {version!r}; supported: {', '.join(ACCEPTED_VERSIONS)}")
        self.version = version
        self.strict = strict
        self.profile = profile
        # a site's additions to HL7 tables ("HL70396" -> values): coding systems its partners use
        self.table_values = {k: frozenset(v) for k, v in (table_values or {}).items()}
        # what a value's checks found depends on the site's additions too: remembered apart
        self._clean_key = (strict, tuple(sorted(self.table_values.items()))) if self.table_values else strict
        self._soft = E if strict else W

    def validate(self, message: Message) -> Report:
        report = _Run(self, message).run()
        if self.profile is not None:
            report.findings.extend(self.profile.check(message))
        return report


def validate(message: Message, version: str | None = None, strict: bool = False) -> Report:
    """Validate one message (see :class:`Validator`)."""
    return Validator(version, strict).validate(message)


@dataclass(slots=True)
class SegmentGroups:
    """Where the groups of a message's structure lie (:func:`segment_groups`)."""

    # group name (``ORDER_OBSERVATION``) -> (first, last) segment positions (0-based) of each instance,
    # in order; every group of the structure is named, with no instance when the message has none
    instances: dict[str, list[tuple[int, int]]]
    direct: dict[str, frozenset]  # group name -> the segments the group holds itself (not in a nested group)


def segment_groups(message: Message, version: str | None = None) -> SegmentGroups:
    """The groups of the message's structure (as the standard names them, without the structure's
    prefix) and where each instance lies, read the way validation reads the structure (the same
    matcher, its findings left out). A ValueError when the message's version, type or event has
    no structure to read it by."""
    run = _Run(Validator(version), message)
    if not run._check_delimiters():
        raise ValueError("the message's delimiters are ambiguous: its structure cannot be read")
    profile = run._profile()
    structure = run._structure(profile) if profile is not None else None
    if structure is None:
        problems = "; ".join(f.text for f in run.findings if f.severity is E) or "no structure"
        raise ValueError(f"the message's groups cannot be read: {problems}")
    matcher = _Matcher(run, structure, run._classify_segments(profile))
    matcher.match()
    prefix = structure.name + "_"

    def short(name: str) -> str:
        return name[len(prefix):] if name.startswith(prefix) else name

    found = SegmentGroups({}, {})

    def known(node: Node) -> None:
        for child in node.children:
            if child.kind == "sequence":
                found.instances.setdefault(short(child.name), [])
                found.direct[short(child.name)] = frozenset(c.name for c in child.children if c.kind == "segment")
            known(child)

    known(structure)
    for name, first, last in sorted(matcher.groups, key=lambda g: (g[1], -g[2])):
        found.instances.setdefault(short(name), []).append((first, last))
    return found


class _Run:
    """One validation: the message, its segments and the findings so far."""

    def __init__(self, validator: Validator, message: Message):
        self.v = validator
        self.msg = message
        self.report = Report()
        self.findings = self.report.findings
        self.names = message.segment_names()
        self._sequence_of: list[int] | None = None
        msh = message.fields(0)
        d = message.delimiters

        def component(number: int, index: int) -> str:
            if number >= len(msh):
                return ""
            value = msh[number].split(d.repetition, 1)[0] if d.repetition else msh[number]
            parts = value.split(d.component) if d.component else [value]
            value = parts[index - 1] if index <= len(parts) else ""
            return unescape(value, d, message.codec).strip() if d.escape and d.escape in value else value.strip()

        self.message_type, self.event, self.structure_id = component(9, 1), component(9, 2), component(9, 3)
        self.processing_id = component(11, 1)
        self.declared_version = component(12, 1)

    @property
    def sequence_of(self) -> list[int]:
        """Per segment position: its occurrence among the segments of the same name (for findings)."""
        if self._sequence_of is None:
            seen: dict[str, int] = {}
            self._sequence_of = []
            for name in self.names:
                seen[name] = seen.get(name, 0) + 1
                self._sequence_of.append(seen[name])
        return self._sequence_of

    def add(self, severity, code, text, position=None, field=None, repetition=None, component=None, subcomponent=None):
        segment = sequence = None
        if position is not None:
            segment = self.names[position]
            sequence = self.sequence_of[position]
        self.findings.append(Finding(severity, code, text, segment, None if position is None else position + 1,
                                     sequence, field, repetition, component, subcomponent))

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> Report:
        msg = self.msg
        self.report.message_type = msg.get("MSH-9")
        self.report.control_id = msg.get("MSH-10")
        for problem in msg.decode_problems:
            severity = E if "not valid" in problem or "decoded as" in problem else self.v._soft
            self.add(severity, ErrorCode.DATA_TYPE_ERROR, f"character set: {problem}", 0, 18)
        if ("\n" in msg.text) and self.v.strict:
            self.add(E, ErrorCode.SEGMENT_SEQUENCE_ERROR, "segments end with LF or CRLF; the standard's terminator is CR")
        if not self._check_delimiters():
            return self.report  # ambiguous delimiters: nothing further can be read reliably
        self._check_header()
        profile = self._profile()
        if profile is None:
            return self.report
        structure = self._structure(profile)
        segments = self._classify_segments(profile)
        if structure is not None:
            _Matcher(self, structure, segments).match()
        self._check_fields(profile, segments)
        return self.report

    def _check_delimiters(self) -> bool:
        """MSH-1 and MSH-2. False only when the message cannot be read reliably (a delimiter that
        is a letter, digit or space, or one used twice): every other envelope problem is reported
        and the field and structure checks go on."""
        d = self.msg.delimiters
        encoding = self.msg.fields(0)[2]
        version = self.declared_version
        modern = (definition_version(version) or version) >= "2.7"
        readable = True
        if d.field.isalnum() or d.field.isspace():
            self.add(E, ErrorCode.DATA_TYPE_ERROR, f"MSH-1 field separator {d.field!r} must not be a letter, digit or space", 0, 1)
            readable = False
        if len(encoding) < 4:
            self.add(E, ErrorCode.REQUIRED_FIELD_MISSING if not encoding else ErrorCode.DATA_TYPE_ERROR,
                     f"MSH-2 encoding characters {as_written(encoding)}: four are required (component, repetition, escape, "
                     f"subcomponent); {len(encoding)} given", 0, 2)
        elif len(encoding) == 5 and not modern:
            # US ELR and PHLIP guides prescribe ^~\&# in v2.5.1: the fifth is read as v2.7's truncation character
            self.add(self.v._soft, ErrorCode.DATA_TYPE_ERROR,
                     f"MSH-2 encoding characters {as_written(encoding)}: the fifth, {encoding[4]!r} (truncation), is defined from "
                     f"v2.7; v{version or '?'} has four", 0, 2)
        elif len(encoding) > 5:
            self.add(E, ErrorCode.DATA_TYPE_ERROR,
                     f"MSH-2 encoding characters {as_written(encoding)}: {len(encoding)} characters is too many; "
                     f"at most {'five' if modern else 'four'} (five from v2.7)", 0, 2)
        chars = d.field + encoding[:5]
        if len(set(chars)) != len(chars):
            self.add(E, ErrorCode.DATA_TYPE_ERROR, f"MSH-1/MSH-2 delimiters {as_written(chars)} are not distinct characters", 0, 2)
            readable = False
        bad = [c for c in encoding[:5] if c.isalnum() or c.isspace()]
        if bad:
            self.add(E, ErrorCode.DATA_TYPE_ERROR, f"MSH-2 encoding characters must not be letters, digits or spaces: {''.join(bad)!r}", 0, 2)
            readable = False
        return readable

    def _check_header(self) -> None:
        fields = self.msg.fields(0)
        for number, what in _MSH_REQUIRED.items():
            if len(fields) <= number or not fields[number]:
                self.add(E, ErrorCode.REQUIRED_FIELD_MISSING, f"required field MSH-{number} ({what}) is missing", 0, number)
        processing = self.processing_id
        if processing and processing not in _PROCESSING_IDS:
            self.add(E, ErrorCode.UNSUPPORTED_PROCESSING_ID,
                     f"processing id {processing!r} is not one of D (debugging), P (production), T (training)", 0, 11, component=1)

    def _profile(self) -> Profile | None:
        version = self.v.version or self.declared_version
        if not version:
            return None  # MSH-12 missing was reported; nothing to check the structure against
        defs = definition_version(version)
        if defs is None:
            self.add(E, ErrorCode.UNSUPPORTED_VERSION_ID,
                     f"version {version!r} is not supported; supported: {', '.join(ACCEPTED_VERSIONS)}", 0, 12)
            return None
        if defs != version:
            self.add(I, ErrorCode.MESSAGE_ACCEPTED, f"version {version} is checked against the {defs} definitions", 0, 12)
        self.report.version = defs
        return get_profile(defs)

    def _structure(self, profile: Profile) -> Node | None:
        message_type, event, declared = self.message_type, self.event, self.structure_id
        if not message_type:
            return None  # MSH-9 missing was reported
        if message_type not in profile.message_types and message_type.startswith("Z"):
            # a site-defined message type, as Z segments are site-defined: nothing to check its structure by
            self.add(W, ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
                     f"message type {message_type!r} is site-defined (Z): its structure is not checked", 0, 9, component=1)
            return None
        if message_type not in profile.message_types:
            self.add(E, ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
                     f"message type {message_type!r} is not defined in v{profile.version}", 0, 9, component=1)
            return None
        name = profile.resolve(message_type, event)
        if declared and declared in profile.structures:
            if name and name != declared:
                self.add(W, ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
                         f"MSH-9.3 says structure {declared} but {message_type}^{event} uses {name} in v{profile.version}; checked as {declared}",
                         0, 9, component=3)
            name = declared
        elif declared:
            self.add(W, ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
                     f"MSH-9.3 names structure {declared!r}, which v{profile.version} does not define", 0, 9, component=3)
        if name is None:
            if not event:
                self.add(E, ErrorCode.REQUIRED_FIELD_MISSING, f"MSH-9.2 trigger event is missing for {message_type}", 0, 9, component=2)
            else:
                self.add(E, ErrorCode.UNSUPPORTED_EVENT_CODE,
                         f"event {event!r} is not defined for {message_type} in v{profile.version}", 0, 9, component=2)
            return None
        self.report.structure = name
        return profile.structure(name)

    def _classify_segments(self, profile: Profile) -> list[int]:
        """Positions of the segments the structure is matched against (known, non-Z, after MSH)."""
        known = []
        segment_names = profile.segment_names
        for position, name in enumerate(self.names):
            if position == 0:
                continue
            if name in segment_names:
                known.append(position)
            elif _SEGMENT_NAME.fullmatch(name) is None:
                self.add(E, ErrorCode.SEGMENT_SEQUENCE_ERROR,
                         f"segment {position + 1}: {name[:10]!r} is not a segment name (three letters or digits)", position)
            elif name[0] == "Z":
                continue  # Z-segments are site-defined and allowed anywhere after MSH
            else:
                self.add(E, ErrorCode.SEGMENT_SEQUENCE_ERROR, f"segment {position + 1}: {name} is not a segment of v{profile.version}", position)
        if self.names[0] != "MSH":
            self.add(E, ErrorCode.SEGMENT_SEQUENCE_ERROR, "the message does not start with MSH", 0)
        return known

    # -- fields ---------------------------------------------------------------------------------
    def _check_fields(self, profile: Profile, positions: list[int]) -> None:
        d = self.msg.delimiters
        checker = _FieldChecker(self, profile, d)
        checker.segment(0, profile.segment("MSH"), skip_required=frozenset(_MSH_REQUIRED))
        for position in positions:
            checker.segment(position, profile.segment(self.names[position]))


class _FieldChecker:
    def __init__(self, run: _Run, profile: Profile, d):
        self.run = run
        self.profile = profile
        self.rep = d.repetition
        self.comp = d.component
        self.sub = d.subcomponent
        self.esc = d.escape
        self.soft = run.v._soft
        self.d = d
        self.extra = run.v.table_values
        self.clean = profile.clean_values(d, run.v._clean_key)

    def segment(self, position: int, seg, skip_required=frozenset()) -> None:
        if seg is None:
            return
        fields = self.run.msg.fields(position)
        defs = seg.fields
        count = len(fields)
        for number in seg.required:
            if number not in skip_required and (number >= count or not fields[number]):
                fdef = defs[number - 1]
                self.run.add(E, ErrorCode.REQUIRED_FIELD_MISSING,
                             f"required field {seg.name}-{number} ({_human(fdef.name)}) is missing", position, number)
        clean, findings, esc = self.clean, self.run.findings, self.esc
        for number, fdef, element, tag in self.profile.field_plan(seg):
            if number >= count:
                break
            value = fields[number]
            if not value or value == '""':
                continue
            if fdef.datatype == "WD":
                self.run.add(self.soft, ErrorCode.DATA_TYPE_ERROR,
                             f"{seg.name}-{number} is withdrawn in v{self.profile.version} and should be empty; receivers ignore it",
                             position, number)
                continue
            if element is None:
                if seg.name == "OBX" and number == 5:
                    element = self._obx_type(position, fields)
                if element is None:
                    continue
                key = (tag, id(element), value)  # OBX-5: its datatype is OBX-2's
            else:
                key = (tag, value)
            known = clean.get(key)
            if known is not None:  # this value of this field was checked before
                if known is not True:  # and what it found is found again, here
                    for severity, code, text, repetition, component, subcomponent in known:
                        self.run.add(severity, code, text, position, number, repetition, component, subcomponent)
                continue
            found = len(findings)
            self._field(seg, fdef, element, value, position, number)
            if not (esc and esc in value):  # escapes: their text depends on the charset
                new = findings[found:]
                clean[key] = True if not new else tuple(
                    (f.severity, f.code, f.text, f.repetition, f.component, f.subcomponent) for f in new)

    def _field(self, seg, fdef: FieldDef, element, value: str, position: int, number: int) -> None:
        """Every check of one field's value (its repetitions, components, datatypes, tables)."""
        rep_sep = self.rep
        if element.__class__ is Leaf and not (rep_sep and rep_sep in value):
            if self.comp and self.comp in value:
                value = self._primitive_with_components(element, value, position, number, 1, seg.name)
            if value and value != '""' and (element.interesting or len(value) > element.bound):
                self.leaf(element, value, position, number, 1, None, None, fdef)
            return
        reps = value.split(rep_sep) if rep_sep and rep_sep in value else (value,)
        if len(reps) > fdef.max > -1 and len(reps) > 1:
            self.run.add(W, ErrorCode.DATA_TYPE_ERROR,
                         f"{seg.name}-{number} ({_human(fdef.name)}) repeats {len(reps)} times; the standard allows {fdef.max}",
                         position, number)
        for r, rep_value in enumerate(reps, start=1):
            if rep_value and rep_value != '""':
                self.value(element, rep_value, position, number, r, fdef)

    def _obx_type(self, position: int, fields: list[str]):
        value_type = fields[2].split(self.comp)[0] if len(fields) > 2 and self.comp else (fields[2] if len(fields) > 2 else "")
        if not value_type:
            self.run.add(E, ErrorCode.REQUIRED_FIELD_MISSING, "OBX-2 (value type) is missing but OBX-5 is valued", position, 2)
            return None
        element = self.profile.datatype(value_type)
        if element is None:
            self.run.add(E, ErrorCode.TABLE_VALUE_NOT_FOUND,
                         f"OBX-2 value type {value_type!r} is not a v{self.profile.version} datatype, so OBX-5 cannot be checked", position, 2)
        return element

    def _primitive_with_components(self, leaf: Leaf, value: str, position, number, rep, segment: str) -> str:
        """HL7's receiving rules: components a primitive field does not have are ignored. Say so
        (a warning, an error under --strict) and check the first component as the value."""
        comps = value.split(self.comp)
        extra = sum(1 for c in comps[1:] if c)
        if extra:
            self.run.add(self.soft, ErrorCode.DATA_TYPE_ERROR,
                         f"{segment}-{number} is {leaf.datatype}, which has no components, but has {len(comps)}; "
                         f"receivers ignore all but the first", position, number, rep)
        first = comps[0]
        return first.split(self.sub, 1)[0] if self.sub and self.sub in first else first

    def value(self, element, value: str, position, number, rep, fdef: FieldDef) -> None:
        if element.__class__ is Leaf:
            if self.comp and self.comp in value:
                value = self._primitive_with_components(element, value, position, number, rep, self.run.names[position])
            if value and value != '""' and (element.interesting or len(value) > element.bound):
                self.leaf(element, value, position, number, rep, None, None, fdef)
            return
        comp_sep, sub_sep = self.comp, self.sub
        pairs = _pair_checks(element)
        if pairs:
            self._pairs(element, pairs, value, comp_sep, sub_sep, position, number, rep)
        short = len(value) <= element.bound  # then no unvisited component can be too long
        if short and not element.checked:
            return
        comps = value.split(comp_sep) if comp_sep else (value,)
        count = len(comps)
        if count > len(element.components):
            self.run.add(W, ErrorCode.DATA_TYPE_ERROR,
                         f"{self.run.names[position]}-{number} has {count} components; "
                         f"{element.datatype} has {len(element.components)}", position, number, rep)
        for c, sub_element in (element.checked if short else element.indexed):
            if c > count:
                break
            comp_value = comps[c - 1]
            if not comp_value or comp_value == '""':  # "" is HL7's explicit null, in a component too
                continue
            if sub_element.__class__ is Leaf:
                if sub_element.check is None and len(comp_value) <= sub_element.limit:
                    values = sub_element.values
                    if values is None or comp_value in values:
                        continue  # the common case: nothing to check or a table hit
                elif sub_sep and sub_sep in comp_value:
                    comp_value = comp_value.split(sub_sep, 1)[0]
                self.leaf(sub_element, comp_value, position, number, rep, c, None, fdef)
                continue
            subs = comp_value.split(sub_sep) if sub_sep else (comp_value,)
            subcomponents = sub_element.components
            for s, sub_value in enumerate(subs[: len(subcomponents)], start=1):
                leaf = subcomponents[s - 1][1]
                if sub_value and sub_value != '""' and leaf.__class__ is Leaf and (leaf.interesting or len(sub_value) > leaf.bound):
                    self.leaf(leaf, sub_value, position, number, rep, c, s, fdef)

    def _pairs(self, element, pairs: tuple, value: str, comp_sep, sub_sep, position, number, rep) -> None:
        """Chapter 2A's rules between the components of a data type (``_PAIR_RULES``), in the value
        and in its components of such a type (CX.4, an HD, in subcomponents)."""
        comps = value.split(comp_sep) if comp_sep else [value]
        for c, datatype, rules in pairs:
            if c == 0:
                parts = comps
            else:
                if c > len(comps) or not comps[c - 1]:
                    continue
                parts = comps[c - 1].split(sub_sep) if sub_sep else [comps[c - 1]]
            for first, second, both in rules:
                a = first <= len(parts) and parts[first - 1] not in ("", '""')
                b = second <= len(parts) and parts[second - 1] not in ("", '""')
                if a and not b or (both and b and not a):
                    have, lack = (first, second) if a else (second, first)
                    rule = "are both valued or both empty" if both else f"is required when {datatype}.{first} is valued"
                    subject = (f"{datatype}.{first} and {datatype}.{second} {rule}" if both
                               else f"{datatype}.{second} {rule}")
                    self.run.add(self.soft, ErrorCode.DATA_TYPE_ERROR,
                                 f"{subject} (HL7 chapter 2A, {datatype}): {datatype}.{have} without {datatype}.{lack}",
                                 position, number, rep, lack if c == 0 else c, None if c == 0 else lack)

    def leaf(self, leaf: Leaf, value: str, position, number, rep, comp, sub, fdef: FieldDef) -> None:
        check = leaf.check
        if check is not None:
            problem = check(value)
            if problem:
                self.run.add(E, ErrorCode.DATA_TYPE_ERROR, f"{as_written(value[:40])} {problem}", position, number, rep, comp, sub)
                return
        if leaf.max_length is not None and len(value) > leaf.max_length:
            length = len(self._text(value))
            if length > leaf.max_length:
                self.run.add(self.soft, ErrorCode.VALUE_TOO_LONG,
                             f"value is {length} characters; {leaf.datatype} allows {leaf.max_length}", position, number, rep, comp, sub)
        values = leaf.values
        if values is not None and value not in values:
            text = self._text(value)
            site_defined = (leaf.table in _Z_TABLES and text[:1] == "Z") or text in self.extra.get(leaf.table, ())
            if text not in values and not site_defined and not (leaf.table == "HL70396" and _CODING_SYSTEM.fullmatch(text)):
                if leaf.datatype == "ID":
                    self.run.add(self.soft, ErrorCode.TABLE_VALUE_NOT_FOUND,
                                 f"{as_written(text[:40])} is not in HL7 table {leaf.table[3:]}", position, number, rep, comp, sub)
                else:
                    # IS tables are user-defined: the standard's values are only suggestions.
                    self.run.add(W, ErrorCode.TABLE_VALUE_NOT_FOUND,
                                 f"{as_written(text[:40])} is not among the suggested values of user-defined table {leaf.table[3:]}",
                                 position, number, rep, comp, sub)

    def _text(self, value: str) -> str:
        if self.esc and self.esc in value:
            return unescape(value, self.d, self.run.msg.codec)
        return value


# Chapter 2A's rules between a data type's components: (first, second, both): with both, the two
# are valued together or not at all; else the second is required when the first is valued. HD and
# EI are checked wherever they are (CX.4, XON.6, XCN.9 hold an HD in subcomponents). A code's
# coding system (CWE.1 and CWE.3) is not among them: the base standard conditions it from v2.7
# only, and HL7-table codes are sent without it in practice; a profile states it where a guide does.
_PAIR_RULES = {
    "HD": ((2, 3, True),),  # universal id and its type
    "EI": ((3, 4, True),),  # universal id and its type
}
_PAIR_CHECKS: dict[int, tuple] = {}  # id(composite definition) -> ((component or 0, datatype, rules), ...)


def _pair_checks(element) -> tuple:
    """Where the pair rules apply in a composite: itself (0) and its components of such a type."""
    key = id(element)
    found = _PAIR_CHECKS.get(key)
    if found is None:
        found = []
        if element.datatype in _PAIR_RULES:
            found.append((0, element.datatype, _PAIR_RULES[element.datatype]))
        for c, sub in element.indexed:
            if sub.__class__ is not Leaf and sub.datatype in _PAIR_RULES:
                found.append((c, sub.datatype, _PAIR_RULES[sub.datatype]))
        # the definitions live as long as their profile (cached per version): their ids are stable
        found = _PAIR_CHECKS[key] = tuple(found)
    return found


# message types (0076), events (0003) and structures (0354): HL7 leaves the Z values to each site
_Z_TABLES = frozenset({"HL70076", "HL70003", "HL70354"})


def as_written(value: str) -> str:
    """A value quoted as it is in the message (``'^~\\&'``, one backslash), where repr() would double
    a backslash; repr() only for what cannot be printed."""
    # a closing backslash would read as an escaped quote where quoted values are found (ops/phi masks them)
    plain = value.isprintable() and "'" not in value and not value.endswith("\\")
    return f"'{value}'" if plain else repr(value)


def _human(name: str) -> str:
    return name.replace("_", " ").lower()


class _Matcher:
    """Greedy walk of the message structure with recovery, so every problem is reported once.

    At each step the next segment either starts the current node (consume it), may come after
    the node (move on; a required node not seen is missing), or fits nowhere here: it is reported
    (out of order when the structure has it elsewhere, else not allowed) and skipped.
    """

    def __init__(self, run: _Run, structure: Node, positions: list[int]):
        self.ctx = run
        self.structure = structure
        self.positions = positions
        self.names = [run.names[p] for p in positions]
        self.missing: dict[str, int] = {}  # segment name -> index of its "missing" finding
        self.displaced: set[str] = set()  # segments reported out of order before their place
        self.displacements = 0
        self.pos = 0
        self.groups: list[tuple[str, int, int]] = []  # (group, first, last position) of each instance read

    def match(self) -> None:
        root = self.structure
        # MSH was consumed before: start after it, at the root's second child
        self._sequence(root, skip_first=True)
        while self.pos < len(self.names):
            self._unexpected(root, None)

    def _consume(self, node: Node) -> None:
        if node.kind == "segment":
            self.pos += 1
        elif node.kind == "choice":
            name = self.names[self.pos]
            for child in node.children:
                if name in child.first:
                    self._consume(child)
                    return
        else:
            start = self.pos
            self._sequence(node)
            if self.pos > start:
                self.groups.append((node.name, self.positions[start], self.positions[self.pos - 1]))

    def _sequence(self, group: Node, skip_first: bool = False) -> None:
        names = self.names
        n = len(names)
        children = group.children[1:] if skip_first else group.children
        for index, child in enumerate(children):
            count = 0
            while self.pos < n:
                name = names[self.pos]
                if name in child.first and (child.max == -1 or count < child.max):
                    before = self.pos
                    if child.kind != "segment" and count >= child.min and (name in child.follow or name in child.later):
                        # Ambiguous: this segment may open the group or belong to something after
                        # it (OML_O21: an ORC opens a prior result or the next order). Enter only
                        # if that reads without errors.
                        # when it may just as well start what comes next, only a clean reading of
                        # this group wins: one that needed a displaced segment loses to ending here
                        if not self._attempt(child, clean=name in child.follow):
                            break
                    else:
                        self._consume(child)
                    if self.pos == before:
                        break
                    count += 1
                elif count == 0 and self._enters_late(child):
                    # the group's required first segment is missing but what opens it next is
                    # here (an order without its ORC): that segment is reported missing once and
                    # the group read from here, where every segment of it was reported before
                    self._missing(child.children[0])
                    self.displacements += 1  # evidence, like a displaced segment: an attempt may enter
                    self._sequence(child, skip_first=True)
                    count += 1
                elif name in child.follow:
                    break  # ends this node; a required node never seen is reported missing
                elif name in child.later:
                    # It belongs further on. If what comes right after it fits here, it is this
                    # one segment that is misplaced: report it once and carry on here, rather
                    # than jumping ahead and flagging every correct segment in between.
                    if self._fits_here(children, index, count):
                        self._displaced(name)
                        continue
                    break
                else:
                    self._unexpected(child, count)
            if count < child.min:
                self._missing(child)

    def _enters_late(self, group: Node) -> bool:
        """Whether the current segment opens ``group`` once its required first segment, missing,
        is passed over: it starts one of the children after it (up to the next required one), it
        does not belong right after the group, and the segment after it reads on in the group."""
        if group.kind != "sequence" or not group.children:
            return False
        first = group.children[0]
        if first.kind != "segment" or first.min < 1:
            return False
        names, pos = self.names, self.pos
        name = names[pos]
        if name in group.follow:
            return False
        opens = False
        for child in group.children[1:]:
            if name in child.first:
                opens = True
                break
            if not child.nullable:
                break
        if not opens:
            return False
        after = pos + 1
        return after >= len(names) or names[after] in group.segments or names[after] in group.follow

    def _fits_here(self, children: tuple, index: int, count: int) -> bool:
        """Whether the two segments after the current one read on from here, in order: then the
        current one is misplaced, not everything between here and its own place."""
        names = self.names
        following = self.pos + 1
        if following >= len(names):
            return False
        taker = None
        for j in range(index, len(children)):
            child = children[j]
            room = j > index or child.max == -1 or count < child.max
            if names[following] in child.first and room:
                taker = child
                break
            if not child.nullable and not (j == index and count >= child.min):
                return False  # a required node comes first: the next one does not fit here either
        if taker is None:
            return False
        after = following + 1
        return after >= len(names) or names[after] in taker.segments or names[after] in taker.follow

    def _displaced(self, name: str) -> None:
        run = self.ctx
        position = self.positions[self.pos]
        run.add(E, ErrorCode.SEGMENT_SEQUENCE_ERROR,
                f"segment {position + 1}: {name} is out of order or not expected here ({self._neighbours_of(self.pos)})",
                position)
        self.displaced.add(name)  # its own place, if required, is not reported missing again
        self.displacements += 1
        self.pos += 1

    def _attempt(self, node: Node, clean: bool = False) -> bool:
        """Consume ``node`` tentatively; undo and return False when that added an error (with
        ``clean``, also when it needed a displaced segment or a late entry)."""
        findings = self.ctx.findings
        saved = (self.pos, len(findings), dict(self.missing), set(self.displaced), self.displacements)
        groups = len(self.groups)
        self._consume(node)
        # a segment found misplaced inside does not count against entering: the two after it
        # read on in this group, which is evidence for it
        if len(findings) - saved[1] == self.displacements - saved[4] and not (clean and len(findings) > saved[1]):
            return True
        self.pos = saved[0]
        del findings[saved[1]:]
        del self.groups[groups:]
        self.missing, self.displaced, self.displacements = saved[2], saved[3], saved[4]
        return False

    def _neighbours(self) -> str:
        run = self.ctx
        if self.pos > 0:
            p = self.positions[self.pos - 1]
            before = f"after {run.names[p]} (segment {p + 1})"
        else:
            before = "after MSH (segment 1)"
        if self.pos < len(self.names):
            return f"{before}, before {self.names[self.pos]}"
        return before

    def _missing(self, node: Node) -> None:
        run = self.ctx
        structure = self.structure.name
        if node.kind == "segment":
            if node.name in self.displaced:
                self.displaced.discard(node.name)
                return  # it came early and was reported then
            text = f"required segment {node.name} missing; expected {self._neighbours()}"
            self.missing[node.name] = len(run.findings)
            name = node.name
        else:
            starts = "/".join(sorted(node.first)) or "?"
            short = node.name[len(structure) + 1:] if node.name.startswith(structure + "_") else node.name
            text = f"required group {short} (starting with {starts}) missing; expected {self._neighbours()}"
            name = None
        run.findings.append(Finding(E, ErrorCode.SEGMENT_SEQUENCE_ERROR, text, name or self._segment_here(), None))

    def _segment_here(self) -> str | None:
        return self.names[self.pos] if self.pos < len(self.names) else None

    def _unexpected(self, node: Node | None, count: int | None) -> None:
        run = self.ctx
        name = self.names[self.pos]
        position = self.positions[self.pos]
        where = self._neighbours_of(self.pos)
        if node is not None and count is not None and node.kind == "segment" and node.name == name:
            text = f"segment {position + 1}: {name} repeats; {self.structure.name} allows {node.max} here"
        elif name in self.missing:
            index = self.missing.pop(name)
            old = run.findings[index]
            expected = old.text.split("expected ", 1)[1]
            run.findings[index] = Finding(E, ErrorCode.SEGMENT_SEQUENCE_ERROR,
                                          f"segment {position + 1}: {name} is out of order; expected {expected}",
                                          name, position + 1, run.sequence_of[position])
            self.pos += 1
            return
        elif name in self.structure.segments:
            block = self._group_block(name)
            if block is not None:
                # the segments that follow it read on in a group it opens (a patient's PID and PV1
                # after the orders): one finding for the group, not one per segment
                group, end = block
                last = self.positions[end - 1]
                text = (f"segments {position + 1}-{last + 1} ({', '.join(self.names[self.pos:end])}): group "
                        f"{self._short(group)} is out of order or not expected here ({where})")
                run.add(E, ErrorCode.SEGMENT_SEQUENCE_ERROR, text, position)
                self.pos = end
                return
            text = f"segment {position + 1}: {name} is out of order or not expected here ({where})"
        else:
            text = f"segment {position + 1}: {name} is not part of the {self.structure.name} structure"
        run.add(E, ErrorCode.SEGMENT_SEQUENCE_ERROR, text, position)
        self.pos += 1

    def _group_block(self, name: str) -> tuple[Node, int] | None:
        """A group of the structure that ``name`` opens and whose segments the next ones are (at
        least one more): the group and where its run of segments ends, else None."""
        best = None
        for group in self._groups_opened_by(name):
            end = self.pos + 1
            while end < len(self.names) and self.names[end] in group.segments:
                end += 1
            if end - self.pos >= 2 and (best is None or end > best[1]):
                best = (group, end)
        return best

    def _groups_opened_by(self, name: str) -> list:
        found = []

        def walk(node: Node) -> None:
            for child in node.children:
                if child.kind == "sequence" and child.children and child.children[0].name == name:
                    found.append(child)
                if child.kind != "segment":
                    walk(child)

        walk(self.structure)
        return found

    def _short(self, group: Node) -> str:
        structure = self.structure.name
        return group.name[len(structure) + 1:] if group.name.startswith(structure + "_") else group.name

    def _neighbours_of(self, i: int) -> str:
        if i == 0:
            return "after MSH"
        return f"after {self.names[i - 1]} (segment {self.positions[i - 1] + 1})"
