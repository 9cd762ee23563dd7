"""The web console: dashboard, message browser, channel controls; served by the engine's reactor.

See :mod:`hl7relay.console.app` for its pages and its security (sessions, CSRF, headers)."""
