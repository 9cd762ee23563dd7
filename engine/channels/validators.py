"""Channel validators: structure validation for the message's version, and required fields.

``on_error: reject`` (default) stores the message as ERROR and answers AE with the findings;
``warn`` keeps the findings with the message and processes it anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

from hl7relay.outcomes import ErrorCode, Severity
from hl7relay.spec import Option, register
from hl7relay.hl7.message import Message
from hl7relay.hl7.path import parse_path
from hl7relay.validation import ACCEPTED_VERSIONS, Finding, Validator

__all__ = ["ChannelValidator"]

_ON_ERROR = Option("on_error", "enum", "reject", "reject: AE and ERROR; warn: keep the findings, go on", ("reject", "warn"))


class ChannelValidator:
    on_error: str

    def check(self, message: Message) -> list[Finding]:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(slots=True)
class StructureValidator(ChannelValidator):
    validator: Validator
    on_error: str

    def check(self, message):
        return self.validator.validate(message).findings


@register("validator", "structure", "validate against the HL7 standard for the message's version (as hl7relay validate)", [
    Option("version", "enum", None, "check against this version instead of MSH-12", ACCEPTED_VERSIONS),
    Option("strict", "bool", False, "table values, lengths and LF endings are errors"),
    Option("table_values", "str", None, "a site's additions to HL7 tables (YAML file, relative to the channel file): "
                                        "\"0396\": [CODE, ...]"),
    _ON_ERROR,
])
def _structure(options, context=None):
    table_values = {}
    if options["table_values"]:
        from pathlib import Path

        from hl7relay.validation.corrections import load_table_values

        file = Path(options["table_values"])
        table_values, errors = load_table_values(file if file.is_absolute() else Path(getattr(context, "base_dir", ".")) / file)
        if errors:
            raise ValueError("; ".join(str(e) for e in errors))
    return StructureValidator(Validator(options["version"], options["strict"], table_values=table_values), options["on_error"])


@dataclass(slots=True)
class RequiredFields(ChannelValidator):
    paths: list
    on_error: str

    def check(self, message):
        findings = []
        for text in self.paths:
            if not message.get(text):
                p = parse_path(text)
                findings.append(Finding(Severity.ERROR, ErrorCode.REQUIRED_FIELD_MISSING,
                                        f"{text} is required by this channel", p.segment, None, p.occurrence,
                                        p.field, p.repetition, p.component, p.subcomponent))
        return findings


@register("validator", "required", "fields that must have a value", [
    Option("paths", "list", description="HL7 paths, e.g. [PID-3.1, PID-5.1]", item="hl7path"), _ON_ERROR,
], shorthand="paths")
def _required(options, context=None):
    return RequiredFields(options["paths"], options["on_error"])


@dataclass(slots=True)
class ProfileValidator(ChannelValidator):
    profile: object  # ConformanceProfile
    on_error: str

    def check(self, message):
        return self.profile.check(message)


@register("validator", "profile", "check a conformance profile (YAML: required, forbidden and allowed values, "
          "lengths, segment counts; see config/profiles/)", [
    Option("file", "str", description="the profile file (relative to the channel file)"),
    _ON_ERROR,
], shorthand="file")
def _profile(options, context=None):
    from pathlib import Path

    from hl7relay.validation.conformance import load_conformance_profile

    path = Path(options["file"])
    base = getattr(context, "base_dir", None)
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    profile, errors = load_conformance_profile(path)
    if errors:
        raise ValueError("the profile has problems: " + "; ".join(str(e) for e in errors[:5])
                         + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""))
    return ProfileValidator(profile, options["on_error"])
