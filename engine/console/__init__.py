"""The web console: dashboard, message browser, channel controls; served by the engine's reactor.

See :mod:`hl7relay.console.base` for what every page shares and its security (sessions, CSRF,
headers), and the page modules beside it (signin, dashboard, messages, accounts, channels,
troubleshooting)."""
