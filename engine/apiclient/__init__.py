"""Talking to other systems' HTTP APIs (issue #27): credentials named in the settings and their
token caches (:mod:`~hl7relay.apiclient.credentials`, :mod:`~hl7relay.apiclient.tokens`,
:mod:`~hl7relay.apiclient.oauth`), one request and its answer (:mod:`~hl7relay.apiclient.http`),
what an answer means for a delivery (:mod:`~hl7relay.apiclient.responses`) and a rate limit
(:mod:`~hl7relay.apiclient.ratelimit`). The ``http`` destination that uses them is a channel
component (hl7relay.channels.http_destination)."""
