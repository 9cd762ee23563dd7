"""Forwarding in a process of its own.

With ``forwarding: process`` (``hl7relay run --forwarding process``) the engine's process reads,
processes, stores and acknowledges messages, and a child process (:mod:`.child`) delivers them:
it runs the destination queues and their connections (MLLP senders, file writers), so the ACK
path never shares its thread with a destination. The parent (:mod:`.parent`) tells the child
about each delivery row right after its commit and records the results the child reports, so
the store keeps one writer (SQLite needs that); the child reads queued rows from the store
itself (after a restart, or replays). At-least-once, ordering modes and restart behaviour are the
queues' own, unchanged (:mod:`hl7relay.queues`). Destinations of type ``channel`` hand messages to
this engine's own channels, so they stay in the engine's process.
"""

__all__ = ["ForwarderProcess", "RemoteQueue"]


def __getattr__(name):  # the parent's classes without importing Twisted's process machinery for the child
    if name in __all__:
        from hl7relay.forwarder import parent

        return getattr(parent, name)
    raise AttributeError(name)
