"""Database verification: is the store sound, and does what it holds agree with the channels?

:func:`verify` runs each check and says what it found, and for the problems it can fix safely,
what :func:`repair` would do. ``hl7relay verify`` prints them (exit code for monitoring);
``--repair`` applies the safe fixes, each listed first and audited.

The checks read what grows with a store (deliveries, stages) once, or only the rows an index
keeps small (queued deliveries, keyed messages, the window's messages), so they run on a store of
millions of messages in seconds; the backend's own integrity check (SQLite's quick_check, or
integrity_check with ``full``) reads every page.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sqlalchemy as sa

from hl7relay.outcomes import DeliveryStatus, MessageStatus
from hl7relay.store.database import MIGRATIONS, Store
from hl7relay.outcomes import FileState
from hl7relay.store.schema import deliveries, file_ledger, file_messages, messages, metadata, stages
from hl7relay.store.deliveries import waiting_by_destination


_QUEUED = DeliveryStatus.QUEUED.value
__all__ = ["Check", "verify", "repair", "OK", "WARNING", "PROBLEM", "SKIPPED"]

OK, WARNING, PROBLEM, SKIPPED = "ok", "warning", "problem", "skipped"
OVERDUE_SECONDS = 3600  # a queued delivery this late past its next attempt: its queue is not running


@dataclass(slots=True)
class Check:
    name: str
    status: str  # ok, warning, problem, skipped
    detail: str
    count: int = 0
    sample: list = field(default_factory=list)  # a few ids (messages or deliveries) to look at
    fix: str = ""  # what repair() does about it ("" when nothing safe can be done)
    key: str = ""  # which repair applies

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "detail": self.detail, "count": self.count,
                "sample": self.sample, "fix": self.fix or None}


def verify(store: Store, channels: list | None, now: float, full: bool = False, window: float = 86400.0) -> list[Check]:
    """Every check, in order. ``channels``: the configured channels (None when they could not
    be loaded: the checks that compare with them are skipped); ``window``: how far back the
    per-message checks (duplicates, stages) look."""
    checks = [_integrity(store, full), _schema(store), *_orphans(store)]
    if channels is None:
        for name in ("queued for undeclared destinations", "duplicates within the window", "stages the channels keep"):
            checks.append(Check(name, SKIPPED, "the channel files have problems (hl7relay lint says which)"))
    else:
        checks.append(_undeclared(store, channels, now))
        checks.append(_duplicates(store, channels, now))
        checks.append(_stages(store, channels, now, window))
    checks.append(_overdue(store, now))
    checks.append(_files(store, now))
    return checks


# -- the backend ------------------------------------------------------------------------------------
def _integrity(store: Store, full: bool) -> Check:
    name = "backend integrity"
    problems, count = [], 0
    with store.engine.connect() as connection:
        if store.engine.dialect.name == "sqlite":
            pragma = "integrity_check" if full else "quick_check"
            found = [row[0] for row in connection.exec_driver_sql(f"PRAGMA {pragma}")]
            if found != ["ok"]:
                problems.append(f"SQLite {pragma}: " + "; ".join(found[:10]))
                count += len(found)
            what = f"SQLite {pragma}: ok"
        else:
            invalid = [row[0] for row in connection.exec_driver_sql(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = current_schema() AND NOT (i.indisvalid AND i.indisready)")]
            if invalid:
                problems.append(f"invalid indexes (a failed CREATE INDEX CONCURRENTLY; REINDEX them): {', '.join(invalid)}")
                count += len(invalid)
            what = "PostgreSQL catalog: every index valid"
        inspector = sa.inspect(connection)
        tables = set(inspector.get_table_names())
        missing_tables = sorted(set(metadata.tables) - tables)
        missing = sorted(index.name for table in metadata.tables.values() if table.name in tables
                         for index in table.indexes
                         if index.name not in {i["name"] for i in inspector.get_indexes(table.name)})
    if missing_tables:
        problems.append(f"missing tables: {', '.join(missing_tables)}")
    if missing:
        problems.append(f"missing indexes (searches that need them read whole tables): {', '.join(missing)}")
    count += len(missing) + len(missing_tables)
    if not problems:
        return Check(name, OK, f"{what}; every table and index present")
    return Check(name, PROBLEM, "; ".join(problems), count,
                 fix=f"create the missing index{'es' * (len(missing) != 1)}" if missing and not missing_tables
                 and len(problems) == 1 else "", key="indexes" if missing and len(problems) == 1 else "")


def _schema(store: Store) -> Check:
    name = "schema version"
    latest = MIGRATIONS[-1][0]
    version = store.schema_version()
    if version == latest:
        return Check(name, OK, f"{version}, the latest")
    if version > latest:
        return Check(name, PROBLEM, f"{version}: written by a newer hl7relay (this one knows up to {latest}); "
                                    "run that version, or restore a backup made before it")
    pending = [f"{number}: {what}" for number, what, _ in MIGRATIONS if number > version]
    return Check(name, WARNING, f"{version}, {latest} is the latest; `hl7relay run` brings it up to date when it starts",
                 len(pending), fix=f"apply migration{'s' * (len(pending) != 1)} " + "; ".join(pending), key="migrate")


# -- rows that belong to nothing ----------------------------------------------------------------------
def _orphans(store: Store) -> list[Check]:
    out = []
    with store.engine.connect() as connection:
        for table, label, one in ((deliveries, "deliveries", "delivery"), (stages, "stages", "stage"),
                                  (file_messages, "file places", "file place")):
            orphan = ~sa.exists().where(messages.c.id == table.c.message_id)
            count = connection.execute(sa.select(sa.func.count()).select_from(table).where(orphan)).scalar()
            name = f"{label} of missing messages"
            if not count:
                out.append(Check(name, OK, f"every {one} row belongs to a stored message"))
                continue
            sample = sorted({r[0] for r in connection.execute(sa.select(table.c.message_id).where(orphan).limit(10))})
            out.append(Check(name, PROBLEM, f"{count} {one} row{'s' * (count != 1)} of messages no longer stored "
                                            f"(message ids {', '.join(map(str, sample))}): nothing can use them",
                             count, sample, fix=f"delete the {count} {one} row{'s' * (count != 1)}",
                             key=f"orphan_{label.replace(' ', '_')}"))
    return out


# -- against the channels ------------------------------------------------------------------------------
def _declared(channels) -> set:
    return {(c.name, d.name) for c in channels for d in c.destinations}


def _undeclared(store: Store, channels, now: float) -> Check:
    name = "queued for undeclared destinations"
    declared = _declared(channels)
    with store.engine.connect() as connection:
        stray = [(c, d, n, first) for c, d, n, first in waiting_by_destination(connection, _QUEUED, deliveries.c.message_id)
                 if (c, d) not in declared]
    if not stray:
        return Check(name, OK, "every queued delivery has its channel's destination to go to")
    total = sum(n for _, _, n, _ in stray)
    where = ", ".join(f"{c}/{d}: {n}" for c, d, n, _ in stray)
    return Check(name, PROBLEM, f"{total} queued deliver{'ies' if total != 1 else 'y'} for destinations no channel "
                                f"declares any more ({where}): no queue will ever send them", total,
                 [first for _, _, _, first in stray][:10],
                 fix="move them to ERROR (dead letters: listed, replayable to another destination with hl7relay replay)",
                 key="undeclared")


def _duplicates(store: Store, channels, now: float) -> Check:
    name = "duplicates within the window"
    keyed = [c for c in channels if c.duplicates is not None]
    if not keyed:
        return Check(name, OK, "no channel detects duplicates")
    found, sample = [], []
    with store.engine.connect() as connection:
        for channel in keyed:
            key = messages.c.duplicate_key
            rows = list(connection.execute(
                sa.select(key, sa.func.count(), sa.func.max(messages.c.id))
                .where(messages.c.channel == channel.name, key.isnot(None), messages.c.status != MessageStatus.DUPLICATE.value,
                       messages.c.received_at >= now - channel.duplicates.window)
                .group_by(key).having(sa.func.count() > 1).limit(1000)))
            if rows:
                found.append(f"{channel.name}: {len(rows)}{'+' if len(rows) == 1000 else ''}")
                sample += [row[2] for row in rows[:5]]
    if not found:
        return Check(name, OK, f"no key stored twice within its window ({', '.join(c.name for c in keyed)})")
    return Check(name, WARNING, "keys stored more than once, not as DUPLICATE, within the channel's window "
                                f"({'; '.join(found)}): sent again while detection was off or the store failing; "
                                "the destinations may have them twice", len(sample), sample[:10])


def _stages(store: Store, channels, now: float, window: float) -> Check:
    name = "stages the channels keep"
    missing, sample = [], []
    with store.engine.connect() as connection:
        for channel in channels:
            wanted = []
            if "acks" in channel.stages:  # every answered message keeps the ACK it got
                wanted.append(("ack", messages.c.ack_code != ""))
            if "transformed" in channel.stages and channel.steps:
                # a replay is stored as received and processed again when its deliveries are built:
                # it has no transformed stage of its own
                wanted.append(("transformed", sa.and_(messages.c.status == MessageStatus.PROCESSED.value, messages.c.replay_of.is_(None))))
            for stage, condition in wanted:
                kept = sa.exists().where(stages.c.message_id == messages.c.id, stages.c.stage == stage)
                rows = [r[0] for r in connection.execute(
                    sa.select(messages.c.id).where(messages.c.channel == channel.name, messages.c.received_at >= now - window,
                                                   condition, ~kept).order_by(messages.c.id.desc()).limit(1000))]
                if rows:
                    missing.append(f"{channel.name}: {len(rows)}{'+' if len(rows) == 1000 else ''} without '{stage}'")
                    sample += rows[:5]
    if not missing:
        return Check(name, OK, f"the last {window / 3600:g} h's messages have the stages their channels keep")
    return Check(name, WARNING, f"messages of the last {window / 3600:g} h without a stage their channel keeps "
                                f"({'; '.join(missing)}): kept before the channel's storage changed, or written "
                                "outside the engine", len(sample), sample[:10])


def _overdue(store: Store, now: float) -> Check:
    name = "overdue deliveries"
    with store.engine.connect() as connection:
        rows = waiting_by_destination(connection, _QUEUED, deliveries.c.next_attempt_at,
                                      deliveries.c.next_attempt_at < now - OVERDUE_SECONDS)
    if not rows:
        return Check(name, OK, "no queued delivery is more than an hour past its next attempt")
    total = sum(r[2] for r in rows)
    where = ", ".join(f"{c}/{d}: {n}, the oldest {(now - t) / 3600:.1f} h late" for c, d, n, t in rows)
    return Check(name, WARNING, f"{total} queued deliver{'ies' if total != 1 else 'y'} more than an hour past their "
                                f"next attempt ({where}): the engine is stopped, the destination paused, or its queue "
                                "stuck (hl7relay status; hl7relay destination retry)", total)


STUCK_FILE_SECONDS = 3600  # a file still being read after this long: its source stopped, or it keeps failing


def _files(store: Store, now: float) -> Check:
    """The ledger agrees with itself: a file's count of stored messages is the places it holds
    (fewer places only once prune took its messages), and no file stays half read."""
    name = "file ledger"
    places = (sa.select(sa.func.count()).where(file_messages.c.file_id == file_ledger.c.id)
              .correlate(file_ledger).scalar_subquery())
    with store.engine.connect() as connection:
        miscounted = [r[0] for r in connection.execute(
            sa.select(file_ledger.c.id).where(places > file_ledger.c.committed).limit(10))]
        stuck = list(connection.execute(
            sa.select(file_ledger.c.id, file_ledger.c.channel, file_ledger.c.name, file_ledger.c.first_seen)
            .where(file_ledger.c.state == FileState.READING.value,
                   file_ledger.c.first_seen < now - STUCK_FILE_SECONDS).order_by(file_ledger.c.id).limit(10)))
    if miscounted:
        return Check(name, PROBLEM, f"files whose count of stored messages is below the places recorded for them "
                                    f"(file ids {', '.join(map(str, miscounted))}): written outside the engine",
                     len(miscounted), miscounted)
    if stuck:
        where = ", ".join(f"{c}/{n} ({(now - t) / 3600:.1f} h)" for _, c, n, t in stuck)
        return Check(name, WARNING, f"files still being read after an hour ({where}): their channel is stopped, or "
                                    "a message of theirs cannot be stored (hl7relay files; the engine log)",
                     len(stuck), [i for i, *_ in stuck])
    return Check(name, OK, "every file's count matches its messages; none is left half read")


# -- repairs --------------------------------------------------------------------------------------------
def repair(store: Store, checks: list[Check], now: float, channels=None) -> list[str]:
    """Apply the safe fix of each check that has one; what was done, a line each. Each fix is
    one transaction (the audit entry is the caller's, after it)."""
    done = []
    for check in checks:
        if not check.key:
            continue
        if check.key == "indexes":
            made = []
            with store.engine.begin() as connection:
                for table in metadata.tables.values():
                    for index in table.indexes:
                        if index.name in check.detail:
                            index.create(connection, checkfirst=True)
                            made.append(index.name)
            done.append(f"{check.name}: created {', '.join(made)}")
        elif check.key == "migrate":
            version = store.migrate()
            done.append(f"{check.name}: migrated to {version}")
        elif check.key in ("orphan_deliveries", "orphan_stages", "orphan_file_places"):
            table = {"orphan_deliveries": deliveries, "orphan_stages": stages}.get(check.key, file_messages)
            with store.engine.begin() as connection:
                count = connection.execute(table.delete().where(
                    ~sa.exists().where(messages.c.id == table.c.message_id))).rowcount
            done.append(f"{check.name}: deleted {count} row{'s' * (count != 1)}")
        elif check.key == "undeclared" and channels is not None:
            declared = _declared(channels)
            moved = 0
            queued = deliveries.c.status == sa.literal_column("'QUEUED'")  # the partial index's own condition
            with store.engine.begin() as connection:
                for channel, destination, _, _ in waiting_by_destination(connection, _QUEUED, deliveries.c.message_id):
                    if (channel, destination) in declared:
                        continue
                    ids = [r[0] for r in connection.execute(  # the queue's rows, from its partial index
                        sa.select(deliveries.c.message_id).select_from(
                            deliveries.join(messages, messages.c.id == deliveries.c.message_id))
                        .where(queued, deliveries.c.destination == destination, messages.c.channel == channel))]
                    for start in range(0, len(ids), 500):
                        moved += connection.execute(deliveries.update().where(
                            deliveries.c.destination == destination, deliveries.c.status == _QUEUED,
                            deliveries.c.message_id.in_(ids[start:start + 500])).values(
                            status=DeliveryStatus.ERROR.value, next_attempt_at=None, updated_at=now,
                            last_error=f"destination {destination} is no longer declared by channel {channel} "
                                       "(moved by hl7relay verify --repair)")).rowcount
            done.append(f"{check.name}: moved {moved} deliver{'ies' if moved != 1 else 'y'} to ERROR (dead letters)")
    return done
