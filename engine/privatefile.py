"""Small files the engine leaves for the CLI on this host (its API endpoint, its local token, the
channel folders it runs): written whole or not at all, readable by the engine's user only."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_private"]


def write_private(path: Path, text: str) -> None:
    """``text`` into ``path`` (0600, its folder made 0700 if missing), replacing it atomically: a
    reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(text)
    os.replace(temporary, path)
