"""``hl7relay check``: the connection tester, outbound (a destination) and inbound (our listeners)."""

from __future__ import annotations

import json
import re
import sys
import time

from hl7relay.cli._args import seconds
from hl7relay.cli._settings import add_settings_arguments
from hl7relay.cli._tls import add_tls_arguments, tls_from_args

HELP = "test connections: DNS, TCP, TLS certificate, MLLP round trip to a destination; who reaches our listeners"
DESCRIPTION = """\
  hl7relay check                         every MLLP destination of the channel files
  hl7relay check lab                     one destination (CHANNEL/DESTINATION when the name is not unique);
                                         an http destination: its API's host and its credential's token
  hl7relay check 10.0.0.7:2576 [--tls --tls-ca CA.pem]   any MLLP peer
  hl7relay check lab --mllp              also send a harmless message (an NMQ^N01 clock query, or the
                                         destination's check_message) and wait for its ACK
  hl7relay check --inbound [CHANNEL]     the running engine's listeners: the address each is bound to,
                                         open connections, and each peer's last connection and message
  hl7relay check https://pms.example/api  any HTTP(S) endpoint: DNS, TCP, TLS, then a GET and its status
  hl7relay check sftp://host:22 [--known-hosts FILE]   an SFTP server's host key: its SHA256 fingerprint
                                         and the known_hosts line that pins it (confirm the fingerprint with
                                         the server's owner first); with --known-hosts, whether it is pinned
  hl7relay check --credentials NAME      test a credential now: its token endpoint reached, a token obtained
                                         (expiry, scopes) or the endpoint's error verbatim; with check_url,
                                         a GET carrying it

Each step says ok, warning or failed with its time: DNS (the addresses), TCP (connect time), TLS
(protocol, cipher, the certificate's subject, issuer and days to expiry; a warning under 30 days; when
it does not verify, why, and what the peer presents), MLLP (the ACK code). A destination with
check_round_trip: true gets the MLLP step without --mllp.

Exit status: 0 every target reachable (warnings allowed), 1 one is not, 2 wrong arguments or an
unknown destination."""


def add_arguments(parser) -> None:
    parser.add_argument("target", nargs="?", metavar="DESTINATION|HOST:PORT",
                        help="a destination's name (or CHANNEL/DESTINATION), or host:port; default: every MLLP destination")
    parser.add_argument("--mllp", action="store_true", help="also do an MLLP round trip with a harmless message")
    parser.add_argument("--message", metavar="FILE", help="the message for the round trip (default: an NMQ^N01 clock query)")
    parser.add_argument("--timeout", type=seconds, default=10.0, help="seconds for each step (default: 10)")
    parser.add_argument("--inbound", action="store_true",
                        help="show the running engine's listeners instead (TARGET: a channel name, default all)")
    parser.add_argument("--credentials", metavar="NAME",
                        help="test the credential NAME of the settings (credentials: section or credentials.yaml)")
    parser.add_argument("--known-hosts", metavar="FILE", help="sftp://: say whether the server's key is pinned in FILE")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    add_tls_arguments(parser, server=False)
    add_settings_arguments(parser)


_HOST_PORT = re.compile(r"^\[?(?P<host>[^\[\]/]+?)\]?:(?P<port>\d{1,5})$")


def run(args) -> int:
    if args.credentials is not None:
        return _credentials(args)
    if args.target and args.target.startswith(("http://", "https://")):
        return _url(args)
    if args.target and args.target.startswith("sftp://"):
        return _sftp(args)
    if args.inbound:
        return _inbound(args)
    targets, code = _targets(args)
    if targets is None:
        return code
    if targets[0].get("http") is not None:
        return _api_destination(args, targets[0])
    from hl7relay.ops.check import check_destination, default_check_message

    results, reachable = [], True
    for target in targets:
        round_trip = None
        if args.mllp or target["round_trip"]:
            path = args.message or target["message"]
            try:
                round_trip = open(path, "rb").read().replace(b"\r\n", b"\r").replace(b"\n", b"\r") \
                    if path else default_check_message()
            except OSError as exc:
                print(f"{path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
                return 2
        steps = check_destination(target["host"], target["port"], target["tls"], round_trip, args.timeout)
        ok = all(step.status in ("ok", "warning", "skipped") for step in steps)
        reachable &= ok
        results.append({"target": target["label"], "host": target["host"], "port": target["port"], "reachable": ok,
                        "steps": [step.to_dict() for step in steps]})
        if args.format == "text":
            address = f"{target['host']}:{target['port']}"
            print(address if target["label"] == address else f"{target['label']}: {address}")
            for step in steps:
                took = f" ({step.seconds * 1000:.1f} ms)" if step.seconds is not None else ""
                print(f"  {step.name:5} {step.status.upper():8} {step.detail}{took}")
            print(f"  {'reachable' if ok else 'NOT reachable'}")
    if args.format == "json":
        print(json.dumps(results, indent=2))
    return 0 if reachable else 1


def _targets(args):
    """([{label, host, port, tls, round_trip, message}], exit code when there are none)."""
    match = _HOST_PORT.match(args.target or "")
    if match:
        port = int(match.group("port"))
        if not 1 <= port <= 65535:
            print(f"{args.target}: a port is 1 to 65535", file=sys.stderr)
            return None, 2
        try:
            tls = tls_from_args(args, server=False)
        except ValueError as exc:
            print(str(exc), file=sys.stderr)
            return None, 2
        return [{"label": f"{match.group('host')}:{port}", "host": match.group("host"), "port": port, "tls": tls,
                 "round_trip": False,
                 "message": None}], 0
    from hl7relay.channels import load_channels
    from hl7relay.spec import did_you_mean
    from hl7relay.cli._settings import resolve_settings

    settings, problems = resolve_settings(args)
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        return None, 2
    channels, errors = load_channels(settings["channels"])
    for error in errors:
        print(f"(skipped) {error}", file=sys.stderr)
    found = [(c, d) for c in channels for d in c.destinations if d.type in ("mllp", "http")]
    if not args.target:
        found = [(c, d) for c, d in found if d.type == "mllp"]  # an API is checked when named: it may ask a token
    if args.target:
        wanted = args.target.split("/", 1)
        matches = [(c, d) for c, d in found if (len(wanted) == 2 and (c.name, d.name) == tuple(wanted))
                   or (len(wanted) == 1 and d.name == wanted[0])]
        if not matches:
            names = sorted({d.name for _, d in found} | {f"{c.name}/{d.name}" for c, d in found})
            print(f"no MLLP or http destination {args.target!r} in the channel files"
                  f"{did_you_mean(args.target, names)}; give host:port or a URL to check any peer", file=sys.stderr)
            return None, 2
        if len(matches) > 1:
            print(f"{args.target!r} is a destination of several channels: name one of "
                  + ", ".join(f"{c.name}/{d.name}" for c, d in matches), file=sys.stderr)
            return None, 2
        found = matches
    if not found:
        print("no MLLP destination in the channel files; give host:port to check any peer", file=sys.stderr)
        return None, 2
    return [{"label": f"{c.name}/{d.name}", "host": d.config.sender.host, "port": d.config.sender.port,
             "tls": d.config.sender.tls, "round_trip": d.config.check_round_trip, "message": d.config.check_message}
            if d.type == "mllp" else {"label": f"{c.name}/{d.name}", "http": d.config} for c, d in found], 0


def _inbound(args) -> int:
    from hl7relay.cli._api import call_engine, engine_settings, print_error
    from hl7relay.cli._support import format_time

    settings = engine_settings(args)
    if args.target:
        names = [args.target]
    else:
        status, payload = call_engine(settings, "GET", "/api/v1/channels")
        if status != 200:
            return print_error(status, payload)
        names = [c["name"] for c in payload]
    views = []
    for name in names:
        status, payload = call_engine(settings, "GET", f"/api/v1/channels/{name}/connections")
        if status != 200:
            return print_error(status, payload)
        views.append(payload)
    if args.format == "json":
        print(json.dumps(views, indent=2))
        return 0
    now = time.time()
    for view in views:
        if view["source"] not in ("mllp", "http"):
            print(f"{view['name']}: {view['source']} source (no connections)")
            continue
        where = f"listening on {view['address']}" if view["address"] else "NOT listening (disabled)"
        print(f"{view['name']}: {where}; {view['open_connections']} connection(s) open"
              + (f", {view['refused_connections']} refused" if view.get("refused_connections") else "")
              + (f", {view['tls_failures']} TLS failures" if view.get("tls_failures") else ""))
        for c in view["connections"]:
            print(f"  open: {c['peer']} for {_age(c['connected_seconds'])}, {c['messages']} message(s), "
                  f"idle {_age(c['idle_seconds'])}")
        for p in view["peers"]:
            last = f"last message {format_time(p['last_message_at'])} ({_age(now - p['last_message_at'])} ago)" \
                if p["last_message_at"] else "no message yet"
            print(f"  peer {p['host']}: {p['connections']} connection(s), {p['messages']} message(s), {last}")
        if not view["peers"]:
            print("  no peer has connected since the engine started")
    return 0


def _age(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _credentials(args) -> int:
    from hl7relay.apiclient.credentials import credential_problems, loaded_credentials
    from hl7relay.cli._settings import resolve_settings
    from hl7relay.spec import did_you_mean

    if args.target or args.inbound or args.mllp:
        print("--credentials tests a credential: give no destination, --inbound or --mllp with it", file=sys.stderr)
        return 2
    _, problems = resolve_settings(args)
    found = loaded_credentials()
    credential = found.get(args.credentials)
    if credential is None:
        for problem in problems + credential_problems():
            print(problem, file=sys.stderr)
        print(f"no credentials named {args.credentials!r}" + (did_you_mean(args.credentials, found) if found else
              " (none are named: credentials: in config/hl7relay.yaml, or config/credentials.yaml)"), file=sys.stderr)
        return 2
    if credential.oauth is None and not credential.check_url:
        print(f"{args.credentials}: a {credential.type} credential has nothing to test without check_url "
              "(a URL of the API that answers a GET)", file=sys.stderr)
        return 2
    from hl7relay.ops.check import check_credential

    result = _run_on_reactor(lambda reactor: check_credential(credential, reactor, args.timeout))
    if not isinstance(result, list):  # a bug: said in one line, not a traceback
        print(f"{args.credentials}: the check failed: {getattr(result, 'getErrorMessage', lambda: result)()}",
              file=sys.stderr)
        return 1
    from hl7relay.ops.check import credential_verdict

    verdict = credential_verdict(result)
    if args.format == "json":
        print(json.dumps({"credential": credential.name, "type": credential.type, "verdict": verdict,
                          "authenticated": verdict == "authenticated",
                          "steps": [step.to_dict() for step in result]}, indent=2))
    else:
        _print_steps(f"{credential.name} ({credential.type})", result, "", "text", {}, verdict)
    return 0 if verdict == "authenticated" else 1


def _run_on_reactor(start):
    """Run ``start()`` (a Deferred) on the reactor and return its result, or its Failure."""
    from twisted.internet import reactor

    outcome: list = []

    def go():
        d = start(reactor)
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run(installSignalHandlers=False)
    return outcome[0] if outcome else None


def _print_steps(label: str, steps, ok_word: str, format: str, extra: dict, verdict: str | None = None) -> None:
    ok = all(step.status in ("ok", "warning", "skipped") for step in steps)
    if format == "json":
        print(json.dumps({**extra, ok_word: ok, "steps": [step.to_dict() for step in steps]}, indent=2))
        return
    print(label)
    for step in steps:
        took = f" ({step.seconds * 1000:.1f} ms)" if step.seconds is not None else ""
        print(f"  {step.name:5} {step.status.upper():8} {step.detail}{took}")
    print(f"  {verdict or (ok_word if ok else 'NOT ' + ok_word)}")


def _url(args) -> int:
    from urllib.parse import urlsplit

    from hl7relay.apiclient.http import safe_url
    from hl7relay.ops.check import check_url

    if args.inbound or args.mllp:
        print("a URL is checked over HTTP: --inbound and --mllp do not apply", file=sys.stderr)
        return 2
    parts = urlsplit(args.target)
    if not parts.hostname:
        print(f"{args.target}: no host in the URL", file=sys.stderr)
        return 2
    try:
        tls = tls_from_args(args, server=False) if parts.scheme == "https" else None
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    steps = _run_on_reactor(lambda reactor: check_url(args.target, tls, reactor, args.timeout))
    if not isinstance(steps, list):
        print(f"{safe_url(args.target)}: the check failed: {getattr(steps, 'getErrorMessage', lambda: steps)()}",
              file=sys.stderr)
        return 1
    _print_steps(safe_url(args.target), steps, "reachable", args.format, {"target": safe_url(args.target)})
    return 0 if all(step.status in ("ok", "warning", "skipped") for step in steps) else 1


def _sftp(args) -> int:
    """An SFTP server's host key, to pin it (and, with --known-hosts, whether it is pinned)."""
    from urllib.parse import urlsplit

    from hl7relay.sftp import SFTPError, _refusal, SFTPSettings, fingerprint, host_key, known_hosts_line

    parts = urlsplit(args.target)
    try:
        port = parts.port or 22
    except ValueError:
        print(f"{args.target}: not a port", file=sys.stderr)
        return 2
    if not parts.hostname:
        print(f"{args.target}: no host in the URL (sftp://HOST:PORT)", file=sys.stderr)
        return 2
    key = _run_on_reactor(lambda reactor: host_key(reactor, parts.hostname, port, args.timeout))
    if not hasattr(key, "blob"):
        error = key.value if hasattr(key, "value") else key
        print(str(error) if isinstance(error, SFTPError) else f"sftp://{parts.hostname}:{port}: {error}", file=sys.stderr)
        return 1
    line = known_hosts_line(parts.hostname, port, key)
    pinned = None
    if args.known_hosts:
        refusal = _refusal(SFTPSettings(parts.hostname, port, "", args.known_hosts), key)
        pinned = refusal is None
    if args.format == "json":
        print(json.dumps({"target": f"sftp://{parts.hostname}:{port}", "type": key.sshType().decode(),
                          "fingerprint": fingerprint(key), "known_hosts_line": line, "pinned": pinned}, indent=2))
    else:
        print(f"sftp://{parts.hostname}:{port}")
        print(f"  host key  {key.sshType().decode()} {fingerprint(key)}")
        print(f"  pin it    (after confirming the fingerprint with the server's owner) add to known_hosts:\n    {line}")
        if pinned is not None:
            print(f"  {'pinned in ' + args.known_hosts if pinned else 'NOT pinned: ' + str(refusal)}")
    return 0 if pinned in (None, True) else 1


def _api_destination(args, target) -> int:
    """An http destination: its API's host reached (DNS, TCP, TLS), and its credential's token."""
    from hl7relay.apiclient.http import safe_url
    from hl7relay.ops.check import check_api_destination

    if args.mllp:
        print(f"{target['label']} is an http destination: --mllp does not apply", file=sys.stderr)
        return 2
    config = target["http"]
    steps = _run_on_reactor(lambda reactor: check_api_destination(config, reactor, args.timeout))
    if not isinstance(steps, list):
        print(f"{target['label']}: the check failed: {getattr(steps, 'getErrorMessage', lambda: steps)()}",
              file=sys.stderr)
        return 1
    _print_steps(f"{target['label']}: {config.method} {safe_url(config.url)}", steps, "reachable", args.format,
                 {"target": target["label"], "url": safe_url(config.url)})
    return 0 if all(step.status in ("ok", "warning", "skipped") for step in steps) else 1
