"""The engines on one store (issue #31): nodes that register and beat, and leases with epochs.

Times are the database's own clock (one clock for every node: a host whose clock is off does not
take a lease early or keep one late); a test passes ``now`` instead. A lease is held by one owner
until ``expires_at``; taking one that expired, or that was never taken, starts a new epoch, and
renewing one's own live lease keeps it. A write made under a lease checks in its own transaction
that the lease is still the writer's, with the same epoch, and live (:func:`lease_is_held`): a node
that was paused past its lease finds its writes refused (fencing).
"""

from __future__ import annotations

import enum

import sqlalchemy as sa

__all__ = ["ClusterQueries", "NodeState", "db_now", "lease_is_held"]


class NodeState(enum.StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"  # stopped cleanly (a node that died stays RUNNING with an old heartbeat)


COMMANDS_CHANNEL = "hl7relay_commands"  # NOTIFY: a cluster command was asked (its id)


def db_now(connection) -> float:
    """The database's clock, in seconds since the epoch."""
    if connection.dialect.name == "postgresql":
        return float(connection.execute(sa.text("SELECT extract(epoch from clock_timestamp())")).scalar())
    return float(connection.execute(sa.text("SELECT (julianday('now') - 2440587.5) * 86400.0")).scalar())


_HELD = sa.text("SELECT 1 FROM leases WHERE name = :name AND owner = :owner AND epoch = :epoch AND expires_at > :now")


def lease_is_held(connection, name: str, owner: str, epoch: int, now: float | None = None) -> bool:
    """Whether ``owner`` still holds ``name`` at ``epoch`` (inside the caller's transaction, so the
    write it guards commits only under the lease; on PostgreSQL the row is share-locked until then,
    so a new owner's take waits for that write)."""
    query = _HELD if connection.dialect.name != "postgresql" else sa.text(_HELD.text + " FOR SHARE")
    moment = db_now(connection) if now is None else now
    return connection.execute(query, {"name": name, "owner": owner, "epoch": epoch, "now": moment}).first() is not None


class ClusterQueries:
    """Nodes and leases (mixed into the Store)."""

    engine: sa.Engine

    # -- nodes ---------------------------------------------------------------------------------
    def register_node(self, node_id: str, host: str, pid: int, version: str, snapshot_id: int | None = None,
                      snapshot_sha256: str = "", now: float | None = None, partitions: int | None = None) -> float:
        """This node is running (again): its row, started and beating now. Returns the time."""
        from hl7relay.store.schema import nodes

        with self.engine.begin() as connection:
            moment = db_now(connection) if now is None else now
            values = {"host": host, "pid": pid, "version": version, "started_at": moment, "heartbeat_at": moment,
                      "snapshot_id": snapshot_id, "snapshot_sha256": snapshot_sha256, "state": NodeState.RUNNING.value,
                      "partitions": partitions}
            done = connection.execute(nodes.update().where(nodes.c.node_id == node_id).values(**values))
            if done.rowcount == 0:
                connection.execute(nodes.insert().values(node_id=node_id, **values))
            return moment

    def heartbeat(self, node_id: str, snapshot_id: int | None = None, snapshot_sha256: str | None = None,
                  now: float | None = None) -> float:
        """This node is alive (and runs this snapshot). Returns the time."""
        from hl7relay.store.schema import nodes

        with self.engine.begin() as connection:
            moment = db_now(connection) if now is None else now
            values: dict = {"heartbeat_at": moment, "state": NodeState.RUNNING.value}
            if snapshot_sha256 is not None:
                values.update(snapshot_id=snapshot_id, snapshot_sha256=snapshot_sha256)
            connection.execute(nodes.update().where(nodes.c.node_id == node_id).values(**values))
            return moment

    def node_stopped(self, node_id: str, now: float | None = None) -> None:
        from hl7relay.store.schema import nodes

        with self.engine.begin() as connection:
            moment = db_now(connection) if now is None else now
            connection.execute(nodes.update().where(nodes.c.node_id == node_id)
                               .values(state=NodeState.STOPPED.value, heartbeat_at=moment))

    def nodes(self, now: float | None = None) -> tuple[float, list[dict]]:
        """(the database's time, every node with the seconds since its heartbeat)."""
        from hl7relay.store.schema import nodes

        with self.engine.connect() as connection:
            moment = db_now(connection) if now is None else now
            rows = [dict(r) for r in connection.execute(sa.select(nodes).order_by(nodes.c.node_id)).mappings()]
        for row in rows:
            row["heartbeat_age"] = max(0.0, moment - row["heartbeat_at"])
        return moment, rows

    def cluster_partitions(self) -> int | None:
        """How many partitions the cluster's nodes split the queues into (the node heard from
        last), None on a store no cluster ran on: where a delivery stored outside the engine (a
        replay) goes, so that its key's order holds."""
        from hl7relay.store.schema import nodes

        with self.engine.connect() as connection:
            return connection.execute(sa.select(nodes.c.partitions).where(nodes.c.partitions.is_not(None))
                                      .order_by(nodes.c.heartbeat_at.desc()).limit(1)).scalar()

    def partitions_problem(self, node_id: str, partitions: int, alive: float) -> str | None:
        """Why a node splitting the queues into ``partitions`` must not start, or None: another
        node that runs (heard from within ``alive`` seconds) splits them otherwise (the same key
        would be two partitions, delivered by two nodes at once), or the queues hold deliveries
        split otherwise by the nodes before (a patient's queued messages and new ones would sit in
        different partitions and overtake each other)."""
        from hl7relay.store.schema import _QUEUED, deliveries, nodes

        with self.engine.connect() as connection:
            moment = db_now(connection)
            others = connection.execute(sa.select(nodes.c.node_id, nodes.c.partitions, nodes.c.state, nodes.c.heartbeat_at)
                                        .where(nodes.c.node_id != node_id, nodes.c.partitions.is_not(None))
                                        .order_by(nodes.c.heartbeat_at.desc())).mappings().all()
            for other in others:
                if other["partitions"] != partitions and other["state"] == NodeState.RUNNING.value and \
                        moment - other["heartbeat_at"] <= alive:
                    return (f"partitions: {partitions} here, but node {other['node_id']} runs with "
                            f"{other['partitions']}: every node must split the queues the same way")
            queued = connection.execute(sa.select(sa.func.count()).select_from(deliveries).where(
                _QUEUED, deliveries.c.queue_partition.is_not(None))).scalar() or 0
            beyond = connection.execute(sa.select(sa.func.count()).select_from(deliveries).where(
                _QUEUED, deliveries.c.queue_partition >= partitions)).scalar() or 0
            mine = connection.execute(sa.select(nodes.c.partitions).where(nodes.c.node_id == node_id)).scalar()
        if beyond:
            return (f"partitions: {partitions} here, but {beyond} deliveries are queued in partitions {partitions} "
                    "and above, which no node would deliver; use the partitions the nodes used before until the "
                    "queues are empty")
        before = others[0]["partitions"] if others else mine  # what split the queues last
        if before not in (None, partitions) and queued:
            return (f"partitions: {partitions} here, but {queued} deliveries are queued in the {before} partitions "
                    f"the nodes used before: a patient's queued and new messages would be in different partitions "
                    f"and could overtake each other; keep partitions: {before} until the queues are empty")
        return None

    # -- leases --------------------------------------------------------------------------------
    def acquire_lease(self, name: str, owner: str, ttl: float, now: float | None = None) -> int | None:
        """Take or renew ``name`` for ``ttl`` seconds: its epoch (a new one unless ``owner`` held
        it live), or None when another owner holds it live."""
        from hl7relay.store.schema import leases

        with self.engine.begin() as connection:
            moment = db_now(connection) if now is None else now
            # the row is locked for the rest of this transaction (FOR UPDATE / SQLite's write lock)
            if connection.dialect.name == "sqlite":
                connection.exec_driver_sql("UPDATE leases SET name = name WHERE 0")  # take the write lock first
            query = sa.select(leases).where(leases.c.name == name)
            if connection.dialect.name == "postgresql":
                query = query.with_for_update()
            row = connection.execute(query).mappings().first()
            if row is None:
                try:
                    with connection.begin_nested():
                        connection.execute(leases.insert().values(name=name, owner=owner, epoch=1, acquired_at=moment,
                                                                  expires_at=moment + ttl))
                    return 1
                except sa.exc.IntegrityError:  # another node inserted it first: theirs, live
                    return None
            live = row["expires_at"] > moment
            if live and row["owner"] != owner:
                return None
            if live:  # a renewal: the same epoch
                connection.execute(leases.update().where(leases.c.name == name).values(expires_at=moment + ttl))
                return int(row["epoch"])
            epoch = int(row["epoch"]) + 1  # expired: whoever takes it now starts a new epoch
            connection.execute(leases.update().where(leases.c.name == name).values(
                owner=owner, epoch=epoch, acquired_at=moment, expires_at=moment + ttl))
            return epoch

    def renew_lease(self, name: str, owner: str, epoch: int, ttl: float, now: float | None = None) -> bool:
        """Extend a live lease this owner holds at this epoch; False when it is not so any more."""
        from hl7relay.store.schema import leases

        with self.engine.begin() as connection:
            moment = db_now(connection) if now is None else now
            done = connection.execute(leases.update().where(
                leases.c.name == name, leases.c.owner == owner, leases.c.epoch == epoch,
                leases.c.expires_at > moment).values(expires_at=moment + ttl))
            return done.rowcount == 1

    def release_lease(self, name: str, owner: str, epoch: int, now: float | None = None) -> bool:
        """Let it go now (a clean stop, a rebalance): the next taker need not wait for the ttl."""
        from hl7relay.store.schema import leases

        with self.engine.begin() as connection:
            moment = db_now(connection) if now is None else now
            done = connection.execute(leases.update().where(
                leases.c.name == name, leases.c.owner == owner, leases.c.epoch == epoch,
                leases.c.expires_at > moment).values(expires_at=moment))
            return done.rowcount == 1

    def leases(self, now: float | None = None) -> list[dict]:
        """Every lease, with the seconds it has left (0: expired)."""
        from hl7relay.store.schema import leases

        with self.engine.connect() as connection:
            moment = db_now(connection) if now is None else now
            rows = [dict(r) for r in connection.execute(sa.select(leases).order_by(leases.c.name)).mappings()]
        for row in rows:
            row["left"] = max(0.0, row["expires_at"] - moment)
        return rows

    def write_under_lease(self, name: str, owner: str, epoch: int, write, now: float | None = None) -> bool:
        """Run ``write(connection)`` in a transaction that commits only while ``owner`` holds
        ``name`` at ``epoch``; False (nothing written) when it does not: fenced."""
        with self.engine.begin() as connection:
            if not lease_is_held(connection, name, owner, epoch, now):
                return False
            write(connection)
            return True

    # -- commands to every node (hl7relay reload --cluster) ----------------------------------------
    def request_command(self, command: str, requested_by: str, reason: str, audit: dict) -> int:
        """A command every running node carries out at its next heartbeat; its id."""
        from hl7relay.store.schema import _audit_row, audit_log, cluster_commands

        with self.engine.begin() as connection:
            key = connection.execute(cluster_commands.insert().values(
                command=command, requested_at=db_now(connection), requested_by=requested_by,
                reason=reason[:500])).inserted_primary_key
            assert key is not None
            connection.execute(audit_log.insert().values(**_audit_row(dict(audit, target=f"cluster command {key[0]}"))))
            if connection.dialect.name == "postgresql":  # the nodes listening hear of it at its commit
                connection.execute(sa.text("SELECT pg_notify(:channel, :id)"),
                                   {"channel": COMMANDS_CHANNEL, "id": str(key[0])})
            return int(key[0])

    def command_listener(self):
        """A connection of its own, autocommit, listening on the commands' channel (PostgreSQL):
        its ``pgconn`` is read by the reactor (nodes.CommandListener); the caller closes it."""
        raw = self.engine.raw_connection()
        connection = raw.driver_connection
        raw.detach()  # not the pool's: it stays open, listening, for as long as the node runs
        connection.autocommit = True
        connection.execute(f"LISTEN {COMMANDS_CHANNEL}")
        return connection

    def commands_after(self, command_id: int) -> list[dict]:
        from hl7relay.store.schema import cluster_commands

        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(sa.select(cluster_commands).where(
                cluster_commands.c.id > command_id).order_by(cluster_commands.c.id)).mappings()]

    def last_command_id(self) -> int:
        from hl7relay.store.schema import cluster_commands

        with self.engine.connect() as connection:
            return int(connection.execute(sa.select(sa.func.max(cluster_commands.c.id))).scalar() or 0)

    def record_command_result(self, command_id: int, node_id: str, result: str, detail: str) -> None:
        from hl7relay.store.schema import cluster_command_results as results

        with self.engine.begin() as connection:
            connection.execute(results.insert().values(command_id=command_id, node_id=node_id,
                                                       finished_at=db_now(connection), result=result,
                                                       detail=detail[:4000]))

    def command_results(self, command_id: int) -> list[dict]:
        from hl7relay.store.schema import cluster_command_results as results

        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(sa.select(results).where(
                results.c.command_id == command_id).order_by(results.c.node_id)).mappings()]
