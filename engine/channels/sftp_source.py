"""The ``sftp`` source: message files from a folder on an SFTP server, through the file ledger.

Everything a local ``file`` source does (completion, the ledger, order, unreadable messages as
ERROR rows, duplicates, schedules, expect) with the listing, the reading and the archiving done
on the server. A complete file is downloaded to the engine's spool folder, checked unchanged on
the server, then read there like a local file; only once its messages are stored is it moved (a
name never taken over), deleted or kept on the server. A dropped connection fails the look: the
next one connects again (waiting 1, 2, 4... up to 60 seconds) and downloads the file again.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from twisted.logger import Logger

from hl7relay.channels.files import FILE_OPTIONS, Candidate, FilePoller, _archive_name, file_source_values
from hl7relay.channels.schedules import Expectation, Schedule
from hl7relay.channels.sources import FileSource
from hl7relay.sftp import SFTPError, SFTPSettings, connect
from hl7relay.spec import Option, register

__all__ = ["SFTPSourceConfig", "SFTPPoller", "SFTPSource", "SFTP_CONNECTION_OPTIONS", "sftp_settings"]

log = Logger(namespace="hl7relay.engine")
SFTP_TIME_RESOLUTION = 1.0  # SFTP version 3 says modification times in whole seconds

SFTP_CONNECTION_OPTIONS = [
    Option("host", "str", description="the SFTP server"),
    Option("port", "int", 22, "its SSH port"),
    Option("username", "str", description="the account to sign in as"),
    Option("known_hosts", "str", description="an OpenSSH known_hosts file pinning the server's host key "
           "(hl7relay check sftp://HOST:PORT prints the line); relative to the channel file"),
    Option("private_key", "str", None, "the private key's text, e.g. ${secret:pms-sftp-key} or ${file:keys/pms}",
           secret=True),
    Option("passphrase", "str", None, "the private key's passphrase, if it has one", secret=True),
    Option("password", "str", None, "a password, where the server takes one (a key is better)", secret=True),
    Option("timeout", "duration", 30.0, "seconds to connect and sign in"),
]


@dataclass(slots=True)
class SFTPSourceConfig:
    settings: SFTPSettings
    directory: str
    glob: str
    poll_interval: float
    after: str
    move_to: str | None
    error_to: str | None
    archive_name: str
    charset: str
    complete: str
    settle: float
    marker: str
    max_message_bytes: int
    schedule: Schedule
    expectation: Expectation | None
    runner: ClassVar[type]


def sftp_settings(options, context) -> SFTPSettings:
    if not options["private_key"] and not options["password"]:
        raise ValueError("private_key or password: how to sign in (private_key: ${secret:NAME} or ${file:PATH})")
    if not 1 <= options["port"] <= 65535:
        raise ValueError("port must be between 1 and 65535")
    known_hosts = Path(options["known_hosts"])
    base = getattr(context, "base_dir", None)
    if not known_hosts.is_absolute() and base is not None:
        known_hosts = Path(base) / known_hosts
    if not known_hosts.is_file():
        raise ValueError(f"known_hosts: {known_hosts} is not a file (hl7relay check sftp://{options['host']}:"
                         f"{options['port']} prints the line that pins the server's key)")
    key = options["private_key"]
    if key:
        from twisted.conch.ssh import keys

        try:
            keys.Key.fromString(key.encode(), passphrase=(options["passphrase"] or "").encode() or None)
        except Exception as exc:  # noqa: BLE001 - conch raises several kinds: said as one
            raise ValueError(f"private_key: not a private key it can read ({type(exc).__name__}; "
                             "OpenSSH or PEM, with its passphrase)") from None
    return SFTPSettings(options["host"], options["port"], options["username"], str(known_hosts),
                        key.encode() if key else None, (options["passphrase"] or "").encode() or None,
                        options["password"], options["timeout"])


# SFTP says times in whole seconds: a file settles for two of them at least
_SETTLE = Option("settle", "duration", 2 * SFTP_TIME_RESOLUTION, "complete: settle: seconds a file must stay "
                 f"unchanged before it is read (at least {2 * SFTP_TIME_RESOLUTION:g}: SFTP's times are whole seconds)")


@register("source", "sftp", "read message files from a folder on an SFTP server (batches split)",
          [*SFTP_CONNECTION_OPTIONS, Option("directory", "str", ".", "the folder on the server"),
           *[_SETTLE if o.name == "settle" else o for o in FILE_OPTIONS]])
def _sftp(options, context=None):
    values = file_source_values(options)
    if values["complete"] == "settle" and values["settle"] < 2 * SFTP_TIME_RESOLUTION:
        raise ValueError(f"settle: SFTP says modification times in whole seconds: at least "
                         f"{2 * SFTP_TIME_RESOLUTION:g} (or complete: rename or marker)")
    return SFTPSourceConfig(sftp_settings(options, context), options["directory"].rstrip("/") or ".", **values)


class SFTPPoller(FilePoller):
    def __init__(self, running, config: SFTPSourceConfig):
        super().__init__(running, config)
        settings = config.settings
        self.source_uri = f"sftp://{settings.host}:{settings.port}/{config.directory.lstrip('/')}"
        self.session = None
        self.failures = 0
        self.spool = Path(running.resources.settings.data_dir) / "spool" / running.channel.name

    def prepare(self) -> None:
        self.spool.mkdir(parents=True, exist_ok=True)
        os.chmod(self.spool, 0o700)  # what it holds is PHI

    def stop(self):
        super().stop()
        if self.session is not None:
            self.session.close()
            self.session = None

    def _remote(self, name: str) -> str:
        return f"{self.config.directory}/{name}"

    async def _connected(self):
        if self.session is not None and self.session.connected:
            return self.session
        self.session = None
        self.session = await connect(self.reactor, self.config.settings)
        if self.failures:
            log.info("channel {channel}: connected to {address} again", channel=self.running.channel.name,
                     address=self.config.settings.address)
        self.failures = 0
        return self.session

    def failed(self, error: Exception) -> None:
        self.failures += 1
        self.retry_in = min(60.0, 2.0 ** (self.failures - 1))
        if self.session is not None and not self.session.connected:
            self.session = None
        log.error("channel {channel}: {error} (trying again in {wait:g}s)", channel=self.running.channel.name,
                  error=str(error), wait=self.retry_in)

    async def listing(self) -> list[Candidate]:
        session = await self._connected()
        listed = await session.listdir(self.config.directory)
        pattern, marker = self.config.glob, self.config.marker if self.config.complete == "marker" else None
        return [Candidate(f.name, (f.size, f.mtime)) for f in listed
                if f.is_file and (fnmatch.fnmatch(f.name, pattern) or (marker and f.name.endswith(marker)))]

    async def fetch(self, candidate: Candidate) -> Path:
        session = await self._connected()
        local = self.spool / f"{candidate.name}.{os.getpid()}.download"
        try:
            with open(local, "wb") as out:
                os.fchmod(out.fileno(), 0o600)
                await session.download(self._remote(candidate.name), out.write)
            now = await session.stat(self._remote(candidate.name))
        except BaseException:
            local.unlink(missing_ok=True)
            if self.session is not None and not self.session.connected:
                self.session = None
            raise
        if now != candidate.state:  # still being written, whatever completion said: read it again later
            local.unlink(missing_ok=True)
            raise SFTPError(f"{candidate.name} changed on the server while it was read; it is read again later")
        return local

    def release(self, candidate: Candidate, local: Path) -> None:
        local.unlink(missing_ok=True)

    async def put_away(self, candidate: Candidate, entry: dict, problem: bool) -> str:
        config = self.config
        if (not problem and config.after == "keep") or self.running.resources.settings.read_only:
            return ""  # (a read-only environment changes nothing on the server: the ledger knows the file)
        session = await self._connected()
        remote = self._remote(candidate.name)
        if not problem and config.after == "delete":
            await session.remove(remote)
            return ""
        folder = (config.error_to if problem and config.error_to else config.move_to if not problem and config.move_to
                  else f"{config.directory}/{'error' if problem else 'processed'}")
        await session.makedirs(folder)
        name = _archive_name(config.archive_name, candidate.name, self.running.resources.clock(), entry["id"])
        target = await session.rename_to_free_name(remote, folder, name)
        settings = config.settings
        return f"sftp://{settings.host}:{settings.port}/{target.lstrip('/')}"

    async def remove_marker(self, candidate: Candidate) -> None:
        if self.running.resources.settings.read_only:
            return
        session = await self._connected()
        try:
            await session.remove(self._remote(candidate.name + self.config.marker))
        except SFTPError:
            pass  # gone already


class SFTPSource(FileSource):
    """The sftp source's runner: an SFTPPoller while open."""

    poller_class = SFTPPoller

    def where(self, poller) -> str:
        return poller.source_uri


SFTPSourceConfig.runner = SFTPSource
