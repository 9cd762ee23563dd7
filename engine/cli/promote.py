"""``hl7relay promote``: clear channel files that ran in one environment to run in another."""

from __future__ import annotations

import json
import sys
import time

from hl7relay.cli._settings import add_settings_arguments

HELP = "clear the channel files that ran in one environment (test) to run in another (prod), with evidence"
DESCRIPTION = """\
  hl7relay promote --from test --to prod --reason "CHG-1234"
  hl7relay promote --approve 7 --reason "reviewed the diff"      (a second admin: four eyes)
  hl7relay promote --list

Checks, before anything is written: these channel files (their hash before any environment's
values go in) ran in --from (the store has a snapshot of them there: an engine started or reloaded
with --env FROM on them); their messages there show no error class the snapshots before them did
not; their channel tests (*.test.yaml) pass with --from's values; they lint with --to's values.
Then a promotion is recorded with that evidence and an audit entry (a change record). When --to's
environment file says `approvals: 2`, it waits for another admin: hl7relay promote --approve ID
(the one who asked cannot approve it). An engine whose environment file says `promoted_only: true`
starts and reloads only promoted files.

--evidence-store URL reads the snapshots and messages of --from from another store (test's own
engine); the promotion is written to this store (--store, the --to engine's).
Exit status: 0 promoted or approved (or nothing wrong with --dry-run), 1 refused, 2 wrong arguments."""


def add_arguments(parser) -> None:
    parser.add_argument("--from", dest="from_env", metavar="ENV", help="where the files ran (test)")
    parser.add_argument("--to", dest="to_env", metavar="ENV", help="where they are to run (prod)")
    parser.add_argument("--reason", help="why: the change record (required to promote or approve)")
    parser.add_argument("--evidence-store", metavar="URL", help="the store of the --from engine (default: --store)")
    parser.add_argument("--dry-run", action="store_true", help="check and show the evidence; write nothing")
    parser.add_argument("--approve", type=int, metavar="ID", help="approve a waiting promotion (another admin)")
    parser.add_argument("--list", action="store_true", help="the promotions, newest first")
    add_settings_arguments(parser, env=False)


def _list(store) -> int:
    from hl7relay.cli._support import format_time

    rows = store.promotions(50)
    for row in rows:
        approved = f" approved by {row['approved_by']}" if row["approved_by"] else ""
        print(f"{row['id']:<5} {format_time(row['requested_at'])}  {row['from_env']} -> {row['to_env']}  "
              f"{row['state']:<8} sha256 {row['source_sha256'][:12]}  by {row['requested_by']}{approved}: {row['reason']}")
    if not rows:
        print("no promotion yet")
    return 0


def run(args) -> int:
    from hl7relay.cli._support import open_store_from_args
    from hl7relay.ops.auth import cli_audit, os_actor

    if args.list:
        store, _ = open_store_from_args(args)
        return _list(store)
    if not (args.reason or "").strip() and not args.dry_run:
        print("hl7relay promote: say why with --reason (it is the change record)", file=sys.stderr)
        return 2
    if args.approve is not None:
        store, _ = open_store_from_args(args)
        row = store.promotion(args.approve)
        if row is None:
            print(f"hl7relay promote: no promotion {args.approve} (hl7relay promote --list)", file=sys.stderr)
            return 2
        if row["state"] != "pending":
            print(f"promotion {args.approve} is {row['state']}, not waiting for approval", file=sys.stderr)
            return 1
        actor = os_actor()
        if actor == row["requested_by"]:
            print(f"promotion {args.approve} was asked for by {actor}: another admin approves it (four eyes)",
                  file=sys.stderr)
            return 1
        audit = cli_audit("config.promote.approve", reason=args.reason.strip(),
                          detail=f"{row['from_env']} -> {row['to_env']} sha256 {row['source_sha256']}")
        if not store.approve_promotion(args.approve, actor, time.time(), audit):
            print(f"promotion {args.approve} could not be approved (approved meanwhile, or yours)", file=sys.stderr)
            return 1
        print(f"promotion {args.approve} approved: {row['to_env']} may run these files "
              f"(sha256 {row['source_sha256'][:12]})")
        return 0
    if not args.from_env or not args.to_env or args.from_env == args.to_env:
        print("hl7relay promote: name two environments: --from test --to prod (see hl7relay promote --help)",
              file=sys.stderr)
        return 2
    return _promote(args, cli_audit, os_actor)


def _promote(args, cli_audit, os_actor) -> int:
    from hl7relay.cli._support import open_store_from_args
    from hl7relay.environments import load_environment
    from hl7relay.outcomes import PromotionState
    from hl7relay.promotion import gather_evidence
    from hl7relay.store.database import Store

    store, settings = open_store_from_args(args, create=True)  # a promotion may come before prod's first start
    environments = []
    for name in (args.from_env, args.to_env):
        environment, errors = load_environment(settings["environments"], name)
        if environment is None:
            print(errors[0], file=sys.stderr)
            return 2
        environments.append(environment)
    source, target = environments
    try:
        evidence_store = Store(args.evidence_store, create=False) if args.evidence_store else store
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        print(f"hl7relay promote: cannot open the evidence store: {exc}", file=sys.stderr)
        return 2
    evidence = gather_evidence(settings["channels"], source, target, evidence_store)
    print(f"files: sha256 {evidence.source_sha256[:12]}" + (f", git {evidence.git_commit[:12]}" if evidence.git_commit else ""))
    print(f"ran in {source.name}: " + (f"snapshot {', '.join(map(str, evidence.snapshots))}, {evidence.messages} "
                                       "message(s) processed" if evidence.snapshots else "never"))
    print(f"channel tests ({source.name} values): {evidence.test_cases} case(s), {len(evidence.test_failures)} failed")
    problems = evidence.problems()
    for problem in problems:
        print(f"refused: {problem}", file=sys.stderr)
    if problems:
        print(f"not promoted to {target.name}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    if args.dry_run:
        print(f"would promote to {target.name} ({target.approvals} approval(s) needed)")
        return 0
    actor = os_actor()
    state = PromotionState.APPROVED if target.approvals <= 1 else PromotionState.PENDING
    row = {"requested_at": time.time(), "from_env": source.name, "to_env": target.name,
           "source_sha256": evidence.source_sha256, "evidence": json.dumps(evidence.summary()), "requested_by": actor,
           "reason": args.reason.strip()[:500], "approvals_needed": target.approvals, "state": state.value,
           "approved_by": actor if state is PromotionState.APPROVED else "",
           "approved_at": time.time() if state is PromotionState.APPROVED else None}
    audit = cli_audit("config.promote", reason=args.reason.strip(), result=state.value,
                      detail=json.dumps(evidence.summary())[:2000])
    number = store.record_promotion(row, audit)
    if state is PromotionState.PENDING:
        print(f"promotion {number} waits for a second admin: hl7relay promote --approve {number} --reason ... "
              f"(environment {target.name} needs {target.approvals} approvals)")
    else:
        print(f"promotion {number}: {target.name} may run these files")
    return 0
