"""``hl7relay verify``: is the store sound, and does it agree with the channels? (exit code for monitoring)"""

from __future__ import annotations

import sys
import time

from hl7relay.cli._settings import add_settings_arguments

HELP = "check the store: backend integrity, schema, orphan rows, queues no channel serves, duplicates, stages, files"
DESCRIPTION = """\
Checks, each answered ok, warning or problem:
  backend integrity        SQLite quick_check (--full: integrity_check) and foreign keys; PostgreSQL:
                           every table and index present and valid
  schema version           the store's against this hl7relay's
  deliveries / stages / file places of missing messages
  queued for undeclared destinations   deliveries no queue will ever send (the channel or the
                           destination was removed from the channel files)
  duplicates within the window         a key stored twice, not as DUPLICATE, within a channel's window
  stages the channels keep             the last --hours' messages without the ACK or transformed stage
                           their channel stores
  overdue deliveries       queued ones more than an hour past their next attempt
  file ledger              each file's count of stored messages against the places recorded; files
                           still being read after an hour

--xref checks the FHIR cross-references instead: every resource a fhir destination wrote, read
back from its server (missing, merged into another, changed there since) and every PMS identifier
searched for (duplicate-identifier: more than one resource carries it); with --repair, the
messages that wrote missing resources are queued again (replays, audited); nothing else changes.

--repair applies the safe fixes, each listed before it is applied and written to the audit log:
migrate an old schema, delete rows of missing messages, move deliveries for undeclared
destinations to ERROR (dead letters, replayable). Nothing else is changed.

Exit status (for monitoring): 0 every check ok, 1 warnings or a check skipped, 2 problems (or wrong arguments),
3 the store could not be opened."""


def add_arguments(parser) -> None:
    from hl7relay.cli.status import _hours

    parser.add_argument("--full", action="store_true", help="SQLite: integrity_check (reads every page) instead of quick_check")
    parser.add_argument("--hours", type=_hours, default=24.0, metavar="H",
                        help="how far back the per-message checks look (default 24; 0: every message)")
    parser.add_argument("--repair", action="store_true", help="apply the safe fixes (listed first, audited)")
    parser.add_argument("--xref", action="store_true",
                        help="check the FHIR cross-references against each fhir destination's server")
    parser.add_argument("--timeout", type=float, default=10.0, help="--xref: seconds per request (default 10)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    add_settings_arguments(parser)


def run(args) -> int:
    from hl7relay.cli._support import open_store_from_args
    from hl7relay.store.verify import PROBLEM, SKIPPED, WARNING, repair, verify

    try:
        store, settings = open_store_from_args(args, migrate=False)
    except SystemExit as exc:  # one line already; monitoring tells "cannot check" from "problems"
        print(exc.code, file=sys.stderr)
        return 3
    channels = _channels(settings)
    if args.xref:
        return _xref(args, store, channels)
    now = time.time()
    window = args.hours * 3600 if args.hours else now
    try:
        checks = verify(store, channels, now, full=args.full, window=window)
    except Exception as exc:  # noqa: BLE001 - a store that fails under the checks: one line, "cannot check"
        print(f"cannot verify {store.display_url}: {exc.__class__.__name__}: "
              f"{str(getattr(exc, 'orig', exc)).strip().splitlines()[0]}", file=sys.stderr)
        return 3
    done = []
    if args.repair and any(c.key for c in checks):
        from hl7relay.ops.auth import cli_audit

        if args.format == "text":
            print("repairing:")
            for check in checks:
                if check.key:
                    print(f"  {check.name}: {check.fix}")
        done = repair(store, checks, now, channels)
        store.audit(cli_audit("store.repair", store.display_url, detail="; ".join(done)))
        checks = verify(store, channels, now, full=args.full, window=window)  # what is left
    skipped = [c for c in checks if c.status == SKIPPED]
    # a check that did not run is not a check that passed: monitoring hears of it as a warning
    worst = 2 if any(c.status == PROBLEM for c in checks) else 1 if skipped or any(c.status == WARNING for c in checks) else 0
    if args.format == "json":
        import json

        print(json.dumps({"store": store.display_url, "checks": [c.to_dict() for c in checks], "repaired": done,
                          "status": ("ok", "warning", "problem")[worst]}, indent=2))
    else:
        for line in done:
            print(f"  done: {line}")
        width = max(len(c.name) for c in checks)
        for check in checks:
            print(f"{check.status.upper():8} {check.name:{width}}  {check.detail}")
            if check.fix and not args.repair:
                print(f"{'':8} {'':{width}}  --repair would {check.fix}")
        verdict = {0: "every check ok", 1: "warnings", 2: "problems"}[worst]
        if skipped and worst == 1 and not any(c.status == WARNING for c in checks):
            verdict = "the checks that ran are ok"
        if skipped:
            verdict += f"; {len(skipped)} skipped ({', '.join(c.name for c in skipped)})"
        print(f"{store.display_url}: " + verdict)
    store.close()
    return worst


def _channels(settings):
    from hl7relay.channels import load_channels

    try:
        channels, errors = load_channels(settings["channels"])
    except Exception:  # noqa: BLE001 - the channel checks are skipped; lint says why
        return None
    return None if errors else channels


def _xref(args, store, channels) -> int:
    """The cross-references of every fhir destination against its server (exit 0 ok, 1 changed, 2 problems)."""
    import json

    from hl7relay.channels.fhir_destination import FHIRDestinationConfig
    from hl7relay.cli.check import _run_on_reactor
    from hl7relay.ops.xref import MISSING, PROBLEMS, verify_xref

    if channels is None:
        print("cannot check the cross-references: the channel files do not load (hl7relay lint says why)",
              file=sys.stderr)
        store.close()
        return 3
    channels = {channel.name: channel for channel in channels}
    targets = [(name, d) for name, channel in sorted(channels.items()) for d in channel.destinations
               if isinstance(d.config, FHIRDestinationConfig)]
    if not targets:
        print("no fhir destination in the channels: nothing to check", file=sys.stderr)
        store.close()
        return 1
    findings, counted = [], 0

    def check_all(reactor):
        from twisted.internet import defer

        @defer.inlineCallbacks
        def go():
            for channel, destination in targets:
                rows = store.xrefs(channel, destination.name)
                found = yield verify_xref(rows, destination.config, reactor, args.timeout)
                findings.extend(found)
                nonlocal counted
                counted += len(rows)
        return go()

    outcome = _run_on_reactor(check_all)
    if outcome is not None and hasattr(outcome, "getErrorMessage"):
        print(f"cannot check the cross-references: {outcome.getErrorMessage()}", file=sys.stderr)
        store.close()
        return 3
    repaired = []
    if args.repair:
        from hl7relay.ops.auth import cli_audit
        from hl7relay.ops.replay import commit_replay, plan_replay

        for f in findings:
            if f.kind != MISSING or f.message_id is None:
                continue
            plan = plan_replay(store, channels, f.message_id, {f.destination}, force=True)
            if plan.skipped:
                repaired.append(f"message {f.message_id}: not queued again: {plan.skipped}")
                continue
            reason = f"verify --xref --repair: {f.resource_type}/{f.fhir_id} missing on the server"
            new_id = commit_replay(store, channels, plan, reason, cli_audit("replay")["actor"],
                                   audit=cli_audit("replay", f"message {f.message_id}", reason=reason))
            repaired.append(f"message {f.message_id} queued again for {f.channel} -> {f.destination} "
                            f"(replay {new_id}): {f.resource_type}/{f.fhir_id} was missing")
    worst = 2 if any(f.kind in PROBLEMS for f in findings) else 1 if findings else 0
    if args.format == "json":
        print(json.dumps({"checked": counted, "findings": [f.to_dict() for f in findings], "repaired": repaired,
                          "status": ("ok", "warning", "problem")[worst]}, indent=2))
    else:
        for f in findings:
            level = "PROBLEM" if f.kind in PROBLEMS else "WARNING"
            said = f" ({f.identifier})" if f.identifier else ""
            print(f"{level:8} {f.kind:20} {f.channel} -> {f.destination}: {f.resource_type}/{f.fhir_id}{said}: {f.detail}"
                  + (f" [message {f.message_id}]" if f.message_id is not None else ""))
        for line in repaired:
            print(f"  done: {line}")
        print(f"{counted} cross-reference(s) checked against {len(targets)} fhir destination(s): "
              + ("every one agrees with its server" if not findings else
                 f"{sum(f.kind in PROBLEMS for f in findings)} problem(s), {sum(f.kind not in PROBLEMS for f in findings)} warning(s)"))
    store.close()
    return worst
