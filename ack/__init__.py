"""Acknowledgements: the HL7 error vocabulary shared by validation and ACK building.

The codes are HL7 table 0357 (message error condition codes); they go into ERR-3 of an ACK and
label every validation finding, so what ``hl7relay validate`` reports is what a sender would see.
"""

from hl7relay.ack.codes import ErrorCode, Severity

__all__ = ["ErrorCode", "Severity"]
