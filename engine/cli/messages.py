"""``hl7relay messages list|search|show``: find stored messages, see what happened to them."""

from __future__ import annotations

import json
import sys

from hl7relay.cli._args import count, row_id
from hl7relay.cli._settings import add_settings_arguments

HELP = "find stored messages and show their stages, deliveries and ACKs"
DESCRIPTION = """\
  hl7relay messages list [FILTERS] [--limit N] [--before ID]     newest first, paged by id
  hl7relay messages search [FILTERS] [--text TEXT]                the same, plus a text search
  hl7relay messages show ID                                       everything about one message

--failed lists what needs a person: messages stored as ERROR and messages with a delivery in
ERROR (a dead letter), each with the destination and its error.

Filters (--channel, --status, --since/--until, --type, --control-id, --patient-id, --facility,
--delivery-status, --failed) use indexes, so they stay fast on a store of millions of messages; --text
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
        p.add_argument("--before", type=row_id, metavar="ID", help="next page: the last id shown")
        _common(p)
    show = sub.add_parser("show", help="one message: stages, deliveries, ACKs")
    show.add_argument("id", type=row_id)
    _common(show)


def _common(parser) -> None:
    parser.add_argument("--show-phi", action="store_true",
                        help="show patient data (masked by default); needs --reason, and is audited")
    parser.add_argument("--reason", help="why patient data is shown unmasked (written to the audit log)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    add_settings_arguments(parser, channels=False)


def run(args) -> int:
    from hl7relay.cli._support import filters_from_args, format_time, open_store_from_args, phi_permitted, unknown_channel
    from hl7relay.ops.support import message_view, row_view

    store, settings = open_store_from_args(args)
    target = f"message {args.id}" if args.action == "show" else "messages " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(args).items())
        if k in ("channel", "status", "message_type", "control_id", "patient_id", "facility", "delivery_status", "text")
        and v is not None) + (" --failed" if getattr(args, "failed", False) else "")
    if not phi_permitted(args, store, target.strip()):
        return 2
    problem = unknown_channel(store, settings, getattr(args, "channel", None))
    if problem:
        print(problem, file=sys.stderr)
        return 2
    reason = (args.reason or "").strip()
    if getattr(args, "text", None) and not reason:
        # which messages hold a name, a birth date or a phone number is patient data itself
        print("--text searches message content: say why with --reason (the search and its text are written to "
              "the audit log)", file=sys.stderr)
        return 2
    if args.action == "show":
        stored = store.get_message(args.id)
        if stored is None:
            print(f"no message {args.id}", file=sys.stderr)
            return 1
        message = message_view(stored, args.show_phi)
        if args.format == "json":
            print(json.dumps(message, indent=2, default=str))
            return 0
        print(f"message {message['id']}  channel {message['channel']}  {format_time(message['received_at'])}  from {message['peer']}")
        print(f"  {message['message_type']} {message['control_id']}  status {message['status']}  ACK {message['ack_code'] or '-'}"
              + (f"  error: {message['error']}" if message["error"] else ""))
        if message.get("replay_of"):
            print(f"  replay of message {message['replay_of']} by {message['replay_operator']}: {message['replay_reason']}")
        if message["findings"]:
            print("\nvalidation findings (kept as the channel's validators said: warn):")
            for finding in message["findings"]:
                print(f"  {finding}")
        print("\nreceived:\n" + _indent(message["raw"]))
        for name, content in sorted(message["stages"].items()):
            print(f"\n{name}:\n" + _indent(content))
        print("\ndeliveries:")
        if not message["deliveries"]:
            print("  (none)")
        for d in message["deliveries"]:
            print(f"  {d['destination']}: {d['status']} after {d['attempts']} attempt(s)"
                  + (f"; {d['last_error']}" if d["last_error"] else ""))
            if d["last_ack"]:
                print("    answer:\n" + _indent(d["last_ack"], "      "))
        return 0
    from hl7relay.ops.auth import cli_source, os_actor
    from hl7relay.ops.search import MessageQuery, Searcher, search_messages

    filters = filters_from_args(args)
    failed, since, until = filters.pop("failed"), filters.pop("since"), filters.pop("until")
    query = MessageQuery({k: v for k, v in filters.items() if v is not None}, failed=failed, since=since, until=until,
                         before=args.before, limit=args.limit, text=getattr(args, "text", None))
    # on this host the store is the operating-system user's anyway: a reason is what a content search takes
    found = search_messages(store, query, Searcher(os_actor(), "host", cli_source(), bool(reason), reason))
    stopped_at = getattr(found, "stopped_at", None)  # a text search that reached its scan limit
    if stopped_at is not None:
        # on standard error, so --format json stays parseable: "no match" would be a lie
        print(f"the text search read the newest {found.scanned:,} messages and stopped: older ones were not searched "
              f"(--since/--until for an older period, or --before {stopped_at} to go on)", file=sys.stderr)
    rows = [row_view(row, args.show_phi) for row in found]
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
        for dead in row.get("failed_deliveries", ()):
            print(f"{'':>10}delivery to {dead['destination']} failed: {dead['error']}")
    if len(rows) == args.limit:
        print(f"-- more: --before {rows[-1]['id']}")
    elif not rows:
        print("no match among the messages searched" if stopped_at is not None else "no messages match")
    return 0


def _indent(text: str, prefix: str = "  ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())
