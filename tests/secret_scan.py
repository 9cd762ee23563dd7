"""The suite's secret-leak scan (issue #30): every secret the suite's tests set — vault values
(decrypted with the vault key beside their store) and ``*.secret`` files (what ``${file:...}``
reads) — searched for in every configuration snapshot, audit entry, engine log and API or console
answer the suite produced. Run at the end of the session (conftest.py); a hit fails it."""

from __future__ import annotations

import sqlite3
import zlib
from pathlib import Path

OUTPUTS = "api-and-console-outputs.log"  # answers the suite's HTTP helpers got, appended
MIN_LENGTH = 6  # shorter test values ("x") are found in any text
ROOT: list = [None]  # the session's temporary folder (conftest.py sets it)


def record_output(text: str) -> None:
    """An API or console answer, kept for the scan."""
    if ROOT[0] is not None:
        with open(Path(ROOT[0]) / OUTPUTS, "a", encoding="utf-8") as out:
            out.write(text + "\n")


def collect_secrets(root: Path) -> dict[str, str]:
    """value -> where it was set."""
    found: dict[str, str] = {}
    for path in root.rglob("*.secret"):
        try:
            value = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if len(value) >= MIN_LENGTH:
            found.setdefault(value, str(path))
    for store in root.rglob("*.db"):
        key = store.parent / "vault.key"
        if not key.is_file():
            continue
        from cryptography.fernet import Fernet, InvalidToken

        try:
            fernet = Fernet(key.read_bytes().strip())
            with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as connection:
                rows = list(connection.execute("SELECT name, ciphertext FROM secrets"))
        except (sqlite3.Error, ValueError, OSError):
            continue
        for name, ciphertext in rows:
            try:
                value = fernet.decrypt(bytes(ciphertext)).decode("utf-8")
            except (InvalidToken, UnicodeDecodeError):
                continue
            if len(value) >= MIN_LENGTH:
                found.setdefault(value, f"{store}: secret {name}")
    return found


def texts(root: Path):
    """(where, text) of every snapshot, audit entry, log and recorded answer under ``root``."""
    for path in root.rglob("*.log"):
        try:
            yield str(path), path.read_bytes().decode("utf-8", "replace")
        except OSError:
            continue
    for store in root.rglob("*.db"):
        try:
            with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as connection:
                tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if "config_snapshots" in tables:
                    for number, bundle in connection.execute("SELECT id, bundle FROM config_snapshots"):
                        yield f"{store}: snapshot {number}", zlib.decompress(bytes(bundle)).decode("utf-8", "replace")
                if "audit_log" in tables:
                    for row in connection.execute("SELECT * FROM audit_log"):
                        yield f"{store}: audit entry {row[0]}", " ".join(map(str, row))
        except (sqlite3.Error, zlib.error):
            continue


def scan(root: Path) -> list[str]:
    """Each leak: where, and whose secret (masked)."""
    secrets = collect_secrets(root)
    hits = []
    for where, text in texts(root):
        for value, origin in secrets.items():
            if value in text:
                hits.append(f"{where}: the secret of {origin} ({value[:2]}…)")
    return hits
