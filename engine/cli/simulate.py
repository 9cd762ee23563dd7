"""``hl7relay simulate``: a practice-management system's traffic, generated, sent or written."""

from __future__ import annotations

import sys

from hl7relay.cli._args import count, number_in, port, seconds
from hl7relay.cli._tls import add_tls_arguments, tls_from_args

HELP = "send realistic generated HL7 traffic (ADT, SIU, ORU) over MLLP, or write it to files"
DESCRIPTION = """\
Generate what a practice-management system sends about a population of patients with stable
identifiers: registrations, admissions, transfers, discharges and updates (ADT A04/A01/A02/A03/A08),
appointments booked, rescheduled and cancelled (SIU S12/S13/S15), and results with several
observations of different value types (ORU R01), in the HL7 version and character set you choose.
The same --seed gives the same messages byte for byte.

Sends them to an MLLP listener (an engine's channel, or hl7relay listen), or with --url POSTs them
to an http source (hl7relay listen --http, or an engine's channel; --token-file for its sender
token), over --connections
connections, at --rate messages per second (0: as fast as each connection is answered), a patient's
messages always on one connection and in order; then prints what was sent, the ACK codes and the
ACK latency percentiles. With --out DIR it writes one file per message instead and sends nothing.

Exit status: 0 when every message was answered AA (or written), 1 otherwise (AE, AR, CR, no
answer in time, no connection)."""


_rate = number_in(0, 1_000_000, "messages per second",
                  why="a rate is 0 (as fast as possible) to 1000000 messages per second")
_positive = number_in(1, 10 ** 9, "", whole=True, why="give 1 or more")
_connections = number_in(1, 1000, "connections", whole=True, why="connections are 1 to 1000")


def add_arguments(parser) -> None:
    from hl7relay.simulate import CHARSETS, VERSIONS

    parser.add_argument("--host", help="listener host (default with --port: 127.0.0.1)")
    parser.add_argument("--port", type=port, help="listener port: where to send (no default: name the listener, or "
                                                  "use --out)")
    parser.add_argument("--count", type=_positive, default=100, help="messages to send (default: 100)")
    parser.add_argument("--rate", type=_rate, default=0.0, metavar="PER_SECOND",
                        help="messages per second over all connections (default 0: as fast as answered)")
    parser.add_argument("--duration", type=seconds, metavar="SECONDS", help="stop generating after this long")
    parser.add_argument("--connections", type=_connections, default=1, help="connections in parallel (default: 1)")
    parser.add_argument("--seed", type=count, default=1, help="the same seed gives the same messages (default: 1)")
    parser.add_argument("--hl7-version", dest="hl7_version", choices=VERSIONS, default="2.5.1",
                        help="HL7 version, MSH-12 (default: 2.5.1)")
    parser.add_argument("--charset", choices=tuple(CHARSETS), default="utf-8",
                        help="character set, MSH-18 (default: utf-8; ascii leaves accents out of names)")
    parser.add_argument("--patients", type=_positive, default=200, metavar="N",
                        help="patients known at the start (default: 200; registrations add more)")
    parser.add_argument("--ack-mode", choices=("original", "enhanced"), default="original",
                        help="original: MSH-15/16 empty, one ACK (AA/AE/AR); enhanced: AL/AL, an accept ACK (CA) "
                             "then an application ACK (AA) (default: original)")
    parser.add_argument("--sending-application", default="SIMULATOR", help="MSH-3 (default: SIMULATOR)")
    parser.add_argument("--processing-id", choices=("T", "D", "P"), default="T",
                        help="MSH-11: T (training, the default), D (debugging), P (production: only on purpose)")
    parser.add_argument("--sending-facility", default="CLINIC", help="MSH-4 (default: CLINIC)")
    parser.add_argument("--out", metavar="DIR", help="write the messages to files in DIR instead of sending them")
    parser.add_argument("--url", help="POST the messages over HTTP(S) to this URL instead (an http source)")
    parser.add_argument("--token-file", metavar="PATH", help="with --url: a file holding the sender token "
                                                             "(hl7relay token create NAME --role sender)")
    parser.add_argument("--timeout", type=seconds, default=30.0, help="seconds to wait for each ACK (default: 30)")
    parser.add_argument("--connect-timeout", type=seconds, default=10.0, help="seconds to wait to connect (default: 10)")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="the summary as text or JSON")
    parser.add_argument("--log-level", default="error", choices=("trace", "debug", "info", "warn", "error"),
                        help="what the engine logs to standard error (default: error)")
    add_tls_arguments(parser, server=False)


def _simulation(args):
    from hl7relay.simulate import Simulation

    return Simulation(seed=args.seed, version=args.hl7_version, charset=args.charset, patients=args.patients,
                      sending_application=args.sending_application, sending_facility=args.sending_facility,
                      ack_mode=args.ack_mode, processing_id=args.processing_id)


def _write(args) -> int:
    import json
    from pathlib import Path

    folder = Path(args.out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"{folder}: cannot create: {exc.strerror or exc}", file=sys.stderr)
        return 1
    from hl7relay.cli._support import Progress

    simulation, types = _simulation(args), {}
    width = max(6, len(str(args.count)))
    progress = Progress(args.count, "messages written", threshold=1000)
    for number in range(1, args.count + 1):
        if number % 100 == 0:
            progress.update(number)
        message = simulation.next()
        types[message.message_type] = types.get(message.message_type, 0) + 1
        path = folder / f"{number:0{width}d}-{message.message_type.replace('^', '_')}.hl7"
        try:
            path.write_bytes(message.data)
        except OSError as exc:
            progress.close()
            print(f"{path}: cannot write: {exc.strerror or exc}", file=sys.stderr)
            return 1
    progress.close()
    if args.format == "json":
        print(json.dumps({"written": args.count, "folder": str(folder), "types": types}, indent=2))
    else:
        print(f"wrote {args.count} messages (seed {args.seed}, HL7 {args.hl7_version}, {args.charset}) to {folder}: "
              + ", ".join(f"{t} {n}" for t, n in sorted(types.items())))
    return 0


def run(args) -> int:
    if args.url is not None and (args.port is not None or args.out):
        print("hl7relay simulate: --url posts over HTTP: give --url URL, or --port PORT [--host HOST], or --out DIR",
              file=sys.stderr)
        return 2
    if args.token_file is not None and args.url is None:
        print("hl7relay simulate: --token-file goes with --url", file=sys.stderr)
        return 2
    if args.url is not None:
        return _post(args)
    if args.out:
        if args.port is not None or args.host is not None:
            print("hl7relay simulate: --out writes files and sends nothing: give --out DIR, or --port PORT "
                  "[--host HOST]", file=sys.stderr)
            return 2
        return _write(args)
    if args.port is None:
        # generated patients must not go by default into whatever listens on 2575 (a live engine
        # forwards them on): the target is named
        print("hl7relay simulate: say where: --port PORT [--host HOST] (an engine's channel, or hl7relay listen), "
              "or --out DIR", file=sys.stderr)
        return 2
    args.host = args.host or "127.0.0.1"
    from hl7relay.logs import start_logging

    start_logging(args.log_level)
    from hl7relay.mllp.sender import MLLPSender, SenderConfig

    config = SenderConfig(args.host, args.port, connect_timeout=args.connect_timeout, ack_timeout=args.timeout,
                          tls=tls_from_args(args, server=False))
    summary, stopped = _drive(args, lambda reactor: [MLLPSender(config, reactor) for _ in range(args.connections)])
    _report(args, summary, stopped)
    return 0 if summary.accepted and not stopped else 1


def _drive(args, make_senders):
    """Send the simulation through ``make_senders(reactor)`` (one per connection) on the reactor,
    with a progress line on a terminal: (summary, why it stopped early or "")."""
    from twisted.internet import task

    from hl7relay.simulate import Driver

    result = {}

    def main(reactor):
        from hl7relay.cli._support import Progress

        senders = make_senders(reactor)
        driver = Driver(_simulation(args), senders, reactor, args.count, args.rate, args.duration)
        progress = Progress(args.count, "messages answered", threshold=1000)  # a terminal only
        shown = task.LoopingCall(lambda: progress.update(driver.summary.answered))
        shown.clock = reactor
        if progress.enabled:
            shown.start(0.5, now=False)

        def done(summary):
            if shown.running:
                shown.stop()
            progress.close()
            for sender in senders:
                sender.close()
            result["summary"], result["stopped"] = summary, driver.stopped
            return None

        return driver.start().addCallback(done)

    try:
        task.react(main)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise
    return result["summary"], result["stopped"]


def _post(args) -> int:
    from urllib.parse import urlsplit

    parts = urlsplit(args.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        print(f"hl7relay simulate: --url {args.url!r} is not an http(s) URL", file=sys.stderr)
        return 2
    token = None
    if args.token_file:
        try:
            token = open(args.token_file, encoding="utf-8").read().strip()
        except OSError as exc:
            print(f"hl7relay simulate: {args.token_file}: cannot read: {exc.strerror or exc}", file=sys.stderr)
            return 2
    try:
        tls = tls_from_args(args, server=False) if parts.scheme == "https" else None
    except ValueError as exc:
        print(f"hl7relay simulate: {exc}", file=sys.stderr)
        return 2
    from hl7relay.logs import start_logging

    start_logging(args.log_level)
    from hl7relay.apiclient.http import safe_url
    from hl7relay.simulate import HTTPPoster

    summary, stopped = _drive(args, lambda reactor: [
        HTTPPoster(args.url, reactor, token, tls, args.timeout, args.connect_timeout) for _ in range(args.connections)])
    args.host, args.port = safe_url(args.url), None
    _report(args, summary, stopped)
    return 0 if summary.accepted and not stopped else 1


def _report(args, summary, stopped: str) -> None:
    import json

    if args.format == "json":
        print(json.dumps({**summary.to_dict(), "stopped": stopped or None, "seed": args.seed,
                          "hl7_version": args.hl7_version, "charset": args.charset}, indent=2))
        return
    rate = f", {summary.sent / summary.elapsed:,.0f} msgs/s" if summary.elapsed > 0 else ""
    print(f"sent {summary.sent} message{'s' * (summary.sent != 1)} (seed {args.seed}, HL7 {args.hl7_version}, {args.charset}) to "
          f"{args.host if args.port is None else f'{args.host}:{args.port}'} over {args.connections} connection{'s' * (args.connections != 1)} "
          f"in {summary.elapsed:.1f} s{rate}")
    if stopped:
        print(f"  stopped early: {stopped}")
    if summary.types:
        print("  types: " + ", ".join(f"{t} {n}" for t, n in sorted(summary.types.items())))
    if summary.codes:
        print("  answers: " + ", ".join(f"{code.replace('_', ' ')} {n}" for code, n in sorted(summary.codes.items())))
    if summary.latencies:
        p = {name: summary.percentile(q) * 1000 for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))}
        print(f"  ACK latency: p50 {p['p50']:.1f} ms, p95 {p['p95']:.1f} ms, p99 {p['p99']:.1f} ms, max {p['max']:.1f} ms")
