"""Events: components say what happened; observers (metrics, and later others) decide what to
do with it. Emitting costs one check when nobody listens.

    emit("message_received", channel="adt")
"""

from __future__ import annotations

__all__ = ["emit", "subscribe", "unsubscribe"]

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
