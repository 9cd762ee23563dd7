"""Turning FILE|DIR|- arguments into the inputs a verb reads."""

from __future__ import annotations

import os
import stat
from pathlib import Path

MESSAGE_SUFFIXES = {".hl7", ".er7", ".msg", ".dat", ".txt", ".hl7v2", ""}


class InputError(ValueError):
    """An argument that names no input at all (an empty one)."""


class Inputs(list):
    """(name, path) pairs; path None means standard input. ``notes``: what a walk left out and why
    (a directory with no message file, a FIFO or device inside it), one line each."""

    def __init__(self):
        super().__init__()
        self.notes: list[str] = []


def collect_inputs(inputs: list[str]) -> Inputs:
    """Directories are walked for message files (hidden ones skipped), in name order; only regular
    files are read from a walk (a FIFO inside a directory would wait for a writer for ever). A file
    named on the command line is read whatever it is: its user chose it."""
    found = Inputs()
    for item in inputs:
        if item == "-":
            found.append(("<stdin>", None))
            continue
        if not item.strip():
            raise InputError("an empty argument: give a file, a directory or - (standard input)")
        path = Path(item)
        if path.is_dir():
            before, others, special = len(found), 0, []
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    candidate = Path(root) / name
                    if name.startswith(".") or candidate.suffix.lower() not in MESSAGE_SUFFIXES:
                        others += 1
                        continue
                    try:
                        regular = stat.S_ISREG(candidate.stat().st_mode)
                    except OSError:
                        regular = True  # unreadable: reading it says why
                    if regular:
                        found.append((str(candidate), candidate))
                    else:
                        special.append(str(candidate))
            for name in special:
                found.notes.append(f"{name}: skipped: not a regular file (a FIFO, socket or device)")
            if len(found) == before:
                suffixes = ", ".join(f"*{s}" for s in sorted(MESSAGE_SUFFIXES) if s)
                why = f"{others} other file{'s' * (others != 1)} ({suffixes} or no extension are read)" if others else "it is empty"
                found.notes.append(f"{item}: no message files in this directory: {why}")
        else:
            found.append((item, path))
    return found
