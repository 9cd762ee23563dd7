"""Validation of messages against the HL7 standard, compiled from hl7apy's definitions."""

from hl7relay.validation.profile import ACCEPTED_VERSIONS, SUPPORTED_VERSIONS, get_profile
from hl7relay.validation.validator import Finding, Report, Validator, segment_groups, validate

__all__ = ["Finding", "Report", "Validator", "validate", "segment_groups", "SUPPORTED_VERSIONS", "ACCEPTED_VERSIONS", "get_profile"]
