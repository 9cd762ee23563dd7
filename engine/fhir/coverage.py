"""How much of HL7's v2-to-FHIR guide the maps implement: every guide row for the supported
messages is implemented, an exception (``maps/exceptions.yaml``, with its reason) or missing.

Rows are counted per source: a message map's segment map, a segment map's field, a data type
map's component. Data type maps are in scope when a rule of ours uses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from hl7relay.fhir.ig import IGRow, load_table
from hl7relay.fhir.maps import MAPS_DIR, MapSet

__all__ = ["CoverageRow", "coverage", "load_exceptions", "EXCEPTIONS"]

EXCEPTIONS = MAPS_DIR / "exceptions.yaml"
IMPLEMENTED, EXCEPTION, MISSING = "implemented", "exception", "missing"


@dataclass(frozen=True, slots=True)
class CoverageRow:
    kind: str  # message, segment, datatype
    map: str
    source: str
    targets: tuple  # the guide's FHIR targets for that source
    status: str
    reason: str = ""


def load_exceptions(path: str | Path = EXCEPTIONS) -> dict[str, str]:
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    return {str(k): str(v) for k, v in (data.get("exceptions") or {}).items()}


def _grouped(rows: list[IGRow]) -> dict[tuple, list[IGRow]]:
    out: dict[tuple, list[IGRow]] = {}
    for row in rows:
        out.setdefault((row.kind, row.map, row.source if row.kind != "message" else row.type), []).append(row)
    return out


def coverage(maps: MapSet, message: str | None = None, table: list[IGRow] | None = None,
             exceptions: dict[str, str] | None = None) -> list[CoverageRow]:
    table = load_table() if table is None else table
    exceptions = load_exceptions() if exceptions is None else exceptions
    ours = [m for name, m in sorted(maps.messages.items()) if message in (None, name, m.measured_as)]
    measured = {m.measured_as for m in ours}
    used_segment_maps = {r.map for m in ours for r in m.rules if r.map}
    used_types: set[str] = set()

    def collect(element_map) -> None:
        for rule in element_map.rules:
            if rule.type in maps.datatypes and rule.type not in used_types:
                used_types.add(rule.type)
                collect(maps.datatypes[rule.type])

    for name in used_segment_maps:
        collect(maps.segments[name])
    out: list[CoverageRow] = []
    wanted_segment_maps: list[str] = []
    for (kind, map_name, source), rows in _grouped(table).items():
        if kind != "message" or map_name not in measured:
            continue
        targets = tuple(dict.fromkeys(r.target for r in rows))
        # implemented for this message: every message map of ours measured as it uses that segment map
        measured_here = [{r.map for r in m.rules if r.map} for m in ours if m.measured_as == map_name]
        here = set.intersection(*measured_here) if measured_here else set()
        if source in here:
            status, reason = IMPLEMENTED, ""
        else:
            reason = exceptions.get(f"{map_name} {source}") or exceptions.get(source, "")
            status = EXCEPTION if reason else MISSING
        out.append(CoverageRow(kind, map_name, source, targets, status, reason))
        if source in used_segment_maps and source not in wanted_segment_maps:
            wanted_segment_maps.append(source)
    for (kind, map_name, source), rows in _grouped(table).items():
        if kind == "message":
            continue
        if kind == "segment" and map_name not in wanted_segment_maps:
            continue
        if kind == "datatype" and map_name not in used_types:
            continue
        element_map = (maps.segments if kind == "segment" else maps.datatypes).get(map_name)
        sources = {rule.source for rule in element_map.rules} if element_map else set()
        targets = tuple(dict.fromkeys(r.target for r in rows))
        normalized = source.replace(" ", "")
        if normalized in sources:
            status, reason = IMPLEMENTED, ""
        else:
            reason = exceptions.get(f"{map_name} {source}") or exceptions.get(f"{map_name} *", "")
            status = EXCEPTION if reason else MISSING
        out.append(CoverageRow(kind, map_name, source, targets, status, reason))
    return out
