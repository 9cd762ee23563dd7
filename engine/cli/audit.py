"""``hl7relay audit``: who did what, when, from where, and why."""

from __future__ import annotations

import json

from hl7relay.cli._args import count, row_id
from hl7relay.cli._settings import add_settings_arguments

HELP = "read the audit log (actions that change the engine or reveal patient data)"
DESCRIPTION = """\
  hl7relay audit [--since 7d] [--actor os:alice] [--action user.] [--limit 50] [--before ID]

Newest first. Every change of users and tokens, every replay and prune, and every view of
unmasked patient data is recorded with who (user:NAME, token:NAME, or os:LOGIN for the command
line), from where, the target, the reason and the result, in the same transaction as the action."""


def add_arguments(parser) -> None:
    from hl7relay.cli._support import time_argument

    parser.add_argument("--since", type=time_argument, metavar="TIME", help="ISO date/time, or an age: 2h, 7d")
    parser.add_argument("--actor", help="user:NAME, token:NAME or os:LOGIN")
    parser.add_argument("--action", help="an action or its start: user., replay, phi.view")
    parser.add_argument("--limit", type=count, default=50)
    parser.add_argument("--before", type=row_id, metavar="ID", help="next page: the last id shown")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    add_settings_arguments(parser, channels=False)


def run(args) -> int:
    from hl7relay.cli._support import format_time, open_store_from_args

    store, _ = open_store_from_args(args)
    rows = store.audit_entries(since=args.since, actor=args.actor, action=args.action, before_id=args.before,
                               limit=args.limit)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no audit entries match")
        return 0
    for row in rows:
        line = (f"{row['id']:>7}  {format_time(row['at'])}  {row['actor']:<20} {row['role'] or '-':<8} {row['source']:<18} "
                f"{row['action']:<14} "
                f"{row['target']}  {row['result']}")
        print(line.rstrip())
        for label in ("reason", "detail"):
            if row[label]:
                print(f"{'':>9}{label}: {row[label]}")
    if len(rows) == args.limit:
        print(f"-- more: --before {rows[-1]['id']}")
    return 0
