"""``hl7relay test``: run channel tests (channels/<name>.test.yaml), no network, no store."""

from __future__ import annotations

HELP = "run channel tests (channels/*.test.yaml)"
DESCRIPTION = """\
Run the cases in channel test files: each gives an input message (a file or inline text) and
expectations (filtered or not, the ACK code, status, error text, fields or the exact output of
each destination). Prints PASS/FAIL per case with what differs. Exit status: 1 if any case fails
or a test file has problems."""


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="*", default=["channels"], metavar="PATH", help="test files or folders (default: channels)")


def run(args) -> int:
    from hl7relay.channels.testing import find_test_files, run_test_file

    files = find_test_files(args.paths)
    if not files:
        print(f"no channel tests (*.test.yaml) in {', '.join(args.paths)}")
        return 1
    passed = failed = 0
    for file in files:
        results, errors = run_test_file(file)
        for error in errors:
            print(error)
            failed += 1
        for result in results:
            if result.passed:
                passed += 1
                print(f"PASS {file}: {result.name}")
            else:
                failed += 1
                print(f"FAIL {file}: {result.name}")
                for problem in result.problems:
                    print(f"  {problem}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0
