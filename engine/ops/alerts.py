"""Alerts without Prometheus: the engine watches itself and says so.

The conditions are those of ``config/prometheus/hl7relay-alerts.yml``, evaluated by the engine
every ``evaluate_every`` seconds from what it holds in memory (its queues, the performance
analyzer's last minutes, the store writer's state):

=========================  ========================================================  ========
rule                       fires when                                                for
=========================  ========================================================  ========
HL7RelayQueueStuck         a destination's oldest queued message > ``queue_age`` s    5 min
HL7RelayQueueGrowing       a destination's queue > ``queue_depth`` deliveries         10 min
HL7RelayDestinationDown    an MLLP destination's last attempt did not reach it       5 min
HL7RelayErrorRate          > ``error_rate`` of a channel's messages (10 min) ERROR    10 min
HL7RelayDeadLetters        deliveries went to ERROR in the last 15 minutes           at once
HL7RelayStoreFailing       the store refuses writes (messages answered AR)           at once
HL7RelaySlowAcks           a channel's p99 ACK latency (5 min) > ``slow_ack`` s       10 min
HL7RelayFileMissing        a file source's ``expect:`` file has not come in time     at once
HL7RelayLeaseChurn         a cluster node's leases changed > 20 times in 10 min      at once
=========================  ========================================================  ========

An alert is *pending* while its condition holds for less than its "for", then *firing*: notified
once (by webhook and/or e-mail), again every ``repeat_every`` seconds while it lasts, and once more
when it *resolves*. An operator may silence a rule (for a channel or destination, or everywhere)
for a while: it still shows, nobody is notified; silences are audited by the caller. No alert
carries message content: channel and destination names, counts and times only.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from twisted.logger import Logger

from hl7relay import events

__all__ = ["Alerts", "AlertSettings", "RULES", "Alert"]

log = Logger(namespace="hl7relay.alerts")


@dataclass(slots=True, frozen=True)
class Rule:
    name: str
    severity: str  # page or warn, as in the Prometheus rules
    for_seconds: float
    scope: str  # destination, channel
    summary: str  # str.format with channel, destination, value


RULES = (
    Rule("HL7RelayQueueStuck", "page", 300, "destination",
         "{channel} -> {destination}: the oldest queued message is {value:.0f}s old"),
    Rule("HL7RelayQueueGrowing", "warn", 600, "destination", "{channel} -> {destination}: {value:.0f} deliveries queued"),
    Rule("HL7RelayDestinationDown", "page", 300, "destination", "{channel} -> {destination} cannot be reached"),
    Rule("HL7RelayErrorRate", "warn", 600, "channel", "{channel}: {value:.0%} of messages end in ERROR"),
    Rule("HL7RelayDeadLetters", "warn", 0, "destination",
         "{channel} -> {destination}: {value:.0f} deliveries went to ERROR in 15 minutes (replay them with hl7relay replay)"),
    Rule("HL7RelayStoreFailing", "page", 0, "channel", "{channel}: messages cannot be stored and are being rejected (AR)"),
    Rule("HL7RelaySlowAcks", "warn", 600, "channel", "{channel}: p99 ACK latency {value:.2f}s"),
    Rule("HL7RelayNotAuthorised", "page", 0, "destination",
         "{channel} -> {destination}: the API refused our credentials; its queue is held (nothing is lost: fix the "
         "credentials, then hl7relay destination resume {channel} {destination})"),
    Rule("HL7RelayRateLimited", "warn", 600, "destination",
         "{channel} -> {destination}: rate limited by the API for {value:.0f}s (it keeps answering 429/503)"),
    Rule("HL7RelayFileMissing", "page", 0, "channel",
         "{channel}: the file due {value:.0f}s ago has not come (its source's expect:; hl7relay files)"),
    Rule("HL7RelayLeaseChurn", "warn", 0, "channel",
         "{channel}: this node's leases changed {value:.0f} times in 10 minutes (nodes coming and going, or a "
         "database too slow for lease_renew: hl7relay status)"),
)
LEASE_CHURN = 20  # lease changes of one node in 10 minutes: more is not a rebalance, it is ping-pong
_RULES = {rule.name: rule for rule in RULES}


@dataclass(slots=True)
class AlertSettings:
    evaluate_every: float = 15.0
    repeat_every: float = 4 * 3600.0
    queue_age: float = 600.0
    queue_depth: int = 1000
    error_rate: float = 0.05
    slow_ack: float = 0.5
    hold: dict = field(default_factory=dict)  # rule -> seconds its condition must hold (default: the rule's "for")
    notifiers: list = field(default_factory=list)  # objects with notify(alert: dict, status: str) -> Deferred

    @classmethod
    def from_config(cls, config: dict | None, reactor=None) -> "AlertSettings":
        """From the checked ``alerts:`` section of the engine settings (None: the defaults, no notifiers)."""
        if not config:
            return cls()
        from hl7relay.ops.notify import EmailNotifier, WebhookNotifier

        notifiers = []
        hook = config.get("webhook")
        if hook:
            notifiers.append(WebhookNotifier(hook["url"], hook.get("headers") or {}, hook["timeout"], reactor, hook["tls_ca"]))
        mail = config.get("email")
        if mail:
            notifiers.append(EmailNotifier(mail["host"], mail["port"], mail["from"], mail["to"], mail["channels"] or {},
                                           mail["security"], mail["username"], mail["password"], mail["timeout"],
                                           reactor, mail["tls_ca"]))
        return cls(config["evaluate_every"], config["repeat_every"], config["queue_age"], config["queue_depth"],
                   config["error_rate"], config["slow_ack"], dict(config.get("hold") or {}), notifiers)


@dataclass(slots=True)
class Alert:
    rule: str
    channel: str
    destination: str | None
    state: str  # pending, firing, resolved
    since: float  # when the condition began to hold
    value: float = 0.0
    fired_at: float | None = None
    resolved_at: float | None = None
    notified_at: float | None = None

    @property
    def key(self) -> tuple:
        return self.rule, self.channel, self.destination

    def view(self, silenced_until: float | None) -> dict:
        rule = _RULES[self.rule]
        return {"rule": self.rule, "severity": rule.severity, "channel": self.channel, "destination": self.destination,
                "state": self.state, "since": self.since, "fired_at": self.fired_at, "resolved_at": self.resolved_at,
                "value": self.value, "summary": rule.summary.format(channel=self.channel, destination=self.destination,
                                                                    value=self.value),
                "silenced_until": silenced_until}


class Alerts:
    """Evaluates the rules against the running engine, through its ``controls`` (its queues, the
    performance analyzer, its store writer)."""

    def __init__(self, controls, settings: AlertSettings | None = None, clock=None):
        self.controls = controls
        self.settings = settings or AlertSettings()
        self.clock = clock or controls.reactor.seconds
        self.alerts: dict[tuple, Alert] = {}
        self.resolved: deque = deque(maxlen=100)  # recently resolved, for the console and status
        self.silences: dict[tuple, dict] = {}  # (rule, channel or None, destination or None) -> {until, actor, reason}
        self._store_failures: dict[str, deque] = {}
        self._lease_changes: deque = deque(maxlen=1000)  # when this node's leases changed (a cluster's)
        self._loop = None
        self.notifications_sent = 0
        self.notifications_failed = 0

    # -- running -------------------------------------------------------------------------------------
    def start(self) -> "Alerts":
        from twisted.internet import task

        events.subscribe(self._observe, events=("store_failed", "lease_changed"))
        self._loop = task.LoopingCall(self.evaluate)
        self._loop.clock = self.controls.reactor
        self._loop.start(self.settings.evaluate_every, now=False)
        return self

    def stop(self) -> None:
        events.unsubscribe(self._observe)
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _observe(self, event: str, fields: dict) -> None:
        if event == "store_failed":
            self._store_failures.setdefault(fields["channel"], deque(maxlen=1000)).append(self.clock())
        elif event == "lease_changed":
            self._lease_changes.append(self.clock())

    # -- conditions ------------------------------------------------------------------------------------
    def conditions(self, now: float) -> dict[tuple, float]:
        """Every rule's condition that holds now: (rule, channel, destination) -> its value."""
        s, holding = self.settings, {}
        queues: dict[str, list] = {name: [] for name in self.controls.channel_names()}
        for name, destination, view in self.controls.queue_views():
            queues[name].append((destination, view))
        for name, views in queues.items():
            for destination, view in views:
                if (view.get("oldest_age") or 0) > s.queue_age:
                    holding[("HL7RelayQueueStuck", name, destination)] = view["oldest_age"]
                if view.get("depth", 0) > s.queue_depth:
                    holding[("HL7RelayQueueGrowing", name, destination)] = view["depth"]
                if view.get("connected") is False and not view.get("paused"):
                    holding[("HL7RelayDestinationDown", name, destination)] = 0.0
                if view.get("held"):
                    holding[("HL7RelayNotAuthorised", name, destination)] = 0.0
                if view.get("rate_limited_since") is not None:
                    holding[("HL7RelayRateLimited", name, destination)] = max(0.0, now - view["rate_limited_since"])
            failures = self._store_failures.get(name)
            recent = sum(1 for at in failures if at > now - 300) if failures else 0
            if recent or getattr(self.controls.writer, "commit_failure", None):
                holding[("HL7RelayStoreFailing", name, None)] = float(recent)
        for name, view in self.controls.source_views().items():
            if view.get("missing_since") is not None:
                holding[("HL7RelayFileMissing", name, None)] = now - view["missing_since"]
        churn = sum(1 for at in self._lease_changes if at > now - 600)
        if churn > LEASE_CHURN:
            holding[("HL7RelayLeaseChurn", "cluster", None)] = float(churn)
        performance = self.controls.performance
        if performance is not None:
            for name, c in performance.view(10)["channels"].items():
                if c["messages"] >= 5 and c["errors"] / c["messages"] > s.error_rate:
                    holding[("HL7RelayErrorRate", name, None)] = c["errors"] / c["messages"]
            for name, c in performance.view(5)["channels"].items():
                p99 = c["ack_ms"]["p99"]
                if p99 is not None and p99 / 1000 > s.slow_ack:
                    holding[("HL7RelaySlowAcks", name, None)] = p99 / 1000
            for d in performance.view(15)["destinations"]:
                if d["failed"]:
                    holding[("HL7RelayDeadLetters", d["channel"], d["destination"])] = float(d["failed"])
        return holding

    def evaluate(self) -> list[tuple[str, dict]]:
        """One round: pending alerts whose time has come fire, alerts whose condition ended
        resolve; the notifications due go out. Returns them as (status, alert view)."""
        now = self.clock()
        holding = self.conditions(now)
        due = []
        for key, value in holding.items():
            alert = self.alerts.get(key)
            if alert is None:
                alert = self.alerts[key] = Alert(key[0], key[1], key[2], "pending", now, value)
            alert.value = value
            rule = _RULES[alert.rule]
            if alert.state == "pending" and now - alert.since >= self.settings.hold.get(rule.name, rule.for_seconds):
                alert.state, alert.fired_at = "firing", now
                log.warn("alert firing: {summary}", summary=alert.view(None)["summary"], alert=alert.rule,
                         channel=alert.channel, destination=alert.destination)
                due.append(("firing", alert))
            elif alert.state == "firing" and alert.notified_at is not None and \
                    now - alert.notified_at >= self.settings.repeat_every:
                due.append(("firing", alert))
        for key in [k for k in self.alerts if k not in holding]:
            alert = self.alerts.pop(key)
            if alert.state == "firing":
                alert.state, alert.resolved_at = "resolved", now
                self.resolved.append(alert)
                log.info("alert resolved: {rule} {channel} {destination}", rule=alert.rule, channel=alert.channel,
                         destination=alert.destination or "")
                if alert.notified_at is not None:  # a resolved notice only for what was told as firing
                    due.append(("resolved", alert))
        sent = []
        for status, alert in due:
            silenced = self.silenced_until(alert, now)
            view = alert.view(silenced)
            if silenced is None:
                alert.notified_at = now
                self._notify(view, status)
            sent.append((status, view))
        return sent

    def _notify(self, view: dict, status: str) -> None:
        for notifier in self.settings.notifiers:
            try:
                d = notifier.notify(view, status)
            except Exception:  # noqa: BLE001 - a broken notifier must not stop the evaluation
                log.failure("alert notification by {notifier} failed", notifier=type(notifier).__name__)
                self.notifications_failed += 1
                continue

            def done(_, notifier=notifier):
                self.notifications_sent += 1

            def failed(failure, notifier=notifier):
                self.notifications_failed += 1
                log.error("alert notification by {notifier} failed: {error}", notifier=getattr(notifier, "label", "?"),
                          error=failure.getErrorMessage())

            d.addCallbacks(done, failed)

    # -- silences --------------------------------------------------------------------------------------
    def silenced_until(self, alert: Alert, now: float) -> float | None:
        for key in ((alert.rule, alert.channel, alert.destination), (alert.rule, alert.channel, None),
                    (alert.rule, None, None)):
            silence = self.silences.get(key)
            if silence is not None:
                if silence["until"] > now:
                    return silence["until"]
                del self.silences[key]
        return None

    def silence(self, rule: str, channel: str | None, destination: str | None, seconds: float, actor: str,
                reason: str) -> dict:
        if rule not in _RULES:
            raise ValueError(f"no alert rule {rule!r}; rules: {', '.join(_RULES)}")
        if destination is not None and channel is None:
            raise ValueError("a destination is silenced with its channel")
        if not 60 <= seconds <= 7 * 86400:
            raise ValueError("a silence lasts 1 minute to 7 days")
        if not reason.strip():
            raise ValueError("a silence needs a reason (it is written to the audit log)")
        until = self.clock() + seconds
        self.silences[(rule, channel, destination)] = entry = {
            "rule": rule, "channel": channel, "destination": destination, "until": until, "actor": actor, "reason": reason}
        return dict(entry)

    def unsilence(self, rule: str, channel: str | None, destination: str | None) -> bool:
        return self.silences.pop((rule, channel, destination), None) is not None

    # -- reading -----------------------------------------------------------------------------------
    def view(self) -> dict:
        now = self.clock()
        for key in [k for k, s in self.silences.items() if s["until"] <= now]:
            del self.silences[key]
        order = {"firing": 0, "pending": 1}
        active = sorted(self.alerts.values(), key=lambda a: (order[a.state], _RULES[a.rule].severity != "page", a.since))
        return {"alerts": [a.view(self.silenced_until(a, now)) for a in active],
                "resolved": [a.view(None) for a in reversed(self.resolved) if now - a.resolved_at < 3600],
                "silences": list(self.silences.values()),
                "notifiers": [getattr(n, "label", type(n).__name__) for n in self.settings.notifiers],
                "notifications": {"sent": self.notifications_sent, "failed": self.notifications_failed},
                "rules": [{"rule": r.name, "severity": r.severity, "for_seconds": r.for_seconds} for r in RULES]}
