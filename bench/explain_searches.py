"""Every search the console, the CLI and the queues run, on a big store: its plan and its time.

    python bench/explain_searches.py [--rows 10000000] [--backend sqlite|postgresql|both] [--postgres URL]

Fills a fresh store (SQLite in a temporary folder; PostgreSQL in a schema of its own, dropped
afterwards) with ``--rows`` messages as a clinic's store holds them after a few months (5
channels, 96% processed, 1% errors, a delivery each, the newest still queued, an audit log),
runs ANALYZE, then calls the store's own methods as the console and the CLI do. Each SQL
statement they send is captured and explained (EXPLAIN QUERY PLAN / EXPLAIN), and each call is
timed. A statement is:

- ``index``: every table it reads is searched through an index (or its primary key);
- ``ordered``: it reads a table in the order of an index or of its ids and stops at its LIMIT
  (newest first, no sort): a page costs what it reads until the page is full, which depends on
  how common the matches are (a filter no index answers: delivery status SENT, audit actor);
- ``FULL SCAN``: it reads a whole table (or sorts what it found).

Searches must not do a full scan (exit code 1 when one does); the status counts (``aggregate``)
read every row by nature and are reported with their time.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa  # noqa: E402

from hl7relay.store.database import Store
from hl7relay.store.schema import deliveries, messages

__all__ = ["fill", "explain_calls", "main"]

CHANNELS = (("adt", 50, ("ADT^A01", "ADT^A03", "ADT^A04", "ADT^A08"), ("emr", "lab")),
            ("siu", 20, ("SIU^S12", "SIU^S13", "SIU^S15"), ("scheduler",)),
            ("oru", 20, ("ORU^R01",), ("emr",)), ("mdm", 5, ("MDM^T02",), ("archive",)), ("dft", 5, ("DFT^P03",), ("billing",)))
SPAN_SECONDS = 90 * 86400  # the store holds about three months
QUEUED_NEWEST = 2000  # the newest messages' deliveries still wait (a destination is down)
NOW = 1_790_000_000.0


def _rows(count: int, seed: int = 1):
    """(message row, [delivery rows], [stage rows]) for message ids 1..count, in order of arrival."""
    rng = random.Random(seed)
    weights = [c[1] for c in CHANNELS]
    step = SPAN_SECONDS / count
    start = NOW - SPAN_SECONDS
    for i in range(1, count + 1):
        name, _, types, destinations = rng.choices(CHANNELS, weights)[0]
        roll = rng.random()
        status = "PROCESSED" if roll < 0.96 else "FILTERED" if roll < 0.98 else "ERROR" if roll < 0.99 else "DUPLICATE"
        patient = f"P{rng.randrange(200_000)}"
        facility = f"F{rng.randrange(20)}"
        message_type = rng.choice(types)
        at = start + i * step
        raw = (f"MSH|^~\\&|PMS|{facility}|HL7RELAY|CLINIC|20260101||{message_type}|C{i}|P|2.5\r"
               f"PID|1||{patient}^^^PMS||DOE^JANE||19800101|F\r").encode()
        replay_of = rng.randrange(1, i) if i > 1 and rng.random() < 0.0001 else None
        message = (i, name, at, "10.0.0.5:40000", raw, "", "PMS", facility, message_type, f"C{i}", patient, status,
                   "validation failed: PID-7 is not a date" if status == "ERROR" else "",
                   "AE" if status == "ERROR" else "AA", f"PMS|C{i}" if name == "adt" else None,
                   replay_of, "fixed the mapping" if replay_of else None, "ana" if replay_of else None)
        deliveries = []
        for destination in destinations:
            if status != "PROCESSED":
                d_status = "FILTERED"
            elif i > count - QUEUED_NEWEST:
                d_status = "QUEUED"
            else:
                d_status = "ERROR" if rng.random() < 0.005 else "SENT"
            error = "AE from emr: unknown patient" if d_status == "ERROR" else ""
            deliveries.append((i, destination, d_status, 1 if d_status != "FILTERED" else 0, "AA" if d_status == "SENT" else "",
                               error, at if d_status == "QUEUED" else None, at + 0.05, None))
        # the ACK sent (every message), and what a destination got when a transformer changed it
        stages = [(i, "ack", b"MSH|^~\\&|HL7RELAY|CLINIC|PMS|F|20260101||ACK|A%d|P|2.5\rMSA|AA|C%d\r" % (i, i))]
        if deliveries and rng.random() < 0.1:
            stages.append((i, "destination:" + destinations[0], raw))
        yield message, deliveries, stages


_MESSAGE_COLUMNS = ("id", "channel", "received_at", "peer", "raw", "charset", "sending_application", "sending_facility",
                    "message_type", "control_id", "patient_id", "status", "error", "ack_code", "duplicate_key",
                    "replay_of", "replay_reason", "replay_operator")
_DELIVERY_COLUMNS = ("message_id", "destination", "status", "attempts", "last_ack", "last_error", "next_attempt_at",
                     "updated_at", "order_key")
_AUDIT_COLUMNS = ("at", "actor", "role", "source", "action", "target", "reason", "result", "detail")


def _audit_rows(count: int):
    rng = random.Random(2)
    actions = ("message.show", "message.replay", "destination.pause", "destination.resume", "user.login", "channel.reload")
    for i in range(count):
        yield (NOW - SPAN_SECONDS + i * SPAN_SECONDS / max(count, 1), f"user:{rng.choice(('ana', 'bo', 'cy', 'di'))}",
               "operator", "127.0.0.1", rng.choice(actions), f"message {rng.randrange(1, 10**6)}", "ticket 42", "ok", "")


def fill(store: Store, count: int, progress=None) -> None:
    """``count`` messages (their deliveries and stages, and an audit log of count/1000 entries) into a
    migrated, empty store: its secondary indexes dropped while the rows go in and built again
    after (as a restore would), then ANALYZE."""
    dialect = store.engine.dialect.name
    with store.engine.begin() as connection:
        if dialect == "sqlite":
            indexes = [sql for (sql,) in connection.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
                "AND tbl_name IN ('messages', 'deliveries', 'message_stages', 'audit_log')")]
            names = [re.search(r"INDEX (\w+)", sql).group(1) for sql in indexes]
        else:
            found = list(connection.exec_driver_sql(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() "
                "AND tablename IN ('messages', 'deliveries', 'message_stages', 'audit_log') AND indexname NOT LIKE '%%pkey'"))
            names, indexes = [n for n, _ in found], [d for _, d in found]
        for name in names:
            connection.exec_driver_sql(f"DROP INDEX {name}")
    chunk = 50_000
    rows = _rows(count)
    done = 0
    while done < count:
        messages, deliveries, stages = [], [], []
        for message, ds, ss in (next(rows) for _ in range(min(chunk, count - done))):
            messages.append(message)
            deliveries += ds
            stages += ss
        _insert(store, "messages", _MESSAGE_COLUMNS, messages)
        _insert(store, "deliveries", _DELIVERY_COLUMNS, deliveries)
        _insert(store, "message_stages", ("message_id", "stage", "content"), stages)
        done += len(messages)
        if progress:
            progress(done)
    _insert(store, "audit_log", _AUDIT_COLUMNS, list(_audit_rows(max(count // 1000, 100))))
    with store.engine.begin() as connection:
        for sql in indexes:
            connection.exec_driver_sql(sql)
        if dialect == "postgresql":
            connection.exec_driver_sql("SELECT setval(pg_get_serial_sequence('messages', 'id'), %s)", (count,))
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        for table in ("messages", "deliveries", "message_stages", "audit_log"):  # not the whole database's
            connection.exec_driver_sql(f"ANALYZE {table}")


def _insert(store: Store, table: str, columns: tuple, rows: list) -> None:
    with store.engine.begin() as connection:
        driver = connection.connection.driver_connection
        if store.engine.dialect.name == "sqlite":
            driver.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", rows)
        else:
            with driver.cursor() as cursor, cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)


def calls(count: int) -> list[tuple[str, str, object]]:
    """(name, kind, store -> result): what the console, the CLI and the queues ask the store."""
    day = 86400
    newest = count
    return [
        ("search: newest, no filter", "search", lambda s: s.search(limit=50)),
        ("search: channel", "search", lambda s: s.search(channel="adt", limit=50)),
        ("search: channel, next page", "search", lambda s: s.search(channel="adt", before_id=newest // 2, limit=50)),
        ("search: status ERROR", "search", lambda s: s.search(status="ERROR", limit=50)),
        ("search: control id", "search", lambda s: s.search(control_id=f"C{count // 3}", limit=50)),
        ("search: patient id", "search", lambda s: s.search(patient_id="P12345", limit=50)),
        ("search: facility, last day", "search", lambda s: s.search(facility="F7", since=NOW - day, limit=50)),
        ("search: type ADT^A03", "search", lambda s: s.search(message_type="ADT^A03", limit=50)),
        ("search: type SIU (any trigger)", "search", lambda s: s.search(message_type="SIU", limit=50)),
        ("search: channel, a day a month ago", "search",
         lambda s: s.search(channel="oru", since=NOW - 31 * day, until=NOW - 30 * day, limit=50)),
        ("search: channel + status ERROR", "search", lambda s: s.search(channel="siu", status="ERROR", limit=50)),
        ("search: delivery status ERROR", "search", lambda s: s.search(delivery_status="ERROR", limit=50)),
        ("search: text in a channel", "search", lambda s: s.search(channel="adt", text=b"p12345^", limit=20)),
        ("message: by id", "search", lambda s: s.get_message(count // 2)),
        ("message: its replays", "search", lambda s: s.replays_of(count // 2)),
        ("dead letters: all", "search", lambda s: s.dead_letters()),
        ("dead letters: one channel", "search", lambda s: s.dead_letters(channel="adt")),
        ("dead letters: one group's ids", "search",
         lambda s: s.dead_letter_ids("adt", "emr", "AE from emr: unknown patient")),
        ("duplicates: the original", "search", lambda s: s.find_original("adt", f"PMS|C{count - 10}", NOW - day)),
        ("queue: its backlog", "search", lambda s: s.queued_deliveries("adt", "emr")),
        ("queue: its depth", "search", lambda s: s.queue_depth("adt", "emr")),
        ("audit: newest", "search", lambda s: s.audit_entries(limit=100)),
        ("audit: one actor", "search", lambda s: s.audit_entries(actor="user:ana", limit=100)),
        ("audit: actions message.*", "search", lambda s: s.audit_entries(action="message.", limit=100)),
        ("status: last 24 h, queues, dead letters", "search", lambda s: s.channel_status(NOW)),
        ("status: every stored message", "aggregate", lambda s: s.channel_status(NOW, None)),
    ]


# tables of a row per destination, control, user or token: read whole, by design
SMALL_TABLES = frozenset({"destination_state", "control_state", "users", "api_tokens", "schema_version"})
PARTIAL_INDEXES = frozenset(index.name for table in (messages, deliveries) for index in table.indexes
                            if index.dialect_options["sqlite"].get("where") is not None)
_SQLITE_SCAN = re.compile(r"\bSCAN (\w+)(?: AS \w+)?(.*)")


def classify(dialect: str, statement: str, plan: list[str]) -> str:
    """index, ordered or FULL SCAN (see the module's doc)."""
    text = "\n".join(plan)
    if dialect != "sqlite":  # PostgreSQL: a sequential scan of a table that grows
        return "FULL SCAN" if any(t not in SMALL_TABLES for t in re.findall(r"Seq Scan on (\w+)", text)) else "index"
    limited = re.search(r"\bLIMIT\b", statement, re.IGNORECASE) is not None
    ordered = re.search(r"\bORDER BY\b", statement, re.IGNORECASE) is not None
    big_scans, partial_scans = [], []
    for match in filter(None, (_SQLITE_SCAN.search(line) for line in plan)):
        index = re.search(r"USING (?:COVERING )?INDEX (\w+)", match.group(2) or "")
        if index is not None and index.group(1) in PARTIAL_INDEXES:
            # a partial index holds only the rows it keeps (QUEUED, ERROR, replays): what is then
            # grouped or sorted is bounded by those, not by the store
            partial_scans.append(match)
        elif match.group(1) not in SMALL_TABLES:
            big_scans.append(match)
    if "TEMP B-TREE FOR ORDER BY" in text and limited and not partial_scans:
        return "FULL SCAN"  # every match is found, then sorted
    if not big_scans:
        return "index"
    return "ordered" if limited and ordered and "TEMP B-TREE" not in text else "FULL SCAN"


def explain_calls(store: Store, count: int, only=None) -> list[dict]:
    """Each call of :func:`calls`: its time, and each statement it sent with its plan and class."""
    dialect = store.engine.dialect.name
    statements: list = []

    def capture(conn, cursor, statement, parameters, context, many):
        if not statement.lstrip().upper().startswith(("EXPLAIN", "PRAGMA", "SELECT 1")):
            statements.append((statement, parameters))

    sa.event.listen(store.engine, "before_cursor_execute", capture)
    results = []
    try:
        for name, kind, call in calls(count):
            if only is not None and not re.search(only, name):
                continue
            call(store)  # warm: the first call of a kind reads pages from disk
            statements.clear()
            started = time.perf_counter()
            call(store)
            elapsed = time.perf_counter() - started
            explained = []
            for statement, parameters in list(statements):
                with store.engine.connect() as connection:
                    if dialect == "sqlite":
                        plan = [row[-1] for row in connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)]
                    else:
                        plan = [row[0] for row in connection.exec_driver_sql("EXPLAIN " + statement, parameters)]
                explained.append({"sql": statement, "plan": plan, "class": classify(dialect, statement, plan)})
            results.append({"name": name, "kind": kind, "ms": elapsed * 1000, "statements": explained})
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", capture)
    return results


def _verdict(result: dict) -> str:
    classes = {s["class"] for s in result["statements"]}
    return "FULL SCAN" if "FULL SCAN" in classes else "ordered" if "ordered" in classes else "index"


def report(backend: str, count: int, results: list[dict], verbose: bool) -> int:
    """Print the table; the number of searches that read a whole table."""
    print(f"\n{backend}, {count:,} messages")
    print(f"{'call':40} {'kind':9} {'plan':10} {'ms':>9}  indexes")
    bad = 0
    for r in results:
        verdict = _verdict(r)
        used = sorted({m for s in r["statements"] for line in s["plan"]
                       for m in re.findall(r"(?:INDEX|Index Scan using|Index Scan Backward using|Index Only Scan using"
                                          r"|Index Only Scan Backward using|Bitmap Index Scan on) (\w+)", line)})
        print(f"{r['name']:40} {r['kind']:9} {verdict:10} {r['ms']:9.1f}  {', '.join(used) or '(primary keys)'}")
        if r["kind"] == "search" and verdict == "FULL SCAN":
            bad += 1
        if verbose or (r["kind"] == "search" and verdict == "FULL SCAN"):
            for s in r["statements"]:
                print("    " + " ".join(s["sql"].split())[:300])
                for line in s["plan"]:
                    print("      " + line)
    return bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000, help="messages in the store")
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--postgres", default=os.environ.get("HL7RELAY_TEST_POSTGRES_URL",
                                                            "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--only", help="only the calls whose name matches this regular expression")
    parser.add_argument("--verbose", action="store_true", help="every statement and its plan")
    args = parser.parse_args(argv)
    if args.rows < 100:
        parser.error("--rows must be at least 100")
    progress = (lambda done: print(f"  {done:,} rows in", file=sys.stderr, flush=True)) if args.rows >= 1_000_000 else None

    def measure(label: str, url: str) -> int:
        store = Store(url)
        try:
            store.migrate()
            started = time.perf_counter()
            fill(store, args.rows, progress)
            print(f"{label}: filled in {time.perf_counter() - started:.0f} s", file=sys.stderr)
            return report(label, args.rows, explain_calls(store, args.rows, args.only), args.verbose)
        finally:
            store.close()

    bad = 0
    if args.backend in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as folder:
            bad += measure("SQLite", f"sqlite:///{folder}/explain.db")
    if args.backend in ("postgresql", "both"):
        schema = f"explain_{uuid.uuid4().hex[:8]}"
        admin = sa.create_engine(args.postgres)
        with admin.begin() as connection:
            connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
        try:
            bad += measure("PostgreSQL", args.postgres + ("&" if "?" in args.postgres else "?") + f"options=-csearch_path%3D{schema}")
        finally:
            with admin.begin() as connection:
                connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
            admin.dispose()
    if bad:
        print(f"\n{bad} search(es) read a whole table", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
