"""This engine on its store's node registry (issue #31): registered at start, a heartbeat every
few seconds with the configuration snapshot it runs, stopped at a clean stop. PostgreSQL stores
only (the store several engines share); ``hl7relay status``, the API and the console read it.

A cluster's commands (``hl7relay reload --cluster``) are rows in the store: a node hears of one
at once through PostgreSQL's LISTEN/NOTIFY (a connection of its own the reactor reads), and looks
for them at each heartbeat too, so that a notification lost with that connection (a database
restart) only delays a command until the next beat."""

from __future__ import annotations

import enum
import os
import socket

from twisted.internet import defer, task
from twisted.logger import Logger

__all__ = ["NodeBeat", "CommandListener", "HEARTBEAT_SECONDS", "ALIVE_SECONDS", "node_id", "drift"]

log = Logger(namespace="hl7relay.nodes")
HEARTBEAT_SECONDS = 5.0
ALIVE_SECONDS = 3 * HEARTBEAT_SECONDS  # a running node not heard from for longer is said lost


def node_id() -> str:
    """This engine's name among the nodes: its host's."""
    return socket.gethostname()


def drift(rows: list[dict]) -> list[dict]:
    """The live running nodes when they do not all run the same channel files (else []): each
    reports the hash of the files as written (snapshot_sha256: its snapshot's source hash), the
    same on every node that runs them whatever its own settings file says."""
    live = [r for r in rows if r["state"] == "running" and r["heartbeat_age"] <= ALIVE_SECONDS]
    return live if len({r["snapshot_sha256"] for r in live}) > 1 else []


class NodeBeat:
    """Registers the node, then beats every ``interval`` seconds on the writer's thread; a failed
    beat is logged once until one succeeds again (the store being down is said elsewhere)."""

    def __init__(self, writer, reactor, configuration, version: str, interval: float = HEARTBEAT_SECONDS,
                 name: str | None = None, on_command=None, partitions: int | None = None):
        self.writer, self.reactor, self.version, self.interval = writer, reactor, version, interval
        # a cluster's commands (hl7relay reload --cluster): on_command(row) -> Deferred (result, detail),
        # for those asked after this node started, looked for at each beat
        self.on_command = on_command
        self._last_command: int | None = None
        self.configuration = configuration  # () -> {"snapshot": id, "sha256": ...}: what the engine runs now
        self.name = name or node_id()
        self.partitions = partitions  # a cluster node's split of the queues, recorded for the others to compare
        self._loop: task.LoopingCall | None = None
        self._failing = False
        self.listener: CommandListener | None = None
        self._looking: defer.Deferred | None = None
        self._look_again = False

    def start(self) -> defer.Deferred:
        if self.on_command is not None:
            self.writer.read(self.writer.store.last_command_id).addCallbacks(
                lambda last: setattr(self, "_last_command", last), lambda failure: None)
            self.listener = CommandListener(self.writer, self.reactor, self.look_for_commands)
            self.listener.listen()
        running = self.configuration()
        registered = self.writer.read(self.writer.store.register_node, self.name, socket.gethostname(), os.getpid(),
                                      self.version, running.get("snapshot"), running.get("sha256") or "", None,
                                      self.partitions)
        self._loop = task.LoopingCall(self._beat)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)
        return registered

    def _beat(self) -> defer.Deferred:
        running = self.configuration()
        beat = self.writer.read(self.writer.store.heartbeat, self.name, running.get("snapshot"),
                                running.get("sha256") or "")

        def beaten(_):
            if self._failing:
                log.info("node heartbeat: recorded again")
            self._failing = False
            if self.listener is not None and not self.listener.listening:
                self.listener.listen()  # e.g. after the database came back
            return self.look_for_commands()

        def failed(failure):
            if not self._failing:
                log.warn("node heartbeat not recorded: {error}", error=failure.getErrorMessage())
            self._failing = True

        return beat.addCallbacks(beaten, failed)

    def look_for_commands(self) -> defer.Deferred | None:
        """Carry out the commands asked since the last one seen (one look at a time: a notice
        that comes during a look is looked at after it)."""
        if self.on_command is None or self._last_command is None:
            return None
        if self._looking is not None:
            self._look_again = True
            return None

        def looked(result):
            self._looking = None
            if self._look_again:
                self._look_again = False
                self.look_for_commands()
            return result

        self._looking = self.writer.read(self.writer.store.commands_after, self._last_command).addCallback(
            self._carry_out).addBoth(looked)
        return self._looking

    @defer.inlineCallbacks
    def _carry_out(self, commands: list[dict]):
        for command in commands:
            self._last_command = command["id"]
            log.info("cluster command {id}: {command} by {by}", id=command["id"], command=command["command"],
                     by=command["requested_by"])
            try:
                result, detail = yield defer.maybeDeferred(self.on_command, command)
            except Exception as exc:  # noqa: BLE001 - said in the answer, not a crash
                result, detail = "failed", str(exc)
            yield self.writer.read(self.writer.store.record_command_result, command["id"], self.name, result, detail)

    def stop(self) -> defer.Deferred:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self.listener is not None:
            self.listener.close()
        return self.writer.read(self.writer.store.node_stopped, self.name).addErrback(
            lambda failure: log.warn("node not marked stopped: {error}", error=failure.getErrorMessage()))


class ListenerState(enum.Enum):
    CLOSED = "closed"
    CONNECTING = "connecting"  # the connection and its LISTEN, on the store's thread
    LISTENING = "listening"  # its socket read by the reactor
    STOPPED = "stopped"  # the node stops: no new connection


class CommandListener:
    """LISTEN on the store's commands channel: ``heard()`` on each notification. The connection is
    the store's own kind (the same URL, hosts and TLS), opened on the store's thread; its socket
    is read by the reactor without blocking. When it breaks it is closed, and ``listen()`` (the
    next heartbeat) opens another."""

    def __init__(self, writer, reactor, heard):
        self.writer, self.reactor, self.heard = writer, reactor, heard
        self.state = ListenerState.CLOSED
        self.connection = None
        self._fd = -1
        self.notices = 0

    @property
    def listening(self) -> bool:
        return self.state in (ListenerState.LISTENING, ListenerState.CONNECTING)

    def listen(self) -> None:
        if self.state is not ListenerState.CLOSED or not hasattr(self.writer.store, "command_listener"):
            return
        self.state = ListenerState.CONNECTING
        self.writer.read(self.writer.store.command_listener).addCallbacks(self._connected, self._failed)

    def _connected(self, connection) -> None:
        if self.state is not ListenerState.CONNECTING:  # stopped meanwhile
            connection.close()
            return
        self.connection, self.state = connection, ListenerState.LISTENING
        # the reactor watches a descriptor of our own: libpq closes its socket when the connection
        # breaks, and a closed (or reused) number must never be what the reactor unregisters
        self._fd = os.dup(connection.pgconn.socket)
        self.reactor.addReader(self)
        self.heard()  # what was asked while it was not listening

    def _failed(self, failure) -> None:
        if self.state is ListenerState.CONNECTING:
            self.state = ListenerState.CLOSED
        log.warn("cluster commands: not listening ({error}); looked for at each heartbeat",
                  error=failure.getErrorMessage())

    # IReadDescriptor
    def fileno(self) -> int:
        return self._fd

    def doRead(self):
        from twisted.internet import main

        pgconn = self.connection.pgconn
        try:
            pgconn.consume_input()
            notified = False
            while pgconn.notifies() is not None:
                notified = True
            if pgconn.status != 0:  # CONNECTION_OK
                return main.CONNECTION_LOST
        except Exception:  # noqa: BLE001 - the database went away: read again from a new connection
            return main.CONNECTION_LOST
        if notified:
            self.notices += 1
            self.heard()
        return None

    def connectionLost(self, reason) -> None:
        self._drop()

    def logPrefix(self) -> str:
        return "cluster-commands"

    def _drop(self) -> None:
        if self._fd != -1:
            self.reactor.removeReader(self)
            os.close(self._fd)
            self._fd = -1
        connection, self.connection = self.connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
        if self.state is not ListenerState.STOPPED:
            self.state = ListenerState.CLOSED

    def close(self) -> None:
        self.state = ListenerState.STOPPED
        self._drop()
