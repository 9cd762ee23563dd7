"""``hl7relay config``: the configuration snapshots the engine recorded at each start and reload."""

from __future__ import annotations

import difflib
import json
import sys

from hl7relay.cli._settings import add_settings_arguments

HELP = "what the engine ran: configuration snapshots (history, show, diff, rollback)"
DESCRIPTION = """\
  hl7relay config history              the snapshots, newest first: when, why (start, reload), who,
                                       the environment, git commit (+ with changes), files, sha256
  hl7relay config show ID [PATH]       a snapshot's files (one of them with PATH)
  hl7relay config diff ID1 ID2         what changed between two snapshots, file by file
  hl7relay config diff ID              what differs between a snapshot and the channel files now
  hl7relay config rollback ID --reason R
                                       the running engine runs snapshot ID's configuration again:
                                       linted first, then applied like a reload (on any problem
                                       nothing changes); recorded as a new snapshot. It stays (a
                                       restart too) until hl7relay reload applies the files;
                                       hl7relay status says whether they differ. What was already
                                       sent stays sent (hl7relay replay sends chosen ones again).

A snapshot holds the channel folders' files as the engine loaded them: the environment file's values
in place of ${env:NAME}; ${secret:NAME}, ${file:PATH} and the process's own variables stay
references, never values.
Exit status: 0, 1 (diff: they differ; rollback: refused), 2 wrong arguments or no such snapshot."""


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    history = sub.add_parser("history", help="the snapshots, newest first")
    history.add_argument("--limit", type=int, default=50)
    history.add_argument("--format", choices=("text", "json"), default="text")
    show = sub.add_parser("show", help="a snapshot's files")
    show.add_argument("id", type=int)
    show.add_argument("path", nargs="?", help="only this file")
    diff = sub.add_parser("diff", help="what changed between two snapshots")
    diff.add_argument("first", type=int)
    diff.add_argument("second", type=int, nargs="?", help="(default: the channel files now)")
    rollback = sub.add_parser("rollback", help="run a snapshot's configuration again")
    rollback.add_argument("id", type=int)
    rollback.add_argument("--reason", required=True, help="why (recorded with the new snapshot and in the audit log)")
    add_settings_arguments(parser, channels=False, env=False)
    for p in sub.choices.values():
        add_settings_arguments(p, channels=True, env=True)


def _rollback(args) -> int:
    from hl7relay.cli._api import call_engine, engine_settings, print_error

    settings = engine_settings(args)
    status, payload = call_engine(settings, "POST", "/api/v1/config/rollback", {"snapshot": args.id, "reason": args.reason})
    if status == 422 and isinstance(payload, dict) and "errors" in payload:
        for error in payload["errors"]:
            print(error, file=sys.stderr)
        print(f"not rolled back: snapshot {args.id} has {len(payload['errors'])} problem(s) now; nothing changed",
              file=sys.stderr)
        return 1
    if status in (404, 400):
        print(f"hl7relay config: {payload.get('error') if isinstance(payload, dict) else payload}", file=sys.stderr)
        return 2
    if status != 200 or not isinstance(payload, dict):
        return print_error(status, payload)
    done = [f"{what} {', '.join(names)}" for what, names in payload.items() if isinstance(names, list) and names]
    print(f"rolled back to snapshot {args.id}: now snapshot {payload.get('snapshot')}; " + ("; ".join(done) or "nothing changed"))
    print(payload.get("note", ""))
    print("the engine runs it until hl7relay reload applies the channel files (hl7relay status says whether they differ)")
    return 0


def run(args) -> int:
    from hl7relay.cli._support import format_time, open_store_from_args

    if args.action == "rollback":
        return _rollback(args)
    store, settings = open_store_from_args(args)
    action = args.action or "history"
    if action == "history":
        rows = store.snapshots(getattr(args, "limit", 50))
        if getattr(args, "format", "text") == "json":
            print(json.dumps(rows, indent=1))
            return 0
        for r in rows:
            git = f"git {r['git_commit'][:12]}{'+changes' if r['git_dirty'] else ''}" if r["git_commit"] else "no git"
            what = r["reason"] + (f" to {r['from_snapshot']}" if r.get("from_snapshot") and r["reason"] == "rollback"
                                  else f" ({r['from_snapshot']})" if r.get("from_snapshot") else "")
            print(f"{r['id']:<6} {format_time(r['taken_at'])}  {what:<14} {r['actor']:<24} "
                  f"{r['environment'] or '-':<8} {git:<22} {r['files']} files  sha256 {r['sha256'][:12]}"
                  + (f"  \"{r['note']}\"" if r.get("note") else ""))
        if not rows:
            print("no snapshot yet (the engine records one at each start and reload)")
        return 0
    if action == "show":
        snapshot = store.snapshot(args.id)
        if snapshot is None:
            print(f"hl7relay config: no snapshot {args.id} (hl7relay config history)", file=sys.stderr)
            return 2
        files = snapshot["files"]
        if args.path:
            if args.path not in files:
                print(f"hl7relay config: snapshot {args.id} has no {args.path} ({', '.join(sorted(files))})", file=sys.stderr)
                return 2
            sys.stdout.write(files[args.path])
            return 0
        for path in sorted(files):
            print(f"# {path}")
            sys.stdout.write(files[path] if files[path].endswith("\n") else files[path] + "\n")
        return 0
    first = store.snapshot(args.first)
    if args.second is None:
        from hl7relay.snapshots import files_now, in_folders

        now = files_now(settings["channels"])
        second, label = {"files": now}, "the files now"
        if first is not None:  # the channel folders' files (a settings file is not read again here), each
            import os        # named as the snapshot names it (the folders may be named otherwise here)

            held = in_folders(first["files"], settings["channels"])
            by_place = {os.path.abspath(path): path for path in held}
            first = dict(first, files=held)
            second = {"files": {by_place.get(os.path.abspath(path), path): text for path, text in now.items()}}
    else:
        second, label = store.snapshot(args.second), f"snapshot {args.second}"
    for number, snapshot in ((args.first, first), (args.second, second)):
        if snapshot is None:
            print(f"hl7relay config: no snapshot {number} (hl7relay config history)", file=sys.stderr)
            return 2
    left, right = first["files"], second["files"]
    changed = False
    for path in sorted(set(left) | set(right)):
        a, b = left.get(path, ""), right.get(path, "")
        if a == b:
            continue
        changed = True
        sys.stdout.writelines(difflib.unified_diff(a.splitlines(keepends=True), b.splitlines(keepends=True),
                                                   f"{path} (snapshot {args.first})" if path in left else "/dev/null",
                                                   f"{path} ({label})" if path in right else "/dev/null"))
    if not changed:
        print(f"snapshot {args.first} and {label} hold the same files")
    return 1 if changed else 0
