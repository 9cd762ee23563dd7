"""The ``file`` source: message files from a folder, through the store's file ledger.

A file is read once it is complete (``complete``: unchanged for ``settle`` seconds, matched only
once renamed from its upload name, or announced by a marker file), hashed, and entered in the
ledger by its content. Its messages are split as a stream (one message buffered at a time) and
stored in file order; each message's commit counts it in the ledger in the same transaction, so
a re-read after a crash or a store outage skips exactly what is stored. A message that cannot be
read is stored too, as ERROR with its bytes, file and line. A file whose content was read to its
end before is a duplicate: said, not imported. Archived names never overwrite.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import os
import shutil
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from twisted.internet import defer, threads
from twisted.logger import Logger

from hl7relay.channels.schedules import EXPECT, SCHEDULE, Expectation, Schedule, expectation_from, schedule_from
from hl7relay.errors import HL7RelayError
from hl7relay.outcomes import FileState
from hl7relay.spec import Option, register

__all__ = ["FileSourceConfig", "FilePoller", "LocalFilePoller", "Candidate", "archive", "COMPLETE_MODES", "AFTER",
           "FILE_OPTIONS", "file_source_values", "off_reactor"]

log = Logger(namespace="hl7relay.engine")

COMPLETE_MODES = ("settle", "rename", "marker")
AFTER = ("move", "delete", "keep")
READ_BYTES = 1024 * 1024  # what is read from a file at a time


@dataclass(slots=True)
class FileSourceConfig:
    directory: str
    glob: str
    poll_interval: float
    after: str  # move | delete | keep
    move_to: str | None
    error_to: str | None
    archive_name: str
    charset: str
    complete: str  # settle | rename | marker
    settle: float  # complete: settle: a file must be unchanged this long before it is read
    marker: str  # complete: marker: NAME + this announces NAME
    max_message_bytes: int
    schedule: Schedule  # when it looks (poll_interval, unless schedule says otherwise)
    expectation: Expectation | None  # when a file is due (expect:)
    runner: ClassVar[type]


# what every source of files takes (the folder's own options come first: directory, host...)
FILE_OPTIONS = [
    Option("glob", "str", "*.hl7", "which files"),
    Option("poll_interval", "duration", 2.0, "seconds between looks (with a cron schedule: while a file settles)"),
    Option("schedule", "section", None, "when it looks: {every: SECONDS} or {cron: '5 2 * * *', timezone: ...}",
           section=SCHEDULE),
    Option("expect", "section", None, "when a file is due: {cron: '0 3 * * *', within: 3600}; an alert "
           "(HL7RelayFileMissing) when none has come", section=EXPECT),
    Option("complete", "enum", "settle", "when a file is complete: settle (unchanged for `settle` seconds), "
           "rename (the uploader renames it to a name the glob matches), marker (NAME.done exists)", COMPLETE_MODES),
    Option("settle", "duration", 1.0, "complete: settle: seconds a file must stay unchanged before it is read"),
    Option("marker", "str", ".done", "complete: marker: the suffix of the marker file that announces a file"),
    Option("after", "enum", "move", "after a file is read: move it (to move_to), delete it, or keep it "
           "(the ledger remembers it)", AFTER),
    Option("move_to", "str", None, "where read files go (default: DIRECTORY/processed)"),
    Option("error_to", "str", None, "where files with unreadable messages, stray segments or content read "
           "before go, never deleted (default: DIRECTORY/error)"),
    Option("archive_name", "str", "{name}", "the name a file is moved under: {name}, {stem}, {suffix}, {date} "
           "(YYYYMMDD), {time} (HHMMSS), {file_id}; a name taken gets .1, .2... before the suffix"),
    Option("charset", "str", "UTF-8", "for messages with an empty MSH-18"),
    Option("max_message_bytes", "int", 64 * 1024 * 1024, "a longer message is stored cut, as ERROR"),
]


def file_source_values(options) -> dict:
    """FILE_OPTIONS checked and built, as the keyword arguments of FileSourceConfig (less directory)."""
    if options["max_message_bytes"] < 1024:
        raise ValueError("max_message_bytes: at least 1024")
    try:
        _archive_name(options["archive_name"], "ADT.txt", 0.0, 1)
    except (KeyError, ValueError, IndexError) as exc:
        raise ValueError(f"archive_name: {options['archive_name']!r} is not a name pattern ({exc}); "
                         "use {name}, {stem}, {suffix}, {date}, {time}, {file_id}") from None
    if options["complete"] == "marker" and not options["marker"]:
        raise ValueError("marker: the marker files' suffix (e.g. .done)")
    if options["poll_interval"] <= 0:
        raise ValueError("poll_interval: a number of seconds above 0")
    keys = ("glob", "poll_interval", "after", "move_to", "error_to", "archive_name", "charset", "complete", "settle",
            "marker", "max_message_bytes")
    return {**{k: options[k] for k in keys}, "schedule": schedule_from(options["schedule"], options["poll_interval"]),
            "expectation": expectation_from(options["expect"])}


@register("source", "file", "read message files from a directory (batches split)",
          [Option("directory", "str", description="folder to poll"), *FILE_OPTIONS])
def _file(options, context=None):
    return FileSourceConfig(options["directory"], **file_source_values(options))


def _archive_name(pattern: str, name: str, at: float, file_id: int) -> str:
    moment = datetime.datetime.fromtimestamp(at, datetime.timezone.utc)
    path = Path(name)
    made = pattern.format(name=name, stem=path.stem, suffix=path.suffix, date=moment.strftime("%Y%m%d"),
                          time=moment.strftime("%H%M%S"), file_id=file_id)
    if not made or "/" in made or made in (".", ".."):
        raise ValueError(f"it makes {made!r}, not a file name")
    return made


def archive(source: Path, folder: Path, name: str) -> Path:
    """Move ``source`` into ``folder`` as ``name``, or NAME.1.EXT, NAME.2.EXT... when taken: never
    over an earlier file (the PMS sends ADT.txt every night). A hard link claims the name
    atomically; across file systems the file is copied to the claimed name, then removed."""
    folder.mkdir(parents=True, exist_ok=True)
    stem, suffix = Path(name).stem, Path(name).suffix
    for counter in range(100_000):
        target = folder / (name if counter == 0 else f"{stem}.{counter}{suffix}")
        try:
            os.link(source, target)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            try:
                with open(target, "xb") as out, open(source, "rb") as data:
                    shutil.copyfileobj(data, out, READ_BYTES)
                    out.flush()
                    os.fsync(out.fileno())
            except FileExistsError:
                continue
        os.unlink(source)
        return target
    raise OSError(f"no free name for {name} in {folder}")


def sha256_of(path: Path) -> tuple[str, int, float]:
    """The file's content hash, size and modification time (read in pieces: bounded memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        stat = os.fstat(handle.fileno())
        while True:
            piece = handle.read(READ_BYTES)
            if not piece:
                break
            digest.update(piece)
    return digest.hexdigest(), stat.st_size, stat.st_mtime


def off_reactor(reactor, fn, *args) -> defer.Deferred:
    """A blocking call (hashing, archiving) on the reactor's threads; inline under a test clock."""
    pool = getattr(reactor, "getThreadPool", None)
    if pool is None:
        return defer.maybeDeferred(fn, *args)
    return threads.deferToThreadPool(reactor, pool(), fn, *args)


@dataclass(slots=True)
class FileMessage:
    """Where a message read from a file came from: the trip stores it with the message
    (``source_file``), and the store counts it in the ledger in the same transaction."""

    text: str  # the peer the store records: file:NAME
    source_file: tuple  # (ledger id, place in the file from 0, line)

    def __str__(self) -> str:
        return self.text


@dataclass(slots=True)
class Candidate:
    """A file a poller found complete: its name and what identifies this version of it."""

    name: str
    state: tuple  # (size, mtime) as the transport reports them


class FilePoller:
    """Looks for complete files on its schedule and reads them in name order through the ledger.
    What differs between a local folder and an SFTP server (listing, fetching a local copy,
    archiving) is each subclass's; the ledger, the order, completion and schedules are here."""

    source_uri = ""

    def __init__(self, running, config):
        self.running = running
        self.reactor = running.resources.reactor
        self.config = config
        self.seen: dict = {}  # name -> (size, mtime, first seen unchanged at)
        self.finished: dict = {}  # name -> (size, mtime) of a kept file the ledger has done (after: keep)
        self.busy = False
        self.reading: str | None = None  # the file being read, for status
        self.next_look: float | None = None
        self._call = None  # the next look's delayed call
        self._stopped = False
        self.watching_since = 0.0
        self.last_file_at: float | None = None  # when the newest file of the channel was first seen (expect:)
        self.retry_in: float | None = None  # a transport that failed asks for its next look this soon

    def start(self):
        self.prepare()
        self.watching_since = self.running.resources.clock()
        if self.config.expectation is not None:
            writer = self.running.resources.writer
            d = writer.read(writer.store.files, self.running.channel.name, None, None, 1)
            d.addCallbacks(self._newest, lambda failure: log.error(
                "channel {channel}: cannot read its files from the store: {error}", channel=self.running.channel.name,
                error=failure.getErrorMessage()))
        self._look()

    def _newest(self, rows) -> None:
        if rows and (self.last_file_at is None or rows[0]["first_seen"] > self.last_file_at):
            self.last_file_at = rows[0]["first_seen"]

    def stop(self):
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _look(self):
        self._call = None
        d = self.poll()
        d.addErrback(lambda failure: log.failure("channel {channel}: a look at its files failed", failure,
                                                 channel=self.running.channel.name))
        d.addBoth(self._schedule_next)

    def _schedule_next(self, _):
        if self._call is not None or self._stopped:
            return
        now = self.reactor.seconds()
        # a file that is settling is looked at again soon, whatever the schedule
        wait = self.config.poll_interval if self.seen else self.config.schedule.next_after(now) - now
        if self.retry_in is not None:
            wait, self.retry_in = min(wait, self.retry_in), None
        self.next_look = now + max(0.0, wait)
        self._call = self.reactor.callLater(max(0.0, wait), self._look)

    def poll(self):
        return defer.ensureDeferred(self._poll())

    def missing_since(self) -> float | None:
        """The due time of the file that has not come (expect:), or None."""
        expectation = self.config.expectation
        if expectation is None:
            return None
        return expectation.missing(self.running.resources.clock(), self.last_file_at, self.watching_since)

    def view(self) -> dict:
        expectation = self.config.expectation
        return {"directory": self.source_uri, "glob": self.config.glob, "schedule": self.config.schedule.describe(),
                "next_look": self.next_look, "reading": self.reading,
                "expect": expectation.describe() if expectation is not None else None,
                "missing_since": self.missing_since(), "last_file_at": self.last_file_at}

    # -- what the transport does (a subclass's) --------------------------------------------------------
    def prepare(self) -> None:
        """Before the first look."""

    async def listing(self) -> list[Candidate]:  # pragma: no cover - interface
        """The files matching the glob, with their (size, mtime)."""
        raise NotImplementedError

    async def marked(self, name: str, names: set) -> bool:
        return name + self.config.marker in names

    async def fetch(self, candidate: Candidate) -> Path:  # pragma: no cover - interface
        """A local, readable copy of the file (the file itself when it is local)."""
        raise NotImplementedError

    def release(self, candidate: Candidate, local: Path) -> None:
        """The local copy is no longer needed."""

    async def put_away(self, candidate: Candidate, entry: dict, problem: bool) -> str:  # pragma: no cover - interface
        """after: move / delete / keep (a file with a problem to error_to); where it went, or ""."""
        raise NotImplementedError

    async def remove_marker(self, candidate: Candidate) -> None:
        """complete: marker: the marker goes with its file."""

    def failed(self, error: Exception) -> None:
        """A look failed (the transport): the next look tries again."""
        log.error("channel {channel}: {error}", channel=self.running.channel.name, error=str(error))

    # -- completion ------------------------------------------------------------------------------------
    async def _complete(self, now: float) -> list[Candidate]:
        config, out = self.config, []
        listed = await self.listing()
        names = {c.name for c in listed}
        for candidate in sorted(listed, key=lambda c: c.name):
            if config.complete == "marker" and candidate.name.endswith(config.marker):
                continue
            if self.finished.get(candidate.name) == candidate.state:
                continue  # kept after it was read (after: keep)
            if config.complete == "rename":
                out.append(candidate)
            elif config.complete == "marker":
                if await self.marked(candidate.name, names):
                    out.append(candidate)
            else:
                previous = self.seen.get(candidate.name)
                if previous is None or previous[:2] != candidate.state:
                    self.seen[candidate.name] = (*candidate.state, now)
                elif now - previous[2] >= config.settle:
                    out.append(candidate)
        for name in [n for n in self.seen if n not in names]:
            del self.seen[name]  # gone (taken by someone else, or renamed)
        return out

    async def _poll(self):
        if self.busy:
            return
        self.busy = True
        try:
            try:
                complete = await self._complete(self.reactor.seconds())
            except (OSError, HL7RelayError) as exc:
                self.failed(exc)
                return
            for candidate in complete:
                try:
                    finished = await self._file(candidate)
                except (OSError, HL7RelayError) as exc:
                    log.error("channel {channel}: cannot read {file}: {error}", channel=self.running.channel.name,
                              file=candidate.name, error=getattr(exc, "strerror", None) or str(exc))
                    finished = False
                if not finished:
                    break  # the rest waits: files are read in name order
                self.seen.pop(candidate.name, None)
        finally:
            self.busy, self.reading = False, None

    async def _file(self, candidate: Candidate) -> bool:
        """Read one complete file through the ledger; True when it is finished with."""
        self.reading = candidate.name
        local = await self.fetch(candidate)
        try:
            return await self._read(candidate, local)
        finally:
            self.release(candidate, local)

    async def _read(self, candidate: Candidate, path: Path) -> bool:
        from hl7relay.store.records import FileSeenUpdate, FileUpdate

        running = self.running
        writer, clock, channel = running.resources.writer, running.resources.clock, running.channel.name
        name = candidate.name
        sha256, size, mtime = await off_reactor(self.reactor, sha256_of, path)
        await writer.update(FileSeenUpdate(channel, self.source_uri, name, size, mtime, sha256, clock()))
        entry = await writer.read(writer.store.file_entry, channel, self.source_uri, name, sha256)
        if entry is None:  # pragma: no cover - the row was just committed
            return False
        if self.last_file_at is None or entry["first_seen"] > self.last_file_at:
            self.last_file_at = entry["first_seen"]
        if entry["state"] == FileState.READING.value and not entry["committed"]:  # (an operator's REIMPORT is not asked)
            earlier = await writer.read(writer.store.file_read_before, channel, sha256, entry["id"])
            if earlier is not None:
                return await self._duplicate(candidate, entry, earlier)
        if entry["state"] in (FileState.DONE.value, FileState.ERRORS.value, FileState.DUPLICATE.value):
            # finished before a crash took it away: only its archiving is left
            await self._archive(candidate, entry, entry["state"] != FileState.DONE.value)
            return True
        done = await writer.read(writer.store.file_ordinals, entry["id"]) if entry["committed"] else set()
        read = await self._messages(path, name, entry["id"], done)
        if read is None:
            return False  # not all stored: the next look reads it again and skips what is
        count, problems = read
        final = await writer.read(writer.store.file, entry["id"])
        errors = bool(final and final["errors"]) or bool(problems)
        state = FileState.ERRORS if errors else FileState.DONE
        values = {"state": state.value, "messages": count, "done_at": clock(), "problems": "\n".join(problems)}
        await writer.update(FileUpdate(entry["id"], values))
        emit = running.resources.emit  # named so: the events test finds every emit() by name
        emit("file_read", channel=channel, file=name, file_id=entry["id"], state=state.value, messages=count,
             errors=final["errors"] if final else 0)
        log.info("channel {channel}: {file}: {count} messages stored{errors}", channel=channel, file=name,
                 count=count, errors=f", {final['errors']} as ERROR" if final and final["errors"] else "")
        for problem in problems:
            log.warn("channel {channel}: {file}: {problem}", channel=channel, file=name, problem=problem)
        await self._archive(candidate, entry, errors)
        return True

    async def _messages(self, path: Path, name: str, file_id: int, done: set) -> tuple[int, list[str]] | None:
        """Split and store the file's messages in order, those not stored yet; (how many it holds,
        its envelope problems), or None when one could not be stored."""
        from hl7relay.ack.outcome import Status
        from hl7relay.hl7.batch import MessageSplitter

        running, config = self.running, self.config
        splitter = MessageSplitter(config.max_message_bytes)
        # messages go to the store in file order, several in flight so they share commits; one at
        # a time when the channel looks for duplicates (its look-up first must not reorder them)
        window = 1 if running.channel.duplicates is not None else 256
        in_flight: deque = deque()
        count = 0
        failed = False

        async def settle(limit: int) -> None:
            nonlocal failed
            while len(in_flight) > limit:
                outcome = await in_flight.popleft()
                if outcome is None or getattr(outcome, "status", None) is Status.INTERNAL_ERROR:
                    failed = True

        with open(path, "rb") as handle:
            while not failed:
                piece = handle.read(READ_BYTES)
                chunks = splitter.feed(piece) if piece else splitter.finish()
                for chunk in chunks:
                    ordinal, count = count, count + 1
                    if ordinal in done:
                        continue
                    in_flight.append(self._store(name, file_id, ordinal, chunk))
                    await settle(window - 1)
                    if failed:
                        break
                if not piece:
                    break
        await settle(0)
        if failed:
            log.error("channel {channel}: {file} was not fully stored; it stays for the next look, which skips "
                      "what is stored", channel=running.channel.name, file=name)
            return None
        return count, [str(p) for p in splitter.problems if p.severity == "E"]

    def _store(self, name: str, file_id: int, ordinal: int, chunk) -> defer.Deferred:
        from hl7relay.errors import ParseError
        from hl7relay.hl7.message import Message

        running = self.running
        peer = FileMessage(f"file:{name}", (file_id, ordinal, chunk.line))
        if chunk.oversize:
            return running.store_unreadable(chunk.data, peer, f"{name} line {chunk.line}: the message is "
                                            f"{len(chunk.data) + chunk.oversize} bytes, more than max_message_bytes "
                                            f"({self.config.max_message_bytes}); its first {len(chunk.data)} are stored")
        try:
            message = Message.from_bytes(chunk.data, self.config.charset)
        except ParseError as exc:
            return running.store_unreadable(chunk.data, peer, f"{name} line {chunk.line}: {exc}")
        return defer.maybeDeferred(running.handle, message, peer)

    async def _duplicate(self, candidate: Candidate, entry: dict, earlier: dict) -> bool:
        from hl7relay.store.records import FileUpdate

        running = self.running
        channel = running.channel.name
        await running.resources.writer.update(FileUpdate(entry["id"], {
            "state": FileState.DUPLICATE.value, "duplicate_of": earlier["id"], "done_at": running.resources.clock(),
            "problems": f"the same content as {earlier['name']} (file {earlier['id']}), read before: not imported"}))
        log.warn("channel {channel}: {file} holds the same content as {earlier} (file {earlier_id}), read before: "
                 "not imported", channel=channel, file=candidate.name, earlier=earlier["name"], earlier_id=earlier["id"])
        emit = running.resources.emit
        emit("file_read", channel=channel, file=candidate.name, file_id=entry["id"], state=FileState.DUPLICATE.value,
             messages=0, errors=0)
        await self._archive(candidate, entry, True)
        return True

    async def _archive(self, candidate: Candidate, entry: dict, problem: bool) -> None:
        """After: a file with a problem goes to error_to (never deleted); others as ``after`` says."""
        from hl7relay.store.records import FileUpdate

        if not problem and self.config.after == "keep":
            self.finished[candidate.name] = candidate.state
        target = await self.put_away(candidate, entry, problem)
        if target:
            await self.running.resources.writer.update(FileUpdate(entry["id"], {"archived_as": target}))
        if self.config.complete == "marker":
            await self.remove_marker(candidate)


class LocalFilePoller(FilePoller):
    """The ``file`` source's: a folder on this machine."""

    def __init__(self, running, config: FileSourceConfig):
        super().__init__(running, config)
        self.directory = Path(config.directory)
        self.source_uri = self.directory.resolve().as_uri()

    def prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    async def listing(self) -> list[Candidate]:
        out = []
        for path in self.directory.glob(self.config.glob):
            try:
                if not path.is_file():
                    continue
                stat = path.stat()
            except FileNotFoundError:
                continue
            out.append(Candidate(path.name, (stat.st_size, stat.st_mtime_ns)))
        return out

    async def fetch(self, candidate: Candidate) -> Path:
        return self.directory / candidate.name

    async def put_away(self, candidate: Candidate, entry: dict, problem: bool) -> str:
        config, path = self.config, self.directory / candidate.name
        if not problem and config.after == "keep":
            return ""
        if not problem and config.after == "delete":
            path.unlink(missing_ok=True)
            return ""
        if not path.exists():
            return ""
        folder = Path(config.error_to if problem and config.error_to else config.move_to if not problem and
                      config.move_to else self.directory / ("error" if problem else "processed"))
        name = _archive_name(config.archive_name, candidate.name, self.running.resources.clock(), entry["id"])
        target = await off_reactor(self.reactor, archive, path, folder, name)
        return str(target)

    async def remove_marker(self, candidate: Candidate) -> None:
        (self.directory / (candidate.name + self.config.marker)).unlink(missing_ok=True)
