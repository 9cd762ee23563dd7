"""The audit log, and the operators' controls (a channel disabled, a destination paused),
recorded with their audit entries."""

from __future__ import annotations

import time

import sqlalchemy as sa

from hl7relay.store.schema import audit_log, control_state, _audit_row
from hl7relay.store.records import StoreError, storable


class AuditLog:
    """Part of :class:`~hl7relay.store.database.Store`; ``engine``: its SQLAlchemy engine."""

    engine: sa.Engine

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
