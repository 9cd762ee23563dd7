"""``hl7relay list``: the channel components and their options (from their specs)."""

from __future__ import annotations

import json

HELP = "list channel components and their options, or print the channel JSON Schema"
DESCRIPTION = """\
List every source, filter rule, transformer step, validator and destination with its options
(type, default, description), straight from the specs the components declare, the engine's own
settings (config/hl7relay.yaml) and the credential types from theirs. --schema prints a JSON Schema of the channel file
format for editors; --settings-schema one of the engine settings file."""


def add_arguments(parser) -> None:
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--schema", action="store_true", help="print the JSON Schema of channel files")
    parser.add_argument("--settings-schema", action="store_true", help="print the JSON Schema of the engine settings file")


def run(args) -> int:
    from hl7relay.channels.channel import CHANNEL
    from hl7relay.channels.schema import channel_schema
    from hl7relay.spec import KINDS, REQUIRED, registry

    from hl7relay.apiclient.credentials import credential_specs
    from hl7relay.cli._settings import cluster_spec, settings_schema, specs

    if args.schema:
        print(json.dumps(channel_schema(), indent=2))
        return 0
    if args.settings_schema:
        print(json.dumps(settings_schema(), indent=2))
        return 0
    if args.format == "json":
        print(json.dumps([{"kind": s.kind, "name": s.name, "description": s.description, "options": [
            {"name": o.name, "type": o.type, "required": o.required, "default": None if o.default is REQUIRED else o.default,
             "description": o.description, "choices": list(o.choices) or None} for o in s.options]}
            for s in [CHANNEL, *_sections(CHANNEL), *registry(), *specs(), *credential_specs().values()]], indent=2))
        return 0
    print("channel files (channels/NAME.yaml):")
    _print_options(CHANNEL)
    for section in _sections(CHANNEL):
        print(f"  {section.name}:")
        _print_options(section, indent="      ")
    print()
    for kind in KINDS:
        print(f"{kind}s:")
        for spec in registry(kind):
            print(f"  {spec.name}: {spec.description}")
            _print_options(spec, indent="      ")
        print()
    print("engine settings (config/hl7relay.yaml):")
    for spec in [*specs(), cluster_spec()]:
        print(f"  {spec.name}: {spec.description}")
        _print_options(spec, indent="      ")
    print()
    print("credentials (credentials: in config/hl7relay.yaml, or config/credentials.yaml; by type):")
    for spec in credential_specs().values():
        print(f"  {spec.name}: {spec.description}")
        _print_options(spec, indent="      ")
    return 0


def _print_options(spec, indent="  ") -> None:
    for option in spec.options:
        default = "required" if option.required else f"default {option.default!r}"
        choices = f" ({' | '.join(map(str, option.choices))})" if option.choices else ""
        print(f"{indent}{option.name}: {option.type}{choices}, {default}. {option.description}")


def _sections(spec) -> list:
    return [option.section for option in spec.options if option.section is not None]
