"""The destinations' queues as stored: what waits, in order, and how many; the state a
destination was last seen in."""

from __future__ import annotations

import sqlalchemy as sa

from hl7relay.store.schema import messages, stages, deliveries, destination_state, _D_QUEUED, _D_ERROR, _QUEUED, _DEAD

# the queue's poll, built once (statements with bound parameters, not rebuilt per poll)


_QUEUED_IDS = (
    sa.select(deliveries.c.message_id).join(messages, messages.c.id == deliveries.c.message_id)
    .where(deliveries.c.destination == sa.bindparam("destination"), _QUEUED, messages.c.channel == sa.bindparam("channel"),
           deliveries.c.message_id > sa.bindparam("after_id"))
    .order_by(deliveries.c.message_id).limit(sa.bindparam("limit"))
)
_PARTITION_IDS = _QUEUED_IDS.where(deliveries.c.queue_partition == sa.bindparam("partition"))
_PARTITIONS_IDS: dict[tuple[int, ...], sa.Executable] = {}  # built once per set of partitions


def _partitions_ids(partitions: tuple[int, ...]) -> sa.Executable:
    statement = _PARTITIONS_IDS.get(partitions)
    if statement is None:
        branches = [_QUEUED_IDS.where(deliveries.c.queue_partition == p).subquery().select() for p in partitions]
        statement = sa.union_all(*branches) if len(branches) > 1 else branches[0]
        if len(_PARTITIONS_IDS) < 4096:  # the sets a node holds: few, and bounded
            _PARTITIONS_IDS[partitions] = statement
    return statement


_content, _transformed = stages.alias("content"), stages.alias("transformed")
_QUEUED_ROWS = (  # the content as delivery_content() finds it
    sa.select(deliveries.c.id, deliveries.c.message_id, deliveries.c.attempts, deliveries.c.next_attempt_at,
              deliveries.c.order_key, sa.func.coalesce(_content.c.content, _transformed.c.content).label("content"),
              messages.c.raw, messages.c.received_at, deliveries.c.queue_partition)
    .join(messages, messages.c.id == deliveries.c.message_id)
    .outerjoin(_content, sa.and_(_content.c.message_id == deliveries.c.message_id, _content.c.stage == sa.bindparam("stage")))
    .outerjoin(_transformed, sa.and_(_transformed.c.message_id == deliveries.c.message_id,
                                     _transformed.c.stage == "transformed"))
    .where(deliveries.c.destination == sa.bindparam("destination"), _QUEUED,
           deliveries.c.message_id.in_(sa.bindparam("ids", expanding=True)))
    .order_by(deliveries.c.message_id)
)


def _queued_rows(connection, destination: str, ids, skip) -> list[dict]:
    """The rows, with what to send, of the queued ``ids`` but the ``skip`` ones (memory has them)."""
    wanted = [i for i in ids if i not in skip]
    if not wanted:
        return []
    rows = connection.execute(_QUEUED_ROWS, {"destination": destination, "stage": "destination:" + destination,
                                             "ids": wanted}).mappings()
    return [dict(r) for r in rows]


class DeliveryQueries:
    """Part of :class:`~hl7relay.store.database.Store`; ``engine``: its SQLAlchemy engine."""

    engine: sa.Engine

    def queued_deliveries(self, channel: str, destination: str, limit: int = 200, after_id: int | None = None,
                          skip: frozenset[int] | set[int] = frozenset(), partition: int | None = None) -> list[dict]:
        """The destination's QUEUED deliveries in order of receipt, with what to send: of the first
        ``limit`` (only those of messages after ``after_id``, when given), all but the ``skip`` ids.

        The ids are read first, then the content of the others only: a queue polls with what it
        holds in memory as ``skip``, so a poll that finds nothing new reads no message bodies."""
        arguments = {"destination": destination, "channel": channel, "limit": limit,
                     "after_id": -1 if after_id is None else after_id}
        with self.engine.connect() as connection:
            if partition is None:
                ids = connection.execute(_QUEUED_IDS, arguments).scalars().all()
            else:  # a cluster's partition: the node holding its lease reads it
                ids = connection.execute(_PARTITION_IDS, {**arguments, "partition": partition}).scalars().all()
            return _queued_rows(connection, destination, ids, skip)

    def queued_in_partitions(self, channel: str, destination: str, limit: int, partitions: tuple[int, ...],
                             skip: frozenset[int] | set[int] = frozenset()) -> list[dict]:
        """:meth:`queued_deliveries` of several partitions in one read (a cluster node's polls of
        the partitions it holds): of each partition's first ``limit`` queued deliveries, all but
        the ``skip`` ids, each row with its ``queue_partition``. Each partition's ids come from its
        own index range (one branch of a UNION ALL each), however long the others' queues are."""
        arguments = {"destination": destination, "channel": channel, "limit": limit, "after_id": -1}
        with self.engine.connect() as connection:
            ids = connection.execute(_partitions_ids(tuple(sorted(partitions))), arguments).scalars().all()
            return _queued_rows(connection, destination, ids, skip)

    def queue_depth(self, channel: str, destination: str, partition: int | None = None) -> int:
        query = (sa.select(sa.func.count()).select_from(deliveries).join(messages, messages.c.id == deliveries.c.message_id)
                 .where(deliveries.c.destination == destination, _QUEUED, messages.c.channel == channel))
        if partition is not None:
            query = query.where(deliveries.c.queue_partition == partition)
        with self.engine.connect() as connection:
            return connection.execute(query).scalar() or 0

    def set_destination_state(self, channel: str, destination: str, connected: bool, error: str, now: float) -> None:
        with self.engine.begin() as connection:
            updated = connection.execute(destination_state.update().where(
                destination_state.c.channel == channel, destination_state.c.destination == destination).values(
                connected=connected, last_error=error, updated_at=now)).rowcount
            if not updated:
                connection.execute(destination_state.insert().values(
                    channel=channel, destination=destination, connected=connected, last_error=error, updated_at=now))


def waiting_by_destination(connection, status: str, first, *conditions) -> list:
    """(channel, destination, how many, the least ``first``) of the QUEUED or ERROR deliveries
    (``conditions``: more of them), grouped, read through their partial index: what status, the
    console and verify count of queues and dead letters."""
    waiting = {_D_QUEUED: _QUEUED, _D_ERROR: _DEAD}[status]
    return list(connection.execute(
        sa.select(messages.c.channel, deliveries.c.destination, sa.func.count(), sa.func.min(first))
        .select_from(deliveries.join(messages, messages.c.id == deliveries.c.message_id)).where(waiting, *conditions)
        .group_by(messages.c.channel, deliveries.c.destination)))


def _xref_query(channel, destination, resource_type, identifier):
    from hl7relay.store.schema import fhir_xref

    query = sa.select(fhir_xref)
    for column, value in (("channel", channel), ("destination", destination), ("resource_type", resource_type),
                          ("identifier", identifier)):
        if value is not None:
            query = query.where(fhir_xref.c[column] == value)
    return query.order_by(fhir_xref.c.channel, fhir_xref.c.destination, fhir_xref.c.resource_type,
                          fhir_xref.c.identifier, fhir_xref.c.local_key)


class XrefQueries:
    """FHIR cross-references: each resource sent, its PMS identifier, the server's id and version."""

    engine: sa.Engine

    def xrefs(self, channel: str | None = None, destination: str | None = None, resource_type: str | None = None,
              identifier: str | None = None, limit: int = 100_000) -> list[dict]:
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(
                _xref_query(channel, destination, resource_type, identifier).limit(limit)).mappings()]

    def match_holds(self, resolved: bool = False, channel: str | None = None, destination: str | None = None,
                    message_id: int | None = None) -> list[dict]:
        """Messages held for a person to pick their patient (resolved ones with ``resolved=True``)."""
        from hl7relay.store.schema import fhir_match_holds as holds

        query = sa.select(holds).where(holds.c.resolved_at.isnot(None) if resolved else holds.c.resolved_at.is_(None))
        for column, value in (("channel", channel), ("destination", destination), ("message_id", message_id)):
            if value is not None:
                query = query.where(holds.c[column] == value)
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(query.order_by(holds.c.held_at)).mappings()]

    def resolve_match_hold(self, channel: str, destination: str, message_id: int, decision: str, actor: str,
                           at: float, audit: dict) -> bool:
        """Mark a hold resolved (with its audit entry, in one transaction); False if it was not open."""
        from hl7relay.store.schema import _audit_row, audit_log
        from hl7relay.store.schema import fhir_match_holds as holds

        with self.engine.begin() as connection:
            done = connection.execute(
                holds.update().where(holds.c.channel == channel, holds.c.destination == destination,
                                     holds.c.message_id == message_id, holds.c.resolved_at.is_(None))
                .values(resolved_at=at, resolved_by=actor, decision=decision)).rowcount
            if done:
                connection.execute(audit_log.insert().values(**_audit_row(audit)))
            return bool(done)

    def source_states(self, channel: str, resource_type: str) -> dict[str, dict]:
        """A fhir source's memory: fhir_id -> its last row ("" -> the cursor row)."""
        from hl7relay.store.schema import fhir_source_state as state

        query = sa.select(state).where(state.c.channel == channel, state.c.resource_type == resource_type)
        with self.engine.connect() as connection:
            return {r["fhir_id"]: dict(r) for r in connection.execute(query).mappings()}
