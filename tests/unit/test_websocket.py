"""RFC 6455, server side: the handshake helpers and the frame parser, byte by byte."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcproxy.core.websocket import (
    CLOSE_INVALID_DATA,
    CLOSE_NO_STATUS,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_TEXT,
    FrameParser,
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
