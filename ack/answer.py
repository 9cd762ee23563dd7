"""What a source writes back to a sender (the frames its channel's ACK policy made, in order), and
the :class:`Receiver` a source hands its messages to for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from hl7relay.hl7.message import Message

__all__ = ["Answer", "Receiver"]


@dataclass(slots=True)
class Answer:
    """The frames to write (none: a message that is itself an ACK, or an enhanced-mode sender
    that asked for none), and whether the connection closes once they are written (a frame over
    the size limit: what follows it on the wire cannot be trusted)."""

    frames: list
    close: bool = False


class Receiver(Protocol):
    """What a source hands its messages to. Every answer comes from here: a source never builds
    an ACK of its own."""

    def receive(self, message: Message, peer) -> Deferred:
        """Handle one message; a Deferred firing with its :class:`Answer`. Never fails: a handler
        that fails is answered AR (CR in enhanced mode) with 207."""

    def unreadable(self, text: str) -> Answer:
        """The answer to a payload that is not an HL7 message."""

    def too_large(self, header: Message | None, text: str) -> Answer:
        """The answer to a payload over the source's limit (``header``: its MSH, when readable)."""
