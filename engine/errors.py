"""Exception types, one per outcome.

Callers decide what to answer from the type alone: a parse error means the bytes are not a
readable HL7 message, a path error means a program asked for something that cannot be addressed,
a validation error means the message was read but breaks the standard.
"""

__all__ = [
    "HL7RelayError", "ParseError", "PathError", "ValidationError",
    "PeerApplicationError", "PeerRejected", "AckTimeout", "SendConnectionError", "ReadOnlyEnvironment",
]


class HL7RelayError(Exception):
    """Base class of every error hl7relay raises on purpose."""


class ParseError(HL7RelayError):
    """The input is not a readable HL7 v2 message (no MSH, no field separator...)."""


class PathError(HL7RelayError, ValueError):
    """An HL7 path such as ``PID-3[2].1`` is malformed or cannot be written."""


class ValidationError(HL7RelayError):
    """A message was read but does not conform; ``findings`` says why."""

    def __init__(self, findings):
        self.findings = list(findings)
        first = self.findings[0] if self.findings else None
        super().__init__(str(first) if first is not None else "message is not valid")


class PeerApplicationError(HL7RelayError):
    """The peer answered AE: the message reached it but its content needs a person; do not resend."""


class PeerRejected(HL7RelayError):
    """The peer answered AR or CR: it did not take the message; sending again later may work."""


class AckTimeout(HL7RelayError):
    """No matching ACK arrived in time; the peer may or may not have the message."""


class SendConnectionError(HL7RelayError):
    """The peer could not be reached (refused, unreachable, TLS failure, connect timeout)."""


class ReadOnlyEnvironment(HL7RelayError):
    """What an engine in a read-only environment (``read_only: true``: a PMS sandbox) does not do: send."""
