"""What the store is given to write: a message with its stages and deliveries, and typed
updates, committed in one transaction per batch (the group commit)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


class StoreError(Exception):
    """The store could not commit (disk full, database down...): the message must not be ACKed AA."""


class LastAdminError(StoreError):
    """A change that would leave no active admin (demoted, disabled or removed): refused, since
    nobody could manage users or see the audit log any more."""

    def __init__(self, name: str):
        super().__init__(f"{name} is the last active admin: make another user an admin first")


@dataclass(slots=True)
class DeliveryRecord:
    destination: str
    status: str  # QUEUED or FILTERED at first
    # stage destination:<name>, stored only when it differs from what the queue falls back to
    # (the transformed stage, else the raw message): see delivery_content()
    content: bytes | None = None
    order_key: str | None = None
    payload: bytes | None = None  # what the queue sends now (in memory; not a column)
    partition: int = 0  # its queue's partition (a cluster's; 0 otherwise)
    message: object = None  # the payload as the pipeline left it (a Message), so the queue need not parse it again


def delivery_content(stages: dict, raw: bytes, destination: str) -> bytes:
    """What a destination is (or was) sent: its own stage, else the transformed message, else the raw one."""
    content = stages.get("destination:" + destination)
    if content is None:
        content = stages.get("transformed")
    return raw if content is None else content


def storable(text):
    """Text a database can hold, whatever the message's bytes were.

    Bytes that did not decode in their character set are carried as lone surrogates (see
    hl7relay.hl7.charsets); no database driver accepts those. In the columns that index a message
    (control id, patient id...) they become ``\\xHH``, the way Python prints such a byte; the
    raw message keeps the bytes themselves, so nothing is lost, and a search for the same value
    (as bytes, or typed as ``\\xHH``) goes through the same conversion and finds it. NUL, which
    PostgreSQL's text cannot hold, becomes ``\\x00`` on every backend alike.
    """
    if type(text) is not str:
        return text
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate that no undecodable byte produced
            return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(slots=True)
class MessageRecord:
    channel: str
    raw: bytes
    status: str
    received_at: float = field(default_factory=time.time)
    peer: str = ""
    charset: str = ""
    sending_application: str = ""
    sending_facility: str = ""
    message_type: str = ""
    control_id: str = ""
    patient_id: str = ""
    error: str = ""
    ack_code: str = ""
    duplicate_key: str | None = None
    replay_of: int | None = None
    replay_reason: str | None = None
    replay_operator: str | None = None
    stages: dict = field(default_factory=dict)  # name -> bytes
    deliveries: list = field(default_factory=list)
    snapshot_id: int | None = None  # the configuration snapshot it was processed under
    # read from a file: (its file_ledger id, the message's place in it from 0, its MSH's line);
    # the ledger counts it in the same transaction, so a re-read skips it
    source_file: tuple | None = None


@dataclass(slots=True)
class DeliveryUpdate:
    """A delivery's new values (status, attempts, last_ack, last_error, next_attempt_at, updated_at).
    ``lease``: (name, owner, epoch) it is written under (a cluster's partition): the commit leaves
    it out, fenced, unless that lease is still the owner's at that epoch and live."""

    message_id: int
    destination: str
    values: dict
    lease: tuple | None = None


@dataclass(slots=True)
class MessageUpdate:
    message_id: int
    values: dict  # e.g. {"ack_code": "AA"}


@dataclass(slots=True)
class StageUpdate:
    """A stage written (or rewritten): the ACK of an after_delivery message."""

    message_id: int
    stage: str
    content: bytes


@dataclass(slots=True)
class AuditUpdate:
    """An audit entry committed in the same transaction as the action it records."""

    entry: dict


@dataclass(slots=True)
class ControlUpdate:
    """An operator's switch recorded (``on``) or cleared: ``disabled`` for a channel (destination
    ""), ``paused`` for a destination. Its audit entry goes in the same update call."""

    channel: str
    destination: str
    setting: str
    on: bool
    actor: str
    at: float


@dataclass(slots=True)
class DestinationStateUpdate:
    """Whether a destination was reachable when last tried, and its last error (status, verify)."""

    channel: str
    destination: str
    connected: bool
    error: str
    at: float


@dataclass(slots=True)
class TokenUseUpdate:
    """An API token was used (its last_used_at)."""

    name: str
    at: float


@dataclass(slots=True)
class XrefUpdate:
    """A FHIR resource as the server now has it (its id and version), written with the delivery's result."""

    channel: str
    destination: str
    resource_type: str
    local_key: str
    identifier: str
    fhir_id: str
    version_id: str
    content_hash: str
    message_id: int | None
    at: float


@dataclass(slots=True)
class MatchHoldUpdate:
    """A message held until a person picks its patient among ``candidates`` (JSON text)."""

    channel: str
    destination: str
    message_id: int | None
    local_key: str
    candidates: str
    at: float


@dataclass(slots=True)
class SourceStateUpdate:
    """What a fhir source last saw of a resource (fhir_id "": its cursor, in version_id)."""

    channel: str
    resource_type: str
    fhir_id: str
    version_id: str
    status: str
    start: str
    end: str
    content_hash: str
    at: float


@dataclass(slots=True)
class FileSeenUpdate:
    """A file a source is about to read: its ledger row, made once per (channel, source, name,
    content); an existing row is left as it is (a re-read resumes it)."""

    channel: str
    source: str  # where it was read: file:///DIR or sftp://HOST:PORT/DIR
    name: str
    size: int
    mtime: float
    sha256: str
    at: float


@dataclass(slots=True)
class FileUpdate:
    """A ledger row's new values (state, messages, done_at, archived_as, duplicate_of, problems)."""

    file_id: int
    values: dict


Update = (DeliveryUpdate | MessageUpdate | StageUpdate | AuditUpdate | ControlUpdate | DestinationStateUpdate
          | TokenUseUpdate | XrefUpdate | MatchHoldUpdate | SourceStateUpdate | FileSeenUpdate | FileUpdate)


def as_update(update) -> Update:
    """A typed update; the older ``(kind, key, values)`` tuples are still accepted."""
    if isinstance(update, (DeliveryUpdate, MessageUpdate, StageUpdate, AuditUpdate, ControlUpdate, DestinationStateUpdate,
                           TokenUseUpdate, XrefUpdate, MatchHoldUpdate, SourceStateUpdate)):
        return update
    kind, key, values = update
    if kind == "delivery":
        return DeliveryUpdate(key[0], key[1], values)
    if kind == "message":
        return MessageUpdate(key, values)
    if kind == "stage":
        return StageUpdate(key[0], key[1], values)
    if kind == "audit":
        return AuditUpdate(values)
    raise ValueError(f"unknown update {kind!r}")
