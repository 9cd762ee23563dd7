"""Events: components say what happened; observers (metrics, and later others) decide what to
do with it. Emitting costs one check when nobody listens.

    emit("message_received", channel="adt")
"""

from __future__ import annotations

__all__ = ["emit", "subscribe", "unsubscribe"]

_subscribers: list = []


def subscribe(observer) -> None:
    """``observer(event: str, fields: dict)`` is called for every event."""
    if observer not in _subscribers:
        _subscribers.append(observer)


def unsubscribe(observer) -> None:
    if observer in _subscribers:
        _subscribers.remove(observer)


def emit(event: str, **fields) -> None:
    if not _subscribers:
        return
    for observer in list(_subscribers):
        observer(event, fields)
