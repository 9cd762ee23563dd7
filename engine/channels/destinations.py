"""Where a channel sends what it processed: an MLLP peer, a file, or another channel."""

from __future__ import annotations

from collections import deque

import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from hl7relay.channels.sources import TLS_OPTIONS, tls_config
from hl7relay.spec import Option, register
from hl7relay.outcomes import DeliveryOutcome, DeliveryResult
from hl7relay.mllp.sender import SenderConfig, SendStatus

__all__ = ["MLLPDestinationConfig", "FileDestinationConfig", "ChannelDestinationConfig", "render_filename",
           "QueueOptions", "QUEUE_OPTIONS", "Delivery", "MLLPDelivery", "FileDelivery", "ChannelDelivery",
           "write_atomically"]


@dataclass(slots=True, frozen=True)
class QueueOptions:
    """How a destination's durable queue delivers: retries, backoff, order."""

    max_attempts: int = 10
    retry_initial: float = 1.0
    retry_max: float = 30.0
    order: str = "in_order"  # or per_key, none
    order_key: str = "PID-3.1"
    parallel: int = 1  # deliveries in flight at once (MLLP: one connection each)
    give_up_after: float = 0.0  # seconds; 0: failures that are not the peer's refusal are retried for ever


# Why these defaults: a peer that is down or slow (connection refused, no ACK in time, disk full)
# says nothing about the message, and dead-lettering it would park a message and, with in_order,
# let the ones behind it overtake it. So only the peer's explicit refusals (AR/CR) count towards
# max_attempts (AE goes to ERROR at once: it needs a person), everything else is retried for
# ever, and retry_max is short so a peer that comes back is served within 30 s.
QUEUE_OPTIONS = [
    Option("max_attempts", "int", 10, "attempts the peer refuses (AR/CR) before the delivery goes to ERROR "
           "(the dead-letter state); AE goes there at once; connection failures and timeouts do not count"),
    Option("retry_initial", "duration", 1.0, "seconds before the first retry (doubles each time, with jitter)"),
    Option("retry_max", "duration", 30.0, "longest wait between retries"),
    Option("give_up_after", "duration", 0.0, "dead-letter a delivery still failing to reach the peer (refused, "
           "timed out) this many seconds after the message arrived; 0: retry indefinitely"),
    Option("order", "enum", "in_order", "in_order: one at a time in order of receipt (a failing head blocks); "
           "per_key: in order per order_key, keys in parallel; none: no order kept",
           ("in_order", "per_key", "none")),
    Option("order_key", "hl7path", "PID-3.1", "with order: per_key, what keeps messages in order (e.g. the patient)"),
    Option("parallel", "int", 1, "deliveries in flight at once, each on its own connection for MLLP "
           "(needs order: per_key or none; a key still goes one message at a time)"),
]


def queue_options(options) -> QueueOptions:
    if options["max_attempts"] < 1:
        raise ValueError("max_attempts must be at least 1")
    if not 1 <= options["parallel"] <= 64:
        raise ValueError("parallel must be between 1 and 64")
    if options["parallel"] > 1 and options["order"] == "in_order":
        raise ValueError("parallel > 1 needs order: per_key or none (in_order sends one message at a time)")
    if options["give_up_after"] < 0:
        raise ValueError("give_up_after must be 0 (never) or more")
    return QueueOptions(options["max_attempts"], options["retry_initial"], options["retry_max"], options["order"],
                        options["order_key"], options["parallel"], options["give_up_after"])


@dataclass(slots=True)
class MLLPDestinationConfig:
    sender: SenderConfig
    queue: QueueOptions = QueueOptions()
    check_round_trip: bool = False  # hl7relay check sends a harmless message too (off: some peers file everything)
    check_message: str | None = None  # that message (a file); None: an NMQ^N01 clock query


@register("destination", "mllp", "send over MLLP and record the peer's ACK", [
    Option("host", "str", description="peer host"),
    Option("port", "int", description="peer port"),
    Option("connect_timeout", "duration", 10.0, "seconds to wait to connect"),
    Option("ack_timeout", "duration", 30.0, "seconds to wait for the ACK"),
    *TLS_OPTIONS,
    Option("tls", "bool", False, "use TLS (verify against the system trust store or tls_ca)"),
    Option("check_round_trip", "bool", False, "hl7relay check also sends a harmless message and waits for its ACK"),
    Option("check_message", "str", None, "the message hl7relay check sends (a file; default: an NMQ^N01 clock query)"),
    *QUEUE_OPTIONS,
])
def _mllp(options, context=None):
    if not 1 <= options["port"] <= 65535:  # 0, -1, 70000: messages would queue for ever
        raise ValueError(f"port {options['port']} is not a port a peer can listen on (1 to 65535)")
    check_message = options["check_message"]
    if check_message is not None:
        base = getattr(context, "base_dir", None)
        path = Path(check_message) if base is None or Path(check_message).is_absolute() else Path(base) / check_message
        if not path.is_file():
            raise ValueError(f"check_message file {check_message!r} does not exist")
        check_message = str(path)
    return MLLPDestinationConfig(SenderConfig(options["host"], options["port"], options["connect_timeout"],
                                              options["ack_timeout"],
                                              tls=tls_config(options, False, getattr(context, "base_dir", None))),
                                 queue_options(options), options["check_round_trip"], check_message)


_TEMPLATE = re.compile(r"\{([^{}]+)\}")


def render_filename(template: str, message, now) -> str:
    """``{MSH-10}``, ``{PID-3.1}`` (HL7 paths) and ``{now:%Y%m%d}`` in a file name template;
    characters unsafe in file names become ``_``."""
    def replace(match):
        key = match.group(1)
        if key.startswith("now"):
            fmt = key[4:] if key.startswith("now:") else "%Y%m%d%H%M%S"
            return now.strftime(fmt)
        return message.get(key) or "none"

    name = _TEMPLATE.sub(replace, template)
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


@dataclass(slots=True)
class FileDestinationConfig:
    directory: str
    filename: str
    queue: QueueOptions = QueueOptions()
    mode: int = 0o640  # the files hold PHI: owner read/write, group read, nobody else


@register("destination", "file", "write each message to a file (atomically: temp file, then rename)", [
    Option("directory", "str", description="output folder (created if missing)"),
    Option("filename", "str", "{MSH-10}.hl7", "name template: HL7 paths and {now:%Y%m%d...} in braces"),
    Option("mode", "str", "0640", "permissions of the files written, in octal (they hold PHI: never readable by "
           "others unless you say so); a folder created for them gets 0750 (or 0700 with a mode without group bits)"),
    *QUEUE_OPTIONS,
])
def _file(options, context=None):
    text = str(options["mode"]).strip()
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f"mode {text!r} is not an octal file mode such as 0640 or 0600") from None
    if not 0o400 <= mode <= 0o777 or not mode & 0o400:
        raise ValueError(f"mode {text!r} must let the engine read its own files (0400 to 0777, e.g. 0640)")
    for key in _TEMPLATE.findall(options["filename"]):
        if not key.startswith("now"):
            from hl7relay.hl7.path import parse_path

            parse_path(key)  # a bad path is a lint error now, not a delivery error later
    return FileDestinationConfig(options["directory"], options["filename"], queue_options(options), mode)


@dataclass(slots=True)
class ChannelDestinationConfig:
    channel: str
    queue: QueueOptions = QueueOptions()


@register("destination", "channel", "hand the message to another channel of this engine", [
    Option("channel", "str", description="the other channel's name"), *QUEUE_OPTIONS], shorthand="channel")
def _channel(options, context=None):
    return ChannelDestinationConfig(options["channel"], queue_options(options))



# -- the running part of each destination type -------------------------------------------------------
# A destination's config names its runner (``runner``): what the engine builds to deliver, one per
# destination, started with its queue and closed when the destination goes (stop, reload, removal).
# Adding a destination type touches this module only. ``resources`` (resources.py): the reactor,
# and the running channels a ``channel`` destination hands its messages to.

class Delivery:
    """Delivers one message: returns a DeliveryResult or a Deferred of one."""

    keyed = False  # deliver(message, message_id): it needs the delivery's identity (an idempotency key)

    def __init__(self, config, resources):
        self.config = config
        self.resources = resources

    def deliver(self, message):  # pragma: no cover - interface
        raise NotImplementedError

    def skip_backoff(self) -> None:
        """An operator's retry now: connect again at once."""

    def stopping(self) -> None:
        """The engine is stopping: finish what is held (a batch is written now, not at its age)."""

    view: Any = None  # or a method: what the destination adds to its queue's view (sync status)

    def close(self) -> None:
        """The destination goes: drop what it holds open."""


class MLLPDelivery(Delivery):
    """One connection per delivery in flight, ``parallel`` at most. One queue never has more out;
    a cluster's partitions of the destination share these connections, so a delivery may wait
    for one to be free (the queues' own order per key holds: a key is in one partition)."""

    def __init__(self, config, resources):
        super().__init__(config, resources)
        import dataclasses

        from hl7relay.mllp.sender import MLLPSender

        # the queue owns the retry schedule (retry_initial..retry_max): a sender's own connection
        # backoff on top of it (up to 60 s) kept a peer that came back waiting past retry_max, and
        # an after_delivery sender waiting a minute for an AR it could have had at once
        sender = dataclasses.replace(config.sender, backoff_initial=0.0, backoff_max=0.0)
        self.senders = [MLLPSender(sender, resources.reactor) for _ in range(config.queue.parallel)]
        self._idle = list(self.senders)
        self._waiting: deque = deque()  # deliveries waiting for a free connection (a cluster's partitions)

    def deliver(self, message):
        if not self._idle:
            from twisted.internet import defer

            waiting: defer.Deferred = defer.Deferred()
            self._waiting.append(waiting)
            return waiting.addCallback(lambda _: self.deliver(message))
        sender = self._idle.pop()

        def release(result):
            self._idle.append(sender)
            if self._waiting:  # the next waiting delivery takes it at once
                self._waiting.popleft().callback(None)
            return result

        def answered(r):
            status = r.status
            # the peer's ACK itself is kept, so support can read what it said (masked)
            return DeliveryResult(r.ok, status is SendStatus.APPLICATION_ERROR,
                                  ack=r.ack_as_text() or (r.ack_code + " " + r.text).strip(),
                                  error="" if r.ok else f"{status.value}: {r.text}".strip(),
                                  rejected=status is SendStatus.REJECTED,
                                  outcome=_UNREACHABLE if status is SendStatus.CONNECTION_FAILED
                                  else _TIMED_OUT if status is SendStatus.TIMED_OUT else None)

        return sender.send(message).addBoth(release).addCallback(answered)

    def skip_backoff(self) -> None:
        for sender in self.senders:
            sender.skip_backoff()

    def close(self) -> None:
        for sender in self.senders:
            sender.close()
        while self._waiting:  # their queues are stopping: they record a failed attempt, not a send
            self._waiting.popleft().errback(RuntimeError("the destination closed"))


class FileDelivery(Delivery):
    def __init__(self, config, resources):
        super().__init__(config, resources)
        directory = Path(config.directory)
        self.directory = directory if directory.is_absolute() else Path(os.getcwd()) / directory

    def deliver(self, message):
        from twisted.internet import threads

        name = render_filename(self.config.filename, message, datetime.now())
        return threads.deferToThread(write_atomically, self.directory, name, message.to_bytes(), self.config.mode)


class ChannelDelivery(Delivery):
    def deliver(self, message):
        from hl7relay.ack.outcome import Status

        target = self.resources.channels.get(self.config.channel)
        if target is None or not target.enabled:
            return DeliveryResult(False, error=f"channel {self.config.channel!r} is not running", outcome=_UNREACHABLE)
        d = target.handle(message.copy(), f"channel:{self.config.channel}")
        d.addCallback(lambda o: DeliveryResult(o.status in (Status.ACCEPTED, Status.FILTERED), o.status is Status.ERROR,
                                               ack=o.status.value,
                                               error="" if o.status in (Status.ACCEPTED, Status.FILTERED) else o.text,
                                               rejected=o.status is Status.REJECTED))
        return d


def write_atomically(directory: Path, name: str, data: bytes, mode: int = 0o640) -> DeliveryResult:
    """Write to a temporary name in the same folder, flush it to disk, then rename over the target.
    The file gets ``mode`` whatever the umask (the engine runs with 077), never more."""
    if not directory.is_dir():
        directory.mkdir(parents=True, exist_ok=True, mode=0o750 if mode & 0o070 else 0o700)
        os.chmod(directory, 0o750 if mode & 0o070 else 0o700)  # mkdir's mode passes through the umask
    target = directory / name
    temporary = directory / f".{name}.{os.getpid()}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, target)
    return DeliveryResult(True, ack=f"written {target}")


_UNREACHABLE, _TIMED_OUT = DeliveryOutcome.UNREACHABLE, DeliveryOutcome.TIMED_OUT
MLLPDestinationConfig.runner = MLLPDelivery
FileDestinationConfig.runner = FileDelivery
ChannelDestinationConfig.runner = ChannelDelivery
