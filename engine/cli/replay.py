"""``hl7relay replay``: send stored messages again through the channel's current configuration."""

from __future__ import annotations

import getpass
import json
import sys

from hl7relay.cli._args import count, row_id
from hl7relay.cli._settings import add_settings_arguments

HELP = "replay stored messages (by id or filters) through the current channel configuration, or as processed"
DESCRIPTION = """\
  hl7relay replay 1042 1043 --reason "lab was down"
  hl7relay replay --failed --channel adt-to-lab --since 1d --dry-run
  hl7relay replay 1042 --destination lab --force --reason "lab lost it"

Each replay is a new message linked to the original, with the operator and the reason recorded;
its deliveries are queued and the running engine sends them. Without --destination a message
goes to the destinations whose delivery failed (dead letters), or to all when none did. --dry-run
shows what would be sent (and a diff when the channel changed since). A message already delivered
to a chosen destination, or still queued for it (that copy is on its way), is only replayed with
--force.

The configuration: the current one by default (what the engine runs: the channel files, or after
hl7relay config rollback the snapshot rolled back to); --as-processed the one each message was
processed under (the configuration snapshot it records; hl7relay config show ID), to the
destinations the current configuration still has."""


def add_arguments(parser) -> None:
    from hl7relay.cli._support import add_filter_arguments

    parser.add_argument("ids", nargs="*", type=row_id, metavar="ID")
    add_filter_arguments(parser)
    parser.add_argument("--limit", type=count, default=1000, help="at most this many messages from the filters (default 1000)")
    parser.add_argument("--destination", action="append", metavar="NAME", help="only these destinations (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="show what would be sent; change nothing")
    parser.add_argument("--force", action="store_true", help="also replay messages already delivered")
    parser.add_argument("--as-processed", action="store_true",
                        help="through the configuration that processed each message (its snapshot), not the current one")
    parser.add_argument("--reason", help="why (recorded with the replay; required unless --dry-run)")
    parser.add_argument("--operator", default=None, help="who (default: the login name)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--show-phi", action="store_true",
                        help="show patient data in diffs (masked by default); needs --reason, and is audited")
    add_settings_arguments(parser)


def run(args) -> int:
    from hl7relay.channels import load_channels
    from hl7relay.cli._support import Progress, filters_from_args, open_store_from_args
    from hl7relay.ops.replay import commit_replay, plan_replay

    if not args.dry_run and not args.reason:
        print("say why with --reason (it is recorded with the replay), or use --dry-run", file=sys.stderr)
        return 2
    from hl7relay.ops.auth import cli_audit
    from hl7relay.cli._support import phi_permitted

    store, settings = open_store_from_args(args)
    if not phi_permitted(args, store, "replay " + " ".join(map(str, args.ids)) if args.ids else "replay (filters)"):
        return 2
    from hl7relay.cli._support import unknown_channel

    problem = unknown_channel(store, settings, args.channel)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    from hl7relay.ops.replay import SnapshotChannels
    from hl7relay.snapshots import load_snapshot_channels

    running = store.snapshot()  # after a rollback the engine runs that snapshot, not the files
    if running is not None and running.get("from_snapshot") is not None:
        channels, errors = load_snapshot_channels(running, settings["channels"])
        for channel in channels:
            channel.snapshot_id = running["id"]
    else:
        channels, errors = load_channels(settings["channels"])
    as_processed = SnapshotChannels(store, settings["channels"]) if args.as_processed else None
    if errors:
        for error in errors:
            print(error, file=sys.stderr)
        print("not replaying: the channel files have problems (see hl7relay lint)", file=sys.stderr)
        return 1
    ids = list(args.ids)
    filters = filters_from_args(args)
    if any(v not in (None, False) for v in filters.values()):
        ids += [row["id"] for row in store.search(**filters, limit=args.limit)][::-1]
    if not ids:
        print("nothing to replay: give ids or filters", file=sys.stderr)
        return 2
    by_name = {c.name: c for c in channels}
    operator = args.operator or getpass.getuser()
    progress = Progress(len(ids), "messages")
    report, replayed, skipped = [], 0, 0
    from hl7relay.ops.phi import mask_message, mask_text

    render = None if args.show_phi else (lambda data: mask_message(data).split("\n"))
    for done, message_id in enumerate(ids, start=1):
        plan = (plan_replay(store, by_name, message_id, args.destination, args.force, as_processed=as_processed)
                if render is None else
                plan_replay(store, by_name, message_id, args.destination, args.force, render, as_processed))
        if not args.show_phi:
            plan.skipped = mask_text(plan.skipped)
        entry = {"id": message_id, "control_id": plan.control_id, "destinations": sorted(plan.outputs),
                 "skipped": plan.skipped, "changed": plan.changes, "snapshot": plan.snapshot_id}
        if not plan.skipped and not args.dry_run:
            entry["replay_id"] = commit_replay(store, by_name, plan, args.reason, operator,
                                               audit=cli_audit("replay"))
            replayed += 1
        elif plan.skipped:
            skipped += 1
        report.append(entry)
        progress.update(done)
    progress.close()
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        for entry in report:
            if entry["skipped"]:
                print(f"{entry['id']} {entry['control_id']}: skipped: {entry['skipped']}")
                continue
            verb = "would send" if args.dry_run else f"queued as message {entry['replay_id']}"
            print(f"{entry['id']} {entry['control_id']}: {verb} to {', '.join(entry['destinations'])}"
                  + (f" as processed (snapshot {entry['snapshot']})" if args.as_processed else ""))
            for name, diff in entry["changed"].items():
                print(f"  {name}: the channel changed since it was sent:")
                print("    " + diff.replace("\n", "\n    "))
        done_text = "would replay" if args.dry_run else "replayed"
        print(f"{done_text} {len(ids) - skipped}, skipped {skipped}")
    missing = sum(1 for entry in report if entry["skipped"].startswith("no message "))
    if missing:
        return 1  # an id that names nothing is a mistake to point out, dry run or not
    return 0 if not skipped or replayed or args.dry_run else 1
