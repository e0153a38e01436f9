"""Framing of the byte streams an upstream speaks, sans I/O.

- ``LineFramer``: newline-delimited JSON for the stdio transport. MCP 2025-11-25
  basic/transports §stdio: messages are delimited by newlines and MUST NOT contain embedded
  newlines. A line longer than ``max_line_bytes`` raises, because after an unbounded line the
  stream cannot be trusted to resynchronise on a message boundary.
- ``SseParser``: ``text/event-stream`` for the Streamable HTTP transport, as its client reads
  it (transports §"Streamable HTTP": one JSON-RPC message per event's data; event ids and
  ``retry`` drive resumption).

Both are fed arbitrary chunks and hand back complete units.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

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

    def take_partial(self) -> bytes:
        """The bytes of the unfinished line, handed to whoever reads the stream next (a
        reload: the next program's framer gets them first, so no message is cut or lost)."""
        partial = bytes(self._buffer)
        self._buffer.clear()
        return partial


_EOL: Final = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One dispatched event. ``id``: None if the event set none, else the new last event id
    (``""`` clears it); ``retry``: the new reconnection time in ms, if set; ``data``: the data
    lines joined with ``\\n`` (empty for a priming event); ``event``: its type."""

    data: bytes
    id: str | None = None
    retry: int | None = None
    event: str = "message"


class SseParser:
    """The event-stream interpretation of WHATWG HTML §9.2.6, incrementally.

    Lines end with CRLF, LF or CR (a CR at the end of a chunk may be the first half of a
    CRLF split across chunks, so a LF right after it is skipped). Comment lines (``:``) are
    keep-alives and vanish. A blank line dispatches the fields gathered since the last one;
    an event with no field at all is not dispatched. Unlike a browser, an event with an id or
    a retry but no data (a Streamable HTTP priming event) is dispatched too: the resuming
    client needs its id. ``max_event_bytes`` bounds one event (and one line), so a peer that
    never ends an event cannot exhaust memory.
    """

    def __init__(self, max_event_bytes: int) -> None:
        self.max_event_bytes = max_event_bytes
        self._buffer = bytearray()
        self._skip_lf = False
        self._data: list[bytes] = []
        self._size = 0
        self._id: str | None = None
        self._retry: int | None = None
        self._event = b""
        self._seen = False

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Add a chunk; return the events it completed.

        Raises:
            LineTooLong: an event (or a line) exceeds ``max_event_bytes``.
        """
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        buffer = self._buffer
        buffer += chunk
        events: list[SseEvent] = []
        start = 0
        while True:
            match = _EOL.search(buffer, start)
            if match is None:
                break
            end = match.start()
            if match.group() == b"\r" and match.end() == len(buffer):
                self._skip_lf = True  # maybe CRLF split across chunks
            event = self._line(bytes(buffer[start:end]))
            if event is not None:
                events.append(event)
            start = match.end()
        del buffer[:start]
        if len(buffer) > self.max_event_bytes:
            raise LineTooLong(f"SSE line exceeds {self.max_event_bytes} bytes")
        return events

    def _line(self, line: bytes) -> SseEvent | None:
        if not line:
            return self._dispatch()
        if line[:1] == b":":
            return None  # a comment: keep-alive
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._size += len(value) + 1
            if self._size > self.max_event_bytes:
                raise LineTooLong(f"SSE event exceeds {self.max_event_bytes} bytes")
            self._data.append(value)
        elif name == b"id":
            if b"\0" in value:
                return None  # ignored, per the standard
            self._id = value.decode("utf-8", "replace")
        elif name == b"retry":
            if value.isdigit():
                self._retry = int(value)
            else:
                return None
        elif name == b"event":
            self._event = value
        else:
            return None  # unknown fields are ignored
        self._seen = True
        return None

    def _dispatch(self) -> SseEvent | None:
        if not self._seen:
            return None
        event = SseEvent(
            b"\n".join(self._data),
            self._id,
            self._retry,
            self._event.decode("utf-8", "replace") or "message",
        )
        self._data = []
        self._size = 0
        self._id = None
        self._retry = None
        self._event = b""
        self._seen = False
        return event
