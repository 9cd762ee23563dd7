"""``hl7relay listen``: a standalone MLLP listener that acknowledges everything it receives.

The test double analysts point a PMS at before a channel exists: AA for every message in
original mode, and what MSH-15/MSH-16 ask for in enhanced mode; one line per message.
"""

from __future__ import annotations

import time

from hl7relay.cli._tls import add_tls_arguments, tls_from_args

HELP = "listen for MLLP and acknowledge every message (a test double for a receiver)"
DESCRIPTION = """\
Accept MLLP connections and acknowledge every message: AA in original mode; in enhanced mode
(MSH-15/MSH-16 valued) the accept and application ACKs those fields ask for. Each message is
summarised on one line (time, peer, type, control id, version, size, ACKs sent); message content
is not printed. Listens on 127.0.0.1 unless --host says otherwise. Ctrl-C stops it."""


def add_arguments(parser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=2575, help="port (default: 2575, HL7's registered port)")
    parser.add_argument("--charset", default="UTF-8", help="character set for messages with an empty MSH-18 (default: UTF-8)")
    parser.add_argument("--max-connections", type=int, default=64)
    parser.add_argument("--log-level", default="warn", choices=("trace", "debug", "info", "warn", "error"),
                        help="what the engine logs to standard error (default: warn)")
    add_tls_arguments(parser, server=True)


def run(args) -> int:
    from hl7relay.cli._logging import start_logging

    start_logging(args.log_level)
    from twisted.internet import reactor

    from hl7relay.ack import AckPolicy, Outcome, is_ack
    from hl7relay.listener import ListenerConfig, listen
    from hl7relay.message import Message

    policy = AckPolicy()
    config = ListenerConfig(host=args.host, port=args.port, charset=args.charset, max_connections=args.max_connections,
                            tls=tls_from_args(args, server=True), policy=policy)

    def handler(message: Message, peer):
        outcome = Outcome.accepted()
        codes = policy.codes(message, outcome)
        answer = "no ACK (it is an ACK)" if is_ack(message) else ("ACK " + "+".join(codes) if codes else "no ACK (NE)")
        print(f"{time.strftime('%H:%M:%S')} {peer} {message.get('MSH-9') or '?'} {message.control_id or '-'} "
              f"v{message.version or '?'} {len(message.raw or b'')}B -> {answer}", flush=True)
        return outcome

    port = listen(handler, config, reactor)
    address = port.getHost()
    tls = "TLS" + (" with client certificates" if args.require_client_cert else "") if config.tls else "no TLS"
    print(f"hl7relay listen: MLLP on {address.host}:{address.port} ({tls}); Ctrl-C to stop", flush=True)
    reactor.run()
    return 0
