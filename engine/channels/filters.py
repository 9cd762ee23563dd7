"""Filter rules. A channel's (or destination's) ``filters`` is one rule or a list of rules (all
must match); ``all:``, ``any:`` and ``not:`` combine rules. A message that does not pass is
FILTERED: stored, not processed further, and answered AR by default."""

from __future__ import annotations

import re
from dataclasses import dataclass

from hl7relay.spec import Option, register
from hl7relay.hl7.message import Message

__all__ = ["Rule", "AllOf", "AnyOf", "Not"]


class Rule:
    def matches(self, message: Message) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(slots=True)
class AllOf(Rule):
    rules: list

    def matches(self, message):
        return all(rule.matches(message) for rule in self.rules)


@dataclass(slots=True)
class AnyOf(Rule):
    rules: list

    def matches(self, message):
        return any(rule.matches(message) for rule in self.rules)


@dataclass(slots=True)
class Not(Rule):
    rule: Rule

    def matches(self, message):
        return not self.rule.matches(message)


@dataclass(slots=True)
class _HeaderIn(Rule):
    path: str
    values: frozenset

    def matches(self, message):
        return message.get(self.path) in self.values


# Header rules: ``message_type: ADT`` or ``event: [A01, A04]`` (a value or a list of values).
_HEADER_RULES = (
    ("message_type", "MSH-9.1", "MSH-9.1 is one of the values, e.g. message_type: ADT or [ADT, SIU]", "message types"),
    ("event", "MSH-9.2", "MSH-9.2 (trigger event) is one of the values, e.g. event: [A01, A04, A08]", "trigger events"),
    ("sending_application", "MSH-3.1", "MSH-3.1 is one of the values", "sending applications"),
    ("sending_facility", "MSH-4.1", "MSH-4.1 is one of the values", "sending facilities"),
)
for _name, _path, _description, _what in _HEADER_RULES:
    register("filter", _name, _description, [Option("values", "strlist", description=_what)], shorthand="values")(
        lambda options, context=None, path=_path: _HeaderIn(path, frozenset(options["values"])))


@dataclass(slots=True)
class FieldRule(Rule):
    path: str
    equals: str | None = None
    values: frozenset | None = None
    pattern: re.Pattern | None = None
    exists: bool | None = None
    empty: bool | None = None

    def matches(self, message):
        value = message.get(self.path)
        if self.exists is not None and bool(value) != self.exists:
            return False
        if self.empty is not None and (value == "" or value == '""') != self.empty:
            return False
        if self.equals is not None and value != self.equals:
            return False
        if self.values is not None and value not in self.values:
            return False
        if self.pattern is not None and self.pattern.search(value) is None:
            return False
        return True


@register("filter", "field", "a field test: equals, in, regex, exists, empty (all given must hold)", [
    Option("path", "hl7path", description="the field, e.g. PID-3.1"),
    Option("equals", "str", None, "the value equals this"),
    Option("in", "strlist", None, "the value is one of these"),
    Option("regex", "regex", None, "the value matches this regular expression (search)"),
    Option("exists", "bool", None, "true: the field has a value; false: it has none"),
    Option("empty", "bool", None, "true: the field is empty or \"\""),
])
def _field(options, context=None):
    pattern = re.compile(options["regex"]) if options["regex"] is not None else None
    values = frozenset(options["in"]) if options["in"] is not None else None
    return FieldRule(options["path"], options["equals"], values, pattern, options["exists"], options["empty"])
