"""``hl7relay test``: run channel tests (channels/<name>.test.yaml), or one message through a
channel (``--message FILE CHANNEL``, the dry run); no network, no store."""

from __future__ import annotations

import sys

HELP = "run channel tests (channels/*.test.yaml), or dry-run a message through a channel (--message)"
DESCRIPTION = """\
Run the cases in channel test files: each gives an input message (a file or inline text) and
expectations (filtered or not, the ACK code, status, error text, fields or the exact output of
each destination). Prints PASS/FAIL per case with what differs. Exit status: 1 if any case fails
or a test file has problems.

With --message FILE CHANNEL (a channel name from the channel folders, or a channel file): run each
message in FILE (- for standard input; a batch file is split) through the channel and show every
step: the filter, what each transformer changed, what each validator found, what each destination
would get, the status it would be stored with and the ACK the sender would get. Nothing is sent or
stored. Exit status: 0 when every message would be accepted (processed or filtered), 1 when one
would be stored as ERROR or cannot be read."""


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help="test files or folders (default: channels); with --message: the CHANNEL")
    parser.add_argument("--message", metavar="FILE", help="dry-run the messages of FILE (- for stdin) through CHANNEL")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="with --message: text or json")
    parser.add_argument("--channels", action="append", metavar="DIR",
                        help="with --message: where to find CHANNEL by name (default: the engine's channel folders)")
    parser.add_argument("--config", metavar="FILE", help="engine config file naming the channel folders")


def run(args) -> int:
    if args.message is not None:
        return _dry_run(args)
    from hl7relay.channels.testing import find_test_files, run_test_file
    from hl7relay.cli._settings import resolve_settings

    args.store = args.data_dir = None
    resolve_settings(args, for_engine=True)  # ${secret:NAME} in the channels under test: from the vault
    paths = args.paths or ["channels"]
    files = find_test_files(paths)
    if not files:
        print(f"no channel tests (*.test.yaml) in {', '.join(paths)}")
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


def find_channel(name_or_file: str, folders) -> tuple[object, list[str]]:
    """A channel by file or by name (from ``folders``): (channel or None, problems as lines)."""
    from pathlib import Path

    from hl7relay.channels import load_channels
    from hl7relay.channels.channel import load_channel
    from hl7relay.spec import did_you_mean

    path = Path(name_or_file)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            return None, [f"{name_or_file}: no such channel file"]
        channel, errors = load_channel(path)
        return channel, [str(e) for e in errors]
    channels, errors = load_channels(folders)
    for channel in channels:
        if channel.name == name_or_file:
            return channel, []
    names = sorted(c.name for c in channels)
    problems = [f"no channel named {name_or_file!r} in {', '.join(map(str, folders))}"
                + (did_you_mean(name_or_file, names) or (f" (channels: {', '.join(names)})" if names else ""))]
    own = [str(e) for e in errors if str(e).startswith(tuple(str(f) for f in folders))]
    return None, problems + own[:20]


def _dry_run(args) -> int:
    import json

    from hl7relay.channels.dryrun import dry_run, render_text
    from hl7relay.outcomes import MessageStatus
    from hl7relay.cli._settings import resolve_settings
    from hl7relay.errors import ParseError
    from hl7relay.hl7.batch import split_messages
    from hl7relay.hl7.message import Message

    if len(args.paths) != 1:
        print("hl7relay test --message FILE needs one CHANNEL (a channel name or a channel file), "
              f"not {len(args.paths)}", file=sys.stderr)
        return 2
    args.store = args.data_dir = None
    settings, problems = resolve_settings(args, for_engine=True)
    if problems and not args.channels:
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1
    channel, problems = find_channel(args.paths[0], settings["channels"])
    if channel is None:
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1
    name = "standard input" if args.message == "-" else args.message
    try:
        data = sys.stdin.buffer.read() if args.message == "-" else open(args.message, "rb").read()
    except OSError as exc:
        print(f"{name}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 1
    split = split_messages(data)
    if not split.is_hl7 or not split.messages:
        print(f"{name}: not HL7: no MSH segment found", file=sys.stderr)
        return 1
    results, failed = [], False
    total = len(split.messages)
    for index, chunk in enumerate(split.messages, start=1):
        where = f"message {index} of {total} ({name}, line {chunk.line})" if total > 1 else name
        try:
            message = Message.from_bytes(chunk.data)
        except ParseError as exc:
            failed = True
            results.append({"message": index, "line": chunk.line, "error": f"cannot parse: {exc}"})
            if args.format == "text":
                print(f"{where}: cannot parse: {exc}")
            continue
        run = dry_run(channel, message)
        failed |= run.status == MessageStatus.ERROR
        if args.format == "text":
            print(render_text(run, where))
        else:
            results.append({"message": index, "line": chunk.line, **run.to_dict()})
    if args.format == "json":
        print(json.dumps(results, indent=2))
    return 1 if failed else 0
