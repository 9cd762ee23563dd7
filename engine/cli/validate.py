"""``hl7relay validate``: check sample messages against the HL7 standard before go-live."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from hl7relay.hl7.batch import split_messages
from hl7relay.cli._inputs import InputError, collect_inputs
from hl7relay.errors import ParseError
from hl7relay.hl7.message import Message
from hl7relay.validation import ACCEPTED_VERSIONS, Validator

HELP = "check HL7 messages against the standard (structure, fields, datatypes, tables)"
DESCRIPTION = """\
Check HL7 v2 messages against the standard for their version (MSH-12, or --version):
the envelope (MSH-1, MSH-2, required header fields), message type, event, processing id and
version, segment order and groups for the message structure, required fields, datatypes
(SI, NM, DT, TM, DTM/TS, OBX-5 by OBX-2), table values and lengths.

Each input may be a file (one message, several, or an FHS/BHS batch), a directory (walked for
*.hl7, *.er7, *.msg, *.dat, *.txt and files without an extension), or - for standard input.

Every finding is printed as:  SEVERITY CODE WHERE: TEXT, e.g.
  E 100 PID: required segment PID missing; expected after EVN (segment 2), before PV1
CODE is from HL7 table 0357: 100 segment sequence, 101 required field missing, 102 data type,
103 table value, 104 length, 200-203 unsupported message type / event / processing id / version.

--profile FILE adds the rules of an interface's conformance profile (config/profiles/ has
examples); its findings say "profile NAME". Several --profile: each applies to the messages it is
for (a profile with msh_21: the messages whose MSH-21 names it; one without: every message).

Exit status: 0 all valid, 1 some message invalid, 2 some input unreadable (no MSH, not HL7) or
a profile with problems (each printed as FILE:LINE:COL)."""

_PROGRESS_THRESHOLD = 20  # inputs; fewer finish before a progress bar would help
DEFAULT_MAX_BYTES = 16 * 1024 * 1024  # a message larger than the engine's default MLLP frame limit is not checked
TEXT_FINDINGS = 200  # findings printed per message in text; the rest are counted (json lists every one)


def add_arguments(parser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="FILE|DIR|-", help="messages to check")
    parser.add_argument("--version", dest="hl7_version", metavar="V", choices=ACCEPTED_VERSIONS,
                        help="check against this HL7 version instead of MSH-12")
    parser.add_argument("--strict", action="store_true",
                        help="table values, lengths, LF/CRLF segment endings and non-standard character set names are errors")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="output format (default: text)")
    parser.add_argument("-q", "--quiet", action="store_true", help="text format: print verdicts and errors only, no warnings")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, metavar="N",
                        help="messages larger than this are reported, not checked (default 16 MiB, the engine's "
                             "default MLLP frame limit): time and memory stay bounded")
    parser.add_argument("--table-values", metavar="FILE",
                        help="a site's additions to HL7 tables (YAML: \"0396\": [CODE, ...]): coding systems and "
                             "other values its partners use, accepted as the standard's own")
    parser.add_argument("--profile", metavar="FILE", action="append",
                        help="also check a conformance profile (YAML; see config/profiles/): required, forbidden "
                             "and allowed values of fields, lengths, segment counts")


@dataclass
class FileResult:
    name: str
    readable: bool = True
    problems: list[dict] = field(default_factory=list)  # batch envelope: severity, line, text
    messages: list[dict] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return (self.readable and not any(p["severity"] == "E" for p in self.problems)
                and all(m["valid"] for m in self.messages))


def check_bytes(name: str, data: bytes, validator: Validator, max_bytes: int = DEFAULT_MAX_BYTES) -> FileResult:
    """Split, decode and validate everything in one input."""
    result = FileResult(name)
    frames = _unframed(data)
    if frames is not None:
        data, count = frames
        result.problems.append({"severity": "I", "line": None,
                                "text": f"read as an MLLP capture: the framing (VT ... FS CR) of {count} frame"
                                        f"{'s' * (count != 1)} removed"})
    split = split_messages(data)
    if not split.is_hl7:
        result.readable = False
        result.problems.append({"severity": "E", "line": None, "text": "not HL7: no MSH, FHS or BHS segment found"})
        return result
    result.problems.extend({"severity": p.severity, "line": p.line, "text": p.text} for p in split.problems)
    for index, chunk in enumerate(split.messages, start=1):
        entry = {"index": index, "line": chunk.line}
        if len(chunk.data) > max_bytes:
            entry.update(valid=False, message_type="", control_id="", version=None, structure=None,
                         findings=[{"severity": "E", "code": 100, "code_text": "Segment sequence error",
                                    "segment": None, "position": None, "location": "", "path": "message",
                                    "text": f"{len(chunk.data):,} bytes: larger than {max_bytes:,} (--max-bytes), not "
                                            f"checked; the engine refuses a frame that large by default"}])
            result.messages.append(entry)
            continue
        try:
            message = Message.from_bytes(chunk.data)
        except ParseError as exc:
            entry.update(valid=False, message_type="", control_id="", version=None, structure=None,
                         findings=[{"severity": "E", "code": 100, "code_text": "Segment sequence error",
                                    "segment": None, "position": None, "location": "", "path": "message",
                                    "text": str(exc)}])
        else:
            entry.update(validator.validate(message).to_dict())
        result.messages.append(entry)
    return result


def _unframed(data: bytes) -> tuple[bytes, int] | None:
    """An MLLP capture (each message between VT and FS CR, as on the wire) as plain messages, and
    how many frames it held; None when the input is not framed. Read by the listener's own framer."""
    from hl7relay.mllp.framing import Frame, MLLPFramer

    if not data.lstrip(b" \t\r\n").startswith(b"\x0b"):
        return None
    frames = [event.payload.strip(b"\r\n") for event in MLLPFramer(max_frame_bytes=len(data)).feed(data)
              if isinstance(event, Frame)]
    frames = [f for f in frames if f]
    return b"\r".join(frames) + b"\r", len(frames)


class _Progress:
    def __init__(self, total: int):
        self.total = total
        self.enabled = total >= _PROGRESS_THRESHOLD and sys.stderr.isatty()

    def update(self, done: int) -> None:
        if self.enabled:
            width = 30
            filled = width * done // self.total
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} inputs")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()


def _text_report(result: FileResult, quiet: bool, out) -> None:
    if not result.readable:
        out.write(f"{result.name}: UNREADABLE: {'; '.join(p['text'] for p in result.problems)}\n")
        return
    for p in result.problems:
        if quiet and p["severity"] != "E":
            continue
        if p["severity"] == "I":
            out.write(f"{result.name}: note: {p['text']}\n")
            continue
        where = f" line {p['line']}" if p["line"] else ""
        out.write(f"{result.name}: {p['severity']} 100 batch{where}: {p['text']}\n")
    several = len(result.messages) > 1
    for m in result.messages:
        where = f"{result.name} message {m['index']} (line {m['line']})" if several else result.name
        errors = sum(1 for f in m["findings"] if f["severity"] == "E")
        warnings = sum(1 for f in m["findings"] if f["severity"] == "W")
        about = " ".join(x for x in (m["message_type"], m["control_id"]) if x)
        checked = f"v{m['version']} {m['structure']}" if m.get("structure") else (f"v{m['version']}" if m.get("version") else "")
        verdict = "valid" if m["valid"] else "INVALID"
        counts = f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}"
        out.write(f"{where}: {verdict} ({counts}) {about}{' [' + checked + ']' if checked else ''}\n")
        shown = 0
        for f in m["findings"]:
            if quiet and f["severity"] != "E":
                continue
            if shown == TEXT_FINDINGS:
                left = sum(1 for g in m["findings"] if not quiet or g["severity"] == "E") - shown
                out.write(f"  ... and {left:,} more (--format json lists every one)\n")
                break
            shown += 1
            out.write(f"  {f['severity']} {f['code']} {f['path']}: {f['text']}\n")


def run(args) -> int:
    profile = None
    if args.profile:
        from hl7relay.validation.conformance import ProfileSet, load_conformance_profile

        loaded, problems = [], 0
        for file in args.profile:
            one, errors = load_conformance_profile(file)
            for error in errors:
                print(error, file=sys.stderr)
            problems += len(errors)
            loaded.append(one)
        if problems:
            print(f"not validating: {problems} problem{'s' * (problems != 1)} in the profile{'s' * (len(loaded) > 1)}",
                  file=sys.stderr)
            return 2
        profile = loaded[0] if len(loaded) == 1 else ProfileSet(tuple(loaded))
    table_values = {}
    if args.table_values:
        from hl7relay.validation.corrections import load_table_values

        table_values, errors = load_table_values(args.table_values)
        for error in errors:
            print(error, file=sys.stderr)
        if errors:
            print(f"not validating: {len(errors)} problem{'s' * (len(errors) != 1)} in the table values", file=sys.stderr)
            return 2
    validator = Validator(version=args.hl7_version, strict=args.strict, profile=profile, table_values=table_values)
    try:
        inputs = collect_inputs(args.inputs)
    except InputError as exc:
        print(f"hl7relay validate: {exc}", file=sys.stderr)
        return 2
    for note in inputs.notes:
        print(note, file=sys.stderr)
    progress = _Progress(len(inputs))
    results: list[FileResult] = []
    out = sys.stdout
    for done, (name, path) in enumerate(inputs, start=1):
        try:
            data = sys.stdin.buffer.read() if path is None else path.read_bytes()
        except OSError as exc:
            result = FileResult(name, readable=False,
                                problems=[{"severity": "E", "line": None, "text": f"cannot read: {exc.strerror or exc}"}])
        else:
            result = check_bytes(name, data, validator, args.max_bytes)
        results.append(result)
        if args.format == "text":
            progress.close()
            _text_report(result, args.quiet, out)
        progress.update(done)
    progress.close()
    messages = sum(len(r.messages) for r in results)
    invalid_messages = sum(1 for r in results for m in r.messages if not m["valid"])
    unreadable = sum(1 for r in results if not r.readable)
    summary = {"inputs": len(results), "messages": messages, "valid": messages - invalid_messages,
               "invalid": invalid_messages, "unreadable_inputs": unreadable,
               "inputs_with_batch_errors": sum(1 for r in results if r.readable and not r.valid
                                               and all(m["valid"] for m in r.messages))}
    if args.format == "json":
        json.dump({"summary": summary, "inputs": [
            {"input": r.name, "readable": r.readable, "valid": r.valid, "problems": r.problems, "messages": r.messages}
            for r in results]}, out, indent=2)
        out.write("\n")
    else:
        out.write(f"{messages} message{'s' * (messages != 1)} in {len(results)} input{'s' * (len(results) != 1)}: "
                  f"{summary['valid']} valid, {invalid_messages} invalid, {unreadable} unreadable\n")
    if not inputs:
        return 2
    if unreadable:
        return 2
    return 0 if all(r.valid for r in results) else 1
