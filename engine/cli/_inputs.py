"""Turning FILE|DIR|- arguments into the inputs a verb reads."""

from __future__ import annotations

import os
from pathlib import Path

MESSAGE_SUFFIXES = {".hl7", ".er7", ".msg", ".dat", ".txt", ".hl7v2", ""}


def collect_inputs(inputs: list[str]) -> list[tuple[str, Path | None]]:
    """(name, path) pairs; path None means standard input. Directories are walked for
    message files (hidden ones skipped), in name order."""
    found: list[tuple[str, Path | None]] = []
    for item in inputs:
        if item == "-":
            found.append(("<stdin>", None))
            continue
        path = Path(item)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    candidate = Path(root) / name
                    if not name.startswith(".") and candidate.suffix.lower() in MESSAGE_SUFFIXES:
                        found.append((str(candidate), candidate))
        else:
            found.append((item, path))
    return found
