"""A raw durable MLLP server: frames, commits each message's bytes to SQLite (or PostgreSQL), then ACKs.

The ceiling for "accepted and stored" on this machine: the sink's framing and ACKs
(bench/mllp_sink.py) plus what no durable engine can skip, a group commit of the payloads to a
SQLite file in WAL mode with ``synchronous=FULL`` (fsync before the ACK), on the reactor thread,
one commit per reactor turn, as the engine commits. No parsing, no indexes, no deliveries.
How fast it goes is mostly how fast this disk syncs, which on a VM moves a lot between runs.

    python bench/mllp_durable.py PORT DATABASE_FILE
    python bench/mllp_durable.py PORT postgresql://USER@HOST/DB   # bare psycopg, the same group commit

With PostgreSQL the commit is psycopg's on the reactor thread (one round trip and the server's WAL
flush per reactor turn): the ceiling for the engine's PostgreSQL store on this machine.
"""

import sqlite3
import sys

from twisted.internet import protocol, reactor

from mllp_sink import answer, serve  # the sink's framing and ACKs (this folder is on sys.path when run as a script)

from hl7relay.mllp.framing import MLLPFramer

HEAD = b"MSH|^~\\&|DURABLE|DURABLE|||20240101000000||ACK^A01^ACK|1|P|2.5.1\rMSA|AA|"


class GroupCommit:
    """Payloads wait here for the next reactor turn; then one transaction, one fsync, the ACKs."""

    def __init__(self, path: str):
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, raw BLOB NOT NULL)")
        self.waiting: list = []  # (transport, payloads, ACK frames)
        self.scheduled = False

    def add(self, transport, payloads: list[bytes], acks: list[bytes]) -> None:
        self.waiting.append((transport, payloads, acks))
        if not self.scheduled:
            self.scheduled = True
            reactor.callLater(0, self.commit)

    def commit(self) -> None:
        self.scheduled = False
        batch, self.waiting = self.waiting, []
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany("INSERT INTO messages (raw) VALUES (?)", [(p,) for _, payloads, _ in batch for p in payloads])
        self.db.execute("COMMIT")
        for transport, _, acks in batch:
            transport.write(b"".join(acks))


class Durable(protocol.Protocol):
    def connectionMade(self):
        self.framer = MLLPFramer()

    def dataReceived(self, data):
        payloads, acks = answer(self.framer, data, HEAD)
        if payloads:
            store.add(self.transport, payloads, acks)


class PostgresGroupCommit(GroupCommit):
    def __init__(self, url: str):
        import psycopg

        self.db = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
        with self.db.transaction():
            self.db.execute("CREATE TABLE IF NOT EXISTS messages (id BIGSERIAL PRIMARY KEY, raw BYTEA NOT NULL)")
        self.waiting = []
        self.scheduled = False

    def commit(self) -> None:
        self.scheduled = False
        batch, self.waiting = self.waiting, []
        with self.db.transaction(), self.db.cursor() as cursor:
            cursor.executemany("INSERT INTO messages (raw) VALUES (%s)", [(p,) for _, payloads, _ in batch for p in payloads])
        for transport, _, acks in batch:
            transport.write(b"".join(acks))


def main():
    global store
    port, path = int(sys.argv[1]), sys.argv[2]
    store = PostgresGroupCommit(path) if path.startswith("postgresql") else GroupCommit(path)
    serve(port, Durable)


if __name__ == "__main__":
    main()
