"""``hl7relay token create|list|revoke``: API tokens for scripts."""

from __future__ import annotations

import json
import sys

from hl7relay.cli._settings import add_settings_arguments

HELP = "API tokens for scripts (shown once, stored hashed)"
DESCRIPTION = """\
  hl7relay token create NAME --role viewer|operator|admin   prints the token once
  hl7relay token create NAME --role sender                 for a PMS posting to http sources that name it
  hl7relay token list
  hl7relay token revoke NAME

A token stands for a role, like a user; send it as "Authorization: Bearer TOKEN". Only its SHA-256
is stored, so a lost token cannot be shown again: revoke it and create another. A sender token may
do nothing but post messages to the channels whose http source lists it (tokens: [NAME])."""


def add_arguments(parser) -> None:
    from hl7relay.ops.auth import ROLES, SENDER_ROLE

    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="a new token (printed once)")
    create.add_argument("name")
    create.add_argument("--role", choices=(*ROLES, SENDER_ROLE), required=True)
    revoke = sub.add_parser("revoke", help="revoke a token")
    revoke.add_argument("name")
    listing = sub.add_parser("list", help="every token (never the token itself)")
    listing.add_argument("--format", choices=("text", "json"), default="text")
    for p in (create, revoke, listing):
        add_settings_arguments(p, channels=False)


def run(args) -> int:
    from hl7relay.ops.auth import cli_audit, new_token, token_hash, valid_name
    from hl7relay.cli._support import format_time, open_store_from_args
    from hl7relay.store.database import StoreError

    if args.action != "list" and not valid_name(args.name):
        print(f"{args.name!r} is not a token name: letters, digits and . _ @ -, up to 64", file=sys.stderr)
        return 2
    store, _ = open_store_from_args(args)
    audit = cli_audit(f"token.{args.action}", getattr(args, "name", ""))
    if args.action == "list":
        rows = store.list_tokens()
        if args.format == "json":
            print(json.dumps(rows, indent=2))
        elif not rows:
            print("no tokens")
        else:
            print(f"{'NAME':<24} {'ROLE':<9} {'CREATED':<19}  {'BY':<20} LAST USED")
            for row in rows:
                used = format_time(row["last_used_at"]) if row["last_used_at"] else "never"
                print(f"{row['name']:<24} {row['role']:<9} {format_time(row['created_at'])}  {row['created_by']:<20} {used}")
        return 0
    if args.action == "create":
        token = new_token()
        try:
            store.add_token(args.name, args.role, token_hash(token), audit["actor"], dict(audit, detail=f"role {args.role}"))
        except StoreError as exc:
            print(str(exc), file=sys.stderr)
            return 1
        print(token)
        print(f"token {args.name} ({args.role}): shown this once; only its hash is kept", file=sys.stderr)
        return 0
    if not store.revoke_token(args.name, audit):
        print(f"no token {args.name!r}", file=sys.stderr)
        return 1
    print(f"token {args.name} revoked")
    return 0
