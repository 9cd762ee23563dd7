"""``hl7relay secret set|rotate|list|rm``: the vault of secrets channels name as ${secret:NAME}."""

from __future__ import annotations

import json
import sys

from hl7relay.cli._settings import add_settings_arguments

HELP = "secrets for channels, kept encrypted in the store (${secret:NAME} in a channel file)"
DESCRIPTION = """\
  printf %s "$CLIENT_SECRET" | hl7relay secret set athena-client-secret
  hl7relay secret set lab-api-key --file /run/keys/lab.key
  hl7relay secret rotate athena-client-secret --file new.txt
  hl7relay secret list
  hl7relay secret rm lab-api-key

A channel names a secret as ${secret:NAME}; its value is never written in a YAML file, never
printed, never logged. Values are encrypted in the store (Fernet) with the vault key: the key file
vault.key in the data folder (created 0600 by the first `secret set`; vault_key_file in the
settings) or HL7RELAY_VAULT_KEY (the same key on every engine of a shared PostgreSQL store).
The value is read from standard input (one trailing newline dropped) or --file. Every set,
rotate and rm is written to the audit log (the name, never the value)."""


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (("set", "store a new secret"), ("rotate", "replace an existing secret's value")):
        p = sub.add_parser(action, help=text)
        p.add_argument("name")
        p.add_argument("--file", metavar="PATH", help="read the value from this file (default: standard input)")
        add_settings_arguments(p, channels=False)
    listing = sub.add_parser("list", help="the secrets' names and dates (never a value)")
    listing.add_argument("--format", choices=("text", "json"), default="text")
    add_settings_arguments(listing, channels=False)
    remove = sub.add_parser("rm", help="remove a secret")
    remove.add_argument("name")
    add_settings_arguments(remove, channels=False)


def _value(args) -> str:
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    else:
        if sys.stdin.isatty():
            print(f"the value of {args.name}, then Enter (it is not shown):", file=sys.stderr)
            import getpass

            return getpass.getpass("")
        text = sys.stdin.read()
    return text[:-1] if text.endswith("\n") else text


def run(args) -> int:
    from hl7relay.cli._support import format_time, open_store_from_args
    from hl7relay.ops.auth import cli_audit
    from hl7relay.vault import VaultError, open_vault, valid_secret_name

    name = getattr(args, "name", "")
    if args.action != "list" and not valid_secret_name(name):
        print(f"{name!r} is not a secret name: a letter, then letters, digits and . _ -, up to 64", file=sys.stderr)
        return 2
    store, settings = open_store_from_args(args, create=args.action == "set")
    if args.action == "list":
        rows = store.list_secrets()
        if args.format == "json":
            print(json.dumps(rows, indent=2))
        elif not rows:
            print("no secrets")
        else:
            print(f"{'NAME':<32} {'CREATED':<19}  {'ROTATED':<19}  LAST USED")
            for row in rows:
                print(f"{row['name']:<32} {format_time(row['created_at'])}  "
                      f"{format_time(row['rotated_at']) if row['rotated_at'] else 'never':<19}  "
                      f"{format_time(row['last_used_at']) if row['last_used_at'] else 'never'}")
        return 0
    audit = cli_audit(f"secret.{args.action}", name)
    if args.action == "rm":
        if not store.remove_secret(name, audit):
            print(f"no secret {name!r}", file=sys.stderr)
            return 1
        print(f"secret {name} removed")
        return 0
    try:
        value = _value(args)
    except OSError as exc:
        print(f"{args.file}: cannot read it ({exc.strerror})", file=sys.stderr)
        return 2
    except UnicodeDecodeError:
        print(f"{args.file}: not UTF-8 text", file=sys.stderr)
        return 2
    try:
        vault = open_vault(settings, create_key=args.action == "set", store=store)
        done = vault.set(name, value, audit["actor"], audit, rotate=args.action == "rotate" or False)
    except VaultError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"secret {name} {done}")
    return 0
