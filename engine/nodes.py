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
                 name: str | None = None):
        self.writer, self.reactor, self.version, self.interval = writer, reactor, version, interval
        self.configuration = configuration  # () -> {"snapshot": id, "sha256": ...}: what the engine runs now
        self.name = name or node_id()
        self._loop: task.LoopingCall | None = None
        self._failing = False

    def start(self) -> defer.Deferred:
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

        def failed(failure):
            if not self._failing:
                log.warn("node heartbeat not recorded: {error}", error=failure.getErrorMessage())
            self._failing = True

        return beat.addCallbacks(beaten, failed)

    def stop(self) -> defer.Deferred:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self.writer.read(self.writer.store.node_stopped, self.name).addErrback(
            lambda failure: log.warn("node not marked stopped: {error}", error=failure.getErrorMessage()))
