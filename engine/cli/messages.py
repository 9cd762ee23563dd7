"""``hl7relay messages list|search|show``: find stored messages, see what happened to them."""

from __future__ import annotations

import json
import sys

from hl7relay.cli._args import count
from hl7relay.cli._settings import add_settings_arguments

HELP = "find stored messages and show their stages, deliveries and ACKs"
DESCRIPTION = """\
  hl7relay messages list [FILTERS] [--limit N] [--before ID]     newest first, paged by id
  hl7relay messages search [FILTERS] [--text TEXT]                the same, plus a text search
  hl7relay messages show ID                                       everything about one message

Filters (--channel, --status, --since/--until, --type, --control-id, --patient-id, --facility,
--delivery-status) use indexes, so they stay fast on a store of millions of messages; --text
scans what the other filters leave (slower, explicit). Patient data is masked unless --show-phi.
--format json for tools."""


def add_arguments(parser) -> None:
    from hl7relay.cli._support import add_filter_arguments

    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, help_text in (("list", "newest messages matching the filters"),
                            ("search", "like list, with --text for a substring of the raw message")):
        p = sub.add_parser(name, help=help_text)
        add_filter_arguments(p)
        if name == "search":
            p.add_argument("--text", help="substring of the raw message (scans; slower)")
        p.add_argument("--limit", type=count, default=50)
        p.add_argument("--before", type=count, metavar="ID", help="next page: the last id shown")
        _common(p)
    show = sub.add_parser("show", help="one message: stages, deliveries, ACKs")
    show.add_argument("id", type=count)
    _common(show)


def _common(parser) -> None:
    parser.add_argument("--show-phi", action="store_true",
                        help="show patient data (masked by default); needs --reason, and is audited")
    parser.add_argument("--reason", help="why patient data is shown unmasked (written to the audit log)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    add_settings_arguments(parser, channels=False)


def run(args) -> int:
    from hl7relay.cli._support import filters_from_args, format_time, open_store_from_args, phi_permitted
    from hl7relay.phi import mask_message, mask_text, mask_value

    store, _ = open_store_from_args(args)
    target = f"message {args.id}" if args.action == "show" else "messages " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(args).items())
        if k in ("channel", "status", "message_type", "control_id", "patient_id", "facility", "delivery_status", "text")
        and v is not None)
    if not phi_permitted(args, store, target.strip()):
        return 2
    if args.action == "show":
        message = store.get_message(args.id)
        if message is None:
            print(f"no message {args.id}", file=sys.stderr)
            return 1
        show = (lambda data: data.decode("utf-8", "replace").replace("\r", "\n").rstrip()) if args.show_phi else mask_message
        text = (lambda value: value) if args.show_phi else mask_text
        for d in message["deliveries"]:
            d["last_error"] = text(d["last_error"])
            d["last_ack"] = _ack(d["last_ack"], show)
        message["error"] = text(message["error"])
        findings = message["stages"].pop("findings", None)
        if args.format == "json":
            out = {k: v for k, v in message.items() if k not in ("raw", "stages")}
            out["raw"] = show(message["raw"])
            out["stages"] = {name: show(content) for name, content in message["stages"].items()}
            out["findings"] = _findings(findings, text)
            out["patient_id"] = message["patient_id"] if args.show_phi else mask_value(message["patient_id"])
            print(json.dumps(out, indent=2, default=str))
            return 0
        print(f"message {message['id']}  channel {message['channel']}  {format_time(message['received_at'])}  from {message['peer']}")
        print(f"  {message['message_type']} {message['control_id']}  status {message['status']}  ACK {message['ack_code'] or '-'}"
              + (f"  error: {message['error']}" if message["error"] else ""))
        if message.get("replay_of"):
            print(f"  replay of message {message['replay_of']} by {message['replay_operator']}: {message['replay_reason']}")
        if findings:
            print("\nvalidation findings (kept as the channel's validators said: warn):")
            for finding in _findings(findings, text):
                print(f"  {finding}")
        print("\nreceived:\n" + _indent(show(message["raw"])))
        for name, content in sorted(message["stages"].items()):
            print(f"\n{name}:\n" + _indent(show(content)))
        print("\ndeliveries:")
        if not message["deliveries"]:
            print("  (none)")
        for d in message["deliveries"]:
            print(f"  {d['destination']}: {d['status']} after {d['attempts']} attempt(s)"
                  + (f"; {d['last_error']}" if d["last_error"] else ""))
            if d["last_ack"]:
                print("    answer:\n" + _indent(d["last_ack"], "      "))
        return 0
    filters = filters_from_args(args)
    text = args.text.encode() if getattr(args, "text", None) else None
    rows = store.search(**filters, text=text, before_id=args.before, limit=args.limit)
    for row in rows:
        row["patient_id"] = row["patient_id"] if args.show_phi else mask_value(row["patient_id"])
        row["error"] = row["error"] if args.show_phi else mask_text(row["error"])
    if args.format == "json":
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if rows:
        print(f"{'ID':>8}  {'RECEIVED':<19}  {'CHANNEL':<16} {'TYPE':<10} {'CONTROL ID':<20} {'STATUS':<9} ACK PATIENT")
    for row in rows:
        print(f"{row['id']:>8}  {format_time(row['received_at'])}  {row['channel']:<16} {row['message_type']:<10} "
              f"{row['control_id']:<20} {row['status']:<9} {row['ack_code'] or '-':<3} {row['patient_id']}")
        if row["error"]:
            print(f"{'':>10}error: {row['error']}")  # whole, on its own line: never cut
    if len(rows) == args.limit:
        print(f"-- more: --before {rows[-1]['id']}")
    elif not rows:
        print("no messages match")
    return 0


def _ack(stored: str, show) -> str:
    """A destination's answer: the ACK message itself (masked like any message), or what a file
    or channel destination recorded."""
    if stored.startswith("MSH"):
        return show(stored.encode("utf-8", "surrogateescape"))
    return stored


def _findings(data, text) -> list[str]:
    if not data:
        return []
    try:
        items = json.loads(data)
    except ValueError:
        return [text(data.decode("utf-8", "replace"))]
    return [text(f"{f.get('severity', '?')} {f.get('code', '')} {f.get('location', '')}: {f.get('text', '')}".strip())
            for f in items]


def _indent(text: str, prefix: str = "  ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())
