"""``hl7relay files``: the files the file sources read, from the store's file ledger."""

from __future__ import annotations

import json
import sys
import time

from hl7relay.cli._settings import add_settings_arguments
from hl7relay.outcomes import FileState

HELP = "the files file sources read: received, done, with errors, duplicates, still being read; a file's messages"
DESCRIPTION = """\
One line per file a file source saw since --since (24h by default), newest first: its ledger id,
channel, name, state, the messages it holds and how many are stored (of them ERROR), when it was
first seen and where it was archived; then the totals by state.

States: reading (being stored; a restart resumes after what is stored), done, errors (every
message stored, some as ERROR, or the file had stray segments: it went to error_to), duplicate
(the same content as a file read before: not imported).

--file ID lists that file's messages in file order: place, line, message id, status, type,
control id and error (values quoted in errors are masked unless --show-phi --reason).

--reimport ID --reason TEXT imports a duplicate file anyway (the PMS meant to send it again): it
goes back into its source's folder and is read at the next look; audited.

Exit status: 0, 1 when a listed file has errors or is a duplicate (for monitoring), 2 wrong
arguments, 3 the store could not be opened."""


def add_arguments(parser) -> None:
    from hl7relay.cli._support import time_argument

    parser.add_argument("--channel", help="only this channel's files")
    parser.add_argument("--since", type=time_argument, default=None, metavar="WHEN",
                        help="first seen since WHEN: an age ago (90m, 12h, 7d) or an ISO date (default: 24h)")
    parser.add_argument("--state", choices=[s.value for s in FileState], help="only files in this state")
    parser.add_argument("--file", type=int, metavar="ID", help="this file's messages, in file order")
    parser.add_argument("--reimport", type=int, metavar="ID", help="import this duplicate file anyway (needs --reason)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--show-phi", action="store_true",
                        help="show values quoted in error texts (masked by default); needs --reason, and is audited")
    parser.add_argument("--reason", help="why patient data is shown unmasked (written to the audit log)")
    add_settings_arguments(parser)


def run(args) -> int:
    from hl7relay.cli._support import format_time, open_store_from_args, phi_permitted
    from hl7relay.ops.phi import mask_text

    store, settings = open_store_from_args(args)
    if args.reimport is not None:
        return _reimport(args, store, settings)
    if not phi_permitted(args, store, "files"):
        return 2
    text = (lambda value: value) if args.show_phi else mask_text
    if args.file is not None:
        entry = store.file(args.file)
        if entry is None:
            print(f"hl7relay files: no file {args.file} in the ledger (hl7relay files lists them)", file=sys.stderr)
            return 2
        rows = store.file_message_rows(args.file)
        for row in rows:
            row["error"] = text(row["error"])
        if args.format == "json":
            print(json.dumps({"file": entry, "messages": rows}, indent=1))
            return 0
        print(_line(entry, format_time))
        for problem in filter(None, (entry.get("problems") or "").splitlines()):
            print(f"    problem: {problem}")
        for row in rows:
            print(f"  #{row['ordinal']:<6} line {row['line']:<7} message {row['id']:<8} {row['status']:<10} "
                  f"{row['message_type'] or '-':<10} {row['control_id'] or '-'}{'  ' + row['error'] if row['error'] else ''}")
        return 0
    since = args.since if args.since is not None else time.time() - 86400
    files = store.files(channel=args.channel, since=since, state=args.state)
    from hl7relay.ops.files import file_totals

    totals = file_totals(files)
    if args.format == "json":
        print(json.dumps({"files": files, "totals": totals}, indent=1))
    else:
        for entry in files:
            print(_line(entry, format_time))
        print(f"{len(files)} file{'s' * (len(files) != 1)} since {format_time(since)}: "
              + ", ".join(f"{count} {state}" for state, count in totals.items()))
    return 1 if totals[FileState.ERRORS.value] or totals[FileState.DUPLICATE.value] else 0


def _line(entry: dict, format_time) -> str:
    held = "?" if entry["messages"] is None else str(entry["messages"])
    errors = f", {entry['errors']} ERROR" if entry["errors"] else ""
    archived = f"  -> {entry['archived_as']}" if entry["archived_as"] else ""
    duplicate = f" of file {entry['duplicate_of']}" if entry["duplicate_of"] else ""
    return (f"file {entry['id']:<6} {entry['channel']:<16} {entry['name']:<28} {entry['state']}{duplicate:<9} "
            f"{entry['committed']}/{held} stored{errors}  first seen {format_time(entry['first_seen'])}{archived}")


def _reimport(args, store, settings) -> int:
    from hl7relay.channels import load_channels
    from hl7relay.ops.auth import cli_audit
    from hl7relay.ops.files import ReimportError, reimport

    if not (args.reason or "").strip():
        print("--reimport needs --reason: importing a duplicate file is written to the audit log with why", file=sys.stderr)
        return 2
    channels, problems = load_channels(settings["channels"])
    if problems:
        print(f"the channel files have problems (hl7relay lint says which): {problems[0]}", file=sys.stderr)
        return 2
    try:
        done = reimport(store, {c.name: c for c in channels}, args.reimport, args.reason,
                        cli_audit("file.reimport", f"file {args.reimport}"))
    except ReimportError as exc:
        print(f"hl7relay files: {exc}", file=sys.stderr)
        return 2 if exc.usage else 1
    print(done)
    return 0

