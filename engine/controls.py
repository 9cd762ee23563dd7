"""The one way into a running engine from outside it: what the operations API, the console, the
alerts and the readiness check may read of it and do to it.

They hold a :class:`Controls`, never the :class:`~hl7relay.runtime.Engine`: what is here is all
they can reach (views, the operator's switches, reload), so the engine's insides can change
without them. The command that runs the engine (``cli/run.py``) builds it and hands in what it
installed beside the engine: the performance analyzer and the alerts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from hl7relay.channels.channel import Channel
    from hl7relay.runtime import Engine

__all__ = ["Controls"]

# what the sync status shows of a queue's view
_SYNC_KEYS = ("state", "paused", "held", "depth", "oldest_age", "in_flight", "last_sent_at", "last_error",
              "last_error_class", "last_error_at", "rate_limited_since", "wait_left", "sent", "failed", "api")


class Controls:
    def __init__(self, engine: Engine, performance: Any = None, alerts: Any = None, environment: Any = None):
        self._engine = engine
        self.performance = performance  # ops/perf.Performance, when installed
        self.alerts = alerts  # ops/alerts.Alerts, when running
        self.environment = environment  # environments.Environment the engine runs in (--env), or None

    # -- what it runs on ------------------------------------------------------------------------------
    @property
    def reactor(self):
        return self._engine.reactor

    @property
    def writer(self):
        """The store writer: reads of the store that must not wait behind a search (tokens,
        users, the audit log) and the audit rows of actions."""
        return self._engine.writer

    def clock(self) -> float:
        return self._engine.clock()

    @property
    def tracer(self):
        return self._engine.tracer

    @property
    def started(self) -> bool:
        return self._engine.started

    @property
    def stopping(self) -> bool:
        return self._engine.stopping

    # -- what it runs ---------------------------------------------------------------------------------
    def channel_names(self) -> list[str]:
        return sorted(self._engine.channels)

    def has_channel(self, name: str) -> bool:
        return name in self._engine.channels

    def channel(self, name: str) -> Channel:
        """The running configuration of a channel; KeyError when it is not running."""
        return self._running(name).channel

    def channels(self) -> dict[str, Channel]:
        """The running configuration of every channel, by name."""
        return {name: running.channel for name, running in self._engine.channels.items()}

    def destinations(self) -> Iterator[tuple[str, str, str]]:
        """(channel, destination, type) of every running channel's destinations."""
        for name, running in sorted(self._engine.channels.items()):
            for destination in running.channel.destinations:
                if destination.name in running.queues:
                    yield name, destination.name, destination.type

    def has_destination(self, destination: str) -> bool:
        return any(destination in running.queues for running in self._engine.channels.values())

    def queue_views(self) -> Iterator[tuple[str, str, dict]]:
        """(channel, destination, its queue's view) of every queue."""
        for name, running in self._engine.channels.items():
            for destination, queue in running.queues.items():
                yield name, destination, queue.view()

    def sync_view(self) -> list[dict]:
        """Per destination, how its synchronisation stands (the sync status): its state, queue depth
        and age, last success, last error and its class (auth, rate limited, refused, unreachable),
        and for an API its token's expiry and its rate limiter. Error texts as the queue has them
        (the API masks them)."""
        types = {(channel, name): kind for channel, name, kind in self.destinations()}
        rows = []
        for channel, destination, view in self.queue_views():
            rows.append({"channel": channel, "destination": destination, "type": types.get((channel, destination)),
                         **{key: view.get(key) for key in _SYNC_KEYS}})
        return rows

    def carrying(self, types) -> tuple[set, set]:
        """The channels whose source, and the (channel, destination) pairs whose destination, is of
        one of ``types`` (e.g. {"http"}): what a trace narrowed to API calls follows."""
        channels = self.channels()
        pairs = {(owner, name) for owner, name, kind in self.destinations() if kind in types}
        if "fhir-content" in types:  # an http or file destination whose last transformer is fhir carries FHIR too
            pairs |= {(owner, d.name) for owner, channel in channels.items() for d in channel.destinations
                      if d.steps and getattr(d.steps[-1], "converts", False)}
        return {name for name, c in channels.items() if c.source_type in types}, pairs

    def unbound_channels(self) -> list[str]:
        """Enabled channels whose source is not open (a listener not bound)."""
        return [name for name, running in self._engine.channels.items()
                if running.enabled and (running.source is None or not running.source.bound)]

    # -- views ----------------------------------------------------------------------------------------
    def status(self) -> dict:
        return self._engine.status()

    def channel_view(self, name: str) -> dict:
        return self._engine.channel_view(name)

    def connections_view(self, name: str) -> dict:
        return self._engine.connections_view(name)

    def source_views(self) -> dict[str, dict]:
        return self._engine.source_views()

    def queue_view(self, channel: str, destination: str) -> dict:
        return self._engine.queue(channel, destination).view()

    # -- the operators' switches (KeyError at once for a channel or destination not running) ----------
    def set_channel_enabled(self, channel: str, enabled: bool, actor: str = "", audit: dict | None = None) -> Deferred:
        self._running(channel)
        return self._engine.set_channel_enabled(channel, enabled, actor, audit)

    def set_destination_paused(self, channel: str, destination: str, paused: bool, actor: str = "",
                               audit: dict | None = None) -> Deferred:
        self._engine.queue(channel, destination)
        return self._engine.set_destination_paused(channel, destination, paused, actor, audit)

    def retry_now(self, channel: str, destination: str, actor: str = "", audit: dict | None = None) -> Deferred:
        self._engine.queue(channel, destination)
        return self._engine.retry_now(channel, destination, actor, audit)

    def reload_from_files(self, actor: str = "", audit: dict | None = None) -> Deferred:
        return self._engine.reload_from_files(actor, audit)

    def rollback(self, snapshot_id: int, actor: str = "", note: str = "", audit: dict | None = None) -> Deferred:
        return self._engine.rollback(snapshot_id, actor, note, audit)

    def configuration_view(self) -> dict:
        return self._engine.configuration_view()

    def channel_paths(self) -> list:
        """Where the engine reads its channel files (replay as processed reads snapshots for them)."""
        return list(self._engine.channel_paths)

    def _running(self, name: str):
        return self._engine.running_channel(name)
