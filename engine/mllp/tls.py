"""TLS and mutual TLS for MLLP listeners and senders (Twisted + pyOpenSSL)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["TLSConfig", "server_options", "client_options", "describe_tls_failure", "is_tls_failure", "looks_like_tls"]


def is_tls_failure(reason) -> bool:
    """Whether a connection was lost to a TLS error (handshake, certificate, protocol)."""
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover - Twisted[tls] brings it
        return False
    return reason is not None and reason.check(SSL.Error) is not None


def describe_tls_failure(reason) -> str:
    """A TLS failure in words a support engineer can act on."""
    value = reason.value
    parts = []
    for item in (value.args[0] if value.args and isinstance(value.args[0], list) else []):
        if isinstance(item, tuple) and item:
            parts.append(str(item[-1]))
    text = "; ".join(p for p in parts if p) or str(value) or type(value).__name__
    lowered = text.lower()
    if "wrong version number" in lowered or "http request" in lowered or "unknown protocol" in lowered \
            or "packet length too long" in lowered or "record layer failure" in lowered:
        return f"not TLS: the other side sent plain text ({text}); is it set up for TLS?"
    if "certificate required" in lowered or "peer did not return a certificate" in lowered:
        return f"a client certificate is required and none was accepted ({text})"
    if "certificate verify failed" in lowered or "unknown ca" in lowered or "bad certificate" in lowered:
        return f"certificate not trusted ({text})"
    return f"TLS failed: {text}"


def looks_like_tls(data: bytes) -> bool:
    """The start of a TLS record (handshake or alert): what a TLS port answers to plain text."""
    return len(data) >= 3 and data[0] in (0x15, 0x16) and data[1] == 0x03 and data[2] <= 0x04


@dataclass(slots=True)
class TLSConfig:
    """PEM files. A listener needs ``certificate`` and ``key``; ``ca`` is the authority that
    client certificates (listener, with ``require_client_cert``) or the server's certificate
    (sender) must chain to. A sender presents ``certificate``/``key`` as its client certificate."""

    certificate: str | None = None
    key: str | None = None
    ca: str | None = None
    require_client_cert: bool = False
    server_name: str | None = None  # sender: the name to verify instead of the host

    def __post_init__(self):
        for name in ("certificate", "key", "ca"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ValueError(f"TLS {name} file {value!r} does not exist")
        if self.require_client_cert and not self.ca:
            raise ValueError("require_client_cert needs a CA file to check client certificates against")
        if (self.certificate is None) != (self.key is None):
            raise ValueError("a TLS certificate and its key go together")


def _private(cfg: TLSConfig):
    from twisted.internet import ssl

    pem = Path(cfg.certificate).read_bytes() + b"\n" + Path(cfg.key).read_bytes()
    return ssl.PrivateCertificate.loadPEM(pem)


def server_options(cfg: TLSConfig):
    """Context factory for a TLS listener (mutual TLS when ``require_client_cert``)."""
    from twisted.internet import ssl

    if not cfg.certificate:
        raise ValueError("a TLS listener needs a certificate and key")
    private = _private(cfg)
    kwargs = {}
    if cfg.require_client_cert:
        authority = ssl.Certificate.loadPEM(Path(cfg.ca).read_bytes())
        kwargs = {"verify": True, "caCerts": [authority.original], "requireCertificate": True}
    return ssl.CertificateOptions(privateKey=private.privateKey.original, certificate=private.original, **kwargs)


def client_options(cfg: TLSConfig, host: str):
    """Context factory for a TLS sender: verifies the server against ``ca`` (or the system's
    trust store) and presents a client certificate when one is configured."""
    from twisted.internet import ssl

    trust = ssl.Certificate.loadPEM(Path(cfg.ca).read_bytes()) if cfg.ca else None
    client = _private(cfg) if cfg.certificate else None
    return ssl.optionsForClientTLS(cfg.server_name or host, trustRoot=trust, clientCertificate=client)
