"""Where a channel sends what it processed: an MLLP peer, a file, or another channel."""

from __future__ import annotations

import re
from dataclasses import dataclass

from hl7relay.channels.sources import TLS_OPTIONS, tls_config
from hl7relay.channels.spec import Option, register
from hl7relay.sender import SenderConfig

__all__ = ["MLLPDestinationConfig", "FileDestinationConfig", "ChannelDestinationConfig", "render_filename"]


@dataclass(slots=True)
class MLLPDestinationConfig:
    sender: SenderConfig


@register("destination", "mllp", "send over MLLP and record the peer's ACK", [
    Option("host", "str", description="peer host"),
    Option("port", "int", description="peer port"),
    Option("connect_timeout", "duration", 10.0, "seconds to wait to connect"),
    Option("ack_timeout", "duration", 30.0, "seconds to wait for the ACK"),
    *TLS_OPTIONS,
    Option("tls", "bool", False, "use TLS (verify against the system trust store or tls_ca)"),
])
def _mllp(options, context=None):
    return MLLPDestinationConfig(SenderConfig(options["host"], options["port"], options["connect_timeout"],
                                              options["ack_timeout"],
                                              tls=tls_config(options, False, getattr(context, "base_dir", None))))


_TEMPLATE = re.compile(r"\{([^{}]+)\}")


def render_filename(template: str, message, now) -> str:
    """``{MSH-10}``, ``{PID-3.1}`` (HL7 paths) and ``{now:%Y%m%d}`` in a file name template;
    characters unsafe in file names become ``_``."""
    def replace(match):
        key = match.group(1)
        if key.startswith("now"):
            fmt = key[4:] if key.startswith("now:") else "%Y%m%d%H%M%S"
            return now.strftime(fmt)
        return message.get(key) or "none"

    name = _TEMPLATE.sub(replace, template)
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


@dataclass(slots=True)
class FileDestinationConfig:
    directory: str
    filename: str


@register("destination", "file", "write each message to a file (atomically: temp file, then rename)", [
    Option("directory", "str", description="output folder (created if missing)"),
    Option("filename", "str", "{MSH-10}.hl7", "name template: HL7 paths and {now:%Y%m%d...} in braces"),
])
def _file(options, context=None):
    for key in _TEMPLATE.findall(options["filename"]):
        if not key.startswith("now"):
            from hl7relay.path import parse_path

            parse_path(key)  # a bad path is a lint error now, not a delivery error later
    return FileDestinationConfig(options["directory"], options["filename"])


@dataclass(slots=True)
class ChannelDestinationConfig:
    channel: str


@register("destination", "channel", "hand the message to another channel of this engine", [
    Option("channel", "str", description="the other channel's name")], shorthand="channel")
def _channel(options, context=None):
    return ChannelDestinationConfig(options["channel"])
