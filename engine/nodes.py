"""This engine on its store's node registry (issue #31): registered at start, a heartbeat every
few seconds with the configuration snapshot it runs, stopped at a clean stop. PostgreSQL stores
only (the store several engines share); ``hl7relay status``, the API and the console read it."""

from __future__ import annotations

import os
import socket

from twisted.internet import defer, task
from twisted.logger import Logger

__all__ = ["NodeBeat", "HEARTBEAT_SECONDS", "ALIVE_SECONDS", "node_id", "drift"]

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
                 name: str | None = None, on_command=None):
        self.writer, self.reactor, self.version, self.interval = writer, reactor, version, interval
        # a cluster's commands (hl7relay reload --cluster): on_command(row) -> Deferred (result, detail),
        # for those asked after this node started, looked for at each beat
        self.on_command = on_command
        self._last_command: int | None = None
        self.configuration = configuration  # () -> {"snapshot": id, "sha256": ...}: what the engine runs now
        self.name = name or node_id()
        self._loop: task.LoopingCall | None = None
        self._failing = False

    def start(self) -> defer.Deferred:
        if self.on_command is not None:
            self.writer.read(self.writer.store.last_command_id).addCallbacks(
                lambda last: setattr(self, "_last_command", last), lambda failure: None)
        running = self.configuration()
        registered = self.writer.read(self.writer.store.register_node, self.name, socket.gethostname(), os.getpid(),
                                      self.version, running.get("snapshot"), running.get("sha256") or "")
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
            if self.on_command is not None and self._last_command is not None:
                return self.writer.read(self.writer.store.commands_after, self._last_command).addCallback(self._carry_out)

        def failed(failure):
            if not self._failing:
                log.warn("node heartbeat not recorded: {error}", error=failure.getErrorMessage())
            self._failing = True

        return beat.addCallbacks(beaten, failed)

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
        return self.writer.read(self.writer.store.node_stopped, self.name).addErrback(
            lambda failure: log.warn("node not marked stopped: {error}", error=failure.getErrorMessage()))
