"""Where a channel's messages come from: an MLLP listener or a polled directory."""

from __future__ import annotations

from dataclasses import dataclass

from hl7relay.channels.spec import Option, register
from hl7relay.framing import DEFAULT_MAX_FRAME_BYTES
from hl7relay.listener import ListenerConfig
from hl7relay.tls import TLSConfig

__all__ = ["MLLPSourceConfig", "FileSourceConfig", "TLS_OPTIONS"]

TLS_OPTIONS = [
    Option("tls_cert", "str", None, "PEM certificate (listener: server certificate; sender: client certificate)"),
    Option("tls_key", "str", None, "PEM private key of tls_cert", secret=False),
    Option("tls_ca", "str", None, "PEM CA to verify the peer against"),
]


@dataclass(slots=True)
class MLLPSourceConfig:
    listener: ListenerConfig


def tls_config(options, server: bool, base_dir=None) -> TLSConfig | None:
    from pathlib import Path

    def resolve(value):
        if value is None or base_dir is None or Path(value).is_absolute():
            return value
        return str(Path(base_dir) / value)

    if not (options.get("tls_cert") or options.get("tls_ca") or options.get("tls")):
        return None
    return TLSConfig(resolve(options.get("tls_cert")), resolve(options.get("tls_key")), resolve(options.get("tls_ca")),
                     require_client_cert=bool(options.get("require_client_cert")) if server else False)


@register("source", "mllp", "an MLLP listener", [
    Option("host", "str", "127.0.0.1", "address to listen on (0.0.0.0 for all)"),
    Option("port", "int", 2575, "TCP port"),
    Option("max_connections", "int", 0, "connections open at once (0: half the process's file limit, 64 to "
           "10,000); when reached, the longest-idle connection is closed to make room for a new one"),
    Option("max_connections_per_peer", "int", 16, "connections one address may hold; further ones are refused"),
    Option("allow", "list", [], "addresses allowed to connect, as CIDRs (10.1.2.0/24, 10.1.2.3); "
           "empty: any address", item="str"),
    Option("read_timeout", "duration", 30.0, "seconds a started frame may take"),
    Option("idle_timeout", "duration", 0.0, "close connections silent this long (0: never)"),
    Option("max_frame_bytes", "int", DEFAULT_MAX_FRAME_BYTES, "larger frames close the connection"),
    Option("charset", "str", "UTF-8", "for messages with an empty MSH-18"),
    Option("keepalive", "bool", True, "TCP keepalive"),
    *TLS_OPTIONS,
    Option("require_client_cert", "bool", False, "mutual TLS: clients need a certificate from tls_ca"),
])
def _mllp(options, context=None):
    import ipaddress

    from hl7relay.listener import default_max_connections

    if not 0 <= options["port"] <= 65535:
        raise ValueError(f"port {options['port']} is not a TCP port")
    if options["max_connections"] < 0 or options["max_connections_per_peer"] < 1:
        raise ValueError("max_connections must be 0 (automatic) or more, max_connections_per_peer 1 or more")
    allow = []
    for cidr in options["allow"]:
        try:
            allow.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise ValueError(f"allow: {cidr!r} is not an address or CIDR (e.g. 10.1.2.0/24)") from None
    config = ListenerConfig(
        host=options["host"], port=options["port"],
        max_connections=options["max_connections"] or default_max_connections(),
        max_connections_per_peer=options["max_connections_per_peer"], allow=tuple(allow),
        read_timeout=options["read_timeout"], idle_timeout=options["idle_timeout"],
        max_frame_bytes=options["max_frame_bytes"], charset=options["charset"], keepalive=options["keepalive"],
        tls=tls_config(options, True, getattr(context, "base_dir", None)),
    )
    return MLLPSourceConfig(config)


@dataclass(slots=True)
class FileSourceConfig:
    directory: str
    glob: str
    poll_interval: float
    after: str  # move | delete
    move_to: str | None
    charset: str
    settle: float  # a file must be unchanged this long before it is read (never half-written)


@register("source", "file", "read message files from a directory (batches split)", [
    Option("directory", "str", description="folder to poll"),
    Option("glob", "str", "*.hl7", "which files"),
    Option("poll_interval", "duration", 2.0, "seconds between looks"),
    Option("after", "enum", "move", "after a successful read: move the file or delete it", ("move", "delete")),
    Option("move_to", "str", None, "where read files go (default: DIRECTORY/processed)"),
    Option("charset", "str", "UTF-8", "for messages with an empty MSH-18"),
    Option("settle", "duration", 1.0, "seconds a file must stay unchanged before it is read"),
])
def _file(options, context=None):
    return FileSourceConfig(options["directory"], options["glob"], options["poll_interval"], options["after"],
                            options["move_to"], options["charset"], options["settle"])
