"""Pieces the support verbs share: opening the store, parsing times and ages, filters, progress."""

from __future__ import annotations

import re
import sys
import time
from datetime import datetime, timezone

__all__ = ["open_store_from_args", "phi_permitted", "unknown_channel", "parse_age", "parse_time", "add_filter_arguments", "filters_from_args", "Progress",
           "time_argument", "age_argument"]

_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``1w2d`` -> seconds."""
    parts = _AGE.findall(text)
    if not parts or _AGE.sub("", text).strip():
        raise ValueError(f"{text!r} is not an age such as 30d, 12h or 90m")
    return sum(float(n) * _UNITS[u.lower()] for n, u in parts)


def parse_time(text: str) -> float:
    """An ISO date/time (2024-01-05, 2024-01-05T09:30) or an age ago (2h)."""
    try:
        return time.time() - parse_age(text)
    except ValueError:
        pass
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return moment.timestamp()


def time_argument(text: str) -> float:
    """argparse type for --since/--until: the moment as an epoch, or one clear line."""
    import argparse

    try:
        return parse_time(text)
    except (ValueError, OverflowError, OSError) as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time ({exc}); give an age ago (90m, 12h, 7d) or an ISO date or date-time "
            "(2024-01-05, 2024-01-05T09:30)") from None


def age_argument(text: str) -> float:
    """argparse type for --older-than: seconds, or one clear line."""
    import argparse

    try:
        return parse_age(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age; give a number and a unit: 30d, 12h, 90m, 2w") from None


def format_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def open_store_from_args(args, create: bool = False, migrate: bool = True):
    """The store the settings name, brought up to date (unless ``migrate`` is False: verify reports
    the version it finds). Support verbs never create one (run in the wrong folder, they say so);
    ``create``: the first `user add` of a new installation may."""
    from hl7relay.cli._settings import resolve_settings
    from hl7relay.store.database import Store

    from hl7relay.store.database import MIGRATIONS, StoreError

    settings, problems = resolve_settings(args)
    if problems:
        raise SystemExit("\n".join(problems))
    where = ("from --store" if getattr(args, "store", None) else "from --data-dir" if getattr(args, "data_dir", None)
             else f"from {settings['config_file']}" if settings.get("config_file") and settings["store"] != _default_store()
             else "the default, data/hl7relay.db under the current folder")
    hint = "run this in the engine's folder, or pass --config FILE, --store URL or --data-dir DIR (or set HL7RELAY_CONFIG)"
    try:
        if create:
            import os

            previous = os.umask(0o077)  # as `run` does: the store is its user's only
            try:
                Store(settings["store"]).migrate()
            finally:
                os.umask(previous)
        store = Store(settings["store"], create=False)
        version = store.schema_version()
    except StoreError as exc:
        raise SystemExit(f"{exc} ({where}); {hint}") from None
    except Exception as exc:  # noqa: BLE001 - a driver error (server down, bad credentials): one line
        raise SystemExit(f"cannot open the store {settings['store']}: {exc.__class__.__name__}: "
                         f"{str(getattr(exc, 'orig', exc)).strip().splitlines()[0]}") from None
    if version == 0:
        store.close()
        raise SystemExit(f"{settings['store']} is not an hl7relay store (no schema) ({where}); {hint}")
    if version < MIGRATIONS[-1][0] and migrate:
        store.migrate()  # an older engine's store: bring it up to date, as `run` would
    return store, settings


def phi_permitted(args, store, target: str) -> bool:
    """--show-phi needs a reason, and is written to the audit log before anything is shown."""
    if not getattr(args, "show_phi", False):
        return True
    reason = (getattr(args, "reason", None) or "").strip()
    if not reason:
        print("--show-phi needs --reason: seeing patient data unmasked is written to the audit log with why",
              file=sys.stderr)
        return False
    from hl7relay.ops.auth import cli_audit

    store.audit(cli_audit("phi.view", target, reason=reason))
    return True


def _default_store() -> str:
    from pathlib import Path

    return f"sqlite:///{Path('data') / 'hl7relay.db'}"


def add_filter_arguments(parser) -> None:
    from hl7relay.outcomes import STORED_STATUSES, DeliveryStatus

    group = parser.add_argument_group("filters (each one indexed)")
    group.add_argument("--channel")
    group.add_argument("--status", choices=STORED_STATUSES)
    group.add_argument("--since", metavar="TIME", type=time_argument, help="ISO date/time, or an age: 2h, 7d")
    group.add_argument("--until", metavar="TIME", type=time_argument)
    group.add_argument("--type", dest="message_type", metavar="TYPE", help="ADT, or ADT^A01")
    group.add_argument("--control-id", metavar="MSH-10")
    group.add_argument("--patient-id", metavar="PID-3.1")
    group.add_argument("--facility", metavar="MSH-4.1", help="sending facility")
    group.add_argument("--delivery-status", choices=tuple(status.value for status in DeliveryStatus))
    group.add_argument("--failed", action="store_true",
                       help="what failed: messages stored as ERROR or with a delivery in ERROR (dead letters)")


def filters_from_args(args) -> dict:
    return {"channel": args.channel, "status": args.status,
            "since": args.since, "until": args.until,  # epochs already (time_argument)
            "message_type": args.message_type, "control_id": args.control_id, "patient_id": args.patient_id,
            "facility": args.facility, "delivery_status": args.delivery_status, "failed": bool(getattr(args, "failed", False))}


class Progress:
    """A progress bar on standard error, only when it is a terminal and the job is large."""

    def __init__(self, total: int, label: str, threshold: int = 20):
        self.total, self.label = total, label
        self.enabled = total >= threshold and sys.stderr.isatty()

    def update(self, done: int) -> None:
        if self.enabled:
            filled = 30 * done // max(self.total, 1)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} {self.label}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 70 + "\r")


def unknown_channel(store, settings: dict, name: str | None) -> str | None:
    """Why ``name`` (a --channel) names no channel, or None: it must be configured (the channel
    files the engine runs) or have stored messages. A typo otherwise read as "no messages match"."""
    if name is None:
        return None
    from hl7relay.channels import load_channels

    try:
        configured = {c.name for c in load_channels(settings["channels"])[0]}
    except Exception:  # noqa: BLE001 - unreadable channel files: the store still knows its channels
        configured = set()
    if name in configured:
        return None
    known = configured | set(store.channel_names())
    if name in known:
        return None
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f" (did you mean '{close[0]}')" if close else ""
    listed = ", ".join(sorted(known)) or "none yet"
    return f"no channel '{name}'{hint}: channels are {listed}"
