"""A JSON Schema of channel files, generated from the component specs (for editors)."""

from __future__ import annotations

from hl7relay.channels.channel import _DUPLICATES, _RESPONSE, _RETENTION, _STORAGE, CHANNEL_KEYS
from hl7relay.channels.spec import registry

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
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "hl7relay channel",
        "type": "object",
        "required": ["name", "source"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "description": CHANNEL_KEYS["name"]},
            "description": {"type": "string"},
            "enabled": {"type": "boolean", "default": True},
            "source": {"oneOf": _typed("source"), "description": CHANNEL_KEYS["source"]},
            "filters": rules,
            "transformers": {"type": "array", "items": {"oneOf": _one_key("transformer")}},
            "validators": {"type": "array", "items": {"oneOf": _one_key("validator")}},
            "response": _RESPONSE.json_schema(),
            "destinations": {"type": "array", "items": {"oneOf": _typed("destination", {
                "name": {"type": "string"}, "filters": rules,
                "transformers": {"type": "array", "items": {"oneOf": _one_key("transformer")}}})}},
            "storage": _STORAGE.json_schema(),
            "retention": _RETENTION.json_schema(),
            "log_level": {"enum": ["error", "warn", "info", "debug", "trace"]},
            "log_phi": {"type": "boolean", "default": False},
            "duplicates": {"anyOf": [{"type": "boolean"}, _DUPLICATES.json_schema()], "description": CHANNEL_KEYS["duplicates"]},
        },
        "$defs": {"rule": {"oneOf": [
            {"type": "object", "properties": {"all": {"type": "array", "items": rule}}, "required": ["all"], "additionalProperties": False},
            {"type": "object", "properties": {"any": {"type": "array", "items": rule}}, "required": ["any"], "additionalProperties": False},
            {"type": "object", "properties": {"not": rule}, "required": ["not"], "additionalProperties": False},
            *_one_key("filter"),
        ]}},
    }
