"""Channels and their controls: enable, disable, pause, resume, retry now, reload."""

from __future__ import annotations

from twisted.internet import defer, threads

from hl7relay.errors import ReadOnlyEnvironment
from hl7relay.ops.support import masked_view

from hl7relay.console.base import ConsoleBase, DONE, HTTPError, _file_and_findings, _target, app, page


class ChannelPages(ConsoleBase):
    @app.route("/channels", methods=["GET"])
    @page("read")
    @defer.inlineCallbacks
    def channels(self, request, session):
        views = []
        for name, channel in sorted(self.controls.channels().items()):
            view = masked_view(self.controls.channel_view(name))
            view["file"] = str(channel.file)
            view["text"], view["findings"] = yield threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), _file_and_findings, channel.file)
            view["configured"] = [{"name": d.name, "type": d.type, "queue": d.config.queue,
                                   "target": _target(d.config)} for d in channel.destinations]
            views.append(view)
        done = DONE.get(self._field(request, "done"))
        return self._render("channels.html", request, session=session, channels=views, active="channels",
                            done=done.format(target=self._field(request, "target")) if done else None,
                            reload_errors=None)

    @app.route("/channels/<channel>/<action>", methods=["POST"])
    @page("control", post=True)
    @defer.inlineCallbacks
    def channel_control(self, request, session, channel, action):
        if action not in ("enable", "disable"):
            raise HTTPError(404, "no such action")
        self._known(channel)
        audit = self._action(request, session, f"channel.{action}", channel)
        if action == "disable" and not audit["reason"]:
            # the PMS's messages stop being accepted: never one stray click, and the log says why
            raise HTTPError(400, "disabling a channel stops accepting its messages: give a reason (it goes to the audit log)")
        if action == "disable" and self._field(request, "confirm") != "1":
            connections = self.controls.channel_view(channel).get("open_connections", 0)
            return self._render(
                "confirm.html", request, session=session, title=f"Disable channel {channel}",
                consequence=f"{channel} stops accepting messages: its listener closes"
                            f"{f' and its {connections} open connection(s) end' if connections else ''}, and the PMS "
                            "keeps (or retries) what it would have sent until the channel is enabled again. Deliveries "
                            "already queued still go out.",
                action=f"/channels/{channel}/disable", fields=[], reason=audit["reason"], button=f"Disable {channel}",
                cancel="/channels", active="channels")
        yield self.controls.set_channel_enabled(channel, action == "enable", audit["actor"], audit)
        return self._back(request, f"channel.{action}", channel)

    @app.route("/channels/<channel>/destinations/<destination>/<action>", methods=["POST"])
    @page("control", post=True)
    @defer.inlineCallbacks
    def destination_control(self, request, session, channel, destination, action):
        if action not in ("pause", "resume", "retry"):
            raise HTTPError(404, "no such action")
        self._known(channel, destination)
        audit = self._action(request, session, f"destination.{action}", f"{channel}/{destination}")
        if action == "retry":
            yield self.controls.retry_now(channel, destination, audit["actor"], audit)
        else:
            try:
                yield self.controls.set_destination_paused(channel, destination, action == "pause", audit["actor"], audit)
            except ReadOnlyEnvironment as exc:
                raise HTTPError(409, str(exc)) from None
        return self._back(request, f"destination.{action}", f"{channel}/{destination}")

    @app.route("/reload", methods=["POST"])
    @page("reload", post=True)
    @defer.inlineCallbacks
    def reload(self, request, session):
        audit = self._action(request, session, "reload", "channels")
        result = yield self.controls.reload_from_files(audit["actor"], audit)
        if "errors" in result:
            request.setResponseCode(422)
            return self._render("error.html", request, 422, status=422, session=session,
                                text="Reload refused, nothing changed: " + "; ".join(result["errors"]))
        return self._back(request, "reload", "channels")
