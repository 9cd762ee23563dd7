"""Promotion: channel files that ran in one environment (test), cleared to run in another (prod).

The evidence is the store's: the same files (their hash before any environment's values go in)
must have run in the first environment (a snapshot of them there), with no error class that the
snapshots before them did not have; their channel tests must pass with that environment's values
and they must lint with the target's. A promotion is a row and an audit entry; with ``approvals: 2``
in the target environment's file it waits for a second admin. An engine whose environment says
``promoted_only: true`` starts and reloads only files promoted to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hl7relay.environments import Environment

__all__ = ["Evidence", "gather_evidence", "not_promoted"]


@dataclass(slots=True)
class Evidence:
    source_sha256: str
    from_env: str
    to_env: str
    snapshots: list = field(default_factory=list)  # ids of the snapshots of these files in from_env
    git_commit: str = ""
    messages: int = 0  # processed under them in from_env
    test_cases: int = 0
    test_failures: list = field(default_factory=list)  # "file: case: what differs"
    new_errors: dict = field(default_factory=dict)  # error class -> count, not seen under earlier snapshots
    lint_problems: list = field(default_factory=list)  # with the target environment's values

    def problems(self) -> list[str]:
        """Why these files may not be promoted (nothing: they may)."""
        out = []
        if not self.snapshots:
            out.append(f"these channel files (sha256 {self.source_sha256[:12]}) never ran in {self.from_env}: start or "
                       f"reload an engine with --env {self.from_env} on them first")
        out += [f"channel test failed ({self.from_env} values): {failure}" for failure in self.test_failures]
        out += [f"new error class in {self.from_env} ({count}x): {kind}" for kind, count in sorted(self.new_errors.items())]
        out += [f"lint ({self.to_env} values): {problem}" for problem in self.lint_problems]
        return out

    def summary(self) -> dict:
        return {"source_sha256": self.source_sha256, "from": self.from_env, "to": self.to_env,
                "snapshots": self.snapshots, "git_commit": self.git_commit, "messages": self.messages,
                "test_cases": self.test_cases, "test_failures": self.test_failures[:20],
                "new_errors": dict(list(self.new_errors.items())[:20]), "lint_problems": self.lint_problems[:20]}


def _with_environment(environment: Environment, work):
    from hl7relay.yamlsource import current_environment, set_environment

    before = current_environment()
    set_environment(environment.name, environment.values)
    try:
        return work()
    finally:
        set_environment(*before)


def _run_tests(paths) -> tuple[int, list[str]]:
    from hl7relay.channels.testing import find_test_files, run_test_file

    cases, failures = 0, []
    for test_file in find_test_files(paths):
        results, problems = run_test_file(test_file)
        failures += [str(problem) for problem in problems]
        for result in results:
            cases += 1
            if not result.passed:
                failures.append(f"{result.file}: {result.name}: " + "; ".join(map(str, result.problems))[:300])
    return cases, failures


def gather_evidence(paths, source: Environment, target: Environment, store) -> Evidence:
    """What ``store`` (where the source environment's engine recorded its snapshots) says of the
    channel files in ``paths``, their tests with the source's values and their lint with the target's."""
    from hl7relay.channels import load_channels
    from hl7relay.snapshots import source_sha256

    evidence = Evidence(source_sha256(paths), source.name, target.name)
    ran = store.snapshots_with_source(evidence.source_sha256, source.name)
    evidence.snapshots = [row["id"] for row in ran]
    if ran:
        evidence.git_commit = ran[-1]["git_commit"]
        evidence.messages = store.messages_under(evidence.snapshots)
        first = min(evidence.snapshots)
        earlier = [row["id"] for row in store.snapshots(10000)
                   if row["id"] < first and row["environment"] == source.name]
        before = store.error_classes(earlier)
        evidence.new_errors = {kind: count for kind, count in store.error_classes(evidence.snapshots).items()
                               if kind not in before}
    evidence.test_cases, evidence.test_failures = _with_environment(source, lambda: _run_tests(paths))
    _, errors = _with_environment(target, lambda: load_channels(paths))
    evidence.lint_problems = [str(error) for error in errors]
    return evidence


def not_promoted(paths, environment: Environment | None, store) -> str | None:
    """Why an engine in ``environment`` may not run these files (None: it may): its environment
    runs only promoted files and these were not promoted to it."""
    from hl7relay.snapshots import source_sha256

    if environment is None or not environment.promoted_only:
        return None
    digest = source_sha256(paths)
    if store.promoted(digest, environment.name) is not None:
        return None
    pending = [row for row in store.promotions(200) if row["source_sha256"] == digest and row["to_env"] == environment.name]
    hint = (f"promotion {pending[0]['id']} waits for approval (hl7relay promote --approve {pending[0]['id']})" if pending
            else f"hl7relay promote --from ENV --to {environment.name}, ENV where they ran")
    return (f"environment {environment.name} runs only promoted channel files; these (sha256 {digest[:12]}) were not "
            f"promoted to it: {hint}")
