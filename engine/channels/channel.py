"""Channel files: one channel per YAML file, loaded into a :class:`Channel` or a list of errors.

```yaml
name: adt-to-lab
source: {type: mllp, port: 2575}
filters: [{message_type: ADT}, {event: [A01, A04, A08]}]
transformers:
  - set: {path: MSH-5, value: LAB}
  - map: {path: PV1-2, table: {I: IN, O: OUT}, default: OTHER}
validators:
  - structure: {on_error: reject}
response: {when: on_store, filtered: AR}
destinations:
  - {name: lab, type: mllp, host: "${LAB_HOST:-127.0.0.1}", port: 2576}
storage: {stages: [transformed, destinations, acks]}
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hl7relay.channels.filters import AllOf, AnyOf, Not
from hl7relay.channels.spec import ComponentSpec, Option, check_options, did_you_mean, lookup, registry
from hl7relay.channels.yamlsource import ConfigError, Document, load_document

__all__ = ["Channel", "Destination", "Duplicates", "Response", "load_channel", "load_channels", "channel_files", "CHANNEL_KEYS"]

STAGES = ("transformed", "destinations", "acks")


@dataclass(slots=True)
class Response:
    when: str = "on_store"  # or after_delivery
    filtered: str = "AR"
    application: str = "HL7RELAY"
    facility: str = ""


@dataclass(slots=True, frozen=True)
class Duplicates:
    key: tuple
    window: float


@dataclass(slots=True, frozen=True)
class Retention:
    days: float
    errors_days: float


@dataclass(slots=True)
class Destination:
    name: str
    type: str
    config: object
    filter: object = None
    steps: list = field(default_factory=list)


@dataclass(slots=True)
class Channel:
    name: str
    file: str
    source_type: str
    source: object
    description: str = ""
    enabled: bool = True
    filter: object = None
    steps: list = field(default_factory=list)
    validators: list = field(default_factory=list)
    response: Response = field(default_factory=Response)
    destinations: list = field(default_factory=list)
    stages: frozenset = frozenset(STAGES)
    secrets: frozenset = frozenset()
    duplicates: Duplicates | None = None
    retention: Retention | None = None
    log_level: str | None = None
    log_phi: bool = False
    # what the file says, after ${...} substitution: a reload leaves a channel whose fingerprint
    # did not change untouched (files it names, such as lookup tables, are read when it changes)
    fingerprint: str = ""


@dataclass(slots=True)
class _Context:
    base_dir: Path


CHANNEL_KEYS = {
    "name": "the channel's name (unique)",
    "description": "what the channel is for",
    "enabled": "false to keep the file but not run it",
    "source": "where messages come from: {type: mllp | file, ...}",
    "filters": "rules a message must pass: a rule, a list (all), or all/any/not",
    "transformers": "steps applied in order: - set: {...}",
    "validators": "checks: - structure: {...} / - required: {...}",
    "response": "ACK behaviour: when (on_store | after_delivery), filtered (AR | AA | AE)",
    "destinations": "where messages go: - {name, type: mllp | file | channel, ..., filters, transformers}",
    "storage": "stages kept besides the raw message: stages: [transformed, destinations, acks]",
    "duplicates": "duplicate detection: {key: [MSH-3, MSH-4, MSH-10], window: 86400}",
    "retention": "how long hl7relay prune keeps messages: {days: 30, errors_days: 90}",
    "log_level": "this channel's log level: error, warn, info, debug, trace",
    "log_phi": "true: message content may appear in this channel's trace logs (capped); default false",
}
_RESPONSE = ComponentSpec("setting", "response", "ACK behaviour", (
    Option("when", "enum", "on_store", "on_store: ACK once stored; after_delivery: ACK reflects the destinations' answers",
           ("on_store", "after_delivery")),
    Option("filtered", "enum", "AR", "the ACK code for a filtered message", ("AR", "AA", "AE")),
    Option("application", "str", "HL7RELAY", "MSH-3 of our ACKs when the message's MSH-5 is empty"),
    Option("facility", "str", "", "MSH-4 of our ACKs when the message's MSH-6 is empty"),
))
_DUPLICATES = ComponentSpec("setting", "duplicates", "duplicate detection", (
    Option("key", "list", ["MSH-3", "MSH-4", "MSH-10"], "fields that identify a message", item="hl7path"),
    Option("window", "duration", 86400.0, "seconds within which a repeated key is a duplicate"),
))
_RETENTION = ComponentSpec("setting", "retention", "how long messages are kept (hl7relay prune)", (
    Option("days", "float", 30.0, "days to keep messages"),
    Option("errors_days", "float", 90.0, "days to keep ERROR messages"),
))
_STORAGE = ComponentSpec("setting", "storage", "what is stored", (
    Option("stages", "list", list(STAGES), "stages kept besides the raw message (always kept)", item="str"),
))


class _Loader:
    def __init__(self, doc: Document, context: _Context):
        self.doc = doc
        self.context = context

    def error(self, path, message, key=False):
        self.doc.error(path, message, key)

    def build(self, spec: ComponentSpec, options, path):
        try:
            return spec.factory(options, self.context)
        except OSError as exc:
            self.error(path, f"{spec.kind} {spec.name!r}: cannot read {exc.filename}: {exc.strerror}")
            return None
        except ValueError as exc:
            self.error(path, f"{spec.kind} {spec.name!r}: {exc}")
            return None

    # -- filters --------------------------------------------------------------------------------
    def rule(self, value, path):
        if isinstance(value, list):
            rules = [self.rule(v, path + (i,)) for i, v in enumerate(value)]
            return AllOf(rules) if None not in rules else None
        names = [s.name for s in registry("filter")] + ["all", "any", "not"]
        if not isinstance(value, dict) or len(value) != 1:
            self.error(path, "a filter rule is a mapping with one key: all, any, not, or a rule "
                             f"({', '.join(s.name for s in registry('filter'))})")
            return None
        key, argument = next(iter(value.items()))
        if key in ("all", "any"):
            if not isinstance(argument, list) or not argument:
                self.error(path + (key,), f"{key} takes a list of rules")
                return None
            rules = [self.rule(v, path + (key, i)) for i, v in enumerate(argument)]
            return None if None in rules else (AllOf(rules) if key == "all" else AnyOf(rules))
        if key == "not":
            inner = self.rule(argument, path + (key,))
            return None if inner is None else Not(inner)
        spec = lookup("filter", key)
        if spec is None:
            self.error(path + (key,), f"unknown filter rule {key!r}{did_you_mean(key, names)}", key=True)
            return None
        options = check_options(spec, argument, self.doc, path + (key,))
        return None if options is None else self.build(spec, options, path + (key,))

    # -- transformer and validator lists ---------------------------------------------------------------
    def steps(self, kind: str, value, path):
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(path, f"{kind}s is a list of steps, e.g. - set: {{path: MSH-5, value: LAB}}")
            return None
        out = []
        ok = True
        for i, item in enumerate(value):
            if not isinstance(item, dict) or len(item) != 1:
                self.error(path + (i,), f"each {kind} is a mapping with one key naming it "
                                        f"({', '.join(s.name for s in registry(kind))})")
                ok = False
                continue
            name, options = next(iter(item.items()))
            spec = lookup(kind, name)
            if spec is None:
                self.error(path + (i, name), f"unknown {kind} {name!r}"
                           + did_you_mean(name, [s.name for s in registry(kind)]), key=True)
                ok = False
                continue
            checked = check_options(spec, options, self.doc, path + (i, name))
            built = None if checked is None else self.build(spec, checked, path + (i, name))
            if built is None:
                ok = False
            out.append(built)
        return out if ok else None

    # -- the channel --------------------------------------------------------------------------------
    def channel(self) -> Channel | None:
        data = self.doc.data
        if not isinstance(data, dict):
            self.error((), "a channel file is a mapping: name, source, filters, transformers, validators, "
                           "response, destinations, storage")
            return None
        for key in data:
            if key not in CHANNEL_KEYS:
                self.error((key,), f"unknown key {key!r}{did_you_mean(key, CHANNEL_KEYS)}", key=True)
        name = data.get("name")
        if not isinstance(name, str) or not name.strip():
            self.error(("name",) if "name" in data else (), "the channel needs a name (text)")
        enabled = data.get("enabled", True)
        if not isinstance(enabled, bool):
            self.error(("enabled",), "enabled must be true or false")
        source_type, source = self.typed("source", data.get("source"), ("source",), required=True)
        rule = self.rule(data["filters"], ("filters",)) if data.get("filters") is not None else None
        steps = self.steps("transformer", data.get("transformers"), ("transformers",))
        validators = self.steps("validator", data.get("validators"), ("validators",))
        response = check_options(_RESPONSE, data.get("response") or {}, self.doc, ("response",))
        storage = check_options(_STORAGE, data.get("storage") or {}, self.doc, ("storage",))
        if storage is not None:
            for i, stage in enumerate(storage["stages"]):
                if stage not in STAGES:
                    self.error(("storage", "stages", i), f"unknown stage {stage!r}; stages: {', '.join(STAGES)}"
                               + did_you_mean(stage, STAGES))
        destinations = self.destinations(data.get("destinations"))
        duplicates = None
        if data.get("duplicates") is not None:
            value = data["duplicates"]
            checked = check_options(_DUPLICATES, {} if value is True else value, self.doc, ("duplicates",))
            if checked is not None:
                duplicates = Duplicates(tuple(checked["key"]), checked["window"])
        log_level = data.get("log_level")
        if log_level is not None and log_level not in ("error", "warn", "info", "debug", "trace"):
            self.error(("log_level",), f"log_level must be one of error, warn, info, debug, trace, not {log_level!r}"
                       + did_you_mean(str(log_level), ("error", "warn", "info", "debug", "trace")))
        if not isinstance(data.get("log_phi", False), bool):
            self.error(("log_phi",), "log_phi must be true or false")
        retention = None
        if data.get("retention") is not None:
            checked = check_options(_RETENTION, data["retention"], self.doc, ("retention",))
            if checked is not None:
                retention = Retention(checked["days"], checked["errors_days"])
        if self.doc.errors:
            return None
        return Channel(
            name=name.strip(), file=self.doc.file, source_type=source_type, source=source,
            description=str(data.get("description") or ""), enabled=enabled, filter=rule, steps=steps,
            validators=validators, response=Response(**response), destinations=destinations,
            stages=frozenset(storage["stages"]), secrets=frozenset(self.doc.secrets), duplicates=duplicates,
            retention=retention, log_level=log_level, log_phi=data.get("log_phi", False),
        )

    def typed(self, kind: str, value, path, required=False, reserved=()):
        """A ``{type: NAME, ...options}`` mapping (sources and destinations)."""
        if value is None:
            if required:
                self.error(path if path[:-1] == () else path[:-1], f"the channel needs a {kind}: {{type: "
                           f"{' | '.join(s.name for s in registry(kind))}, ...}}")
            return None, None
        if not isinstance(value, dict) or "type" not in value:
            self.error(path, f"{kind} needs a type: {', '.join(s.name for s in registry(kind))}")
            return None, None
        type_name = value["type"]
        spec = lookup(kind, type_name) if isinstance(type_name, str) else None
        if spec is None:
            self.error(path + ("type",), f"unknown {kind} type {type_name!r}"
                       + did_you_mean(str(type_name), [s.name for s in registry(kind)]))
            return None, None
        options = {k: v for k, v in value.items() if k != "type"}
        checked = check_options(spec, options, self.doc, path, reserved=reserved)
        return type_name, (None if checked is None else self.build(spec, checked, path))

    def destinations(self, value):
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(("destinations",), "destinations is a list")
            return []
        out, names = [], set()
        for i, item in enumerate(value):
            path = ("destinations", i)
            if not isinstance(item, dict):
                self.error(path, "a destination is a mapping: {name, type, ...}")
                continue
            name = item.get("name")
            if not isinstance(name, str) or not name:
                self.error(path, "a destination needs a name")
            elif name in names:
                self.error(path + ("name",), f"duplicate destination name {name!r}")
            names.add(name)
            type_name, config = self.typed("destination", item, path, reserved=("name", "filters", "transformers"))
            rule = self.rule(item["filters"], path + ("filters",)) if item.get("filters") is not None else None
            steps = self.steps("transformer", item.get("transformers"), path + ("transformers",))
            if config is not None and isinstance(name, str):
                out.append(Destination(name, type_name, config, rule, steps or []))
        return out


def load_channel(path: str | Path, environ=None, display_name: str | None = None) -> tuple[Channel | None, list[ConfigError]]:
    doc = load_document(path, environ, display_name)
    if doc.errors:
        return None, doc.errors
    channel = _Loader(doc, _Context(Path(path).resolve().parent)).channel()
    if channel is not None:
        import hashlib
        import json

        channel.fingerprint = hashlib.sha256(json.dumps(doc.data, sort_keys=True, default=str).encode()).hexdigest()
    return channel, sorted(doc.errors, key=lambda e: (e.mark.line, e.mark.column))


def channel_files(paths) -> list[Path]:
    """The channel files among ``paths`` (folders are searched for *.yaml; *.test.yaml are tests,
    and files that start ``profile:`` are conformance profiles)."""
    files = []
    for item in paths:
        item = Path(item)
        candidates = sorted(item.glob("*.yaml")) + sorted(item.glob("*.yml")) if item.is_dir() else [item]
        files += [f for f in candidates if not f.name.endswith((".test.yaml", ".test.yml"))]
    from hl7relay.validation.conformance import is_profile_file

    return [f for f in files if not is_profile_file(f)]  # conformance profiles say `profile:` on top


def load_channels(paths, environ=None) -> tuple[list[Channel], list[ConfigError]]:
    """Load every channel file and check them together (names, ports, channel destinations)."""
    channels, errors = [], []
    for file in channel_files(paths):
        channel, problems = load_channel(file, environ)
        errors += problems
        if channel is not None:
            channels.append(channel)
    seen_names, seen_ports = {}, {}
    for channel in channels:
        first = seen_names.setdefault(channel.name, channel)
        if first is not channel:
            errors.append(ConfigError(_name_mark(channel), f"duplicate channel name {channel.name!r} (also in {first.file})"))
        listener = getattr(channel.source, "listener", None)
        if listener is not None and channel.enabled and listener.port != 0:  # 0: any free port, never shared
            key = (listener.host, listener.port)
            other = seen_ports.setdefault(key, channel)
            if other is not channel:
                errors.append(ConfigError(_name_mark(channel, "source"),
                                          f"port {listener.port} on {listener.host} is already used by channel {other.name!r}"))
    names = {c.name for c in channels}
    for channel in channels:
        for destination in channel.destinations:
            target = getattr(destination.config, "channel", None)
            if target is not None and target not in names:
                errors.append(ConfigError(_name_mark(channel, "destinations"),
                                          f"destination {destination.name!r} names channel {target!r}, which does not exist"
                                          + did_you_mean(target, names)))
    return channels, errors


def _name_mark(channel: Channel, key: str = "name"):
    doc = load_document(channel.file)
    return doc.mark((key,), key=True)
