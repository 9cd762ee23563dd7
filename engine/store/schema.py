"""The store's tables, indexes and numbered migrations (SQLAlchemy Core): the one
description of what is stored, shared by every backend."""

from __future__ import annotations

import time

import sqlalchemy as sa

from hl7relay.outcomes import AckCode, DeliveryStatus, MessageStatus
from hl7relay.store.records import storable


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
    # the configuration snapshot it was processed under (config_snapshots; migration 17)
    sa.Column("snapshot_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=True),
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
    # a cluster's queues are split into partitions, each delivered by the node holding its lease
    # (0 when not split: one engine); migration 20
    sa.Column("queue_partition", sa.SmallInteger, nullable=False, default=0, server_default="0"),
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
# a partition's queued deliveries in order (migration 20)
sa.Index("ix_deliveries_partition", deliveries.c.destination, deliveries.c.queue_partition, deliveries.c.message_id,
         sqlite_where=_QUEUED, postgresql_where=_QUEUED)
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

# the vault: secrets a channel names as ${secret:NAME}, encrypted by hl7relay.vault (never plain here)
secrets = sa.Table(
    "secrets", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("ciphertext", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("created_by", sa.String(200), nullable=False, default=""),
    sa.Column("rotated_at", sa.Float),
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


# FHIR: what each resource sent is on the server (issue #28): written in the same transaction as
# the delivery's result. The local key is the resource's uuid5 (the Bundle's urn:uuid), the
# identifier the PMS's (system|value, the system being its assigning authority).
fhir_xref = sa.Table(
    "fhir_xref", metadata,
    sa.Column("channel", sa.String(200), primary_key=True),
    sa.Column("destination", sa.String(200), primary_key=True),
    sa.Column("resource_type", sa.String(64), primary_key=True),
    sa.Column("local_key", sa.String(64), primary_key=True),
    sa.Column("identifier", sa.String(600), nullable=False, default=""),
    sa.Column("fhir_id", sa.String(64), nullable=False),
    sa.Column("version_id", sa.String(64), nullable=False, default=""),
    sa.Column("content_hash", sa.String(64), nullable=False, default=""),
    sa.Column("message_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=True),
    sa.Column("last_synced", sa.Float, nullable=False),
)
sa.Index("ix_fhir_xref_fhir_id", fhir_xref.c.destination, fhir_xref.c.resource_type, fhir_xref.c.fhir_id)
sa.Index("ix_fhir_xref_identifier", fhir_xref.c.resource_type, fhir_xref.c.identifier)

# FHIR: a message whose patient matched more than one on the server waits here for a person
# (hl7relay fhir holds / resolve); candidates: JSON [{id, name, birthDate, gender, identifiers}]
fhir_match_holds = sa.Table(
    "fhir_match_holds", metadata,
    sa.Column("channel", sa.String(200), primary_key=True),
    sa.Column("destination", sa.String(200), primary_key=True),
    sa.Column("message_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("local_key", sa.String(64), nullable=False, default=""),
    sa.Column("candidates", sa.Text, nullable=False),
    sa.Column("held_at", sa.Float, nullable=False),
    sa.Column("resolved_at", sa.Float, nullable=True),
    sa.Column("resolved_by", sa.String(200), nullable=True),
    sa.Column("decision", sa.String(64), nullable=True),  # the chosen Patient's id, or "new"
)

# FHIR source: the last version of each resource a fhir source saw, what it told the PMS about it
# (status, start, end, a hash of the rest), and, in the row with fhir_id "", its polling cursor
# (_lastUpdated of the last resource it finished with), so a restart resumes where it stopped.
fhir_source_state = sa.Table(
    "fhir_source_state", metadata,
    sa.Column("channel", sa.String(200), primary_key=True),
    sa.Column("resource_type", sa.String(64), primary_key=True),
    sa.Column("fhir_id", sa.String(64), primary_key=True),
    sa.Column("version_id", sa.String(64), nullable=False, default=""),
    sa.Column("status", sa.String(40), nullable=False, default=""),
    sa.Column("start", sa.String(40), nullable=False, default=""),
    sa.Column("end", sa.String(40), nullable=False, default=""),
    sa.Column("content_hash", sa.String(64), nullable=False, default=""),
    sa.Column("seen_at", sa.Float, nullable=False),
)

# Files: one row per file a source read (issue #29), by its content (sha256): a file named as an
# earlier one (ADT.txt every night) with other content is another row; the same content again is
# a duplicate. ``committed`` counts its messages stored, each in the transaction that stored it
# (file_messages says which), so a re-read after a crash or a store outage skips them.
file_ledger = sa.Table(
    "file_ledger", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("channel", sa.String(200), nullable=False),
    sa.Column("source", sa.String(600), nullable=False),
    sa.Column("name", sa.String(600), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("mtime", sa.Float, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("state", sa.String(20), nullable=False),  # FileState
    sa.Column("messages", sa.Integer, nullable=True),  # how many it holds, once read to its end
    sa.Column("committed", sa.Integer, nullable=False, default=0),
    sa.Column("errors", sa.Integer, nullable=False, default=0),  # of those, stored as ERROR
    sa.Column("duplicate_of", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=True),
    sa.Column("first_seen", sa.Float, nullable=False),
    sa.Column("done_at", sa.Float, nullable=True),
    sa.Column("archived_as", sa.String(1000), nullable=False, default=""),
    sa.Column("problems", sa.Text, nullable=False, default=""),  # the envelope's errors, stray segments; one a line
)
sa.Index("ix_file_ledger_file", file_ledger.c.channel, file_ledger.c.source, file_ledger.c.name, file_ledger.c.sha256,
         unique=True)
sa.Index("ix_file_ledger_content", file_ledger.c.channel, file_ledger.c.sha256)
sa.Index("ix_file_ledger_seen", file_ledger.c.first_seen)

file_messages = sa.Table(
    "file_messages", metadata,
    sa.Column("file_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"),
              sa.ForeignKey("file_ledger.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("ordinal", sa.Integer, primary_key=True),  # its place in the file, from 0
    sa.Column("line", sa.Integer, nullable=False),  # its MSH's line (segment) number
    sa.Column("message_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"),
              sa.ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
)
sa.Index("ix_file_messages_message", file_messages.c.message_id)


# What the engine ran: a row per start and reload (snapshots.py), the rendered configuration
# compressed (never a secret's value: references only).
config_snapshots = sa.Table(
    "config_snapshots", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("taken_at", sa.Float, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("environment", sa.String(64), nullable=False, default=""),
    sa.Column("node", sa.String(200), nullable=False, default=""),
    sa.Column("actor", sa.String(200), nullable=False, default=""),
    sa.Column("reason", sa.String(200), nullable=False, default=""),
    sa.Column("git_commit", sa.String(64), nullable=False, default=""),
    sa.Column("git_dirty", sa.Boolean, nullable=False, default=False),
    sa.Column("files", sa.Integer, nullable=False, default=0),
    sa.Column("bundle", sa.LargeBinary, nullable=False),
    # migration 18: what the person said (reload --reason, rollback --reason); the snapshot whose
    # bundle this one re-applied (a rollback, or a start after one: the engine runs it, not the files);
    # the hash of the files before the environment's values went in (the same in test and prod)
    sa.Column("note", sa.String(500), nullable=False, default="", server_default=""),
    sa.Column("from_snapshot", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=True),
    sa.Column("source_sha256", sa.String(64), nullable=False, default="", server_default=""),
)
sa.Index("ix_config_snapshots_taken", config_snapshots.c.taken_at)
sa.Index("ix_config_snapshots_source", config_snapshots.c.source_sha256)

# Promotions (hl7relay promote): files that ran in one environment, cleared for another; with
# approvals required, pending until another admin approves.
promotions = sa.Table(
    "promotions", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("requested_at", sa.Float, nullable=False),
    sa.Column("from_env", sa.String(64), nullable=False),
    sa.Column("to_env", sa.String(64), nullable=False),
    sa.Column("source_sha256", sa.String(64), nullable=False),
    sa.Column("evidence", sa.Text, nullable=False),  # JSON: the snapshot that ran, its messages, the tests
    sa.Column("requested_by", sa.String(200), nullable=False),
    sa.Column("reason", sa.String(500), nullable=False),
    sa.Column("approvals_needed", sa.Integer, nullable=False),
    sa.Column("approved_by", sa.String(200), nullable=False, default=""),
    sa.Column("approved_at", sa.Float, nullable=True),
    sa.Column("state", sa.String(16), nullable=False),  # PromotionState
)
sa.Index("ix_promotions_source", promotions.c.source_sha256, promotions.c.to_env)


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
    """The columns the table lacks (a migration run again, by verify --repair, finds them there)."""
    ddl = connection.dialect.ddl_compiler(connection.dialect, None)
    present = {column["name"] for column in sa.inspect(connection).get_columns(table_name)}
    for name in names:
        if name in present:
            continue
        spec = ddl.get_column_specification(metadata.tables[table_name].c[name])
        connection.exec_driver_sql(f"ALTER TABLE {table_name} ADD COLUMN {spec}")


def _migration_7(connection) -> None:
    """Users: the PHI permission for operators, disabled accounts, last sign-in (the console)."""
    _add_columns(connection, "users", ("phi", "disabled", "last_login_at"))


def _migration_1(connection) -> None:
    for table in (messages, stages, deliveries):
        # version 1 of these tables: the columns added by later migrations are left out
        later = (*_ADDED_LATER.get(table.name, ()), *_ADDED_AFTER_16.get(table.name, ()),
                 *_ADDED_AFTER_19.get(table.name, ()))
        columns = [c._copy() for c in table.columns if c.name not in later]
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
        if _ADDED_LATER_INDEXES.get(str(index.name)) == 3:
            index.create(connection)
    connection.exec_driver_sql("DROP INDEX ix_deliveries_message")


def _migration_4(connection) -> None:
    """Partial indexes: what is QUEUED, in order, instead of two indexes over every delivery; and
    duplicate keys only for the messages that have one.

    The queue reads its destination's QUEUED rows in order of receipt; neither old index gave that
    order (a backlog was sorted on every poll), and each delivery updated both."""
    for index in (*messages.indexes, *deliveries.indexes):
        if _ADDED_LATER_INDEXES.get(str(index.name)) == 4:
            index.create(connection)
    for name in ("ix_deliveries_order", "ix_deliveries_queue", "ix_messages_duplicate"):
        connection.exec_driver_sql(f"DROP INDEX {name}")


_ADDED_LATER = {
    "messages": ("duplicate_key", "replay_of", "replay_reason", "replay_operator"),
    "deliveries": ("order_key",),
}
# columns that migration 17 adds (migration 2 adds _ADDED_LATER's)
_ADDED_AFTER_16 = {"messages": ("snapshot_id",)}
# columns that migration 18 adds to migration 16's table
_ADDED_AFTER_17 = {"config_snapshots": ("note", "from_snapshot", "source_sha256")}
# columns that migration 20 adds (migration 1 makes its tables without them)
_ADDED_AFTER_19 = {"deliveries": ("queue_partition",)}
# columns of migration 5's tables that later migrations add (7: users; 9: audit_log)
_ADDED_AFTER_5 = {"users": ("phi", "disabled", "last_login_at"), "audit_log": ("role",)}
_ADDED_LATER_INDEXES = {"ix_deliveries_message_destination": 3, "ix_deliveries_queued": 4, "ix_messages_duplicate_key": 4,
                        "ix_deliveries_dead": 8, "ix_messages_replay_of": 8, "ix_deliveries_partition": 20}


def _migration_8(connection) -> None:
    """Indexes for the console: dead letters (ERROR deliveries) and a message's replays."""
    for index in (*messages.indexes, *deliveries.indexes):
        if _ADDED_LATER_INDEXES.get(str(index.name)) == 8:
            index.create(connection)

def _migration_15(connection) -> None:
    file_ledger.create(connection, checkfirst=True)
    file_messages.create(connection, checkfirst=True)


def _migration_18(connection) -> None:
    _add_columns(connection, "config_snapshots", _ADDED_AFTER_17["config_snapshots"])
    index = next(i for i in config_snapshots.indexes if i.name == "ix_config_snapshots_source")
    index.create(connection, checkfirst=True)
    promotions.create(connection, checkfirst=True)


# The engines on one store (issue #31): each registers, beats and says the snapshot it runs.
nodes = sa.Table(
    "nodes", metadata,
    sa.Column("node_id", sa.String(100), primary_key=True),
    sa.Column("host", sa.String(200), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("version", sa.String(40), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),  # the database's clock, as heartbeat_at
    sa.Column("heartbeat_at", sa.Float, nullable=False),
    sa.Column("snapshot_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=True),
    sa.Column("snapshot_sha256", sa.String(64), nullable=False, default=""),
    sa.Column("state", sa.String(16), nullable=False),  # NodeState
    # how many partitions the node splits each destination's queue into (the same on every node)
    sa.Column("partitions", sa.Integer, nullable=True),
)

# Leases: who may do a thing (deliver a queue's partition, run a singleton) until when; the epoch
# grows at each change of owner, and a write made under a lease checks it (fencing).
leases = sa.Table(
    "leases", metadata,
    sa.Column("name", sa.String(300), primary_key=True),
    sa.Column("owner", sa.String(100), nullable=False),
    sa.Column("epoch", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=False),
    sa.Column("acquired_at", sa.Float, nullable=False),  # the database's clock
    sa.Column("expires_at", sa.Float, nullable=False),
)


# What an operator asked every node of a cluster to do (hl7relay reload --cluster), and each node's answer.
cluster_commands = sa.Table(
    "cluster_commands", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("command", sa.String(40), nullable=False),  # reload
    sa.Column("requested_at", sa.Float, nullable=False),  # the database's clock
    sa.Column("requested_by", sa.String(200), nullable=False),
    sa.Column("reason", sa.String(500), nullable=False, default=""),
)
cluster_command_results = sa.Table(
    "cluster_command_results", metadata,
    sa.Column("command_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"),
              sa.ForeignKey("cluster_commands.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("node_id", sa.String(100), primary_key=True),
    sa.Column("finished_at", sa.Float, nullable=False),
    sa.Column("result", sa.String(16), nullable=False),  # ok, refused
    sa.Column("detail", sa.Text, nullable=False, default=""),
)


def _migration_22(connection) -> None:
    _add_columns(connection, "nodes", ("partitions",))


def _migration_21(connection) -> None:
    cluster_commands.create(connection, checkfirst=True)
    cluster_command_results.create(connection, checkfirst=True)


def _migration_20(connection) -> None:
    _add_columns(connection, "deliveries", _ADDED_AFTER_19["deliveries"])
    index = next(i for i in deliveries.indexes if i.name == "ix_deliveries_partition")
    index.create(connection, checkfirst=True)


def _migration_19(connection) -> None:
    nodes.create(connection, checkfirst=True)
    leases.create(connection, checkfirst=True)


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
    (11, "the vault: encrypted secrets", lambda connection: secrets.create(connection, checkfirst=True)),
    (12, "FHIR: identifiers cross-referenced with the server's ids and versions",
     lambda connection: fhir_xref.create(connection, checkfirst=True)),
    (13, "FHIR: messages held for a person to match their patient",
     lambda connection: fhir_match_holds.create(connection, checkfirst=True)),
    (14, "FHIR: what a fhir source last saw of each resource, and its cursor",
     lambda connection: fhir_source_state.create(connection, checkfirst=True)),
    (15, "files: the ledger of files read and of the messages each held", _migration_15),
    (16, "configuration snapshots: what the engine ran, at each start and reload",
     lambda connection: config_snapshots.create(connection, checkfirst=True)),
    (17, "messages: the configuration snapshot each was processed under",
     lambda connection: _add_columns(connection, "messages", _ADDED_AFTER_16["messages"])),
    (18, "configuration: rollbacks, notes, the files' hash across environments; promotions", _migration_18),
    (19, "cluster: the nodes on the store and their leases", _migration_19),
    (20, "deliveries: the queue partition each is in (a cluster's nodes deliver the partitions they hold)", _migration_20),
    (21, "cluster: commands to every node (reload) and each node's answer", _migration_21),
    (22, "cluster: the partitions each node splits the queues into", _migration_22),
]
