"""HL7 tables 0357 and 0516, kept importable from here; they live in :mod:`hl7relay.outcomes`."""

from hl7relay.outcomes import ErrorCode, Severity

__all__ = ["ErrorCode", "Severity"]
