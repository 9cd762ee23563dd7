"""One batch's rows, built once, and how each backend sends them: SQLite through its driver on
a connection of its own (the hot path), PostgreSQL through psycopg inside SQLAlchemy's transaction."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from hl7relay.outcomes import FileState, MessageStatus
from hl7relay.store.schema import deliveries, _D_QUEUED, AUDIT_FIELDS, _audit_row
from hl7relay.store.records import (
    AuditUpdate, ControlUpdate, DeliveryUpdate, DestinationStateUpdate, MessageRecord, MessageUpdate, StageUpdate, StoreError,
    FileSeenUpdate, FileUpdate, MatchHoldUpdate, SourceStateUpdate, TokenUseUpdate, XrefUpdate, as_update, storable,
)

_M_ERROR = MessageStatus.ERROR.value


_MESSAGE_COLUMNS = ("channel", "received_at", "peer", "raw", "charset", "sending_application", "sending_facility",
                    "message_type", "control_id", "patient_id", "status", "error", "ack_code", "duplicate_key",
                    "replay_of", "replay_reason", "replay_operator", "snapshot_id")
_DELIVERY_UPDATE_COLUMNS = frozenset(c.name for c in deliveries.columns) - {"id", "message_id", "destination"}
_MESSAGE_UPDATE_COLUMNS = frozenset(_MESSAGE_COLUMNS)
_FILE_UPDATE_COLUMNS = frozenset({"state", "messages", "done_at", "archived_as", "duplicate_of", "problems"})


def _checked(columns, allowed) -> tuple:
    # column names go into SQL text: only the schema's own names are accepted
    unknown = set(columns) - allowed
    if unknown:
        raise ValueError(f"unknown columns {sorted(unknown)}")
    return columns


class _Rows:
    """The rows of one batch, built once for every backend: what each backend does differently
    is only how it sends them (the SQLite driver directly, PostgreSQL through SQLAlchemy)."""

    __slots__ = ("records", "messages", "delivery_updates", "message_updates", "stage_upserts", "audit", "controls",
                 "destination_states", "token_uses", "xrefs", "holds", "source_states", "files_seen", "file_updates",
                 "_merged", "_leased")

    def __init__(self, records, updates):
        self.records = records
        self.messages = [self._message(r) for r in records]  # in _MESSAGE_COLUMNS order, no id
        self.delivery_updates: dict[tuple, list] = {}  # columns -> [(values..., message_id, destination)]
        self.message_updates: list = []  # (columns, (values..., id))
        self.stage_upserts: list = []  # (message_id, stage, content)
        self.audit: list = []  # dicts in AUDIT_FIELDS order
        # the operators' switches, destinations' states and token uses: the last of each key counts
        self.controls: dict[tuple, ControlUpdate] = {}  # (channel, destination, setting) -> update
        self.destination_states: dict[tuple, tuple] = {}  # (channel, destination) -> row
        self.token_uses: dict[str, float] = {}  # token name -> when
        self.xrefs: dict[tuple, tuple] = {}  # (channel, destination, type, local key) -> row: the last counts
        self.holds: dict[tuple, tuple] = {}  # (channel, destination, message id) -> row
        self.source_states: dict[tuple, tuple] = {}  # (channel, type, fhir id) -> row
        self.files_seen: dict[tuple, tuple] = {}  # (channel, source, name, sha256) -> row
        self.file_updates: list = []  # (columns, (values..., id))
        # Updates of one delivery are merged, later values over earlier ones, before they are
        # grouped by the columns they set: the groups run one after the other, so an attempt's
        # result (QUEUED, with its attempts) and the withdrawal that followed it (WITHDRAWN) in one
        # batch ran in the groups' order, and the delivery came out QUEUED: sent after all.
        merged: dict[tuple, dict] = {}
        leased: dict[tuple, tuple] = {}  # (message id, destination) -> the lease its update was written under
        for update in updates:
            if update.__class__ is tuple:
                update = as_update(update)
            if update.__class__ is DeliveryUpdate:
                key = (update.message_id, update.destination)
                earlier = merged.get(key)
                merged[key] = update.values if earlier is None else {**earlier, **update.values}
                if update.lease is not None:
                    leased[key] = update.lease
            elif update.__class__ is MessageUpdate:
                columns = _checked(tuple(sorted(update.values)), _MESSAGE_UPDATE_COLUMNS)
                self.message_updates.append((columns, (*(storable(update.values[c]) for c in columns), update.message_id)))
            elif update.__class__ is StageUpdate:
                self.stage_upserts.append((update.message_id, update.stage, update.content))
            elif update.__class__ is AuditUpdate:
                self.audit.append(_audit_row(update.entry))
            elif update.__class__ is ControlUpdate:
                self.controls[(update.channel, update.destination, update.setting)] = update
            elif update.__class__ is DestinationStateUpdate:
                self.destination_states[(update.channel, update.destination)] = (
                    update.channel, update.destination, update.connected, storable(update.error), update.at)
            elif update.__class__ is TokenUseUpdate:
                self.token_uses[update.name] = update.at
            elif update.__class__ is SourceStateUpdate:
                key = (update.channel, update.resource_type, update.fhir_id)
                self.source_states[key] = (*key, update.version_id, update.status, update.start, update.end,
                                           update.content_hash, update.at)
            elif update.__class__ is MatchHoldUpdate:
                key = (update.channel, update.destination, update.message_id)
                self.holds[key] = (*key, update.local_key, storable(update.candidates), update.at)
            elif update.__class__ is FileSeenUpdate:
                key = (update.channel, update.source, update.name, update.sha256)
                self.files_seen[key] = (*(storable(k) for k in key), update.size, update.mtime, update.at)
            elif update.__class__ is FileUpdate:
                columns = _checked(tuple(sorted(update.values)), _FILE_UPDATE_COLUMNS)
                self.file_updates.append((columns, (*(storable(update.values[c]) for c in columns), update.file_id)))
            elif update.__class__ is XrefUpdate:
                key = (update.channel, update.destination, update.resource_type, update.local_key)
                self.xrefs[key] = (*key, storable(update.identifier), update.fhir_id, update.version_id,
                                   update.content_hash, update.message_id, update.at)
            else:
                raise ValueError(f"not a store update: {update!r}")
        self._merged, self._leased = merged, leased
        if not leased:  # one engine on its store: nothing to fence
            self._group_delivery_updates()

    def _group_delivery_updates(self) -> None:
        for (message_id, destination), values in self._merged.items():
            columns = tuple(sorted(values))
            self.delivery_updates.setdefault(columns, []).append(
                (*(storable(values[c]) for c in columns), message_id, destination))
        for columns in self.delivery_updates:
            _checked(columns, _DELIVERY_UPDATE_COLUMNS)

    def fence(self, held) -> list[tuple]:
        """Leave out the delivery updates written under a lease that is no longer the writer's
        (``held(leases)`` asks the store, inside the commit's transaction, which of them are still
        held: one query for them all); returns them (message id, destination). A node paused past
        its lease and woken late writes nothing."""
        if not self._leased:
            return []
        live = held(sorted(set(self._leased.values())))
        fenced = [key for key, lease in self._leased.items() if lease not in live]
        for key in fenced:
            del self._merged[key]
        self._leased = {}
        self._group_delivery_updates()
        return fenced

    @staticmethod
    def _message(r: MessageRecord) -> tuple:
        row = (r.channel, r.received_at, r.peer, r.raw, r.charset, r.sending_application, r.sending_facility,
               r.message_type, r.control_id, r.patient_id, r.status, r.error, r.ack_code, r.duplicate_key,
               r.replay_of, r.replay_reason, r.replay_operator, r.snapshot_id)
        text = "".join([r.sending_application, r.sending_facility, r.message_type, r.control_id, r.patient_id,
                        r.error, r.duplicate_key or "", r.peer, r.replay_reason or "", r.replay_operator or ""])
        if not text.isascii() or "\x00" in text:
            row = tuple(storable(v) for v in row)
        return row

    def children(self, ids: list[int]) -> tuple[list, list]:
        """Stage rows (message_id, stage, content) and delivery rows (message_id, destination,
        status, next_attempt_at, updated_at, order_key, queue_partition), once the messages have their ids."""
        stage_rows, delivery_rows = [], []
        for message_id, r in zip(ids, self.records):
            for name, content in r.stages.items():
                stage_rows.append((message_id, name, content))
            for d in r.deliveries:
                if d.content is not None:
                    stage_rows.append((message_id, "destination:" + d.destination, d.content))
                delivery_rows.append((message_id, d.destination, d.status,
                                      r.received_at if d.status == _D_QUEUED else None, r.received_at, storable(d.order_key),
                                      d.partition))
        return stage_rows, delivery_rows

    def file_rows(self, ids: list[int]) -> tuple[list, dict]:
        """For messages read from a file: file_messages rows (file_id, ordinal, line, message_id)
        and per file [stored, of them ERROR, lowest place, highest place]."""
        rows: list = []
        counts: dict[int, list] = {}
        for message_id, r in zip(ids, self.records):
            if r.source_file is not None:
                file_id, ordinal, line = r.source_file
                rows.append((file_id, ordinal, line, message_id))
                count = counts.get(file_id)
                if count is None:
                    counts[file_id] = [1, int(r.status == _M_ERROR), ordinal, ordinal]
                else:
                    count[0] += 1
                    count[1] += r.status == _M_ERROR
                    count[2], count[3] = min(count[2], ordinal), max(count[3], ordinal)
        return rows, counts


def _sql(placeholder: str) -> dict:
    """The batch's statements, with the driver's placeholder (``?`` or ``%s``)."""
    p = placeholder
    audit_columns = ", ".join(AUDIT_FIELDS)
    return {
        "message_with_id": (f"INSERT INTO messages (id, {', '.join(_MESSAGE_COLUMNS)}) "
                            f"VALUES ({', '.join([p] * (1 + len(_MESSAGE_COLUMNS)))})"),
        "next_ids": f"SELECT nextval(pg_get_serial_sequence('messages', 'id')) FROM generate_series(1, {p})",
        # a lease still the writer's, at its epoch, live by the database's clock (PostgreSQL: the row
        # share-locked until the commit, so a new owner's take waits for it)
        "lease_held": (f"SELECT 1 FROM leases WHERE name = {p} AND owner = {p} AND epoch = {p} AND expires_at > " +
                       ("extract(epoch from clock_timestamp()) FOR SHARE" if p == "%s"
                        else "(julianday('now') - 2440587.5) * 86400.0")),
        # PostgreSQL: every lease of a commit in one round trip
        "leases_live": ("SELECT name, owner, epoch FROM leases WHERE name = ANY(%s) AND expires_at > "
                        "extract(epoch from clock_timestamp()) FOR SHARE"),
        "stage": f"INSERT INTO message_stages (message_id, stage, content) VALUES ({p}, {p}, {p})",
        "delivery": ("INSERT INTO deliveries (message_id, destination, status, attempts, last_ack, last_error, "
                     f"next_attempt_at, updated_at, order_key, queue_partition) "
                     f"VALUES ({p}, {p}, {p}, 0, '', '', {p}, {p}, {p}, {p})"),
        "stage_upsert": (f"INSERT INTO message_stages (message_id, stage, content) VALUES ({p}, {p}, {p}) "
                         "ON CONFLICT (message_id, stage) DO UPDATE SET content = excluded.content"),
        "audit": f"INSERT INTO audit_log ({audit_columns}) VALUES ({', '.join([p] * len(AUDIT_FIELDS))})",
        "delivery_update": lambda columns: (f"UPDATE deliveries SET {', '.join(f'{c} = {p}' for c in columns)} "
                                            f"WHERE message_id = {p} AND destination = {p}"),
        "message_update": lambda columns: f"UPDATE messages SET {', '.join(f'{c} = {p}' for c in columns)} WHERE id = {p}",
        "control_clear": f"DELETE FROM control_state WHERE channel = {p} AND destination = {p} AND setting = {p}",
        "control_set": (f"INSERT INTO control_state (channel, destination, setting, changed_at, changed_by) "
                        f"VALUES ({p}, {p}, {p}, {p}, {p})"),
        "destination_state": (f"INSERT INTO destination_state (channel, destination, connected, last_error, updated_at) "
                              f"VALUES ({p}, {p}, {p}, {p}, {p}) ON CONFLICT (channel, destination) DO UPDATE SET "
                              "connected = excluded.connected, last_error = excluded.last_error, "
                              "updated_at = excluded.updated_at"),
        "token_use": f"UPDATE api_tokens SET last_used_at = {p} WHERE name = {p}",
        "xref": (f"INSERT INTO fhir_xref (channel, destination, resource_type, local_key, identifier, fhir_id, version_id, "
                 f"content_hash, message_id, last_synced) VALUES ({', '.join([p] * 10)}) "
                 "ON CONFLICT (channel, destination, resource_type, local_key) DO UPDATE SET "
                 "identifier = excluded.identifier, fhir_id = excluded.fhir_id, version_id = excluded.version_id, "
                 "content_hash = excluded.content_hash, message_id = excluded.message_id, "
                 "last_synced = excluded.last_synced"),
        "hold": (f"INSERT INTO fhir_match_holds (channel, destination, message_id, local_key, candidates, held_at) "
                 f"VALUES ({', '.join([p] * 6)}) ON CONFLICT (channel, destination, message_id) DO UPDATE SET "
                 "local_key = excluded.local_key, candidates = excluded.candidates, held_at = excluded.held_at, "
                 "resolved_at = NULL, resolved_by = NULL, decision = NULL"),
        "file_seen": (f"INSERT INTO file_ledger (channel, source, name, sha256, size, mtime, first_seen, state, committed, "
                      f"errors, archived_as, problems) VALUES ({', '.join([p] * 7)}, '{FileState.READING.value}', 0, 0, '', '') "
                      "ON CONFLICT (channel, source, name, sha256) DO NOTHING"),
        "file_update": lambda columns: f"UPDATE file_ledger SET {', '.join(f'{c} = {p}' for c in columns)} WHERE id = {p}",
        "file_message": f"INSERT INTO file_messages (file_id, ordinal, line, message_id) VALUES ({p}, {p}, {p}, {p})",
        "file_counts": f"UPDATE file_ledger SET committed = committed + {p}, errors = errors + {p} WHERE id = {p}",
        "file_committed": f"SELECT committed FROM file_ledger WHERE id = {p}",
        "source_state": (f'INSERT INTO fhir_source_state (channel, resource_type, fhir_id, version_id, status, start, "end", '
                         f"content_hash, seen_at) VALUES ({', '.join([p] * 9)}) "
                         "ON CONFLICT (channel, resource_type, fhir_id) DO UPDATE SET version_id = excluded.version_id, "
                         'status = excluded.status, start = excluded.start, "end" = excluded."end", '
                         "content_hash = excluded.content_hash, seen_at = excluded.seen_at"),
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
    if rows.controls:
        executemany(sql["control_clear"], list(rows.controls))
        switched_on = [(*key, u.at, storable(u.actor)) for key, u in rows.controls.items() if u.on]
        if switched_on:
            executemany(sql["control_set"], switched_on)
    if rows.destination_states:
        executemany(sql["destination_state"], list(rows.destination_states.values()))
    if rows.token_uses:
        executemany(sql["token_use"], [(at, name) for name, at in rows.token_uses.items()])
    if rows.xrefs:
        executemany(sql["xref"], list(rows.xrefs.values()))
    if rows.holds:
        executemany(sql["hold"], list(rows.holds.values()))
    if rows.source_states:
        executemany(sql["source_state"], list(rows.source_states.values()))
    if rows.files_seen:
        executemany(sql["file_seen"], list(rows.files_seen.values()))
    for columns, values in rows.file_updates:
        execute(sql["file_update"](columns), values)


def _send_file_rows(executemany, sql: dict, rows: _Rows, ids: list[int]) -> dict:
    """Messages read from files: which file and place each came from, and the files' counts;
    what :func:`_check_file_order` checks once they are sent."""
    file_rows, counts = rows.file_rows(ids)
    if file_rows:
        executemany(sql["file_message"], file_rows)
        executemany(sql["file_counts"], [(n, errors, file_id) for file_id, (n, errors, _low, _high) in counts.items()])
    return counts


def _check_file_order(fetch, sql: dict, counts: dict) -> None:
    """A file's messages are stored in its order or not at all: the places this transaction adds
    must follow those stored before without a gap (else it fails and rolls back). One message
    that fails alone (a fault of its own) so holds back the file's later ones, which its next
    reading stores after it: never a later message before an earlier one."""
    for file_id, (n, _errors, low, high) in counts.items():
        [(committed,)] = fetch(sql["file_committed"], (file_id,))
        if committed != high + 1 or committed - n != low:
            raise StoreError(f"file {file_id}: places {low}..{high} do not follow the {committed - n} stored before")


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


class _SQLiteBatch:
    """Group commits on SQLite through the driver itself, on one connection kept for the purpose.

    SQLAlchemy's per-statement work (compiling, caching, result objects) cost more than SQLite's
    own (profiled: ~55% of the engine's time under load), so the few statements of a batch are
    prepared SQL strings run with ``executemany``. ``BEGIN IMMEDIATE`` takes the write lock first,
    so the ids handed out after ``max(id)`` cannot collide with another process (a replay from
    the CLI) writing at the same time. The schema stays SQLAlchemy's (``metadata``)."""

    _INSERT_MESSAGE = (f"INSERT INTO messages (id, {', '.join(_MESSAGE_COLUMNS)}) "
                       f"VALUES ({', '.join('?' * (len(_MESSAGE_COLUMNS) + 1))})")
    _SQL: dict = {}  # built once: _sql("?")

    def __init__(self, engine: sa.Engine):
        self._proxy = engine.raw_connection()  # has the pragmas (WAL, synchronous=FULL) from the pool's connect hook
        self._connection: Any = self._proxy.driver_connection
        self.fenced: list = []  # the last batch's delivery updates left out (fencing): (message id, destination)
        if not _SQLiteBatch._SQL:
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
                    counts = _send_file_rows(connection.executemany, sql, rows, ids)
                    if counts:
                        _check_file_order(lambda q, a: connection.execute(q, a).fetchall(), sql, counts)
                self.fenced = rows.fence(lambda leases: {lease for lease in leases if connection.execute(
                    self._SQL["lease_held"], lease).fetchone() is not None})
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
