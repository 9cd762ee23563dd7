"""Talking to other systems' HTTP APIs (issue #27): what an answer means for a delivery
(:mod:`~hl7relay.apiclient.responses`), and, next, tokens and the ``http`` destination."""
