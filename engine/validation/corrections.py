"""Where hl7apy's definitions disagree with the HL7 standard, and what we use instead.

hl7apy is the source of truth for every version's structures, segments, fields and datatypes, but
its tables were generated from the standard's databases and carry a few mistakes that make correct
messages fail. Each correction here names the rule of the standard it restores and has a test
(tests/test_validation.py). ``hl7relay.validation.audit`` (and ``bench/audit_hl7apy.py``) looks
for the kinds of mistake that can be found mechanically, so a new hl7apy release cannot bring new
ones in unseen.

General rules, applied while compiling (profile.py):

- Components are numbered by the number in their name (``XTN_4`` is XTN.4), never by their
  position in hl7apy's list: v2.6's XTN lists XTN_2..XTN_18 without XTN_1, which shifted every
  component by one (the e-mail address checked as a number). A component missing from the list is
  a string of unknown meaning, not checked.
- A field that the field table (``FIELDS``) says is withdrawn (WD) is withdrawn, whatever type the
  segment table gives it: where the two disagree on a withdrawn field, the segment table copied
  its neighbour's definition (v2.6 IN1-40/41 "POLICY_LIMIT_DAYS" as NM, v2.8 PR1-11/12 as NM, v2.8
  PID-4 as CX, v2.7 OBR-27 as PRL). For other disagreements (v2.7 PID-28: CWE in the segment
  table, ST in the field table) the segment table is kept: it is what places the field in its
  segment, and the standard's v2.7 chapter 3 lists PID-28 as CWE.
"""

from __future__ import annotations

__all__ = ["correct_structure", "STRUCTURE_CORRECTIONS", "CONDITIONAL_FIELDS", "REQUIRED_ONCE", "ACCEPTED_REQUIRED_NTE",
           "CODING_SYSTEMS_IN_USE", "corrected_table", "load_table_values"]


def _at(struct, path: tuple, change):
    """``struct`` with the group at ``path`` (child names from the root) replaced by ``change(group)``."""
    kind, children = struct
    if not path:
        return change((kind, children))
    head, rest = path[0], path[1:]
    out, found = [], False
    for child in children:
        if not found and child[0] == head and child[3] == "GRP":
            child = (child[0], _at(child[1], rest, change), child[2], child[3])
            found = True
        out.append(child)
    if not found:
        raise KeyError(f"no group {head!r} here")
    return kind, tuple(out)


def _segment(name: str, low: int, high: int) -> tuple:
    return (name, None, (low, high), "SEG")


def _group(name: str, kind: str, children: tuple, low: int, high: int) -> tuple:
    return (name, (kind, tuple(children)), (low, high), "GRP")


def _v21_order_choice(prefix: str):
    """v2.1 chapter 4 ORM and ORR: an order is ``ORC [< OBR | ORO | RX1 >] ...``: one order
    segment of the three. hl7apy requires all three in a row (and, in ORM, flattens the
    observations ``[{OBX [{NTE}]}]`` that follow)."""

    def change(group):
        kind, children = group
        names = [c[0] for c in children]
        choice = _group(f"{prefix}_CHOICE", "choice", tuple(_segment(n, 1, 1) for n in ("OBR", "ORO", "RX1")), 1, 1)
        if names == ["OBR", "ORO", "RX1"]:
            return kind, (choice,)
        if names == ["OBR", "ORO", "RX1", "NTE", "OBX", "NTE"]:
            observation = _group(f"{prefix}_OBSERVATION", "sequence", (_segment("OBX", 1, 1), _segment("NTE", 0, -1)), 0, -1)
            return kind, (choice, _segment("NTE", 0, -1), observation)
        raise KeyError(f"unexpected v2.1 {prefix} ORDER_DETAIL: {names}")

    return change


def _orm_o01_v22_detail(group):
    """v2.2 chapter 4 ORM: ``[< OBR | RQD | RQ1 | RXO | ODS | ODT > [{NTE}] [{OBX [{NTE}]}]]``:
    hl7apy flattens the observations and makes the last NTE required, so an order without notes
    after its observations (the usual ORC + OBR order) was invalid."""
    kind, children = group
    names = [c[0] for c in children]
    if names != ["ORM_O01_CHOICE", "NTE", "OBX", "NTE"]:
        raise KeyError(f"unexpected v2.2 ORM_O01 ORDER_DETAIL: {names}")
    observation = _group("ORM_O01_OBSERVATION", "sequence", (_segment("OBX", 1, 1), _segment("NTE", 0, -1)), 0, -1)
    return kind, (children[0], _segment("NTE", 0, -1), observation)


# (version, structure) -> [(path of the group, change)]
STRUCTURE_CORRECTIONS = {
    ("2.1", "ORM_O01"): [(("ORM_O01_ORDER", "ORM_O01_ORDER_DETAIL"), _v21_order_choice("ORM_O01"))],
    ("2.1", "ORR_O02"): [(("ORR_O02_PATIENT", "ORR_O02_ORDER", "ORR_O02_ORDER_DETAIL"), _v21_order_choice("ORR_O02"))],
    ("2.2", "ORM_O01"): [(("ORM_O01_ORDER", "ORM_O01_ORDER_DETAIL"), _orm_o01_v22_detail)],
}

# Fields the standard makes conditional (C) that hl7apy records as required in some versions;
# a condition cannot be checked from the structure alone, so they are treated as optional there.
# OBX-4 (observation sub-id) is C in v2.7-2.8.1 (required when OBX-3 repeats within an OBR).
CONDITIONAL_FIELDS = {("OBX", 4): frozenset({"2.7", "2.8", "2.8.1"})}

# Fields required in one version's tables only, optional in the versions before and after it that
# define them (the audit's ``required-once`` kind finds them): the pattern of a C coded as R in the
# database the tables come from. HAPI's and nHapi's structures come from the same database and
# agree with hl7apy here, so they cannot settle it; the standard's chapters can: OBX-4 is C in
# v2.3.1 chapter 7 (required only when OBX-3 repeats within an OBR), and the v2.3 ones are the
# order and master-file fields whose v2.3.1 tables (the next edition, same chapters) make them
# optional. Public v2.3.1 results without OBX-4 (tests/corpus_disagreements.tsv) were valid by HAPI.
REQUIRED_ONCE = {
    ("OBX", 4): frozenset({"2.3.1"}),   # observation sub-id
    ("OBR", 27): frozenset({"2.3"}),    # quantity/timing
    ("ORC", 7): frozenset({"2.3"}),     # quantity/timing
    ("RXG", 2): frozenset({"2.3"}),     # dispense sub-id counter
    ("OM1", 2): frozenset({"2.3"}),     # producer's service/test/observation id
    ("OM1", 4): frozenset({"2.3"}),     # specimen required
    ("OM1", 8): frozenset({"2.3"}),     # other names
    ("OM3", 7): frozenset({"2.3"}),     # number of sample values
}
for _key, _versions in REQUIRED_ONCE.items():
    CONDITIONAL_FIELDS[_key] = CONDITIONAL_FIELDS.get(_key, frozenset()) | _versions

# Required NTE segments that the audit finds and that the standard does define as required: a
# note that opens an optional supplement group (chapter 4A pharmacy: ``[{NTE} {RXR} [{RXC}]]``)
# or closes a facility's details (chapter 7, SUR_P09: ``{FAC PDC NTE}``).
ACCEPTED_REQUIRED_NTE = frozenset({
    "RAS_O01", "RDS_O01", "RGV_O01", "RAS_O17", "RDS_O13", "RGV_O15", "SUR_P09",
})


def correct_structure(version: str, name: str, struct):
    """hl7apy's structure ``name`` of ``version`` with our corrections applied."""
    for path, change in STRUCTURE_CORRECTIONS.get((version, name), ()):
        struct = _at(struct, path, change)
    return struct


# HL7 table 0396 (coding systems) is maintained by HL7 outside the version cycle: a coding system
# added later names the same thing in a message of any version, and US public-health guides for
# v2.5.1 (ELR, PHLIP, immunization, syndromic surveillance) prescribe ones hl7apy's v2.4-2.6 tables
# lack. A 0396 field accepts every version's table 0396, these, a local "99..." or "L", "HL7nnnn",
# and an ISO object identifier (those guides put OIDs in CWE.3).
CODING_SYSTEMS_IN_USE = frozenset({
    "SCT",  # SNOMED CT
    "UCUM",  # Unified Code for Units of Measure
    "RXNORM",  # RxNorm
    "CDCREC",  # CDC race and ethnicity
    "FIPS5_2", "FIPS6_4",  # US state and county codes
    "ISO3166_1", "ISO3166_2",  # countries and their subdivisions
    "NULLFL",  # HL7 null flavor
    "PLR", "PLT",  # CDC PHLIP lab result and test codes
    "PHINQUESTION",  # CDC PHIN questions
    "CDCPHINVS",  # CDC PHIN value sets (local coding system)
    "HSLOC",  # CDC healthcare service location
    "NIP001", "NIP002", "NIP004", "NIP007", "NIP008", "NIP009",  # CDC immunization tables
    "CVX", "MVX",  # CDC vaccines administered, vaccine manufacturers
})


def corrected_table(table_id: str, values: frozenset | None, lib, every_coding_system=frozenset()) -> frozenset | None:
    """A table's values as the checks use them. Table 0125 (OBX-2, the value's data type) also
    takes every data type this version defines: OBX-2 names a data type, and one the version
    defines is one a receiver can read (v2.5.1's 0125 lists no CWE, which US guides use for coded
    results). Table 0396 as above (``every_coding_system``: table 0396 of every version)."""
    if table_id == "HL70125" and values is not None:
        return values | frozenset(getattr(lib, "DATATYPES", {})) | frozenset(getattr(lib, "DATATYPES_STRUCTS", {}))
    if table_id == "HL70396" and values is not None:
        return values | every_coding_system | CODING_SYSTEMS_IN_USE
    return values


def load_table_values(path) -> tuple[dict[str, frozenset], list]:
    """A site's additions to HL7 tables, from YAML: table numbers to the values its partners use

        "0396": [PH_SNOMED-CT, CDCINDUSTRY2010]   # coding systems

    -> ({"HL70396": frozenset(...)}, errors as file:line:col)."""
    from hl7relay.yamlsource import load_document

    doc = load_document(path, environ={})
    if doc.errors:
        return {}, doc.errors
    out: dict[str, frozenset] = {}
    data = doc.data
    if not isinstance(data, dict):
        doc.error((), "a table-values file maps table numbers to lists of values: \"0396\": [CODE, ...]")
        return {}, doc.errors
    for key, values in data.items():
        number = str(key)
        if not (number.isdigit() and len(number) <= 4):
            doc.error((key,), f"{key!r} is not an HL7 table number (e.g. \"0396\")", key=True)
            continue
        if not isinstance(values, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
            doc.error((key,), f"table {number}: a list of values")
            continue
        out["HL7" + number.zfill(4)] = frozenset(str(v) for v in values)
    return (out if not doc.errors else {}), doc.errors
