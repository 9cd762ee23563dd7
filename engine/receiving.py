"""Between a source and its channel: the :class:`Receiver` a source hands each message to and
writes whatever :class:`~hl7relay.ack.answer.Answer` it gets back.

A source (the MLLP listener now, HTTP next) turns bytes into a message and an answer into bytes;
what the answer says is decided in one place, the channel's ACK policy. The engine's running
channel is the receiver in production; :class:`Responder` makes one of a plain handler (a
function returning an :class:`~hl7relay.ack.Outcome`) and a policy, for a listener on its own.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from hl7relay.ack import AckPolicy, Outcome
from hl7relay.ack.answer import Answer, Receiver
from hl7relay.hl7.message import Message

__all__ = ["Receiver", "Responder", "Answer"]

log = Logger(namespace="hl7relay.listener")


class Responder:
    """A :class:`Receiver` made of a handler (message, peer) -> Outcome (or a Deferred of one) and
    the ACK policy that turns outcomes into answers (``policy``, read at each message: a channel's
    reload may replace it)."""

    def __init__(self, handler=None, policy: AckPolicy | None = None):
        self._handler = handler
        self.policy = policy if policy is not None else AckPolicy()

    def handle(self, message: Message, peer):
        """The handler's Outcome (or a Deferred of one) for this message."""
        return self._handler(message, peer)

    def receive(self, message: Message, peer) -> defer.Deferred:
        d = defer.maybeDeferred(self.handle, message, peer)
        d.addCallbacks(self._answer, self._handler_failed, callbackArgs=(message,), errbackArgs=(message, peer))
        return d

    def _answer(self, outcome: Outcome, message: Message) -> Answer:
        return self.policy.answer(message, outcome)

    def _handler_failed(self, failure, message: Message, peer) -> Answer:
        log.failure("handler failed for message {control_id} from {peer}", failure,
                    control_id=message.control_id, peer=str(peer))
        return self.policy.answer(message, Outcome.internal_error("the engine could not process the message"))

    def unreadable(self, text: str) -> Answer:
        return self.policy.unreadable(text)

    def too_large(self, header: Message | None, text: str) -> Answer:
        return self.policy.too_large(header, text)
