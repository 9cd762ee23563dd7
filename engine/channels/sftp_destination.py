"""Files onto an SFTP server: the ``sftp`` destination (a file per message) and the uploads of the
``batch`` destination's ``sftp:`` section.

Every file is uploaded under a hidden ``.NAME.part`` name, then renamed: the receiving system
never sees a half-written file. A message's file replaces one of the same name (a message sent
again after a crash is the same file again); a batch file never does (it gets NAME.1.EXT...).
One SFTP session per destination, opened when needed and again after a drop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from twisted.internet import defer
from twisted.python.failure import Failure

from hl7relay.channels.destinations import QUEUE_OPTIONS, Delivery, QueueOptions, queue_options, render_filename
from hl7relay.channels.sftp_source import SFTP_CONNECTION_OPTIONS, sftp_settings
from hl7relay.outcomes import DeliveryOutcome, DeliveryResult
from hl7relay.sftp import SFTPError, SFTPSettings, connect
from hl7relay.spec import ComponentSpec, Option, register

__all__ = ["SFTPDestinationConfig", "SFTPDelivery", "SFTPUploader", "SFTP_SECTION"]

SFTP_SECTION = ComponentSpec("setting", "sftp", "an SFTP server to write to", tuple(SFTP_CONNECTION_OPTIONS), title="sftp")


class SFTPUploader:
    """One destination's session to its server, and the upload-then-rename it does."""

    def __init__(self, settings: SFTPSettings, reactor):
        self.settings = settings
        self.reactor = reactor
        self.session = None
        self._waiters: list[defer.Deferred] = []  # deliveries waiting for the session being opened

    def _session(self) -> defer.Deferred:
        if self.session is not None and self.session.connected:
            return defer.succeed(self.session)
        waiter: defer.Deferred = defer.Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:  # one connection for everyone waiting
            connect(self.reactor, self.settings).addBoth(self._opened)
        return waiter

    def _opened(self, result) -> None:
        if not isinstance(result, Failure):
            self.session = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    @defer.inlineCallbacks
    def put(self, directory: str, name: str, data: bytes, replace: bool, part: str | None = None):
        """``data`` as ``directory/name`` (under ``part``, a hidden name, first: one that a failed
        attempt left is written over by the next); the path it got."""
        session = yield self._session()
        yield session.makedirs(directory)
        part = f"{directory}/{part or f'.{name}.part'}"
        yield session.upload(part, data)
        if replace:
            target = f"{directory}/{name}"
            if session.posix_rename:
                yield session.rename(part, target, replace=True)
            else:
                if (yield session.stat(target)) is not None:
                    yield session.remove(target)
                yield session.rename(part, target)
            return target
        return (yield session.rename_to_free_name(part, directory, name))

    def failed(self) -> None:
        if self.session is not None and not self.session.connected:
            self.session = None

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


@dataclass(slots=True)
class SFTPDestinationConfig:
    settings: SFTPSettings
    directory: str
    filename: str
    queue: QueueOptions


@register("destination", "sftp", "upload each message as a file to an SFTP server (a hidden .part, then renamed)", [
    *SFTP_CONNECTION_OPTIONS,
    Option("directory", "str", ".", "the folder on the server"),
    Option("filename", "str", "{MSH-10}.hl7", "name template: HL7 paths and {now:%Y%m%d...} in braces"),
    *QUEUE_OPTIONS,
])
def _sftp(options, context=None):
    for key in re.findall(r"\{([^{}]+)\}", options["filename"]):
        if not key.startswith("now"):
            from hl7relay.hl7.path import parse_path

            parse_path(key)
    return SFTPDestinationConfig(sftp_settings(options, context), options["directory"].rstrip("/") or ".",
                                 options["filename"], queue_options(options))


class SFTPDelivery(Delivery):
    def __init__(self, config: SFTPDestinationConfig, resources):
        super().__init__(config, resources)
        self.uploader = SFTPUploader(config.settings, resources.reactor)

    def deliver(self, message):
        name = render_filename(self.config.filename, message, datetime.now())
        d = self.uploader.put(self.config.directory, name, message.to_bytes(), replace=True)

        def failed(failure):
            failure.trap(SFTPError)
            self.uploader.failed()
            return DeliveryResult(False, error=failure.getErrorMessage(), outcome=DeliveryOutcome.UNREACHABLE)

        return d.addCallbacks(lambda path: DeliveryResult(True, ack=f"uploaded {path}"), failed)

    def close(self) -> None:
        self.uploader.close()


SFTPDestinationConfig.runner = SFTPDelivery  # type: ignore[attr-defined]
