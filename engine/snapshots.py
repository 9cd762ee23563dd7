"""Configuration snapshots: what the engine ran, recorded at every start and reload.

A snapshot is the rendered bundle of the channel folders (every channel file, lookup table, map and
profile in them, with the environment's values in place of ``${env:NAME}``; ``${secret:...}`` and
``${file:...}`` stay the references they are, so no secret value is ever in one), its sha256, the
git commit (and whether the checkout had changes) when the folders are in one, the environment,
the host, who and why. The bundle is stored compressed; ``hl7relay config history | show | diff``
read them back.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

from hl7relay.environments import render

__all__ = ["Snapshot", "take_snapshot", "bundle_of", "BUNDLE_SUFFIXES", "MAX_BUNDLE_BYTES"]

BUNDLE_SUFFIXES = (".yaml", ".yml", ".csv", ".json", ".txt")
MAX_BUNDLE_BYTES = 16 * 1024 * 1024  # a folder with more than this in configuration is not all configuration


@dataclass(slots=True)
class Snapshot:
    taken_at: float
    sha256: str
    environment: str
    node: str
    actor: str
    reason: str
    git_commit: str
    git_dirty: bool
    files: dict  # relative path -> rendered text

    def compressed(self) -> bytes:
        return zlib.compress(json.dumps(self.files, sort_keys=True).encode("utf-8"), 6)


def bundle_of(paths, values: dict) -> dict[str, str]:
    """The configuration files of the channel folders (or files), rendered with ``values``."""
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
            out[str(path)] = render(text, values)
    return out


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


def take_snapshot(paths, actor: str, reason: str, now: float) -> Snapshot:
    """The channel folders as the engine loads them now, in the environment it runs in."""
    from hl7relay.yamlsource import current_environment

    name, values = current_environment()
    files = bundle_of(paths, values)
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode("utf-8"))
    digest.update(name.encode())
    first = next((Path(p) for p in paths if Path(p).exists()), Path("."))
    commit, dirty = _git(first if first.is_dir() else first.parent)
    return Snapshot(now, digest.hexdigest(), name, socket.gethostname(), actor, reason, commit, dirty, files)
