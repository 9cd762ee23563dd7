"""``hl7relay diff --env A --env B``: the channels as each environment renders them, side by side."""

from __future__ import annotations

import difflib
import sys

from hl7relay.cli._settings import add_settings_arguments

HELP = "the channel files as two environments render them (secrets as their references, never values)"
DESCRIPTION = """\
  hl7relay diff --env test --env prod          every channel file, test's values against prod's
  hl7relay diff --env test --env prod channels/adt.yaml

Each channel file is shown with the environment's values in place of ${env:NAME} and ${NAME};
${secret:NAME} and ${file:PATH} stay as they are written (a secret's value is never shown). A
variable an environment lacks shows as <NAME not set>. Exit status: 0 the same, 1 they differ,
2 wrong arguments or an environment with problems."""


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="*", default=["channels"], metavar="PATH", help="channel files or folders (default: channels)")
    parser.add_argument("--env", action="append", metavar="NAME", help="an environment; twice: the two compared")
    add_settings_arguments(parser, channels=False, env=False)


def run(args) -> int:
    from pathlib import Path

    from hl7relay.channels.channel import channel_files
    from hl7relay.cli._settings import resolve_settings
    from hl7relay.environments import load_environment, render

    names = args.env or []
    if len(names) != 2:
        print("hl7relay diff: name two environments: --env test --env prod (see hl7relay diff --help)", file=sys.stderr)
        return 2
    args.env = None  # the settings themselves in no environment
    settings, problems = resolve_settings(args)
    if problems:
        print(problems[0], file=sys.stderr)
        return 2
    environments = []
    for name in names:
        environment, errors = load_environment(settings["environments"], name)
        if environment is None:
            print(errors[0], file=sys.stderr)
            return 2
        environments.append(environment)
    files = channel_files(args.paths)
    if not files:
        print(f"no channel files in {', '.join(args.paths)}", file=sys.stderr)
        return 2
    first, second = environments
    differ = False
    for path in files:
        text = Path(path).read_text(encoding="utf-8")
        left, right = render(text, first.values), render(text, second.values)
        if left == right:
            print(f"{path}: the same in {first.name} and {second.name}")
            continue
        differ = True
        sys.stdout.writelines(difflib.unified_diff(left.splitlines(keepends=True), right.splitlines(keepends=True),
                                                   f"{path} ({first.name})", f"{path} ({second.name})"))
    return 1 if differ else 0
