"""``hl7relay destination show|pause|resume|retry CHANNEL DESTINATION``: a running engine's queues."""

from __future__ import annotations

import json

from hl7relay.cli._settings import add_settings_arguments

HELP = "show, pause, resume or retry a destination's queue on the running engine"
DESCRIPTION = """\
  hl7relay destination show CHANNEL DESTINATION      head, depth, oldest age, last error
  hl7relay destination pause CHANNEL DESTINATION     send nothing more; the queue keeps filling
  hl7relay destination resume CHANNEL DESTINATION
  hl7relay destination retry CHANNEL DESTINATION     skip the backoff of what waits to be retried

Talks to the running engine (its admin listener, with the local token in the data folder); pause
survives a restart; every action is written to the audit log (--reason says why)."""


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (("show", "the queue"), ("pause", "stop sending"), ("resume", "send again"),
                         ("retry", "retry what waits, now")):
        p = sub.add_parser(action, help=text)
        p.add_argument("channel")
        p.add_argument("destination")
        if action == "show":
            p.add_argument("--format", choices=("text", "json"), default="text")
        else:
            p.add_argument("--reason", default="", help="why (written to the audit log)")
        add_settings_arguments(p, channels=False)


def run(args) -> int:
    from hl7relay.cli._api import call_engine, engine_settings, print_error
    from hl7relay.cli.channel import destination_line

    settings = engine_settings(args)
    path = f"/api/v1/channels/{args.channel}/destinations/{args.destination}"
    if args.action == "show":
        status, payload = call_engine(settings, "GET", path)
    else:
        status, payload = call_engine(settings, "POST", f"{path}/{args.action}", {"reason": args.reason})
    if status != 200:
        return print_error(status, payload)
    if getattr(args, "format", "text") == "json":
        print(json.dumps(payload, indent=2))
        return 0
    line = destination_line(f"{args.channel}/{args.destination}", payload)
    if args.action == "retry":
        line += f" ({payload.get('retried_now', 0)} retried now)"
    print(line)
    return 0
