"""HL7 paths: ``PID-5``, ``PID-5.1``, ``PID-5.1.2``, ``PID-3[2].1``, ``OBX[3]-5``, ``MSH-9.2``.

Every index is 1-based, as analysts write them. ``SEG[n]`` is the n-th segment of that name,
``F[r]`` the r-th repetition of the field. ``.`` and ``-`` are both accepted between the parts
(``PID.5.1`` as Mirth writes it, ``PID-5-1`` as HAPI's terser does).

Where a path may name many places (a transformer step: "for each OBX"), ``[*]`` stands for every
segment of that name (``OBX[*]-3.1``) or every repetition of the field (``PID-3[*].4``): parsed
with ``many=True``, they come back as :data:`EVERY`, and :meth:`Message.expand` lists the places.
A step's path may also start with groups of the message's structure (:class:`GroupPath`:
``ORDER_OBSERVATION[*]/OBX[*]-5``), read by :func:`parse_step_path`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import NamedTuple

from hl7relay.errors import PathError

__all__ = ["Path", "parse_path", "EVERY", "GroupPath", "StepPath", "parse_step_path"]

EVERY = 0  # an occurrence or repetition written [*]: every one the message has

_PATH = re.compile(
    r"""
    (?P<segment>[A-Z][A-Z0-9]{2})
    (?:\[(?P<occurrence>\d+|\*)\])?
    [-.](?P<field>\d+)
    (?:\[(?P<repetition>\d+|\*)\])?
    (?:[-.](?P<component>\d+)
        (?:[-.](?P<subcomponent>\d+))?
    )?
    """,
    re.VERBOSE | re.ASCII,
)


# Upper bounds, far above anything a real message holds (HL7 numbers fields below 100, and a
# segment rarely repeats a thousand times): a write past the end pads with empty items, so an
# unbounded number in a path would let one typo allocate gigabytes.
LIMITS = {"occurrence": 9999, "field": 999, "repetition": 9999, "component": 999, "subcomponent": 999}


class Path(NamedTuple):
    segment: str
    occurrence: int
    field: int
    repetition: int | None
    component: int | None
    subcomponent: int | None

    @property
    def many(self) -> bool:
        """Whether it names every segment of its name, or every repetition of its field."""
        return self.occurrence == EVERY or self.repetition == EVERY

    def __str__(self) -> str:
        text = self.segment
        if self.occurrence != 1:
            text += "[*]" if self.occurrence == EVERY else f"[{self.occurrence}]"
        text += f"-{self.field}"
        if self.repetition is not None:
            text += "[*]" if self.repetition == EVERY else f"[{self.repetition}]"
        if self.component is not None:
            text += f".{self.component}"
        if self.subcomponent is not None:
            text += f".{self.subcomponent}"
        return text


@functools.lru_cache(maxsize=4096)
def parse_path(text: str, many: bool = False) -> Path:
    """Parse an HL7 path; raises :class:`PathError` with the reason when it is not one. ``[*]``
    (every segment of the name, every repetition of the field) only with ``many``: a path that
    reads one value cannot name many."""
    if not isinstance(text, str):
        raise PathError(f"an HL7 path is text, not {type(text).__name__}")
    match = _PATH.fullmatch(text.strip())
    if match is None:
        raise PathError(
            f"{text!r} is not an HL7 path; expected SEG[-n]-FIELD[.COMPONENT[.SUBCOMPONENT]], "
            "e.g. PID-5.1, PID-3[2].1, OBX[3]-5"
        )
    groups = match.groupdict()
    numbers = {}
    for key in ("occurrence", "field", "repetition", "component", "subcomponent"):
        value = groups[key]
        if value == "*":
            if not many:
                raise PathError(f"{text!r}: [*] (every one) is for transformer steps; here the path names one "
                                "value: give a number, e.g. OBX[2]-5")
            numbers[key] = EVERY
        elif value is not None:
            number = int(value)
            if number < 1:
                raise PathError(f"{text!r}: {key} numbers start at 1")
            if number > LIMITS[key]:
                raise PathError(f"{text!r}: {key} {number} is beyond the largest allowed ({LIMITS[key]})")
            numbers[key] = number
        else:
            numbers[key] = None
    return Path(
        groups["segment"],
        1 if numbers["occurrence"] is None else numbers["occurrence"],
        numbers["field"],
        numbers["repetition"],
        numbers["component"],
        numbers["subcomponent"],
    )


_GROUP = re.compile(r"(?P<name>[A-Z][A-Z0-9_]*[A-Z0-9])(?:\[(?P<index>\d+|\*)\])?")


@dataclass(frozen=True, slots=True)
class GroupPath:
    """A path inside groups: the groups from the outside in, each (name, instance or EVERY), and
    the segment path whose occurrence counts within the innermost group."""

    groups: tuple[tuple[str, int], ...]
    path: Path

    @property
    def many(self) -> bool:
        return self.path.many or any(index == EVERY for _, index in self.groups)

    @property
    def segment(self) -> str:
        return self.path.segment

    @property
    def occurrence(self) -> int:
        return self.path.occurrence

    def __str__(self) -> str:
        return "/".join(f"{name}[{'*' if index == EVERY else index}]" for name, index in self.groups) + "/" + str(self.path)


StepPath = Path | GroupPath


def parse_step_path(text: str) -> StepPath:
    """A transformer step's path: ``[*]`` allowed, and group names before the segment path."""
    if not isinstance(text, str):
        raise PathError(f"an HL7 path is text, not {type(text).__name__}")
    *groups, last = text.strip().split("/")
    path = parse_path(last, many=True)
    if not groups:
        return path
    selected = []
    for part in groups:
        match = _GROUP.fullmatch(part)
        if match is None:
            raise PathError(f"{text!r}: {part!r} is not a group; write groups as the standard names them, "
                            "e.g. ORDER_OBSERVATION[*]/OBX[*]-5")
        index = match.group("index")
        number = EVERY if index == "*" else int(index or 1)
        if index not in (None, "*") and not 1 <= number <= LIMITS["occurrence"]:
            raise PathError(f"{text!r}: group numbers start at 1")
        selected.append((match.group("name"), number))
    return GroupPath(tuple(selected), path)
