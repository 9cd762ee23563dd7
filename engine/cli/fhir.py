"""``hl7relay fhir``: HL7 v2 → FHIR R4 for analysts: convert a message, show the maps' coverage."""

from __future__ import annotations

import json
import sys

HELP = "convert HL7 v2 to FHIR R4 (a Bundle), and show the maps' coverage of HL7's v2-to-FHIR guide"
DESCRIPTION = """\
  hl7relay fhir convert FILE [--bundle message|transaction|collection] [--timezone ZONE] [--maps FILE]
  hl7relay fhir coverage [MESSAGE] [--maps FILE] [--missing] [--format text|json]
  hl7relay fhir holds [--show-phi --reason WHY]       messages held for a person to pick their patient
  hl7relay fhir resolve MESSAGE_ID (--patient ID | --new) --reason WHY [--destination NAME]

convert prints the Bundle of each message in FILE ('-': stdin) as JSON; what the maps left out
(an unmapped code, a bad date) goes to stderr, one line each. A DTM without an offset takes
--timezone (default UTC). --maps FILE adds or replaces maps (the shipped ones stay underneath).
coverage lists every row of HL7's v2-to-FHIR guide for the supported messages (ADT_A01, ADT_A02,
ADT_A03, SIU_S12, ORU_R01) as implemented, exception (with its reason) or missing.
A fhir destination with match: holds a message whose patient matches several on the server:
holds lists them (candidates' names and birth dates with --show-phi, audited); resolve sends the
message again to the patient chosen (--patient) or as a new one (--new), audited."""


def add_arguments(parser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    convert = actions.add_parser("convert", help="print the FHIR Bundle of a message")
    convert.add_argument("file", help="an HL7 file ('-': stdin); several messages give several bundles")
    convert.add_argument("--bundle", choices=("message", "transaction", "collection"), default="message")
    convert.add_argument("--timezone", default="UTC", help="for DTM values without an offset (e.g. Europe/London)")
    convert.add_argument("--maps", metavar="FILE", help="a map file adding to or replacing the shipped maps")
    convert.add_argument("--map", metavar="NAME", help="use this message map whatever MSH-9 says (e.g. SIU_S12)")
    coverage = actions.add_parser("coverage", help="the maps against HL7's v2-to-FHIR guide")
    coverage.add_argument("message", nargs="?", help="one message structure (e.g. SIU_S12)")
    coverage.add_argument("--maps", metavar="FILE", help="a map file adding to or replacing the shipped maps")
    coverage.add_argument("--missing", action="store_true", help="only rows neither implemented nor excepted")
    coverage.add_argument("--format", choices=("text", "json"), default="text")
    from hl7relay.cli._settings import add_settings_arguments

    holds = actions.add_parser("holds", help="messages held for a person to pick their patient")
    holds.add_argument("--show-phi", action="store_true", help="the candidates' names and birth dates (audited)")
    holds.add_argument("--reason", help="why patient data is shown (written to the audit log)")
    holds.add_argument("--format", choices=("text", "json"), default="text")
    add_settings_arguments(holds)
    resolve = actions.add_parser("resolve", help="send a held message to the patient a person picked")
    resolve.add_argument("message_id", type=int, metavar="MESSAGE_ID")
    chosen = resolve.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--patient", metavar="ID", help="the server's Patient id it is")
    chosen.add_argument("--new", action="store_true", help="none of them: a new patient")
    resolve.add_argument("--destination", help="when the message is held for more than one destination")
    resolve.add_argument("--reason", required=True, help="why (written to the audit log)")
    add_settings_arguments(resolve)


def _maps(args):
    from hl7relay.fhir.maps import MapError, default_maps, load_maps

    try:
        return load_maps(args.maps, default_maps()) if args.maps else default_maps()
    except MapError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def run(args) -> int:
    if args.action is None:
        print("hl7relay fhir: say convert, coverage, holds or resolve (see hl7relay fhir --help)", file=sys.stderr)
        return 2
    if args.action == "holds":
        return _holds(args)
    if args.action == "resolve":
        return _resolve(args)
    maps = _maps(args)
    if maps is None:
        return 1
    return _convert(args, maps) if args.action == "convert" else _coverage(args, maps)


def _holds(args) -> int:
    from hl7relay.cli._support import format_time, open_store_from_args, phi_permitted
    from hl7relay.ops.matching import held

    store, _ = open_store_from_args(args)
    try:
        if not phi_permitted(args, store, "fhir holds"):
            return 2
        shown = held(store, args.show_phi)
        if args.format == "json":
            print(json.dumps(shown, indent=2))
            return 0
        for row in shown:
            print(f"message {row['message_id']}  {row['channel']} -> {row['destination']}  held {format_time(row['held_at'])}: "
                  f"{len(row['candidates'])} candidates")
            for c in row["candidates"]:
                print(f"    Patient/{c['id']}  {c['name']}  born {c['birthDate']}  {c['gender']}  "
                      + ", ".join(c["identifiers"]))
        print(f"{len(shown)} message(s) held for matching" + ("" if args.show_phi or not shown else
                                                             " (names masked: --show-phi --reason WHY)"))
        return 0
    finally:
        store.close()


def _resolve(args) -> int:
    from hl7relay.channels import load_channels
    from hl7relay.cli._support import open_store_from_args
    from hl7relay.ops.auth import cli_audit
    from hl7relay.ops.matching import ResolveError, resolve_hold

    store, settings = open_store_from_args(args)
    try:
        channels, errors = load_channels(settings["channels"])
        if errors:
            print("hl7relay fhir resolve: the channel files do not load (hl7relay lint says why)", file=sys.stderr)
            return 1
        try:
            _, done = resolve_hold(store, {c.name: c for c in channels}, args.message_id, args.destination,
                                   args.patient, args.new, args.reason, cli_audit("fhir.match.resolve"))
        except ResolveError as exc:
            print(f"hl7relay fhir resolve: {exc}", file=sys.stderr)
            return 2 if exc.usage else 1
        print(f"message {args.message_id}: {done}")
        return 0
    finally:
        store.close()


def _convert(args, maps) -> int:
    from hl7relay.fhir.convert import ConversionError, Converter
    from hl7relay.hl7.message import Message, ParseError

    try:
        converter = Converter(maps, bundle=args.bundle, timezone=args.timezone, map_name=args.map or "")
    except ValueError as exc:
        print(f"hl7relay fhir convert: {exc}", file=sys.stderr)
        return 2
    from hl7relay.hl7.batch import split_messages

    try:
        data = sys.stdin.buffer.read() if args.file == "-" else open(args.file, "rb").read()
    except OSError as exc:
        print(f"hl7relay fhir convert: {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    label = "<stdin>" if args.file == "-" else args.file
    split = split_messages(data)
    failed = False
    if not split.messages:
        print(f"{label}: no HL7 message (none starts with MSH)", file=sys.stderr)
        return 1
    for chunk in split.messages:
        where = f"{label}:{chunk.line}" if getattr(chunk, "line", None) else label
        try:
            conversion = converter.convert(Message.from_bytes(chunk.data))
        except (ConversionError, ParseError) as exc:
            print(f"{where}: {exc}", file=sys.stderr)
            failed = True
            continue
        for problem in conversion.problems:
            print(f"{where}: {problem}", file=sys.stderr)
        print(json.dumps(conversion.bundle, indent=2, ensure_ascii=False))
    return 1 if failed else 0


def _coverage(args, maps) -> int:
    from hl7relay.fhir.coverage import coverage

    known = set(maps.messages) | {m.measured_as for m in maps.messages.values()}
    if args.message and args.message not in known:
        print(f"hl7relay fhir coverage: no message map {args.message!r} ({', '.join(sorted(known))})", file=sys.stderr)
        return 2
    rows = coverage(maps, args.message)
    if args.missing:
        rows = [r for r in rows if r.status == "missing"]
    if args.format == "json":
        print(json.dumps([{"kind": r.kind, "map": r.map, "source": r.source, "targets": list(r.targets),
                           "status": r.status, "reason": r.reason} for r in rows], indent=2))
    else:
        for r in rows:
            where = f"{r.map} {r.source}" if r.kind != "message" else f"{r.map} → {r.source}"
            targets = "; ".join(r.targets)
            line = f"{r.status:<12} {where:<48} {targets[:60]}"
            print(line + (f"  ({r.reason})" if r.reason else ""))
        counts = {s: sum(1 for r in rows if r.status == s) for s in ("implemented", "exception", "missing")}
        print(f"{len(rows)} rows: {counts['implemented']} implemented, {counts['exception']} exceptions, "
              f"{counts['missing']} missing")
    return 1 if any(r.status == "missing" for r in rows) else 0
