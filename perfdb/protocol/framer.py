"""The line framer: bytes in, request lines and framing errors out, with no transport and no event loop.

Lines end with LF; a CR directly before it is dropped, and empty lines are skipped. A line longer
than the limit is never returned, even in part: it becomes one LINE_TOO_LONG in its place, whether
it is complete or an unterminated tail that has already outgrown the limit (protocol_spec.md 1.2).
"""

from __future__ import annotations

import enum


class FramingError(enum.Enum):
    """What the framer found in place of a line."""

    LINE_TOO_LONG = "line_too_long"


Frame = bytes | FramingError


class LineFramer:
    """Cuts a byte stream into lines, holding at most max_line_bytes + 1 bytes of an unfinished one."""

    __slots__ = ("_buffer", "_discarding", "_ended_line", "_max_line_bytes")

    def __init__(self, max_line_bytes: int) -> None:
        self._max_line_bytes = max_line_bytes
        self._buffer = bytearray()
        self._discarding = False  # inside an over-long line, dropping bytes up to its LF
        self._ended_line = False

    @property
    def ended_line(self) -> bool:
        """Whether the last feed_data ended a line (an over-long one too), so that the unfinished
        line now held, if any, began in that feed."""
        return self._ended_line

    @property
    def has_partial_line(self) -> bool:
        """A line has begun and its LF has not arrived yet (also while discarding an over-long one)."""
        return bool(self._buffer) or self._discarding

    def feed_data(self, data: bytes) -> list[Frame]:
        """Take the next bytes of the stream; return the lines (LF and CR stripped) and framing
        errors they complete, in stream order."""
        self._ended_line = False
        if self._discarding:
            newline = data.find(b"\n")
            if newline < 0:
                return []
            data = data[newline + 1 :]
            self._discarding = False
            self._ended_line = True
        buffer = self._buffer
        buffer += data
        limit = self._max_line_bytes
        frames: list[Frame] = []
        start = 0
        while True:
            newline = buffer.find(b"\n", start)
            if newline < 0:
                break
            end = newline - 1 if newline > start and buffer[newline - 1] == 0x0D else newline
            if end - start > limit:
                frames.append(FramingError.LINE_TOO_LONG)
            elif end > start:
                frames.append(bytes(buffer[start:end]))
            start = newline + 1
        if start:
            del buffer[:start]
            self._ended_line = True
        # The unterminated tail counts against the limit too (one spare byte for a CR): answer
        # it now and drop the rest of the line as it arrives, rather than buffer it.
        if len(buffer) > limit + 1:
            buffer.clear()
            self._discarding = True
            frames.append(FramingError.LINE_TOO_LONG)
        return frames

    def clear(self) -> None:
        """Forget the unfinished line: the stream ended or will not be read any further."""
        self._buffer.clear()
        self._discarding = False
