"""Engine settings shared by `run` and the support verbs: config file, then command-line options."""

from __future__ import annotations

from pathlib import Path

DEFAULT_CONFIG = Path("config/hl7relay.yaml")


def specs():
    """The engine settings' specs (the same machinery as channel components): what lint-like
    checking, defaults, `hl7relay list` and the settings' JSON Schema are made from."""
    from hl7relay.spec import ComponentSpec, Option

    engine = ComponentSpec("settings", "engine", "engine settings (config/hl7relay.yaml, or --config FILE)", (
        Option("store", "any", None, "the message store: {url: sqlite:///PATH | postgresql+psycopg://USER@HOST/DB} "
               "(default: SQLite at DATA_DIR/hl7relay.db)"),
        Option("channels", "strlist", ["channels"], "channel folders or files"),
        Option("environment", "str", None, "the environment to run in (environments/NAME.yaml: the values "
               "${env:NAME} takes); --env or HL7RELAY_ENV say it too"),
        Option("environments", "str", "environments", "the folder of environment files"),
        Option("data_dir", "str", "data", "where the SQLite store, the local API token and endpoint live"),
        Option("vault_key_file", "str", None, "the vault's key file (default: vault.key in data_dir; "
                                              "HL7RELAY_VAULT_KEY overrides it)"),
        Option("log_level", "enum", "info", "what is logged", ("trace", "debug", "info", "warn", "error")),
        Option("log_format", "enum", "text", "text, or one flat JSON object per line", ("text", "json")),
        Option("log_phi", "bool", False, "log message content (every channel; a channel can say it for itself)"),
        Option("log_phi_bytes", "int", 512, "how much of a message log_phi logs"),
        Option("stop_timeout", "duration", 10.0, "on SIGTERM, seconds to wait for the ACKs of deliveries already sent"),
        Option("forwarding", "enum", "inline", "where destinations are sent to: inline (the engine's own process) or "
               "process (a forwarder process of its own, so ACKs never wait behind deliveries)", ("inline", "process")),
        Option("admin", "any", None, "the admin listener (/metrics, /healthz, /readyz, /api/v1): "
               "{host, port, tls_cert, tls_key, tls_ca, require_client_cert}"),
        Option("console", "any", None, "the web console: {host, port, tls_cert, tls_key, allow_insecure_remote, "
               "idle_timeout, absolute_timeout}"),
        Option("credentials", "any", None, "credentials for other systems' APIs, each named once: {NAME: {type: "
               "oauth2_client_credentials | api_key | basic | bearer, ...}} (or in credentials.yaml beside this file)"),
        Option("alerts", "any", None, "the engine's own alerts and where they go: {queue_age, queue_depth, error_rate, "
               "slow_ack, hold, repeat_every, webhook: {url, headers}, email: {host, port, security, from, to, channels}}"),
        Option("cluster", "any", None, "several engines on one PostgreSQL store: {node_id, partitions, lease_ttl, "
               "lease_renew}; each destination's queue is split into partitions, delivered by the node holding each"),
    ))
    store = ComponentSpec("settings", "store", "the message store", (
        Option("url", "str", description="sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"),))
    admin = ComponentSpec("settings", "admin", "the admin listener", (
        Option("host", "str", "127.0.0.1", "address to listen on (localhost only unless told otherwise)"),
        Option("port", "any", 9102, "a port; 0: off; auto: any free port (written to DATA_DIR/api-endpoint)"),
        Option("tls_cert", "str", None, "PEM certificate: serve over TLS"),
        Option("tls_key", "str", None, "PEM private key of tls_cert"),
        Option("tls_ca", "str", None, "PEM CA: client certificates (with require_client_cert) and what the CLI trusts"),
        Option("require_client_cert", "bool", False, "mutual TLS"),
    ))
    console = ComponentSpec("settings", "console", "the web console (sign in with a user from hl7relay user add)", (
        Option("host", "str", "127.0.0.1", "address to listen on (localhost only unless told otherwise)"),
        Option("port", "any", 9103, "a port; 0: off; auto: any free port"),
        Option("tls_cert", "str", None, "PEM certificate: serve over HTTPS (required off loopback)"),
        Option("tls_key", "str", None, "PEM private key of tls_cert"),
        Option("allow_insecure_remote", "bool", False, "serve plain HTTP on an address other than loopback "
               "(passwords and patient data would cross the network readable)"),
        Option("idle_timeout", "duration", 900.0, "seconds without a request before a session ends"),
        Option("absolute_timeout", "duration", 43200.0, "seconds after sign-in when a session ends whatever happens"),
    ))
    return engine, store, admin, console


def alert_specs():
    """The ``alerts:`` section and its two notifiers."""
    from hl7relay.spec import ComponentSpec, Option

    alerts = ComponentSpec("settings", "alerts", "alerts the engine evaluates itself (no Prometheus needed)", (
        Option("evaluate_every", "duration", 15.0, "seconds between evaluations"),
        Option("repeat_every", "duration", 14400.0, "a firing alert is notified again after this long"),
        Option("queue_age", "duration", 600.0, "HL7RelayQueueStuck: the oldest queued message older than this"),
        Option("queue_depth", "int", 1000, "HL7RelayQueueGrowing: more deliveries queued than this"),
        Option("error_rate", "float", 0.05, "HL7RelayErrorRate: more than this share of a channel's messages in ERROR"),
        Option("slow_ack", "duration", 0.5, "HL7RelaySlowAcks: p99 ACK latency over this many seconds"),
        Option("hold", "any", None, "per rule, how long its condition must hold before it fires (seconds), "
               "e.g. {HL7RelayDestinationDown: 60}"),
        Option("webhook", "any", None, "POST each notification as JSON: {url, headers, timeout, tls_ca}"),
        Option("email", "any", None, "send each notification by SMTP: {host, port, security: starttls | tls | none, "
               "username, password, from, to, channels: {CHANNEL: [addresses]}, timeout, tls_ca}"),
    ))
    webhook = ComponentSpec("settings", "webhook", "alert notifications by HTTP POST", (
        Option("url", "str", description="http(s) URL"),
        Option("headers", "any", None, "extra headers, e.g. {Authorization: 'Bearer ${file:/etc/hl7relay/hook-token}'}"),
        Option("timeout", "duration", 10.0, "seconds"),
        Option("tls_ca", "str", None, "PEM CA to trust for an https URL (default: the system's)"),
    ))
    email = ComponentSpec("settings", "email", "alert notifications by e-mail", (
        Option("host", "str", description="SMTP server"),
        Option("port", "int", 587, "587 (STARTTLS), 465 (TLS), 25"),
        Option("security", "enum", "starttls", "starttls (required), tls (implicit), none (a local relay only)",
               ("starttls", "tls", "none")),
        Option("username", "str", None, "SMTP user"),
        Option("password", "str", None, "its password (use ${file:PATH})"),
        Option("from", "str", description="the sender address"),
        Option("to", "strlist", [], "who gets every notification"),
        Option("channels", "any", None, "who gets a channel's notifications too: {CHANNEL: [addresses]}"),
        Option("timeout", "duration", 30.0, "seconds"),
        Option("tls_ca", "str", None, "PEM CA to trust for the server's certificate (default: the system's)"),
    ))
    return alerts, webhook, email


def settings_schema() -> dict:
    """JSON Schema of the engine config file, for editors."""
    engine, store, admin, console = specs()
    schema = engine.json_schema()
    schema["properties"]["store"] = store.json_schema()
    schema["properties"]["cluster"] = cluster_spec().json_schema()
    for name, spec in (("admin", admin), ("console", console)):
        schema["properties"][name] = spec.json_schema()
        port = schema["properties"][name]["properties"]["port"]
        port.update({"anyOf": [{"type": "integer", "minimum": 0, "maximum": 65535}, {"const": "auto"}]})
    schema.update({"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "hl7relay engine settings"})
    return schema


def add_settings_arguments(parser, channels: bool = True, env: bool = True) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="engine config file (default: $HL7RELAY_CONFIG, else config/hl7relay.yaml if present)")
    if channels:
        parser.add_argument("--channels", action="append", metavar="DIR", help="channel folder or file (repeatable; default: channels)")
    parser.add_argument("--store", metavar="URL", help="store URL (default: sqlite:///DATA_DIR/hl7relay.db)")
    parser.add_argument("--data-dir", metavar="DIR", help="where the SQLite store and file outputs live (default: data)")
    if env:
        parser.add_argument("--env", metavar="NAME", help="the environment: environments/NAME.yaml gives the values "
                                                          "${env:VAR} takes (default: $HL7RELAY_ENV, else none)")


def _checked(doc, settings: dict) -> list[str]:
    """The config file checked against the specs (every problem with its position); what it
    sets goes into ``settings``."""
    from hl7relay.spec import check_options

    engine, store, admin, console = specs()
    data = doc.data if doc.data is not None else {}
    if not isinstance(data, dict):
        doc.error((), "the engine settings are a mapping (store, channels, data_dir, log_level, admin...)")
        return [str(e) for e in doc.errors]
    for key in ("log_level", "log_format"):  # written in any case
        if isinstance(data.get(key), str):
            data[key] = data[key].lower()
    values = check_options(engine, data, doc, ())
    if values is not None:
        if data.get("log_phi_bytes") is not None and values["log_phi_bytes"] < 0:
            doc.error(("log_phi_bytes",), "log_phi_bytes must be 0 or more")
        if isinstance(data.get("channels"), list) and not data["channels"]:
            doc.error(("channels",), "channels needs at least one folder")
        for key in ("channels", "data_dir", "vault_key_file", "log_level", "log_format", "log_phi", "log_phi_bytes", "stop_timeout",
                    "forwarding", "environment", "environments"):
            if key in data and data[key] is not None:
                settings[key] = values[key]
    if data.get("store") is not None:  # the nested settings are checked whatever the rest says
        checked = check_options(store, data["store"], doc, ("store",))
        if checked is not None:
            settings["store"] = checked["url"]
    if data.get("admin") is not None:
        checked = check_options(admin, data["admin"], doc, ("admin",))
        if checked is not None:
            port = checked["port"]
            if port != "auto" and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535):
                doc.error(("admin", "port"), "admin port must be a whole number from 0 to 65535 (0: off), or auto")
            else:
                settings["admin"].update({k: v for k, v in checked.items() if k in data["admin"]})
    if data.get("alerts") is not None:
        _check_alerts(doc, data["alerts"], settings)
    if data.get("cluster") is not None:
        _check_cluster(doc, data["cluster"], settings)
    if data.get("console") is not None:
        checked = check_options(console, data["console"], doc, ("console",))
        if checked is not None:
            port = checked["port"]
            if port != "auto" and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535):
                doc.error(("console", "port"), "console port must be a whole number from 0 to 65535 (0: off), or auto")
            else:
                settings["console"].update({k: v for k, v in checked.items() if k in data["console"]})
    return sorted(str(e) for e in doc.errors)


MAX_WORKERS = 64


def cluster_spec():
    """The ``cluster:`` section."""
    from hl7relay.spec import ComponentSpec, Option

    return ComponentSpec("settings", "cluster", "several engines on one PostgreSQL store", (
        Option("node_id", "str", None, "this engine's name among the nodes (default: the host's name); unique"),
        Option("partitions", "int", 16, "how many partitions each destination's queue is split into (the same on "
                                        "every node); a destination with order: in_order is one"),
        Option("lease_ttl", "duration", 10.0, "how long a partition's lease lasts unless renewed: a dead node's "
                                              "partitions move to the others within lease_ttl + lease_renew"),
        Option("lease_renew", "duration", 3.0, "how often leases are renewed (at most half of lease_ttl)"),
        Option("workers", "int", 1, "engine processes on this host sharing its listeners (hl7relay run --workers "
                                    "N), each a node of its own (NODE_ID-w1, -w2, ...); a dead one is restarted"),
    ))


def _check_cluster(doc, data, settings: dict) -> None:
    import socket

    from hl7relay.cluster import ClusterSettings
    from hl7relay.spec import check_options

    checked = check_options(cluster_spec(), data, doc, ("cluster",))
    if checked is None:
        return
    if not 1 <= checked["partitions"] <= 256:
        doc.error(("cluster", "partitions"), "partitions: 1 to 256")
        return
    if not 0 < checked["lease_renew"] * 2 <= checked["lease_ttl"]:
        doc.error(("cluster", "lease_renew"), "lease_renew must be more than 0 and at most half of lease_ttl")
        return
    node = checked["node_id"] or socket.gethostname()
    if not 0 < len(node) <= 100:
        doc.error(("cluster", "node_id"), "node_id: 1 to 100 characters")
        return
    if not 1 <= checked["workers"] <= MAX_WORKERS:
        doc.error(("cluster", "workers"), f"workers: 1 to {MAX_WORKERS}")
        return
    settings["cluster"] = ClusterSettings(node, checked["partitions"], checked["lease_ttl"], checked["lease_renew"],
                                          checked["workers"])


def _check_alerts(doc, data, settings: dict) -> None:
    from hl7relay.spec import check_options
    from hl7relay.ops.alerts import RULES

    alerts, webhook, email = alert_specs()
    checked = check_options(alerts, data, doc, ("alerts",))
    if checked is None:
        return
    hold = checked["hold"] or {}
    if not isinstance(hold, dict):
        doc.error(("alerts", "hold"), "hold is a mapping: {RULE: seconds}")
        hold = {}
    names = {rule.name for rule in RULES}
    for rule, seconds in hold.items():
        if rule not in names:
            from hl7relay.spec import did_you_mean

            doc.error(("alerts", "hold", rule), f"no alert rule {rule!r}{did_you_mean(str(rule), names)}", key=True)
        elif isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            doc.error(("alerts", "hold", rule), "hold is a number of seconds, 0 or more")
    checked["hold"] = hold
    for name, spec in (("webhook", webhook), ("email", email)):
        if checked[name] is not None:
            sub = check_options(spec, checked[name], doc, ("alerts", name))
            if sub is not None and name == "email" and not (sub["to"] or sub["channels"]):
                doc.error(("alerts", "email"), "email needs recipients: to, or channels")
            if sub is not None and name == "email" and sub["channels"] is not None and not (
                    isinstance(sub["channels"], dict) and all(isinstance(v, list) for v in sub["channels"].values())):
                doc.error(("alerts", "email", "channels"), "channels is a mapping: {CHANNEL: [addresses]}")
            checked[name] = sub
    settings["alerts"] = checked


ENGINE_FILE = "engine.json"  # in the data folder while an engine runs: its pid and channel folders (absolute)


def write_engine_file(settings: dict) -> Path:
    """Say which channel folders the running engine reads, for support verbs run elsewhere."""
    import json
    import os
    import time

    from hl7relay.privatefile import write_private

    path = Path(settings["data_dir"]) / ENGINE_FILE  # its folder is made when a PostgreSQL store left none
    write_private(path, json.dumps({"pid": os.getpid(), "started": time.time(),
                                    "channels": [str(Path(folder).resolve()) for folder in settings["channels"]]}))
    return path


def _running_engine_channels(data_dir: str) -> list[str] | None:
    """The channel folders of the engine running on this data folder, or None."""
    import json
    import os

    try:
        info = json.loads((Path(data_dir) / ENGINE_FILE).read_text())
        os.kill(int(info["pid"]), 0)  # still running?
        return [str(folder) for folder in info["channels"]] or None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_settings(args, for_engine: bool = False) -> tuple[dict, list[str]]:
    """The settings from the config file and the arguments. Support verbs (``for_engine`` False)
    given no --channels read the channel folders of the engine running on the data folder, so
    that run from another folder they see the channels it runs.

    ``${secret:NAME}`` in the config file (a credential's client secret) comes from the vault of
    the settings themselves (their store and key): the file is read once to learn where the vault
    is, and again with it when it names a secret."""
    import os

    from hl7relay.vault import secret_resolver
    from hl7relay.yamlsource import set_secret_resolver

    config = args.config or os.environ.get("HL7RELAY_CONFIG")
    path = Path(config) if config else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    named: list[str] = []
    set_secret_resolver(lambda name: named.append(name) or "")  # where the vault is, is not known yet
    settings, problems = _resolve(args, path, for_engine, config)
    problems += _environment(args, settings)
    resolver = secret_resolver(settings)
    set_secret_resolver(resolver)
    if named:
        settings, problems = _resolve(args, path, for_engine, config)
    from hl7relay.apiclient.credentials import read_credentials, set_credentials_source

    files = [(path, False)] if path is not None else []
    files.append(((path.parent if path is not None else DEFAULT_CONFIG.parent) / CREDENTIALS_FILE, True))
    set_credentials_source(lambda: read_credentials(files))
    from hl7relay.apiclient.credentials import credential_problems

    if for_engine:  # the support verbs (secret set among them: a credential may name a secret not yet set) go on
        problems += [p for p in credential_problems() if p not in problems]
    return settings, problems


CREDENTIALS_FILE = "credentials.yaml"  # beside the config file: the credentials: section on its own


def _environment(args, settings: dict) -> list[str]:
    """--env (else HL7RELAY_ENV, else the config file's environment:): its values for ${env:NAME}."""
    import os

    from hl7relay.environments import load_environment
    from hl7relay.yamlsource import set_environment

    name = getattr(args, "env", None) or os.environ.get("HL7RELAY_ENV") or settings.get("environment")
    settings["environment"] = None
    set_environment("", {})
    if not name:
        return []
    environment, problems = load_environment(settings["environments"], name)
    if environment is None:
        return [str(p) for p in problems]
    set_environment(environment.name, environment.values)
    settings["environment"] = environment
    return []


def _resolve(args, path, for_engine: bool, config) -> tuple[dict, list[str]]:
    from hl7relay.yamlsource import load_document

    settings = {"store": None, "data_dir": "data", "channels": ["channels"], "log_level": "info",
                "admin": {"host": "127.0.0.1", "port": 9102},
                "console": {"host": "127.0.0.1", "port": 9103, "allow_insecure_remote": False, "idle_timeout": 900.0,
                            "absolute_timeout": 43200.0},
                "log_format": "text", "log_phi": False, "log_phi_bytes": 512,
                "stop_timeout": 10.0, "forwarding": "inline", "alerts": None, "environment": None, "cluster": None,
                "environments": "environments"}
    problems = []
    settings["config_file"] = str(path) if path is not None else None
    if path is not None and not path.is_file():
        problems.append(f"{path}: no such config file" + (" (from HL7RELAY_CONFIG)" if not args.config else ""))
    elif path is not None:
        from hl7relay.apiclient.credentials import in_section

        doc = load_document(path)
        # a secret the credentials name and the vault lacks is the credentials' problem (said by
        # lint, check and run), not the settings': `secret set` must still work to add it
        credentials = in_section(doc, "credentials")
        errors = [e for e in doc.errors if e not in credentials]
        problems += [str(e) for e in errors]
        if not errors and doc.data is not None:
            theirs = {str(e) for e in credentials}
            problems += [p for p in _checked(doc, settings) if p not in theirs]
    if args.data_dir:
        settings["data_dir"] = args.data_dir
    if getattr(args, "channels", None):
        settings["channels"] = args.channels
    elif not for_engine:
        settings["channels"] = _running_engine_channels(settings["data_dir"]) or settings["channels"]
    if args.store:
        settings["store"] = args.store
    if getattr(args, "log_level", None):
        settings["log_level"] = args.log_level
    if getattr(args, "log_format", None):
        settings["log_format"] = args.log_format
    if getattr(args, "admin_port", None) is not None:
        settings["admin"]["port"] = args.admin_port
    if getattr(args, "admin_host", None):
        settings["admin"]["host"] = args.admin_host
    if getattr(args, "console_port", None) is not None:
        settings["console"]["port"] = args.console_port
    if getattr(args, "console_host", None):
        settings["console"]["host"] = args.console_host
    if getattr(args, "stop_timeout", None) is not None:
        settings["stop_timeout"] = args.stop_timeout
    if getattr(args, "forwarding", None):
        settings["forwarding"] = args.forwarding
    if not settings["store"]:
        settings["store"] = f"sqlite:///{Path(settings['data_dir']) / 'hl7relay.db'}"
    return settings, problems
