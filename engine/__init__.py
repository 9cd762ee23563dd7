"""hl7relay: an HL7 v2 interface engine.

The message model is the foundation everything else uses::

    from hl7relay import Message
    msg = Message.from_bytes(data)        # decoded by MSH-18
    msg.get("PID-5.1"); msg.set("PID-8", "F"); msg.to_bytes()
"""

__version__ = "0.1.0"

from hl7relay.hl7.batch import MessageChunk, SplitResult, split_messages
from hl7relay.hl7.charsets import DecodedText, decode_message
from hl7relay.errors import HL7RelayError, ParseError, PathError, ValidationError
from hl7relay.hl7.escape import Delimiters, escape, unescape
from hl7relay.hl7.message import Message
from hl7relay.hl7.path import Path, parse_path

__all__ = [
    "__version__",
    "Message", "Delimiters", "Path", "parse_path", "escape", "unescape",
    "decode_message", "DecodedText", "split_messages", "SplitResult", "MessageChunk",
    "HL7RelayError", "ParseError", "PathError", "ValidationError",
]
