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

from hl7relay.ack.answer import Answer
from hl7relay.ack.builder import build_ack
from hl7relay.outcomes import AckCode, ErrorCode
from hl7relay.ack.outcome import Outcome, Status
from hl7relay.hl7.message import Message

__all__ = ["AckPolicy", "AckRequest", "is_enhanced_mode", "is_ack", "unreadable_ack", "resend_code"]

# the codes as plain str on the hot path (what is stored and written; a StrEnum costs the driver an adapter lookup)
_AA, _AE, _AR, _CA, _CR = (c.value for c in (AckCode.AA, AckCode.AE, AckCode.AR, AckCode.CA, AckCode.CR))

def is_ack(message: Message) -> bool:
    return AckRequest.of(message).is_ack


def is_enhanced_mode(message: Message) -> bool:
    return AckRequest.of(message).enhanced


def _wanted(condition: str, success: bool) -> bool:
    # condition: stripped and upper-cased (AckRequest)
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
    return AckRequest.of(message).resend_code


@dataclass(frozen=True, slots=True)
class AckRequest:
    """What a received message's header asks of its answer, read once: whether it is itself an
    ACK (never answered), and in enhanced mode the conditions of MSH-15 and MSH-16."""

    is_ack: bool
    accept: str  # MSH-15, stripped and upper-cased ("" in original mode)
    application: str  # MSH-16, likewise

    @classmethod
    def of(cls, message: Message) -> "AckRequest":
        return cls(message.msh(9, 1).strip().upper() == "ACK", message.msh(15).strip().upper(),
                   message.msh(16).strip().upper())

    @property
    def enhanced(self) -> bool:
        return bool(self.accept or self.application)

    @property
    def resend_code(self) -> str:
        return _CR if self.accept else _AR


@dataclass(slots=True)
class AckPolicy:
    """Turns a handler's :class:`Outcome` into the ACK frames to write, in order."""

    filtered_code: str = _AR  # what a filtered message is answered with (AA to hide filtering)
    sending_application: str = "HL7RELAY"
    sending_facility: str = ""

    def codes(self, message: Message, outcome: Outcome, request: AckRequest | None = None) -> list[str]:
        """The MSA-1 codes of the ACKs this outcome calls for, in order (no ACK is built).
        ``request``: the message's :class:`AckRequest`, when the caller read it already."""
        if request is None:
            request = AckRequest.of(message)
        if request.is_ack:
            return []
        if outcome.acks is not None:
            return list(outcome.ack_codes)
        application = self._application_code(outcome)
        if not request.enhanced:
            return [application]
        accepted = outcome.stored and outcome.status is not Status.REJECTED and outcome.status is not Status.INTERNAL_ERROR
        codes = []
        if _wanted(request.accept, accepted):
            codes.append(_CA if accepted else _CR)
        if accepted and _wanted(request.application, application == _AA):
            codes.append(application)
        return codes

    def acks(self, message: Message, outcome: Outcome, request: AckRequest | None = None) -> list[bytes]:
        """The ACK frames to write, in order: one per code of :meth:`codes`."""
        if request is None:
            request = AckRequest.of(message)
        if outcome.acks is not None and not request.is_ack:
            return list(outcome.acks)
        return self._build(message, outcome, self.codes(message, outcome, request))

    def prepare(self, message: Message, outcome: Outcome, request: AckRequest | None = None) -> Outcome:
        """Build the outcome's ACKs once and keep them (and their codes) on it."""
        codes = outcome.ack_codes = self.codes(message, outcome, request)
        outcome.acks = list(outcome.acks) if outcome.acks is not None and codes else self._build(message, outcome, codes)
        return outcome

    # -- the answers a source writes (every frame a sender reads is made here) -----------------------
    def answer(self, message: Message, outcome: Outcome, request: AckRequest | None = None) -> Answer:
        """The answer to a message the channel handled: the outcome's ACKs (built now unless the
        trip prepared them)."""
        return Answer(self.acks(message, outcome, request))

    def unreadable(self, text: str) -> Answer:
        """The answer to a payload that is not an HL7 message (empty, not starting with MSH,
        unparseable): AR with ERR 100."""
        return Answer([unreadable_ack(text, **self._sender())])

    def too_large(self, header: Message | None, text: str) -> Answer:
        """The answer to a frame over the source's size limit, then the connection closes. With a
        readable header (the frame's first bytes) the sender reads its own control id and the code
        that asks it to send again (AR, CR in enhanced mode) with ERR 104; without one, as unreadable."""
        if header is None:
            return Answer([unreadable_ack(text, **self._sender())], close=True)
        code = AckRequest.of(header).resend_code
        return Answer([build_ack(header, code, text, ErrorCode.VALUE_TOO_LONG, **self._sender())], close=True)

    def _sender(self) -> dict:
        return {"sending_application": self.sending_application, "sending_facility": self.sending_facility}

    def _build(self, message: Message, outcome: Outcome, codes: list[str]) -> list[bytes]:
        header = self._sender()
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
