"""``hl7relay channel show|enable|disable NAME``: a running engine's channels."""

from __future__ import annotations

import json

from hl7relay.cli._settings import add_settings_arguments

HELP = "show, enable or disable a channel of the running engine (no restart)"
DESCRIPTION = """\
  hl7relay channel show [NAME]
  hl7relay channel disable NAME [--reason TEXT]   stop accepting; its queued deliveries wait
  hl7relay channel enable NAME [--reason TEXT]

Talks to the running engine (its admin listener, with the local token in the data folder); the
change takes effect at once, survives a restart, and is written to the audit log."""


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="state, address, connections and queues")
    show.add_argument("name", nargs="?")
    show.add_argument("--format", choices=("text", "json"), default="text")
    for action in ("enable", "disable"):
        p = sub.add_parser(action, help=f"{action} a channel")
        p.add_argument("name")
        p.add_argument("--reason", default="", help="why (written to the audit log)")
    for p in sub.choices.values():
        add_settings_arguments(p, channels=False)


def describe(view: dict) -> list[str]:
    state = "enabled" if view["enabled"] else "DISABLED"
    lines = [f"{view['name']}: {state}" + (f", {view['source']} on {view['address']}" if view["address"] else "")
             + f", {view['open_connections']} connection(s) open"]
    for name, queue in sorted(view["destinations"].items()):
        lines.append("  -> " + destination_line(name, queue))
    return lines


def destination_line(name: str, q: dict) -> str:
    # only a network destination has a connection to speak of
    connected = ({True: "connected", False: "NOT connected", None: "not tried yet"}[q["connected"]] + "; "
                 if q.get("type", "mllp") == "mllp" else "")
    text = (f"{name}{' (' + q['type'] + ')' if q.get('type') else ''}: {'PAUSED, ' if q['paused'] else ''}"
            f"{connected}queued {q['depth']}"
            f" ({q['in_flight']} in flight), sent {q['sent']}, failed {q['failed']}, retried {q['retried']}")
    if q.get("head"):
        head = q["head"]
        text += f"; head: message {head['message_id']}, {head['attempts']} attempt(s)"
        if head["next_attempt_in"]:
            text += f", next in {head['next_attempt_in']:.0f}s"
    if q.get("last_error"):
        text += f"; last error: {q['last_error']}"
    return text


def run(args) -> int:
    from hl7relay.cli._api import call_engine, engine_settings, print_error

    settings = engine_settings(args)
    if args.action == "show":
        path = f"/api/v1/channels/{args.name}" if args.name else "/api/v1/channels"
        status, payload = call_engine(settings, "GET", path)
        if status != 200:
            return print_error(status, payload)
        views = [payload] if args.name else payload
        if args.format == "json":
            print(json.dumps(payload, indent=2))
        else:
            for view in views:
                print("\n".join(describe(view)))
        return 0
    status, payload = call_engine(settings, "POST", f"/api/v1/channels/{args.name}/{args.action}", {"reason": args.reason})
    if status != 200:
        return print_error(status, payload)
    print("\n".join(describe(payload)))
    return 0
