"""Which acknowledgements a received message gets, in original and in enhanced mode.

Original mode (MSH-15 and MSH-16 both empty): one application ACK. AA when processed; AE for
content, validation and processing errors; AR for unsupported type/event/processing id/version and
for engine failures (never AA when the message was not stored).

Enhanced mode (MSH-15 or MSH-16 valued, table 0155: AL always, NE never, ER on error or reject
only, SU on success only): the accept ACK (CA/CR) as MSH-15 asks, sent only once the message is
stored; then the application ACK (AA/AE/AR) as MSH-16 asks, only for an accepted message. An empty
MSH-15 or MSH-16 in enhanced mode, or one that is not a table 0155 value, counts as AL: HL7 makes both
required in enhanced mode, and a sender left waiting for an answer that never comes blocks its
queue, while an extra ACK is only read and dropped. Only an explicit NE (or ER/SU whose condition
is not met) withholds an ACK. A message that is itself an ACK is never acknowledged.
"""

from __future__ import annotations

from dataclasses import dataclass

from hl7relay.ack.builder import build_ack
from hl7relay.outcomes import AckCode, ErrorCode
from hl7relay.ack.outcome import Outcome, Status
from hl7relay.hl7.message import Message

__all__ = ["AckPolicy", "is_enhanced_mode", "is_ack", "unreadable_ack", "resend_code"]

# the codes as plain str on the hot path (what is stored and written; a StrEnum costs the driver an adapter lookup)
_AA, _AE, _AR, _CA, _CR = (c.value for c in (AckCode.AA, AckCode.AE, AckCode.AR, AckCode.CA, AckCode.CR))

def is_ack(message: Message) -> bool:
    return message.msh(9, 1).strip().upper() == "ACK"


def is_enhanced_mode(message: Message) -> bool:
    return bool(message.msh(15).strip() or message.msh(16).strip())


def _wanted(condition: str, success: bool) -> bool:
    condition = condition.strip().upper()
    if condition == "NE":
        return False
    if condition == "SU":
        return success
    if condition == "ER":
        return not success
    # AL, and also an empty or garbled value: HL7 requires both fields in enhanced mode, so a
    # half-filled header (one field shifted away, a typo) is answered rather than left waiting
    return True


def unreadable_ack(text: str, **header) -> bytes:
    """The answer to a payload that is not an HL7 message (empty, or not starting with MSH)."""
    return build_ack(None, _AR, text, ErrorCode.SEGMENT_SEQUENCE_ERROR, **header)


def resend_code(message: Message) -> str:
    """The code that asks the sender to send a message again: CR when it asked for an accept ACK
    (MSH-15 valued, enhanced mode), else AR."""
    return _CR if message.msh(15).strip() else _AR


@dataclass(slots=True)
class AckPolicy:
    """Turns a handler's :class:`Outcome` into the ACK frames to write, in order."""

    filtered_code: str = _AR  # what a filtered message is answered with (AA to hide filtering)
    sending_application: str = "HL7RELAY"
    sending_facility: str = ""

    def codes(self, message: Message, outcome: Outcome) -> list[str]:
        """The MSA-1 codes of the ACKs this outcome calls for, in order (no ACK is built)."""
        if is_ack(message):
            return []
        if outcome.acks is not None:
            return list(outcome.ack_codes)
        application = self._application_code(outcome)
        if not is_enhanced_mode(message):
            return [application]
        accepted = outcome.stored and outcome.status is not Status.REJECTED and outcome.status is not Status.INTERNAL_ERROR
        codes = []
        if _wanted(message.msh(15), accepted):
            codes.append(_CA if accepted else _CR)
        if accepted and _wanted(message.msh(16), application == _AA):
            codes.append(application)
        return codes

    def acks(self, message: Message, outcome: Outcome) -> list[bytes]:
        """The ACK frames to write, in order: one per code of :meth:`codes`."""
        if outcome.acks is not None and not is_ack(message):
            return list(outcome.acks)
        return self._build(message, outcome, self.codes(message, outcome))

    def prepare(self, message: Message, outcome: Outcome) -> Outcome:
        """Build the outcome's ACKs once and keep them (and their codes) on it."""
        codes = outcome.ack_codes = self.codes(message, outcome)
        outcome.acks = list(outcome.acks) if outcome.acks is not None and codes else self._build(message, outcome, codes)
        return outcome

    def _build(self, message: Message, outcome: Outcome, codes: list[str]) -> list[bytes]:
        header = {"sending_application": self.sending_application, "sending_facility": self.sending_facility}
        # a CA never carries errors; every other code carries the outcome's text and findings
        return [build_ack(message, code, **header) if code == _CA else
                build_ack(message, code, outcome.text, outcome.code, outcome.findings, **header)
                for code in codes]

    def _application_code(self, outcome: Outcome) -> str:
        status = outcome.status
        if status is Status.ACCEPTED:
            return _AA if outcome.stored else _AR
        if status is Status.ERROR:
            return _AE if outcome.stored else _AR
        if status is Status.FILTERED:
            return self.filtered_code if outcome.stored or self.filtered_code != _AA else _AR
        return _AR  # REJECTED, INTERNAL_ERROR
