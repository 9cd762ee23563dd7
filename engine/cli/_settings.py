"""Engine settings shared by `run` and the support verbs: config file, then command-line options."""

from __future__ import annotations

from pathlib import Path

DEFAULT_CONFIG = Path("config/hl7relay.yaml")
ADMIN_KEYS = {"host", "port", "tls_cert", "tls_key", "tls_ca", "require_client_cert"}
CHOICES = {"log_level": ["trace", "debug", "info", "warn", "error"], "log_format": ["text", "json"]}
KEYS = ["store", "channels", "data_dir", "log_level", "log_format", "log_phi", "log_phi_bytes", "admin", "stop_timeout"]


def add_settings_arguments(parser, channels: bool = True) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="engine config file (default: $HL7RELAY_CONFIG, else config/hl7relay.yaml if present)")
    if channels:
        parser.add_argument("--channels", action="append", metavar="DIR", help="channel folder or file (repeatable; default: channels)")
    parser.add_argument("--store", metavar="URL", help="store URL (default: sqlite:///DATA_DIR/hl7relay.db)")
    parser.add_argument("--data-dir", metavar="DIR", help="where the SQLite store and file outputs live (default: data)")


def resolve_settings(args) -> tuple[dict, list[str]]:
    from hl7relay.channels.spec import did_you_mean
    from hl7relay.channels.yamlsource import load_document

    settings = {"store": None, "data_dir": "data", "channels": ["channels"], "log_level": "info",
                "admin": {"host": "127.0.0.1", "port": 9102}, "log_format": "text", "log_phi": False, "log_phi_bytes": 512,
                "stop_timeout": 10.0}
    problems = []
    import os

    config = args.config or os.environ.get("HL7RELAY_CONFIG")
    path = Path(config) if config else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    settings["config_file"] = str(path) if path is not None else None
    if path is not None and not path.is_file():
        problems.append(f"{path}: no such config file" + (" (from HL7RELAY_CONFIG)" if not args.config else ""))
    elif path is not None:
        doc = load_document(path)
        problems += [str(e) for e in doc.errors]
        data = doc.data if isinstance(doc.data, dict) else {}
        for key, value in data.items():
            where = doc.mark((key,))
            if key == "store":
                if not isinstance(value, dict) or not isinstance(value.get("url"), str):
                    problems.append(f"{where}: store is {{url: ...}}")
                else:
                    settings["store"] = value["url"]
            elif key == "channels":
                values = value if isinstance(value, list) else [value]
                if not all(isinstance(v, str) and v for v in values):
                    problems.append(f"{where}: channels is a folder or a list of folders")
                else:
                    settings["channels"] = values
            elif key == "data_dir":
                if not isinstance(value, str) or not value:
                    problems.append(f"{where}: data_dir is a folder")
                else:
                    settings[key] = value
            elif key in CHOICES:
                if str(value).lower() not in CHOICES[key]:
                    problems.append(f"{where}: {key} must be one of {', '.join(CHOICES[key])}, not {value!r}"
                                    f"{did_you_mean(str(value).lower(), CHOICES[key])}")
                else:
                    settings[key] = str(value).lower()
            elif key == "log_phi":
                if not isinstance(value, bool):
                    problems.append(f"{where}: log_phi is true or false")
                else:
                    settings[key] = value
            elif key in ("log_phi_bytes", "stop_timeout"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
                        key == "log_phi_bytes" and not isinstance(value, int)):
                    kind = "a whole number of bytes" if key == "log_phi_bytes" else "a number of seconds"
                    problems.append(f"{where}: {key} must be {kind}, 0 or more, not {value!r}")
                else:
                    settings[key] = value
            elif key == "admin":
                if not isinstance(value, dict) or set(value) - ADMIN_KEYS:
                    problems.append(f"{where}: admin is {{host: 127.0.0.1, port: 9102}} (port 0: off), optionally with "
                                    "tls_cert, tls_key, tls_ca and require_client_cert")
                elif any(value.get(k) is not None and not isinstance(value[k], str) for k in ("tls_cert", "tls_key", "tls_ca")) \
                        or not isinstance(value.get("require_client_cert", False), bool):
                    problems.append(f"{where}: admin tls_cert, tls_key and tls_ca are file names; require_client_cert "
                                    "is true or false")
                elif "port" in value and value["port"] != "auto" and (
                        isinstance(value["port"], bool) or not isinstance(value["port"], int) or not 0 <= value["port"] <= 65535):
                    problems.append(f"{doc.mark((key, 'port'))}: admin port must be a whole number from 0 to 65535 "
                                    "(0: off), or auto")
                elif "host" in value and not isinstance(value["host"], str):
                    problems.append(f"{doc.mark((key, 'host'))}: admin host is an address such as 127.0.0.1")
                else:
                    settings["admin"].update(value)
            else:
                problems.append(f"{doc.mark((key,), key=True)}: unknown key {key!r}{did_you_mean(str(key), KEYS)}")
    if getattr(args, "channels", None):
        settings["channels"] = args.channels
    if args.data_dir:
        settings["data_dir"] = args.data_dir
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
    if getattr(args, "stop_timeout", None) is not None:
        settings["stop_timeout"] = args.stop_timeout
    if not settings["store"]:
        settings["store"] = f"sqlite:///{Path(settings['data_dir']) / 'hl7relay.db'}"
    return settings, problems


