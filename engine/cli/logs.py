"""``hl7relay logs``: the running engine's last log lines, filtered, and followed live."""

from __future__ import annotations

import json
import signal
import sys
import time
import urllib.parse

from hl7relay.cli._args import count
from hl7relay.cli._settings import add_settings_arguments
from hl7relay.cli._support import age_argument

HELP = "the running engine's last log lines (level, channel, message, time filters; --follow)"
DESCRIPTION = """\
  hl7relay logs [-n 100] [--level warn] [--channel adt-to-lab] [--message-id 1042] [--since 10m] [--grep TEXT]
  hl7relay logs --follow --level error          new lines as they are written (Ctrl-C to stop)

From the engine's memory (its last 5,000 lines, as written to its log output); values quoted in
error texts are masked, and message content (a channel with log_phi: true) is never shown here."""


def add_arguments(parser) -> None:
    parser.add_argument("-n", "--lines", type=count, default=100, help="how many of the last lines (default 100)")
    parser.add_argument("--level", choices=("trace", "debug", "info", "warn", "error"), help="this level and worse")
    parser.add_argument("--channel")
    parser.add_argument("--message-id", type=count, metavar="ID")
    parser.add_argument("--since", type=age_argument, metavar="AGE", help="e.g. 10m, 2h")
    parser.add_argument("--grep", metavar="TEXT", help="lines containing TEXT (any case)")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    add_settings_arguments(parser, channels=False)


def run(args) -> int:
    from hl7relay.cli._api import call_engine, engine_settings, print_error

    settings = engine_settings(args)
    query = {k: v for k, v in (("level", args.level), ("channel", args.channel), ("message_id", args.message_id),
                               ("text", args.grep), ("since", time.time() - args.since if args.since else None)) if v}
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(now=True))
    after, first = 0, True
    try:
        while True:
            limit = max(1, args.lines) if first else 1000
            status, page = call_engine(settings, "GET", "/api/v1/logs?" + urllib.parse.urlencode(
                {**query, "after": after, "limit": limit}))
            if status != 200:
                return print_error(status, page)
            for line in page["lines"]:
                _print(line, args.format)
            after = page["next_after"]
            first = False
            if not args.follow or stop["now"]:
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    return 0


def _print(line: dict, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps({k: v for k, v in line.items() if k != "phi"}), flush=True)
        return
    where = " ".join(f"{k}={line[k]}" for k in ("channel", "destination", "message_id", "control_id", "peer") if line.get(k))
    print(f"{line['time']} {line['level'].upper():5} {line['logger']}: {line['text']}" + (f"  [{where}]" if where else ""),
          flush=True)
    sys.stdout.flush()
