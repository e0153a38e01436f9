from __future__ import annotations

import pytest

from mcproxy.core.framing import LineFramer, SseEvent, SseParser
from mcproxy.errors import LineTooLong


def test_split_and_merged_chunks() -> None:
    framer = LineFramer(100)
    assert framer.feed(b'{"a":') == []
    assert framer.feed(b'1}\n{"b":2}\r\n\n  \n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert framer.pending == 4
    assert framer.feed(b":3}\n") == [b'{"c":3}']


def test_line_limit() -> None:
    framer = LineFramer(8)
    assert framer.feed(b"12345678\n") == [b"12345678"]
    with pytest.raises(LineTooLong):
        framer.feed(b"123456789\n")
    with pytest.raises(LineTooLong):
        LineFramer(8).feed(b"x" * 9)  # unterminated, already too long


def sse_all(chunks: list[bytes], limit: int = 1000) -> list[SseEvent]:
    parser = SseParser(limit)
    return [event for chunk in chunks for event in parser.feed(chunk)]


def test_sse_fields_comments_and_priming_events() -> None:
    stream = (
        b": keep-alive\r\n"
        b"id: 0\r\nretry: 500\r\ndata:\r\n\r\n"  # a priming event: an id, no data
        b'event: message\r\nid: 1\r\ndata: {"a":\r\ndata:1}\r\n\r\n'
        b"data: no space after the colon is fine too\n\n"
        b"id\n\n"  # a field without a colon: an empty id clears the last event id
        b"retry: soon\nfoo: bar\n\n"  # a bad retry and an unknown field: nothing dispatched
        b"id: a\x00b\ndata: x\n\n"  # an id with NUL is ignored
    )
    events = sse_all([stream])
    assert events == [
        SseEvent(b"", "0", 500),
        SseEvent(b'{"a":\n1}', "1"),
        SseEvent(b"no space after the colon is fine too"),
        SseEvent(b"", ""),
        SseEvent(b"x"),
    ]


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_sse_any_chunking_gives_the_same_events(size: int) -> None:
    stream = b"id: 1\r\ndata: one\r\n\r\nid: 2\rdata: two\r\rid: 3\ndata: three\n\n"
    whole = sse_all([stream])
    assert [e.data for e in whole] == [b"one", b"two", b"three"]
    assert sse_all([stream[i : i + size] for i in range(0, len(stream), size)]) == whole


def test_sse_other_event_types_and_limits() -> None:
    assert sse_all([b"event: endpoint\ndata: /x\n\n"]) == [SseEvent(b"/x", event="endpoint")]
    with pytest.raises(LineTooLong):
        sse_all([b"data: " + b"x" * 20 + b"\n"], limit=10)
    with pytest.raises(LineTooLong):  # many small data lines add up
        sse_all([b"data: 1234\n" * 5], limit=10)
    with pytest.raises(LineTooLong):  # a line that never ends
        sse_all([b"data: " + b"x" * 20], limit=10)
