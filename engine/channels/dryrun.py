"""A channel dry run: one message through a channel, each step shown, no network, no store.

What an analyst asks before a change goes live ("what does the lab get for this message, and what
does the PMS hear back?"): :func:`dry_run` runs the channel's own pipeline (the engine's code,
told of each step as it ends) and keeps, per step, what it did: a filter passed or not, what a
transformer changed (the segments before and after), what a validator found, each destination's
output or why it gets nothing, then the status the message would be stored with and the ACKs
the sender would get. ``hl7relay test --message FILE CHANNEL`` prints it; the console's "Try a
message" page shows it.

The store is not asked: duplicate detection is not applied, and with ``response.when:
after_delivery`` the ACK assumes every destination accepts (as channel tests do).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from hl7relay.ack import AckPolicy, Outcome
from hl7relay.ack.policy import is_ack
from hl7relay.channels.channel import Channel
from hl7relay.channels.pipeline import Result, process, stored_outcome
from hl7relay.outcomes import MessageStatus
from hl7relay.hl7.message import Message

__all__ = ["Step", "DestinationResult", "DryRun", "dry_run", "render_text"]


@dataclass(slots=True)
class Step:
    kind: str  # filter, transformer, validator, destination filter, destination transformer
    label: str  # how the channel file names it: "map at channels/adt.yaml:14:7"
    outcome: str  # passed, filtered out, changed, no change, failed: ..., N findings
    changes: list = field(default_factory=list)  # "- SEG|..." / "+ SEG|..." lines
    findings: list = field(default_factory=list)  # Finding.to_dict()
    destination: str | None = None
    index: int = 1  # the step's place among its kind (transformer 2), per destination for theirs

    def to_dict(self) -> dict:
        return {"kind": self.kind, "index": self.index, "label": self.label, "outcome": self.outcome,
                "changes": self.changes, "findings": self.findings, "destination": self.destination}


@dataclass(slots=True)
class DestinationResult:
    name: str
    type: str
    delivered: bool  # False: its filter skipped it, or the message never got this far
    reason: str = ""
    output: str = ""  # the message it would be sent, segments on lines

    def to_dict(self) -> dict:
        return {"name": self.name, "type": self.type, "delivered": self.delivered, "reason": self.reason,
                "output": self.output}


@dataclass(slots=True)
class DryRun:
    channel: str
    file: str
    received: dict  # message type, control id, version, sending application/facility, segments
    steps: list
    destinations: list
    status: str  # PROCESSED, FILTERED, ERROR: what the message would be stored as
    error: str
    ack_codes: list
    acks: list  # the ACK messages, segments on lines
    notes: list

    def to_dict(self) -> dict:
        return {"channel": self.channel, "file": self.file, "received": self.received,
                "steps": [s.to_dict() for s in self.steps], "destinations": [d.to_dict() for d in self.destinations],
                "status": self.status, "error": self.error, "ack_codes": self.ack_codes, "acks": self.acks,
                "notes": self.notes}


def _segments(message: Message) -> list[str]:
    return message.to_text().rstrip("\r").split("\r")


def _changes(before: list[str], after: list[str]) -> list[str]:
    """The segments a step removed and added, in order (no context: the message is shown whole elsewhere)."""
    return [line for line in difflib.unified_diff(before, after, lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def _absent(step, message: Message) -> str:
    """Why a step that writes changed nothing, when it is that the message lacks the segment: a
    step never adds one unless it says ``create: true``."""
    from hl7relay.errors import PathError
    from hl7relay.hl7.path import GroupPath
    from hl7relay.transformers.places import places

    path = getattr(step, "target", None) or getattr(step, "path", None)
    if path is None or not hasattr(path, "segment") or getattr(step, "create", False):
        return ""
    try:
        if places(message, path):
            return ""
    except PathError:
        return ""
    if isinstance(path, GroupPath):
        return f" (no {path.segment} where the path's groups are in this message)"
    if path.many:
        return f" (the message has no {path.segment})"
    return f" (the message has no {path.segment}" + (f"[{path.occurrence}]" if path.occurrence > 1 else "") + \
        "; create: true adds it)"


def dry_run(channel: Channel, message: Message) -> DryRun:
    """Run ``message`` (it is changed in place, as in the engine) through ``channel``."""
    labels = channel.labels
    original = message.header()  # the ACK answers what was received, before any transformer
    received = {"message_type": original.get("MSH-9"), "control_id": original.get("MSH-10"),
                "version": original.get("MSH-12"), "sending_application": original.get("MSH-3.1"),
                "sending_facility": original.get("MSH-4.1"), "segments": len(_segments(message)),
                "charset": message.charset or ""}
    steps: list[Step] = []
    reached: dict[str, tuple] = {}  # destination -> (delivered, output text)
    texts = {None: _segments(message)}  # the last text seen per track: the channel's, then each destination's copy
    numbers: dict = {}

    def number(kind, owner=None) -> int:
        numbers[(kind, owner)] = numbers.get((kind, owner), 0) + 1
        return numbers[(kind, owner)]

    def label(component, kind, index) -> str:
        return labels.get(id(component)) or f"{kind} {index}"

    def observe(kind, component, current: Message, detail):
        if kind == "filter":
            steps.append(Step("filter", label(component, "filters", 1), "passed" if detail else "filtered out"))
        elif kind in ("transformer", "destination_transformer"):
            destination = None
            if kind == "destination_transformer":
                destination, component = component[0].name, component[1]
                texts.setdefault(destination, texts[None])  # its copy starts as the channel's output
            index = number(kind, destination)
            after = _segments(current)
            changes = _changes(texts[destination], after)
            texts[destination] = after
            outcome = f"failed: {detail}" if detail else ("changed" if changes else "no change" + _absent(component, current))
            steps.append(Step(kind.replace("_", " "), label(component, "transformer", index), outcome, changes,
                              destination=destination, index=index))
        elif kind == "validator":
            index = number(kind)
            errors = sum(1 for f in detail if f.severity.value == "E")
            rejects = component.on_error == "reject" and errors
            outcome = ("passed" if not detail else
                       f"{len(detail)} finding{'s' * (len(detail) != 1)}" + (" (rejects the message)" if rejects else
                                                                            f" (on_error: {component.on_error})"))
            steps.append(Step("validator", label(component, "validator", index), outcome,
                              findings=[f.to_dict() for f in detail], index=index))
        elif kind == "destination_filter":
            steps.append(Step("destination filter", label(component.filter, "filters", 1),
                              "passed" if detail else "skipped", destination=component.name))
            if not detail:
                reached[component.name] = (False, "")
        elif kind == "destination":
            reached[component.name] = (True, current.to_text().rstrip("\r").replace("\r", "\n"))

    processed = process(channel, message, observe)
    status, error, outcome = stored_outcome(processed)
    destinations = []
    for destination in channel.destinations:
        if destination.name in reached:
            delivered, output = reached[destination.name]
            reason = "" if delivered else "its filter skipped the message"
        else:
            delivered, output = False, ""
            reason = {MessageStatus.FILTERED: "the channel filtered the message out",
                      MessageStatus.ERROR: "the message is stored as ERROR"}.get(status, "not reached")
        destinations.append(DestinationResult(destination.name, destination.type, delivered, reason, output))
    notes = []
    if channel.duplicates is not None:
        notes.append("duplicate detection is not applied (the store is not asked)")
    outputs = [d for d in destinations if d.delivered]
    if channel.response.when == "after_delivery" and outputs and processed.result is Result.PROCESSED \
            and not is_ack(original):
        notes.append("response.when is after_delivery: the ACK shown assumes every destination accepts")
        outcome = Outcome.accepted()
    policy = AckPolicy(channel.response.filtered, channel.response.application, channel.response.facility)
    policy.prepare(original, outcome)
    acks = [ack.decode(original.codec, "replace").rstrip("\r").replace("\r", "\n") for ack in outcome.acks or []]
    return DryRun(channel.name, channel.file, received, steps, destinations, status, error,
                  list(outcome.ack_codes or []), acks, notes)


def render_text(run: DryRun, message_label: str = "") -> str:
    """The dry run as an analyst reads it in a terminal."""
    r = run.received
    lines = [f"channel {run.channel} ({run.file})" + (f", {message_label}" if message_label else ""),
             f"  received: {r['message_type'] or '?'} control id {r['control_id'] or '?'}, version {r['version'] or '?'}, "
             f"from {r['sending_application'] or '?'}/{r['sending_facility'] or '?'}, {r['segments']} segments"]
    for step in run.steps:
        kind = step.kind + (f" {step.index}" if step.kind.endswith(("transformer", "validator")) else "")
        where = f" ({step.destination})" if step.destination else ""
        lines.append(f"  {kind}{where}: {step.label}: {step.outcome}")
        lines += [f"      {change}" for change in step.changes]
        lines += [f"      {f['severity']} {f['code']} {f['path']}: {f['text']}" for f in step.findings]
    for d in run.destinations:
        if d.delivered:
            lines.append(f"  destination {d.name} ({d.type}) gets:")
            lines += [f"      {segment}" for segment in d.output.split("\n")]
        else:
            lines.append(f"  destination {d.name} ({d.type}): nothing ({d.reason})")
    lines.append(f"  stored as {run.status}" + (f": {run.error}" if run.error else ""))
    if run.acks:
        lines.append(f"  ACK {' + '.join(run.ack_codes)}:")
        for ack in run.acks:
            lines += [f"      {segment}" for segment in ack.split("\n")]
    else:
        lines.append("  no ACK (the message is itself an acknowledgement, or its MSH-15/16 asks for none)")
    lines += [f"  note: {note}" for note in run.notes]
    return "\n".join(lines)
