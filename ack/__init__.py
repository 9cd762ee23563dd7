"""Acknowledgements: the HL7 error vocabulary, building ACKs, and deciding which to send.

The codes are HL7 table 0357 (message error condition codes); they go into ERR-3 of an ACK and
label every validation finding, so what ``hl7relay validate`` reports is what a sender would see.
"""

from hl7relay.ack.builder import ControlIds, build_ack
from hl7relay.outcomes import ErrorCode, Severity
from hl7relay.ack.outcome import Outcome, Status
from hl7relay.ack.policy import AckPolicy, is_ack, is_enhanced_mode, unreadable_ack

__all__ = [
    "ErrorCode", "Severity", "Outcome", "Status", "AckPolicy", "build_ack", "ControlIds",
    "is_ack", "is_enhanced_mode", "unreadable_ack",
]
