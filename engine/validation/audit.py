"""Audit hl7apy's definitions of every version for the mistakes that can be found mechanically.

What it looks for (each kind once made correct messages fail; see corrections.py):

- ``numbering``: a composite whose components are not numbered 1..n by their names (v2.6 XTN
  lists XTN_2..XTN_18);
- ``type``: a field whose type in the segment table differs from the field table (the segment
  table copying a neighbour over a withdrawn field);
- ``required-nte``: a required NTE in a message structure. Notes are optional almost everywhere
  in the standard's chapter tables; the few structures where a note is required are listed in
  corrections.ACCEPTED_REQUIRED_NTE, the rest are mistakes (v2.2 ORM_O01).
- ``choice``: a run of two or more required order segments at the start of an order detail
  group, where the standard has a choice of one (v2.1 ORM_O01: OBR, ORO, RX1 in a row).
- ``required-once``: a field required in one version only, optional in the nearest versions
  before and after that define it (v2.3.1 OBX-4: a conditional field coded as required).

``audit()`` returns the findings with whether our corrections deal with each; ``bench/audit_hl7apy.py``
prints them. The test suite fails on any finding that is neither corrected nor accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

from hl7relay.validation.corrections import ACCEPTED_REQUIRED_NTE, REQUIRED_ONCE, correct_structure
from hl7relay.validation.profile import SUPPORTED_VERSIONS

__all__ = ["AuditFinding", "audit"]

_ORDER_SEGMENTS = frozenset({"OBR", "ORO", "RX1", "RXO", "RQD", "RQ1", "ODS", "ODT"})


@dataclass(frozen=True, slots=True)
class AuditFinding:
    version: str
    kind: str  # numbering, type, required-nte, choice, required-once
    where: str  # e.g. XTN, IN1_40, ORM_O01/ORM_O01_ORDER/ORM_O01_ORDER_DETAIL/NTE
    detail: str
    handled: str  # how we deal with it ("" when we do not)

    def __str__(self) -> str:
        state = self.handled or "NOT HANDLED"
        return f"v{self.version} {self.kind:<12} {self.where}: {self.detail} [{state}]"


def _numbering(version: str, lib) -> list[AuditFinding]:
    out = []
    for name, struct in sorted(lib.DATATYPES_STRUCTS.items()):
        numbers = []
        for component in struct:
            suffix = component[0].rsplit("_", 1)[-1]
            numbers.append(int(suffix) if suffix.isdigit() else None)
        if numbers != list(range(1, len(numbers) + 1)):
            shown = ", ".join(str(n) for n in numbers[:4]) + (", ..." if len(numbers) > 4 else "")
            out.append(AuditFinding(version, "numbering", name, f"components numbered {shown} by their names",
                                    "numbered by name (profile._compile_composite)"))
    return out


def _types(version: str, lib) -> list[AuditFinding]:
    out = []
    for _segment, definition in sorted(lib.SEGMENTS.items()):
        for child in (definition[1] if len(definition) > 1 else ()):
            if not isinstance(child, tuple) or len(child) < 2 or not isinstance(child[1], (tuple, list)):
                continue
            field_definition = lib.FIELDS.get(child[0])
            if field_definition is None or len(field_definition) < 3:
                continue
            in_segment, in_fields = child[1][2], field_definition[2]
            if in_segment != in_fields:
                handled = ("withdrawn: the field table wins" if in_fields == "WD"
                           else "segment table kept (corrections.py: it places the field)")
                out.append(AuditFinding(version, "type", child[0],
                                        f"segment table {in_segment}, field table {in_fields}", handled))
    return out


def _walk(struct, path: tuple):
    kind, children = struct
    yield path, kind, children
    for child in children:
        if child[3] != "SEG":
            yield from _walk(child[1], path + (child[0],))


def _structure_problems(name: str, struct) -> dict:
    """(kind, where) -> detail for one message structure."""
    found = {}
    for path, kind, children in _walk(struct, (name,)):
        for child in children:
            if child[3] == "SEG" and child[0] == "NTE" and child[2][0] >= 1:
                found[("required-nte", "/".join(path + ("NTE",)))] = "a required NTE"
        required = [c[0] for c in children if c[3] == "SEG" and c[2][0] >= 1]
        run = []
        for segment in required:
            if segment not in _ORDER_SEGMENTS:
                break
            run.append(segment)
        if kind == "sequence" and len(run) >= 2:
            found[("choice", "/".join(path))] = f"required {', '.join(run)} in a row"
    return found


def _structures(version: str, lib) -> list[AuditFinding]:
    out = []
    for name, struct in sorted(lib.MESSAGES.items()):
        before = _structure_problems(name, struct)
        after = _structure_problems(name, correct_structure(version, name, struct))
        for (kind, where), detail in before.items():
            if kind == "required-nte" and name in ACCEPTED_REQUIRED_NTE:
                handled = "accepted: the standard requires it"
            elif (kind, where) not in after:
                handled = "corrected (corrections.STRUCTURE_CORRECTIONS)"
            else:
                handled = ""
            out.append(AuditFinding(version, kind, where, detail, handled))
        for (kind, where), detail in after.items():
            if (kind, where) not in before:
                out.append(AuditFinding(version, kind, where, detail + " (made by our corrections)", ""))
    return out


def audit(versions=SUPPORTED_VERSIONS) -> list[AuditFinding]:
    """Every finding for the given versions (hl7apy's tables are read, nothing is compiled)."""
    from hl7apy import load_library

    findings: list[AuditFinding] = []
    for version in versions:
        lib = load_library(version)
        findings += _numbering(version, lib) + _types(version, lib) + _structures(version, lib)
    return findings + _required_once(versions)


def _required_once(versions) -> list[AuditFinding]:
    from hl7apy import load_library

    required: dict[str, dict[tuple[str, int], bool]] = {}
    for version in SUPPORTED_VERSIONS:  # every version: the neighbours decide
        fields: dict[tuple[str, int], bool] = {}
        for segment, definition in load_library(version).SEGMENTS.items():
            for child in definition[1] if len(definition) > 1 else ():
                if len(child) < 3 or not isinstance(child[0], str):
                    continue
                suffix = child[0].rsplit("_", 1)[-1]
                if suffix.isdigit():
                    fields[(segment, int(suffix))] = child[2][0] >= 1
        required[version] = fields
    out = []
    order = list(SUPPORTED_VERSIONS)
    for index, version in enumerate(order):
        if version not in versions:
            continue
        for key, is_required in sorted(required[version].items()):
            if not is_required:
                continue
            before = next((required[v][key] for v in reversed(order[:index]) if key in required[v]), None)
            after = next((required[v][key] for v in order[index + 1:] if key in required[v]), None)
            if before is False and after is False:
                handled = "treated as optional (corrections.REQUIRED_ONCE)" if version in REQUIRED_ONCE.get(key, ()) else ""
                out.append(AuditFinding(version, "required-once", f"{key[0]}_{key[1]}",
                                        "required here, optional in the versions before and after", handled))
    return out
