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
}

_subscribers: tuple = ()  # replaced, never changed in place: emit() iterates it without a copy


def subscribe(observer) -> None:
    """``observer(event: str, fields: dict)`` is called for every event."""
    global _subscribers
    if observer not in _subscribers:
        _subscribers = (*_subscribers, observer)


def unsubscribe(observer) -> None:
    global _subscribers
    _subscribers = tuple(o for o in _subscribers if o != observer)


def emit(event: str, **fields) -> None:
    for observer in _subscribers:
        observer(event, fields)


def relay(event: str, fields: dict) -> None:
    """An event emitted in another process of the engine (the forwarder), told here: observers
    see it as if it had happened here. Its name and fields were checked where it was emitted."""
    if event in EVENTS:
        for observer in _subscribers:
            observer(event, fields)
