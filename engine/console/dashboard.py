"""The dashboard: every channel's counters and queues, from memory, live over server-sent events."""

from __future__ import annotations

from hl7relay.ops.support import masked_view

from hl7relay.console.base import ConsoleBase, HTTPError, LiveStream, MAX_STREAMS, app, page


class DashboardPages(ConsoleBase):
    def dashboard_data(self) -> list[dict]:
        """Every channel with its counters and destinations: from memory only (no store read)."""
        status = masked_view(self.controls.status())
        return [dict(view, destinations=sorted(view["destinations"].items())) for _, view in sorted(status["channels"].items())]

    def render_channels(self) -> str:
        """The dashboard's table; rendered at most every half second however many live views are
        open (a hundred open dashboards cost one render a tick, not a hundred, on the ACKing thread)."""
        now = self.clock()
        cached = self._channels_html
        if cached is not None and 0 <= now - cached[0] < 0.5:
            return cached[1]
        html = self.templates.get_template("_channels.html").render(channels=self.dashboard_data(), now=now)
        self._channels_html = (now, html)
        return html

    @app.route("/", methods=["GET"])
    @page("read")
    def dashboard(self, request, session):
        return self._render("dashboard.html", request, session=session, channels_html=self.render_channels(),
                            active="dashboard")

    @app.route("/live/dashboard", methods=["GET"])
    @page("read")
    def live_dashboard(self, request, session):
        if self.streams >= MAX_STREAMS:
            raise HTTPError(503, "too many live views open")
        return LiveStream(self, request, self.render_channels, "channels", session=session).done
