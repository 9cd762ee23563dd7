"""The ``batch`` destination: messages gathered into HL7 batch files (FHS/BHS ... BTS/FTS).

A batch fills with the messages its queue hands it, in the order they were received, and is
written when it has ``max_messages`` or ``max_bytes``, when its first message is ``max_age``
seconds old, or at the times of ``flush`` (a cron expression). It is written whole to a hidden
``.part`` name, flushed to disk, then given its name, which never replaces a file there; only
then are its deliveries SENT. A crash before that leaves them QUEUED: they go into a new batch
after the restart, and a half-written batch is never seen under a batch file's name.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger

from hl7relay.channels.destinations import QUEUE_OPTIONS, Delivery, QueueOptions, queue_options
from hl7relay.channels.files import archive
from hl7relay.channels.schedules import Schedule, schedule_from
from hl7relay.outcomes import DeliveryResult
from hl7relay.spec import Option, register

__all__ = ["BatchDestinationConfig", "BatchDelivery", "batch_bytes", "MAX_BATCH_MESSAGES"]

log = Logger(namespace="hl7relay.queue")

# a batch holds the queue's deliveries in flight, and a queue keeps 2,000 in memory: a batch is
# written by 1,000 at most, so the queue always has room for the next one's
MAX_BATCH_MESSAGES = 1000
_PART_PREFIX = ".hl7relay-batch-"


@dataclass(slots=True)
class BatchDestinationConfig:
    directory: str
    filename: str
    max_messages: int
    max_bytes: int
    max_age: float
    flush: Schedule | None
    sending_application: str | None
    sending_facility: str | None
    receiving_application: str | None
    receiving_facility: str | None
    mode: int
    queue: QueueOptions
    sftp: Any = None  # SFTPSettings: the batches go to this server's ``directory`` instead


_TIME = re.compile(r"\{now(?::([^{}]*))?\}")


def _sftp_section():
    from hl7relay.channels.sftp_destination import SFTP_SECTION

    return SFTP_SECTION


@register("destination", "batch", "gather messages into HL7 batch files (FHS/BHS ... BTS/FTS), each written whole", [
    Option("directory", "str", description="output folder (created if missing)"),
    Option("filename", "str", "batch-{now:%Y%m%d-%H%M%S}.hl7", "the batch file's name: {now:FORMAT} is when it "
           "is written; a name taken gets .1, .2... before the suffix (never overwritten)"),
    Option("max_messages", "int", 500, f"write the batch at this many messages (at most {MAX_BATCH_MESSAGES})"),
    Option("max_bytes", "int", 10 * 1024 * 1024, "write the batch before it grows past this many bytes"),
    Option("max_age", "duration", 300.0, "write the batch when its first message has waited this long"),
    Option("flush", "str", None, "also write it at these times: a cron expression, e.g. '0 2 * * *'"),
    Option("timezone", "str", "UTC", "flush's time zone"),
    Option("sending_application", "str", None, "FHS-3/BHS-3 (default: the first message's MSH-3)"),
    Option("sending_facility", "str", None, "FHS-4/BHS-4 (default: MSH-4)"),
    Option("receiving_application", "str", None, "FHS-5/BHS-5 (default: MSH-5)"),
    Option("receiving_facility", "str", None, "FHS-6/BHS-6 (default: MSH-6)"),
    Option("mode", "str", "0640", "permissions of the files written, in octal (they hold PHI)"),
    Option("sftp", "section", None, "write the batches to an SFTP server's `directory` instead: {host, port, username, "
           "known_hosts, private_key | password}", section=_sftp_section()),
    *[o for o in QUEUE_OPTIONS if o.name not in ("order", "order_key", "parallel")],
])
def _batch(options, context=None):
    if not 1 <= options["max_messages"] <= MAX_BATCH_MESSAGES:
        raise ValueError(f"max_messages must be between 1 and {MAX_BATCH_MESSAGES}")
    if options["max_bytes"] < 1024:
        raise ValueError("max_bytes: at least 1024")
    if options["max_age"] <= 0:
        raise ValueError("max_age: a number of seconds above 0")
    text = str(options["mode"]).strip()
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f"mode {text!r} is not an octal file mode such as 0640 or 0600") from None
    if not 0o400 <= mode <= 0o777:
        raise ValueError(f"mode {text!r} must let the engine read its own files (0400 to 0777, e.g. 0640)")
    rest = _TIME.sub("", options["filename"])
    if "{" in rest or "}" in rest or "/" in options["filename"]:
        raise ValueError(f"filename {options['filename']!r}: a name with {{now:FORMAT}} only (e.g. "
                         "batch-{now:%Y%m%d-%H%M%S}.hl7)")
    flush = schedule_from({"cron": options["flush"], "every": None, "timezone": options["timezone"]}, 0) \
        if options["flush"] else None
    # the queue hands the batch every delivery it may hold at once, in the order received (the
    # batch sorts a retried one back into place): none of the queue's own order or parallel options
    queue = queue_options({**options, "order": "none", "order_key": "PID-3.1", "parallel": 1})
    queue = QueueOptions(queue.max_attempts, queue.retry_initial, queue.retry_max, "none", "PID-3.1",
                         options["max_messages"], queue.give_up_after)
    sftp = None
    if options["sftp"]:
        from hl7relay.channels.sftp_source import sftp_settings

        sftp = sftp_settings(options["sftp"], context)
    return BatchDestinationConfig(options["directory"], options["filename"], options["max_messages"],
                                  options["max_bytes"], options["max_age"], flush, options["sending_application"],
                                  options["sending_facility"], options["receiving_application"],
                                  options["receiving_facility"], mode, queue, sftp)


def _field(value: str, separator: str) -> str:
    return value.replace(separator, " ")


def batch_bytes(messages: list[bytes], name: str, now: datetime.datetime, sender: tuple, receiver: tuple,
                control_id: str) -> bytes:
    """FHS, BHS, the messages (each ending with a segment terminator), BTS (how many), FTS (1)."""
    first = messages[0]
    separator = first[3:4].decode("latin-1") if first.startswith(b"MSH") and len(first) > 8 else "|"
    encoding = first[4:8].decode("latin-1") if separator != "|" or first[4:8] else "^~\\&"
    stamp = now.strftime("%Y%m%d%H%M%S")
    fields = [_field(v or "", separator) for v in (*sender, *receiver)]

    def header(kind: str) -> bytes:
        return separator.join([kind, encoding, *fields, stamp, "", _field(name, separator), "", control_id]).encode("latin-1") + b"\r"

    body = [m if m.endswith((b"\r", b"\n")) else m + b"\r" for m in messages]
    return (header("FHS") + header("BHS") + b"".join(body)
            + f"BTS{separator}{len(messages)}\rFTS{separator}1\r".encode("latin-1"))


def _msh(message: bytes, number: int) -> str:
    separator = message[3:4]
    if not message.startswith(b"MSH") or not separator:
        return ""
    fields = message.split(b"\r", 1)[0].split(b"\n", 1)[0].split(separator)
    value = fields[number - 1] if len(fields) > number - 1 else b""
    return value.split(message[4:5] or b"^")[0].decode("utf-8", "replace")


def write_batch(directory: Path, name: str, data: bytes, mode: int, part_tag: str) -> Path:
    """``data`` to a hidden .part name, on disk, then linked to ``name`` (or NAME.1.EXT... when
    taken: never over a file), the .part removed and the folder's entry made durable."""
    if not directory.is_dir():
        directory.mkdir(parents=True, exist_ok=True, mode=0o750 if mode & 0o070 else 0o700)
    part = directory / f"{_PART_PREFIX}{part_tag}-{os.getpid()}.part"
    descriptor = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        target = archive(part, directory, name)  # a name never taken over, the .part gone with it
    finally:
        part.unlink(missing_ok=True)
    folder = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return target


class _Entry:
    __slots__ = ("message_id", "data", "waiter")

    def __init__(self, message_id: int, data: bytes, waiter: defer.Deferred):
        self.message_id, self.data, self.waiter = message_id, data, waiter


class BatchDelivery(Delivery):
    """Holds the batch being filled: each delivery's Deferred fires when its batch is written."""

    keyed = True  # deliver(message, message_id): a retried delivery is put back in order

    def __init__(self, config: BatchDestinationConfig, resources):
        super().__init__(config, resources)
        directory = Path(config.directory)
        self.directory = directory if directory.is_absolute() else Path(os.getcwd()) / directory
        self.reactor = resources.reactor
        self.entries: dict[int, _Entry] = {}
        self.size = 0
        self.started_at: float | None = None
        self._age_timer = None
        self._flush_timer = None
        self.writing = False
        self.written = 0  # batches written since the engine started
        self.last_file = ""
        self._tag = re.sub(r"[^A-Za-z0-9_-]", "_", config.filename.split("{")[0] or "batch")[:40]
        self.uploader = None
        if config.sftp is not None:
            from hl7relay.channels.sftp_destination import SFTPUploader

            self.uploader = SFTPUploader(config.sftp, resources.reactor)
        else:
            self._remove_stale_parts()
        self._schedule_flush()

    def _remove_stale_parts(self) -> None:
        """.part files a crash left (never a batch file): their deliveries are QUEUED again."""
        if not self.directory.is_dir():
            return
        for path in self.directory.glob(f"{_PART_PREFIX}{self._tag}-*.part"):
            pid = path.stem.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                path.unlink(missing_ok=True)

    def _schedule_flush(self) -> None:
        flush = self.config.flush
        if flush is None:
            return
        now = self.reactor.seconds()
        self._flush_timer = self.reactor.callLater(max(0.0, flush.next_after(now) - now), self._flush_due)

    def _flush_due(self) -> None:
        self._flush_timer = None
        if self.entries and not self.writing:
            self._write()
        self._schedule_flush()

    def deliver(self, message, message_id=None):
        data = message.to_bytes()
        waiter: defer.Deferred = defer.Deferred()
        if self.entries and self.size + len(data) > self.config.max_bytes and not self.writing:
            self._write()  # this one starts the next batch
        self.entries[message_id] = _Entry(message_id, data, waiter)
        self.size += len(data)
        if self.started_at is None:
            self.started_at = self.reactor.seconds()
            self._age_timer = self.reactor.callLater(self.config.max_age, self._age_due)
        if len(self.entries) >= self.config.max_messages and not self.writing:
            self._write()
        return waiter

    def _age_due(self) -> None:
        self._age_timer = None
        if self.entries and not self.writing:
            self._write()

    def _write(self) -> None:
        entries = [self.entries[k] for k in sorted(self.entries)]  # in order received, retries put back in place
        self.entries, self.size, self.started_at = {}, 0, None
        if self._age_timer is not None and self._age_timer.active():
            self._age_timer.cancel()
        self._age_timer = None
        self.writing = True
        messages = [e.data for e in entries]
        now = datetime.datetime.fromtimestamp(self.resources.clock())  # the site's local time, as {now} of file
        name = _TIME.sub(lambda m: now.strftime(m.group(1) or "%Y%m%d%H%M%S"), self.config.filename)
        name = re.sub(r"[^A-Za-z0-9._-]", "_", name)
        config = self.config
        first = messages[0]
        sender = (config.sending_application or _msh(first, 3), config.sending_facility or _msh(first, 4))
        receiver = (config.receiving_application or _msh(first, 5), config.receiving_facility or _msh(first, 6))
        control_id = f"{entries[0].message_id}-{entries[-1].message_id}"
        data = batch_bytes(messages, name, now, sender, receiver, control_id)
        if self.uploader is not None:  # the directory is the server's; a taken name gets .1, .2...
            d = self.uploader.put(config.directory.rstrip("/") or ".", name, data, replace=False,
                                  part=f"{_PART_PREFIX}{self._tag}.part")
        elif hasattr(self.reactor, "getThreadPool"):
            d = threads.deferToThread(write_batch, self.directory, name, data, config.mode, self._tag)
        else:
            d = defer.maybeDeferred(write_batch, self.directory, name, data, config.mode, self._tag)

        def written(target) -> None:
            self.written += 1
            self.last_file = str(target)
            log.info("batch {file}: {count} messages", file=str(target), count=len(entries))
            for entry in entries:
                entry.waiter.callback(DeliveryResult(True, ack=f"in {Path(str(target)).name} (batch of {len(entries)})"))

        def failed(failure) -> None:
            if self.uploader is not None:
                self.uploader.failed()
            error = f"the batch could not be written: {failure.getErrorMessage()}"
            log.error("batch {name}: {error}", name=name, error=error)
            for entry in entries:
                entry.waiter.callback(DeliveryResult(False, error=error))

        def done(_) -> None:
            self.writing = False
            if len(self.entries) >= self.config.max_messages or self.size > self.config.max_bytes:
                self._write()

        d.addCallbacks(written, failed).addBoth(done)

    def stopping(self) -> None:
        if self.entries and not self.writing:
            self._write()  # a smaller batch now rather than the stop waiting out its timeout

    def view(self) -> dict:
        return {"batch": {"messages": len(self.entries), "bytes": self.size, "since": self.started_at,
                          "written": self.written, "last_file": self.last_file}}

    def close(self) -> None:
        if self.uploader is not None:
            self.uploader.close()
        for timer in (self._age_timer, self._flush_timer):
            if timer is not None and timer.active():
                timer.cancel()
        # what was gathered is not written: its deliveries stay QUEUED and go into a batch after the restart
        entries, self.entries = list(self.entries.values()), {}
        for entry in entries:
            entry.waiter.callback(DeliveryResult(False, error="the destination closed before its batch was written"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


BatchDestinationConfig.runner = BatchDelivery  # type: ignore[attr-defined]
