"""Running a message through a channel, with no I/O: what `hl7relay run` and `hl7relay test` share.

The message is parsed once by the caller; transformers edit it in place (the raw bytes stay on it);
each destination works on its own copy so one destination's transformers never leak into another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hl7relay.ack.outcome import Outcome
from hl7relay.outcomes import ErrorCode, MessageStatus, Severity
from hl7relay.channels.channel import Channel
from hl7relay.errors import HL7RelayError
from hl7relay.hl7.message import Message

__all__ = ["Result", "Processed", "DestinationOutput", "process", "stored_outcome"]


# what the pipeline made of a message is how it is stored: PROCESSED (destinations get their
# outputs), FILTERED, ERROR (a transformer failed or a rejecting validator found errors)
Result = MessageStatus


@dataclass(slots=True)
class DestinationOutput:
    name: str
    message: Message | None  # None: the destination's filter skipped it
    error: str = ""


@dataclass(slots=True)
class Processed:
    result: Result
    message: Message  # after the channel's transformers
    findings: list = field(default_factory=list)
    error: str = ""
    error_code: ErrorCode | None = None
    outputs: list = field(default_factory=list)
    transformed: bool = False


def process(channel: Channel, message: Message, observe=None) -> Processed:
    """The channel's filter, transformers, validators and destinations' filters and transformers,
    in order. ``observe`` (the dry run; None in the engine) is told of each step as it ends:
    ``observe(kind, component, message, detail)`` with kind ``filter`` (detail: passed),
    ``transformer`` (the error text, "" when applied), ``validator`` (its findings),
    ``destination_filter`` (component: the destination; passed), ``destination_transformer``
    (component: (destination, step); the error text) and ``destination`` (what it gets)."""
    if channel.filter is not None:
        passed = channel.filter.matches(message)
        if observe is not None:
            observe("filter", channel.filter, message, passed)
        if not passed:
            return Processed(Result.FILTERED, message)
    for index, step in enumerate(channel.steps, start=1):
        try:
            step.apply(message)
        except (HL7RelayError, ValueError) as exc:
            if observe is not None:
                observe("transformer", step, message, str(exc))
            return Processed(Result.ERROR, message, error=f"transformer {index}: {exc}",
                             error_code=ErrorCode.APPLICATION_INTERNAL_ERROR, transformed=True)
        if observe is not None:
            observe("transformer", step, message, "")
    findings = []
    rejecting = None  # the first error of a validator that rejects
    for validator in channel.validators:
        found = validator.check(message)
        if observe is not None:
            observe("validator", validator, message, found)
        findings += found
        if validator.on_error == "reject" and rejecting is None:
            rejecting = next((f for f in found if f.severity is Severity.ERROR), None)
    if rejecting is not None:
        return Processed(Result.ERROR, message, findings, f"validation failed: {rejecting}", rejecting.code,
                         transformed=bool(channel.steps))
    outputs = []
    for destination in channel.destinations:
        if destination.filter is not None:
            passed = destination.filter.matches(message)
            if observe is not None:
                observe("destination_filter", destination, message, passed)
            if not passed:
                outputs.append(DestinationOutput(destination.name, None))
                continue
        output = message.copy() if destination.steps else message
        error = ""
        for index, step in enumerate(destination.steps, start=1):
            try:
                if step.converts:  # the fhir transformer: a new document, the destination's last step
                    output = step.convert(output)
                else:
                    step.apply(output)
            except (HL7RelayError, ValueError) as exc:
                error = f"destination {destination.name} transformer {index}: {exc}"
                if observe is not None:
                    observe("destination_transformer", (destination, step), output, str(exc))
                break
            if observe is not None:
                observe("destination_transformer", (destination, step), output, "")
        if error:
            return Processed(Result.ERROR, message, findings, error, ErrorCode.APPLICATION_INTERNAL_ERROR,
                             transformed=bool(channel.steps))
        if observe is not None:
            observe("destination", destination, output, None)
        outputs.append(DestinationOutput(destination.name, output))
    return Processed(Result.PROCESSED, message, findings, outputs=outputs, transformed=bool(channel.steps))


def stored_outcome(processed: Processed):
    """How a processed message is stored and answered: (status, error text, Outcome). The engine
    and `hl7relay test` both use it, so a channel test answers as the engine would."""
    if processed.result is Result.FILTERED:
        return _FILTERED, "", Outcome.filtered()
    if processed.result is Result.ERROR:
        return _ERROR, processed.error, Outcome.error(
            processed.error, processed.error_code or ErrorCode.APPLICATION_INTERNAL_ERROR, processed.findings)
    return _PROCESSED, "", Outcome.accepted()


# plain str: the store binds these on the hot path
_PROCESSED, _FILTERED, _ERROR = MessageStatus.PROCESSED.value, MessageStatus.FILTERED.value, MessageStatus.ERROR.value
