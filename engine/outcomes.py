"""The vocabulary every layer shares, in one neutral module: HL7 table 0357 (message error
condition codes) and 0516 (error severity), ACK codes (table 0008), the statuses a stored message
and a delivery can have, and what a delivery attempt came to. Validation, ACK building, the
queues and the store all use these; none of them depends on another for its words.

The statuses are ``StrEnum``s: they compare equal to, print as, and are stored as their plain values.
"""

import enum
from dataclasses import dataclass

__all__ = ["ErrorCode", "Severity", "AckCode", "AnswerStatus", "MessageStatus", "DeliveryStatus", "DeliveryOutcome", "DeliveryResult",
           "NOT_STORED", "PromotionState", "FileState", "STORED_STATUSES", "PRUNABLE_STATUSES"]


class ErrorCode(enum.IntEnum):
    """HL7 table 0357. The text is what ERR-3.2 carries."""

    MESSAGE_ACCEPTED = 0
    SEGMENT_SEQUENCE_ERROR = 100
    REQUIRED_FIELD_MISSING = 101
    DATA_TYPE_ERROR = 102
    TABLE_VALUE_NOT_FOUND = 103
    VALUE_TOO_LONG = 104
    UNSUPPORTED_MESSAGE_TYPE = 200
    UNSUPPORTED_EVENT_CODE = 201
    UNSUPPORTED_PROCESSING_ID = 202
    UNSUPPORTED_VERSION_ID = 203
    UNKNOWN_KEY_IDENTIFIER = 204
    DUPLICATE_KEY_IDENTIFIER = 205
    APPLICATION_RECORD_LOCKED = 206
    APPLICATION_INTERNAL_ERROR = 207

    @property
    def text(self) -> str:
        return _TEXTS[self]


_TEXTS = {
    ErrorCode.MESSAGE_ACCEPTED: "Message accepted",
    ErrorCode.SEGMENT_SEQUENCE_ERROR: "Segment sequence error",
    ErrorCode.REQUIRED_FIELD_MISSING: "Required field missing",
    ErrorCode.DATA_TYPE_ERROR: "Data type error",
    ErrorCode.TABLE_VALUE_NOT_FOUND: "Table value not found",
    ErrorCode.VALUE_TOO_LONG: "Value too long",
    ErrorCode.UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    ErrorCode.UNSUPPORTED_EVENT_CODE: "Unsupported event code",
    ErrorCode.UNSUPPORTED_PROCESSING_ID: "Unsupported processing id",
    ErrorCode.UNSUPPORTED_VERSION_ID: "Unsupported version id",
    ErrorCode.UNKNOWN_KEY_IDENTIFIER: "Unknown key identifier",
    ErrorCode.DUPLICATE_KEY_IDENTIFIER: "Duplicate key identifier",
    ErrorCode.APPLICATION_RECORD_LOCKED: "Application record locked",
    ErrorCode.APPLICATION_INTERNAL_ERROR: "Application internal error",
}


class Severity(str, enum.Enum):
    """HL7 table 0516, as the one letter that ERR-4 carries."""

    ERROR = "E"
    WARNING = "W"
    INFORMATION = "I"


class AckCode(enum.StrEnum):
    """HL7 table 0008, MSA-1."""

    AA = "AA"  # application accept
    AE = "AE"  # application error: the content needs a person; do not resend
    AR = "AR"  # application reject: send again later
    CA = "CA"  # commit accept (enhanced mode)
    CE = "CE"  # commit error
    CR = "CR"  # commit reject

    @property
    def accepted(self) -> bool:
        return self in (AckCode.AA, AckCode.CA)


class AnswerStatus(enum.Enum):
    """What handling a received message came to, before it is said as ACK codes (the ACK policy
    turns it into AA/AE/AR, CA/CR by the sender's mode); ``hl7relay.ack.Status``."""

    ACCEPTED = "accepted"  # stored and processed: AA / CA
    ERROR = "error"  # stored, but content or processing failed (validation, transformer): AE
    REJECTED = "rejected"  # not accepted (unsupported type/event/version, unreadable): AR / CR
    FILTERED = "filtered"  # stored, deliberately not processed by a channel filter: AR by default
    INTERNAL_ERROR = "internal_error"  # the engine itself failed (store unavailable): AR / CR, never AA


class MessageStatus(enum.StrEnum):
    """How a message is stored."""

    PROCESSED = "PROCESSED"
    FILTERED = "FILTERED"
    ERROR = "ERROR"
    DUPLICATE = "DUPLICATE"


# not a stored status: what events and metrics report for a message whose commit failed
NOT_STORED = "NOT_STORED"


class DeliveryStatus(enum.StrEnum):
    """Where a delivery stands."""

    QUEUED = "QUEUED"  # to be sent (or being retried)
    SENT = "SENT"  # the destination accepted it
    ERROR = "ERROR"  # dead letter: AE, refusals exhausted, or give_up_after
    FILTERED = "FILTERED"  # the destination's filter skipped it
    WITHDRAWN = "WITHDRAWN"  # after_delivery: the sender was told to resend, so this copy is never sent
    REPLAYED = "REPLAYED"  # a dead letter (ERROR) replayed: the replay (messages.replay_of) carries it now


STORED_STATUSES = tuple(status.value for status in MessageStatus)  # for choices and counters, in order


class FileState(enum.StrEnum):
    """Where a file a source read stands in the file ledger."""

    READING = "reading"  # messages being stored; a restart resumes after those already stored
    DONE = "done"  # every message stored; the file archived or deleted
    ERRORS = "errors"  # every message stored, some of them as ERROR (unreadable, or rejected)
    DUPLICATE = "duplicate"  # the same content was read before (another name, or again): not imported
    REIMPORT = "reimport"  # a duplicate an operator asked to import anyway: read when it is back in the folder


class PromotionState(enum.StrEnum):
    """A promotion (hl7relay promote) of channel files from one environment to another."""

    PENDING = "pending"  # asked for; waits for another admin's approval
    APPROVED = "approved"  # cleared: an engine of the target environment that needs promotion runs them


class DeliveryOutcome(enum.Enum):
    """What one delivery attempt came to."""

    ACCEPTED = "accepted"
    APPLICATION_ERROR = "application_error"  # AE: not retried
    REJECTED = "rejected"  # AR/CR: counts towards max_attempts
    TIMED_OUT = "timed_out"  # no answer in time: the peer may have it
    UNREACHABLE = "unreachable"  # no connection
    FAILED = "failed"  # a local failure (a file write, a bug): retried
    RATE_LIMITED = "rate_limited"  # an API's 429/503: wait as told (Retry-After), not a failed attempt
    NOT_AUTHORISED = "not_authorised"  # an API's 401/403: the credentials, not the message; the queue holds
    CONFLICT = "conflict"  # an API's 409/412: someone changed the record; a person decides
    HELD_FOR_MATCHING = "held_for_matching"  # FHIR: several patients could be this one; a person picks

    @property
    def reached_peer(self) -> bool:
        """Whether the attempt shows the destination is up (it answered, whatever it said)."""
        return self is not DeliveryOutcome.TIMED_OUT and self is not DeliveryOutcome.UNREACHABLE


@dataclass(slots=True)
class DeliveryResult:
    ok: bool
    application_error: bool = False  # AE from the peer: needs a person, not retried
    ack: str = ""
    error: str = ""
    # the peer answered and refused (AR/CR): counts towards max_attempts. A failure that is
    # neither this nor application_error (unreachable, no ACK in time, a local write failing)
    # is not the message's fault and is retried for as long as give_up_after allows
    rejected: bool = False
    # What the attempt came to when the flags do not say it (the peer unreachable, no answer in
    # time); None: the flags say it (accepted, AE, AR/CR, or a local failure).
    outcome: DeliveryOutcome | None = None
    # RATE_LIMITED: seconds to wait before anything more goes to this destination (no attempt counted)
    wait: float | None = None
    # store updates that belong with a SENT result, committed in its transaction (FHIR cross-references)
    records: tuple = ()

    @property
    def reached_peer(self) -> bool:
        outcome = self.outcome
        return outcome is not _UNREACHABLE and outcome is not _TIMED_OUT


_UNREACHABLE, _TIMED_OUT = DeliveryOutcome.UNREACHABLE, DeliveryOutcome.TIMED_OUT


PRUNABLE_STATUSES = STORED_STATUSES  # what prune may delete (queued deliveries keep their message whatever its status)
