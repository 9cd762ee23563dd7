"""Configuration snapshots: what the engine ran, recorded at every start, reload and rollback.

A snapshot is the rendered bundle of the channel folders (every channel file, lookup table, map and
profile in them, with the environment file's values in place of ``${env:NAME}``; ``${secret:...}``,
``${file:...}`` and the process's own variables stay the references they are, so no secret value
is ever in one), its sha256, the hash of the files as written (the same in every environment:
what ``hl7relay promote`` compares), the git commit (and whether the checkout had changes) when
the folders are in one, the environment, the host, who and why. The bundle is stored compressed;
``hl7relay config history | show | diff`` read them back and ``config rollback`` loads one again.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

from hl7relay.environments import render

__all__ = ["Snapshot", "take_snapshot", "bundle_of", "source_files", "source_sha256", "reapplied",
           "load_snapshot_channels", "differs_from_files", "files_now", "in_folders", "BUNDLE_SUFFIXES", "MAX_BUNDLE_BYTES"]

BUNDLE_SUFFIXES = (".yaml", ".yml", ".csv", ".json", ".txt")
MAX_BUNDLE_BYTES = 16 * 1024 * 1024  # a folder with more than this in configuration is not all configuration


@dataclass(slots=True)
class Snapshot:
    taken_at: float
    sha256: str
    environment: str
    node: str
    actor: str
    reason: str  # start, reload, rollback
    git_commit: str
    git_dirty: bool
    files: dict  # relative path -> rendered text
    note: str = ""  # what the person said (--reason)
    from_snapshot: int | None = None  # the snapshot whose files this re-applies (a rollback)
    source_sha256: str = ""  # the files before the environment's values went in

    def compressed(self) -> bytes:
        return zlib.compress(json.dumps(self.files, sort_keys=True).encode("utf-8"), 6)


def _digest(files: dict, *extra: str) -> str:
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode("utf-8"))
    for part in extra:
        digest.update(part.encode())
    return digest.hexdigest()


def source_files(paths) -> dict[str, str]:
    """The configuration files of the channel folders (or files), as written."""
    out: dict[str, str] = {}
    total = 0
    for item in map(Path, paths):
        files = [item] if item.is_file() else sorted(p for p in item.rglob("*") if p.is_file()) if item.is_dir() else []
        for path in files:
            if path.suffix.lower() not in BUNDLE_SUFFIXES or any(part.startswith(".") for part in path.parts[-2:]):
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            total += len(text)
            if total > MAX_BUNDLE_BYTES:
                break
            out[str(path)] = text
    return out


def bundle_of(paths, values: dict) -> dict[str, str]:
    """The configuration files of the channel folders (or files), rendered with ``values``."""
    return {path: render(text, values) for path, text in source_files(paths).items()}


def _portable(files: dict, paths) -> dict:
    """The files keyed by where they are in their channel folder (its position among ``paths`` and
    the path inside it), not by how the folder was named: the engine may say ``channels``, a
    command run elsewhere ``/srv/hl7relay/channels``; the same files must hash the same."""
    import os

    roots = [os.path.abspath(p) for p in paths]
    out = {}
    for path, text in files.items():
        absolute = os.path.abspath(path)
        index = next((i for i, root in enumerate(roots) if absolute == root or absolute.startswith(root + os.sep)), None)
        key = path if index is None else f"{index}:{os.path.relpath(absolute, roots[index])}"
        out[key] = text
    return out


def source_sha256(paths) -> str:
    """The files' hash before any environment's values go in: the same files give the same hash in
    test and in prod, wherever the folders are (what ``hl7relay promote`` compares)."""
    return _digest(_portable(source_files(paths), paths))


def _git(folder: Path) -> tuple[str, bool]:
    """The commit checked out where the channels are, and whether it has changes ("" when not in git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return "", False
        status = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=folder, capture_output=True, text=True,
                                timeout=10)
        return commit.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "", False


def _named_files(channels, settings_file, known: dict) -> dict[str, str]:
    """The files the channels read from outside their folders (a profile in config/profiles), and
    the engine's settings file (a store URL's password masked), as written."""
    import os

    from hl7relay.yamlsource import read_config_text

    held = {os.path.abspath(path) for path in known}
    out: dict[str, str] = {}
    for path in sorted({p for channel in channels for p in getattr(channel, "config_files", ())}):
        if os.path.abspath(path) not in held and Path(path).suffix.lower() in BUNDLE_SUFFIXES:
            try:
                out[path] = read_config_text(path)
            except (OSError, UnicodeDecodeError):
                continue
    if settings_file:
        try:
            out[str(settings_file)] = _URL_PASSWORD.sub(r"\1***\2", Path(settings_file).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            pass
    return out


_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s/]+(@)")  # user:password@ in a URL


def take_snapshot(paths, actor: str, reason: str, now: float, note: str = "", channels=(),
                  settings_file=None) -> Snapshot:
    """The channel folders as the engine loads them now, in the environment it runs in, with the
    files ``channels`` read from elsewhere and the engine's settings file."""
    from hl7relay.yamlsource import current_environment

    name, values = current_environment()
    # the environment's values are written in; the process's own variables stay references (one may
    # hold a credential), read again from the process when a rollback loads the snapshot
    raw = source_files(paths)
    source = _digest(_portable(raw, paths))  # the channel folders as written: the same in every environment
    raw.update(_named_files(channels, settings_file, raw))
    files = {path: render(text, values, keep_missing=True) for path, text in raw.items()}  # as files_now
    first = next((Path(p) for p in paths if Path(p).exists()), Path("."))
    commit, dirty = _git(first if first.is_dir() else first.parent)
    return Snapshot(now, _digest(files, name), name, socket.gethostname(), actor, reason, commit, dirty, files,
                    note=note, source_sha256=source)


def reapplied(row: dict, actor: str, reason: str, note: str, now: float) -> Snapshot:
    """A new snapshot of a stored one's files (a rollback to it, or a start that runs it again)."""
    return Snapshot(now, row["sha256"], row["environment"], socket.gethostname(), actor, reason, row["git_commit"],
                    bool(row["git_dirty"]), row["files"], note=note, from_snapshot=int(row["id"]),
                    source_sha256=row.get("source_sha256") or "")


def load_snapshot_channels(row: dict, paths) -> tuple[list, list]:
    """The channels as a stored snapshot defines them (its files in place of the disk's; what it
    does not hold, such as certificates, read from the disk), checked like a reload's."""
    from hl7relay.channels import load_channels
    from hl7relay.yamlsource import reading_snapshot

    with reading_snapshot(row["files"]):
        return load_channels(paths)


def files_now(paths) -> dict[str, str]:
    """The channel files on disk as a snapshot taken now would hold them."""
    from hl7relay.yamlsource import current_environment

    _, values = current_environment()
    return {path: render(text, values, keep_missing=True) for path, text in source_files(paths).items()}


def in_folders(files: dict, paths) -> dict:
    """Those of a snapshot's files that are in the channel folders (not a settings file or a
    profile kept elsewhere): what ``files_now`` reads again."""
    import os

    roots = [os.path.abspath(p) for p in paths]
    return {path: text for path, text in files.items()
            if any(os.path.abspath(path) == root or os.path.abspath(path).startswith(root + os.sep) for root in roots)}


def differs_from_files(row: dict | None, paths) -> bool:
    """Whether the channel folders' files on disk, rendered now, are not what this snapshot holds
    (compared by where they are, however the folders are named)."""
    return row is not None and _portable(files_now(paths), paths) != _portable(in_folders(row["files"], paths), paths)
