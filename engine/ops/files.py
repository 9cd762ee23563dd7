"""What an operator does to a file the ledger has: import a duplicate anyway (audited).

A file whose content had been read before is not imported (its state: duplicate) and waits in
the source's error folder. When the PMS really did mean to send it again, an operator says so,
with a reason: the ledger row becomes ``reimport`` and the file goes back into the source's
folder under its name, where the source reads it through the ledger like any other (skipping
nothing: none of it was stored). Only a local folder's files; an ERROR message of a file is
replayed on its own (hl7relay replay) once its cause is fixed.
"""

from __future__ import annotations

import os
from pathlib import Path

from hl7relay.outcomes import FileState
from hl7relay.store.database import AuditUpdate, FileUpdate, Store

__all__ = ["ReimportError", "reimport", "file_totals"]


class ReimportError(Exception):
    def __init__(self, message: str, usage: bool = False):
        super().__init__(message)
        self.usage = usage  # the request was wrong (400), not the state of things (409)


def reimport(store: Store, channels: dict, file_id: int, reason: str, audit: dict) -> str:
    """Import a duplicate file anyway; what was done, in one line."""
    if not reason.strip():
        raise ReimportError("say why the file is imported again (the reason goes to the audit log)", usage=True)
    entry = store.file(file_id)
    if entry is None:
        raise ReimportError(f"no file {file_id} in the ledger", usage=True)
    if entry["state"] != FileState.DUPLICATE.value:
        raise ReimportError(f"file {file_id} is {entry['state']}: only a duplicate is imported again (an ERROR "
                            "message of a file is replayed on its own: hl7relay replay)")
    channel = channels.get(entry["channel"])
    directory = getattr(getattr(channel, "source", None), "directory", None)
    if channel is None or channel.source_type != "file" or directory is None:
        raise ReimportError(f"file {file_id} came to channel {entry['channel']}, which has no local file source now")
    folder = Path(directory)
    if folder.resolve().as_uri() != entry["source"]:
        raise ReimportError(f"file {file_id} came from {entry['source']}; channel {entry['channel']} reads "
                            f"{folder.resolve().as_uri()} now")
    archived = Path(entry["archived_as"]) if entry["archived_as"] else None
    if archived is None or not archived.is_file():
        raise ReimportError(f"file {file_id}: it is no longer at {entry['archived_as'] or 'its archived place'}")
    target = folder / entry["name"]
    if target.exists():
        raise ReimportError(f"{target} exists: a file of that name waits to be read; try again once it is")
    updates: list = [FileUpdate(file_id, {"state": FileState.REIMPORT.value}),
                     AuditUpdate(dict(audit, target=f"file {file_id}", reason=reason,
                                      detail=f"{entry['name']} back into {folder} to be imported"))]
    store.commit([], updates)
    os.replace(archived, target)  # after the ledger says so: the source reads it as a re-import
    return f"{entry['name']} is back in {folder}: it is imported at the source's next look"


def file_totals(files: list[dict]) -> dict[str, int]:
    """Files by state as people read them: a re-import is being read."""
    totals = {"reading": 0, "done": 0, "errors": 0, "duplicate": 0}
    for entry in files:
        state = "reading" if entry["state"] == FileState.REIMPORT.value else entry["state"]
        totals[state] = totals.get(state, 0) + 1
    return totals
