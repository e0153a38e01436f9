"""RFC 6455, server side: the handshake helpers, the frame parser byte by byte, and the
connection's state machine (open, closing, closed; ping, close and budget rules)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcproxy.core.websocket import (
    CLOSE_INVALID_DATA,
    CLOSE_NO_STATUS,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN_LATER,
    CLOSE_UNSUPPORTED_DATA,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    CloseReceived,
    CloseStarted,
    ConnectionClosing,
    FrameParser,
    PongReceived,
    ProtocolFailed,
    ServerConnection,
    State,
    TextReceived,
    accept_response,
    close_payload,
    frame_header,
    handshake_problem,
    http_refusal,
    parse_close,
    parse_request_head,
    valid_text,
)
from mcproxy.errors import FrameError
from tests.helpers import client_frame

HANDSHAKE = (
    b"GET /mcp?mcp_session_id=abc%2Fdef&x=1&x=2 HTTP/1.1\r\n"
    b"Host: 127.0.0.1:8080\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: keep-alive, Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: mcp.auth.abc, mcp\r\n"
    b"Cookie: a=1\r\n"
    b'Cookie: mcp_session_id="from-cookie"; b=2'
)


def test_handshake_head_is_parsed_and_answered() -> None:
    head = parse_request_head(HANDSHAKE)
    assert head is not None
    assert head.method == "GET" and head.path == "/mcp" and head.is_websocket_upgrade()
    assert head.query() == {"mcp_session_id": "abc/def", "x": "1"}  # decoded, first wins
    assert head.cookie("mcp_session_id") == "from-cookie" and head.cookie("a") == "1"
    assert head.cookie("missing") is None
    assert handshake_problem(head) is None
    answer = accept_response(head, "mcp", ["Set-Cookie: k=v"]).decode()
    # The example of RFC 6455 §1.3.
    assert "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in answer
    assert answer.startswith("HTTP/1.1 101 ") and answer.endswith("Set-Cookie: k=v\r\n\r\n")
    assert "Sec-WebSocket-Protocol: mcp\r\n" in answer


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /mcp HTTP/1.0\r\nHost: x",  # not HTTP/1.1
        b"GET  /mcp HTTP/1.1\r\nHost: x",  # two spaces
        b"GET mcp HTTP/1.1\r\nHost: x",  # not origin-form
        b"GET /mcp HTTP/1.1\r\nHost: x\r\n folded",  # obs-fold
        b"GET /mcp HTTP/1.1\r\nBad Name: x",  # not a token
        b"GET /mcp HTTP/1.1\r\nHost: x\x00y",  # a control character
        b"GET /mcp HTTP/1.1\r\nHost: a\r\nHost: b",  # a repeated singleton
        b"GET /mcp HTTP/1.1\r\nHost: a\r\nContent-Length: 3",  # a body
        b"GET /mcp HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked",
    ],
)
def test_anything_unusual_is_left_to_aiohttp(raw: bytes) -> None:
    assert parse_request_head(raw) is None


@pytest.mark.parametrize(
    ("replace", "problem"),
    [
        (b"keep-alive, Upgrade", "Connection: Upgrade"),
        (b"Version: 13", "version"),
        (b"dGhlIHNhbXBsZSBub25jZQ==", "16 bytes"),
    ],
)
def test_handshake_problems(replace: bytes, problem: str) -> None:
    broken = {
        b"keep-alive, Upgrade": b"keep-alive",
        b"Version: 13": b"Version: 8",
        b"dGhlIHNhbXBsZSBub25jZQ==": b"c2hvcnQ=",
    }[replace]
    head = parse_request_head(HANDSHAKE.replace(replace, broken))
    assert head is not None
    found = handshake_problem(head)
    assert found is not None and problem in found


def test_refusals_are_complete_responses() -> None:
    raw = http_refusal(401, "token needed", ['WWW-Authenticate: Bearer realm="x"'])
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"Connection: close" in head and b"WWW-Authenticate" in head
    assert body == b"token needed\n" and f"Content-Length: {len(body)}".encode() in head


def test_frames_in_one_chunk_and_byte_by_byte() -> None:
    stream = (
        client_frame(OP_TEXT, b'{"a":1}')
        + client_frame(OP_PING, b"hi")
        + client_frame(OP_TEXT, b"x" * 300)  # a 16-bit length
        + client_frame(OP_BINARY, b"y" * 70000)  # a 64-bit length
    )
    expected = [(OP_TEXT, b'{"a":1}'), (OP_PING, b"hi"), (OP_TEXT, b"x" * 300)]
    expected.append((OP_BINARY, b"y" * 70000))
    assert FrameParser(1 << 20).feed(stream) == expected
    parser, got = FrameParser(1 << 20), []
    for i in range(len(stream)):
        got += parser.feed(stream[i : i + 1])
    assert got == expected


def test_fragments_are_reassembled_around_control_frames() -> None:
    parser = FrameParser(1000)
    stream = (
        client_frame(OP_TEXT, b"he", fin=False)
        + client_frame(OP_PING, b"")
        + client_frame(OP_CONTINUATION, b"ll", fin=False)
        + client_frame(OP_CONTINUATION, b"o", fin=True)
    )
    assert parser.feed(stream) == [(OP_PING, b""), (OP_TEXT, b"hello")]


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        (bytes((0x81, 0x02)) + b"hi", CLOSE_PROTOCOL_ERROR),  # not masked
        (bytes((0xC1, 0x80)) + b"\0\0\0\0", CLOSE_PROTOCOL_ERROR),  # RSV1 without extension
        (client_frame(0x3, b""), CLOSE_PROTOCOL_ERROR),  # reserved data opcode
        (client_frame(0xB, b""), CLOSE_PROTOCOL_ERROR),  # reserved control opcode
        (client_frame(OP_PING, b"x" * 126), CLOSE_PROTOCOL_ERROR),  # control too long
        (client_frame(OP_PING, b"", fin=False), CLOSE_PROTOCOL_ERROR),  # control fragmented
        (client_frame(OP_CONTINUATION, b"x"), CLOSE_PROTOCOL_ERROR),  # nothing to continue
        (
            client_frame(OP_TEXT, b"a", fin=False) + client_frame(OP_TEXT, b"b"),
            CLOSE_PROTOCOL_ERROR,  # a new message inside a fragmented one
        ),
        (client_frame(OP_TEXT, b"x" * 101), CLOSE_TOO_BIG),
        (
            client_frame(OP_TEXT, b"x" * 60, fin=False) + client_frame(OP_CONTINUATION, b"x" * 41),
            CLOSE_TOO_BIG,  # the limit counts the whole message
        ),
    ],
)
def test_protocol_violations_name_their_close_code(frames: bytes, code: int) -> None:
    with pytest.raises(FrameError) as caught:
        FrameParser(100).feed(frames)
    assert caught.value.close_code == code


def test_an_oversized_frame_is_refused_from_its_header_alone() -> None:
    header = struct.pack("!BBQ", 0x81, 0x80 | 127, 1 << 40)  # no payload follows
    with pytest.raises(FrameError) as caught:
        FrameParser(1 << 20).feed(header)
    assert caught.value.close_code == CLOSE_TOO_BIG


def test_close_frames() -> None:
    assert parse_close(b"") == (CLOSE_NO_STATUS, "")
    assert parse_close(struct.pack("!H", 4403) + "déjà".encode()) == (4403, "déjà")
    for bad, code in [
        (b"\x03", CLOSE_PROTOCOL_ERROR),
        (struct.pack("!H", 1005), CLOSE_PROTOCOL_ERROR),  # reserved for local use
        (struct.pack("!H", 999), CLOSE_PROTOCOL_ERROR),
        (struct.pack("!H", 1000) + b"\xff", CLOSE_INVALID_DATA),
    ]:
        with pytest.raises(FrameError) as caught:
            parse_close(bad)
        assert caught.value.close_code == code
    long = close_payload(1000, "é" * 200)  # cut to 125 bytes without splitting a character
    assert len(long) <= 125 and parse_close(long)[1] == "é" * 61


def test_frame_headers_and_text_validation() -> None:
    assert frame_header(OP_TEXT, 5) == b"\x81\x05"
    assert frame_header(OP_CLOSE, 300) == b"\x88\x7e\x01\x2c"
    assert frame_header(OP_TEXT, 70000) == b"\x81\x7f" + (70000).to_bytes(8, "big")
    assert valid_text(b"plain") and valid_text("ünïcode".encode())
    assert not valid_text(b"\xff\xfe") and not valid_text(b"\xed\xa0\x80")  # a surrogate


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(st.binary(max_size=300), min_size=1, max_size=5),
    pieces=st.integers(min_value=1, max_value=4),
    chunk=st.integers(min_value=1, max_value=64),
    mask=st.binary(min_size=4, max_size=4),
)
def test_any_masking_fragmenting_and_chunking_round_trips(
    messages: list[bytes], pieces: int, chunk: int, mask: bytes
) -> None:
    stream = b""
    for message in messages:
        cut = max(1, len(message) // pieces)
        parts = [message[i : i + cut] for i in range(0, len(message), cut)] or [b""]
        for i, part in enumerate(parts):
            opcode = OP_BINARY if i == 0 else OP_CONTINUATION
            stream += client_frame(opcode, part, fin=i == len(parts) - 1, mask=mask)
    parser, got = FrameParser(1 << 16), []
    for i in range(0, len(stream), chunk):
        got += parser.feed(stream[i : i + chunk])
    assert got == [(OP_BINARY, m) for m in messages]


# --- the connection state machine (no sockets, no loop) ------------------------------------


def _conn(max_output: int = 1 << 20) -> ServerConnection:
    return ServerConnection(max_message=1 << 16, max_output=max_output)


def _frames(chunks: list[bytes]) -> list[tuple[int, bytes]]:
    """Parse what the server queued (unmasked frames) with a tolerant reader."""
    data, out, pos = b"".join(chunks), [], 0
    while pos < len(data):
        first, size = data[pos], data[pos + 1] & 0x7F
        pos += 2
        if size == 126:
            (size,) = struct.unpack("!H", data[pos : pos + 2])
            pos += 2
        elif size == 127:
            (size,) = struct.unpack("!Q", data[pos : pos + 8])
            pos += 8
        out.append((first & 0x0F, data[pos : pos + size]))
        pos += size
    return out


def test_text_and_ping_while_open() -> None:
    conn = _conn()
    events = conn.receive_data(client_frame(OP_TEXT, b"{}") + client_frame(OP_PING, b"hi"))
    assert events == [TextReceived(b"{}")]
    assert _frames(conn.data_to_send()) == [(OP_PONG, b"hi")]  # §5.5.3: same payload
    assert conn.data_to_send() == []
    assert conn.receive_data(client_frame(OP_PONG, b"x")) == [PongReceived(b"x")]
    conn.send_text(b"a" * 20000)  # a big frame: header and payload apart, not copied
    assert [len(c) for c in conn.data_to_send()] == [4, 20000]
    conn.send_ping()
    assert _frames(conn.data_to_send()) == [(OP_PING, b"")]
    assert conn.state is State.OPEN


def test_peer_close_is_echoed_and_ends_the_connection() -> None:
    conn = _conn()
    events = conn.receive_data(client_frame(OP_CLOSE, struct.pack("!H", 4001) + b"bye"))
    assert events == [CloseReceived(4001, "bye")]
    assert conn.state is State.CLOSED and conn.close_code == 4001
    assert _frames(conn.data_to_send()) == [(OP_CLOSE, struct.pack("!H", 4001))]  # §5.5.1
    assert conn.receive_data(client_frame(OP_TEXT, b"late")) == []  # nothing after CLOSED
    with pytest.raises(ConnectionClosing):
        conn.send_text(b"{}")
    empty = _conn()
    assert empty.receive_data(client_frame(OP_CLOSE, b"")) == [CloseReceived(CLOSE_NO_STATUS, "")]
    assert _frames(empty.data_to_send()) == [(OP_CLOSE, struct.pack("!H", CLOSE_NORMAL))]


def test_our_close_then_the_echo() -> None:
    conn = _conn()
    assert conn.send_close(CLOSE_NORMAL, "done") is True
    assert conn.send_close(CLOSE_POLICY, "again") is False  # once
    assert conn.state is State.CLOSING and conn.close_code == CLOSE_NORMAL
    assert _frames(conn.data_to_send()) == [(OP_CLOSE, struct.pack("!H", 1000) + b"done")]
    # While closing: data is dropped, pings are not answered, nothing may be sent (§5.5.1).
    assert conn.receive_data(client_frame(OP_TEXT, b"{}") + client_frame(OP_PING, b"")) == []
    assert conn.data_to_send() == []
    conn.send_ping()
    assert conn.data_to_send() == []
    with pytest.raises(ConnectionClosing):
        conn.send_text(b"{}")
    echo = conn.receive_data(client_frame(OP_CLOSE, struct.pack("!H", 1000)))
    assert echo == [CloseReceived(CLOSE_NORMAL, "")] and conn.state is State.CLOSED
    assert conn.data_to_send() == [] and conn.close_code == CLOSE_NORMAL  # no second echo


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (client_frame(OP_TEXT, b"\xff"), CLOSE_INVALID_DATA),
        (bytes((0x81, 0x02)) + b"{}", CLOSE_PROTOCOL_ERROR),  # unmasked
        (client_frame(OP_CLOSE, b"\x03"), CLOSE_PROTOCOL_ERROR),
        (client_frame(OP_CLOSE, struct.pack("!H", 1005)), CLOSE_PROTOCOL_ERROR),
    ],
)
def test_protocol_failures_close_with_their_code(data: bytes, code: int) -> None:
    conn = _conn()
    events = conn.receive_data(data + client_frame(OP_TEXT, b"{}"))
    assert len(events) == 1 and isinstance(events[0], ProtocolFailed) and events[0].code == code
    assert conn.state is State.CLOSED and conn.close_code == code
    ((opcode, payload),) = _frames(conn.data_to_send())
    assert opcode == OP_CLOSE and parse_close(payload)[0] == code
    assert conn.receive_data(client_frame(OP_TEXT, b"{}")) == []


def test_a_failure_while_closing_sends_no_second_close() -> None:
    conn = _conn()
    conn.send_close(CLOSE_NORMAL, "")
    conn.data_to_send()
    events = conn.receive_data(client_frame(OP_CLOSE, b"\x03"))
    assert isinstance(events[0], ProtocolFailed) and conn.state is State.CLOSED
    assert conn.data_to_send() == [] and conn.close_code == CLOSE_NORMAL


def test_binary_starts_a_1003_close() -> None:
    conn = _conn()
    events = conn.receive_data(client_frame(OP_BINARY, b"\x00") + client_frame(OP_BINARY, b""))
    assert events == [
        CloseStarted(CLOSE_UNSUPPORTED_DATA, "binary frames are not supported by MCP")
    ]
    assert conn.state is State.CLOSING
    ((_, payload),) = _frames(conn.data_to_send())
    assert parse_close(payload)[0] == CLOSE_UNSUPPORTED_DATA


def test_text_before_a_close_in_the_same_read_is_delivered() -> None:
    conn = _conn()
    data = client_frame(OP_TEXT, b"{}") + client_frame(OP_CLOSE, struct.pack("!H", 1000))
    assert conn.receive_data(data) == [TextReceived(b"{}"), CloseReceived(1000, "")]


def test_output_budget() -> None:
    conn = _conn(max_output=1000)
    assert not conn.over_budget(buffered=1000)
    assert conn.over_budget(buffered=1001)
    conn.owe(600)
    assert conn.over_budget(buffered=401) and not conn.over_budget(buffered=400)
    conn.paid(600)
    conn.paid(600)  # a prelude sent without being owed: never below zero
    assert conn.owed == 0 and not conn.over_budget(buffered=1000)
    assert conn.close_over_budget() is True and conn.state is State.CLOSING
    ((_, payload),) = _frames(conn.data_to_send())
    code, reason = parse_close(payload)
    assert code == CLOSE_TRY_AGAIN_LATER and "1000 bytes" in reason
    assert conn.close_over_budget() is False
