"""Component specs: every filter rule, transformer step, validator, source and destination
declares its options with this module, beside its code, and registers by name. The specs drive
lint, the JSON Schema of the channel format and ``hl7relay list``.

The registry imports no component: the components import it. Importing :mod:`hl7relay.channels`
loads the built-in ones (its sources, destinations, filters, validators and the transformer
steps), so whoever reads the registry has imported the channels first.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from hl7relay.yamlsource import Document
from hl7relay.errors import PathError
from hl7relay.hl7.path import parse_path, parse_step_path

__all__ = ["Option", "ComponentSpec", "register", "registry", "lookup", "check_options", "did_you_mean", "REQUIRED",
           "STRUCTURED"]

REQUIRED = object()
KINDS = ("source", "filter", "transformer", "validator", "destination")

# option types: str, int, float, bool, hl7path, hl7path* (may name many: OBX[*]-5), enum, list (of item),
# map (str -> str), any, duration
_TYPE_NAMES = {"str": "text", "int": "a whole number", "float": "a number", "bool": "true or false",
               "hl7path": "an HL7 path such as PID-5.1", "hl7path*": "an HL7 path such as PID-5.1, OBX[*]-3.1 or ORDER_OBSERVATION[*]/OBX[*]-5",
               "enum": "one of", "list": "a list", "map": "a mapping",
               "any": "a value", "duration": "seconds (a number)", "strlist": "text or a list of text",
               "regex": "a regular expression", "section": "a mapping", "source": "a mapping with a type",
               "destinations": "a list of destinations", "rule": "a filter rule or a list of them",
               "steps": "a list of steps"}
# option types whose values are built by the channel loader itself (checked there, with positions)
STRUCTURED = ("source", "destinations", "rule", "steps")


@dataclass(frozen=True, slots=True)
class Option:
    name: str
    type: str
    default: object = REQUIRED
    description: str = ""
    choices: tuple = ()
    item: str | None = None  # for list: the type of each item; for steps: transformer or validator
    secret: bool = False
    section: "ComponentSpec | None" = None  # for section: the nested mapping's own spec
    flag: bool = False  # for section: `true` turns it on with its defaults, `false` off


    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(slots=True)
class ComponentSpec:
    kind: str
    name: str
    description: str
    options: tuple
    factory: object = None  # builds the component from its checked options
    shorthand: str | None = None  # ``name: VALUE`` sets this option when VALUE is not a mapping
    title: str | None = None  # how messages name it (default: "KIND 'NAME'")

    @property
    def what(self) -> str:
        return self.title or f"{self.kind} {self.name!r}"

    def option(self, name: str) -> Option | None:
        for option in self.options:
            if option.name == name:
                return option
        return None

    def json_schema(self, custom: dict | None = None) -> dict:
        """``custom`` gives the schema of option types built outside the spec machinery (the
        channel file's source, filters, steps and destinations)."""
        properties = {o.name: _schema_of(o, custom or {}) for o in self.options}
        schema = {"type": "object", "description": self.description, "properties": properties,
                  "required": [o.name for o in self.options if o.required], "additionalProperties": False}
        return schema


_REGISTRY: dict[tuple[str, str], ComponentSpec] = {}


def register(kind: str, name: str, description: str, options=(), shorthand: str | None = None):
    """Class or function decorator: ``@register("transformer", "set", "...", [Option(...)])``."""
    assert kind in KINDS, kind

    def decorate(factory):
        _REGISTRY[(kind, name)] = ComponentSpec(kind, name, description, tuple(options), factory, shorthand)
        return factory

    return decorate


def registry(kind: str | None = None) -> list[ComponentSpec]:
    _loaded()
    return [s for (k, _), s in sorted(_REGISTRY.items()) if kind is None or k == kind]


def lookup(kind: str, name: str) -> ComponentSpec | None:
    _loaded()
    return _REGISTRY.get((kind, name))


def _loaded() -> None:
    if not _REGISTRY:
        raise RuntimeError("no component is registered: import hl7relay.channels before reading the registry")


def did_you_mean(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r})" if close else ""


def _schema_of(option: Option, custom: dict) -> dict:
    t = option.type
    if t in custom:
        out = dict(custom[t](option) if callable(custom[t]) else custom[t])
    elif t == "section":
        out = option.section.json_schema(custom)
        if option.flag:
            out = {"anyOf": [{"type": "boolean"}, out]}
    elif t == "int":
        out = {"type": "integer"}
    elif t in ("float", "duration"):
        out = {"type": "number"}
    elif t == "bool":
        out = {"type": "boolean"}
    elif t == "enum":
        out = {"enum": list(option.choices)}
    elif t == "list":
        out = {"type": "array", "items": _schema_of(Option("item", option.item or "any"), custom)}
    elif t == "strlist":
        out = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
    elif t == "map":
        out = {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}}
    elif t == "any":
        out = {}
    else:
        out = {"type": "string"}
    if t in ("int", "float", "duration", "bool", "enum"):
        # ${VAR} / ${VAR:-default} stand for the value until the file is loaded
        out = {"anyOf": [out, {"type": "string", "pattern": r"^\$\{[^}]+\}$"}]}
    if option.description:
        out["description"] = option.description
    if t == "section":
        return out
    if not option.required and option.default is not None and not isinstance(option.default, (list, dict)):
        out["default"] = option.default
    return out


def _check_value(option: Option, value, doc: Document, path: tuple):
    """The value converted to the option's type, or None after reporting an error."""
    t = option.type
    what = _TYPE_NAMES.get(t, t)
    if t == "str":
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            doc.error(path, f"{option.name} must be {what}")
            return None
        return str(value)
    if isinstance(value, str) and t in ("int", "float", "duration") and value.strip().lstrip("-").replace(".", "", t != "int").isdigit():
        value = int(value) if t == "int" else float(value)  # e.g. port: ${LAB_PORT:-2576}
    if t == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            doc.error(path, f"{option.name} must be {what}, not {value!r}")
            return None
        return value
    if t in ("float", "duration"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            doc.error(path, f"{option.name} must be {what} (0 or more), not {value!r}")
            return None
        return float(value)
    if t == "bool":
        if not isinstance(value, bool):
            doc.error(path, f"{option.name} must be true or false, not {value!r}")
            return None
        return value
    if t == "enum":
        if value not in option.choices:
            doc.error(path, f"{option.name} must be one of {', '.join(map(str, option.choices))}, not {value!r}"
                            + did_you_mean(str(value), map(str, option.choices)))
            return None
        return value
    if t in ("hl7path", "hl7path*"):
        if not isinstance(value, str):
            doc.error(path, f"{option.name} must be {what}")
            return None
        try:
            parse_step_path(value) if t == "hl7path*" else parse_path(value)
        except PathError as exc:
            doc.error(path, f"invalid HL7 path: {exc}")
            return None
        return value
    if t == "regex":
        try:
            re.compile(str(value))
        except re.error as exc:
            doc.error(path, f"{option.name}: invalid regular expression: {exc}")
            return None
        return str(value)
    if t == "strlist":
        values = [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value
        if not isinstance(values, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
            doc.error(path, f"{option.name} must be {what}")
            return None
        return [str(v) for v in values]
    if t == "list":
        if not isinstance(value, list):
            doc.error(path, f"{option.name} must be a list")
            return None
        item = Option(option.name, option.item or "any")
        out = [_check_value(item, v, doc, path + (i,)) for i, v in enumerate(value)]
        return None if any(v is None for v in out) else out
    if t == "section":
        if option.flag and isinstance(value, bool):
            return check_options(option.section, {}, doc, path) if value else False
        return check_options(option.section, value, doc, path)
    if t == "map":
        if not isinstance(value, dict):
            doc.error(path, f"{option.name} must be a mapping")
            return None
        return {str(k): ("" if v is None else str(v)) for k, v in value.items()}
    return value


def check_options(spec: ComponentSpec, value, doc: Document, path: tuple, reserved=()) -> dict | None:
    """Check a component's options against its spec; report every problem; return them with defaults."""
    if not isinstance(value, dict):
        if spec.shorthand is not None and value is not None:
            value = {spec.shorthand: value}
        elif value is None and all(not o.required for o in spec.options):
            value = {}
        else:
            doc.error(path, f"{spec.what} takes a mapping of options: {', '.join(o.name for o in spec.options)}")
            return None
    result = {}
    ok = True
    names = [o.name for o in spec.options]
    for key in value:
        if key in reserved:
            continue
        if spec.option(key) is None:
            # at the top of a file the file says what it is; deeper, the message names the part
            doc.error(path + (key,), f"unknown key {key!r}" + (f" for {spec.what}" if path else "")
                      + did_you_mean(key, names + list(reserved)), key=True)
            ok = False
    for option in spec.options:
        if option.name in value and value[option.name] is None:
            # an empty value (`port:` or `port: null`) means the default; a required option has none
            if option.required:
                doc.error(path + (option.name,), f"{option.name} is empty; it needs "
                          f"{option.description or _TYPE_NAMES.get(option.type, option.type)}")
                ok = False
            else:
                result[option.name] = _default(option, doc, path)
        elif option.name in value:
            checked = _check_value(option, value[option.name], doc, path + (option.name,))
            if checked is None:
                ok = False
            result[option.name] = checked
        elif option.required:
            doc.error(path, f"{spec.what} needs {option.name!r} ({option.description or _TYPE_NAMES.get(option.type)})")
            ok = False
        else:
            result[option.name] = _default(option, doc, path)
    return result if ok else None


def _default(option: Option, doc: Document, path: tuple):
    # a section whose default is {} is always there, with its own options' defaults
    if option.type == "section" and option.default == {}:
        return check_options(option.section, {}, doc, path + (option.name,))
    return option.default
