"""``hl7relay verify``: is the store sound, and does it agree with the channels? (exit code for monitoring)"""

from __future__ import annotations

import sys
import time

from hl7relay.cli._settings import add_settings_arguments

HELP = "check the store: backend integrity, schema, orphan rows, queues no channel serves, duplicates, stages"
DESCRIPTION = """\
Checks, each answered ok, warning or problem:
  backend integrity        SQLite quick_check (--full: integrity_check) and foreign keys; PostgreSQL:
                           every table and index present and valid
  schema version           the store's against this hl7relay's
  deliveries / stages of missing messages
  queued for undeclared destinations   deliveries no queue will ever send (the channel or the
                           destination was removed from the channel files)
  duplicates within the window         a key stored twice, not as DUPLICATE, within a channel's window
  stages the channels keep             the last --hours' messages without the ACK or transformed stage
                           their channel stores
  overdue deliveries       queued ones more than an hour past their next attempt

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
