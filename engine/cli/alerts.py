"""``hl7relay alerts``: the running engine's own alerts; silence one (audited)."""

from __future__ import annotations

import json
import time

from hl7relay.cli._args import number_in
from hl7relay.cli._settings import add_settings_arguments

HELP = "the engine's alerts (queue stuck or growing, destination down, errors, dead letters, store, slow ACKs); silence"
DESCRIPTION = """\
  hl7relay alerts                                  firing and pending alerts, resolved in the last hour, silences
  hl7relay alerts silence HL7RelayDestinationDown --channel adt-to-lab --destination lab --minutes 120 --reason "lab maintenance"
  hl7relay alerts unsilence HL7RelayDestinationDown --channel adt-to-lab --destination lab

The engine evaluates the conditions of config/prometheus/hl7relay-alerts.yml itself and notifies
by webhook and/or e-mail (alerts: in the engine config); a silenced alert still shows here but
nobody is notified. Silencing and unsilencing are written to the audit log."""


_minutes = number_in(1, 7 * 1440, "minutes", why="a silence lasts 1 minute to 7 days (10080 minutes)")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    listing = sub.add_parser("list", help="the alerts (the default)")
    listing.add_argument("--format", choices=("text", "json"), default="text")
    for name in ("silence", "unsilence"):
        p = sub.add_parser(name, help=f"{name} an alert rule (for a channel, a destination, or everywhere)")
        p.add_argument("rule", help="e.g. HL7RelayDestinationDown")
        p.add_argument("--channel")
        p.add_argument("--destination")
        if name == "silence":
            p.add_argument("--minutes", type=_minutes, default=60.0, help="1 to 10080 (default 60)")
            p.add_argument("--reason", required=True, help="why (written to the audit log)")
    for p in (parser, *sub.choices.values()):
        add_settings_arguments(p, channels=False)
    parser.add_argument("--format", choices=("text", "json"), default="text")


def run(args) -> int:
    from hl7relay.cli._api import call_engine, engine_settings, print_error

    settings = engine_settings(args)
    if args.action in ("silence", "unsilence"):
        body = {"rule": args.rule, "channel": args.channel, "destination": args.destination}
        if args.action == "silence":
            body.update(minutes=args.minutes, reason=args.reason)
        status, answer = call_engine(settings, "POST", f"/api/v1/alerts/{args.action}", body)
        if status != 200:
            return print_error(status, answer)
        where = "/".join(x for x in (args.channel, args.destination) if x) or "every channel"
        print(f"{args.rule} for {where}: " + (f"silenced until {time.strftime('%Y-%m-%d %H:%M', time.localtime(answer['until']))}"
                                              if args.action == "silence" else "no longer silenced"))
        return 0
    status, view = call_engine(settings, "GET", "/api/v1/alerts")
    if status != 200:
        return print_error(status, view)
    if getattr(args, "format", "text") == "json":
        print(json.dumps(view, indent=2))
        return 0
    for line in describe(view):
        print(line)
    return 0


def describe(view: dict) -> list[str]:
    """Lines for people (hl7relay alerts, and hl7relay status when an engine runs)."""
    lines = []
    for a in view["alerts"]:
        since = time.strftime("%H:%M:%S", time.localtime(a["fired_at"] or a["since"]))
        silenced = (f" (silenced until {time.strftime('%H:%M', time.localtime(a['silenced_until']))})"
                    if a["silenced_until"] else "")
        lines.append(f"{a['state'].upper():8} {a['severity']:4} {a['rule']}: {a['summary']} (since {since}){silenced}")
    for a in view["resolved"]:
        lines.append(f"RESOLVED      {a['rule']}: {a['summary']} "
                     f"(at {time.strftime('%H:%M:%S', time.localtime(a['resolved_at']))})")
    for s in view["silences"]:
        where = "/".join(x for x in (s["channel"], s["destination"]) if x) or "everywhere"
        lines.append(f"silence: {s['rule']} {where} until {time.strftime('%Y-%m-%d %H:%M', time.localtime(s['until']))} "
                     f"by {s['actor']}: {s['reason']}")
    if not lines:
        lines.append("no alert firing or pending")
    notifiers = ", ".join(view["notifiers"]) or "none configured (alerts: webhook/email in the engine config)"
    lines.append(f"notifications: {notifiers}; sent {view['notifications']['sent']}, failed {view['notifications']['failed']}")
    return lines
