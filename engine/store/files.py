"""The file ledger's queries: the files sources read, what each held, where a message came from."""

from __future__ import annotations

import sqlalchemy as sa

from hl7relay.outcomes import FileState

__all__ = ["FileQueries", "SnapshotQueries", "PromotionQueries", "error_class"]

_FINISHED = (FileState.DONE.value, FileState.ERRORS.value)


class FileQueries:
    engine: sa.Engine

    def file_entry(self, channel: str, source: str, name: str, sha256: str) -> dict | None:
        """The ledger row of one file (by its content): None when it was never seen."""
        from hl7relay.store.schema import file_ledger as files

        query = sa.select(files).where(files.c.channel == channel, files.c.source == source, files.c.name == name,
                                       files.c.sha256 == sha256)
        with self.engine.connect() as connection:
            row = connection.execute(query).mappings().first()
        return dict(row) if row is not None else None

    def file_read_before(self, channel: str, sha256: str, other_than: int) -> dict | None:
        """The first file of this channel with the same content that was read to its end."""
        from hl7relay.store.schema import file_ledger as files

        query = (sa.select(files).where(files.c.channel == channel, files.c.sha256 == sha256, files.c.id != other_than,
                                        files.c.state.in_(_FINISHED)).order_by(files.c.id).limit(1))
        with self.engine.connect() as connection:
            row = connection.execute(query).mappings().first()
        return dict(row) if row is not None else None

    def file_ordinals(self, file_id: int) -> set[int]:
        """The places (from 0) of the file's messages already stored."""
        from hl7relay.store.schema import file_messages

        query = sa.select(file_messages.c.ordinal).where(file_messages.c.file_id == file_id)
        with self.engine.connect() as connection:
            return set(connection.execute(query).scalars())

    def files(self, channel: str | None = None, since: float | None = None, state: str | None = None,
              limit: int = 1000) -> list[dict]:
        """Ledger rows, newest first."""
        from hl7relay.store.schema import file_ledger as files

        query = sa.select(files)
        if channel is not None:
            query = query.where(files.c.channel == channel)
        if since is not None:
            query = query.where(files.c.first_seen >= since)
        if state is not None:
            query = query.where(files.c.state == state)
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(query.order_by(files.c.id.desc()).limit(limit)).mappings()]

    def file(self, file_id: int) -> dict | None:
        from hl7relay.store.schema import file_ledger as files

        with self.engine.connect() as connection:
            row = connection.execute(sa.select(files).where(files.c.id == file_id)).mappings().first()
        return dict(row) if row is not None else None

    def file_message_rows(self, file_id: int, limit: int = 100_000) -> list[dict]:
        """A file's stored messages in file order: place, line, id, status, type, control id, error."""
        from hl7relay.store.schema import file_messages, messages

        query = (sa.select(file_messages.c.ordinal, file_messages.c.line, messages.c.id, messages.c.status,
                           messages.c.message_type, messages.c.control_id, messages.c.error)
                 .join(messages, messages.c.id == file_messages.c.message_id)
                 .where(file_messages.c.file_id == file_id).order_by(file_messages.c.ordinal).limit(limit))
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(query).mappings()]

    def file_of_message(self, message_id: int) -> dict | None:
        """Where a message read from a file came from: the ledger row with the message's place and line."""
        from hl7relay.store.schema import file_ledger as files
        from hl7relay.store.schema import file_messages

        query = (sa.select(files, file_messages.c.ordinal, file_messages.c.line)
                 .join(file_messages, file_messages.c.file_id == files.c.id)
                 .where(file_messages.c.message_id == message_id))
        with self.engine.connect() as connection:
            row = connection.execute(query).mappings().first()
        return dict(row) if row is not None else None


class SnapshotQueries:
    """Configuration snapshots (snapshots.py): recorded at start and reload, read by ``config``."""

    engine: sa.Engine

    def record_snapshot(self, snapshot) -> int:
        from hl7relay.store.schema import config_snapshots as snapshots

        with self.engine.begin() as connection:
            result = connection.execute(snapshots.insert().values(
                taken_at=snapshot.taken_at, sha256=snapshot.sha256, environment=snapshot.environment,
                node=snapshot.node, actor=snapshot.actor, reason=snapshot.reason, git_commit=snapshot.git_commit,
                git_dirty=snapshot.git_dirty, files=len(snapshot.files), bundle=snapshot.compressed(),
                note=snapshot.note[:500], from_snapshot=snapshot.from_snapshot, source_sha256=snapshot.source_sha256))
            key = result.inserted_primary_key
            assert key is not None  # an INSERT of one row has one
            return int(key[0])

    def snapshots(self, limit: int = 100) -> list[dict]:
        """Newest first, without their bundles."""
        from hl7relay.store.schema import config_snapshots as snapshots

        columns = [c for c in snapshots.c if c.name != "bundle"]
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(
                sa.select(*columns).order_by(snapshots.c.id.desc()).limit(limit)).mappings()]

    def snapshot(self, snapshot_id: int | None = None) -> dict | None:
        """One snapshot with its files (path -> rendered text); the newest without an id."""
        import json
        import zlib

        from hl7relay.store.schema import config_snapshots as snapshots

        query = (sa.select(snapshots).where(snapshots.c.id == snapshot_id) if snapshot_id is not None
                 else sa.select(snapshots).order_by(snapshots.c.id.desc()).limit(1))
        with self.engine.connect() as connection:
            row = connection.execute(query).mappings().first()
        if row is None:
            return None
        out = dict(row)
        out["files"] = json.loads(zlib.decompress(out.pop("bundle")).decode("utf-8"))
        return out


class PromotionQueries:
    """Promotions (hl7relay promote): what was cleared to run in an environment, and by whom."""

    engine: sa.Engine

    def snapshots_with_source(self, source_sha256: str, environment: str) -> list[dict]:
        """The snapshots (without bundles) of these files in this environment, oldest first."""
        from hl7relay.store.schema import config_snapshots as snapshots

        columns = [c for c in snapshots.c if c.name != "bundle"]
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(
                sa.select(*columns).where(snapshots.c.source_sha256 == source_sha256,
                                          snapshots.c.environment == environment)
                .order_by(snapshots.c.id)).mappings()]

    def messages_under(self, snapshot_ids) -> int:
        """How many stored messages were processed under these snapshots."""
        from hl7relay.store.schema import messages

        ids = list(snapshot_ids)
        if not ids:
            return 0
        with self.engine.connect() as connection:
            return int(connection.execute(sa.select(sa.func.count()).select_from(messages)
                                          .where(messages.c.snapshot_id.in_(ids))).scalar() or 0)

    def error_classes(self, snapshot_ids, limit: int = 5000) -> dict[str, int]:
        """The errors of the messages processed under these snapshots, by class (the error text
        with its numbers and quoted values taken out), and how many of each."""
        from hl7relay.outcomes import DeliveryStatus, MessageStatus
        from hl7relay.store.schema import deliveries, messages

        ids = list(snapshot_ids)
        if not ids:
            return {}
        classes: dict[str, int] = {}
        with self.engine.connect() as connection:
            rows: list = list(connection.execute(
                sa.select(messages.c.channel, messages.c.error).where(
                    messages.c.snapshot_id.in_(ids), messages.c.status == MessageStatus.ERROR.value).limit(limit)).all())
            rows += connection.execute(
                sa.select(messages.c.channel, deliveries.c.destination, deliveries.c.last_error)
                .join(deliveries, deliveries.c.message_id == messages.c.id)
                .where(messages.c.snapshot_id.in_(ids), deliveries.c.status == DeliveryStatus.ERROR.value)
                .limit(limit)).all()
        for row in rows:
            key = error_class(" ".join(str(part) for part in row[:-1]) + ": " + (row[-1] or ""))
            classes[key] = classes.get(key, 0) + 1
        return classes

    def record_promotion(self, row: dict, audit: dict) -> int:
        from hl7relay.store.schema import _audit_row, audit_log, promotions

        with self.engine.begin() as connection:
            key = connection.execute(promotions.insert().values(**row)).inserted_primary_key
            assert key is not None
            connection.execute(audit_log.insert().values(**_audit_row(dict(audit, target=f"promotion {int(key[0])}"))))
            return int(key[0])

    def promotions(self, limit: int = 50) -> list[dict]:
        from hl7relay.store.schema import promotions

        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(
                sa.select(promotions).order_by(promotions.c.id.desc()).limit(limit)).mappings()]

    def promotion(self, promotion_id: int) -> dict | None:
        from hl7relay.store.schema import promotions

        with self.engine.connect() as connection:
            row = connection.execute(sa.select(promotions).where(promotions.c.id == promotion_id)).mappings().first()
        return dict(row) if row is not None else None

    def approve_promotion(self, promotion_id: int, approver: str, now: float, audit: dict) -> bool:
        """Approved by ``approver`` (not the one who asked); False when it was not pending."""
        from hl7relay.outcomes import PromotionState
        from hl7relay.store.schema import _audit_row, audit_log, promotions

        with self.engine.begin() as connection:
            done = connection.execute(promotions.update().where(
                promotions.c.id == promotion_id, promotions.c.state == PromotionState.PENDING.value,
                promotions.c.requested_by != approver).values(state=PromotionState.APPROVED.value, approved_by=approver, approved_at=now))
            if done.rowcount != 1:
                return False
            connection.execute(audit_log.insert().values(**_audit_row(dict(audit, target=f"promotion {promotion_id}"))))
            return True

    def promoted(self, source_sha256: str, environment: str) -> dict | None:
        """The approved promotion of these files to this environment, if there is one."""
        from hl7relay.outcomes import PromotionState
        from hl7relay.store.schema import promotions

        with self.engine.connect() as connection:
            row = connection.execute(sa.select(promotions).where(
                promotions.c.source_sha256 == source_sha256, promotions.c.to_env == environment,
                promotions.c.state == PromotionState.APPROVED.value).order_by(promotions.c.id.desc()).limit(1)).mappings().first()
        return dict(row) if row is not None else None


def error_class(text: str) -> str:
    """An error's kind: its text without what differs from one message to the next (numbers,
    quoted values), so a hundred 'PID-7 '19xx' is not a date' are one class."""
    import re

    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    return re.sub(r"\d+", "N", text).strip()[:300]
