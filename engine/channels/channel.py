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
from typing import Any

from hl7relay.channels.filters import AllOf, AnyOf, Not
from hl7relay.spec import ComponentSpec, Option, check_options, did_you_mean, lookup, registry
from hl7relay.yamlsource import ConfigError, Document, load_document
from hl7relay.outcomes import AckCode

__all__ = ["Channel", "Destination", "Duplicates", "Response", "load_channel", "load_channels", "channel_files", "CHANNEL",
           "CHANNEL_KEYS"]

STAGES = ("transformed", "destinations", "acks")


@dataclass(slots=True)
class Response:
    when: str = "on_store"  # or after_delivery
    filtered: str = AckCode.AR.value
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
    source: Any  # the source's config (sources.py), which names its runner
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
    # what the file says, after ${...} substitution, and the files it names (lookup tables, maps,
    # profiles): a reload leaves a channel whose fingerprint did not change untouched
    fingerprint: str = ""
    # id(filter rule, transformer or validator) -> how the file names it: "map at channels/adt.yaml:14:7"
    # (what the dry run shows; the components themselves know only their options)
    labels: dict = field(default_factory=dict, compare=False, repr=False)
    # the configuration snapshot it runs under (set by the engine at start and reload; None: not recorded)
    snapshot_id: int | None = field(default=None, compare=False)
    # the files it read besides its own (lookup tables, maps, profiles): a snapshot holds them too,
    # wherever they are
    config_files: tuple = field(default=(), compare=False, repr=False)


_TAKES_DOCUMENTS = frozenset({"http", "file", "fhir"})  # destinations that send what they are given, not HL7


@dataclass(slots=True)
class _Context:
    base_dir: Path
    timezone: str = "UTC"  # the channel's, for DTM values without an offset (fhir)


_RESPONSE = ComponentSpec("setting", "response", "ACK behaviour", (
    Option("when", "enum", "on_store", "on_store: ACK once stored; after_delivery: ACK reflects the destinations' answers",
           ("on_store", "after_delivery")),
    Option("filtered", "enum", AckCode.AR.value, "the ACK code for a filtered message",
           (AckCode.AR.value, AckCode.AA.value, AckCode.AE.value)),
    Option("application", "str", "HL7RELAY", "MSH-3 of our ACKs when the message's MSH-5 is empty"),
    Option("facility", "str", "", "MSH-4 of our ACKs when the message's MSH-6 is empty"),
), title="response")
_DUPLICATES = ComponentSpec("setting", "duplicates", "duplicate detection", (
    Option("key", "list", ["MSH-3", "MSH-4", "MSH-10"], "fields that identify a message", item="hl7path"),
    Option("window", "duration", 86400.0, "seconds within which a repeated key is a duplicate"),
), title="duplicates")
_RETENTION = ComponentSpec("setting", "retention", "how long messages are kept (hl7relay prune)", (
    Option("days", "float", 30.0, "days to keep messages"),
    Option("errors_days", "float", 90.0, "days to keep ERROR messages"),
), title="retention")
_STORAGE = ComponentSpec("setting", "storage", "what is stored", (
    Option("stages", "list", list(STAGES), "stages kept besides the raw message (always kept)", item="str"),
), title="storage")
LOG_LEVELS = ("error", "warn", "info", "debug", "trace")
# The channel file's own keys: checked (unknown keys, types, defaults), listed by `hl7relay list`
# and turned into the JSON Schema from this one declaration. Sections are nested specs; the
# structured keys (source, filters, steps, destinations) are built by the loader below.
CHANNEL = ComponentSpec("channel", "channel", "a channel file (channels/NAME.yaml)", (
    Option("name", "str", description="the channel's name (unique)"),
    Option("description", "str", "", "what the channel is for"),
    Option("enabled", "bool", True, "false to keep the file but not run it"),
    Option("source", "source", description="where messages come from: {type: mllp | file, ...}"),
    Option("filters", "rule", None, "rules a message must pass: a rule, a list (all), or all/any/not"),
    Option("transformers", "steps", None, "steps applied in order: - set: {...}", item="transformer"),
    Option("validators", "steps", None, "checks: - structure: {...} / - required: {...}", item="validator"),
    Option("response", "section", {}, "ACK behaviour: when (on_store | after_delivery), filtered (AR | AA | AE)",
           section=_RESPONSE),
    Option("destinations", "destinations", None,
           "where messages go: - {name, type: mllp | file | channel, ..., filters, transformers}"),
    Option("storage", "section", {}, "stages kept besides the raw message: stages: [transformed, destinations, acks]",
           section=_STORAGE),
    Option("duplicates", "section", None, "duplicate detection (true: the defaults): {key: [MSH-3, MSH-4, MSH-10], "
           "window: 86400}", section=_DUPLICATES, flag=True),
    Option("retention", "section", None, "how long hl7relay prune keeps messages: {days: 30, errors_days: 90}",
           section=_RETENTION),
    Option("log_level", "enum", None, "this channel's log level (default: the engine's)", LOG_LEVELS),
    Option("log_phi", "bool", False, "true: message content may appear in this channel's trace logs (capped)"),
    Option("timezone", "str", "UTC", "the sender's time zone, for HL7 times without an offset (fhir), "
           "e.g. America/New_York"),
), title="the channel")
CHANNEL_KEYS = {option.name: option.description for option in CHANNEL.options}


class _Loader:
    def __init__(self, doc: Document, context: _Context):
        self.doc = doc
        self.context = context
        self.labels: dict = {}

    def error(self, path, message, key=False):
        self.doc.error(path, message, key)

    def labelled(self, component, name: str, path):
        if component is not None:
            self.labels[id(component)] = f"{name} at {self.doc.mark(path)}"
        return component

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
            return self.labelled(AllOf(rules), "all of" if path[-1:] != ("filters",) else "filters", path) \
                if None not in rules else None
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
            return None if None in rules else self.labelled(AllOf(rules) if key == "all" else AnyOf(rules), key, path)
        if key == "not":
            inner = self.rule(argument, path + (key,))
            return None if inner is None else self.labelled(Not(inner), "not", path)
        spec = lookup("filter", key)
        if spec is None:
            self.error(path + (key,), f"unknown filter rule {key!r}{did_you_mean(key, names)}", key=True)
            return None
        options = check_options(spec, argument, self.doc, path + (key,))
        return None if options is None else self.labelled(self.build(spec, options, path + (key,)), key, path)

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
            built = None if checked is None else self.labelled(self.build(spec, checked, path + (i, name)), name, path + (i,))
            if built is None:
                ok = False
            out.append(built)
        return out if ok else None

    # -- the channel --------------------------------------------------------------------------------
    def channel(self) -> Channel | None:
        data = self.doc.data
        if not isinstance(data, dict):
            self.error((), "a channel file is a mapping: " + ", ".join(o.name for o in CHANNEL.options if o.required)
                       + " and optionally " + ", ".join(o.name for o in CHANNEL.options if not o.required))
            return None
        # every key is checked even when some fail, so one lint run reports all of a file's problems
        values = check_options(CHANNEL, data, self.doc, ()) or {}
        name = values.get("name")
        if isinstance(name, str) and not name.strip():
            self.error(("name",), "the channel needs a name (text)")
        timezone = values.get("timezone") or "UTC"
        try:
            from zoneinfo import ZoneInfo

            ZoneInfo(timezone)
            self.context.timezone = timezone
        except (ValueError, KeyError, OSError):
            self.error(("timezone",), f"timezone: {timezone!r} is not a time zone (e.g. Europe/London, UTC)")
        source_type, source = self.typed("source", data.get("source"), ("source",))
        rule = self.rule(data["filters"], ("filters",)) if data.get("filters") is not None else None
        steps = self.steps("transformer", data.get("transformers"), ("transformers",))
        for i, step in enumerate(steps or []):
            if getattr(step, "converts", False):
                self.error(("transformers", i), "the fhir transformer converts the message for one destination: "
                                                "put it last in that destination's transformers")
        validators = self.steps("validator", data.get("validators"), ("validators",))
        storage = values.get("storage")
        if storage:
            for i, stage in enumerate(storage["stages"]):
                if stage not in STAGES:
                    self.error(("storage", "stages", i), f"unknown stage {stage!r}; stages: {', '.join(STAGES)}"
                               + did_you_mean(stage, STAGES))
        destinations = self.destinations(data.get("destinations"))
        if self.doc.errors:
            return None
        duplicates, retention = values["duplicates"], values["retention"]
        return Channel(
            name=name.strip(), file=self.doc.file, source_type=source_type, source=source,
            description=values["description"], enabled=values["enabled"], filter=rule, steps=steps,
            validators=validators, response=Response(**values["response"]), destinations=destinations,
            stages=frozenset(storage["stages"]), secrets=frozenset(self.doc.secrets),
            duplicates=Duplicates(tuple(duplicates["key"]), duplicates["window"]) if duplicates else None,
            retention=Retention(retention["days"], retention["errors_days"]) if retention else None,
            log_level=values["log_level"], log_phi=values["log_phi"], labels=self.labels,
        )

    def typed(self, kind: str, value, path, reserved=()):
        """A ``{type: NAME, ...options}`` mapping (sources and destinations)."""
        if value is None:  # a missing source is reported by the channel's spec
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
            if type_name == "fhir" and config is not None:
                # whose cross-references it reads (if_match): its own channel's and name's
                config.owner = (str(self.doc.data.get("name", "")).strip(), str(name))
                if steps is not None and not (steps and getattr(steps[-1], "converts", False)):
                    steps = [*steps, config.step]  # its own conversion, last
            for j, step in enumerate(steps or []):
                if not getattr(step, "converts", False):
                    continue
                if j != len(steps) - 1:
                    self.error(path + ("transformers", j), "the fhir transformer must be the destination's last "
                                                           "transformer (HL7 steps cannot edit its JSON)")
                if type_name not in _TAKES_DOCUMENTS:
                    self.error(path + ("transformers", j), f"a {type_name} destination sends HL7; a fhir Bundle goes "
                                                           "to a fhir, http or file destination")
            if config is not None and isinstance(name, str):
                out.append(Destination(name, type_name, config, rule, steps or []))
        return out


def load_channel(path: str | Path, environ=None, display_name: str | None = None) -> tuple[Channel | None, list[ConfigError]]:
    from hl7relay.yamlsource import collecting_reads

    doc = load_document(path, environ, display_name)
    if doc.errors:
        return None, doc.errors
    with collecting_reads() as reads:  # the lookup tables, maps and profiles it names
        channel = _Loader(doc, _Context(Path(path).resolve().parent)).channel()
    if channel is not None:
        import hashlib
        import json

        digest = hashlib.sha256(json.dumps(doc.data, sort_keys=True, default=str).encode())
        for name, text in sorted(reads):
            digest.update(f"\0{name}\0{text}".encode("utf-8", "replace"))
        channel.fingerprint = digest.hexdigest()
        channel.config_files = tuple(sorted({name for name, _ in reads}))
    return channel, sorted(doc.errors, key=lambda e: (e.mark.line, e.mark.column))


def channel_files(paths) -> list[Path]:
    """The channel files among ``paths`` (folders are searched for *.yaml; *.test.yaml are tests,
    and files that start ``profile:`` are conformance profiles)."""
    from hl7relay.yamlsource import snapshot_listing

    files = []
    for item in paths:
        item = Path(item)
        listed = snapshot_listing(item, (".yaml", ".yml"))  # a snapshot's files are what it held
        if listed:
            candidates = listed
        elif item.is_dir() and listed is None:
            candidates = sorted(item.glob("*.yaml")) + sorted(item.glob("*.yml"))
        else:
            candidates = [] if listed is not None and item.is_dir() else [item]
        files += [f for f in candidates if not f.name.endswith((".test.yaml", ".test.yml"))]
    from hl7relay.validation.conformance import is_profile_file

    return [f for f in files if not is_profile_file(f)]  # conformance profiles say `profile:` on top


def load_channels(paths, environ=None) -> tuple[list[Channel], list[ConfigError]]:
    """Load every channel file and check them together (names, ports, channel destinations).
    The credentials their destinations name are read again first (a reload after a secret was
    rotated uses the new value)."""
    from hl7relay.apiclient.credentials import refresh_credentials

    refresh_credentials()
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
