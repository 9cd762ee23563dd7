"""``hl7relay prune``: delete old messages in small transactions; queued ones are never touched."""

from __future__ import annotations

import time

from hl7relay.cli._settings import add_settings_arguments
from hl7relay.outcomes import STORED_STATUSES, MessageStatus
from hl7relay.cli._support import age_argument

HELP = "delete old messages (errored ones are kept longer; queued ones never)"
DESCRIPTION = """\
  hl7relay prune --older-than 30d [--errors-older-than 90d] [--status S] [--channel C]
  hl7relay prune                   # each channel's own retention: {days: 30, errors_days: 90}

Deletes in batches of 500, one short transaction each, so live traffic is never blocked.
Messages with a delivery still QUEUED are never pruned. Errored messages (status ERROR) are kept
for --errors-older-than (default: three times --older-than). --dry-run counts what would go.
An age under one hour (--older-than 0d deletes everything not queued) needs --yes."""


def add_arguments(parser) -> None:
    parser.add_argument("--older-than", metavar="AGE", type=age_argument, help="e.g. 30d, 12h")
    parser.add_argument("--errors-older-than", metavar="AGE", type=age_argument,
                        help="age for ERROR messages (default: 3 x --older-than)")
    parser.add_argument("--dry-run", action="store_true", help="count what would be deleted; delete nothing")
    parser.add_argument("--yes", action="store_true", help="confirm an age under one hour")
    parser.add_argument("--status", action="append", choices=STORED_STATUSES,
                        help="only these statuses (repeatable)")
    parser.add_argument("--channel")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    add_settings_arguments(parser)


def run(args) -> int:
    from hl7relay.channels import load_channels
    import sys

    from hl7relay.cli._support import open_store_from_args

    if args.older_than is not None and not args.dry_run and not args.yes and (
            args.older_than < 3600 or (args.errors_older_than is not None and args.errors_older_than < 3600)):
        print("hl7relay prune: an age under one hour deletes nearly every stored message (all but queued ones); "
              "add --yes to confirm, or --dry-run to count them first", file=sys.stderr)
        return 2
    store, settings = open_store_from_args(args)
    from hl7relay.cli._support import unknown_channel

    problem = unknown_channel(store, settings, args.channel)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    now = time.time()
    plans = []  # (channel or None, age, errors age)
    if args.older_than is not None:
        age = args.older_than
        errors_age = args.errors_older_than if args.errors_older_than is not None else 3 * age
        plans.append((args.channel, age, errors_age))
    else:
        channels, errors = load_channels(settings["channels"])
        if errors:
            for error in errors:
                print(error)
            return 1
        plans = [(c.name, c.retention.days * 86400, c.retention.errors_days * 86400) for c in channels
                 if c.retention is not None and (args.channel is None or c.name == args.channel)]
        if not plans:
            print("no --older-than given and no channel declares retention: nothing to do")
            return 0
    total, report = 0, []
    for channel, age, errors_age in plans:
        statuses = set(args.status or STORED_STATUSES)
        normal = statuses - {MessageStatus.ERROR.value}
        deleted = store.prune(now - age, normal, channel, dry_run=args.dry_run) if normal else 0
        if MessageStatus.ERROR in statuses:  # errors are kept longer
            deleted += store.prune(now - errors_age, {MessageStatus.ERROR.value}, channel, dry_run=args.dry_run)
        total += deleted
        report.append({"channel": channel, "deleted": deleted, "older_than_days": age / 86400,
                       "errors_older_than_days": errors_age / 86400})
    if not args.dry_run:
        from hl7relay.ops.auth import cli_audit

        # prune is many short transactions; its audit entry follows the last of them
        target = ", ".join(sorted({entry["channel"] or "all channels" for entry in report}))
        detail = f"deleted {total} message(s): " + "; ".join(
            f"{entry['channel'] or 'all'} older than {entry['older_than_days']:g}d "
            f"(errors {entry['errors_older_than_days']:g}d): {entry['deleted']}" for entry in report)
        store.audit(cli_audit("prune", target, detail=detail))
    if args.format == "json":
        import json

        print(json.dumps({"deleted": 0 if args.dry_run else total, "would_delete": total if args.dry_run else 0,
                          "dry_run": args.dry_run, "channels": report}, indent=2))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for entry in report:
        print(f"{entry['channel'] or 'all channels'}: {verb} {entry['deleted']} message(s) (older than "
              f"{entry['older_than_days']:g}d, errors older than {entry['errors_older_than_days']:g}d; queued ones kept)")
    print(f"dry run: would prune {total} message(s); nothing deleted" if args.dry_run else f"pruned {total} message(s)")
    return 0
