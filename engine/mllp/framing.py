"""MLLP framing, sans-IO: bytes in, frames out.

A frame is ``<VT> payload <FS><CR>``. Bytes outside a frame are discarded (and counted). Inside a
frame a ``<VT>`` or an ``<FS>`` not followed by ``<CR>`` is data, never a boundary. One buffer, a
maximum frame size, and the position where the last search for the end stopped, so a sender that
dribbles a large frame byte by byte costs O(n), not O(n^2).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["START", "END", "MLLPFramer", "Frame", "Discarded", "FrameTooLarge", "frame", "DEFAULT_MAX_FRAME_BYTES", "HEAD_BYTES"]

START = b"\x0b"
END = b"\x1c\x0d"
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Frame:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Discarded:
    """Bytes that arrived outside any frame (their content is not kept)."""

    count: int


@dataclass(frozen=True, slots=True)
class FrameTooLarge:
    """A frame grew past the limit; the connection should be closed.

    ``head`` is the frame's first line (at most :data:`HEAD_BYTES`), kept so that the listener can
    answer AR naming the message, and the sender can tell "too big" from a network fault.
    """

    size: int
    limit: int
    head: bytes = b""


HEAD_BYTES = 8192


def frame(payload: bytes) -> bytes:
    """Wrap one payload in MLLP framing."""
    return START + payload + END


class MLLPFramer:
    """Feed it bytes with :meth:`feed`; it returns the events they complete, in order."""

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()  # the open frame's bytes after <VT>
        self._in_frame = False
        self._searched = 0  # the end marker does not start before this offset of the buffer
        self.discarded_bytes = 0
        self.broken = False  # set after FrameTooLarge: nothing more is accepted

    @property
    def in_frame(self) -> bool:
        """True while a frame has started and not ended (a read timeout applies)."""
        return self._in_frame

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list:
        if self.broken:
            return []
        if not isinstance(data, bytes):
            data = bytes(data)
        events: list = []
        buffer = self._buffer
        limit = self.max_frame_bytes
        i = 0
        n = len(data)
        # Offsets into ``data`` only: a read holding many frames is scanned once, never copied
        # per frame; only a frame still open at the end of the read is kept in the buffer.
        while i < n:
            if not self._in_frame:
                start = data.find(START, i)
                if start == -1:
                    self._discard(events, n - i)
                    break
                if start > i:
                    self._discard(events, start - i)
                self._in_frame = True
                self._searched = 0
                i = start + 1
                continue
            if buffer:
                # this frame began in an earlier read: its <FS> may have ended that read
                if buffer[-1] == 0x1C and data[i] == 0x0D:
                    end, resume = i, i + 1
                    del buffer[-1]
                else:
                    end = data.find(END, i)
                    resume = end + len(END)
                if end == -1:
                    buffer += data[i:]
                    i = n
                elif len(buffer) + end - i > limit:
                    buffer += data[i:end]
                    return self._too_large(events)
                else:
                    buffer += data[i:end]
                    events.append(Frame(bytes(buffer)))
                    buffer.clear()
                    self._in_frame = False
                    i = resume
                    continue
            else:
                end = data.find(END, i)
                if end == -1:
                    buffer += data[i:]
                    i = n
                elif end - i > limit:
                    buffer += data[i:end]
                    return self._too_large(events)
                else:
                    events.append(Frame(data[i:end]))
                    self._in_frame = False
                    i = end + len(END)
                    continue
            # the read ended inside a frame: the next search starts at its last byte
            self._searched = max(0, len(buffer) - 1)
            if len(buffer) > limit:
                return self._too_large(events)
        return events

    def _too_large(self, events: list) -> list:
        buffer = self._buffer
        head = bytes(buffer[:HEAD_BYTES])
        for terminator in (b"\r", b"\n"):
            cut = head.find(terminator)
            if cut != -1:
                head = head[:cut]
        events.append(FrameTooLarge(len(buffer), self.max_frame_bytes, head))
        self._buffer = bytearray()
        self._in_frame = False
        self._searched = 0
        self.broken = True
        return events

    def _discard(self, events: list, count: int) -> None:
        self.discarded_bytes += count
        if events and isinstance(events[-1], Discarded):
            events[-1] = Discarded(events[-1].count + count)
        else:
            events.append(Discarded(count))

    def reset(self) -> None:
        """Drop a half-received frame (after a read timeout) and accept new frames again."""
        self._buffer = bytearray()
        self._in_frame = False
        self._searched = 0
        self.broken = False
