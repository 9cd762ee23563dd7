"""What every HTTP listener of the engine (the admin API, the console, the http source) shares:
request bodies of bounded size.

twisted.web reads a request's whole body (into memory, or a temporary file above 100 KB) before
any resource sees it. A client sending gigabytes to the console's sign-in form or the API would
fill the disk; a :class:`BoundedRequest` answers ``413 Payload Too Large`` and closes the
connection as soon as the declared length, or the bytes actually received, pass the limit.
"""

from __future__ import annotations

from twisted.web import server

__all__ = ["BoundedRequest", "bounded_site", "MAX_BODY_BYTES", "IDLE_TIMEOUT"]

MAX_BODY_BYTES = 1024 * 1024  # forms and API calls are a few KB; a generous ceiling
# An idle connection (no request in progress) is closed after this long: hundreds of idle clients
# cost nothing for long. Twisted suspends it while a request runs, so a live view's stream stays.
IDLE_TIMEOUT = 60.0


class BoundedRequest(server.Request):
    max_body = MAX_BODY_BYTES

    def gotLength(self, length):
        self._received = 0
        if length is not None and length > self.max_body:
            self._too_large()
            length = 0  # nothing of it is kept
        super().gotLength(length)

    def handleContentChunk(self, data):
        self._received = getattr(self, "_received", 0) + len(data)
        if self._received > self.max_body:
            self._too_large()
            return
        super().handleContentChunk(data)

    def _too_large(self):
        if getattr(self, "_refused", False):
            return
        self._refused = True
        transport = self.channel.transport if self.channel is not None else None
        if transport is not None:
            body = f"request body larger than {self.max_body} bytes\n".encode()
            transport.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
                            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            self.channel.loseConnection()


def bounded_site(root) -> server.Site:
    site = server.Site(root)
    site.requestFactory = BoundedRequest
    site.timeOut = IDLE_TIMEOUT
    return site
