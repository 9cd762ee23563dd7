"""Events: components say what happened; observers (metrics, and later others) decide what to
do with it. Emitting costs one check when nobody listens.

    emit("message_received", channel="adt")
"""

from __future__ import annotations

__all__ = ["emit", "relay", "subscribe", "unsubscribe", "EVENTS"]

# Every event, with the fields it carries. emit() does not check them (it is on the hot path);
# tests/test_observability.py checks every emit() in the code against this table, and that the
# metrics module handles every event.
EVENTS = {
    "message_received": {"channel"},
    "message_processed": {"channel", "status", "ack_codes", "ack_latency", "stages", "message_id", "message_type",
                          "control_id", "peer"},
    "store_failed": {"channel"},
    "store_commit": {"seconds", "size"},
    "delivery_sent": {"channel", "destination", "message_id", "attempts", "seconds", "ack", "error"},
    "delivery_failed": {"channel", "destination", "message_id", "attempts", "seconds", "ack", "error"},
    "delivery_retried": {"channel", "destination", "message_id", "attempts", "seconds", "ack", "error"},
    "queue_state": {"channel", "destination", "depth", "oldest_age"},
    "destination_state": {"channel", "destination", "connected"},
    "connection_opened": {"listener"},
    "connection_closed": {"listener"},
    "connection_refused": {"listener", "reason"},
    "connection_evicted": {"listener"},
    "bytes_discarded": {"listener", "count"},
    "frame_discarded": {"listener", "reason"},
    "file_read": {"channel", "file", "file_id", "state", "messages", "errors"},
    "lease_changed": {"change", "held", "lease"},  # a cluster's lease taken, lost or released (leases.py)
    "writes_fenced": {"count"},  # delivery results left out: their lease had moved on (store/writer.py)
}

_registered: tuple = ()  # (observer, the events it wants or None for all), in order
_subscribers: tuple = ()  # the observers of every event
# event -> its observers: replaced, never changed in place, so emit() iterates without a copy
_by_event: dict = {}


def subscribe(observer, events=None) -> None:
    """``observer(event: str, fields: dict)`` is called for every event, or only for ``events``
    (an observer that wants three events is not called for the others: the tracer, the analyzer)."""
    global _registered
    if all(o != observer for o, _ in _registered):
        _registered = (*_registered, (observer, frozenset(events) if events is not None else None))
        _rebuild()


def unsubscribe(observer) -> None:
    global _registered
    _registered = tuple((o, e) for o, e in _registered if o != observer)
    _rebuild()


def _rebuild() -> None:
    global _subscribers, _by_event
    _subscribers = tuple(o for o, e in _registered if e is None)
    _by_event = {name: tuple(o for o, e in _registered if e is None or name in e) for name in EVENTS}


def emit(event: str, **fields) -> None:
    for observer in _by_event.get(event, _subscribers):
        observer(event, fields)


def relay(event: str, fields: dict) -> None:
    """An event emitted in another process of the engine (the forwarder), told here: observers
    see it as if it had happened here. Its name and fields were checked where it was emitted."""
    if event in EVENTS:
        for observer in _by_event.get(event, _subscribers):
            observer(event, fields)
