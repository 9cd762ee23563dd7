"""``hl7relay lint``: check channel files; every problem as FILE:LINE:COL: message."""

from __future__ import annotations

HELP = "check channel files (all problems, as file:line:col)"
DESCRIPTION = """\
Check channel files without running them: unknown keys (with a "did you mean"), wrong types, bad
values, missing required keys, unknown components, invalid HL7 paths, unreadable lookup files,
duplicate channel names or ports, destinations naming channels that do not exist.

  channels/adt.yaml:12:5: unknown key 'fitler' for source 'mllp' (did you mean 'filter')

PATHS are channel files or folders (default: channels). *.test.yaml files are channel tests and
are not linted as channels; a file whose top level says `profile:` is a conformance profile and
is checked as one (config/profiles/). Exit status: 0 clean, 1 any problem.

--all-envs lints the channels once under every environment of environments/ (each with its own
values alone, none of the shell's), so a variable prod lacks and test defines is found before
the deployment: channels/adt.yaml:9:11: [prod] environment variable LAB_HOST is not set ..."""


def add_arguments(parser) -> None:
    from hl7relay.cli._settings import add_settings_arguments

    parser.add_argument("paths", nargs="*", default=["channels"], metavar="PATH", help="channel files or folders (default: channels)")
    parser.add_argument("--all-envs", action="store_true",
                        help="lint under every environment of environments/, each with its own values alone")
    add_settings_arguments(parser, channels=False)  # where ${secret:NAME} values come from (the vault)


def run(args) -> int:
    from pathlib import Path

    from hl7relay.channels import load_channels
    from hl7relay.channels.channel import channel_files
    from hl7relay.validation.conformance import is_profile_file, load_conformance_profile

    from hl7relay.cli._settings import resolve_settings

    from hl7relay.apiclient.credentials import credential_problems

    settings, problems = resolve_settings(args)  # registers the vault for ${secret:NAME}
    for problem in problems:
        print(problem)
    credentials_wrong = credential_problems()
    for problem in credentials_wrong:
        print(problem)
    profiles = []
    for item in map(Path, args.paths):
        candidates = sorted(item.glob("*.yaml")) + sorted(item.glob("*.yml")) if item.is_dir() else [item]
        profiles += [f for f in candidates if f.is_file() and is_profile_file(f)]
    profile_errors = []
    for path in profiles:
        _, errors = load_conformance_profile(path)
        profile_errors += errors
    for error in profile_errors:
        print(error)
    files = channel_files(args.paths)
    if not files:
        if profiles:
            print(f"{len(profiles)} profile{'s' * (len(profiles) != 1)}: "
                  + (f"{len(profile_errors)} problem{'s' * (len(profile_errors) != 1)}" if profile_errors else "OK"))
            return 1 if profile_errors else 0
        print(f"no channel files in {', '.join(args.paths)}")
        return 1
    if args.all_envs:
        return _all_environments(args, settings, len(problems) + len(credentials_wrong) + len(profile_errors), files)
    channels, errors = load_channels(args.paths)
    for error in errors:
        print(error)
    problem_count = len(errors) + len(profile_errors) + len(credentials_wrong)
    if problem_count:
        print(f"{problem_count} problem{'s' * (problem_count != 1)} in {len(files)} file{'s' * (len(files) != 1)}")
        return 1
    print(f"{len(channels)} channel{'s' * (len(channels) != 1)} OK: {', '.join(c.name for c in channels)}")
    return 0


def _all_environments(args, settings: dict, problems_before: int, files: list) -> int:
    from hl7relay.channels import load_channels
    from hl7relay.environments import environment_names, load_environment
    from hl7relay.yamlsource import ONLY_ENVIRONMENT, set_environment

    folder = settings["environments"]
    names = environment_names(folder)
    if not names:
        print(f"no environments in {folder} (environments/NAME.yaml: the values ${{env:NAME}} takes)")
        return 1
    count = problems_before
    channels: list = []
    try:
        for name in names:
            environment, problems = load_environment(folder, name)
            for problem in problems:
                print(problem)
            count += len(problems)
            if environment is None:
                continue
            set_environment(environment.name, environment.values)
            channels, errors = load_channels(args.paths, ONLY_ENVIRONMENT)
            for error in errors:
                print(f"{error.mark.file}:{error.mark.line}:{error.mark.column}: [{name}] {error.message}")
            count += len(errors)
    finally:
        set_environment("", {})
    if count:
        print(f"{count} problem{'s' * (count != 1)} in {len(files)} file{'s' * (len(files) != 1)} under "
              f"{len(names)} environment{'s' * (len(names) != 1)} ({', '.join(names)})")
        return 1
    print(f"{len(channels)} channel{'s' * (len(channels) != 1)} OK in every environment: {', '.join(names)}")
    return 0
