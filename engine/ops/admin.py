"""The admin HTTP endpoints: ``/metrics`` (Prometheus), ``/healthz`` (the process is up),
``/readyz`` (listeners bound, the store reachable and, after a failed commit, writable again) and
the operations API under ``/api/v1/`` (hl7relay.ops.api; it needs a token). Bound to 127.0.0.1 unless told otherwise."""

from __future__ import annotations

from twisted.internet import defer
from twisted.web import resource, server

from hl7relay.metrics import Metrics

__all__ = ["AdminSite", "start_admin"]


class _Metrics(resource.Resource):
    isLeaf = True

    def __init__(self, metrics: Metrics):
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request):
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return self.metrics.render()


class _Health(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"ok\n"


class _Ready(resource.Resource):
    isLeaf = True

    def __init__(self, controls, timeout: float = 5.0):
        super().__init__()
        self.controls = controls
        self.timeout = timeout

    def render_GET(self, request):
        d = self.check()

        def answer(problems):
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            if problems:
                request.setResponseCode(503)
                request.write(("not ready: " + "; ".join(problems) + "\n").encode())
            else:
                request.write(b"ready\n")
            request.finish()

        d.addCallback(answer)
        return server.NOT_DONE_YET

    @defer.inlineCallbacks
    def check(self):
        problems = []
        controls = self.controls
        if not controls.started:
            problems.append("the engine is starting")
        elif controls.stopping:
            problems.append("the engine is stopping")
        unbound = controls.unbound_channels()
        if unbound:
            problems.append("listeners not bound: " + ", ".join(unbound))
        ping = controls.writer.read(controls.writer.store.ping)
        ping.addTimeout(self.timeout, controls.reactor)
        try:
            yield ping
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            problems.append(f"store unreachable: {type(exc).__name__}")
        else:
            # reachable is not enough: a full disk still reads; ready again once a write succeeds
            if controls.writer.commit_failure is not None:
                failure = yield controls.writer.probe()
                if failure is not None:
                    problems.append(f"store cannot commit: {failure}")
        return problems


class AdminSite(server.Site):
    noisy = False

    def log(self, request):
        """No access log: Prometheus scrapes would fill it, and API actions are in the audit log."""

    def __init__(self, controls, metrics: Metrics, local_token: str | None = None):
        from hl7relay.ops.api import ApiResource

        root = resource.Resource()
        root.putChild(b"metrics", _Metrics(metrics))
        root.putChild(b"healthz", _Health())
        root.putChild(b"readyz", _Ready(controls))
        root.putChild(b"api", ApiResource(controls, local_token))
        super().__init__(root)
        from hl7relay.webserver import IDLE_TIMEOUT, BoundedRequest

        self.requestFactory = BoundedRequest  # request bodies of bounded size (webserver.py)
        self.timeOut = IDLE_TIMEOUT  # idle connections closed


def start_admin(controls, metrics: Metrics, host: str, port: int, reactor, local_token: str | None = None, tls=None):
    """Listen for the admin endpoints; with ``tls`` (a TLSConfig) over TLS, mutual TLS when it
    requires client certificates."""
    site = AdminSite(controls, metrics, local_token)
    if tls is not None:
        from hl7relay.mllp.tls import server_options

        return reactor.listenSSL(port, site, server_options(tls), interface=host)
    return reactor.listenTCP(port, site, interface=host)
