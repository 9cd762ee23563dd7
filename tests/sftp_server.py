"""The SFTP server for tests (tests/sftpserver.py in a process of its own), its keys and a
known_hosts that pins it; stopped with SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncssh

HERE = Path(__file__).resolve().parent


class SFTPServer:
    def __init__(self, folder: Path, *, password: str | None = None, drop_after: int | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.root = folder / "root"
        self.root.mkdir(exist_ok=True)
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        (folder / "host_key").write_bytes(host_key.export_private_key())
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")
        (folder / "client_key").write_bytes(self.client_key.export_private_key())
        (folder / "client_key").chmod(0o600)
        (folder / "authorized_keys").write_bytes(self.client_key.export_public_key())
        self.host_public = host_key.export_public_key().decode().split()[:2]
        self.password = password
        self.drop_after = drop_after
        self.process = None
        self.port = 0
        self.start()
        self.known_hosts = folder / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {' '.join(self.host_public)}\n")

    def start(self) -> None:
        arguments = [sys.executable, str(HERE / "sftpserver.py"), str(self.root), str(self.folder / "host_key"),
                     str(self.folder / "authorized_keys"), "--port", str(self.port)]
        if self.password:
            arguments += ["--password", self.password]
        if self.drop_after:
            arguments += ["--drop-after", str(self.drop_after)]
        self.process = subprocess.Popen(arguments, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            self.process.kill()
            raise RuntimeError(f"the SFTP server did not start: {line}{self.process.stdout.read()}")
        self.port = int(line.split()[-1])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        if self.process is not None:
            self.process.stdout.close()

    def restart(self) -> None:
        self.stop()
        deadline = time.monotonic() + 10
        while True:
            try:
                self.start()
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
