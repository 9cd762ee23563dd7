"""``hl7relay user add|list|remove|passwd|role``: the people who may operate the engine."""

from __future__ import annotations

import json
import sys

from hl7relay.cli._settings import add_settings_arguments
from hl7relay.ops.auth import MIN_PASSWORD

HELP = "manage users (roles: viewer, operator, admin); there is no default account"
DESCRIPTION = """\
  hl7relay user add NAME --role viewer|operator|admin     the password from a prompt, or one line
                                                           on standard input with --password-stdin
  hl7relay user list
  hl7relay user passwd NAME
  hl7relay user role NAME --role ROLE
  hl7relay user phi NAME on|off                             an operator may see patient data unmasked
  hl7relay user disable|enable NAME                         keep the account, refuse its sign-ins
  hl7relay user remove NAME

viewer: counters, states, masked messages. operator: + pause/resume/retry, enable/disable,
replay. admin: + reload, prune, users and tokens, the audit log, unmasked patient data (always
with a reason, always audited), which an operator can be given alone (user phi NAME on). Passwords are stored as scrypt hashes; every change is written
to the audit log with the operating-system user who made it."""



def add_arguments(parser) -> None:
    from hl7relay.ops.auth import ROLES

    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="a new user")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, required=True)
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    passwd = sub.add_parser("passwd", help="a new password")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    role = sub.add_parser("role", help="change a user's role")
    role.add_argument("name")
    role.add_argument("--role", choices=ROLES, required=True)
    phi = sub.add_parser("phi", help="give or take an operator's permission to see patient data unmasked")
    phi.add_argument("name")
    phi.add_argument("switch", choices=("on", "off"))
    disable = sub.add_parser("disable", help="refuse the user's sign-ins (and end the sessions at the next request)")
    disable.add_argument("name")
    enable = sub.add_parser("enable", help="let a disabled user sign in again")
    enable.add_argument("name")
    remove = sub.add_parser("remove", help="remove a user")
    remove.add_argument("name")
    listing = sub.add_parser("list", help="every user and role")
    listing.add_argument("--format", choices=("text", "json"), default="text")
    for p in (add, passwd, role, phi, disable, enable, remove, listing):
        add_settings_arguments(p, channels=False)


def _password(args) -> str | None:
    import getpass

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if password != getpass.getpass("again: "):
            print("the two passwords differ; nothing changed", file=sys.stderr)
            return None
    else:
        print("no terminal to ask for a password on: pass --password-stdin and write it to standard input",
              file=sys.stderr)
        return None
    if len(password) < MIN_PASSWORD:
        print(f"a password needs at least {MIN_PASSWORD} characters; nothing changed", file=sys.stderr)
        return None
    return password


def run(args) -> int:
    from hl7relay.store.records import LastAdminError

    try:
        return _run(args)
    except LastAdminError as exc:  # demoting, disabling or removing the last active admin
        print(f"{exc}; nothing changed", file=sys.stderr)
        return 1


def _run(args) -> int:
    from hl7relay.ops.auth import cli_audit, hash_password, valid_name
    from hl7relay.cli._support import format_time, open_store_from_args
    from hl7relay.store.database import StoreError

    if args.action != "list" and not valid_name(args.name):
        print(f"{args.name!r} is not a user name: letters, digits and . _ @ -, up to 64, starting with a letter or digit",
              file=sys.stderr)
        return 2
    # the first user of a new installation may come before the engine's first start
    store, _ = open_store_from_args(args, create=args.action == "add")
    audit = cli_audit(f"user.{args.action}", getattr(args, "name", ""))
    if args.action == "list":
        rows = store.list_users()
        if args.format == "json":
            print(json.dumps(rows, indent=2))
        elif not rows:
            print("no users yet: hl7relay user add NAME --role admin")
        else:
            print(f"{'NAME':<24} {'ROLE':<9} {'PHI':<4} {'STATE':<9} {'CREATED':<20} LAST SIGN-IN")
            for row in rows:
                phi = "yes" if row["phi"] or row["role"] == "admin" else "no"
                print(f"{row['name']:<24} {row['role']:<9} {phi:<4} {'disabled' if row['disabled'] else 'active':<9} "
                      f"{format_time(row['created_at']):<20} {format_time(row['last_login_at']) if row['last_login_at'] else 'never'}")
        return 0
    if args.action == "add":
        password = _password(args)
        if password is None:
            return 2
        try:
            store.add_user(args.name, args.role, hash_password(password), dict(audit, detail=f"role {args.role}"))
        except StoreError as exc:
            print(str(exc), file=sys.stderr)
            return 1
        print(f"user {args.name} added ({args.role})")
        return 0
    if args.action == "passwd":
        if store.get_user(args.name) is None:
            print(f"no user {args.name!r}", file=sys.stderr)
            return 1
        password = _password(args)
        if password is None:
            return 2
        store.update_user(args.name, audit, password_hash=hash_password(password))
        print(f"password of {args.name} changed")
        return 0
    if args.action == "role":
        if not store.update_user(args.name, dict(audit, detail=f"role {args.role}"), role=args.role):
            print(f"no user {args.name!r}", file=sys.stderr)
            return 1
        print(f"{args.name} is now {args.role}")
        return 0
    if args.action == "phi":
        from hl7relay.ops.auth import PHI_GRANTABLE, ROLES

        user = store.get_user(args.name)
        if user is None:
            print(f"no user {args.name!r}", file=sys.stderr)
            return 1
        if args.switch == "on" and ROLES.index(user["role"]) < ROLES.index(PHI_GRANTABLE):
            print(f"{args.name} is a {user['role']}: only an {PHI_GRANTABLE} or an admin may see patient data; "
                  f"nothing changed", file=sys.stderr)
            return 1
        store.update_user(args.name, dict(audit, detail=f"phi {args.switch}"), phi=args.switch == "on")
        print(f"{args.name} {'may' if args.switch == 'on' else 'may not'} see patient data unmasked"
              + (" (an admin always may)" if user["role"] == "admin" and args.switch == "off" else ""))
        return 0
    if args.action in ("disable", "enable"):
        if not store.update_user(args.name, audit, disabled=args.action == "disable"):
            print(f"no user {args.name!r}", file=sys.stderr)
            return 1
        print(f"user {args.name} {args.action}d")
        return 0
    if not store.remove_user(args.name, audit):
        print(f"no user {args.name!r}", file=sys.stderr)
        return 1
    print(f"user {args.name} removed")
    return 0
