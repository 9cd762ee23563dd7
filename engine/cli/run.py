"""``hl7relay run``: start every enabled channel."""

from __future__ import annotations

import argparse
import sys

from hl7relay.cli._args import number_in, port, seconds
from hl7relay.cli._settings import MAX_WORKERS, add_settings_arguments, resolve_settings

HELP = "run the engine: every enabled channel, with the message store"
DESCRIPTION = """\
Start every enabled channel found in the channel folders. Each message is committed to the store
before its ACK is written; concurrent messages share commits. SIGTERM or Ctrl-C stops accepting,
finishes the messages in flight, flushes the store and exits 0.

Defaults (no edits needed in a checkout): channels from ./channels, SQLite at
./data/hl7relay.db. A config file (--config, or config/hl7relay.yaml when it exists) may set:

  store: {url: "postgresql+psycopg://hl7relay@db/hl7relay"}   # or sqlite:///path.db
  data_dir: data
  channels: [channels]
  log_level: info
  stop_timeout: 10      # seconds a stop waits for the ACKs of deliveries already sent
  forwarding: inline    # or process: destinations served by a forwarder process of their own
  admin: {host: 127.0.0.1, port: 9102}      # /metrics, /healthz, /readyz, /api/v1 (tokens)
  console: {host: 127.0.0.1, port: 9103}    # the web console (users from hl7relay user add)"""


def add_arguments(parser) -> None:
    add_settings_arguments(parser)
    parser.add_argument("--log-level", choices=("trace", "debug", "info", "warn", "error"), help="default: info")
    parser.add_argument("--log-format", choices=("text", "json"), help="default: text")
    parser.add_argument("--admin-port", type=_admin_port, metavar="PORT",
                        help="/metrics, /healthz, /readyz, /api/v1 (default 9102; 0: off; auto: any free port, "
                             "written to DATA_DIR/api-endpoint)")
    parser.add_argument("--admin-host", metavar="HOST", help="default 127.0.0.1")
    parser.add_argument("--console-port", type=_admin_port, metavar="PORT",
                        help="the web console (default 9103; 0: off; auto: any free port)")
    parser.add_argument("--console-host", metavar="HOST",
                        help="default 127.0.0.1; another address needs console tls_cert in the config")
    parser.add_argument("--forwarding", choices=("inline", "process"),
                        help="where destinations are sent from: inline (this process, the default) or process (a "
                             "forwarder process of its own: ACKs never wait behind deliveries)")
    parser.add_argument("--stop-timeout", type=seconds, metavar="SECONDS",
                        help="on SIGTERM, how long to wait for the messages in flight and the ACKs of deliveries "
                             "already sent (default 10)")
    parser.add_argument("--from-files", action="store_true",
                        help="after a rollback (hl7relay config rollback) the engine starts with the configuration "
                             "rolled back to, until a reload applies the files: start with the files instead")
    parser.add_argument("--workers", type=number_in(1, MAX_WORKERS, "", whole=True,
                                                   why=f"1 to {MAX_WORKERS} engine processes"),
                        metavar="N", help="run N engine processes sharing the listeners (PostgreSQL store; each a "
                                          "node of the cluster: NODE_ID-w1, -w2, ...); a dead one is restarted "
                                          "(default: cluster.workers, else 1)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by the supervisor for worker K
    parser.add_argument("--lock-wait", type=seconds, metavar="SECONDS",
                        help="how long to wait for another engine on the same store to stop before refusing to "
                             "start (default 10)")


def _admin_port(text: str):
    """A listener port of the engine's own (admin, console): a number, 0 for off, or auto."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return port(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a port from 1 to 65535, 0 for off, or auto") from None


def run(args) -> int:
    from twisted.internet import defer, reactor

    from hl7relay import __version__
    from hl7relay.channels import load_channels
    from hl7relay.channels.channel import channel_files
    from hl7relay.logs import announce, start_logging
    from hl7relay.controls import Controls
    from hl7relay.runtime import Engine
    from hl7relay.store.database import Store
    from hl7relay.store.writer import StoreWriter

    settings, problems = resolve_settings(args, for_engine=True)
    workers = _workers(args, settings, problems)
    problems += [p for p in (_console_problem(settings["console"]), _cluster_problem(settings)) if p]
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    if not channel_files(settings["channels"]):
        print(f"no channel files in {', '.join(map(str, settings['channels']))}; pass --channels DIR", file=sys.stderr)
        return 1
    channels, errors = load_channels(settings["channels"])
    for error in errors:
        print(error, file=sys.stderr)
    if errors:
        print(f"not starting: {len(errors)} problem{'s' * (len(errors) != 1)} in the channel files (see hl7relay lint)", file=sys.stderr)
        return 1
    enabled = [c for c in channels if c.enabled]
    if not enabled:
        print("no enabled channels", file=sys.stderr)
        return 1
    waiting = [c.name for c in enabled if c.response.when == "after_delivery"]
    if settings.get("cluster") is not None and waiting:
        print(f"not starting: channel {waiting[0]} answers after_delivery, which a cluster does not do yet (the "
              "delivery may be another node's): response: {when: on_store}", file=sys.stderr)
        return 1
    log_levels = start_logging(settings["log_level"], settings["log_format"],
                               {c.name: c.log_level for c in enabled if c.log_level})
    import os

    if workers > 1 and settings["worker"] is None:
        return _supervise(settings, workers)
    if settings["worker"] is not None:
        from hl7relay.sharedports import share_ports

        share_ports()  # the channels' listeners: on the ports the other workers listen on too

    os.umask(0o077)  # what the engine creates (store, WAL, data folder) is readable by its own user only
    from hl7relay.store.lock import StoreLock, StoreLocked

    cluster = settings.get("cluster")
    lock = StoreLock(settings["store"], cluster.node_id if cluster is not None else None)
    try:
        store = Store(settings["store"])
        # one engine per store: a second one would deliver the same queued messages again; one
        # that is stopping (or the forwarder of one that was killed) is waited for
        wait = args.lock_wait if getattr(args, "lock_wait", None) is not None else 10.0
        lock.acquire(wait, on_wait=lambda holder: announce(
            f"waiting up to {wait:g}s for the engine holding the store to stop ({holder})", "waiting_for_store", "warn"))
        version = store.migrate()
    except StoreLocked as exc:
        print(f"not starting: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - any driver error: say it plainly and stop
        lock.release()
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        print(f"cannot open the store {settings['store']}: {detail[0] if detail else exc.__class__.__name__}",
              file=sys.stderr)
        return 1
    if cluster is not None:
        try:
            problem = store.partitions_problem(cluster.node_id, cluster.partitions, cluster.lease_ttl)
        except Exception as exc:  # noqa: BLE001 - the store went away since: said as any store failure
            problem = f"the store did not answer ({exc.__class__.__name__})"
        if problem:
            lock.release()
            print(f"not starting: cluster: {problem}", file=sys.stderr)
            return 1
    pinned = None if getattr(args, "from_files", False) else _rolled_back(store)
    if pinned is not None:
        from hl7relay.snapshots import load_snapshot_channels

        channels, errors = load_snapshot_channels(pinned, settings["channels"])
        for error in errors:
            print(error, file=sys.stderr)
        if errors:
            lock.release()
            print(f"not starting: the configuration rolled back to (snapshot {pinned['id']}) has "
                  f"{len(errors)} problem{'s' * (len(errors) != 1)}; --from-files starts with the channel files",
                  file=sys.stderr)
            return 1
        enabled = [c for c in channels if c.enabled]
    elif settings.get("environment") is not None and settings["environment"].promoted_only:
        from hl7relay.promotion import not_promoted

        problem = not_promoted(settings["channels"], settings["environment"], store)
        if problem:
            lock.release()
            print(f"not starting: {problem}", file=sys.stderr)
            return 1
    from hl7relay.store.database import readable_by_others

    exposed = readable_by_others(settings["store"])
    if exposed:
        announce(f"the store is readable by other users of this machine: {', '.join(exposed)}; "
                 "chmod 600 the files and 700 their folder", "store_exposed", "warn")
    writer = StoreWriter(store, reactor, lazy_delay=0.05)
    forwarder = None
    if settings["forwarding"] == "process":
        from hl7relay.forwarder.parent import ForwarderProcess

        forwarder = ForwarderProcess(writer, {
            "store": settings["store"], "log_level": settings["log_level"], "log_format": settings["log_format"],
            "channel_levels": {c.name: c.log_level for c in enabled if c.log_level}, "engine_pid": os.getpid()},
            reactor, lock_fd=lock.inheritable_fd)
    from hl7relay.ops.trace import Tracer

    from hl7relay.ops.perf import Performance

    engine = Engine(enabled, writer, reactor, data_dir=settings["data_dir"], log_phi_bytes=settings["log_phi_bytes"],
                    log_levels=log_levels, stop_timeout=settings["stop_timeout"], forwarder=forwarder,
                    tracer=Tracer(reactor), channel_paths=settings["channels"],
                    read_only=bool(settings.get("environment") is not None and settings["environment"].read_only),
                    cluster=cluster)
    # what operators reach the engine through (API, console, alerts); the analyzer (the last hour,
    # minute by minute: hl7relay stats) and the alerts are installed beside the engine, not in it
    engine.environment = settings.get("environment")
    controls = Controls(engine, performance=Performance(), environment=settings.get("environment"))
    announce(f"hl7relay {__version__}: store {store.display_url} (schema v{version})", "starting")
    if cluster is not None:
        announce(f"cluster: node {cluster.node_id}, {cluster.partitions} partitions per destination queue, leases "
                 f"{cluster.lease_ttl:g}s renewed every {cluster.lease_renew:g}s", "cluster")
    if settings.get("environment") is not None:
        announce(settings["environment"].describe(), "environment")
        if settings["environment"].read_only:
            announce("read only: every destination holds what it would send (nothing is sent; the console and "
                     "hl7relay messages show it), and SFTP sources leave the files they read on the server",
                     "read_only", "warn")
    engine.settings_file = settings.get("config_file")
    snapshot_id, sha256 = _snapshot(store, settings["channels"], announce, pinned, enabled, engine.settings_file)
    engine.stamp_snapshot(snapshot_id, pinned["from_snapshot"] if pinned else None, pinned["files"] if pinned else None,
                          sha256)
    # the admin and console ports before any channel: one that is taken stops the start (the CLI
    # would otherwise talk to whatever holds it, a stale or another engine)
    problem = _start_admin(controls, settings, reactor, announce) or (
        _start_console(controls, settings["console"], reactor, announce) if settings["console"]["port"] else None)
    if problem:
        print(f"not starting: {problem}", file=sys.stderr)
        lock.release()
        return 1
    from hl7relay.cli._settings import write_engine_file

    # support verbs run elsewhere read the channels we run (a supervisor's workers: it writes it)
    engine_file = write_engine_file(settings) if settings["worker"] is None else None
    if forwarder is not None:
        forwarder.start()
    try:
        lines = engine.start()
    except Exception as exc:  # noqa: BLE001 - e.g. the port is taken
        if engine_file is not None:
            engine_file.unlink(missing_ok=True)
        print(f"cannot start: {exc}", file=sys.stderr)
        if forwarder is not None:  # it stops when its stdin closes
            forwarder.stopping = True
            forwarder.transport.closeStdin()
        writer.close_now()
        lock.release()
        return 1
    for line in lines:
        announce(line, "channel_started")
    controls.performance.install()
    beat = None
    if store.engine.dialect.name == "postgresql":  # the store several engines share: say who runs here
        from hl7relay.nodes import HEARTBEAT_SECONDS, NodeBeat

        def carry_out(command: dict):
            """A cluster's command: reload (the channel files, linted first), answered per node."""
            import json as _json

            if command["command"] != "reload":
                return "refused", f"unknown command {command['command']!r}"
            audit = {"actor": f"cluster:{command['requested_by']}", "source": "cluster", "action": "reload",
                     "target": "channels", "reason": command["reason"]}
            return engine.reload_from_files(f"cluster:{command['requested_by']}", audit).addCallback(
                lambda result: ("refused", "; ".join(result["errors"])) if "errors" in result
                else ("ok", _json.dumps(result)))

        beat = NodeBeat(writer, reactor, lambda: engine.configuration, __version__,
                        interval=cluster.lease_renew if cluster is not None else HEARTBEAT_SECONDS,
                        name=cluster.node_id if cluster is not None else None,
                        partitions=cluster.partitions if cluster is not None else None,
                        on_command=carry_out if cluster is not None else None)
        beat.start().addErrback(lambda failure: announce(f"node not registered: {failure.getErrorMessage()}",
                                                         "node_unregistered", "warn"))
    from hl7relay.ops.alerts import Alerts, AlertSettings

    try:
        controls.alerts = Alerts(controls, AlertSettings.from_config(settings.get("alerts"), reactor)).start()
    except ValueError as exc:  # a notifier that cannot be (a bad URL): the engine runs, it says so
        print(f"warning: alerts not started: {exc}", file=sys.stderr)
    stopped = {"clean": True}

    @defer.inlineCallbacks
    def shutdown():
        announce(f"stopping: no new messages; finishing those in flight (up to {engine.stop_timeout:g}s)", "stopping")
        if controls.alerts is not None:
            controls.alerts.stop()  # a stopping engine's queues are not an outage
        if beat is not None:
            yield beat.stop()
        try:
            report = yield engine.stop()
        except Exception:  # noqa: BLE001
            stopped["clean"] = False
            raise
        announce(report.describe(), "stopped")

    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    import signal

    from twisted.logger import Logger

    def hangup(signum, frame):
        # SIGHUP reloads the channel files (lint first: on any problem nothing changes)
        from hl7relay.ops.auth import os_actor

        audit = {"actor": "signal:SIGHUP", "source": os_actor(), "action": "reload", "target": "channels"}
        reactor.callFromThread(lambda: engine.reload_from_files("SIGHUP", audit).addErrback(
            lambda failure: Logger(namespace="hl7relay.run").failure("reload failed", failure)))

    signal.signal(signal.SIGHUP, hangup)
    # "ready" only once the reactor runs, so its SIGTERM/SIGINT handlers (the graceful stop) are in place
    reactor.callWhenRunning(announce, "ready; Ctrl-C or SIGTERM stops", "ready")
    if settings["worker"] is not None:
        from hl7relay.workers import say_ready, watch_parent

        reactor.callWhenRunning(say_ready)
        watch_parent(reactor, lambda: reactor.running and reactor.stop())  # the supervisor is gone: stop
    reactor.run()
    if engine_file is not None:
        engine_file.unlink(missing_ok=True)
    lock.release()
    return 0 if stopped["clean"] else 1


def _start_admin(controls, settings: dict, reactor, announce) -> str | None:
    """Start the admin listener (metrics, health, the operations API); why it could not, or None."""
    admin = settings["admin"]
    if admin["port"]:
        from hl7relay.ops.admin import start_admin
        from hl7relay.metrics import Metrics

        try:
            from hl7relay.ops.api import read_local_token, write_endpoint, write_local_token

            # the CLI on this host reaches the API with it (hl7relay channel / destination ...); a
            # supervisor's workers share the one it wrote, so the CLI reaches any of them
            local_token = read_local_token(settings["data_dir"]) if settings.get("worker") else \
                write_local_token(settings["data_dir"])
            from hl7relay.mllp.tls import TLSConfig

            tls = None
            if admin.get("tls_cert"):
                tls = TLSConfig(admin["tls_cert"], admin.get("tls_key"), admin.get("tls_ca"),
                                require_client_cert=bool(admin.get("require_client_cert")))
            environment = settings.get("environment")
            site = start_admin(controls, Metrics(environment=environment.name if environment else "").install(), admin["host"],
                               0 if admin["port"] == "auto" else int(admin["port"]), reactor, local_token, tls)
            scheme = "https" if tls else "http"
            if settings.get("worker") in (None, 1):  # the CLI talks to the first worker
                write_endpoint(settings["data_dir"], admin["host"], site.getHost().port, scheme)
            announce(f"admin: {scheme}://{admin['host']}:{site.getHost().port}/metrics, /healthz, /readyz, /api/v1/"
                     + (" (TLS" + (", client certificates required)" if tls.require_client_cert else ")") if tls else ""),
                     "admin_started")
        except Exception as exc:  # noqa: BLE001 - a taken port, a bad certificate: the start stops
            return f"admin endpoints cannot start on {admin['host']}:{admin['port']}: {exc}"
    return None


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _console_problem(console: dict) -> str | None:
    """Why the engine must not start with this console setting (plain HTTP off loopback), or None."""
    import ipaddress

    host = console["host"]
    try:
        loopback = host in _LOOPBACK or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if console["port"] and not console.get("tls_cert") and not loopback and not console.get("allow_insecure_remote"):
        return (f"not starting: the console would serve plain HTTP on {host}, off this machine; set console tls_cert "
                "and tls_key in the config (or allow_insecure_remote: true if something else encrypts it), "
                "or --console-port 0")
    return None


def _start_console(controls, console: dict, reactor, announce) -> str | None:
    """Start the web console on the engine's reactor; why it could not, or None."""
    host = console["host"]
    try:
        from hl7relay.console.app import Console
        from hl7relay.webserver import bounded_site

        app = Console(controls, reactor, tls=bool(console.get("tls_cert")), idle=console["idle_timeout"],
                      absolute=console["absolute_timeout"])
        site = bounded_site(app.resource())
        site.noisy = False
        site.log = lambda request: None  # sign-ins, reveals and actions are in the audit log; pages are not logged
        port = 0 if console["port"] == "auto" else int(console["port"])
        if console.get("tls_cert"):
            from hl7relay.mllp.tls import TLSConfig, server_options

            listening = reactor.listenSSL(port, site, server_options(TLSConfig(console["tls_cert"], console.get("tls_key"))),
                                          interface=host)
            scheme = "https"
        else:
            listening = reactor.listenTCP(port, site, interface=host)
            scheme = "http"
        shown = f"[{host}]" if ":" in host else host
        announce(f"console: {scheme}://{shown}:{listening.getHost().port}/", "console_started")
    except Exception as exc:  # noqa: BLE001 - a taken port, a bad certificate: the start stops
        return f"the console cannot start on {host}:{console['port']}: {exc}"
    return None


WORKER_PORT_STRIDE = 100  # worker K's admin listener: the admin port + 100 x (K - 1): 9102, 9202, 9302...


def _workers(args, settings: dict, problems: list) -> int:
    """How many engine processes run (--workers, else cluster.workers); for worker K (--worker K,
    given by the supervisor) its own node id and admin port, and no console but the first's."""
    cluster = settings.get("cluster")
    count = getattr(args, "workers", None) or (cluster.workers if cluster is not None else 1)
    worker = settings["worker"] = getattr(args, "worker", None)
    if count == 1 and worker is None:
        return count
    if cluster is None and not str(settings["store"]).startswith("postgresql"):
        problems.append(f"--workers {count}: the workers share a PostgreSQL store (store: {{url: "
                        "postgresql+psycopg://USER@HOST/DB}); several processes cannot share a SQLite file")
        return count
    import dataclasses
    import socket

    from hl7relay.cluster import ClusterSettings
    from hl7relay.workers import worker_node_id

    # --workers alone: the host's workers make a cluster of their own, on the defaults
    cluster = dataclasses.replace(cluster or ClusterSettings(socket.gethostname()), workers=count)
    if worker is not None:
        if not 1 <= worker <= count:
            problems.append(f"--worker {worker}: 1 to {count}")
            return count
        cluster = dataclasses.replace(cluster, node_id=worker_node_id(cluster.node_id, worker))
        admin = settings["admin"]
        if isinstance(admin["port"], int) and admin["port"] and worker > 1:
            admin["port"] += WORKER_PORT_STRIDE * (worker - 1)
        if worker > 1:
            settings["console"]["port"] = 0
    elif isinstance(settings["admin"]["port"], int) and settings["admin"]["port"] and \
            settings["admin"]["port"] + WORKER_PORT_STRIDE * (count - 1) > 65535:
        problems.append(f"--workers {count}: worker {count}'s admin port would be "
                        f"{settings['admin']['port'] + WORKER_PORT_STRIDE * (count - 1)} (the admin port + "
                        f"{WORKER_PORT_STRIDE} for each worker after the first); choose a lower admin port")
    settings["cluster"] = cluster
    return count


def _supervise(settings: dict, count: int) -> int:
    """Run ``count`` workers (hl7relay run --worker K) and keep them running until SIGTERM."""
    from twisted.internet import reactor

    from hl7relay.cli._settings import write_engine_file
    from hl7relay.logs import announce
    from hl7relay.workers import Supervisor, worker_node_id

    cluster = settings["cluster"]
    if settings["admin"]["port"]:
        from hl7relay.ops.api import write_local_token

        write_local_token(settings["data_dir"])  # one token for the CLI, whichever worker it reaches
    arguments, skip = [], False
    for argument in sys.argv[1:]:  # the supervisor's own arguments, less its --workers
        if skip:
            skip = False
        elif argument == "--workers":
            skip = True
        elif not argument.startswith("--workers="):
            arguments.append(argument)

    def argv(number: int) -> list[str]:
        return [sys.executable, "-m", "hl7relay", *arguments, "--workers", str(count), "--worker", str(number)]

    supervisor = Supervisor(reactor, count, argv, cluster.node_id, announce, settings["stop_timeout"])
    nodes = ", ".join(worker_node_id(cluster.node_id, n) for n in range(1, count + 1))
    admin = settings["admin"]["port"]
    ports = (f"; their admin listeners on {', '.join(str(admin + WORKER_PORT_STRIDE * n) for n in range(count))}"
             if isinstance(admin, int) and admin else "")
    announce(f"workers: starting {count} engine processes on the shared listeners (nodes {nodes}){ports}", "workers")
    engine_file = write_engine_file(settings)
    outcome = {"clean": True}

    def ready(_):
        announce(f"ready: {count} workers; Ctrl-C or SIGTERM stops", "ready")

    def failed(failure):
        outcome["clean"] = False
        announce(f"not starting: {failure.getErrorMessage()}; the others were stopped", "workers_failed", "error")
        if reactor.running:
            reactor.stop()

    def shutdown():
        if not supervisor.stopping:
            announce(f"stopping: {count} workers finish their messages in flight (up to "
                     f"{settings['stop_timeout']:g}s)", "stopping")
        return supervisor.stop().addCallback(lambda _: announce(
            "stopped: every worker stopped" if supervisor.clean() else
            "stopped: " + ", ".join(f"worker {w['worker']} {w['last_exit']}" for w in supervisor.view()), "stopped"))

    import signal

    def hangup(signum, frame):  # SIGHUP: each worker reloads the channel files
        for worker in supervisor.workers:
            reactor.callFromThread(supervisor.send_signal, worker, signal.SIGHUP)

    signal.signal(signal.SIGHUP, hangup)
    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    reactor.callWhenRunning(lambda: supervisor.start().addCallbacks(ready, failed))
    reactor.run()
    engine_file.unlink(missing_ok=True)
    return 0 if outcome["clean"] and supervisor.clean() else 1


def _cluster_problem(settings: dict) -> str | None:
    cluster = settings.get("cluster")
    if cluster is None:
        return None
    if not str(settings["store"]).startswith("postgresql"):
        return ("cluster: needs a PostgreSQL store (store: {url: postgresql+psycopg://USER@HOST/DB}); several "
                "engines cannot share a SQLite file")
    if settings["forwarding"] == "process":
        return "cluster: forwarding: process is not supported in a cluster yet (forwarding: inline)"
    return None


def _rolled_back(store) -> dict | None:
    """The snapshot to start with when the engine was rolled back and no reload has applied the
    files since (the newest snapshot re-applies a stored one), in the environment it runs in."""
    from hl7relay.yamlsource import current_environment

    try:
        newest = store.snapshot()
    except Exception:  # noqa: BLE001 - no snapshots readable: the files, as before
        return None
    if newest is None or newest.get("from_snapshot") is None or newest["environment"] != current_environment()[0]:
        return None
    return newest


def _snapshot(store, paths, announce, pinned: dict | None = None, channels=(), settings_file=None) -> tuple:
    """What the engine starts with, recorded (hl7relay config history); a failure is said, not fatal."""
    import time

    from hl7relay.ops.auth import os_actor
    from hl7relay.snapshots import reapplied, take_snapshot

    try:
        if pinned is not None:
            snapshot = reapplied(pinned, os_actor(), "start", pinned.get("note") or "", time.time())
            snapshot.from_snapshot = pinned["from_snapshot"]
        else:
            snapshot = take_snapshot(paths, os_actor(), "start", time.time(), channels=channels,
                                     settings_file=settings_file)
        snapshot_id = store.record_snapshot(snapshot)
    except Exception as exc:  # noqa: BLE001 - the engine runs without its record; it says so
        print(f"warning: the configuration snapshot was not recorded: {exc}", file=sys.stderr)
        return None, ""
    git = f", git {snapshot.git_commit[:12]}{' with changes' if snapshot.git_dirty else ''}" if snapshot.git_commit else ""
    announce(f"configuration: snapshot {snapshot_id} ({len(snapshot.files)} files, sha256 {snapshot.sha256[:12]}{git})",
             "snapshot")
    if pinned is not None:
        announce(f"configuration: rolled back to snapshot {pinned['from_snapshot']}, not the channel files "
                 "(hl7relay reload applies the files; hl7relay status says whether they differ)", "rolled_back", "warn")
    return snapshot_id, snapshot.source_sha256  # what the nodes of a cluster compare (drift)
