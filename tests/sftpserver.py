"""An SFTP server for tests: asyncssh in a process of its own, on 127.0.0.1, its root a folder.

    python tests/sftpserver.py ROOT HOST_KEY AUTHORIZED_KEYS [--password PASSWORD] [--port 0]
        [--drop-after BYTES]

Prints ``listening on PORT`` once it accepts connections. Users sign in with a key listed in
AUTHORIZED_KEYS (OpenSSH format), or with PASSWORD when given. Every session sees ROOT as ``/``
(chroot). ``--drop-after BYTES``: after that many bytes read or written in total, the server
closes every connection once (a network that drops mid-transfer), then serves normally.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncssh


class _Counter:
    transferred = 0
    drop_after: int | None = None
    dropped = False
    connections: list = []


def _sftp_factory(root: str):
    class Server(asyncssh.SFTPServer):
        def __init__(self, chan):
            super().__init__(chan, chroot=root.encode())
            self._chan = chan

        def _count(self, amount: int) -> None:
            _Counter.transferred += amount
            if _Counter.drop_after is not None and not _Counter.dropped and _Counter.transferred >= _Counter.drop_after:
                _Counter.dropped = True
                for connection in list(_Counter.connections):
                    connection.abort()

        def read(self, file_obj, offset, size):
            data = super().read(file_obj, offset, size)
            self._count(len(data))
            return data

        def write(self, file_obj, offset, data):
            self._count(len(data))
            return super().write(file_obj, offset, data)

    return Server


class _SSHServer(asyncssh.SSHServer):
    def __init__(self, password: str | None):
        self.password = password

    def connection_made(self, conn):
        _Counter.connections.append(conn)

    def connection_lost(self, exc):
        _Counter.connections[:] = [c for c in _Counter.connections if not c.is_closed()]

    def password_auth_supported(self):
        return self.password is not None

    def validate_password(self, username, password):
        return password == self.password


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("host_key")
    parser.add_argument("authorized_keys")
    parser.add_argument("--password")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--drop-after", type=int)
    args = parser.parse_args()
    _Counter.drop_after = args.drop_after
    server = await asyncssh.listen("127.0.0.1", args.port, server_host_keys=[args.host_key],
                                   authorized_client_keys=args.authorized_keys,
                                   server_factory=lambda: _SSHServer(args.password),
                                   sftp_factory=_sftp_factory(args.root), allow_scp=False)
    port = server.sockets[0].getsockname()[1]
    print(f"listening on {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
