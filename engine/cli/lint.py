"""``hl7relay lint``: check channel files; every problem as FILE:LINE:COL: message."""

from __future__ import annotations

HELP = "check channel files (all problems, as file:line:col)"
DESCRIPTION = """\
Check channel files without running them: unknown keys (with a "did you mean"), wrong types, bad
values, missing required keys, unknown components, invalid HL7 paths, unreadable lookup files,
duplicate channel names or ports, destinations naming channels that do not exist.

  channels/adt.yaml:12:5: unknown key 'fitler' for source 'mllp' (did you mean 'filter')

PATHS are channel files or folders (default: channels). *.test.yaml files are channel tests and
are not linted as channels. Exit status: 0 clean, 1 any problem."""


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="*", default=["channels"], metavar="PATH", help="channel files or folders (default: channels)")


def run(args) -> int:
    from hl7relay.channels import load_channels
    from hl7relay.channels.channel import channel_files

    files = channel_files(args.paths)
    if not files:
        print(f"no channel files in {', '.join(args.paths)}")
        return 1
    channels, errors = load_channels(args.paths)
    for error in errors:
        print(error)
    if errors:
        print(f"{len(errors)} problem{'s' * (len(errors) != 1)} in {len(files)} file{'s' * (len(files) != 1)}")
        return 1
    print(f"{len(channels)} channel{'s' * (len(channels) != 1)} OK: {', '.join(c.name for c in channels)}")
    return 0
