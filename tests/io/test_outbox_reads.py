"""An outbox reads the log only for what it was not handed live (issue 20).

A real store; its ``read_events`` is wrapped to count the reads (each is a hop through
aiosqlite's thread, which was most of the Streamable HTTP front's system calls per request).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from mcproxy.engine.outbox import Outbox
from mcproxy.engine.store import Store
from tests.helpers import TIMEOUT


class Counted:
    def __init__(self, store: Store) -> None:
        self.reads = 0
        read = store.read_events

        async def counted(*args: Any, **kwargs: Any) -> list[tuple[int, bytes]]:
            self.reads += 1
            return await read(*args, **kwargs)

        store.read_events = counted  # type: ignore[method-assign]


async def _pump(store: Store, live_after: int | None, max_queue: int, count: int) -> list[int]:
    """Items 1..count appended and pushed live before the pump starts, then the end."""
    sent: list[int] = []

    async def send(data: bytes, lsn: int | None) -> None:
        assert lsn is not None and data == b"m%d" % lsn
        sent.append(lsn)

    outbox = Outbox("S", store, send, lambda _: None, max_queue, stream=1, live_after=live_after)
    for lsn in range(1, count + 1):
        outbox.push_live(lsn, b"m%d" % lsn, store.append("S", lsn, b"m%d" % lsn, stream=1))
    outbox.push_end()
    await asyncio.wait_for(outbox.run(0, []), TIMEOUT)
    return sent


async def test_a_stream_handed_everything_live_reads_nothing_back(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite")
    counted = Counted(store)
    try:
        assert await _pump(store, live_after=0, max_queue=100, count=3) == [1, 2, 3]
        assert counted.reads == 0
        # Unknown (None): the replay reads the log (once: the end finds nothing dropped).
        store.append("S", 4, b"m4", stream=1)
        assert await _pump(store, live_after=None, max_queue=100, count=0) == [1, 2, 3, 4]
        assert counted.reads == 1
    finally:
        await store.aclose()


async def test_what_an_overflow_dropped_is_read_back_in_order(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite")
    counted = Counted(store)
    try:
        # max_queue 2: items 3..10 are dropped from memory; the log has them.
        assert await _pump(store, live_after=0, max_queue=2, count=10) == list(range(1, 11))
        assert counted.reads >= 1
    finally:
        await store.aclose()


async def test_messages_logged_before_the_outbox_existed_are_read(tmp_path: Path) -> None:
    """``live_after`` below the cursor's head: the gap is read from the log, then live."""
    store = await Store.open(tmp_path / "db.sqlite")
    sent: list[int] = []

    async def send(data: bytes, lsn: int | None) -> None:
        assert lsn is not None
        sent.append(lsn)

    try:
        for lsn in (1, 2):
            store.append("S", lsn, b"m%d" % lsn, stream=1)
        outbox = Outbox("S", store, send, lambda _: None, 100, stream=1, live_after=2)
        outbox.push_live(3, b"m3", store.append("S", 3, b"m3", stream=1))
        outbox.push_end()
        await asyncio.wait_for(outbox.run(0, []), TIMEOUT)
        assert sent == [1, 2, 3]
    finally:
        await store.aclose()


async def test_only_the_answer_ends_a_stream_read_back_after_an_overflow(tmp_path: Path) -> None:
    """``Outbox.ending`` lets an SSE answer go out with the end of its response (one write).
    After an overflow only the end is left in memory while the log is read back: the first
    row read must not be taken for the last, or the response ended there and the rest, the
    answer included, was lost (a POST stream ended without its answer)."""
    store = await Store.open(tmp_path / "db.sqlite")
    ended: list[tuple[int, bool]] = []
    outbox: Outbox

    async def send(data: bytes, lsn: int | None) -> None:
        assert lsn is not None
        ended.append((lsn, outbox.ending()))

    try:
        outbox = Outbox("S", store, send, lambda _: None, 2, stream=1, live_after=0)
        for lsn in range(1, 11):  # 3..10 overflow a queue of 2: read back from the log
            outbox.push_live(lsn, b"m%d" % lsn, store.append("S", lsn, b"m%d" % lsn, stream=1))
        outbox.push_end()
        await asyncio.wait_for(outbox.run(0, []), TIMEOUT)
        assert [lsn for lsn, _ in ended] == list(range(1, 11))
        assert [lsn for lsn, last in ended if last] in ([], [10])
    finally:
        await store.aclose()
