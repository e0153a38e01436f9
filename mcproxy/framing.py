"""Newline-delimited JSON framing for the stdio transport, sans I/O.

MCP 2025-11-25 basic/transports §stdio: messages are delimited by newlines and MUST NOT
contain embedded newlines. The framer is fed arbitrary chunks and hands back complete lines;
a line longer than ``max_line_bytes`` raises, because after an unbounded line the stream cannot
be trusted to resynchronise on a message boundary.
"""

from __future__ import annotations

from mcproxy.errors import LineTooLong


class LineFramer:
    """Split a byte stream into lines (without the ``\\n``; a trailing ``\\r`` is dropped)."""

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add a chunk; return the complete, non-blank lines it finished.

        Raises:
            LineTooLong: a line (finished or not) exceeds the limit.
        """
        self._buffer += data
        lines: list[bytes] = []
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end < 0:
                break
            if end - start > self.max_line_bytes:
                raise LineTooLong(f"line of {end - start} bytes exceeds {self.max_line_bytes}")
            line = bytes(self._buffer[start:end]).rstrip(b"\r")
            if line.strip():
                lines.append(line)
            start = end + 1
        del self._buffer[:start]
        if len(self._buffer) > self.max_line_bytes:
            raise LineTooLong(f"unterminated line exceeds {self.max_line_bytes} bytes")
        return lines

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line (non-zero at EOF means the peer cut a message)."""
        return len(self._buffer)
