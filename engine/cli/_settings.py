"""Engine settings shared by `run` and the support verbs: config file, then command-line options."""

from __future__ import annotations

from pathlib import Path

DEFAULT_CONFIG = Path("config/hl7relay.yaml")


def add_settings_arguments(parser, channels: bool = True) -> None:
    parser.add_argument("--config", metavar="FILE", help="engine config file (default: config/hl7relay.yaml if present)")
    if channels:
        parser.add_argument("--channels", action="append", metavar="DIR", help="channel folder or file (repeatable; default: channels)")
    parser.add_argument("--store", metavar="URL", help="store URL (default: sqlite:///DATA_DIR/hl7relay.db)")
    parser.add_argument("--data-dir", metavar="DIR", help="where the SQLite store and file outputs live (default: data)")


def resolve_settings(args) -> tuple[dict, list[str]]:
    from hl7relay.channels.spec import did_you_mean
    from hl7relay.channels.yamlsource import load_document

    settings = {"store": None, "data_dir": "data", "channels": ["channels"], "log_level": "info",
                "admin": {"host": "127.0.0.1", "port": 9102}, "log_format": "text", "log_phi": False, "log_phi_bytes": 512}
    problems = []
    path = Path(args.config) if args.config else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    if path is not None:
        doc = load_document(path)
        problems += [str(e) for e in doc.errors]
        data = doc.data if isinstance(doc.data, dict) else {}
        for key, value in data.items():
            if key == "store":
                if not isinstance(value, dict) or not isinstance(value.get("url"), str):
                    problems.append(f"{doc.mark((key,))}: store is {{url: ...}}")
                else:
                    settings["store"] = value["url"]
            elif key == "channels":
                settings["channels"] = value if isinstance(value, list) else [value]
            elif key in ("data_dir", "log_level", "log_format"):
                settings[key] = str(value)
            elif key == "log_phi":
                settings[key] = bool(value)
            elif key == "log_phi_bytes":
                settings[key] = int(value)
            elif key == "admin":
                if not isinstance(value, dict) or set(value) - {"host", "port"}:
                    problems.append(f"{doc.mark((key,))}: admin is {{host: 127.0.0.1, port: 9102}} (port 0: off)")
                else:
                    settings["admin"].update(value)
            else:
                problems.append(f"{doc.mark((key,), key=True)}: unknown key {key!r}"
                                f"{did_you_mean(key, ['store', 'channels', 'data_dir', 'log_level', 'log_format', 'log_phi', 'log_phi_bytes', 'admin'])}")
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
    if not settings["store"]:
        settings["store"] = f"sqlite:///{Path(settings['data_dir']) / 'hl7relay.db'}"
    return settings, problems


