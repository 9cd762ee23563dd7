"""``hl7relay send``: send messages over MLLP and show each ACK (also a connection tester)."""

from __future__ import annotations

import sys
from pathlib import Path

from hl7relay.cli._args import port, seconds
from hl7relay.hl7.batch import split_messages
from hl7relay.cli._tls import add_tls_arguments, tls_from_args
from hl7relay.cli._inputs import InputError, collect_inputs
from hl7relay.errors import ParseError
from hl7relay.hl7.message import Message

HELP = "send messages over MLLP and print each ACK"
DESCRIPTION = """\
Send every message in the inputs (files, directories, batches, or - for standard input) to an
MLLP listener, one at a time on one connection, and print each answer:

  samples/adt_a01.hl7 MSG00001: AA MSG00001
  samples/bad.hl7 BAD00001: AE BAD00001 PID: required segment PID missing ...

Exit status: 0 when every answer is AA or CA, 1 otherwise (AE, AR, CE, CR, no ACK in time,
connection refused), 2 when an input is not readable HL7."""


def add_arguments(parser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="FILE|DIR|-")
    parser.add_argument("--host", default="127.0.0.1", help="listener host (default: 127.0.0.1)")
    parser.add_argument("--port", type=port, default=2575, help="listener port (default: 2575)")
    parser.add_argument("--timeout", type=seconds, default=30.0, help="seconds to wait for each ACK (default: 30)")
    parser.add_argument("--connect-timeout", type=seconds, default=10.0, help="seconds to wait to connect (default: 10)")
    parser.add_argument("--log-level", default="warn", choices=("trace", "debug", "info", "warn", "error"),
                        help="what the engine logs to standard error (default: warn)")
    add_tls_arguments(parser, server=False)


def _messages(inputs):
    found = collect_inputs(inputs)
    for note in found.notes:
        yield note.split(":", 1)[0], None, note
    for name, path in found:
        try:
            data = sys.stdin.buffer.read() if path is None else Path(path).read_bytes()
        except OSError as exc:
            yield name, None, f"{name}: cannot read it ({exc.strerror or exc})"
            continue
        chunks = split_messages(data).messages
        if not chunks:
            yield name, None, f"{name}: not HL7 (no MSH segment)"
        for chunk in chunks:
            try:
                yield name, Message.from_bytes(chunk.data), None
            except ParseError as exc:
                yield name, None, f"{name} line {chunk.line}: {exc}"


def run(args) -> int:
    from hl7relay.logs import start_logging

    try:
        collect_inputs(args.inputs)  # an empty argument: said before anything is sent
    except InputError as exc:
        print(f"hl7relay send: {exc}", file=sys.stderr)
        return 2

    start_logging(args.log_level)
    from twisted.internet import defer, task

    from hl7relay.mllp.sender import MLLPSender, SenderConfig

    config = SenderConfig(args.host, args.port, connect_timeout=args.connect_timeout, ack_timeout=args.timeout,
                          tls=tls_from_args(args, server=False))
    outcome = {"failed": 0, "unreadable": 0, "sent": 0}

    @defer.inlineCallbacks
    def main(reactor):
        sender = MLLPSender(config, reactor)
        try:
            for name, message, problem in _messages(args.inputs):
                if message is None:
                    outcome["unreadable"] += 1
                    print(problem, file=sys.stderr)
                    continue
                result = yield sender.send(message)
                outcome["sent"] += 1
                if not result.ok:
                    outcome["failed"] += 1
                ack = result.ack_message()
                if ack is not None and result.ack_code:
                    line = f"{result.ack_code} {ack.get('MSA-2')}"
                else:
                    line = f"{result.status.value.upper().replace('_', ' ')}"
                print(f"{name} {result.control_id}: {line}{' ' + result.text if result.text else ''}", flush=True)
        finally:
            sender.close()
        code = 2 if outcome["unreadable"] else (1 if outcome["failed"] else 0)
        if code:
            raise SystemExit(code)

    task.react(main)  # runs the reactor until main's Deferred fires, then exits with its code
    return 0
