"""TLS options shared by the verbs that open MLLP connections."""

from __future__ import annotations

from hl7relay.mllp.tls import TLSConfig


def add_tls_arguments(parser, server: bool) -> None:
    group = parser.add_argument_group("TLS")
    group.add_argument("--tls-cert", metavar="PEM", help="certificate (listener: server certificate; send: client certificate)")
    group.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    group.add_argument("--tls-ca", metavar="PEM",
                       help="CA to verify the peer against (send: the server; listen: client certificates)")
    if server:
        group.add_argument("--require-client-cert", action="store_true", help="mutual TLS: refuse clients without a certificate from --tls-ca")
    else:
        group.add_argument("--tls", action="store_true", help="use TLS, verifying the server against the system trust store or --tls-ca")
        group.add_argument("--tls-server-name", metavar="NAME", help="name to verify in the server certificate (default: --host)")


def tls_from_args(args, server: bool) -> TLSConfig | None:
    wanted = args.tls_cert or args.tls_ca or (getattr(args, "tls", False)) or getattr(args, "require_client_cert", False)
    if not wanted:
        return None
    return TLSConfig(certificate=args.tls_cert, key=args.tls_key, ca=args.tls_ca,
                     require_client_cert=getattr(args, "require_client_cert", False),
                     server_name=getattr(args, "tls_server_name", None))
