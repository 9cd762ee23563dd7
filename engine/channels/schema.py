"""A JSON Schema of channel files, generated from the component specs (for editors)."""

from __future__ import annotations

from hl7relay.channels.channel import CHANNEL
from hl7relay.spec import registry

__all__ = ["channel_schema"]


def _one_key(kind: str) -> list:
    return [{"type": "object", "properties": {s.name: {"anyOf": [s.json_schema(), {"type": ["string", "array", "number"]}]}
                                              if s.shorthand else s.json_schema()},
             "required": [s.name], "additionalProperties": False, "description": s.description}
            for s in registry(kind)]


def _typed(kind: str, extra: dict | None = None) -> list:
    out = []
    for spec in registry(kind):
        schema = spec.json_schema()
        schema["properties"] = {"type": {"const": spec.name}, **(extra or {}), **schema["properties"]}
        schema["required"] = ["type", *(["name"] if extra else []), *schema["required"]]
        out.append(schema)
    return out


def channel_schema() -> dict:
    rule = {"$ref": "#/$defs/rule"}
    rules = {"anyOf": [rule, {"type": "array", "items": rule}]}
    steps = {"transformer": {"type": "array", "items": {"oneOf": _one_key("transformer")}},
             "validator": {"type": "array", "items": {"oneOf": _one_key("validator")}}}
    schema = CHANNEL.json_schema(custom={
        "source": {"oneOf": _typed("source")},
        "rule": rules,
        "steps": lambda option: steps[option.item],
        "destinations": {"type": "array", "items": {"oneOf": _typed("destination", {
            "name": {"type": "string"}, "filters": rules, "transformers": steps["transformer"]})}},
    })
    schema.update({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "hl7relay channel",
        "$defs": {"rule": {"oneOf": [
            {"type": "object", "properties": {"all": {"type": "array", "items": rule}}, "required": ["all"], "additionalProperties": False},
            {"type": "object", "properties": {"any": {"type": "array", "items": rule}}, "required": ["any"], "additionalProperties": False},
            {"type": "object", "properties": {"not": rule}, "required": ["not"], "additionalProperties": False},
            *_one_key("filter"),
        ]}},
    })
    return schema
