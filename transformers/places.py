"""Where a transformer step applies: an HL7 path (``OBX[*]-3.1``), or one inside a group of the
message's structure (``ORDER_OBSERVATION[*]/OBX[*]-5``: each order's results;
``PATIENT_RESULT[1]/ORDER_OBSERVATION[2]/OBR-4``). A group is read from the message's structure
as validation reads it (its version, type and event), so an order's NTE is told from a result's;
inside a group, a segment's number counts within that group instance.
"""

from __future__ import annotations

from hl7relay.errors import PathError
from hl7relay.hl7.message import Message
from hl7relay.hl7.path import EVERY, GroupPath, Path, StepPath

__all__ = ["places", "paired_places"]


def _groups(message: Message, path: GroupPath):
    """The message's groups, read once per step (validation's matcher runs over the message)."""
    from hl7relay.validation import segment_groups

    try:
        return segment_groups(message)
    except ValueError as exc:
        raise PathError(f"{path}: {exc}") from None


def _instances(message: Message, path: GroupPath, found=None) -> list[tuple[int, int, frozenset]]:
    """Each group instance the path selects: its (first, last) segment positions and the positions
    inside it that belong to a group nested in it. ``found``: the groups, when already read."""
    found = found if found is not None else _groups(message, path)
    ranges = [(0, len(message.segment_names()) - 1)]
    name = ""
    for name, index in path.groups:
        if name not in found.instances:
            known = ", ".join(sorted(found.instances)) or "none"
            raise PathError(f"{path}: this message's structure has no group {name} (its groups: {known})")
        inside = []
        for first, last in ranges:
            within = [g for g in found.instances[name] if first <= g[0] and g[1] <= last]
            if index == EVERY:
                inside += within
            elif index <= len(within):
                inside.append(within[index - 1])
        ranges = inside
    if path.segment not in found.direct.get(name, frozenset()):
        return [(first, last, frozenset()) for first, last in ranges]  # a segment of a nested group: OBX in an order
    # a segment the group holds itself (an order's NTE): not the same segment of a group nested in it
    # (a result's NTE)
    nested = [g for groups in found.instances.values() for g in groups]
    out = []
    for first, last in ranges:
        skip = {p for start, end in nested if first <= start and end <= last and (start, end) != (first, last)
                for p in range(start, end + 1)}
        out.append((first, last, frozenset(skip)))
    return out


def _within(message: Message, path: Path, first: int, last: int, skip: frozenset, create: bool) -> list[Path]:
    """The places of ``path`` (its occurrence counted within positions first..last, leaving out
    ``skip``) as plain paths."""
    names = message.segment_names()
    segment = path.segment
    mine = [p for p in range(first, last + 1) if names[p] == segment and p not in skip]
    if path.occurrence == EVERY:
        chosen = mine
    elif path.occurrence <= len(mine):
        chosen = [mine[path.occurrence - 1]]
    else:
        return []  # a group instance does not gain a segment: add_segment adds one where it belongs
    out: list[Path] = []
    for position in chosen:
        out += message.expand(path._replace(occurrence=names[:position + 1].count(segment)), create)
    return out


def places(message: Message, path: StepPath, create: bool = False) -> list[Path]:
    """Every place ``path`` names in ``message``, as plain paths, in message order."""
    if isinstance(path, Path):
        return message.expand(path, create)
    out: list[Path] = []
    for first, last, skip in _instances(message, path):
        out += _within(message, path.path, first, last, skip, create)
    return out


def paired_places(message: Message, source: StepPath, target: StepPath, create: bool = False):
    """(source place, its target places) for a copy: a [*] on both sides pairs them (OBX 2 to OBX
    2; within each group instance when both name the same groups); a [*] only on the target writes
    the one value to each."""
    if isinstance(source, GroupPath) and isinstance(target, GroupPath) and \
            [name for name, _ in source.groups] == [name for name, _ in target.groups]:
        found = _groups(message, source)
        sources, targets = _instances(message, source, found), _instances(message, target, found)
        for (first, last, skip), (_, _, target_skip) in zip(sources, targets):
            targets_here = _within(message, target.path, first, last, target_skip, create)
            for place in _within(message, source.path, first, last, skip, False):
                yield place, _bound_in(targets_here, target.path, source.path, place)
        return
    for place in places(message, source):
        yield place, places(message, _bound(target, source, place), create)


def _bound(target: StepPath, source: StepPath, place: Path) -> StepPath:
    if not isinstance(target, Path) or not isinstance(source, Path):
        return target
    if target.occurrence == EVERY and source.occurrence == EVERY:
        target = target._replace(occurrence=place.occurrence)
    if target.repetition == EVERY and source.repetition == EVERY:
        target = target._replace(repetition=place.repetition)
    return target


def _bound_in(targets: list[Path], target: Path, source: Path, place: Path) -> list[Path]:
    """Within one group instance: a [*] on both sides pairs the n-th source with the n-th target."""
    if target.occurrence == EVERY and source.occurrence == EVERY and target.segment == source.segment:
        targets = [t for t in targets if t.occurrence == place.occurrence]
    if target.repetition == EVERY and source.repetition == EVERY:
        targets = [t for t in targets if t.repetition == place.repetition]
    return targets
