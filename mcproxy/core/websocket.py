"""The server side of RFC 6455, sans-I/O: the opening handshake, the framing, and the
connection's state (``ServerConnection``: open, closing, closed; the ping and close rules; the
output budget).

Why mcproxy speaks WebSocket itself instead of through aiohttp's ``WebSocketResponse``: an
idle session is mostly its connection, and aiohttp keeps a request handler task, the parsed
request, a reader queue and a writer per socket (about 16 KB measured,
benchmarks/bench_scale.py), and runs several coroutine hops per frame. Here a connection is a
parser with a small buffer. aiohttp still serves every other request on the same port.

This module reads bytes and returns values; it imports no asyncio and never reads the clock.
``fronts/ws.py`` is the I/O around it: the ``asyncio.Protocol``, the session binding, the timers.
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final
from urllib.parse import parse_qsl, urlsplit

from mcproxy.errors import FrameError

# Opcodes (RFC 6455 §5.2).
OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

# Close codes (RFC 6455 §7.4.1).
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_UNSUPPORTED_DATA: Final = 1003
CLOSE_NO_STATUS: Final = 1005  # never sent: "the close frame had no code"
CLOSE_ABNORMAL: Final = 1006  # never sent: "the connection dropped without a close frame"
CLOSE_INVALID_DATA: Final = 1007
CLOSE_POLICY: Final = 1008
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_SERVICE_RESTART: Final = 1012
CLOSE_TRY_AGAIN_LATER: Final = 1013

# Codes a peer may put in a close frame (§7.4.1, §7.4.2 and the IANA registry): 1004-1006
# and 1015 are reserved for local use, below 1000 and from 5000 are invalid.
_PEER_CLOSE_CODES: Final = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011,
                                      1012, 1013, 1014})  # fmt: skip
_ACCEPT_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
_ZERO_MASK: Final = b"\0\0\0\0"
MAX_HEAD_BYTES: Final = 16 * 1024  # an opening handshake larger than this goes to aiohttp
_MAX_CONTROL_PAYLOAD: Final = 125  # §5.5
_JOIN_BELOW: Final = 16 * 1024  # a frame below this is one chunk; above, header and payload


# --- the opening handshake ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestHead:
    """An HTTP/1.1 request line and its headers (names lower-cased, repeats comma-joined)."""

    method: str
    target: str
    headers: dict[str, str]

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    def query(self) -> dict[str, str]:
        """The first value of each query parameter, percent-decoded."""
        found: dict[str, str] = {}
        for key, value in parse_qsl(urlsplit(self.target).query, keep_blank_values=True):
            found.setdefault(key, value)
        return found

    def cookie(self, name: str) -> str | None:
        for part in self.headers.get("cookie", "").split(";"):
            key, sep, value = part.strip().partition("=")
            if sep and key == name:
                return value.strip().strip('"')
        return None

    def is_websocket_upgrade(self) -> bool:
        return self.method == "GET" and "websocket" in _tokens(self.headers.get("upgrade", ""))


def _tokens(value: str) -> set[str]:
    return {token.strip().lower() for token in value.split(",")}


_CONTROL_CHARS: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN_CHARS: Final = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


def parse_request_head(raw: bytes) -> RequestHead | None:
    """The head of a request (without its final CRLF CRLF), or None if it is anything but
    plain, well-formed HTTP/1.1 (RFC 9112 §3, §5): such input is left to aiohttp, whose
    answers to malformed requests are the reference."""
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1" or not parts[0].isalpha():
        return None
    target = parts[1]
    if not target.startswith(b"/") or not target.isascii() or _CONTROL_CHARS.search(target):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        # No obs-fold, no empty or non-token names, no control characters in values.
        if not sep or not name or not _TOKEN_CHARS.issuperset(name):
            return None
        if _CONTROL_CHARS.search(value):
            return None
        key = name.decode("ascii").lower()
        text = value.decode("latin-1").strip(" \t")
        if key in headers:
            if key in ("host", "content-length", "sec-websocket-key", "origin", "authorization"):
                return None  # a repeat of a singleton header: aiohttp's path refuses it
            text = f"{headers[key]}{'; ' if key == 'cookie' else ', '}{text}"
        headers[key] = text
    if "content-length" in headers or "transfer-encoding" in headers:
        return None  # a GET with a body is not an opening handshake
    return RequestHead(parts[0].decode("ascii"), target.decode("ascii"), headers)


def handshake_problem(head: RequestHead) -> str | None:
    """Why ``head`` is not a valid opening handshake (RFC 6455 §4.2.1), or None."""
    headers = head.headers
    if "upgrade" not in _tokens(headers.get("connection", "")):
        return "expected a WebSocket upgrade (Connection: Upgrade)"
    if headers.get("sec-websocket-version") != "13":
        return "unsupported WebSocket version (13 is required)"
    key = headers.get("sec-websocket-key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return "Sec-WebSocket-Key must be 16 bytes in base64"
    except ValueError:
        return "Sec-WebSocket-Key must be 16 bytes in base64"
    return None


def offered_protocols(head: RequestHead) -> list[str]:
    return [p.strip() for p in head.headers.get("sec-websocket-protocol", "").split(",") if p]


def accept_response(head: RequestHead, protocol: str | None, extra: list[str]) -> bytes:
    """The 101 answer to a valid handshake: ``protocol`` echoed if chosen, no extensions."""
    key = head.headers["sec-websocket-key"].encode("ascii")
    accept = base64.b64encode(hashlib.sha1(key + _ACCEPT_GUID).digest()).decode("ascii")
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept}",
    ]
    if protocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_REASONS: Final = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    421: "Misdirected Request",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def http_refusal(status: int, text: str, extra: list[str] | None = None) -> bytes:
    """A complete plain-text HTTP/1.1 response that ends the connection."""
    body = (text + "\n").encode()
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(extra or []),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --- frames ------------------------------------------------------------------------------


def frame_header(opcode: int, size: int) -> bytes:
    """The header of one final, unmasked frame (a server never masks, §5.1)."""
    if size < 126:
        return bytes((0x80 | opcode, size))
    if size < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, size)
    return struct.pack("!BBQ", 0x80 | opcode, 127, size)


def close_payload(code: int, reason: str) -> bytes:
    """A close frame's body; the reason is cut to fit a control frame (§5.5)."""
    data = reason.encode()[: _MAX_CONTROL_PAYLOAD - 2]
    return struct.pack("!H", code) + data.decode("utf-8", "ignore").encode()


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a peer's close frame (§5.5.1, §7.1.5)."""
    if not payload:
        return CLOSE_NO_STATUS, ""
    if len(payload) < 2:
        raise FrameError(CLOSE_PROTOCOL_ERROR, "a close frame body must start with a code")
    (code,) = struct.unpack("!H", payload[:2])
    if code not in _PEER_CLOSE_CODES and not 3000 <= code <= 4999:
        raise FrameError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        return code, payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(CLOSE_INVALID_DATA, "the close reason is not UTF-8") from None


def _unmask(data: bytes | bytearray, mask: bytes) -> bytes:
    """XOR with the 4-byte key (§5.3), done on one big integer: linear, and in C."""
    size = len(data)
    if mask == _ZERO_MASK or not size:
        return bytes(data)
    key = (mask * ((size + 3) // 4))[:size]
    value = int.from_bytes(data, "little") ^ int.from_bytes(key, "little")
    return value.to_bytes(size, "little")


class FrameParser:
    """Client frames in, whole messages and control frames out (§5.2-§5.5).

    ``feed`` returns ``(opcode, payload)`` pairs: ``OP_TEXT``/``OP_BINARY`` with the payload of
    a whole (reassembled) message, or a control frame. A message over ``max_message`` bytes
    is refused as soon as its size is known, before its payload is buffered.
    """

    __slots__ = ("_buffer", "_fragment_op", "_fragments", "_max_message")

    def __init__(self, max_message: int) -> None:
        self._max_message = max_message
        self._buffer: bytearray | None = None  # a partial frame, kept only while one is
        self._fragment_op = 0
        self._fragments: bytearray | None = None

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf: bytes | bytearray = data
        if self._buffer is not None:
            self._buffer += data
            buf = self._buffer
        out: list[tuple[int, bytes]] = []
        pos, end = 0, len(buf)
        while end - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            if first & 0x70:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension agreed)")
            if not second & 0x80:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
            opcode, size, at = first & 0x0F, second & 0x7F, pos + 2
            if size == 126:
                if end - at < 2:
                    break
                size, at = int.from_bytes(buf[at : at + 2], "big"), at + 2
            elif size == 127:
                if end - at < 8:
                    break
                size, at = int.from_bytes(buf[at : at + 8], "big"), at + 8
                if size >> 63:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "frame length out of range")
            self._check(opcode, bool(first & 0x80), size)
            if end - at < 4 + size:
                break
            payload = _unmask(buf[at + 4 : at + 4 + size], bytes(buf[at : at + 4]))
            pos = at + 4 + size
            message = self._assemble(opcode, bool(first & 0x80), payload)
            if message is not None:
                out.append(message)
        if pos == end:
            self._buffer = None
        elif buf is self._buffer:
            del self._buffer[:pos]
        else:
            self._buffer = bytearray(buf[pos:])
        return out

    def _check(self, opcode: int, fin: bool, size: int) -> None:
        if opcode >= OP_CLOSE:
            if opcode > OP_PONG:
                raise FrameError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
            if not fin or size > _MAX_CONTROL_PAYLOAD:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "control frames must be final and short")
            return
        if opcode > OP_BINARY:
            raise FrameError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if opcode == OP_CONTINUATION and self._fragments is None:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "a continuation frame with nothing to continue")
        if opcode != OP_CONTINUATION and self._fragments is not None:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "a new message inside a fragmented one")
        so_far = len(self._fragments) if self._fragments is not None else 0
        if self._max_message and so_far + size > self._max_message:
            raise FrameError(
                CLOSE_TOO_BIG, f"message larger than the {self._max_message}-byte limit"
            )

    def _assemble(self, opcode: int, fin: bool, payload: bytes) -> tuple[int, bytes] | None:
        if opcode >= OP_CLOSE or (fin and opcode != OP_CONTINUATION):
            return opcode, payload
        if opcode != OP_CONTINUATION:
            self._fragment_op, self._fragments = opcode, bytearray(payload)
            return None
        assert self._fragments is not None
        self._fragments += payload
        if not fin:
            return None
        message = (self._fragment_op, bytes(self._fragments))
        self._fragments = None
        return message


def valid_text(payload: bytes) -> bool:
    """Text frames must be UTF-8 (§8.1); ASCII, the common case, is checked without decoding."""
    if payload.isascii():
        return True
    try:
        payload.decode()
    except UnicodeDecodeError:
        return False
    return True


# --- the connection ----------------------------------------------------------------------


class State(IntEnum):
    """Where a connection is in its life (RFC 6455 §4, §7); the handshake is done before."""

    OPEN = 1  # messages flow both ways
    CLOSING = 2  # our close frame is out: we wait for the peer's (§7.1.2), send nothing more
    CLOSED = 3  # both close frames are out, or the peer broke the protocol: drop the TCP


@dataclass(frozen=True, slots=True)
class TextReceived:
    """A whole text message, valid UTF-8 (§8.1), received while open."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class PongReceived:
    payload: bytes


@dataclass(frozen=True, slots=True)
class CloseReceived:
    """The peer's close frame: ours (an echo of its code if it started) is queued; the state
    is CLOSED, so the server drops the TCP connection now (§7.1.1)."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class ProtocolFailed:
    """The peer broke the protocol: a close frame saying why is queued and the state is
    CLOSED (§7.1.7, "Fail the WebSocket Connection")."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class CloseStarted:
    """We began the closing handshake in answer to the peer (a binary frame: 1003)."""

    code: int
    reason: str


Event = TextReceived | PongReceived | CloseReceived | ProtocolFailed | CloseStarted


class ConnectionClosing(Exception):
    """A message was offered after the closing handshake began (§5.5.1: no data after a
    close frame)."""


class ServerConnection:
    """One server-side WebSocket after the opening handshake, sans-I/O (as in ``websockets``).

    ``receive_data`` turns bytes from the peer into events; every ``send_*`` and the automatic
    answers (pong, close echo) queue bytes that ``data_to_send`` hands to the I/O layer.

    The output budget: a peer that does not read must not make us hold its output without
    bound (docs/SECURITY.md). The I/O layer says how much it still holds (``buffered``: the
    transport's write buffer) and what it accepted to send later (``owe``/``paid``: queued
    replies); ``over_budget`` is true once that exceeds ``max_output``, checked *before* each
    new output, so at most ``max_output`` plus one message is held. Past it the peer is
    closed with 1013 (``close_over_budget``): it may resume its session from its cursor.
    """

    __slots__ = ("_out", "_parser", "close_code", "max_output", "owed", "state")

    def __init__(self, max_message: int, max_output: int) -> None:
        self._parser = FrameParser(max_message)
        self.max_output = max_output
        self.state = State.OPEN
        self.close_code: int | None = None  # the code we sent, or the peer's if it started
        self.owed = 0
        self._out: list[bytes] = []

    # --- input ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        try:
            frames = self._parser.feed(data)
        except FrameError as exc:
            return [self._fail(exc.close_code, str(exc))]
        events: list[Event] = []
        for opcode, payload in frames:  # (each way to CLOSED below ends the loop)
            if opcode == OP_TEXT:
                if self.state is not State.OPEN:
                    continue  # after our close frame, data is dropped (§7.1.2)
                if not valid_text(payload):
                    events.append(
                        self._fail(CLOSE_INVALID_DATA, "text frames must be UTF-8 (RFC 6455 §8.1)")
                    )
                    break
                events.append(TextReceived(payload))
            elif opcode == OP_CLOSE:
                events.append(self._peer_close(payload))
                break
            elif opcode == OP_PING:
                # §5.5.2: answer with the same payload, while open: a closing connection
                # answers nothing (and a peer that pings without reading is over budget).
                if self.state is State.OPEN:
                    self._frame(OP_PONG, payload)
            elif opcode == OP_PONG:
                events.append(PongReceived(payload))
            elif self.state is State.OPEN:  # OP_BINARY: MCP messages are text
                reason = "binary frames are not supported by MCP"
                self.send_close(CLOSE_UNSUPPORTED_DATA, reason)
                events.append(CloseStarted(CLOSE_UNSUPPORTED_DATA, reason))
        return events

    def _peer_close(self, payload: bytes) -> Event:
        try:
            code, reason = parse_close(payload)
        except FrameError as exc:
            return self._fail(exc.close_code, str(exc))
        if self.state is State.OPEN:  # the peer started: echo its code (§5.5.1)
            self.close_code = code
            self._frame(
                OP_CLOSE, close_payload(CLOSE_NORMAL if code == CLOSE_NO_STATUS else code, "")
            )
        self.state = State.CLOSED
        return CloseReceived(code, reason)

    def _fail(self, code: int, reason: str) -> ProtocolFailed:
        if self.state is State.OPEN:
            self.close_code = code
            self._frame(OP_CLOSE, close_payload(code, reason))
        self.state = State.CLOSED
        return ProtocolFailed(code, reason)

    # --- output --------------------------------------------------------------------------

    def send_text(self, data: bytes) -> None:
        if self.state is not State.OPEN:
            raise ConnectionClosing("the WebSocket is closing")
        self._frame(OP_TEXT, data)

    def send_ping(self, payload: bytes = b"") -> None:
        if self.state is State.OPEN:
            self._frame(OP_PING, payload)

    def send_close(self, code: int, reason: str) -> bool:
        """Begin the closing handshake (once): True if our close frame was queued now."""
        if self.state is not State.OPEN:
            return False
        self.state = State.CLOSING
        self.close_code = code
        self._frame(OP_CLOSE, close_payload(code, reason))
        return True

    def data_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def _frame(self, opcode: int, payload: bytes) -> None:
        header = frame_header(opcode, len(payload))
        if len(payload) < _JOIN_BELOW:
            self._out.append(header + payload)
        else:
            self._out += (header, payload)  # no copy of a big payload

    # --- the output budget ---------------------------------------------------------------

    def owe(self, size: int) -> None:
        """The I/O layer accepted ``size`` bytes to send later (a queued reply)."""
        self.owed += size

    def paid(self, size: int) -> None:
        """Owed bytes went out."""
        self.owed = max(0, self.owed - size)

    def over_budget(self, buffered: int) -> bool:
        pending = buffered + self.owed + sum(len(chunk) for chunk in self._out)
        return pending > self.max_output

    def close_over_budget(self) -> bool:
        """Close a peer that does not read what it is sent (1013: it may come back and
        resume). True if the close frame was queued now."""
        return self.send_close(
            CLOSE_TRY_AGAIN_LATER,
            f"output budget exceeded: over {self.max_output} bytes unread",
        )
