"""Transformer steps: declarative edits of the message, applied in order.

Each list item names one step: ``- set: {path: MSH-5, value: LAB}``. Paths are HL7 paths; values
are plain text (escaped on write) unless ``raw: true``. A path may name every segment of its name
or every repetition of its field (``OBX[*]-3.1``, ``PID-3[*].4``): the step is applied to each.
A step changes only segments the message has: writing into one it lacks (a ``set``, a ``map``'s
``default``) is no change, unless the step says ``create: true`` (a results feed must never gain
a segment nobody sent).
"""

from __future__ import annotations

import csv
import io
import datetime
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

from hl7relay.spec import Option, register
from hl7relay.errors import HL7RelayError
from hl7relay.hl7.message import HEADER_SEGMENTS, Message
from hl7relay.hl7.path import StepPath, parse_step_path
from hl7relay.transformers.places import paired_places, places

__all__ = ["TransformError", "Step"]


class TransformError(HL7RelayError):
    """A transformer step could not be applied to a message (it is stored as ERROR, answered AE)."""


class Step:
    converts = False  # True: convert(message) returns a new document (fhir) instead of editing it

    def apply(self, message: Message) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def _many(text: str) -> StepPath:
    """A step's path, parsed once when the channel is loaded (``[*]`` and groups allowed)."""
    return parse_step_path(text)


_CREATE = Option("create", "bool", False, "add the segment when the message has none (otherwise: no change)")


@dataclass(slots=True)
class SetValue(Step):
    path: StepPath
    value: str
    raw: bool
    create: bool = False

    def apply(self, message):
        write = message.set_raw if self.raw else message.set
        for place in places(message, self.path, self.create):
            write(place, self.value)


@register("transformer", "set", "write a value into a field (of every segment or repetition with [*])", [
    Option("path", "hl7path*", description="where, e.g. MSH-5, or OBX[*]-11 for every OBX"),
    Option("value", "str", description="the value (plain text; delimiters are escaped)"),
    Option("raw", "bool", False, "value is already-encoded HL7 (e.g. DOE^JOHN)"),
    _CREATE,
])
def _set(options, context=None):
    return SetValue(_many(options["path"]), options["value"], options["raw"], options["create"])


@dataclass(slots=True)
class Copy(Step):
    source: StepPath
    target: StepPath
    clear_source: bool
    create: bool = False

    def apply(self, message):
        found = False
        for place, targets in paired_places(message, self.source, self.target, self.create):
            found = True
            # the encoded text, escapes kept: a decoded SMITH\S\JONES written back would be two components
            value = message.get_raw(place)
            # MSH-1/MSH-2 are the delimiters themselves: written elsewhere as text, escaped
            write = message.set if place.field <= 2 and place.segment in HEADER_SEGMENTS else message.set_raw
            for target in targets:
                write(target, value)
            if self.clear_source:
                message.set(place, "")
        if not found and not self.source.many:
            # copying from a segment the message lacks writes an empty value, as copying an empty field does
            for target in places(message, self.target, self.create):
                message.set(target, "")


@register("transformer", "copy", "copy one field's value into another ([*] on both: within each segment)", [
    Option("from", "hl7path*", description="source field"), Option("to", "hl7path*", description="target field"),
    _CREATE])
def _copy(options, context=None):
    return Copy(_many(options["from"]), _many(options["to"]), False, options["create"])


@register("transformer", "move", "copy a field into another, then clear the source", [
    Option("from", "hl7path*", description="source field"), Option("to", "hl7path*", description="target field"),
    _CREATE])
def _move(options, context=None):
    return Copy(_many(options["from"]), _many(options["to"]), True, options["create"])


@register("transformer", "clear", "empty a field (of every segment or repetition with [*])",
          [Option("path", "hl7path*", description="the field")], shorthand="path")
def _clear(options, context=None):
    return SetValue(_many(options["path"]), "", False)


@dataclass(slots=True)
class DeleteSegment(Step):
    segment: str
    occurrence: int  # 0: all

    def apply(self, message):
        if self.occurrence:
            message.delete_segment(self.segment, self.occurrence)
        else:
            while message.delete_segment(self.segment, 1):
                pass


@register("transformer", "delete_segment", "remove a segment (every one of that name unless occurrence is given)", [
    Option("segment", "str", description="segment name, e.g. NTE"),
    Option("occurrence", "int", 0, "which one (1-based); 0 means all")], shorthand="segment")
def _delete_segment(options, context=None):
    if options["segment"] == "MSH":
        raise ValueError("MSH cannot be deleted")
    return DeleteSegment(options["segment"], options["occurrence"])


@dataclass(slots=True)
class AddSegment(Step):
    text: str
    after: str | None

    def apply(self, message):
        if self.after:
            names = message.segment_names()
            if self.after in names:
                position = len(names) - 1 - names[::-1].index(self.after)
                message.insert_segment(position + 1, self.text)
                return
        message.append_segment(self.text)


@register("transformer", "add_segment", "add a segment, after the last segment of a name or at the end", [
    Option("segment", "str", description="the segment's HL7 text, e.g. 'ZPI|1|text'"),
    Option("after", "str", None, "segment name to insert after (default: at the end)")], shorthand="segment")
def _add_segment(options, context=None):
    return AddSegment(options["segment"], options["after"])


_KEEP = object()


@dataclass(slots=True)
class MapValue(Step):
    path: StepPath
    table: dict
    default: object
    create: bool = False

    def apply(self, message):
        for place in places(message, self.path, self.create):
            mapped = self.table.get(message.get(place), self.default)
            if mapped is not _KEEP:
                message.set(place, mapped)


def load_lookup_csv(path: Path) -> dict:
    """Two columns, from and to; blank lines and lines starting with # are skipped."""
    table = {}
    from hl7relay.yamlsource import read_config_text

    with io.StringIO(read_config_text(path), newline="") as f:
        for row in csv.reader(f):
            if not row or row[0].startswith("#"):
                continue
            if len(row) < 2:
                raise ValueError(f"{path}: line {len(table) + 1}: a row needs two columns (from,to)")
            table[row[0].strip()] = row[1].strip()
    return table


@register("transformer", "map", "map a field's value through a lookup table (inline or a CSV file)", [
    Option("path", "hl7path*", description="the field to map, e.g. OBX[*]-3.1 for every OBX"),
    Option("table", "map", None, "inline table, from: to"),
    Option("file", "str", None, "CSV file with two columns from,to (relative to the channel file)"),
    Option("default", "str", None, "value on a miss (default: keep the original)"),
    _CREATE,
])
def _map(options, context=None):
    if (options["table"] is None) == (options["file"] is None):
        raise ValueError("map needs exactly one of 'table' or 'file'")
    table = options["table"]
    if table is None:
        base = Path(getattr(context, "base_dir", "."))
        file = Path(options["file"])
        table = load_lookup_csv(file if file.is_absolute() else base / file)
    return MapValue(_many(options["path"]), dict(table), _KEEP if options["default"] is None else options["default"],
                    options["create"])


def _parse_hl7_datetime(value: str) -> datetime.datetime:
    match = re.fullmatch(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?([+-]\d{4})?", value)
    if not match:
        raise TransformError(f"{value!r} is not an HL7 date/time")
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    tz = None
    if offset:
        sign = 1 if offset[0] == "+" else -1
        tz = datetime.timezone(sign * datetime.timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5])))
    micro = int((fraction or "0").ljust(6, "0")[:6])
    return datetime.datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0),
                             int(second or 0), micro, tz)


@dataclass(slots=True)
class FormatDate(Step):
    path: StepPath
    input: str
    output: str

    def apply(self, message):
        for place in places(message, self.path):
            value = message.get(place)
            if not value:
                continue
            try:
                moment = _parse_hl7_datetime(value) if self.input == "hl7" else datetime.datetime.strptime(value, self.input)
            except TransformError as exc:
                raise TransformError(f"{place}: {exc}") from None
            except ValueError as exc:
                raise TransformError(f"{place}: {value!r} does not match {self.input!r}: {exc}") from None
            message.set(place, moment.strftime("%Y%m%d%H%M%S") if self.output == "hl7" else moment.strftime(self.output))


@register("transformer", "format_date", "reformat a date/time (strftime formats; 'hl7' means YYYYMMDD[HHMMSS])", [
    Option("path", "hl7path*", description="the field"),
    Option("input", "str", "hl7", "format of the value now"),
    Option("output", "str", description="format to write, e.g. %d/%m/%Y"),
])
def _format_date(options, context=None):
    return FormatDate(_many(options["path"]), options["input"], options["output"])


@dataclass(slots=True)
class Case(Step):
    path: StepPath
    function: object

    def apply(self, message):
        for place in places(message, self.path):
            value = message.get(place)
            if value:
                message.set(place, self.function(value))


@register("transformer", "upper", "upper-case a field", [Option("path", "hl7path*", description="the field")], shorthand="path")
def _upper(options, context=None):
    return Case(_many(options["path"]), str.upper)


@register("transformer", "lower", "lower-case a field", [Option("path", "hl7path*", description="the field")], shorthand="path")
def _lower(options, context=None):
    return Case(_many(options["path"]), str.lower)


@register("transformer", "trim", "strip spaces around a field's value", [Option("path", "hl7path*", description="the field")], shorthand="path")
def _trim(options, context=None):
    return Case(_many(options["path"]), str.strip)


@dataclass(slots=True)
class Replace(Step):
    path: StepPath
    pattern: re.Pattern
    replacement: str

    def apply(self, message):
        for place in places(message, self.path):
            value = message.get(place)
            if value:
                message.set(place, self.pattern.sub(self.replacement, value))


@register("transformer", "replace", "regular-expression replace within a field", [
    Option("path", "hl7path*", description="the field"),
    Option("regex", "regex", description="pattern"),
    Option("with", "str", "", "replacement (\\1 for groups)"),
])
def _replace(options, context=None):
    return Replace(_many(options["path"]), re.compile(options["regex"]), options["with"])


@dataclass(slots=True)
class PythonStep(Step):
    name: str
    function: object

    def apply(self, message):
        try:
            self.function(message)
        except HL7RelayError:
            raise
        except Exception as exc:  # custom code: report what it raised, as a transform error
            raise TransformError(f"{self.name} raised {type(exc).__name__}: {exc}") from exc


@register("transformer", "python", "call custom code: a function that receives the Message and edits it", [
    Option("function", "str", description="package.module:function")], shorthand="function")
def _python(options, context=None):
    target = options["function"]
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{target!r}: write it as package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name}: {exc}") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"{module_name} has no function {attribute!r}")
    return PythonStep(target, function)
