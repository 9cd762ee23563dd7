"""``hl7relay status``: what each channel and destination is doing, from the store."""

from __future__ import annotations

import json
import time

from hl7relay.cli._args import number_in
from hl7relay.cli._settings import add_settings_arguments
from hl7relay.outcomes import DeliveryStatus, MessageStatus

_PROCESSED, _FILTERED, _ERROR, _DUPLICATE = (MessageStatus.PROCESSED, MessageStatus.FILTERED, MessageStatus.ERROR,
                                             MessageStatus.DUPLICATE)

HELP = "per channel: received, filtered, errored, queued, oldest queued, last error; per destination: connected"
DESCRIPTION = """\
Per channel: messages received, processed, filtered, errored and duplicates in the last --hours
(24 by default), deliveries queued and the age of the oldest, the last error. Per destination:
queued and errors (dead letters: all of them, each waits for a person), sent in the last --hours,
and whether the running engine last found it connected. What it reads grows with the hours'
traffic, not with the store; --hours 0 counts every stored message (slow on a big store)."""


def add_arguments(parser) -> None:
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--hours", type=_hours, default=24.0, metavar="H",
                        help="count the messages of the last H hours (default 24; 0: every stored message)")
    parser.add_argument("--show-phi", action="store_true",
                        help="show values quoted in error texts (masked by default); needs --reason, and is audited")
    parser.add_argument("--reason", help="why patient data is shown unmasked (written to the audit log)")
    add_settings_arguments(parser)


def _configured(settings) -> dict:
    """Channel name -> {destination name: type} from the channel files (what is configured,
    busy or idle); channel files with problems are left out here (hl7relay lint says why)."""
    from hl7relay.channels import load_channels

    try:
        channels, _ = load_channels(settings["channels"])
    except Exception:  # noqa: BLE001 - status still shows what the store knows
        return {}
    return {c.name: {d.name: d.type for d in c.destinations} for c in channels}


_hours = number_in(0, 24 * 3660, "hours", why="hours must be between 0 (every message) and 87840")


def _age(seconds) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def run(args) -> int:
    from hl7relay.cli._support import format_time, open_store_from_args

    from hl7relay.ops.phi import mask_text

    from hl7relay.cli._support import phi_permitted

    store, settings = open_store_from_args(args)
    if not phi_permitted(args, store, "status"):
        return 2
    status = store.channel_status(time.time(), args.hours * 3600 or None)
    configured = _configured(settings)
    text = (lambda value: value) if args.show_phi else mask_text
    for channel, destinations in configured.items():  # idle channels are listed too
        entry = status.setdefault(channel, {"counts": {}, "destinations": {}, "last_error": None})
        for name in destinations:
            entry["destinations"].setdefault(name, {"counts": {}, "oldest_queued_age": None, "connected": None,
                                                    "last_error": ""})
    for channel, entry in status.items():
        entry["configured"] = channel in configured
        if entry.get("last_error"):
            entry["last_error"]["error"] = text(entry["last_error"]["error"])
        for name, d in entry["destinations"].items():
            d["type"] = configured.get(channel, {}).get(name)
            d["last_error"] = text(d["last_error"])
            if d["type"] not in (None, "mllp"):
                d["connected"] = None  # a file or channel destination has no connection to speak of
    if args.format == "json":
        print(json.dumps(status, indent=2, default=str))
        return 0
    for line in _configuration(store, settings) + _nodes(store):
        print(line)
    if not status:
        print("no channels configured and no messages stored yet")
        return 0
    period = f"last {args.hours:g}h" if args.hours else "all stored"
    for channel, entry in sorted(status.items()):
        counts = entry["counts"]
        received = sum(counts.values())
        queued = sum(d["counts"].get(DeliveryStatus.QUEUED, 0) for d in entry["destinations"].values())
        oldest = max((d["oldest_queued_age"] for d in entry["destinations"].values() if d["oldest_queued_age"] is not None), default=None)
        note = "" if entry["configured"] else "  (not in the channel files any more)"
        print(f"{channel}: {period}: received {received}, processed {counts.get(_PROCESSED, 0)}, filtered {counts.get(_FILTERED, 0)}, "
              f"errored {counts.get(_ERROR, 0)}, duplicates {counts.get(_DUPLICATE, 0)}, queued {queued} (oldest {_age(oldest)})"
              + note)
        if entry["last_error"]:
            last = entry["last_error"]
            print(f"  last error: message {last['id']} at {format_time(last['received_at'])}: {last['error']}")
        for name, d in sorted(entry["destinations"].items()):
            kind = d["type"] or "?"
            if kind == "mllp" or (kind == "?" and d["connected"] is not None):
                state = {True: "connected", False: "NOT connected", None: "not tried yet"}[d["connected"]] + "; "
            else:
                state = ""
            print(f"  -> {name} ({kind}): {state}queued {d['counts'].get(DeliveryStatus.QUEUED, 0)} (oldest {_age(d['oldest_queued_age'])}), "
                  f"sent {d['counts'].get(DeliveryStatus.SENT, 0)}, errors {d['counts'].get(DeliveryStatus.ERROR, 0)}"
                  + (f", withdrawn {d['counts'][DeliveryStatus.WITHDRAWN]}" if d["counts"].get(DeliveryStatus.WITHDRAWN) else "")
                  + (f"; {d['last_error']}" if d["last_error"] and d["connected"] is False else ""))
    for line in _engine_sync(settings) + _engine_alerts(settings):
        print(line)
    return 0


def _configuration(store, settings) -> list[str]:
    """The snapshot the engine last started, reloaded or rolled back with, and whether the channel
    files on disk differ from it (after a rollback they do, until fixed or reloaded)."""
    from hl7relay.cli._support import format_time
    from hl7relay.snapshots import differs_from_files

    try:
        newest = store.snapshot()
    except Exception:  # noqa: BLE001 - an older store: nothing to say
        return []
    if newest is None:
        return []
    line = f"configuration: snapshot {newest['id']} ({newest['reason']} at {format_time(newest['taken_at'])}"
    if newest.get("from_snapshot"):
        line += f", rolled back to snapshot {newest['from_snapshot']}"
    line += ")"
    try:
        differs = differs_from_files(newest, settings["channels"])
    except Exception:  # noqa: BLE001 - unreadable folders: say nothing rather than guess
        return [line]
    if differs:
        line += (f"; the channel files DIFFER from what runs (hl7relay config diff {newest['id']}; "
                 + ("hl7relay reload applies them)" if newest.get("from_snapshot") else "not applied yet: hl7relay reload)"))
    else:
        line += "; the channel files are what runs"
    return [line]


def _nodes(store) -> list[str]:
    """The engines on this store (PostgreSQL), and whether they run different snapshots."""
    from hl7relay.nodes import ALIVE_SECONDS, drift

    try:
        _, rows = store.nodes()
        leases = store.leases()
    except Exception:  # noqa: BLE001 - an older store: nothing to say
        return []
    lines = []
    for r in rows:
        if r["state"] == "running" and r["heartbeat_age"] > ALIVE_SECONDS:
            state = f"LOST (no heartbeat for {_age(r['heartbeat_age'])})"
        else:
            state = f"{r['state']}, heartbeat {_age(r['heartbeat_age'])} ago"
        held = [lease["name"].removeprefix("queue:") for lease in leases
                if lease["owner"] == r["node_id"] and lease["left"] > 0]
        lines.append(f"  node {r['node_id']} ({r['host']} pid {r['pid']}, {r['version']}): {state}; "
                     f"snapshot {r['snapshot_id'] or '-'} (sha256 {(r['snapshot_sha256'] or '-')[:12]})"
                     + (f"; delivers {len(held)} partition(s): {', '.join(held[:8])}{' …' if len(held) > 8 else ''}"
                        if held else ""))
    drifting = drift(rows)
    if drifting:
        lines.append("  configuration DRIFT: the nodes run different snapshots (" +
                     ", ".join(f"{r['node_id']}: {r['snapshot_id']}" for r in drifting) + "); hl7relay reload on each")
    return (["nodes on this store:"] + lines) if lines else []


def _engine_sync(settings) -> list[str]:
    """The running engine's API destinations, how their synchronisation stands (its sync status)."""
    rows = _from_engine(settings, "/api/v1/sync")
    lines = [describe_sync(row, time.time()) for row in rows or [] if row.get("api")]
    return (["sync status (the running engine):"] + [f"  {line}" for line in lines]) if lines else []


def describe_sync(row: dict, now: float) -> str:
    """One destination's sync status in one line."""
    api = row["api"] or {}
    parts = [f"{row['channel']} -> {row['destination']} ({api.get('method', '?')} {api.get('url', '?')}): "
             f"{row['state']}"]
    if row.get("held"):
        parts.append(f"HELD: {row['held']}")
    if row.get("wait_left"):
        parts.append(f"waiting {row['wait_left']:.0f}s more (Retry-After)")
    parts.append(f"queued {row['depth']}" + (f" (oldest {_age(row['oldest_age'])})" if row.get("oldest_age") else ""))
    parts.append(f"last sent {_age(now - row['last_sent_at'])} ago" if row.get("last_sent_at") else "nothing sent yet")
    if row.get("last_error") and row.get("last_error_at"):
        parts.append(f"last error {_age(now - row['last_error_at'])} ago ({row['last_error_class']}): "
                     f"{row['last_error'][:160]}")
    credential = api.get("credential")
    if credential:
        if credential.get("token_expires_in") is not None:
            parts.append(f"token ({credential['credential']}) expires in {credential['token_expires_in']:.0f}s")
        elif credential.get("token_error"):
            parts.append(f"no token ({credential['credential']}): {credential['token_error']}")
        else:
            parts.append(f"credential {credential['credential']} ({credential['type']})")
    limit = api.get("rate_limit") or {}
    if limit.get("rate"):
        parts.append(f"rate limit {limit['rate']:g}/s ({limit['available']:g} available, {limit['waiting']} waiting)")
    fhir = api.get("fhir")
    if fhir:
        said = f"FHIR {fhir['bundle']}: {fhir['written']} resources written"
        if fhir.get("match"):
            patients = fhir["patients"]
            said += (f", patients matched {patients['matched']}, new {patients['new']}, held {patients['held']}"
                     + (" (hl7relay fhir holds)" if patients["held"] else ""))
        parts.append(said)
    return "; ".join(parts)


def _from_engine(settings, path: str):
    from pathlib import Path

    from hl7relay.ops.api import LOCAL_TOKEN_FILE

    if not settings["admin"].get("port") or not (Path(settings["data_dir"]) / LOCAL_TOKEN_FILE).exists():
        return None
    from hl7relay.cli._api import call_engine

    try:
        status, view = call_engine(settings, "GET", path)
    except SystemExit:  # no engine answers: the store's view is all there is
        return None
    return view if status == 200 else None


def _engine_alerts(settings) -> list[str]:
    """The running engine's alerts, when one runs here (its local token in the data folder)."""
    from hl7relay.cli.alerts import describe

    view = _from_engine(settings, "/api/v1/alerts")
    if view is None:
        return []
    return ["alerts (the running engine):"] + [f"  {line}" for line in describe(view)]
