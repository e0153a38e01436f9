"""The outbox queue on its own: order, and memory that stays bounded while the pump lags."""

from __future__ import annotations

from typing import cast

from mcproxy.engine.outbox import Outbox, _Direct
from mcproxy.engine.store import Store


async def _noop(data: bytes, lsn: int | None) -> None:
    pass


async def test_a_pump_that_never_drains_does_not_keep_what_it_read() -> None:
    outbox = Outbox("S", cast(Store, None), _noop, lambda _: None, max_queue=1000)
    outbox.push_direct(b"0")
    read: list[bytes] = []
    for i in range(1, 10_000):  # one in, one out, one always waiting: never empty
        outbox.push_direct(b"%d" % i)
        item = outbox._next()
        assert isinstance(item, _Direct)
        read.append(item.data)
        assert len(outbox._items) - outbox._head == 1
        assert len(outbox._items) <= 200, "read items must not pile up"
    assert read == [b"%d" % i for i in range(9_999)]  # in order
