"""MLLP framing, sans-IO: bytes in, frames out.

A frame is ``<VT> payload <FS><CR>``. Bytes outside a frame are discarded (and counted). Inside a
frame a ``<VT>`` or an ``<FS>`` not followed by ``<CR>`` is data, never a boundary. One buffer, a
maximum frame size, and the position where the last search for the end stopped, so a sender that
dribbles a large frame byte by byte costs O(n), not O(n^2).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["START", "END", "MLLPFramer", "Frame", "Discarded", "FrameTooLarge", "frame", "DEFAULT_MAX_FRAME_BYTES"]

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
    """A frame grew past the limit; the connection should be closed."""

    size: int
    limit: int


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
        events: list = []
        view = memoryview(data)
        i = 0
        n = len(data)
        while i < n:
            if not self._in_frame:
                start = data.find(START, i)
                if start == -1:
                    self._discard(events, n - i)
                    break
                if start > i:
                    self._discard(events, start - i)
                self._in_frame = True
                self._buffer.clear()
                self._searched = 0
                i = start + 1
                continue
            # inside a frame: append, then look for <FS><CR> from where the last search stopped
            self._buffer += view[i:]
            i = n
            end = self._buffer.find(END, self._searched)
            if end != -1:
                events.append(Frame(bytes(self._buffer[:end])))
                # what follows the frame is read again from the top, as fresh input
                data = bytes(self._buffer[end + len(END):])
                view = memoryview(data)
                i, n = 0, len(data)
                self._in_frame = False
                self._buffer.clear()
                self._searched = 0
                continue
            # keep one byte back: an <FS> at the very end may pair with a <CR> still to come
            self._searched = max(0, len(self._buffer) - 1)
            if len(self._buffer) > self.max_frame_bytes:
                size = len(self._buffer)
                self._buffer = bytearray()
                self._in_frame = False
                self.broken = True
                events.append(FrameTooLarge(size, self.max_frame_bytes))
                return events
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
