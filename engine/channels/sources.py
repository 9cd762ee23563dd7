"""Where a channel's messages come from: an MLLP listener or a polled directory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hl7relay.channels.files import FileSourceConfig, LocalFilePoller
from hl7relay.spec import Option, register
from hl7relay.mllp.framing import DEFAULT_MAX_FRAME_BYTES
from hl7relay.mllp.listener import ListenerConfig
from hl7relay.mllp.tls import TLSConfig

__all__ = ["MLLPSourceConfig", "FileSourceConfig", "TLS_OPTIONS", "Source", "MLLPSource", "FileSource"]

TLS_OPTIONS = [
    Option("tls_cert", "str", None, "PEM certificate (listener: server certificate; sender: client certificate)"),
    Option("tls_key", "str", None, "PEM private key of tls_cert", secret=False),
    Option("tls_ca", "str", None, "PEM CA to verify the peer against"),
]


@dataclass(slots=True)
class MLLPSourceConfig:
    listener: ListenerConfig
    runner: ClassVar[type[Source]]  # what the engine opens for it (below)


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
    Option("max_connections_per_peer", "int", 16, "connections one address may hold; at the limit its longest-idle "
           "one is closed to make room (refused only when all are busy)"),
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

    from hl7relay.mllp.listener import default_max_connections

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


# -- the running part of each source type ---------------------------------------------------------
# A source's config names its runner (``runner``): what the engine opens for a channel, closes when
# the channel is disabled, removed or rebound, and asks whether a changed config can keep its
# socket. Adding a source type touches this module only. ``running`` is the engine's running
# channel (runtime.RunningChannel), the source's one way in: a listener hands it each message as
# its Receiver (receive -> Answer) and writes the answer; a reader that answers nobody calls
# handle. Its current configuration (``running.channel``) is read at each message, so after a
# reload the next message takes the new one while those in flight finish under theirs. Time and
# the reactor come from ``running.resources``.

class Source:
    address = ""

    def __init__(self, config, running):
        self.config = config
        self.running = running
        self.reactor = running.resources.reactor

    def open(self) -> str:  # pragma: no cover - interface
        """Start; returns what it is, for the startup line (``MLLP on 127.0.0.1:2575``)."""
        raise NotImplementedError

    def close(self, close_connections: bool):
        """Stop accepting (and, when asked, close what is open); may return a Deferred."""

    def finish(self) -> int:
        """The engine is stopping (called after :meth:`close`): read nothing more from open
        connections, answer what is being processed, then close them; returns how many received
        messages were dropped unanswered."""
        return 0

    def abort(self) -> None:
        """Drop the connections still open at once (a stop's time is up)."""

    def keeps_socket(self, new_config) -> bool:
        """Whether a changed config can be applied in place (:meth:`reconfigure`)."""
        return False

    def reconfigure(self, new_config) -> None:  # pragma: no cover - only where keeps_socket
        raise NotImplementedError

    @property
    def bound(self) -> bool:
        return True

    @property
    def open_connections(self) -> int:
        return 0

    def view(self) -> dict | None:
        """What the source is doing, for status and alerts (a poller's schedule, a file due)."""
        return None

    def connections_view(self) -> dict | None:
        """Who is connected and who has been (sources that take connections); None otherwise."""
        return None


class MLLPSource(Source):
    def __init__(self, config, running):
        super().__init__(config, running)
        self.port = None
        self._factory = None  # the closed listener's, whose connections a stop finishes

    def open(self) -> str:
        from hl7relay.mllp.listener import listen

        config, running = self.config.listener, self.running
        self.port = listen(running, config, self.reactor, name=running.channel.name, peers=running.peers)
        address = self.port.getHost()
        self.address = f"{address.host}:{address.port}"
        return f"MLLP{' TLS' if config.tls else ''} on {self.address}"

    def close(self, close_connections: bool):
        from twisted.internet import defer

        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        factory = self._factory = getattr(port, "factory", None)
        d = defer.maybeDeferred(port.stopListening)

        def closed(_):
            if close_connections and factory is not None:
                for protocol in list(getattr(factory, "connections", ())):
                    protocol.transport.loseConnection()

        return d.addCallback(closed)

    def finish(self) -> int:
        factory = self._factory
        return sum(protocol.finish() for protocol in list(getattr(factory, "connections", ())))

    def abort(self) -> None:
        factory = self._factory
        for protocol in list(getattr(factory, "connections", ())):
            protocol.closed = True
            protocol.transport.abortConnection()

    def keeps_socket(self, new_config) -> bool:
        old, new = self.config.listener, getattr(new_config, "listener", None)
        return (self.port is not None and new is not None
                and (old.host, old.port, old.tls) == (new.host, new.port, new.tls))

    def reconfigure(self, new_config) -> None:
        # same socket, new options: open connections read their factory's config as they go (and
        # the running channel's new ACK policy at each message)
        factory = getattr(self.port, "factory", None)
        if factory is not None:
            factory.config = new_config.listener
        self.config = new_config

    @property
    def bound(self) -> bool:
        return self.port is not None

    @property
    def open_connections(self) -> int:
        return getattr(getattr(self.port, "factory", None), "open_connections", 0)

    def connections_view(self) -> dict | None:
        factory = getattr(self.port, "factory", None)
        return None if factory is None else factory.view()


class FileSource(Source):
    """A file source's runner: its poller (files.py; the sftp source's, sftp_source.py) while open."""

    poller_class: type = LocalFilePoller

    def __init__(self, config, running):
        super().__init__(config, running)
        self.poller = None

    def open(self) -> str:
        self.poller = self.poller_class(self.running, self.config)
        self.poller.start()
        self.address = self.where(self.poller)
        return f"files {self.config.glob} in {self.address}"

    def where(self, poller) -> str:
        return str(self.config.directory)

    def view(self) -> dict | None:
        return self.poller.view() if self.poller is not None else None

    def close(self, close_connections: bool):
        if self.poller is not None:
            self.poller.stop()
            self.poller = None


MLLPSourceConfig.runner = MLLPSource
FileSourceConfig.runner = FileSource
