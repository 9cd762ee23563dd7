"""An SFTP client on Twisted's own SSH (twisted.conch): what the sftp source and destinations use.

The server's host key must be in ``known_hosts`` (OpenSSH's format; ``[host]:port`` for a port
other than 22): an unknown or changed key ends the connection before anything is sent.
:func:`host_key` only reads a server's key, for ``hl7relay check sftp://HOST:PORT`` to print it
to be pinned. A user signs in with a private key (OpenSSH or PEM, from the vault or a file) or a
password. Renames use OpenSSH's ``posix-rename@openssh.com`` where the server offers it (atomic,
and it replaces: callers that must not replace check first), else SFTP's own rename, which fails
when the target exists.
"""

from __future__ import annotations

import base64
import hashlib
import stat as stat_module
from dataclasses import dataclass

from twisted.conch.client.knownhosts import KnownHostsFile
from twisted.conch.error import HostKeyChanged
from twisted.conch.ssh import channel, common, connection, filetransfer, keys, transport, userauth
from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from hl7relay.errors import HL7RelayError

__all__ = ["SFTPSettings", "SFTPError", "SFTPSession", "connect", "host_key", "fingerprint", "known_hosts_line",
           "RemoteFile"]

CHUNK = 32 * 1024  # bytes per read or write request (OpenSSH's own limit is 255 KB)
# conch logs every packet it dispatches at info: the engine says what matters itself
_QUIET = Logger(observer=lambda event: None)  # type: ignore[arg-type]  # a function is an ILogObserver
_LOST = (error.ConnectionLost, error.ConnectionDone)
IN_FLIGHT = 16  # read or write requests outstanding at once


class SFTPError(HL7RelayError):
    """The server could not be reached, was not the one pinned, refused us, or refused a request."""


@dataclass(slots=True, frozen=True)
class SFTPSettings:
    host: str
    port: int
    username: str
    known_hosts: str | None  # None only for host_key(): nothing but the key is read
    private_key: bytes | None = None  # the key's text (OpenSSH or PEM)
    passphrase: bytes | None = None
    password: str | None = None
    timeout: float = 30.0

    @property
    def address(self) -> str:
        return f"sftp://{self.host}:{self.port}"


@dataclass(slots=True, frozen=True)
class RemoteFile:
    name: str
    size: int
    mtime: float
    is_file: bool


def fingerprint(key: keys.Key) -> str:
    """OpenSSH's: SHA256:base64 of the key's blob, without padding."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.blob()).digest()).decode("ascii").rstrip("=")


def known_hosts_line(host: str, port: int, key: keys.Key) -> str:
    where = host if port == 22 else f"[{host}]:{port}"
    return f"{where} {key.toString('openssh').decode('ascii')}"


def _refusal(settings: SFTPSettings, key) -> SFTPError | None:
    """Why this host key is not trusted (None: it is the one pinned in known_hosts)."""
    if settings.known_hosts is None:  # host_key(): read, never trusted
        return SFTPError("host key read")
    try:
        known = KnownHostsFile.fromPath(FilePath(settings.known_hosts))
    except OSError as exc:
        return SFTPError(f"known_hosts {settings.known_hosts}: {exc}")
    where = settings.host if settings.port == 22 else f"[{settings.host}]:{settings.port}"
    try:
        present = known.hasHostKey(where.encode(), key)
    except HostKeyChanged:
        return SFTPError(f"{settings.address}: its host key {fingerprint(key)} is not the one in "
                         f"{settings.known_hosts}: refused (a changed server, or someone in between)")
    if not present:
        return SFTPError(f"{settings.address}: its host key {fingerprint(key)} is not in {settings.known_hosts} "
                         f"(hl7relay check {settings.address} prints the line to add, once you have confirmed the "
                         "fingerprint with the server's owner)")
    return None


class _Transport(transport.SSHClientTransport):
    _log = _QUIET

    def verifyHostKey(self, hostKey, fingerprint_):
        factory = self.factory
        key = keys.Key.fromString(hostKey)
        factory.server_key = key
        refused = _refusal(factory.settings, key)
        if refused is not None:
            factory.failed(refused)  # said before the transport closes (its own reason says less)
            return defer.fail(refused)
        return defer.succeed(True)

    def connectionSecure(self):
        factory = self.factory
        self.requestService(_UserAuth(factory.settings, _Connection(factory)))

    def sendDisconnect(self, reason, desc):
        if reason == transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE:
            settings = self.factory.settings
            how = " and ".join(w for w, given in (("its key", settings.private_key), ("its password", settings.password))
                               if given) or "no key or password"
            self.factory.failed(SFTPError(f"{settings.address}: user {settings.username!r} was refused ({how})"))
        transport.SSHClientTransport.sendDisconnect(self, reason, desc)

    def connectionLost(self, reason):
        transport.SSHClientTransport.connectionLost(self, reason)
        self.factory.lost(reason)


class _UserAuth(userauth.SSHUserAuthClient):
    preferredOrder = [b"publickey", b"password"]
    _log = _QUIET

    def __init__(self, settings: SFTPSettings, service):
        super().__init__(settings.username.encode(), service)
        self.settings = settings
        self._key_offered = False
        self._password_given = False
        self._key = None
        if settings.private_key:
            self._key = keys.Key.fromString(settings.private_key, passphrase=settings.passphrase)

    def getPublicKey(self):
        if self._key is None or self._key_offered:
            return None
        self._key_offered = True
        return self._key.public()

    def getPrivateKey(self):
        return defer.succeed(self._key)

    def getPassword(self, prompt=None):
        if self.settings.password is None or self._password_given:
            return None
        self._password_given = True
        return defer.succeed(self.settings.password.encode())


class _Connection(connection.SSHConnection):
    _log = _QUIET

    def __init__(self, factory):
        super().__init__()
        self.factory = factory

    def serviceStarted(self):
        self.openChannel(_SFTPChannel(conn=self))


class _SFTPChannel(channel.SSHChannel):
    name = b"session"
    _log = _QUIET

    def channelOpen(self, data):
        d = self.conn.sendRequest(self, b"subsystem", common.NS(b"sftp"), wantReply=True)
        d.addCallbacks(self._subsystem, lambda f: self.conn.factory.failed(SFTPError("the server has no SFTP subsystem")))

    def _subsystem(self, _):
        client = _Client(self.conn.factory)
        client.makeConnection(self)
        self.dataReceived = client.dataReceived
        self.client = client

    def closed(self):
        client = getattr(self, "client", None)
        if client is not None:
            client.connectionLost(protocol.connectionDone)
        self.loseConnection()


class _Client(filetransfer.FileTransferClient):
    _log = _QUIET

    def __init__(self, factory):
        super().__init__()
        self.factory = factory

    def gotServerVersion(self, serverVersion, extData):
        self.factory.ready(SFTPSession(self, extData))


class _Factory(protocol.ClientFactory):
    protocol = _Transport
    noisy = False

    def __init__(self, settings: SFTPSettings, reactor):
        self.settings = settings
        self.reactor = reactor
        self.server_key = None
        self.session: defer.Deferred = defer.Deferred()
        self._timeout = reactor.callLater(settings.timeout, self._timed_out)
        self.transport = None

    def buildProtocol(self, addr):
        built = super().buildProtocol(addr)
        self.transport = built
        return built

    def ready(self, session: "SFTPSession") -> None:
        session.transport = self.transport
        self._finish()
        if not self.session.called:
            self.session.callback(session)

    def failed(self, error: Exception) -> None:
        self._finish()
        if not self.session.called:
            self.session.errback(error)
        if self.transport is not None and self.transport.transport is not None:
            self.transport.transport.loseConnection()

    def lost(self, reason) -> None:
        error = reason.value
        if isinstance(error, SFTPError):
            self.failed(error)
        elif not self.session.called:
            self.failed(SFTPError(f"{self.settings.address}: the connection closed before SFTP started "
                                  f"({reason.getErrorMessage() or 'refused or dropped'}; wrong user or key?)"))

    def clientConnectionFailed(self, connector, reason):
        self.failed(SFTPError(f"{self.settings.address}: cannot connect: {reason.getErrorMessage()}"))

    def _timed_out(self) -> None:
        self._timeout = None
        self.failed(SFTPError(f"{self.settings.address}: no SFTP session within {self.settings.timeout:g}s"))

    def _finish(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None


def connect(reactor, settings: SFTPSettings) -> defer.Deferred:
    """An :class:`SFTPSession` once signed in and SFTP has started (SFTPError otherwise)."""
    factory = _Factory(settings, reactor)
    reactor.connectTCP(settings.host, settings.port, factory, timeout=settings.timeout)
    return factory.session


@defer.inlineCallbacks
def host_key(reactor, host: str, port: int, timeout: float = 15.0):
    """The server's host key (twisted's Key), read at the start of a connection that then ends."""
    factory = _Factory(SFTPSettings(host, port, "hl7relay", None, timeout=timeout), reactor)
    reactor.connectTCP(host, port, factory, timeout=timeout)
    try:
        yield factory.session
    except SFTPError as exc:
        if factory.server_key is None:
            if "cannot connect" in str(exc) or "no SFTP session within" in str(exc):
                raise
            raise SFTPError(f"sftp://{host}:{port}: no host key offered (not an SSH server?)") from None
    return factory.server_key


def _quietly(d: defer.Deferred) -> defer.Deferred:
    """True once done; False when it failed (a close on a dropped connection)."""
    return d.addCallbacks(lambda _: True, lambda failure: False)


class SFTPSession:
    """One signed-in SFTP session: listing, reading, writing, renaming, removing."""

    def __init__(self, client: _Client, extensions: dict):
        self.client = client
        self.address = client.factory.settings.address
        self.extensions = extensions
        self.transport = None

    @property
    def posix_rename(self) -> bool:
        return b"posix-rename@openssh.com" in self.extensions

    def close(self) -> None:
        if self.transport is not None and self.transport.transport is not None:
            self.transport.transport.loseConnection()

    @property
    def connected(self) -> bool:
        return bool(self.client.connected)

    @defer.inlineCallbacks
    def listdir(self, path: str):
        directory = yield self._call(self.client.openDirectory, path)
        out = []
        try:
            while True:
                try:
                    entries = yield directory.read()
                except EOFError:
                    break
                except _LOST as exc:
                    raise SFTPError(f"{self.address}: the connection dropped while {path} was listed") from exc
                for name, _longname, attrs in entries:
                    name = name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else name
                    if name in (".", ".."):
                        continue
                    mode = attrs.get("permissions", 0)
                    out.append(RemoteFile(name, attrs.get("size", 0), float(attrs.get("mtime", 0)),
                                          stat_module.S_ISREG(mode) if mode else True))
        finally:
            yield _quietly(directory.close())
        return out

    @defer.inlineCallbacks
    def stat(self, path: str):
        """(size, mtime), or None when there is no such file."""
        try:
            attrs = yield self.client.getAttrs(path.encode())
        except _LOST as exc:
            raise SFTPError(f"{self.address}: the connection dropped") from exc
        except filetransfer.SFTPError as exc:
            if exc.code == filetransfer.FX_NO_SUCH_FILE:
                return None
            raise SFTPError(f"stat {path}: {exc.message}") from exc
        return attrs.get("size", 0), float(attrs.get("mtime", 0))

    @defer.inlineCallbacks
    def download(self, path: str, consume):
        """Read the file in order, handing each piece to ``consume(bytes)`` (several requests in
        flight, bounded); returns the bytes read. SFTPError when the connection drops."""
        handle = yield self._call(self.client.openFile, path, filetransfer.FXF_READ, {})
        offset, total, done = 0, 0, False
        pending: list = []
        try:
            while not done:
                while len(pending) < IN_FLIGHT:
                    pending.append(handle.readChunk(offset, CHUNK))
                    offset += CHUNK
                try:
                    piece = yield pending.pop(0)
                except EOFError:
                    break
                if piece:
                    consume(piece)
                    total += len(piece)
                done = len(piece) < CHUNK  # a short read is the end (the requests after it answer EOF)
        except _LOST as exc:
            raise SFTPError(f"{path}: the connection dropped while it was read ({total} bytes in)") from exc
        except filetransfer.SFTPError as exc:
            raise SFTPError(f"{path}: {exc.message}") from exc
        finally:
            for d in pending:
                d.addErrback(lambda failure: None)  # answered after the end, or lost with the connection
            yield _quietly(handle.close())
        return total

    @defer.inlineCallbacks
    def upload(self, path: str, data: bytes):
        """Write ``data`` to ``path`` (created or truncated), all of it acknowledged before this returns."""
        flags = filetransfer.FXF_WRITE | filetransfer.FXF_CREAT | filetransfer.FXF_TRUNC
        handle = yield self._call(self.client.openFile, path, flags, {"permissions": 0o640})
        pending: list = []
        try:
            for offset in range(0, len(data), CHUNK):
                pending.append(handle.writeChunk(offset, data[offset:offset + CHUNK]))
                if len(pending) >= IN_FLIGHT:
                    yield pending.pop(0)
            while pending:
                yield pending.pop(0)
        except _LOST as exc:
            raise SFTPError(f"{path}: the connection dropped while it was written") from exc
        except filetransfer.SFTPError as exc:
            raise SFTPError(f"{path}: {exc.message}") from exc
        finally:
            for d in pending:
                d.addErrback(lambda failure: None)
            closed = yield _quietly(handle.close())
        if closed is False:
            raise SFTPError(f"{path}: the server did not confirm it closed the file")

    @defer.inlineCallbacks
    def rename(self, old: str, new: str, replace: bool = False):
        """``old`` to ``new``; never over an existing ``new`` unless ``replace`` (SFTPError then)."""
        if replace and self.posix_rename:
            yield self._call(self.client.extendedRequest, b"posix-rename@openssh.com",
                             common.NS(old.encode()) + common.NS(new.encode()), raw=True)
            return
        if (yield self.stat(new)) is not None:
            raise SFTPError(f"rename {old} -> {new}: {new} exists")
        yield self._call(self.client.renameFile, old, new)

    @defer.inlineCallbacks
    def rename_to_free_name(self, old: str, folder: str, name: str):
        """``old`` into ``folder`` as ``name``, or NAME.1.EXT, NAME.2.EXT... when taken (never over
        a file); the path it got."""
        stem, dot, suffix = name.rpartition(".") if "." in name.lstrip(".") else (name, "", "")
        for counter in range(10_000):
            target = f"{folder}/{name if counter == 0 else f'{stem}.{counter}{dot}{suffix}'}"
            if (yield self.stat(target)) is not None:
                continue
            yield self.rename(old, target)
            return target
        raise SFTPError(f"no free name for {name} in {folder}")

    def remove(self, path: str):
        return self._call(self.client.removeFile, path)

    @defer.inlineCallbacks
    def makedirs(self, path: str):
        built = ""
        for part in [p for p in path.split("/") if p]:
            built += "/" + part if path.startswith("/") or built else part
            if (yield self.stat(built)) is None:
                try:
                    yield self._call(self.client.makeDirectory, built, {})
                except SFTPError:
                    if (yield self.stat(built)) is None:
                        raise

    def _call(self, method, path, *args, raw: bool = False):
        """A request, its SFTP errors said with the path."""
        d = method(path if raw else path.encode(), *args)

        def said(failure):
            if failure.check(*_LOST):
                raise SFTPError(f"{self.address}: the connection dropped")
            failure.trap(filetransfer.SFTPError, NotImplementedError, EOFError)
            value = failure.value
            message = getattr(value, "message", None) or str(value) or type(value).__name__
            where = path.decode("utf-8", "replace") if isinstance(path, bytes) else path
            raise SFTPError(f"{where}: {message}")

        return d.addErrback(said)
