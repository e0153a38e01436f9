from __future__ import annotations

import pytest

from mcproxy.errors import LineTooLong
from mcproxy.framing import LineFramer


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
