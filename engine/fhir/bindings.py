"""The required value-set bindings of the FHIR R4 elements the maps set: the codes each may hold.

fhir.resources checks a resource's structure, not its codes (``Encounter.status: "nonsense"``
passes). This table is the part of R4 the converter relies on: for each coded element a map can
write (a ``code``, or a ``Coding`` / ``CodeableConcept`` whose binding is required), the codes
R4's value set allows. :func:`binding_problems` lists what a Bundle breaks; the tests run it on
every Bundle the converter makes, and the converter keeps to it (vocabularies, defaults).
"""

from __future__ import annotations

__all__ = ["REQUIRED", "binding_problems"]

_ADMINISTRATIVE_GENDER = ("male", "female", "other", "unknown")
_CONTACT_SYSTEM = ("phone", "fax", "email", "pager", "url", "sms", "other")
_CONTACT_USE = ("home", "work", "temp", "old", "mobile")
_ADDRESS_USE = ("home", "work", "temp", "old", "billing")
_ADDRESS_TYPE = ("postal", "physical", "both")
_NAME_USE = ("usual", "official", "temp", "nickname", "anonymous", "old", "maiden")
_IDENTIFIER_USE = ("usual", "official", "temp", "secondary", "old")

# (resource type, path of element names; "*" for any data type element of that kind) -> allowed codes.
# Paths go through lists (participant.status is every participant's status).
REQUIRED: dict[tuple[str, str], tuple[str, ...]] = {
    ("Patient", "gender"): _ADMINISTRATIVE_GENDER,
    ("RelatedPerson", "gender"): _ADMINISTRATIVE_GENDER,
    ("Practitioner", "gender"): _ADMINISTRATIVE_GENDER,
    ("Appointment", "status"): ("proposed", "pending", "booked", "arrived", "fulfilled", "cancelled", "noshow",
                                "entered-in-error", "checked-in", "waitlist"),
    ("Appointment", "participant.status"): ("accepted", "declined", "tentative", "needs-action"),
    ("Appointment", "participant.required"): ("required", "optional", "information-only"),
    ("Encounter", "status"): ("planned", "arrived", "triaged", "in-progress", "onleave", "finished", "cancelled",
                              "entered-in-error", "unknown"),
    ("Encounter", "location.status"): ("planned", "active", "reserved", "completed"),
    ("Observation", "status"): ("registered", "preliminary", "final", "amended", "corrected", "cancelled",
                                "entered-in-error", "unknown"),
    ("DiagnosticReport", "status"): ("registered", "partial", "preliminary", "final", "amended", "corrected",
                                     "appended", "cancelled", "entered-in-error", "unknown"),
    ("AllergyIntolerance", "type"): ("allergy", "intolerance"),
    ("AllergyIntolerance", "category"): ("food", "medication", "environment", "biologic"),
    ("AllergyIntolerance", "criticality"): ("low", "high", "unable-to-assess"),
    ("AllergyIntolerance", "clinicalStatus.coding.code"): ("active", "inactive", "resolved"),
    ("AllergyIntolerance", "reaction.severity"): ("mild", "moderate", "severe"),
    ("Condition", "clinicalStatus.coding.code"): ("active", "recurrence", "relapse", "inactive", "remission", "resolved"),
    ("Condition", "verificationStatus.coding.code"): ("unconfirmed", "provisional", "differential", "confirmed",
                                                      "refuted", "entered-in-error"),
    ("Location", "mode"): ("instance", "kind"),
    ("Location", "status"): ("active", "suspended", "inactive"),
    ("Provenance", "entity.role"): ("derivation", "revision", "quotation", "source", "removal"),
    ("Bundle", "type"): ("document", "message", "transaction", "transaction-response", "batch", "batch-response",
                         "history", "searchset", "collection"),
    ("*", "telecom.system"): _CONTACT_SYSTEM,
    ("*", "telecom.use"): _CONTACT_USE,
    ("*", "address.use"): _ADDRESS_USE,
    ("*", "address.type"): _ADDRESS_TYPE,
    ("*", "name.use"): _NAME_USE,
    ("*", "identifier.use"): _IDENTIFIER_USE,
}


def _values(node, names: list[str]):
    if isinstance(node, list):
        for item in node:
            yield from _values(item, names)
        return
    if not names:
        yield node
        return
    if isinstance(node, dict) and names[0] in node:
        yield from _values(node[names[0]], names[1:])


def binding_problems(bundle: dict) -> list[str]:
    """Each code in ``bundle`` outside its element's required value set: ``Patient/ID gender: 'x'``."""
    problems = []
    entries = [{"resource": bundle}] + list(bundle.get("entry") or ())
    for entry in entries:
        resource = entry.get("resource") or {}
        kind = resource.get("resourceType", "")
        for (where, path), allowed in REQUIRED.items():
            if where not in ("*", kind):
                continue
            for value in _values(resource, path.split(".")):
                if isinstance(value, str) and value not in allowed:
                    problems.append(f"{kind}/{resource.get('id', '?')} {path}: {value!r} is not one of {', '.join(allowed)}")
    return problems
