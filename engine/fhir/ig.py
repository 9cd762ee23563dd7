"""HL7's "HL7 Version 2 to FHIR" tables, as the rows our maps are measured against.

The implementation guide publishes its maps as spreadsheets (``mappings/`` of HL7/v2-to-fhir):
one per message structure, segment map and data type map. :func:`read_ig` reads the rows that
matter to coverage (which v2 field or component goes where, under which condition) from those
CSVs; :data:`IG_TABLE` is the same rows for the structures hl7relay converts, shipped with the
package (``maps/ig-rows.tsv``, written by ``python -m hl7relay.fhir.ig DIR``; a test checks it
against the guide's files), so ``hl7relay fhir coverage`` works where the guide is not installed.
"""

from __future__ import annotations

import csv
import re
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["IGRow", "read_ig", "load_table", "write_table", "IG_TABLE", "SUPPORTED_STRUCTURES"]

IG_TABLE = Path(__file__).with_name("maps") / "ig-rows.tsv"
# the message structures converted, and the guide's message map each is measured against (the
# guide has no ADT_A03 sheet: A03's structure is A01's without the visit-level additions)
SUPPORTED_STRUCTURES = {"ADT_A01": "ADT_A01", "ADT_A02": "ADT_A02", "ADT_A03": "ADT_A01",
                        "SIU_S12": "SIU_S12", "ORU_R01": "ORU_R01"}
_COLUMNS = ("kind", "map", "source", "condition", "target", "type", "vocabulary", "assignment")
_NAME = re.compile(r"_ (?P<name>[A-Z0-9_]+(?:\[[^\]]+\])?) - ")


@dataclass(frozen=True, slots=True)
class IGRow:
    kind: str  # message, segment, datatype
    map: str  # ADT_A01, PID[Patient], CX[Identifier]
    source: str  # a segment (message maps), PID-3, CX.4
    condition: str
    target: str  # the FHIR attribute (or the resource, for message maps)
    type: str  # the segment map (message rows) or the data type map
    vocabulary: str
    assignment: str


def _clean(text: str) -> str:
    return " ".join(text.split())


def _sheets(folder: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(folder.glob("*.csv")):
        match = _NAME.search(path.name)
        if match:
            found[match.group("name")] = path
    return found


def _rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return list(csv.reader(handle))[2:]


def read_ig(directory: str | Path) -> list[IGRow]:
    """The guide's rows for the supported messages, their segment maps and, transitively, the
    data type maps those use: every row that names a FHIR target (rows the guide leaves unmapped
    are not ours to cover)."""
    mappings = Path(directory) / "mappings"
    messages, segments, datatypes = (_sheets(mappings / kind) for kind in ("messages", "segments", "datatypes"))
    out: list[IGRow] = []
    wanted_segments: list[str] = []
    for structure in sorted(set(SUPPORTED_STRUCTURES.values())):
        for row in _rows(messages[structure]):
            if len(row) < 11 or not row[10].strip():
                continue
            segment_map = _clean(row[10])
            out.append(IGRow("message", structure, _clean(row[2]).strip("[{}] "), _clean(row[6]),
                             _clean(row[9]), segment_map, "", ""))
            if segment_map not in wanted_segments:
                wanted_segments.append(segment_map)
    wanted_types: list[str] = []

    def field_rows(kind: str, name: str, path: Path) -> None:
        for row in _rows(path):
            if len(row) < 17 or not row[9].strip():
                continue
            type_map = _clean(row[14])
            out.append(IGRow(kind, name, _clean(row[1]), _clean(row[6]), _clean(row[9]), type_map,
                             _clean(row[15]), _clean(row[16])))
            if type_map and type_map not in wanted_types:
                wanted_types.append(type_map)

    for name in wanted_segments:
        if name in segments:
            field_rows("segment", name, segments[name])
    done = 0
    while done < len(wanted_types):  # data type maps name further data type maps
        name = wanted_types[done]
        done += 1
        path = datatypes.get(name) or next((p for n, p in datatypes.items() if n.lower() == name.lower()), None)
        if path is not None:
            field_rows("datatype", name, path)
    return out


def write_table(rows: list[IGRow], out) -> None:
    writer = csv.writer(out, delimiter="\t", lineterminator="\n")
    writer.writerow(_COLUMNS)
    for row in rows:
        writer.writerow([getattr(row, column) for column in _COLUMNS])


def load_table(path: str | Path = IG_TABLE) -> list[IGRow]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        next(reader)
        return [IGRow(*row) for row in reader]




# the concept maps the shipped maps use, copied from the guide by write_vocabulary
VOCABULARIES = ("AdministrativeSex", "MaritalStatus", "FillerStatusCodes[Appointment]", "PatientClass[EncounterClass]",
                "PatientClass[EncounterStatus]", "NameType", "TelecommunicationUseCode",
                "TelecommunicationEquipmentType", "AddressType[Type]", "AddressType[Use]", "IdentifierType",
                "Relationship", "ContactRole", "ObservationResultStatusCodesInterpretation",
                "ResultStatus[Non-Queries]", "InterpretationCodes", "AllergenType[AllergyIntoleranceCategory]",
                "AllergyType", "AllergySeverity[AllergyIntolerance.criticality]", "YesNoIndicator",
                "DiagnosticServiceSectionID")


def read_concept_map(directory: str | Path, name: str) -> dict[str, tuple[str, str, str]]:
    """One concept map of the guide: v2 code -> (FHIR code, display, system); rows without a FHIR code left out."""
    folder = Path(directory) / "mappings" / "codesystems"
    path = next(p for p in folder.glob("*.csv") if f"_ {name} - " in p.name)
    out: dict[str, tuple[str, str, str]] = {}
    for row in _rows(path):
        if len(row) < 10 or not row[0].strip() or not row[6].strip():
            continue
        out.setdefault(row[0].strip(), (row[6].strip(), row[8].strip(), row[9].strip()))
    return out


def write_vocabulary(directory: str | Path, out) -> None:
    import yaml

    out.write("# Concept maps v2 code -> FHIR code, copied from HL7's v2-to-FHIR guide (mappings/codesystems)\n"
              "# by `python -m hl7relay.fhir.ig --vocabulary DIR`; a test checks them against the guide.\n")
    body = {}
    for name in VOCABULARIES:
        codes = read_concept_map(directory, name)
        systems = {system for _, _, system in codes.values()}
        system = systems.pop() if len(systems) == 1 else ""
        body[name] = {"system": system,
                      "codes": {code: [c, d] if system else [c, d, s] for code, (c, d, s) in codes.items()}}
    out.write(yaml.safe_dump({"vocabulary": body}, sort_keys=False, allow_unicode=True, width=120, default_flow_style=None))


if __name__ == "__main__":  # python -m hl7relay.fhir.ig [--vocabulary] ../shared/v2-to-fhir > engine/fhir/maps/...
    if sys.argv[1] == "--vocabulary":
        write_vocabulary(sys.argv[2], sys.stdout)
    else:
        write_table(read_ig(sys.argv[1]), sys.stdout)
