"""``hl7relay trace``: live rows of the messages going through the running engine."""

from __future__ import annotations

import json
import signal
import sys
import time
import urllib.parse

from hl7relay.cli._args import number_in
from hl7relay.cli._settings import add_settings_arguments

HELP = "watch messages in and out of the running engine, live, for a few minutes"
DESCRIPTION = """\
  hl7relay trace                                   everything, in and out, for 5 minutes
  hl7relay trace --channel adt-to-lab --direction in --type ADT^A01 --minutes 15
  hl7relay trace --destination lab --content       with each message, masked
  hl7relay trace --content --show-phi --reason "ticket 4711"   unmasked (admin; audited per message)

One line per message received (IN: peer, type, control id, stored status, the ACK we sent, ACK
latency) and per delivery attempt (OUT: destination, status SENT/RETRY/ERROR, the peer's ACK code,
round trip, the error). The trace attaches to the running engine for 1 to 60 minutes and costs it
nothing when nobody traces; when this terminal reads too slowly the engine drops rows rather than
wait (the count is shown). Ctrl-C or SIGTERM ends it."""


PAGE = 1000  # rows per request: a full page is followed by the next at once


_minutes = number_in(1, 60, "minutes", why="a trace lasts 1 to 60 minutes")


def add_arguments(parser) -> None:
    parser.add_argument("--channel", help="only this channel")
    parser.add_argument("--destination", help="only deliveries to this destination (outbound)")
    parser.add_argument("--type", dest="message_type", metavar="TYPE", help="ADT (any trigger) or ADT^A01")
    parser.add_argument("--direction", choices=("in", "out", "both"), default="both")
    parser.add_argument("--kind", choices=("hl7", "api", "file", "fhir"),
                        help="only what travels as HL7 (MLLP, channel to channel), API calls (http, fhir), files, "
                             "or FHIR (fhir destinations, and any whose last transformer is fhir)")
    parser.add_argument("--minutes", type=_minutes, default=5.0, help="1 to 60 (default 5)")
    parser.add_argument("--content", action="store_true", help="print each message (masked unless --show-phi)")
    parser.add_argument("--show-phi", action="store_true", help="with --content: unmasked; needs --reason, audited")
    parser.add_argument("--reason", help="why patient data is shown unmasked (written to the audit log)")
    parser.add_argument("--format", choices=("text", "json"), default="text",
                        help="json: one object per line (seq, at_ms: milliseconds since the epoch, message_id, "
                             "latency_us: microseconds, attempt, control_id, direction, channel, destination, "
                             "peer, message_type, status, ack, error)")
    add_settings_arguments(parser, channels=False)


def run(args) -> int:
    from hl7relay.cli._api import call_engine, engine_settings, print_error

    if args.show_phi and not (args.reason or "").strip():
        print("--show-phi needs --reason: it is written to the audit log", file=sys.stderr)
        return 2
    settings = engine_settings(args)
    status, session = call_engine(settings, "POST", "/api/v1/traces", {
        "direction": args.direction, "channel": args.channel, "destination": args.destination,
        "message_type": args.message_type, "minutes": args.minutes, "kind": args.kind})
    if status != 200:
        return print_error(status, session)
    trace_id = session["id"]
    stop = {"now": False}

    def end(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, end)
    if args.format == "text":
        what = ", ".join(f"{k} {v}" for k, v in (("channel", args.channel), ("destination", args.destination), ("kind", args.kind),
                                                 ("type", session["message_type"])) if v)
        print(f"tracing {args.direction}{' (' + what + ')' if what else ''} for {args.minutes:g} min; "
              "Ctrl-C to stop", file=sys.stderr, flush=True)
    after, dropped, shown = 0, 0, 0
    try:
        while not stop["now"]:
            status, page = call_engine(settings, "GET", f"/api/v1/traces/{trace_id}?after={after}&limit={PAGE}")
            if status != 200:
                return print_error(status, page)
            for values in page["rows"]:
                row = dict(zip(page["columns"], values))
                after = row["seq"]
                shown += 1
                _print(row, args)
                if args.content and row.get("message_id"):
                    _content(settings, row, args)
            sys.stdout.flush()  # once a page: a write per row would cost more than the row
            if page["trace"]["dropped"] > dropped:
                if args.format == "text":
                    print(f"... {page['trace']['dropped'] - dropped} row(s) dropped: this terminal read too slowly",
                          flush=True)
                dropped = page["trace"]["dropped"]
            if page["trace"]["done"] and not page["rows"]:
                break
            if len(page["rows"]) < PAGE:  # caught up: wait, rather than ask the engine many times a second
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            call_engine(settings, "POST", f"/api/v1/traces/{trace_id}/stop")
        except SystemExit:
            pass  # the engine went away: its traces went with it
    if args.format == "text":
        print(f"trace ended: {shown} row(s)" + (f", {dropped} dropped" if dropped else ""), file=sys.stderr)
    return 0


def _print(row: dict, args) -> None:
    if args.format == "json":
        print(json.dumps(row))
        return
    at = time.strftime("%H:%M:%S", time.localtime(row["at_ms"] // 1000)) + f".{row['at_ms'] % 1000:03d}"
    took = f"{row['latency_us'] / 1000:.1f} ms" if row.get("latency_us") is not None else "-"
    ident = f"{row['message_type'] or '?'} {row['control_id'] or '?'}"
    if row["direction"] == "in":
        line = (f"{at} IN  {row['channel']} <- {row['peer']}  {ident}  {row['status']}  ACK {row['ack'] or '-'}  {took}"
                f"  #{row['message_id'] or '-'}")
    else:
        answer = row["ack"] if (row["ack"] or "").startswith("HTTP") else f"ACK {row['ack'] or '-'}"
        line = (f"{at} OUT {row['channel']} -> {row['destination']}"
                + (f" ({row['peer']})" if row.get("peer") else "") + f"  {ident}  {row['status']}"
                f"{' (attempt ' + str(row['attempt']) + ')' if row.get('attempt', 1) and row.get('attempt', 1) > 1 else ''}"
                f"  {answer}  {took}  #{row['message_id']}" + (f"  {row['error']}" if row["error"] else ""))
    print(line)


def _content(settings, row: dict, args) -> None:
    from hl7relay.cli._api import call_engine

    query = "?" + urllib.parse.urlencode({"show_phi": "1", "reason": args.reason}) if args.show_phi else ""
    status, message = call_engine(settings, "GET", f"/api/v1/messages/{row['message_id']}{query}")
    if status != 200:
        print(f"    (content not available: {message.get('error') if isinstance(message, dict) else status})", flush=True)
        return
    stages = message.get("stages", {})
    # what a destination got: its own stage when it differs, else the transformed message, else what came in
    stage = (stages.get(f"destination:{row['destination']}") or stages.get("transformed")) if row["direction"] == "out" else None
    text = stage or message.get("raw") or ""
    if args.format == "json":
        print(json.dumps({"seq": row["seq"], "content": text}), flush=True)
    else:
        for segment in str(text).replace("\r", "\n").strip().split("\n"):
            print(f"    {segment}", flush=True)
