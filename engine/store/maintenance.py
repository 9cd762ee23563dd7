"""Keeping the store: prune, the per-channel status counts, a write probe and a ping."""

from __future__ import annotations

import sqlalchemy as sa

from hl7relay.outcomes import FileState
from hl7relay.store.schema import (
    messages, stages, deliveries, destination_state, file_ledger, file_messages, _D_QUEUED, _D_ERROR, _M_ERROR,
)
from hl7relay.store.records import StoreError
from hl7relay.store.deliveries import waiting_by_destination


PROBE_BYTES = 256 * 1024  # what a readiness probe writes after a failed commit: a generous batch


class Maintenance:
    """Part of :class:`~hl7relay.store.database.Store`; ``engine``: its SQLAlchemy engine."""

    engine: sa.Engine

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
                return connection.execute(sa.select(sa.func.count()).select_from(query.subquery())).scalar() or 0
        deleted = 0
        while True:
            with self.engine.begin() as connection:  # one short transaction per batch: live traffic keeps flowing
                ids = [r[0] for r in connection.execute(query.order_by(messages.c.id).limit(batch))]
                if not ids:
                    self._prune_files(connection, older_than, channel)
                    return deleted
                connection.execute(file_messages.delete().where(file_messages.c.message_id.in_(ids)))
                connection.execute(stages.delete().where(stages.c.message_id.in_(ids)))
                connection.execute(deliveries.delete().where(deliveries.c.message_id.in_(ids)))
                connection.execute(sa.update(messages).where(messages.c.replay_of.in_(ids)).values(replay_of=None))
                connection.execute(messages.delete().where(messages.c.id.in_(ids)))
                deleted += len(ids)

    @staticmethod
    def _prune_files(connection, older_than: float, channel: str | None) -> None:
        """Ledger rows go with their messages: a file read to its end before ``older_than`` none of
        whose messages is left (a file still being read stays, whatever its age)."""
        has_messages = sa.exists().where(file_messages.c.file_id == file_ledger.c.id)
        condition = sa.and_(file_ledger.c.first_seen < older_than, file_ledger.c.state != FileState.READING.value,
                            ~has_messages)
        if channel is not None:
            condition = sa.and_(condition, file_ledger.c.channel == channel)
        connection.execute(file_ledger.delete().where(condition))

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

    def ping(self) -> bool:
        with self.engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        return True
