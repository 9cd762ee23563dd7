"""``hl7relay reload``: apply the channel files to the running engine without a restart."""

from __future__ import annotations

import sys

from hl7relay.cli._settings import add_settings_arguments

HELP = "apply changed channel files to the running engine (lint first; unchanged channels untouched)"
DESCRIPTION = """\
The running engine lints every channel file; on any problem nothing changes and each problem is
printed as FILE:LINE:COL. Otherwise, per channel: unchanged ones are not touched (their
connections stay open); a changed one takes its new configuration for the next message,
rebinding its listener only when its address or TLS changed; a removed or disabled one stops
accepting (its queued deliveries stay stored and resume when it comes back); a new one opens.
SIGHUP does the same. Audited.

--cluster: every node of a cluster (cluster: in the settings) reloads its own channel files, asked
through the store; each answers within a heartbeat (lease_renew), and the answers are printed per
node. Exit status 1 when a node refused, or did not answer within --wait seconds."""


def add_arguments(parser) -> None:
    parser.add_argument("--reason", default="", help="why (written to the audit log)")
    parser.add_argument("--cluster", action="store_true", help="every node of the cluster, through the store")
    parser.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                        help="with --cluster: how long to wait for every node's answer (default 30)")
    add_settings_arguments(parser, channels=False)


def _cluster(args) -> int:
    import json
    import time

    from hl7relay.cli._support import open_store_from_args
    from hl7relay.nodes import ALIVE_SECONDS
    from hl7relay.ops.auth import cli_audit, os_actor

    store, _ = open_store_from_args(args)
    _, nodes = store.nodes()
    live = {n["node_id"] for n in nodes if n["state"] == "running" and n["heartbeat_age"] <= ALIVE_SECONDS}
    if not live:
        print("no running node on this store (hl7relay status lists them)", file=sys.stderr)
        return 1
    command = store.request_command("reload", os_actor(), args.reason, cli_audit("reload", reason=args.reason,
                                                                                detail="every node (--cluster)"))
    deadline = time.monotonic() + args.wait
    answers: dict = {}
    while time.monotonic() < deadline and not live <= set(answers):
        answers = {row["node_id"]: row for row in store.command_results(command)}
        if not live <= set(answers):
            time.sleep(0.2)
    failed = False
    for node in sorted(live | set(answers)):
        row = answers.get(node)
        if row is None:
            print(f"{node}: no answer within {args.wait:g}s")
            failed = True
        elif row["result"] == "ok":
            done = [f"{what} {', '.join(names)}" for what, names in json.loads(row["detail"]).items() if names]
            print(f"{node}: reloaded: " + ("; ".join(done) if done else "nothing changed"))
        else:
            print(f"{node}: {row['result']}: {row['detail']}")
            failed = True
    return 1 if failed else 0


def run(args) -> int:
    from hl7relay.cli._api import call_engine, engine_settings, print_error

    if args.cluster:
        return _cluster(args)
    settings = engine_settings(args)
    status, payload = call_engine(settings, "POST", "/api/v1/reload", {"reason": args.reason})
    if status == 422 and isinstance(payload, dict) and "errors" in payload:
        for error in payload["errors"]:
            print(error, file=sys.stderr)
        print(f"not reloaded: {len(payload['errors'])} problem(s) in the channel files; nothing changed", file=sys.stderr)
        return 1
    if status != 200:
        return print_error(status, payload)
    done = [f"{what} {', '.join(names)}" for what, names in payload.items() if names]
    print("reloaded: " + ("; ".join(done) if done else "nothing changed"))
    return 0
