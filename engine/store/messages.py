"""Reading stored messages: one message, dead letters, duplicates' originals, the search
support staff use (every filter on an index), the channels and types stored."""

from __future__ import annotations

import sqlalchemy as sa

from hl7relay.store.schema import (
    messages, stages, deliveries, _D_QUEUED, _D_ERROR, _M_ERROR, _M_DUPLICATE, _RESEND_CODES, _QUEUED, _DEAD, _REPLAY,
)
from hl7relay.store.records import storable


class SearchRows(list):
    """A page of search rows. A content search also says how far it read: ``scanned`` messages,
    and ``stopped_at`` (the last one read) when it stopped at its scan limit with the page not
    full: the messages older than that were not searched, which nobody should take for "no match"."""

    scanned: int = 0
    stopped_at: int | None = None
    # how many match the filters in all (not only this page), counted up to ``count_most``: the
    # count, or None when not counted (a content search, or no count asked for)
    total: int | None = None
    total_capped: bool = False  # more than the count: "of 10,000+"
    newer_exists: bool = False  # a page read with ``after_id``: there are newer rows than these


class MessageQueries:
    """Part of :class:`~hl7relay.store.database.Store`; ``engine``: its SQLAlchemy engine."""

    engine: sa.Engine

    def get_message(self, message_id: int) -> dict | None:
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(messages).where(messages.c.id == message_id)).mappings().first()
            if row is None:
                return None
            result = dict(row)
            result["stages"] = {r.stage: r.content for r in connection.execute(
                sa.select(stages.c.stage, stages.c.content).where(stages.c.message_id == message_id))}
            result["deliveries"] = [dict(r) for r in connection.execute(
                sa.select(deliveries).where(deliveries.c.message_id == message_id).order_by(deliveries.c.id)).mappings()]
            return result

    def dead_letters(self, channel: str | None = None, limit: int = 500) -> list[dict]:
        """ERROR deliveries grouped by channel, destination and error text: how many, first and
        last seen (when they went to ERROR), most recent first."""
        query = (sa.select(messages.c.channel, deliveries.c.destination, deliveries.c.last_error.label("error"),
                           sa.func.count().label("count"), sa.func.min(deliveries.c.message_id).label("sample_id"),
                           sa.func.min(deliveries.c.updated_at).label("first_seen"),
                           sa.func.max(deliveries.c.updated_at).label("last_seen"))
                 .select_from(deliveries.join(messages, messages.c.id == deliveries.c.message_id))
                 .where(_DEAD))
        if channel:
            query = query.where(messages.c.channel == channel)
        query = (query.group_by(messages.c.channel, deliveries.c.destination, deliveries.c.last_error)
                 .order_by(sa.desc("last_seen")).limit(limit))
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(query).mappings()]

    def dead_letter_ids(self, channel: str, destination: str, error: str | None = None, limit: int = 1000) -> list[int]:
        """The messages of one group of dead letters (oldest first)."""
        query = (sa.select(deliveries.c.message_id)
                 .select_from(deliveries.join(messages, messages.c.id == deliveries.c.message_id))
                 .where(_DEAD, deliveries.c.destination == destination, messages.c.channel == channel))
        if error is not None:
            query = query.where(deliveries.c.last_error == error)
        with self.engine.connect() as connection:
            return [r[0] for r in connection.execute(query.order_by(deliveries.c.message_id).limit(limit))]

    def dead_letter_total(self) -> int:
        """Every dead letter (ERROR delivery) in the store, through their partial index."""
        with self.engine.connect() as connection:
            return connection.execute(sa.select(sa.func.count()).select_from(deliveries).where(_DEAD)).scalar() or 0

    def delivery_summary(self, message_ids: list[int]) -> dict[int, dict[str, int]]:
        """How a page of messages' deliveries stand: message id -> {status: how many}, through the
        (message, destination) index; messages without deliveries are left out."""
        out: dict[int, dict[str, int]] = {}
        if not message_ids:
            return out
        with self.engine.connect() as connection:
            for message_id, status, count in connection.execute(
                    sa.select(deliveries.c.message_id, deliveries.c.status, sa.func.count())
                    .where(deliveries.c.message_id.in_(message_ids))
                    .group_by(deliveries.c.message_id, deliveries.c.status)):
                out.setdefault(message_id, {})[status] = count
        return out

    def dead_letter_count(self, channel: str, destination: str, error: str | None = None) -> int:
        """How many messages one group of dead letters holds (through the dead letters' index)."""
        query = (sa.select(sa.func.count())
                 .select_from(deliveries.join(messages, messages.c.id == deliveries.c.message_id))
                 .where(_DEAD, deliveries.c.destination == destination, messages.c.channel == channel))
        if error is not None:
            query = query.where(deliveries.c.last_error == error)
        with self.engine.connect() as connection:
            return connection.execute(query).scalar() or 0

    def replays_of(self, message_id: int) -> list[dict]:
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(
                sa.select(messages.c.id, messages.c.received_at, messages.c.status, messages.c.replay_operator,
                          messages.c.replay_reason).where(_REPLAY, messages.c.replay_of == message_id)
                .order_by(messages.c.id)).mappings()]

    def count(self, **where) -> int:
        with self.engine.connect() as connection:
            query = sa.select(sa.func.count()).select_from(messages)
            for column, value in where.items():
                query = query.where(messages.c[column] == value)
            return connection.execute(query).scalar() or 0

    def latest(self, limit: int = 20, channel: str | None = None) -> list[dict]:
        with self.engine.connect() as connection:
            query = sa.select(messages.c.id, messages.c.channel, messages.c.received_at, messages.c.message_type,
                              messages.c.control_id, messages.c.status, messages.c.error, messages.c.ack_code)
            if channel:
                query = query.where(messages.c.channel == channel)
            return [dict(r) for r in connection.execute(query.order_by(messages.c.id.desc()).limit(limit)).mappings()]

    def find_original(self, channel: str, key: str, since: float) -> dict | None:
        """The first non-duplicate message of the channel with this duplicate key since ``since``.
        One answered AR or CR does not count: its sender was asked to send it again, and the
        resend must be processed, not answered AR for ever."""
        query = (sa.select(messages.c.id, messages.c.ack_code, messages.c.status)
                 .where(messages.c.channel == channel, messages.c.duplicate_key == storable(key), messages.c.received_at >= since,
                        messages.c.status != _M_DUPLICATE, messages.c.ack_code.not_in(_RESEND_CODES))
                 .order_by(messages.c.received_at, messages.c.id).limit(1))  # the key index's order: nothing sorted
        with self.engine.connect() as connection:
            row = connection.execute(query).mappings().first()
            return dict(row) if row else None

    def search(self, *, channel=None, status=None, since=None, until=None, message_type=None, control_id=None,
               patient_id=None, facility=None, delivery_status=None, failed: bool = False, text: bytes | None = None,
               before_id=None, after_id=None, limit=50, scan_limit=100000, count_most: int = 0) -> SearchRows:
        """Newest first, ``limit`` at a time (keyset paging: pass the last id as ``before_id``).

        Every filter but ``text`` is answered by an index; ``text`` (a substring of the raw message,
        ignoring ASCII case) scans the candidates the other filters leave, at most ``scan_limit`` of them.
        ``failed``: what
        support staff look for first, a message stored as ERROR or with any delivery in ERROR (a dead
        letter); each row then carries ``failed_deliveries`` (destination and error).
        ``count_most``: when set (and no ``text``), the rows also say how many match in all, counted
        through the same indexes and never beyond ``count_most`` (the cost stays bounded).
        """
        query = sa.select(messages.c.id, messages.c.channel, messages.c.received_at, messages.c.message_type,
                          messages.c.control_id, messages.c.patient_id, messages.c.sending_facility, messages.c.status,
                          messages.c.error, messages.c.ack_code, messages.c.replay_of)
        for column, value in (("channel", channel), ("status", status), ("control_id", control_id),
                              ("patient_id", patient_id), ("sending_facility", facility)):
            if value is not None:
                query = query.where(messages.c[column] == storable(value))
        if since is not None:
            query = query.where(messages.c.received_at >= since)
        if until is not None:
            query = query.where(messages.c.received_at < until)
        if failed:
            # each side from its own index (status; the dead letters' partial index)
            query = query.where(sa.or_(messages.c.status == _M_ERROR,
                                       messages.c.id.in_(sa.select(deliveries.c.message_id).where(_DEAD))))
        if delivery_status in (_D_QUEUED, _D_ERROR):
            # the few waiting or dead deliveries, from their partial index (the status as a literal, so
            # the planner sees it matches): none at all costs nothing, where reading newest first
            # until a page was full read the whole table
            query = query.where(messages.c.id.in_(sa.select(deliveries.c.message_id).where(
                _QUEUED if delivery_status == _D_QUEUED else _DEAD)))
        elif delivery_status is not None:
            query = query.where(sa.exists().where(deliveries.c.message_id == messages.c.id,
                                                  deliveries.c.status == delivery_status))
        # Newest first, in the order an index already has, so no match is sorted: filtered by
        # channel, status, type or facility (indexes on (column, received_at)) by arrival time;
        # otherwise by id (the table itself; the control id and patient id indexes end with it).
        # Sorting a million rows by id within a channel took a second; this takes milliseconds.
        by_time = any(value is not None for value in (channel, status, message_type, facility))
        order = (messages.c.received_at.desc(), messages.c.id.desc()) if by_time else (messages.c.id.desc(),)
        with self.engine.connect() as connection:
            queries = [query]
            if message_type is not None:
                # "ADT" means every ADT trigger: each type found is read through the type index in
                # order and the reads merged, where one query for them all sorted every match
                types = [storable(message_type)] if "^" in message_type else self._types_like(connection, storable(message_type))
                queries = [query.where(messages.c.message_type == t) for t in types]
            bases = queries
            queries = [q.order_by(*order) for q in bases]

            def counted(rows: SearchRows) -> SearchRows:
                if count_most and text is None:
                    total = 0
                    for q in bases:
                        if total > count_most:
                            break
                        bounded = q.with_only_columns(messages.c.id).limit(count_most + 1 - total).subquery()
                        total += connection.execute(sa.select(sa.func.count()).select_from(bounded)).scalar() or 0
                    rows.total, rows.total_capped = min(total, count_most), total > count_most
                return rows

            def after(query, last_id):
                """Keyset: the rows after message ``last_id`` in that order."""
                if last_id is None:
                    return query
                if not by_time:
                    return query.where(messages.c.id < last_id)
                at = connection.execute(sa.select(messages.c.received_at).where(messages.c.id == last_id)).scalar()
                if at is None:  # pruned since: its id still places it closely enough
                    return query.where(messages.c.id < last_id)
                return query.where(sa.tuple_(messages.c.received_at, messages.c.id) < sa.tuple_(at, last_id))

            def page(last_id, size: int, columns=()) -> list[dict]:
                rows = []
                for q in queries:
                    rows += [dict(r) for r in connection.execute(after(q.add_columns(*columns), last_id).limit(size)).mappings()]
                if len(queries) > 1:
                    rows.sort(key=(lambda r: (r["received_at"], r["id"])) if by_time else (lambda r: r["id"]), reverse=True)
                return rows[:size]

            if text is None and after_id is not None:
                # the page newer than message ``after_id`` (the "Newer" link): read oldest first
                # from it, in the same index order, then shown newest first like every page
                ascending = (messages.c.received_at.asc(), messages.c.id.asc()) if by_time else (messages.c.id.asc(),)
                at = connection.execute(sa.select(messages.c.received_at).where(messages.c.id == after_id)).scalar()
                newer = []
                for q in bases:
                    if by_time and at is not None:
                        q = q.where(sa.tuple_(messages.c.received_at, messages.c.id) > sa.tuple_(at, after_id))
                    else:
                        q = q.where(messages.c.id > after_id)
                    # one more than a page: whether a page newer still exists (a "Newer" link to nothing, else)
                    newer += [dict(r) for r in connection.execute(q.order_by(*ascending).limit(limit + 1)).mappings()]
                newer.sort(key=(lambda r: (r["received_at"], r["id"])) if by_time else (lambda r: r["id"]))
                rows = counted(SearchRows(reversed(newer[:limit])))
                rows.newer_exists = len(newer) > limit
                return self._with_failed_deliveries(connection, rows) if failed else rows
            if text is None:
                rows = counted(SearchRows(page(before_id, limit)))
                return self._with_failed_deliveries(connection, rows) if failed else rows
            found: list[dict] = []
            scanned, cursor = 0, before_id
            needle = text.lower()
            exhausted = False
            while len(found) < limit and scanned < scan_limit:
                candidates = page(cursor, 500, (messages.c.raw,))
                if not candidates:
                    exhausted = True
                    break
                scanned += len(candidates)
                cursor = candidates[-1]["id"]
                # case-insensitive (ASCII), as an analyst typing "penicillin" expects
                found += [{k: v for k, v in r.items() if k != "raw"} for r in candidates if needle in r["raw"].lower()]
            result = SearchRows(found[:limit])
            result.scanned = scanned
            if len(found) < limit and not exhausted:
                result.stopped_at = cursor  # the scan limit came first: older messages were not read
            return self._with_failed_deliveries(connection, result) if failed else result

    @staticmethod
    def _with_failed_deliveries(connection, rows: SearchRows) -> SearchRows:
        """Each row with its dead letters (destination, error) as ``failed_deliveries``; a row that
        has some also carries its ``raw`` message: a peer's error text may name the patient without
        quotes, and masking it needs the message's own person values (ops/support.row_view)."""
        if not rows:
            return rows
        dead: dict[int, list] = {}
        raw: dict[int, bytes] = {}
        for message_id, destination, error, content in connection.execute(
                sa.select(deliveries.c.message_id, deliveries.c.destination, deliveries.c.last_error, messages.c.raw)
                .join(messages, messages.c.id == deliveries.c.message_id)
                .where(deliveries.c.message_id.in_([r["id"] for r in rows]), _DEAD)
                .order_by(deliveries.c.message_id, deliveries.c.destination)):
            dead.setdefault(message_id, []).append({"destination": destination, "error": error})
            raw[message_id] = content
        for row in rows:
            row["failed_deliveries"] = dead.get(row["id"], [])
            if row["id"] in raw:
                row["raw"] = raw[row["id"]]
        return rows

    def channel_names(self, most: int = 1000) -> list[str]:
        """The channels that have stored messages, found by seeking through the channel index
        (one lookup per channel, however many messages each has)."""
        names: list[str] = []
        with self.engine.connect() as connection:
            last = None
            while len(names) < most:
                query = sa.select(sa.func.min(messages.c.channel))
                if last is not None:
                    query = query.where(messages.c.channel > last)
                last = connection.execute(query).scalar()
                if last is None:
                    break
                names.append(last)
        return names

    @staticmethod
    def _types_like(connection, prefix: str, most: int = 200) -> list[str]:
        """The stored message types ``prefix`` or ``prefix^...``, found by seeking through the type
        index (one lookup per type, however many messages each has)."""
        prefix = prefix.replace("%", "")
        types, last = [], None
        first = connection.execute(sa.select(messages.c.message_type).where(messages.c.message_type == prefix).limit(1)).scalar()
        if first is not None:
            types.append(first)
        low, high = prefix + "^", prefix + "_"  # "^" is 0x5E, "_" the next character: prefix^... lies between
        while len(types) < most:
            condition = messages.c.message_type > last if last is not None else messages.c.message_type >= low
            last = connection.execute(sa.select(sa.func.min(messages.c.message_type))
                                      .where(condition, messages.c.message_type < high)).scalar()
            if last is None:
                break
            types.append(last)
        return types
