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
SIGHUP does the same. Audited."""


def add_arguments(parser) -> None:
    parser.add_argument("--reason", default="", help="why (written to the audit log)")
    add_settings_arguments(parser, channels=False)


def run(args) -> int:
    from hl7relay.cli._api import call_engine, engine_settings, print_error

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
