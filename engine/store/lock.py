"""One engine per store: a second ``hl7relay run`` on the same store would deliver the same queued
messages twice.

SQLite: an exclusive ``flock`` on ``<database>.lock`` beside the database file, held by an open
file that the forwarder process inherits (fd 4): the lock is free only once the engine *and* its
forwarder are gone, so a restarted engine waits for a forwarder that outlived a killed engine.
The file says who holds it (pid, host, start time) for the error message.

PostgreSQL: a session advisory lock per schema, held by a connection of its own for the engine's
life. The forwarder takes a shared lock of a second key on its own connection; a new engine waits
until it can take that key exclusively (no forwarder of an older engine left), then lets it go.
In a cluster (several engines on one database, each with its own ``node_id``) the lock is the
node's: a second engine with the same node id is refused, engines with other ids share the store.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

import sqlalchemy as sa

from hl7relay.store.database import StoreError, sqlite_path

__all__ = ["StoreLock", "StoreLocked", "forwarder_lock"]

LOCK_FD = 4  # where the forwarder process finds the inherited lock (SQLite)
_ENGINE_KEY = "hl7relay-engine"
# a lock per schema: the key's hash and the schema's (its search_path when the schema is not made yet)
_KEYS = "hashtext(:key), hashtext(coalesce(current_schema(), current_setting('search_path')))"
_TRY_LOCK = sa.text(f"SELECT pg_try_advisory_lock({_KEYS})")
_UNLOCK = sa.text(f"SELECT pg_advisory_unlock({_KEYS})")
_LOCK_SHARED = sa.text(f"SELECT pg_advisory_lock_shared({_KEYS})")
_TRY_LOCK_SHARED = sa.text(f"SELECT pg_try_advisory_lock_shared({_KEYS})")
_FORWARDER_KEY = "hl7relay-forwarder"


class StoreLocked(StoreError):
    """Another engine (or its forwarder) holds the store."""


class StoreLock:
    def __init__(self, url: str, node_id: str | None = None):
        self.url = url
        # one engine per store, or in a cluster one per node id
        self.key = _ENGINE_KEY if node_id is None else f"{_ENGINE_KEY}:{node_id}"
        self.path = sqlite_path(url)
        self._fd: int | None = None
        self._connection = None
        self._engine: sa.Engine | None = None

    @property
    def inheritable_fd(self) -> int | None:
        """The locked file's descriptor, for the forwarder to inherit (SQLite); None otherwise."""
        return self._fd

    def acquire(self, wait: float = 0.0, sleep=time.sleep, on_wait=None) -> None:
        """Take the lock, waiting up to ``wait`` seconds for a holder that is going away; raises
        :class:`StoreLocked` saying who holds it. ``on_wait(holder)`` is called once if it waits."""
        deadline = time.monotonic() + wait
        told = False
        while True:
            holder = self._try()
            if holder is None:
                return
            if time.monotonic() >= deadline:
                raise StoreLocked(f"another hl7relay engine is using the store {self._where()} ({holder}); stop it "
                                  "first, or give this one a store of its own (--data-dir or --store)")
            if on_wait is not None and not told:
                on_wait(holder)
                told = True
            sleep(0.1)

    def _where(self) -> str:
        return str(self.path) if self.path is not None else sa.engine.make_url(self.url).render_as_string(hide_password=True)

    def _try(self) -> str | None:
        """None when taken; else who holds it."""
        if self.path is not None:
            return self._try_file()
        return self._try_postgres()

    def _try_file(self) -> str | None:
        lock_path = Path(str(self.path) + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                info = json.loads(holder) if holder else {}
                text = f"pid {info.get('pid', '?')} on {info.get('host', '?')}, lock {lock_path}"
            except (OSError, ValueError):
                text = f"lock {lock_path}"
            os.close(fd)
            return text
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)
        os.set_inheritable(fd, True)
        self._fd = fd
        return None

    def _try_postgres(self) -> str | None:
        if self._engine is None:
            self._engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
        connection = self._engine.connect()
        try:
            if self.key != _ENGINE_KEY:
                # a cluster's node shares the engine's key with the other nodes: an engine that is
                # not in the cluster (it would deliver every partition) holds it alone, and is refused
                shared = connection.execute(_TRY_LOCK_SHARED, {"key": _ENGINE_KEY}).scalar()
                if not shared:
                    connection.close()
                    return "an hl7relay engine that is not in the cluster (no cluster: in its settings)"
            taken = connection.execute(_TRY_LOCK, {"key": self.key}).scalar()
            if taken:
                # a forwarder of an engine that died may still be sending: wait for it to go
                free = connection.execute(_TRY_LOCK, {"key": _FORWARDER_KEY}).scalar()
                if free:
                    connection.execute(_UNLOCK, {"key": _FORWARDER_KEY})
                    connection.commit()
                    self._connection = connection
                    return None
                connection.execute(_UNLOCK, {"key": self.key})
                connection.commit()
                connection.close()
                return "the forwarder process of an engine that stopped is still running"
            try:
                holder = connection.execute(sa.text(
                    "SELECT a.pid, a.client_addr FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.classid = (hashtext(:key)::bigint & 4294967295)::oid "
                    "AND l.granted LIMIT 1"), {"key": self.key}).first()
            except sa.exc.SQLAlchemyError:  # who it is only adds to the message
                holder = None
            connection.close()
            if holder is None:
                return "an advisory lock held by another session"
            return f"database session {holder[0]} from {holder[1] or 'a local socket'}"
        except BaseException:
            connection.close()
            raise

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # the forwarder's inherited copy keeps it until that process ends too
        if self._connection is not None:
            connection, self._connection = self._connection, None
            try:
                connection.close()  # the session's advisory lock goes with it
            except Exception:  # noqa: BLE001 - the database is gone: so is the lock
                pass
        if self._engine is not None:
            self._engine.dispose()
            self._engine: sa.Engine | None = None


def forwarder_lock(url: str):
    """In the forwarder process (PostgreSQL): the shared lock that tells a new engine an old
    forwarder is still running. Returns the connection that holds it (None for SQLite, where the
    inherited file lock does this)."""
    if sqlite_path(url) is not None:
        return None
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    connection = engine.connect()
    connection.execute(_LOCK_SHARED, {"key": _FORWARDER_KEY})
    connection.commit()
    return connection
