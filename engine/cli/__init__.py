"""The ``hl7relay`` command. Each verb lives in its own module of this package, exposing
``HELP`` (one line), ``DESCRIPTION``, ``add_arguments(parser)`` and ``run(args) -> exit code``."""

from __future__ import annotations

import argparse
import importlib
import sys

from hl7relay import __version__

__all__ = ["main", "build_parser", "VERBS"]

# Verb name -> module in hl7relay.cli. Later verbs (send, listen, lint, test, run, messages,
# replay, prune, status) are added here as they land.
VERBS = {
    "validate": "hl7relay.cli.validate",
    "send": "hl7relay.cli.send",
    "simulate": "hl7relay.cli.simulate",
    "check": "hl7relay.cli.check",
    "trace": "hl7relay.cli.trace",
    "stats": "hl7relay.cli.stats",
    "logs": "hl7relay.cli.logs",
    "alerts": "hl7relay.cli.alerts",
    "listen": "hl7relay.cli.listen",
    "lint": "hl7relay.cli.lint",
    "test": "hl7relay.cli.test",
    "list": "hl7relay.cli.list",
    "run": "hl7relay.cli.run",
    "messages": "hl7relay.cli.messages",
    "replay": "hl7relay.cli.replay",
    "prune": "hl7relay.cli.prune",
    "status": "hl7relay.cli.status",
    "verify": "hl7relay.cli.verify",
    "user": "hl7relay.cli.user",
    "token": "hl7relay.cli.token",
    "secret": "hl7relay.cli.secret",
    "audit": "hl7relay.cli.audit",
    "channel": "hl7relay.cli.channel",
    "destination": "hl7relay.cli.destination",
    "reload": "hl7relay.cli.reload",
    "fhir": "hl7relay.cli.fhir",
    "files": "hl7relay.cli.files",
    "diff": "hl7relay.cli.diff",
    "config": "hl7relay.cli.config",
    "promote": "hl7relay.cli.promote",
}


class _Parser(argparse.ArgumentParser):
    """A wrong argument is said in one line, with where to read more (argparse prints the whole
    usage block first; the line that matters was lost under it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hl7relay",
        description="hl7relay: an HL7 v2 interface engine. Run 'hl7relay VERB --help' for a verb's options.",
    )
    parser.add_argument("--version", action="version", version=f"hl7relay {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, module_name in VERBS.items():
        module = importlib.import_module(module_name)
        sub = verbs.add_parser(name, help=module.HELP, description=module.DESCRIPTION,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. piped into head
        sys.stderr.close()
        return 0
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, never a traceback
        import os

        if os.environ.get("HL7RELAY_DEBUG"):
            raise
        detail = str(exc).strip().splitlines()
        print(f"hl7relay {args.verb}: internal error: {exc.__class__.__name__}"
              f"{': ' + detail[0] if detail else ''} (HL7RELAY_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 70
