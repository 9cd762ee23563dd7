"""What processing a received message came to: the handler's answer, from which ACKs are made."""

from __future__ import annotations

from dataclasses import dataclass, field

from hl7relay.outcomes import AnswerStatus as Status
from hl7relay.outcomes import ErrorCode

__all__ = ["Status", "Outcome"]


@dataclass(slots=True)
class Outcome:
    """The handler's answer for one message.

    ``stored`` says whether the message is durably committed: an accept acknowledgement (CA) is
    only ever sent for a stored message. ``findings`` (validation findings) become ERR segments.
    """

    status: Status
    code: ErrorCode | None = None
    text: str = ""
    findings: list = field(default_factory=list)
    stored: bool = True
    acks: list | None = None  # ACK frames already built (and stored) for this outcome: sent as they are
    ack_codes: list = field(default_factory=list)  # their MSA-1 codes, in order

    @classmethod
    def accepted(cls) -> "Outcome":
        return cls(Status.ACCEPTED)

    @classmethod
    def error(cls, text: str, code: ErrorCode = ErrorCode.APPLICATION_INTERNAL_ERROR, findings=()) -> "Outcome":
        return cls(Status.ERROR, code, text, list(findings))

    @classmethod
    def rejected(cls, text: str, code: ErrorCode, findings=(), stored: bool = True) -> "Outcome":
        return cls(Status.REJECTED, code, text, list(findings), stored)

    @classmethod
    def filtered(cls, text: str = "filtered by the channel") -> "Outcome":
        return cls(Status.FILTERED, None, text)

    @classmethod
    def internal_error(cls, text: str) -> "Outcome":
        return cls(Status.INTERNAL_ERROR, ErrorCode.APPLICATION_INTERNAL_ERROR, text, stored=False)
