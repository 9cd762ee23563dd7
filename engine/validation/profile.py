"""hl7apy's definitions of each HL7 version, compiled once into what the validator walks.

hl7apy carries every message structure, segment, field, datatype and table of v2.1-2.8.2; it is
the source of truth. Running hl7apy on a message costs ~17 ms, so it is never used per message:
its tables are read once per version (lazily, per structure and segment) into small slotted
objects with the sets the structure matcher needs (first and follow sets) precomputed.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

from hl7relay.validation.corrections import CONDITIONAL_FIELDS, correct_structure, corrected_table
from hl7relay.validation.datatypes import BASE_MAX_LENGTH, PRIMITIVE_CHECKS
from hl7relay.validation.events import resolve_structure

__all__ = [
    "SUPPORTED_VERSIONS", "ACCEPTED_VERSIONS", "Profile", "get_profile", "definition_version",
    "Leaf", "Composite", "FieldDef", "SegmentDef", "Node",
]

SUPPORTED_VERSIONS = ("2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8", "2.8.1", "2.8.2")
# Versions hl7apy has no tables for, checked against the closest release it has.
_NEAREST = {"2.7.1": "2.7"}
# What MSH-12 / --version may say, in release order.
ACCEPTED_VERSIONS = tuple(sorted(SUPPORTED_VERSIONS + tuple(_NEAREST), key=lambda v: tuple(map(int, v.split(".")))))


def definition_version(version: str) -> str | None:
    """The version whose definitions check ``version``; None when there are none."""
    if version in SUPPORTED_VERSIONS:
        return version
    return _NEAREST.get(version)


_NO_LIMIT = 1 << 30


@dataclass(slots=True, frozen=True)
class Leaf:
    """A primitive value: its datatype, format check, HL7 table and base length."""

    datatype: str
    table: str | None
    values: frozenset | None  # the table's values, when hl7apy lists any
    check: object  # callable(str) -> str | None, or None
    max_length: int | None
    interesting: bool = False  # has a format check or table values: always visited
    bound: int = _NO_LIMIT  # for a leaf that is not visited: values up to this long need no look
    limit: int = _NO_LIMIT  # max_length, or no limit


@dataclass(slots=True, frozen=True)
class Composite:
    datatype: str
    components: tuple  # of (name, Leaf | Composite)
    checked: tuple = ()  # (1-based index, element) of the components with checks inside
    bound: int = _NO_LIMIT  # a value up to this long cannot break the length of an unvisited leaf
    indexed: tuple = ()  # (1-based index, element) of every component


@dataclass(slots=True, frozen=True)
class FieldDef:
    number: int
    name: str  # e.g. PATIENT_NAME
    datatype: str
    min: int
    max: int  # -1: unlimited repetitions
    element: Leaf | Composite | None  # None: "varies" (OBX-5 takes its type from OBX-2)


@dataclass(slots=True, frozen=True)
class SegmentDef:
    name: str
    fields: tuple  # FieldDef or None (not defined in this version), index 0 is field 1
    required: tuple  # numbers of the required fields
    defined: tuple = ()  # the FieldDefs this version defines, in order


@dataclass(slots=True, eq=False)
class Node:
    """A segment reference or a group in a message structure."""

    name: str
    kind: str  # "segment", "sequence" or "choice"
    min: int
    max: int  # -1: unlimited
    children: tuple = ()
    first: frozenset = frozenset()  # segment names that can start this node
    nullable: bool = False  # can this node's content be empty
    follow: frozenset = frozenset()  # segment names that may come right after this node
    later: frozenset = frozenset()  # segment names that may come anywhere after this node
    segments: frozenset = frozenset()  # every segment name anywhere inside

    @property
    def label(self) -> str:
        return self.name if self.kind == "segment" else f"group {self.name}"


def _table_values(tables: dict, table_id: str | None) -> frozenset | None:
    if not table_id or table_id not in tables:
        return None
    values = tables[table_id][1]
    return frozenset(values) if values else None


CLEAN_VALUES_MAX = 50_000  # field values remembered as clean per version and delimiters


_CODING_SYSTEMS: frozenset | None = None


def _every_coding_system() -> frozenset:
    """Table 0396 of every version hl7apy defines, read once (corrections.corrected_table)."""
    global _CODING_SYSTEMS
    if _CODING_SYSTEMS is None:
        from hl7apy import load_library

        found: set = set()
        for version in SUPPORTED_VERSIONS:
            table = getattr(load_library(version), "TABLES", {}).get("HL70396")
            if table and table[1]:
                found.update(table[1])
        _CODING_SYSTEMS = frozenset(found)
    return _CODING_SYSTEMS


class Profile:
    """Compiled definitions of one HL7 version."""

    def __init__(self, version: str):
        from hl7apy import load_library

        self.version = version
        lib = load_library(version)
        self._messages = lib.MESSAGES
        self._segments = lib.SEGMENTS
        self._datatype_structs = lib.DATATYPES_STRUCTS
        self._lib = lib
        self._tables = getattr(lib, "TABLES", {})
        self._fields = getattr(lib, "FIELDS", {})
        self.structures = frozenset(self._messages)
        self.segment_names = frozenset(self._segments)
        self.message_types = frozenset(name.split("_")[0] for name in self._messages) | frozenset(
            _table_values(self._tables, "HL70076") or ()
        )
        self._lock = threading.Lock()
        self._structure_cache: dict[str, Node] = {}
        self._segment_cache: dict[str, SegmentDef] = {}
        self._leaf_cache: dict[tuple, Leaf] = {}
        self._composite_cache: dict[str, Composite | Leaf | None] = {}
        self._clean: dict = {}  # delimiters -> field values found clean (clean_values)
        self._plans: dict = {}  # id(segment definition) -> (it, its field plan): field_plan

    def field_plan(self, seg: "SegmentDef") -> tuple:
        """The fields of a segment definition to check, in order, as ``(number, definition,
        datatype or None, tag)``: the tag stands for the definition in clean_values' keys.
        Built once per segment definition (the field loop runs for every segment of every message)."""
        plan = self._plans.get(id(seg))
        if plan is None:
            first = 3 if seg.name in ("MSH", "FHS", "BHS") else 1
            plan = self._plans[id(seg)] = (seg, tuple(
                (number, fdef, fdef.element, id(fdef)) for number, fdef in enumerate(seg.fields[first - 1:], start=first)
                if fdef is not None))
        return plan[1]

    def clean_values(self, delimiters, strict: object = False) -> dict:
        """Field values of this version already checked, for these delimiters and strictness (with a site's table values, the key says which):
        ``(tag of the field definition[, id(OBX-5's datatype)], value) -> True`` when clean, else
        what the checks found (severity, code, text, repetition, component, subcomponent), to be
        reported again at the new place. Interface traffic repeats most values (headers, codes,
        facilities, locations, clinicians, a sender's local codes that are not in HL7's tables),
        and a value's checks depend on nothing else, so a repeat costs a lookup. Bounded: emptied
        when it fills up. The definitions are this profile's own and live as long as it does, so
        their ids are stable keys (hashing the frozen definitions would cost more than a check)."""
        cache = self._clean.get((delimiters, strict))
        if cache is None or len(cache) > CLEAN_VALUES_MAX:
            cache = self._clean[(delimiters, strict)] = {}
        return cache

    # -- lookups ---------------------------------------------------------------------------
    def resolve(self, message_type: str, event: str) -> str | None:
        return resolve_structure(message_type, event, self.version, self.structures)

    def table(self, table_id: str) -> frozenset | None:
        every = _every_coding_system() if table_id == "HL70396" else frozenset()
        return corrected_table(table_id, _table_values(self._tables, table_id), self._lib, every)

    def structure(self, name: str) -> Node | None:
        node = self._structure_cache.get(name)
        if node is None and name in self._messages:
            with self._lock:
                kind, children = correct_structure(self.version, name, self._messages[name])
                node = self._compile_group(name, kind, children, 1, 1)
                _annotate_follow(node, frozenset(), frozenset())
                self._structure_cache[name] = node
        return node

    def segment(self, name: str) -> SegmentDef | None:
        seg = self._segment_cache.get(name)
        if seg is None and name in self._segments:
            with self._lock:
                seg = self._compile_segment(name)
                self._segment_cache[name] = seg
        return seg

    def datatype(self, name: str) -> Leaf | Composite | None:
        """A datatype by name, for OBX-5 whose type OBX-2 names."""
        if name not in self._composite_cache:
            with self._lock:
                struct = self._datatype_structs.get(name)
                if struct:
                    element = self._compile_composite(name, struct)
                elif name in PRIMITIVE_CHECKS or name in BASE_MAX_LENGTH or name in ("ID", "IS", "ST", "TX", "FT"):
                    element = self._leaf(name, None)
                else:
                    element = None
                self._composite_cache[name] = element
        return self._composite_cache[name]

    # -- compiling -------------------------------------------------------------------------
    def _compile_group(self, name, kind, children, low, high) -> Node:
        nodes = []
        for child in children:
            child_name, ref, (cmin, cmax), child_kind = child[0], child[1], child[2], child[3]
            if child_kind == "SEG":
                nodes.append(Node(child_name, "segment", cmin, cmax, first=frozenset({child_name}),
                                  nullable=cmin == 0, segments=frozenset({child_name})))
            else:
                group_kind, group_children = ref
                nodes.append(self._compile_group(child_name, group_kind, group_children, cmin, cmax))
        node = Node(name, kind, low, high, tuple(nodes))
        first: set[str] = set()
        if kind == "choice":
            for child in nodes:
                first |= child.first
            content_nullable = any(c.nullable for c in nodes)
        else:
            content_nullable = True
            for child in nodes:
                first |= child.first
                if not child.nullable:
                    content_nullable = False
                    break
        node.first = frozenset(first)
        node.nullable = low == 0 or content_nullable
        node.segments = frozenset().union(*(c.segments for c in nodes)) if nodes else frozenset()
        return node

    def _leaf(self, datatype: str, table: str | None) -> Leaf:
        key = (datatype, table)
        leaf = self._leaf_cache.get(key)
        if leaf is None:
            values = self.table(table) if datatype in ("ID", "IS") and table else None
            check = PRIMITIVE_CHECKS.get(datatype)
            max_length = BASE_MAX_LENGTH.get(datatype)
            leaf = Leaf(datatype, table, values, check, max_length,
                        interesting=check is not None or values is not None,
                        bound=max_length if max_length is not None and check is None and values is None else _NO_LIMIT,
                        limit=max_length if max_length is not None else _NO_LIMIT)
            self._leaf_cache[key] = leaf
        return leaf

    def _compile_composite(self, datatype: str, struct) -> Composite:
        by_number: dict[int, tuple] = {}
        for position, component in enumerate(struct, start=1):
            comp_name, (kind, sub_struct, comp_type, _long, table, _len) = component[0], component[1][:6]
            if datatype == "TS" and comp_name == "TS_1":
                comp_type = "DTM"  # hl7apy types TS.1 as ST before v2.5; the standard says time stamp
            # numbered by the name, not the position: v2.6's XTN lists XTN_2..XTN_18 (corrections.py)
            suffix = comp_name.rsplit("_", 1)[-1]
            number = int(suffix) if suffix.isdigit() else position
            if kind == "leaf" or not sub_struct:
                by_number[number] = (comp_name, self._leaf(comp_type, table))
            else:
                by_number[number] = (comp_name, self._compile_composite(comp_type, sub_struct))
        components = [by_number.get(n) or (f"{datatype}_{n}", self._leaf("ST", None))
                      for n in range(1, max(by_number, default=0) + 1)]
        checked = tuple((i, element) for i, (_, element) in enumerate(components, start=1)
                        if (element.interesting if isinstance(element, Leaf) else element.checked))
        bound = min((element.bound for _, element in components), default=_NO_LIMIT)
        indexed = tuple((i, element) for i, (_, element) in enumerate(components, start=1))
        return Composite(datatype, tuple(components), checked, bound, indexed)

    def _compile_segment(self, name: str) -> SegmentDef:
        definition = self._segments[name]
        children = definition[1] if len(definition) > 1 else ()  # withdrawn segments list no fields
        by_number: dict[int, FieldDef] = {}
        for child in children:
            # Number from the name: hl7apy leaves withdrawn fields out of some versions' lists.
            number = int(child[0].rsplit("_", 1)[1])
            kind, struct, datatype, long_name, table = child[1][:5]
            cmin, cmax = child[2]
            if self.version in CONDITIONAL_FIELDS.get((name, number), ()):
                cmin = 0
            field_definition = self._fields.get(child[0])
            if field_definition is not None and len(field_definition) > 2 and field_definition[2] == "WD":
                # the field table says withdrawn: that wins over the segment table (corrections.py)
                datatype, long_name = "WD", field_definition[3] or long_name
            if datatype == "varies" or datatype == "WD":
                element = None
            elif kind == "leaf" or not struct:
                element = self._leaf(datatype, table)
            else:
                element = self._compile_composite(datatype, struct)
            by_number[number] = FieldDef(number, long_name or child[0], datatype, cmin, cmax, element)
        # A gap in the numbering is a field withdrawn from this version (v2.8 lists them no more).
        fields = tuple(by_number.get(n) or FieldDef(n, "WITHDRAWN", "WD", 0, 0, None)
                       for n in range(1, max(by_number, default=0) + 1))
        required = tuple(n for n, f in by_number.items() if f.min >= 1 and f.datatype != "WD")
        return SegmentDef(name, fields, tuple(sorted(required)), fields)


def _annotate_follow(node: Node, follow: frozenset, later: frozenset) -> None:
    """Give every node the segment names that may come right after it, and anywhere after it."""
    node.follow = follow
    node.later = later
    if node.kind == "segment":
        return
    repeating = node.max != 1  # a repeating group may start over
    again = node.first if repeating else frozenset()
    again_any = node.segments if repeating else frozenset()
    if node.kind == "choice":
        for child in node.children:
            _annotate_follow(child, follow | again, later | again_any)
        return
    children = node.children
    for i, child in enumerate(children):
        after: set[str] = set()
        rest_nullable = True
        for nxt in children[i + 1:]:
            after |= nxt.first
            if not nxt.nullable:
                rest_nullable = False
                break
        if rest_nullable:
            after |= follow | again
        anywhere = set(later | again_any)
        for nxt in children[i + 1:]:
            anywhere |= nxt.segments
        _annotate_follow(child, frozenset(after), frozenset(anywhere))


@functools.lru_cache(maxsize=None)
def get_profile(version: str) -> Profile:
    """The compiled profile of a supported version (compiled on first use, then shared)."""
    return Profile(version)
