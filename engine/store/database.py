"""The message store: every message is committed here before it is acknowledged.

SQLAlchemy 2 (Core): SQLite by default (one file under the data directory, WAL journal,
``synchronous=FULL`` so a commit survives a power cut), PostgreSQL by URL
(``postgresql+psycopg://user@host/db``). The schema is created and migrated on start by numbered
migrations. Calls here are blocking; :mod:`hl7relay.store.writer` runs them on one writer thread
and groups concurrent messages into one commit.
"""

from __future__ import annotations

import os
from pathlib import Path

from typing import Any

import sqlalchemy as sa

from hl7relay.store.accounts import Accounts
from hl7relay.store.audit import AuditLog
from hl7relay.store.batch import (
    _POSTGRES_SQL, _check_file_order, _pipeline, _Rows, _send_file_rows, _send_updates, _SQLiteBatch, psycopg_errors,
)
from hl7relay.store.deliveries import DeliveryQueries, XrefQueries
from hl7relay.store.cluster import ClusterQueries
from hl7relay.store.files import FileQueries, PromotionQueries, SnapshotQueries
from hl7relay.store.maintenance import Maintenance
from hl7relay.store.messages import MessageQueries
from hl7relay.store.secrets import SecretRows
from hl7relay.store.records import (  # the records and updates, importable from here as before
    AuditUpdate, ControlUpdate, DeliveryRecord, DeliveryUpdate, DestinationStateUpdate, MessageRecord, MessageUpdate,
    MatchHoldUpdate, SourceStateUpdate, StageUpdate, StoreError, TokenUseUpdate, XrefUpdate, as_update, delivery_content, storable,
    FileSeenUpdate, FileUpdate,
)
from hl7relay.store.schema import AUDIT_FIELDS, MAX_ROW_ID, MIGRATIONS, schema_version


__all__ = ["Store", "MessageRecord", "DeliveryRecord", "DeliveryUpdate", "MessageUpdate", "StageUpdate", "AuditUpdate",
           "ControlUpdate", "DestinationStateUpdate", "TokenUseUpdate", "XrefUpdate", "MatchHoldUpdate", "SourceStateUpdate",
           "FileSeenUpdate", "FileUpdate", "as_update", "StoreError",
           "MIGRATIONS",
           "open_store", "delivery_content", "storable",
           "sqlite_path", "readable_by_others", "AUDIT_FIELDS", "MAX_ROW_ID"]


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


PING_AFTER_IDLE = 1.0  # seconds a pooled connection may sit unused before it is probed at checkout


def _ping_when_idle(engine) -> None:
    """SQLAlchemy's pre-ping, only for a connection that sat idle in the pool: under load every
    commit would otherwise pay a round trip to the server first (measured: a third of the store
    thread's database calls). A connection that broke while in use (the server restarted under
    load) fails its statement, the pool drops every connection of that age, and the next
    checkout connects anew; the messages of that one commit are answered AR, never AA."""
    import time

    @sa.event.listens_for(engine, "checkin")
    def checked_in(dbapi_connection, record):
        record.info["used_at"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def checked_out(dbapi_connection, record, proxy):
        if time.monotonic() - record.info.get("used_at", 0.0) <= PING_AFTER_IDLE:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except Exception:  # noqa: BLE001 - any driver error: this connection is gone
            alive = False
        if not alive:
            raise sa.exc.DisconnectionError("the pooled connection did not answer a ping")


class Store(MessageQueries, DeliveryQueries, XrefQueries, FileQueries, SnapshotQueries, PromotionQueries, ClusterQueries,
            Accounts, AuditLog, Maintenance, SecretRows):
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
        try:
            self.engine = sa.create_engine(url, future=True)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ValueError) as exc:
            raise StoreError(f"not a store URL ({exc}); expected sqlite:///PATH or postgresql+psycopg://USER@HOST/DB") from None
        except ImportError as exc:
            raise StoreError(f"the driver for {url.split(':', 1)[0]} is not installed ({exc}); "
                             "for PostgreSQL: pip install 'hl7relay[postgresql]'") from None
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        else:  # a file needs no liveness probe; a server's connection does, when it has sat idle
            _ping_when_idle(self.engine)
        self._sqlite_batch: _SQLiteBatch | None = None
        # delivery updates left out because the lease they were written under had moved on (fencing)
        self.fenced_updates = 0
        self.last_fenced: list = []  # those of the last commit: (message id, destination)

    @property
    def display_url(self) -> str:
        """The URL without its password, for startup lines and logs."""
        return self.engine.url.render_as_string(hide_password=True)

    def migrate(self) -> int:
        """Create or upgrade the schema; returns the version now in place."""
        with self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # nodes of a cluster starting together on a new database migrate one at a time (the
                # others wait, then find it done); the lock ends with the transaction
                connection.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('hl7relay-migrate'), "
                                           "hashtext(coalesce(current_schema(), current_setting('search_path'))))")
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
        batch = self._batch()
        ids = batch.write(records, updates)
        self.last_fenced = batch.fenced
        self.fenced_updates += len(batch.fenced)
        return ids

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
            batch = self._batch()
            ids = batch.commit(records, updates)
            self.last_fenced = batch.fenced
            self.fenced_updates += len(batch.fenced)
            return ids
        try:
            rows = _Rows(records, updates)
            with self.engine.begin() as connection:
                # psycopg itself, inside SQLAlchemy's transaction: executemany sends a batch in one
                # pipeline (one round trip), where SQLAlchemy's insertmanyvalues rendered a statement
                # per batch and wrapped every row (438 -> see bench/bench_store.py)
                driver: Any = connection.connection.driver_connection
                cursor = driver.cursor()
                try:
                    sql = _POSTGRES_SQL
                    ids = []
                    if rows.messages:  # the ids first (one round trip), so the rest needs no answer
                        cursor.execute(sql["next_ids"], (len(rows.messages),))
                        ids = [row[0] for row in cursor.fetchall()]
                    stage_rows, delivery_rows = rows.children(ids)
                    self.last_fenced = rows.fence(lambda leases: set(leases) & {tuple(row) for row in cursor.execute(
                        sql["leases_live"], ([name for name, _, _ in leases],)).fetchall()})
                    with _pipeline(driver):  # everything else in one round trip
                        if ids:
                            cursor.executemany(sql["message_with_id"], [(i, *row) for i, row in zip(ids, rows.messages)])
                        if stage_rows:
                            cursor.executemany(sql["stage"], stage_rows)
                        if delivery_rows:
                            cursor.executemany(sql["delivery"], delivery_rows)
                        counts = _send_file_rows(cursor.executemany, sql, rows, ids)
                        _send_updates(cursor.execute, cursor.executemany, sql, rows)
                    if counts:
                        _check_file_order(lambda q, a: cursor.execute(q, a).fetchall(), sql, counts)
                finally:
                    cursor.close()
                self.fenced_updates += len(self.last_fenced)
                return ids
        except psycopg_errors() as exc:
            raise StoreError(f"store commit failed: {exc.__class__.__name__}: {exc}") from exc
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"store commit failed: {exc.__class__.__name__}: {getattr(exc, 'orig', exc)}") from exc

    def close(self) -> None:
        if self._sqlite_batch is not None:
            self._sqlite_batch.close()
            self._sqlite_batch = None
        self.engine.dispose()


def open_store(url: str) -> Store:
    store = Store(url)
    store.migrate()
    return store
