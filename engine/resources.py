"""What the engine's running parts are given, instead of the engine: a small, named set.

A trip, a source, a delivery and a queue each take a :class:`Resources` (clock, reactor, store
writer, events, counters, settings) and, where they hand messages on, the running channels by
name. None of them holds the :class:`~hl7relay.runtime.Engine`: what an operator may do to a
running engine goes through :class:`~hl7relay.controls.Controls`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hl7relay.events import emit
from hl7relay.stats import ChannelStats

__all__ = ["Resources", "Settings"]


@dataclass(slots=True)
class Settings:
    """The engine-wide settings its parts read."""

    data_dir: Path = Path("data")
    queue_poll_interval: float = 1.0  # how often a queue looks for deliveries due in the store
    log_phi_bytes: int = 512  # how much of a message a channel's log_phi trace line shows
    log_levels: Any = None  # what the log output lets through (logs.LogLevels); None: everything
    stop_timeout: float = 10.0  # how long a stop (or a retired queue) waits for what is in flight
    # the environment is read only (a PMS sandbox): every destination holds what it would send, and
    # sources leave the files they read where they are on a server
    read_only: bool = False


@dataclass(slots=True)
class Resources:
    """The engine's shared means, handed to each running part.

    ``in_flight`` counts the messages being processed, engine-wide (a stop waits for it to reach
    0); ``channels`` is the engine's running channels by name (a ``channel`` destination hands its
    messages to one; read only)."""

    reactor: Any
    writer: Any = None  # the StoreWriter: the one way in to the store for the engine's parts
    clock: Callable[[], float] = time.time
    settings: Settings = field(default_factory=Settings)
    stats: ChannelStats = field(default_factory=ChannelStats)
    emit: Callable[..., None] = emit
    tracer: Any = None  # message traces (ops/trace.py), when the command running the engine hands one in
    channels: Mapping = field(default_factory=dict)
    in_flight: int = 0
    # the credentials' authorizers (apiclient.credentials.Authorizers), made by the first
    # destination that names a credential: one token cache per credential, shared
    authorizers: Any = None

    def tracing(self, channel: str) -> bool:
        """Whether this channel's trace lines would be written (they cost a format each)."""
        levels = self.settings.log_levels
        return levels is None or levels.wants(channel, "trace")
