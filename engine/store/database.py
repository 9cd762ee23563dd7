"""The message store: every message is committed here before it is acknowledged.

SQLAlchemy 2 (Core): SQLite by default (one file under the data directory, WAL journal,
``synchronous=FULL`` so a commit survives a power cut), PostgreSQL by URL
(``postgresql+psycopg://user@host/db``). The schema is created and migrated on start by numbered
migrations. Calls here are blocking; :mod:`hl7relay.store.writer` runs them on one writer thread
and groups concurrent messages into one commit.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from hl7relay.outcomes import AckCode, DeliveryStatus, MessageStatus

__all__ = ["Store", "MessageRecord", "DeliveryRecord", "DeliveryUpdate", "MessageUpdate", "StageUpdate", "AuditUpdate",
           "as_update", "StoreError", "MIGRATIONS", "open_store", "delivery_content", "storable",
           "sqlite_path", "readable_by_others", "AUDIT_FIELDS", "MAX_ROW_ID"]


class StoreError(Exception):
    """The store could not commit (disk full, database down...): the message must not be ACKed AA."""


metadata = sa.MetaData()

schema_version = sa.Table(
    "hl7relay_schema", metadata,
    sa.Column("version", sa.Integer, nullable=False),
)

messages = sa.Table(
    "messages", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("channel", sa.String(200), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),  # epoch seconds (UTC)
    sa.Column("peer", sa.String(200), nullable=False, default=""),
    sa.Column("raw", sa.LargeBinary, nullable=False),
    sa.Column("charset", sa.String(40), nullable=False, default=""),
    sa.Column("sending_application", sa.String(200), nullable=False, default=""),
    sa.Column("sending_facility", sa.String(200), nullable=False, default=""),
    sa.Column("message_type", sa.String(40), nullable=False, default=""),
    sa.Column("control_id", sa.String(200), nullable=False, default=""),
    sa.Column("patient_id", sa.String(200), nullable=False, default=""),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("error", sa.Text, nullable=False, default=""),
    sa.Column("ack_code", sa.String(2), nullable=False, default=""),
    sa.Column("duplicate_key", sa.String(600), nullable=True),
    sa.Column("replay_of", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=True),
    sa.Column("replay_reason", sa.Text, nullable=True),
    sa.Column("replay_operator", sa.String(200), nullable=True),
)
sa.Index("ix_messages_channel_time", messages.c.channel, messages.c.received_at)
sa.Index("ix_messages_status_time", messages.c.status, messages.c.received_at)
sa.Index("ix_messages_control_id", messages.c.control_id)
sa.Index("ix_messages_patient_id", messages.c.patient_id)
sa.Index("ix_messages_type_time", messages.c.message_type, messages.c.received_at)
sa.Index("ix_messages_facility_time", messages.c.sending_facility, messages.c.received_at)
# only messages of channels with duplicate detection have a key: the others skip this index (migration 4)
_HAS_DUPLICATE_KEY = messages.c.duplicate_key.isnot(None)
sa.Index("ix_messages_duplicate_key", messages.c.channel, messages.c.duplicate_key, messages.c.received_at,
         sqlite_where=_HAS_DUPLICATE_KEY, postgresql_where=_HAS_DUPLICATE_KEY)

stages = sa.Table(
    "message_stages", metadata,
    sa.Column("message_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"),
              sa.ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("stage", sa.String(220), primary_key=True),  # transformed, destination:<name>, ack
    sa.Column("content", sa.LargeBinary, nullable=False),
)

deliveries = sa.Table(
    "deliveries", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("message_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"),
              sa.ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
    sa.Column("destination", sa.String(200), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # QUEUED, SENT, ERROR, FILTERED
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("last_ack", sa.Text, nullable=False, default=""),
    sa.Column("last_error", sa.Text, nullable=False, default=""),
    sa.Column("next_attempt_at", sa.Float, nullable=True),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("order_key", sa.String(200), nullable=True),  # order: per_key: deliveries with one key go in order
)
# one delivery row per destination per message; updates find their row by both (migration 3)
sa.Index("ix_deliveries_message_destination", deliveries.c.message_id, deliveries.c.destination, unique=True)
# what waits, per destination, in order of receipt; only QUEUED rows are in it (migration 4), so
# delivered rows neither bloat it nor cost an index update each
# the statuses as the rows hold them, plain str (a StrEnum costs the driver an adapter lookup)
_D_QUEUED, _D_ERROR = DeliveryStatus.QUEUED.value, DeliveryStatus.ERROR.value
_M_ERROR, _M_DUPLICATE = MessageStatus.ERROR.value, MessageStatus.DUPLICATE.value
_RESEND_CODES = (AckCode.AR.value, AckCode.CR.value)  # answers that asked the sender to send again
_QUEUED = deliveries.c.status == sa.literal_column(f"'{_D_QUEUED}'")  # a literal: the planner must see it matches the index
sa.Index("ix_deliveries_queued", deliveries.c.destination, deliveries.c.message_id,
         sqlite_where=_QUEUED, postgresql_where=_QUEUED)
# dead letters, for the console's page of them: only ERROR rows (migration 8)
_DEAD = deliveries.c.status == sa.literal_column(f"'{_D_ERROR}'")
sa.Index("ix_deliveries_dead", deliveries.c.destination, deliveries.c.message_id, sqlite_where=_DEAD, postgresql_where=_DEAD)
# a message's replays (its page links them): only rows that are replays (migration 8)
_REPLAY = messages.c.replay_of.isnot(None)
sa.Index("ix_messages_replay_of", messages.c.replay_of, sqlite_where=_REPLAY, postgresql_where=_REPLAY)


destination_state = sa.Table(
    "destination_state", metadata,
    sa.Column("channel", sa.String(200), primary_key=True),
    sa.Column("destination", sa.String(200), primary_key=True),
    sa.Column("connected", sa.Boolean, nullable=False),
    sa.Column("last_error", sa.Text, nullable=False, default=""),
    sa.Column("updated_at", sa.Float, nullable=False),
)


# Who may operate the engine, and what was done: migration 5.
users = sa.Table(
    "users", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("role", sa.String(20), nullable=False),
    sa.Column("password_hash", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    # migration 7: seeing unmasked patient data as an operator, a switched-off account, the console's last sign-in
    sa.Column("phi", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("last_login_at", sa.Float),
)

api_tokens = sa.Table(
    "api_tokens", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("role", sa.String(20), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),  # SHA-256 of a 256-bit random token
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("created_by", sa.String(200), nullable=False, default=""),
    sa.Column("last_used_at", sa.Float),
)

audit_log = sa.Table(
    "audit_log", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),  # user:NAME, token:NAME, os:LOGIN
    sa.Column("role", sa.String(20), nullable=False, server_default=""),  # the actor's role then (migration 9)
    sa.Column("source", sa.String(200), nullable=False, default=""),  # cli@host, or the client's address
    sa.Column("action", sa.String(100), nullable=False),
    sa.Column("target", sa.String(500), nullable=False, default=""),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("result", sa.String(50), nullable=False, default="ok"),
    sa.Column("detail", sa.Text, nullable=False, default=""),
)
sa.Index("ix_audit_log_at", audit_log.c.at)


# What operators switched at run time (a channel disabled, a destination paused): survives restarts.
control_state = sa.Table(
    "control_state", metadata,
    sa.Column("channel", sa.String(200), primary_key=True),
    sa.Column("destination", sa.String(200), primary_key=True),  # "" for the channel itself
    sa.Column("setting", sa.String(20), primary_key=True),  # disabled (channel) or paused (destination)
    sa.Column("changed_at", sa.Float, nullable=False),
    sa.Column("changed_by", sa.String(200), nullable=False, default=""),
)

MAX_ROW_ID = 2 ** 63 - 1  # the largest id a row can have (SQLite INTEGER, PostgreSQL BIGINT): larger numbers name no row
AUDIT_FIELDS = ("at", "actor", "role", "source", "action", "target", "reason", "result", "detail")


def _audit_row(values: dict) -> dict:
    unknown = set(values) - set(AUDIT_FIELDS)
    if unknown:
        raise ValueError(f"unknown audit fields {sorted(unknown)}")
    row = {"at": values.get("at") or time.time(), "actor": values.get("actor") or "?", "role": values.get("role", ""),
           "source": values.get("source", ""),
           "action": values["action"], "target": str(values.get("target", "")), "reason": values.get("reason", ""),
           "result": values.get("result", "ok"), "detail": values.get("detail", "")}
    return {k: storable(v) for k, v in row.items()}


def _migration_5(connection) -> None:
    """Users, API tokens and the audit log."""
    for table in (users, api_tokens, audit_log):
        later = _ADDED_AFTER_5.get(table.name, ())
        if later:  # the table as version 5 made it; migration 7 adds the rest
            sa.Table(table.name, sa.MetaData(), *[c._copy() for c in table.columns if c.name not in later]).create(connection)
        else:
            table.create(connection)  # with its indexes


def _add_columns(connection, table_name: str, names) -> None:
    ddl = connection.dialect.ddl_compiler(connection.dialect, None)
    for name in names:
        spec = ddl.get_column_specification(metadata.tables[table_name].c[name])
        connection.exec_driver_sql(f"ALTER TABLE {table_name} ADD COLUMN {spec}")


def _migration_7(connection) -> None:
    """Users: the PHI permission for operators, disabled accounts, last sign-in (the console)."""
    _add_columns(connection, "users", ("phi", "disabled", "last_login_at"))


def _migration_1(connection) -> None:
    for table in (messages, stages, deliveries):
        # version 1 of these tables: the columns added by later migrations are left out
        columns = [c._copy() for c in table.columns if c.name not in _ADDED_LATER.get(table.name, ())]
        version_1 = sa.Table(table.name, sa.MetaData(), *columns)
        version_1.create(connection)
    for index in (*messages.indexes, *deliveries.indexes):
        if index.name not in _ADDED_LATER_INDEXES:
            index.create(connection)
    # replaced by later migrations; plain DDL, so the metadata only describes today's indexes
    connection.exec_driver_sql("CREATE INDEX ix_deliveries_message ON deliveries (message_id)")
    connection.exec_driver_sql("CREATE INDEX ix_deliveries_queue ON deliveries (destination, status, next_attempt_at)")


def _migration_2(connection) -> None:
    """Queues (per-key order), duplicate keys, replay links, destination state."""
    ddl = connection.dialect.ddl_compiler(connection.dialect, None)
    for table_name, names in _ADDED_LATER.items():
        table = metadata.tables[table_name]
        for name in names:
            column = table.c[name]
            spec = ddl.get_column_specification(column)
            connection.exec_driver_sql(f"ALTER TABLE {table_name} ADD COLUMN {spec}")
    connection.exec_driver_sql("CREATE INDEX ix_messages_duplicate ON messages (channel, duplicate_key, received_at)")
    connection.exec_driver_sql("CREATE INDEX ix_deliveries_order ON deliveries (destination, status, order_key, message_id)")
    destination_state.create(connection)


def _migration_3(connection) -> None:
    """Delivery updates look their row up by (message, destination) through a unique index.

    With only an index on message_id, SQLite's planner preferred ix_deliveries_order (destination
    first) and every delivery update scanned the destination's whole history."""
    for index in deliveries.indexes:
        if _ADDED_LATER_INDEXES.get(index.name) == 3:
            index.create(connection)
    connection.exec_driver_sql("DROP INDEX ix_deliveries_message")


def _migration_4(connection) -> None:
    """Partial indexes: what is QUEUED, in order, instead of two indexes over every delivery; and
    duplicate keys only for the messages that have one.

    The queue reads its destination's QUEUED rows in order of receipt; neither old index gave that
    order (a backlog was sorted on every poll), and each delivery updated both."""
    for index in (*messages.indexes, *deliveries.indexes):
        if _ADDED_LATER_INDEXES.get(index.name) == 4:
            index.create(connection)
    for name in ("ix_deliveries_order", "ix_deliveries_queue", "ix_messages_duplicate"):
        connection.exec_driver_sql(f"DROP INDEX {name}")


_ADDED_LATER = {
    "messages": ("duplicate_key", "replay_of", "replay_reason", "replay_operator"),
    "deliveries": ("order_key",),
}
# columns of migration 5's tables that later migrations add (7: users; 9: audit_log)
_ADDED_AFTER_5 = {"users": ("phi", "disabled", "last_login_at"), "audit_log": ("role",)}
_ADDED_LATER_INDEXES = {"ix_deliveries_message_destination": 3, "ix_deliveries_queued": 4, "ix_messages_duplicate_key": 4,
                        "ix_deliveries_dead": 8, "ix_messages_replay_of": 8}


def _migration_8(connection) -> None:
    """Indexes for the console: dead letters (ERROR deliveries) and a message's replays."""
    for index in (*messages.indexes, *deliveries.indexes):
        if _ADDED_LATER_INDEXES.get(index.name) == 8:
            index.create(connection)

# (version, description, function). Append; never edit a released one.
MIGRATIONS = [
    (1, "messages, stages and deliveries", _migration_1),
    (2, "queues, duplicates, replay links, destination state", _migration_2),
    (3, "unique (message, destination) index for delivery updates", _migration_3),
    (4, "partial indexes: queued deliveries, duplicate keys", _migration_4),
    (5, "users, API tokens, audit log", _migration_5),
    (6, "channel and destination controls that survive a restart", lambda connection: control_state.create(connection)),
    (7, "users: PHI permission, disabled, last sign-in", _migration_7),
    (8, "indexes: dead letters, replays of a message", _migration_8),
    (9, "audit log: the actor's role", lambda connection: _add_columns(connection, "audit_log", ("role",))),
    # migration 5 made the audit log from a copy of its columns, without this index (hl7relay verify found it)
    (10, "index: the audit log by time",
     lambda connection: next(i for i in audit_log.indexes if i.name == "ix_audit_log_at").create(connection, checkfirst=True)),
]


def _make_private_file(path: Path) -> None:
    missing = []
    folder = path.parent
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))  # an empty file is an empty SQLite database


def readable_by_others(url: str) -> list[str]:
    """The store's files and folder that other users of the machine can read (for a warning)."""
    path = sqlite_path(url)
    if path is None or not path.exists():
        return []
    found = []
    for item in (path.parent, path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            mode = item.stat().st_mode
        except OSError:
            continue
        if mode & 0o004 or (mode & 0o040 and not item.is_dir()):
            found.append(f"{item} ({oct(mode & 0o777)})")
    return found


@dataclass(slots=True)
class DeliveryRecord:
    destination: str
    status: str  # QUEUED or FILTERED at first
    # stage destination:<name>, stored only when it differs from what the queue falls back to
    # (the transformed stage, else the raw message): see delivery_content()
    content: bytes | None = None
    order_key: str | None = None
    payload: bytes | None = None  # what the queue sends now (in memory; not a column)
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


PROBE_BYTES = 256 * 1024  # what a readiness probe writes after a failed commit: a generous batch
@dataclass(slots=True)
class DeliveryUpdate:
    """A delivery's new values (status, attempts, last_ack, last_error, next_attempt_at, updated_at)."""

    message_id: int
    destination: str
    values: dict


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


Update = DeliveryUpdate | MessageUpdate | StageUpdate | AuditUpdate


def as_update(update) -> Update:
    """A typed update; the older ``(kind, key, values)`` tuples are still accepted."""
    if isinstance(update, (DeliveryUpdate, MessageUpdate, StageUpdate, AuditUpdate)):
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


_MESSAGE_COLUMNS = ("channel", "received_at", "peer", "raw", "charset", "sending_application", "sending_facility",
                    "message_type", "control_id", "patient_id", "status", "error", "ack_code", "duplicate_key",
                    "replay_of", "replay_reason", "replay_operator")
_DELIVERY_UPDATE_COLUMNS = frozenset(c.name for c in deliveries.columns) - {"id", "message_id", "destination"}
_MESSAGE_UPDATE_COLUMNS = frozenset(_MESSAGE_COLUMNS)


def _checked(columns, allowed) -> tuple:
    # column names go into SQL text: only the schema's own names are accepted
    unknown = set(columns) - allowed
    if unknown:
        raise ValueError(f"unknown columns {sorted(unknown)}")
    return columns


class _Rows:
    """The rows of one batch, built once for every backend: what each backend does differently
    is only how it sends them (the SQLite driver directly, PostgreSQL through SQLAlchemy)."""

    __slots__ = ("records", "messages", "delivery_updates", "message_updates", "stage_upserts", "audit")

    def __init__(self, records, updates):
        self.records = records
        self.messages = [self._message(r) for r in records]  # in _MESSAGE_COLUMNS order, no id
        self.delivery_updates: dict[tuple, list] = {}  # columns -> [(values..., message_id, destination)]
        self.message_updates: list = []  # (columns, (values..., id))
        self.stage_upserts: list = []  # (message_id, stage, content)
        self.audit: list = []  # dicts in AUDIT_FIELDS order
        # Updates of one delivery are merged, later values over earlier ones, before they are
        # grouped by the columns they set: the groups run one after the other, so an attempt's
        # result (QUEUED, with its attempts) and the withdrawal that followed it (WITHDRAWN) in one
        # batch ran in the groups' order, and the delivery came out QUEUED: sent after all.
        merged: dict[tuple, dict] = {}
        for update in updates:
            if update.__class__ is tuple:
                update = as_update(update)
            if update.__class__ is DeliveryUpdate:
                key = (update.message_id, update.destination)
                earlier = merged.get(key)
                merged[key] = update.values if earlier is None else {**earlier, **update.values}
            elif update.__class__ is MessageUpdate:
                columns = _checked(tuple(sorted(update.values)), _MESSAGE_UPDATE_COLUMNS)
                self.message_updates.append((columns, (*(storable(update.values[c]) for c in columns), update.message_id)))
            elif update.__class__ is StageUpdate:
                self.stage_upserts.append((update.message_id, update.stage, update.content))
            else:
                self.audit.append(_audit_row(update.entry))
        for (message_id, destination), values in merged.items():
            columns = tuple(sorted(values))
            self.delivery_updates.setdefault(columns, []).append(
                (*(storable(values[c]) for c in columns), message_id, destination))
        for columns in self.delivery_updates:
            _checked(columns, _DELIVERY_UPDATE_COLUMNS)

    @staticmethod
    def _message(r: MessageRecord) -> tuple:
        row = (r.channel, r.received_at, r.peer, r.raw, r.charset, r.sending_application, r.sending_facility,
               r.message_type, r.control_id, r.patient_id, r.status, r.error, r.ack_code, r.duplicate_key,
               r.replay_of, r.replay_reason, r.replay_operator)
        text = "".join([r.sending_application, r.sending_facility, r.message_type, r.control_id, r.patient_id,
                        r.error, r.duplicate_key or "", r.peer, r.replay_reason or "", r.replay_operator or ""])
        if not text.isascii() or "\x00" in text:
            row = tuple(storable(v) for v in row)
        return row

    def children(self, ids: list[int]) -> tuple[list, list]:
        """Stage rows (message_id, stage, content) and delivery rows (message_id, destination,
        status, next_attempt_at, updated_at, order_key), once the messages have their ids."""
        stage_rows, delivery_rows = [], []
        for message_id, r in zip(ids, self.records):
            for name, content in r.stages.items():
                stage_rows.append((message_id, name, content))
            for d in r.deliveries:
                if d.content is not None:
                    stage_rows.append((message_id, "destination:" + d.destination, d.content))
                delivery_rows.append((message_id, d.destination, d.status,
                                      r.received_at if d.status == _D_QUEUED else None, r.received_at, storable(d.order_key)))
        return stage_rows, delivery_rows


def _sql(placeholder: str) -> dict:
    """The batch's statements, with the driver's placeholder (``?`` or ``%s``)."""
    p = placeholder
    audit_columns = ", ".join(AUDIT_FIELDS)
    return {
        "message_with_id": (f"INSERT INTO messages (id, {', '.join(_MESSAGE_COLUMNS)}) "
                            f"VALUES ({', '.join([p] * (1 + len(_MESSAGE_COLUMNS)))})"),
        "next_ids": f"SELECT nextval(pg_get_serial_sequence('messages', 'id')) FROM generate_series(1, {p})",
        "stage": f"INSERT INTO message_stages (message_id, stage, content) VALUES ({p}, {p}, {p})",
        "delivery": ("INSERT INTO deliveries (message_id, destination, status, attempts, last_ack, last_error, "
                     f"next_attempt_at, updated_at, order_key) VALUES ({p}, {p}, {p}, 0, '', '', {p}, {p}, {p})"),
        "stage_upsert": (f"INSERT INTO message_stages (message_id, stage, content) VALUES ({p}, {p}, {p}) "
                         "ON CONFLICT (message_id, stage) DO UPDATE SET content = excluded.content"),
        "audit": f"INSERT INTO audit_log ({audit_columns}) VALUES ({', '.join([p] * len(AUDIT_FIELDS))})",
        "delivery_update": lambda columns: (f"UPDATE deliveries SET {', '.join(f'{c} = {p}' for c in columns)} "
                                            f"WHERE message_id = {p} AND destination = {p}"),
        "message_update": lambda columns: f"UPDATE messages SET {', '.join(f'{c} = {p}' for c in columns)} WHERE id = {p}",
    }


def _send_updates(execute, executemany, sql: dict, rows: _Rows) -> None:
    """The batch's updates through a driver's execute/executemany: the same for both backends."""
    for columns, values in rows.delivery_updates.items():
        executemany(sql["delivery_update"](columns), values)
    for columns, values in rows.message_updates:
        execute(sql["message_update"](columns), values)
    if rows.stage_upserts:
        executemany(sql["stage_upsert"], rows.stage_upserts)
    if rows.audit:
        executemany(sql["audit"], [tuple(entry[c] for c in AUDIT_FIELDS) for entry in rows.audit])


def _pipeline(driver):
    """psycopg's pipeline mode where the libpq under it has it (14 and newer; the binary wheel's
    does), else the statements one round trip each, as before."""
    import contextlib

    import psycopg

    return driver.pipeline() if psycopg.Pipeline.is_supported() else contextlib.nullcontext()


def psycopg_errors() -> tuple:
    """What a PostgreSQL commit may raise: SQLAlchemy's errors (the transaction around it) and
    psycopg's own (the statements sent to it directly)."""
    try:
        import psycopg
    except ImportError:  # only SQLite in use
        return (sa.exc.SQLAlchemyError,)
    return (sa.exc.SQLAlchemyError, psycopg.Error)


WAL_CHECKPOINT_PAGES = 10_000  # ~40 MB of 4 KB pages
WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024


def _sqlite_pragmas(dbapi_connection, _record):
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    # A checkpoint copies every page the WAL holds back into the database file and syncs it,
    # blocking the committing reactor meanwhile. Each commit rewrites the same few pages (the
    # last leaf of each index, the newest table pages), so a longer WAL holds far fewer distinct
    # pages per message: checkpointing every ~40 MB instead of SQLite's ~4 MB cut how often the
    # stall hits, and the benchmark's ACK p99 with it (bench/bench_engine.py, paired runs).
    cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
    cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")  # a WAL that grew past it shrinks back
    cursor.close()


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (None for other backends and in-memory databases)."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        return Path(url[len("sqlite:///"):].split("?", 1)[0]).expanduser()
    return None


class Store:
    """The message store. ``create``: make the SQLite file (and its folder) when missing, private
    to this user (0600 in a 0700 folder: SQLite gives its WAL and SHM files the database file's
    mode); without it a missing file is an error, so a support verb run in the wrong folder says
    so instead of creating an empty store."""

    def __init__(self, url: str, create: bool = True):
        self.url = url
        path = sqlite_path(url)
        if path is not None:
            if not path.exists():
                if not create:
                    raise StoreError(f"no store at {path}")
                _make_private_file(path)
        sqlite = url.startswith("sqlite")
        try:
            self.engine = sa.create_engine(url, future=True, pool_pre_ping=not sqlite)  # a file needs no liveness probe
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ValueError) as exc:
            raise StoreError(f"not a store URL ({exc}); expected sqlite:///PATH or postgresql+psycopg://USER@HOST/DB") from None
        except ImportError as exc:
            raise StoreError(f"the driver for {url.split(':', 1)[0]} is not installed ({exc}); "
                             "for PostgreSQL: pip install 'hl7relay[postgresql]'") from None
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sqlite_batch: _SQLiteBatch | None = None

    @property
    def display_url(self) -> str:
        """The URL without its password, for startup lines and logs."""
        return self.engine.url.render_as_string(hide_password=True)

    # -- schema ------------------------------------------------------------------------------
    def migrate(self) -> int:
        """Create or upgrade the schema; returns the version now in place."""
        with self.engine.begin() as connection:
            schema_version.create(connection, checkfirst=True)
            current = connection.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0
            for version, _description, function in MIGRATIONS:
                if version > current:
                    function(connection)
                    connection.execute(schema_version.insert().values(version=version))
                    current = version
        return current

    def schema_version(self) -> int:
        with self.engine.connect() as connection:
            return connection.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0

    # -- writing (one transaction per batch: the group commit) ---------------------------------------
    @property
    def splits_commits(self) -> bool:
        """Whether :meth:`write_batch` and :meth:`finish_batch` can split a commit (SQLite)."""
        return self.engine.dialect.name == "sqlite"

    def _batch(self) -> "_SQLiteBatch":
        if self._sqlite_batch is None:
            self._sqlite_batch = _SQLiteBatch(self.engine)
        return self._sqlite_batch

    def write_batch(self, records: list[MessageRecord], updates: list[tuple]) -> list[int]:
        """:meth:`commit` up to its COMMIT (SQLite only): the statements run, the transaction
        stays open with the write lock held, and nothing may use the store's batch connection
        until :meth:`finish_batch` (from any one thread) commits it. The messages' ids."""
        return self._batch().write(records, updates)

    def finish_batch(self) -> None:
        """COMMIT what :meth:`write_batch` wrote: durable when it returns; StoreError when not."""
        self._batch().finish()

    def commit(self, records: list[MessageRecord], updates: list[tuple]) -> list[int]:
        """New messages and updates in one transaction (what the writer batches), with a few
        statements per batch rather than per message: one multi-row INSERT ... RETURNING for the
        messages, executemany for their stages and deliveries, and for delivery updates.

        On SQLite this is the engine's hot path, so it talks to the driver directly (see
        :class:`_SQLiteBatch`); PostgreSQL goes through SQLAlchemy on the writer's thread."""
        if self.engine.dialect.name == "sqlite":
            return self._batch().commit(records, updates)
        try:
            rows = _Rows(records, updates)
            with self.engine.begin() as connection:
                # psycopg itself, inside SQLAlchemy's transaction: executemany sends a batch in one
                # pipeline (one round trip), where SQLAlchemy's insertmanyvalues rendered a statement
                # per batch and wrapped every row (438 -> see bench/bench_store.py)
                driver = connection.connection.driver_connection
                cursor = driver.cursor()
                try:
                    sql = _POSTGRES_SQL
                    ids = []
                    if rows.messages:  # the ids first (one round trip), so the rest needs no answer
                        cursor.execute(sql["next_ids"], (len(rows.messages),))
                        ids = [row[0] for row in cursor.fetchall()]
                    stage_rows, delivery_rows = rows.children(ids)
                    with _pipeline(driver):  # everything else in one round trip
                        if ids:
                            cursor.executemany(sql["message_with_id"], [(i, *row) for i, row in zip(ids, rows.messages)])
                        if stage_rows:
                            cursor.executemany(sql["stage"], stage_rows)
                        if delivery_rows:
                            cursor.executemany(sql["delivery"], delivery_rows)
                        _send_updates(cursor.execute, cursor.executemany, sql, rows)
                finally:
                    cursor.close()
                return ids
        except psycopg_errors() as exc:
            raise StoreError(f"store commit failed: {exc.__class__.__name__}: {exc}") from exc
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"store commit failed: {exc.__class__.__name__}: {getattr(exc, 'orig', exc)}") from exc

    # -- reading ----------------------------------------------------------------------------------
    def get_message(self, message_id: int) -> dict | None:
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(messages).where(messages.c.id == message_id)).mappings().first()
            if row is None:
                return None
            result = dict(row)
            result["stages"] = {r.stage: r.content for r in connection.execute(
                sa.select(stages.c.stage, stages.c.content).where(stages.c.message_id == message_id))}
            result["deliveries"] = [dict(r) for r in connection.execute(
                sa.select(deliveries).where(deliveries.c.message_id == message_id).order_by(deliveries.c.id)).mappings()]
            return result

    def dead_letters(self, channel: str | None = None, limit: int = 500) -> list[dict]:
        """ERROR deliveries grouped by channel, destination and error text: how many, first and
        last seen (when they went to ERROR), most recent first."""
        query = (sa.select(messages.c.channel, deliveries.c.destination, deliveries.c.last_error.label("error"),
                           sa.func.count().label("count"), sa.func.min(deliveries.c.message_id).label("sample_id"),
                           sa.func.min(deliveries.c.updated_at).label("first_seen"),
                           sa.func.max(deliveries.c.updated_at).label("last_seen"))
                 .select_from(deliveries.join(messages, messages.c.id == deliveries.c.message_id))
                 .where(_DEAD))
        if channel:
            query = query.where(messages.c.channel == channel)
        query = (query.group_by(messages.c.channel, deliveries.c.destination, deliveries.c.last_error)
                 .order_by(sa.desc("last_seen")).limit(limit))
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(query).mappings()]

    def dead_letter_ids(self, channel: str, destination: str, error: str | None = None, limit: int = 1000) -> list[int]:
        """The messages of one group of dead letters (oldest first)."""
        query = (sa.select(deliveries.c.message_id)
                 .select_from(deliveries.join(messages, messages.c.id == deliveries.c.message_id))
                 .where(_DEAD, deliveries.c.destination == destination, messages.c.channel == channel))
        if error is not None:
            query = query.where(deliveries.c.last_error == error)
        with self.engine.connect() as connection:
            return [r[0] for r in connection.execute(query.order_by(deliveries.c.message_id).limit(limit))]

    def replays_of(self, message_id: int) -> list[dict]:
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(
                sa.select(messages.c.id, messages.c.received_at, messages.c.status, messages.c.replay_operator,
                          messages.c.replay_reason).where(_REPLAY, messages.c.replay_of == message_id)
                .order_by(messages.c.id)).mappings()]

    def count(self, **where) -> int:
        with self.engine.connect() as connection:
            query = sa.select(sa.func.count()).select_from(messages)
            for column, value in where.items():
                query = query.where(messages.c[column] == value)
            return connection.execute(query).scalar()

    def latest(self, limit: int = 20, channel: str | None = None) -> list[dict]:
        with self.engine.connect() as connection:
            query = sa.select(messages.c.id, messages.c.channel, messages.c.received_at, messages.c.message_type,
                              messages.c.control_id, messages.c.status, messages.c.error, messages.c.ack_code)
            if channel:
                query = query.where(messages.c.channel == channel)
            return [dict(r) for r in connection.execute(query.order_by(messages.c.id.desc()).limit(limit)).mappings()]

    def find_original(self, channel: str, key: str, since: float) -> dict | None:
        """The first non-duplicate message of the channel with this duplicate key since ``since``.
        One answered AR or CR does not count: its sender was asked to send it again, and the
        resend must be processed, not answered AR for ever."""
        query = (sa.select(messages.c.id, messages.c.ack_code, messages.c.status)
                 .where(messages.c.channel == channel, messages.c.duplicate_key == storable(key), messages.c.received_at >= since,
                        messages.c.status != _M_DUPLICATE, messages.c.ack_code.not_in(_RESEND_CODES))
                 .order_by(messages.c.received_at, messages.c.id).limit(1))  # the key index's order: nothing sorted
        with self.engine.connect() as connection:
            row = connection.execute(query).mappings().first()
            return dict(row) if row else None

    # -- support: search, replay links, prune, status ---------------------------------------------
    def search(self, *, channel=None, status=None, since=None, until=None, message_type=None, control_id=None,
               patient_id=None, facility=None, delivery_status=None, failed: bool = False, text: bytes | None = None,
               before_id=None, limit=50, scan_limit=100000) -> list[dict]:
        """Newest first, ``limit`` at a time (keyset paging: pass the last id as ``before_id``).

        Every filter but ``text`` is answered by an index; ``text`` (a substring of the raw message,
        ignoring ASCII case) scans the candidates the other filters leave, at most ``scan_limit`` of them.
        ``failed``: what
        support staff look for first, a message stored as ERROR or with any delivery in ERROR (a dead
        letter); each row then carries ``failed_deliveries`` (destination and error).
        """
        query = sa.select(messages.c.id, messages.c.channel, messages.c.received_at, messages.c.message_type,
                          messages.c.control_id, messages.c.patient_id, messages.c.sending_facility, messages.c.status,
                          messages.c.error, messages.c.ack_code, messages.c.replay_of)
        for column, value in (("channel", channel), ("status", status), ("control_id", control_id),
                              ("patient_id", patient_id), ("sending_facility", facility)):
            if value is not None:
                query = query.where(messages.c[column] == storable(value))
        if since is not None:
            query = query.where(messages.c.received_at >= since)
        if until is not None:
            query = query.where(messages.c.received_at < until)
        if failed:
            # each side from its own index (status; the dead letters' partial index)
            query = query.where(sa.or_(messages.c.status == _M_ERROR,
                                       messages.c.id.in_(sa.select(deliveries.c.message_id).where(_DEAD))))
        if delivery_status in (_D_QUEUED, _D_ERROR):
            # the few waiting or dead deliveries, from their partial index (the status as a literal, so
            # the planner sees it matches): none at all costs nothing, where reading newest first
            # until a page was full read the whole table
            query = query.where(messages.c.id.in_(sa.select(deliveries.c.message_id).where(
                _QUEUED if delivery_status == _D_QUEUED else _DEAD)))
        elif delivery_status is not None:
            query = query.where(sa.exists().where(deliveries.c.message_id == messages.c.id,
                                                  deliveries.c.status == delivery_status))
        # Newest first, in the order an index already has, so no match is sorted: filtered by
        # channel, status, type or facility (indexes on (column, received_at)) by arrival time;
        # otherwise by id (the table itself; the control id and patient id indexes end with it).
        # Sorting a million rows by id within a channel took a second; this takes milliseconds.
        by_time = any(value is not None for value in (channel, status, message_type, facility))
        order = (messages.c.received_at.desc(), messages.c.id.desc()) if by_time else (messages.c.id.desc(),)
        with self.engine.connect() as connection:
            queries = [query]
            if message_type is not None:
                # "ADT" means every ADT trigger: each type found is read through the type index in
                # order and the reads merged, where one query for them all sorted every match
                types = [storable(message_type)] if "^" in message_type else self._types_like(connection, storable(message_type))
                queries = [query.where(messages.c.message_type == t) for t in types]
            queries = [q.order_by(*order) for q in queries]

            def after(query, last_id):
                """Keyset: the rows after message ``last_id`` in that order."""
                if last_id is None:
                    return query
                if not by_time:
                    return query.where(messages.c.id < last_id)
                at = connection.execute(sa.select(messages.c.received_at).where(messages.c.id == last_id)).scalar()
                if at is None:  # pruned since: its id still places it closely enough
                    return query.where(messages.c.id < last_id)
                return query.where(sa.tuple_(messages.c.received_at, messages.c.id) < sa.tuple_(at, last_id))

            def page(last_id, size: int, columns=()) -> list[dict]:
                rows = []
                for q in queries:
                    rows += [dict(r) for r in connection.execute(after(q.add_columns(*columns), last_id).limit(size)).mappings()]
                if len(queries) > 1:
                    rows.sort(key=(lambda r: (r["received_at"], r["id"])) if by_time else (lambda r: r["id"]), reverse=True)
                return rows[:size]

            if text is None:
                rows = page(before_id, limit)
                return self._with_failed_deliveries(connection, rows) if failed else rows
            found, scanned, cursor = [], 0, before_id
            needle = text.lower()
            while len(found) < limit and scanned < scan_limit:
                rows = page(cursor, 500, (messages.c.raw,))
                if not rows:
                    break
                scanned += len(rows)
                cursor = rows[-1]["id"]
                # case-insensitive (ASCII), as an analyst typing "penicillin" expects
                found += [{k: v for k, v in r.items() if k != "raw"} for r in rows if needle in r["raw"].lower()]
            return self._with_failed_deliveries(connection, found[:limit]) if failed else found[:limit]

    @staticmethod
    def _with_failed_deliveries(connection, rows: list[dict]) -> list[dict]:
        """Each row with its dead letters (destination, error) as ``failed_deliveries``; a row that
        has some also carries its ``raw`` message: a peer's error text may name the patient without
        quotes, and masking it needs the message's own person values (ops/support.row_view)."""
        if not rows:
            return rows
        dead: dict[int, list] = {}
        raw: dict[int, bytes] = {}
        for message_id, destination, error, content in connection.execute(
                sa.select(deliveries.c.message_id, deliveries.c.destination, deliveries.c.last_error, messages.c.raw)
                .join(messages, messages.c.id == deliveries.c.message_id)
                .where(deliveries.c.message_id.in_([r["id"] for r in rows]), _DEAD)
                .order_by(deliveries.c.message_id, deliveries.c.destination)):
            dead.setdefault(message_id, []).append({"destination": destination, "error": error})
            raw[message_id] = content
        for row in rows:
            row["failed_deliveries"] = dead.get(row["id"], [])
            if row["id"] in raw:
                row["raw"] = raw[row["id"]]
        return rows

    def channel_names(self, most: int = 1000) -> list[str]:
        """The channels that have stored messages, found by seeking through the channel index
        (one lookup per channel, however many messages each has)."""
        names: list[str] = []
        with self.engine.connect() as connection:
            last = None
            while len(names) < most:
                query = sa.select(sa.func.min(messages.c.channel))
                if last is not None:
                    query = query.where(messages.c.channel > last)
                last = connection.execute(query).scalar()
                if last is None:
                    break
                names.append(last)
        return names

    @staticmethod
    def _types_like(connection, prefix: str, most: int = 200) -> list[str]:
        """The stored message types ``prefix`` or ``prefix^...``, found by seeking through the type
        index (one lookup per type, however many messages each has)."""
        prefix = prefix.replace("%", "")
        types, last = [], None
        first = connection.execute(sa.select(messages.c.message_type).where(messages.c.message_type == prefix).limit(1)).scalar()
        if first is not None:
            types.append(first)
        low, high = prefix + "^", prefix + "_"  # "^" is 0x5E, "_" the next character: prefix^... lies between
        while len(types) < most:
            condition = messages.c.message_type > last if last is not None else messages.c.message_type >= low
            last = connection.execute(sa.select(sa.func.min(messages.c.message_type))
                                      .where(condition, messages.c.message_type < high)).scalar()
            if last is None:
                break
            types.append(last)
        return types

    def prune(self, older_than: float, statuses=None, channel: str | None = None, batch: int = 500,
              dry_run: bool = False) -> int:
        """Delete messages received before ``older_than`` (epoch), in small transactions; messages
        with a QUEUED delivery are never deleted. Returns how many were (``dry_run``: would be) deleted."""
        queued = sa.exists().where(deliveries.c.message_id == messages.c.id, deliveries.c.status == _D_QUEUED)
        query = sa.select(messages.c.id).where(messages.c.received_at < older_than, ~queued)
        if statuses:
            query = query.where(messages.c.status.in_(list(statuses)))
        if channel is not None:
            query = query.where(messages.c.channel == channel)
        if dry_run:
            with self.engine.connect() as connection:
                return connection.execute(sa.select(sa.func.count()).select_from(query.subquery())).scalar()
        deleted = 0
        while True:
            with self.engine.begin() as connection:  # one short transaction per batch: live traffic keeps flowing
                ids = [r[0] for r in connection.execute(query.order_by(messages.c.id).limit(batch))]
                if not ids:
                    return deleted
                connection.execute(stages.delete().where(stages.c.message_id.in_(ids)))
                connection.execute(deliveries.delete().where(deliveries.c.message_id.in_(ids)))
                connection.execute(sa.update(messages).where(messages.c.replay_of.in_(ids)).values(replay_of=None))
                connection.execute(messages.delete().where(messages.c.id.in_(ids)))
                deleted += len(ids)

    def channel_status(self, now: float, window: float | None = 86400.0) -> dict:
        """Per channel: counts by status of the messages received in the last ``window`` seconds
        (None: all of them), queued deliveries and the oldest one's age, the last error; per
        destination: queued and dead letters (ERROR, all of them: each waits for a person), the
        other delivery statuses in the window, connected (as the engine last recorded).

        What it reads grows with the window's traffic, the queues and the dead letters, not with
        the store: all time on 10M messages read every row (20 s on SQLite)."""
        out: dict = {}

        def channel_entry(channel):
            return out.setdefault(channel, {"counts": {}, "destinations": {}})

        def destination_entry(channel, destination):
            return channel_entry(channel)["destinations"].setdefault(
                destination, {"counts": {}, "oldest_queued_age": None, "connected": None, "last_error": ""})

        with self.engine.connect() as connection:
            after = 0
            if window is not None:  # the window as an id range: ids grow in order of arrival
                after = connection.execute(sa.select(messages.c.id).where(messages.c.received_at < now - window)
                                           .order_by(messages.c.id.desc()).limit(1)).scalar() or 0
            # "channel || ''": no index can group it, so the planner reads the id range (SQLite
            # walked the whole channel index for its order instead)
            channel_text = messages.c.channel.concat(sa.literal_column("''"))
            for channel, status, count in connection.execute(
                    sa.select(channel_text, messages.c.status, sa.func.count()).where(messages.c.id > after)
                    .group_by(channel_text, messages.c.status)):
                channel_entry(channel)["counts"][status] = count
            joined = deliveries.join(messages, messages.c.id == deliveries.c.message_id)
            recent = connection.execute(
                sa.select(messages.c.channel, deliveries.c.destination, deliveries.c.status, sa.func.count())
                .select_from(joined).where(deliveries.c.message_id > after, deliveries.c.status.notin_([_D_QUEUED, _D_ERROR]))
                .group_by(messages.c.channel, deliveries.c.destination, deliveries.c.status))
            for channel, destination, status, count in recent:
                destination_entry(channel, destination)["counts"][status] = count
            for status in (_D_QUEUED, _D_ERROR):  # from their partial indexes
                for channel, destination, count, oldest in waiting_by_destination(connection, status, messages.c.received_at):
                    entry = destination_entry(channel, destination)
                    entry["counts"][status] = count
                    if status == _D_QUEUED:
                        entry["oldest_queued_age"] = now - oldest
            for row in connection.execute(sa.select(destination_state)).mappings():
                entry = destination_entry(row["channel"], row["destination"])
                entry["connected"] = row["connected"]
                entry["last_error"] = row["last_error"]
            for channel, entry in out.items():
                last = connection.execute(  # the newest ERROR of the channel, through the (status, time) index
                    sa.select(messages.c.id, messages.c.received_at, messages.c.error)
                    .where(messages.c.status == _M_ERROR, channel_text == channel)  # the errors, not the channel, walked
                    .order_by(messages.c.received_at.desc(), messages.c.id.desc()).limit(1)).mappings().first()
                entry["last_error"] = dict(last) if last else None
        return out

    # -- queues ------------------------------------------------------------------------------
    def queued_deliveries(self, channel: str, destination: str, limit: int = 200, after_id: int | None = None,
                          skip: frozenset[int] | set[int] = frozenset()) -> list[dict]:
        """The destination's QUEUED deliveries in order of receipt, with what to send: of the first
        ``limit`` (only those of messages after ``after_id``, when given), all but the ``skip`` ids.

        The ids are read first, then the content of the others only: a queue polls with what it
        holds in memory as ``skip``, so a poll that finds nothing new reads no message bodies."""
        with self.engine.connect() as connection:
            ids = connection.execute(_QUEUED_IDS, {"destination": destination, "channel": channel, "limit": limit,
                                                   "after_id": -1 if after_id is None else after_id}).scalars().all()
            wanted = [i for i in ids if i not in skip]
            if not wanted:
                return []
            rows = connection.execute(_QUEUED_ROWS, {"destination": destination, "stage": "destination:" + destination,
                                                     "ids": wanted}).mappings()
            return [dict(r) for r in rows]

    def queue_depth(self, channel: str, destination: str) -> int:
        query = (sa.select(sa.func.count()).select_from(deliveries).join(messages, messages.c.id == deliveries.c.message_id)
                 .where(deliveries.c.destination == destination, _QUEUED, messages.c.channel == channel))
        with self.engine.connect() as connection:
            return connection.execute(query).scalar()

    def probe_write(self) -> None:
        """A real write of the size of a small batch, committed and leaving nothing behind (a row
        inserted and deleted in one transaction): fails like a message commit would while the disk
        is full or the database refuses writes (a one-row update can still fit in pages SQLite has)."""
        key = {"channel": "~probe", "destination": "~probe"}
        try:
            with self.engine.begin() as connection:
                connection.execute(destination_state.insert().values(
                    **key, connected=False, last_error="x" * PROBE_BYTES, updated_at=0.0))
                connection.execute(destination_state.delete().where(
                    destination_state.c.channel == key["channel"], destination_state.c.destination == key["destination"]))
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"store write failed: {getattr(exc, 'orig', exc)}") from exc

    # -- users, tokens, audit ----------------------------------------------------------------------
    def add_user(self, name: str, role: str, password_hash: str, audit: dict) -> None:
        """A new user; StoreError when the name is taken. ``audit`` is committed with it."""
        now = time.time()
        try:
            with self.engine.begin() as connection:
                if connection.execute(sa.select(users.c.name).where(users.c.name == name)).first() is not None:
                    raise StoreError(f"user {name!r} exists already")
                connection.execute(users.insert().values(name=name, role=role, password_hash=password_hash,
                                                         created_at=now, updated_at=now))
                connection.execute(audit_log.insert().values(**_audit_row(audit)))
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"could not add user {name!r}: {getattr(exc, 'orig', exc)}") from exc

    def update_user(self, name: str, audit: dict, **values) -> bool:
        """Change a user's role or password hash; False when there is no such user."""
        with self.engine.begin() as connection:
            changed = connection.execute(users.update().where(users.c.name == name)
                                         .values(updated_at=time.time(), **values)).rowcount
            if changed:
                connection.execute(audit_log.insert().values(**_audit_row(audit)))
            return bool(changed)

    def remove_user(self, name: str, audit: dict) -> bool:
        with self.engine.begin() as connection:
            removed = connection.execute(users.delete().where(users.c.name == name)).rowcount
            if removed:
                connection.execute(audit_log.insert().values(**_audit_row(audit)))
            return bool(removed)

    def get_user(self, name: str) -> dict | None:
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(users).where(users.c.name == name)).mappings().first()
            return dict(row) if row else None

    def list_users(self) -> list[dict]:
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(
                sa.select(users.c.name, users.c.role, users.c.phi, users.c.disabled, users.c.created_at, users.c.updated_at,
                          users.c.last_login_at).order_by(users.c.name)).mappings()]

    def record_login(self, name: str, now: float, audit: dict) -> None:
        """A console sign-in: when, and its audit entry, in one transaction."""
        with self.engine.begin() as connection:
            connection.execute(users.update().where(users.c.name == name).values(last_login_at=now))
            connection.execute(audit_log.insert().values(**_audit_row(audit)))

    def add_token(self, name: str, role: str, token_hash: str, created_by: str, audit: dict) -> None:
        try:
            with self.engine.begin() as connection:
                if connection.execute(sa.select(api_tokens.c.name).where(api_tokens.c.name == name)).first() is not None:
                    raise StoreError(f"token {name!r} exists already")
                connection.execute(api_tokens.insert().values(name=name, role=role, token_hash=token_hash,
                                                              created_at=time.time(), created_by=created_by))
                connection.execute(audit_log.insert().values(**_audit_row(audit)))
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"could not add token {name!r}: {getattr(exc, 'orig', exc)}") from exc

    def find_token(self, token_hash: str) -> dict | None:
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(api_tokens).where(api_tokens.c.token_hash == token_hash)).mappings().first()
            return dict(row) if row else None

    def list_tokens(self) -> list[dict]:
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(
                sa.select(api_tokens.c.name, api_tokens.c.role, api_tokens.c.created_at, api_tokens.c.created_by,
                          api_tokens.c.last_used_at).order_by(api_tokens.c.name)).mappings()]

    def touch_token(self, name: str, now: float) -> None:
        with self.engine.begin() as connection:
            connection.execute(api_tokens.update().where(api_tokens.c.name == name).values(last_used_at=now))

    def revoke_token(self, name: str, audit: dict) -> bool:
        with self.engine.begin() as connection:
            removed = connection.execute(api_tokens.delete().where(api_tokens.c.name == name)).rowcount
            if removed:
                connection.execute(audit_log.insert().values(**_audit_row(audit)))
            return bool(removed)

    def audit(self, entry: dict) -> None:
        """One audit entry on its own (an action that is itself a read, such as viewing PHI)."""
        try:
            with self.engine.begin() as connection:
                connection.execute(audit_log.insert().values(**_audit_row(entry)))
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"could not write the audit log: {getattr(exc, 'orig', exc)}") from exc

    def audit_entries(self, *, since: float | None = None, actor: str | None = None, action: str | None = None,
                      before_id: int | None = None, limit: int = 100) -> list[dict]:
        """Newest first, keyset paged (``before_id``); ``action`` matches a prefix (``user.``)."""
        query = sa.select(audit_log)
        if since is not None:
            query = query.where(audit_log.c.at >= since)
        if actor:
            query = query.where(audit_log.c.actor == storable(actor))
        if action:
            query = query.where(audit_log.c.action.like(action.replace("%", "") + "%"))
        if before_id is not None:
            query = query.where(audit_log.c.id < before_id)
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(query.order_by(audit_log.c.id.desc()).limit(limit)).mappings()]

    def set_control(self, channel: str, destination: str, setting: str, on: bool, actor: str, audit: dict | None) -> None:
        """Record (``on``) or clear a control (``disabled`` for a channel, ``paused`` for a
        destination), with its audit entry in the same transaction."""
        with self.engine.begin() as connection:
            key = (control_state.c.channel == channel, control_state.c.destination == destination,
                   control_state.c.setting == setting)
            connection.execute(control_state.delete().where(*key))
            if on:
                connection.execute(control_state.insert().values(channel=channel, destination=destination, setting=setting,
                                                                 changed_at=time.time(), changed_by=actor))
            if audit:
                connection.execute(audit_log.insert().values(**_audit_row(audit)))

    def controls(self) -> set[tuple[str, str, str]]:
        """Every control in force: (channel, destination or "", setting)."""
        with self.engine.connect() as connection:
            return {(r.channel, r.destination, r.setting) for r in connection.execute(sa.select(control_state))}

    def ping(self) -> bool:
        with self.engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        return True

    def set_destination_state(self, channel: str, destination: str, connected: bool, error: str, now: float) -> None:
        with self.engine.begin() as connection:
            updated = connection.execute(destination_state.update().where(
                destination_state.c.channel == channel, destination_state.c.destination == destination).values(
                connected=connected, last_error=error, updated_at=now)).rowcount
            if not updated:
                connection.execute(destination_state.insert().values(
                    channel=channel, destination=destination, connected=connected, last_error=error, updated_at=now))

    def close(self) -> None:
        if self._sqlite_batch is not None:
            self._sqlite_batch.close()
            self._sqlite_batch = None
        self.engine.dispose()


# the queue's poll, built once (statements with bound parameters, not rebuilt per poll)
_QUEUED_IDS = (
    sa.select(deliveries.c.message_id).join(messages, messages.c.id == deliveries.c.message_id)
    .where(deliveries.c.destination == sa.bindparam("destination"), _QUEUED, messages.c.channel == sa.bindparam("channel"),
           deliveries.c.message_id > sa.bindparam("after_id"))
    .order_by(deliveries.c.message_id).limit(sa.bindparam("limit"))
)
_content, _transformed = stages.alias("content"), stages.alias("transformed")
_QUEUED_ROWS = (  # the content as delivery_content() finds it
    sa.select(deliveries.c.id, deliveries.c.message_id, deliveries.c.attempts, deliveries.c.next_attempt_at,
              deliveries.c.order_key, sa.func.coalesce(_content.c.content, _transformed.c.content).label("content"),
              messages.c.raw, messages.c.received_at)
    .join(messages, messages.c.id == deliveries.c.message_id)
    .outerjoin(_content, sa.and_(_content.c.message_id == deliveries.c.message_id, _content.c.stage == sa.bindparam("stage")))
    .outerjoin(_transformed, sa.and_(_transformed.c.message_id == deliveries.c.message_id,
                                     _transformed.c.stage == "transformed"))
    .where(deliveries.c.destination == sa.bindparam("destination"), _QUEUED,
           deliveries.c.message_id.in_(sa.bindparam("ids", expanding=True)))
    .order_by(deliveries.c.message_id)
)


class _SQLiteBatch:
    """Group commits on SQLite through the driver itself, on one connection kept for the purpose.

    SQLAlchemy's per-statement work (compiling, caching, result objects) cost more than SQLite's
    own (profiled: ~55% of the engine's time under load), so the few statements of a batch are
    prepared SQL strings run with ``executemany``. ``BEGIN IMMEDIATE`` takes the write lock first,
    so the ids handed out after ``max(id)`` cannot collide with another process (a replay from
    the CLI) writing at the same time. The schema stays SQLAlchemy's (``metadata``)."""

    _INSERT_MESSAGE = (f"INSERT INTO messages (id, {', '.join(_MESSAGE_COLUMNS)}) "
                       f"VALUES ({', '.join('?' * (len(_MESSAGE_COLUMNS) + 1))})")
    _SQL = None  # built once: _sql("?")

    def __init__(self, engine: sa.Engine):
        self._proxy = engine.raw_connection()  # has the pragmas (WAL, synchronous=FULL) from the pool's connect hook
        self._connection = self._proxy.driver_connection
        if _SQLiteBatch._SQL is None:
            _SQLiteBatch._SQL = _sql("?")

    def commit(self, records: list[MessageRecord], updates: list) -> list[int]:
        ids = self.write(records, updates)
        self.finish()
        return ids

    def write(self, records: list[MessageRecord], updates: list) -> list[int]:
        """The batch's statements in a transaction left open (``BEGIN IMMEDIATE`` holds the write
        lock until :meth:`finish`); the new messages' ids. Rolled back when a statement fails."""
        import sqlite3

        connection = self._connection
        try:
            rows = _Rows(records, updates)
            if connection.in_transaction:  # left open by a failure we could not roll back
                connection.rollback()
            connection.execute("BEGIN IMMEDIATE")
            try:
                ids = []
                if rows.messages:
                    first = connection.execute("SELECT coalesce(max(id), 0) + 1 FROM messages").fetchone()[0]
                    ids = list(range(first, first + len(rows.messages)))
                    connection.executemany(self._INSERT_MESSAGE, [(i, *row) for i, row in zip(ids, rows.messages)])
                    stage_rows, delivery_rows = rows.children(ids)
                    sql = self._SQL
                    if stage_rows:
                        connection.executemany(sql["stage"], stage_rows)
                    if delivery_rows:
                        connection.executemany(sql["delivery"], delivery_rows)
                _send_updates(connection.execute, connection.executemany, self._SQL, rows)
            except BaseException:
                connection.rollback()
                raise
            return ids
        except (sqlite3.Error, ValueError, TypeError) as exc:
            raise StoreError(f"store commit failed: {exc.__class__.__name__}: {exc}") from exc

    def finish(self) -> None:
        """COMMIT what :meth:`write` left open: the disk flush (and, now and then, the WAL
        checkpoint). The driver releases the GIL for all of it, so it may run on another thread
        while this connection is otherwise left alone."""
        import sqlite3

        connection = self._connection
        try:
            connection.commit()
        except sqlite3.Error as exc:
            try:
                connection.rollback()
            except sqlite3.Error:
                pass  # rolled back at the next write (in_transaction)
            raise StoreError(f"store commit failed: {exc.__class__.__name__}: {exc}") from exc

    def close(self) -> None:
        try:
            if self._connection.in_transaction:
                self._connection.rollback()
        finally:
            self._proxy.close()


_POSTGRES_SQL = _sql("%s")


def waiting_by_destination(connection, status: str, first, *conditions) -> list:
    """(channel, destination, how many, the least ``first``) of the QUEUED or ERROR deliveries
    (``conditions``: more of them), grouped, read through their partial index: what status, the
    console and verify count of queues and dead letters."""
    waiting = {_D_QUEUED: _QUEUED, _D_ERROR: _DEAD}[status]
    return list(connection.execute(
        sa.select(messages.c.channel, deliveries.c.destination, sa.func.count(), sa.func.min(first))
        .select_from(deliveries.join(messages, messages.c.id == deliveries.c.message_id)).where(waiting, *conditions)
        .group_by(messages.c.channel, deliveries.c.destination)))


def open_store(url: str) -> Store:
    store = Store(url)
    store.migrate()
    return store
