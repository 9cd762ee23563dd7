"""``hl7relay status``: what each channel and destination is doing, from the store."""

from __future__ import annotations

import json
import time

from hl7relay.cli._settings import add_settings_arguments

HELP = "per channel: received, filtered, errored, queued, oldest queued, last error; per destination: connected"
DESCRIPTION = """\
Per channel: messages received, filtered, errored, duplicates, deliveries queued and the age of
the oldest, the last error. Per destination: queued, sent, errors (dead letters) and whether the
running engine last found it connected."""


def add_arguments(parser) -> None:
    parser.add_argument("--format", choices=("text", "json"), default="text")
    add_settings_arguments(parser, channels=False)


def _age(seconds) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def run(args) -> int:
    from hl7relay.cli._support import format_time, open_store_from_args

    store, _ = open_store_from_args(args)
    status = store.channel_status(time.time())
    if args.format == "json":
        print(json.dumps(status, indent=2, default=str))
        return 0
    if not status:
        print("no messages stored yet")
        return 0
    for channel, entry in sorted(status.items()):
        counts = entry["counts"]
        received = sum(counts.values())
        queued = sum(d["counts"].get("QUEUED", 0) for d in entry["destinations"].values())
        oldest = max((d["oldest_queued_age"] for d in entry["destinations"].values() if d["oldest_queued_age"] is not None), default=None)
        print(f"{channel}: received {received}, processed {counts.get('PROCESSED', 0)}, filtered {counts.get('FILTERED', 0)}, "
              f"errored {counts.get('ERROR', 0)}, duplicates {counts.get('DUPLICATE', 0)}, queued {queued} (oldest {_age(oldest)})")
        if entry["last_error"]:
            last = entry["last_error"]
            print(f"  last error: message {last['id']} at {format_time(last['received_at'])}: {last['error'][:100]}")
        for name, d in sorted(entry["destinations"].items()):
            connected = {True: "connected", False: "NOT connected", None: "not tried yet"}[d["connected"]]
            print(f"  -> {name}: {connected}; queued {d['counts'].get('QUEUED', 0)} (oldest {_age(d['oldest_queued_age'])}), "
                  f"sent {d['counts'].get('SENT', 0)}, errors {d['counts'].get('ERROR', 0)}"
                  + (f"; {d['last_error'][:80]}" if d["last_error"] and d["connected"] is False else ""))
    return 0
