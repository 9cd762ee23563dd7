"""``hl7relay listen``: a standalone MLLP listener that acknowledges everything it receives.

The test double analysts point a PMS at before a channel exists: AA for every message in
original mode, and what MSH-15/MSH-16 ask for in enhanced mode; one line per message.
"""

from __future__ import annotations

import time

from hl7relay.cli._args import count, port, seconds
from hl7relay.cli._tls import add_tls_arguments, tls_from_args
from hl7relay.outcomes import AckCode

HELP = "listen for MLLP and acknowledge every message (a test double for a receiver)"
DESCRIPTION = """\
Accept MLLP connections and acknowledge every message: AA in original mode; in enhanced mode
(MSH-15/MSH-16 valued) the accept and application ACKs those fields ask for. Each message is
summarised on one line (time, peer, type, control id, version, size, ACKs sent); message content
is not printed. Listens on 127.0.0.1 unless --host says otherwise. Ctrl-C or SIGTERM stops it.

To rehearse a failing receiver (what a channel's retries, dead letters and alerts do about it):
  --answer AE|AR|CR     answer every message with that code (AE: application error, not to be
                        resent; AR/CR: rejected, send again later)
  --delay SECONDS       answer only after that long (longer than the sender's ACK timeout: a timeout)
  --no-answer           read messages and never answer them
  --drop                close the connection as soon as a message arrives, without answering
  --fail-first N        behave so for the first N messages only, then acknowledge normally

With --http it is an HTTP(S) receiver instead (a test double for an API an http destination posts
to): every POST is answered 201 with {"received": CONTROL_ID}; to rehearse a failing API,
  --status CODE         answer with that status (400 dead letter, 401 not authorised, 409 conflict,
                        429/503 rate limited, 500 retried...)
  --retry-after SECONDS with --status 429 or 503: the Retry-After the API asks for
and --delay, --no-answer, --drop (the connection reset) and --fail-first N as above."""


def add_arguments(parser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=port, default=2575, help="port (default: 2575, HL7's registered port)")
    parser.add_argument("--charset", default="UTF-8", help="character set for messages with an empty MSH-18 (default: UTF-8)")
    parser.add_argument("--max-connections", type=count, default=0,
                        help="connections open at once (default 0: sized from the file limit); the longest-idle "
                             "one is closed to make room")
    parser.add_argument("--max-connections-per-peer", type=count, default=16, help="from one address (default 16)")
    parser.add_argument("--log-level", default="warn", choices=("trace", "debug", "info", "warn", "error"),
                        help="what the engine logs to standard error (default: warn)")
    failing = parser.add_argument_group("rehearsing a failing receiver")
    failing.add_argument("--answer", choices=tuple(c.value for c in (AckCode.AA, AckCode.AE, AckCode.AR, AckCode.CR)),
                         default=AckCode.AA.value, help="the code to answer with")
    failing.add_argument("--delay", type=seconds, default=0.0, metavar="SECONDS", help="wait before answering")
    mode = failing.add_mutually_exclusive_group()
    mode.add_argument("--no-answer", action="store_true", help="never answer")
    mode.add_argument("--drop", action="store_true", help="close the connection instead of answering")
    failing.add_argument("--fail-first", type=count, metavar="N",
                         help="apply --answer/--delay/--no-answer/--drop to the first N messages only")
    http = parser.add_argument_group("an HTTP receiver (--http)")
    http.add_argument("--http", action="store_true", help="receive HTTP(S) POSTs instead of MLLP")
    http.add_argument("--status", type=_status, metavar="CODE", help="with --http: answer with this status")
    http.add_argument("--retry-after", type=seconds, metavar="SECONDS",
                      help="with --http --status 429|503: the Retry-After header")
    add_tls_arguments(parser, server=True)


def _status(text: str) -> int:
    import argparse

    if not text.isdigit() or not 200 <= int(text) <= 599:
        raise argparse.ArgumentTypeError(f"{text!r} is not an HTTP status (200 to 599)")
    return int(text)


def outcome_for(code: str, message):
    """The handler's outcome for ``--answer code``: AE and AR as the message's ACK mode has them
    (AR is CR in enhanced mode); CR exactly, in either mode."""
    from hl7relay.ack import ErrorCode, Outcome, build_ack

    if code == AckCode.AE:
        return Outcome.error("hl7relay listen --answer AE: rehearsing an application error")
    if code == AckCode.AR:
        return Outcome.rejected("hl7relay listen --answer AR: rehearsing a rejection", ErrorCode.APPLICATION_INTERNAL_ERROR)
    if code == AckCode.CR:
        text = "hl7relay listen --answer CR: rehearsing a commit reject"
        outcome = Outcome.internal_error(text)
        outcome.acks, outcome.ack_codes = [build_ack(message, code, text, ErrorCode.APPLICATION_INTERNAL_ERROR)], [code]
        return outcome
    return Outcome.accepted()


def run(args) -> int:
    import sys

    from hl7relay.logs import start_logging

    if not args.http and (args.status is not None or args.retry_after is not None):
        print("hl7relay listen: --status and --retry-after answer HTTP requests: add --http", file=sys.stderr)
        return 2
    if args.http and args.answer != AckCode.AA:
        print("hl7relay listen: --answer is an ACK code for MLLP; with --http give --status CODE", file=sys.stderr)
        return 2
    if args.retry_after is not None and args.status not in (429, 503):
        print("hl7relay listen: --retry-after goes with --status 429 or 503", file=sys.stderr)
        return 2
    start_logging(args.log_level)
    if args.http:
        return _http(args)
    from twisted.internet import reactor

    from twisted.internet.error import CannotListenError

    from hl7relay.ack import AckPolicy, Outcome, is_ack
    from hl7relay.mllp.listener import ListenerConfig, listen
    from hl7relay.receiving import Responder
    from hl7relay.hl7.message import Message

    policy = AckPolicy()
    from hl7relay.mllp.listener import default_max_connections

    config = ListenerConfig(host=args.host, port=args.port, charset=args.charset,
                            max_connections=args.max_connections or default_max_connections(),
                            max_connections_per_peer=max(1, args.max_connections_per_peer),
                            tls=tls_from_args(args, server=True))

    from twisted.internet import defer, task

    seen = {"messages": 0}
    rehearsing = args.answer != AckCode.AA or args.delay or args.no_answer or args.drop

    def handler(message: Message, peer):
        seen["messages"] += 1
        failing = rehearsing and (args.fail_first is None or seen["messages"] <= args.fail_first)
        line = (f"{time.strftime('%H:%M:%S')} {peer} {message.get('MSH-9') or '?'} {message.control_id or '-'} "
                f"v{message.version or '?'} {len(message.raw or b'')}B -> ")
        if failing and args.drop:
            print(line + "connection dropped (--drop)", flush=True)
            for protocol in list(port.factory.connections):
                if protocol.peer == peer:
                    protocol.transport.abortConnection()
            return defer.Deferred()  # never answered: the connection is gone
        if failing and args.no_answer:
            print(line + "no answer (--no-answer)", flush=True)
            return defer.Deferred()
        outcome = outcome_for(args.answer, message) if failing else Outcome.accepted()
        codes = policy.codes(message, outcome)
        answer = "no ACK (it is an ACK)" if is_ack(message) else ("ACK " + "+".join(codes) if codes else "no ACK (NE)")
        if failing and args.delay:
            print(line + f"{answer} in {args.delay:g}s (--delay)", flush=True)
            return task.deferLater(reactor, args.delay, lambda: outcome)
        print(line + answer, flush=True)
        return outcome

    try:
        port = listen(Responder(handler, policy), config, reactor)
    except CannotListenError as exc:
        import sys

        reason = exc.socketError.strerror if getattr(exc, "socketError", None) is not None else str(exc)
        print(f"hl7relay listen: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
        return 1
    address = port.getHost()
    tls = "TLS" + (" with client certificates" if args.require_client_cert else "") if config.tls else "no TLS"
    print(f"hl7relay listen: MLLP on {address.host}:{address.port} ({tls}); Ctrl-C to stop", flush=True)
    reactor.run()
    return 0


def _http(args) -> int:
    """An HTTP(S) receiver that answers as told: one line per request."""
    import json
    import sys

    from twisted.internet import reactor
    from twisted.internet.error import CannotListenError
    from twisted.web import resource, server

    from hl7relay.errors import ParseError
    from hl7relay.hl7.message import Message

    seen = {"requests": 0}
    rehearsing = args.status is not None or args.delay or args.no_answer or args.drop

    class Receiver(resource.Resource):
        isLeaf = True

        def render_GET(self, request):  # a check (hl7relay check URL, a credential's check_url) is answered
            request.setHeader(b"Content-Type", b"application/json")
            return b'{"listening": true}'

        def render_POST(self, request):
            seen["requests"] += 1
            body = request.content.read()
            try:
                message = Message.from_bytes(body.replace(b"\r\n", b"\r").replace(b"\n", b"\r"), args.charset)
                about = f"{message.get('MSH-9') or '?'} {message.control_id or '-'}"
                control_id = message.control_id or ""
            except ParseError:
                about, control_id = "(not HL7)", ""
            client = request.getClientAddress()
            line = (f"{time.strftime('%H:%M:%S')} {getattr(client, 'host', '?')} {request.method.decode()} "
                    f"{request.path.decode('latin-1')} {about} {len(body)}B -> ")
            failing = rehearsing and (args.fail_first is None or seen["requests"] <= args.fail_first)
            if failing and args.drop:
                print(line + "connection reset (--drop)", flush=True)
                request.channel.transport.abortConnection()
                return server.NOT_DONE_YET
            if failing and args.no_answer:
                print(line + "no answer (--no-answer)", flush=True)
                return server.NOT_DONE_YET
            status = args.status if failing and args.status is not None else 201
            request.setResponseCode(status)
            request.setHeader(b"Content-Type", b"application/json")
            if status in (429, 503) and args.retry_after is not None:
                request.setHeader(b"Retry-After", str(int(args.retry_after)).encode())
            answer = (json.dumps({"received": control_id}) if status < 300
                      else json.dumps({"error": f"hl7relay listen --status {status}: rehearsing"})).encode()
            said = f"{status}" + (f" Retry-After {int(args.retry_after)}" if status in (429, 503)
                                  and args.retry_after is not None else "")
            if failing and args.delay:
                print(line + f"{said} in {args.delay:g}s (--delay)", flush=True)

                def late():
                    if not request.finished and not getattr(request, "_disconnected", False):
                        request.write(answer)
                        request.finish()

                reactor.callLater(args.delay, late)
                return server.NOT_DONE_YET
            print(line + said, flush=True)
            return answer

    class Quiet(server.Site):
        def log(self, request):
            """One line per request is printed above."""

    site = Quiet(Receiver())
    try:
        tls = tls_from_args(args, server=True)
        if tls is not None:
            from hl7relay.mllp.tls import server_options

            port = reactor.listenSSL(args.port, site, server_options(tls), interface=args.host)
        else:
            port = reactor.listenTCP(args.port, site, interface=args.host)
    except (CannotListenError, ValueError) as exc:
        reason = exc.socketError.strerror if getattr(exc, "socketError", None) is not None else str(exc)
        print(f"hl7relay listen: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
        return 1
    address = port.getHost()
    scheme = "https" if tls is not None else "http"
    print(f"hl7relay listen: HTTP on {address.host}:{address.port} ({scheme}://{address.host}:{address.port}/); "
          "Ctrl-C to stop", flush=True)
    reactor.run()
    return 0
