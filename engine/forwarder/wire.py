"""What the engine and its forwarder say to each other: length-prefixed pickles over pipes.

Both ends are this program, started by the engine with inherited pipes that nothing else can
reach, so pickle (of plain tuples, bytes and the destinations' config dataclasses) is safe here and
the cheapest encoding there is. Each frame holds a list of messages: what one reactor turn had to
say, written at once. A message is a tuple whose first item says what it is."""

from __future__ import annotations

import os
import pickle
import struct

__all__ = ["encode", "Decoder", "WireError", "MAX_FRAME_BYTES", "write_now"]

MAX_FRAME_BYTES = 256 * 1024 * 1024  # a batch of deliveries; each message is bounded by its listener's max frame
_LENGTH = struct.Struct("!I")


class WireError(Exception):
    """The other end sent something that is not a frame of this protocol."""


def encode(messages: list) -> bytes:
    body = pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


class Decoder:
    """Bytes in, lists of messages out; one buffer, no copy until a frame is complete."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES):
        self._buffer = bytearray()
        self.max_frame_bytes = max_frame_bytes

    def feed(self, data: bytes) -> list:
        buffer = self._buffer
        buffer += data
        out = []
        start = 0
        while len(buffer) - start >= 4:
            (size,) = _LENGTH.unpack_from(buffer, start)
            if size > self.max_frame_bytes:
                raise WireError(f"a frame of {size} bytes (at most {self.max_frame_bytes})")
            if len(buffer) - start - 4 < size:
                break
            out.extend(pickle.loads(bytes(buffer[start + 4:start + 4 + size])))
            start += 4 + size
        if start:
            del buffer[:start]
        return out


def write_now(writer, data: bytes) -> None:
    """Write to a pipe's Twisted writer now when nothing waits in its buffer: one system call.
    Twisted's own write stops watching the pipe for its close and starts again after (two
    ``epoll_ctl``) and sends on the next turn; what the kernel did not take, and any error, still
    take that path, which keeps order and reports errors (as mllp/transport.py does for sockets)."""
    if writer is None:
        return
    if writer.connected and not writer.disconnecting and not writer.dataBuffer and not writer._tempDataBuffer:
        try:
            sent = os.write(writer.fd, data)
        except OSError:  # EAGAIN (full), or an error the writer reports when it tries
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    writer.write(data)
