"""Everything bound for one client connection, in LSN order: the replay from the log first,
then live messages, each written only after the transaction holding it committed.

One ``Outbox`` per client connection (a WebSocket, or one Streamable HTTP stream); its pump
runs in the connection's task. It knows the store (to wait for commits and read back the log)
and a ``send`` callable; nothing of sessions, upstreams or sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from mcproxy.engine.store import Store
from mcproxy.errors import StoreError

_REPLAY_PAGE = 1000
_COMPACT_AFTER = 64  # items read from an outbox's list before they are dropped from it


@dataclass(frozen=True, slots=True)
class _Live:
    lsn: int
    data: bytes
    committed: asyncio.Future[None]


@dataclass(frozen=True, slots=True)
class _Direct:
    data: bytes


@dataclass(frozen=True, slots=True)
class _Again:
    lsn: int


@dataclass(frozen=True, slots=True)
class _End:
    pass


class Owner(Protocol):
    """The session an outbox serves (a ``SessionRunner``)."""

    @property
    def failed(self) -> StoreError | None:
        """Set, before the failed batch's future resolves, when the session's writes were
        rolled back: nothing more may be delivered."""


Send = Callable[[bytes, int | None], Awaitable[None]]
"""Write one message to a client: the bytes, and their LSN (None for a direct reply)."""


class Outbox:
    """Everything bound for one client connection, replay first, then live, in LSN order.

    ``stream`` None means every message of the session (a WebSocket); a number means only that
    Streamable HTTP stream's. ``send`` writes one text frame or SSE event; ``on_sent`` reports
    each LSN written. If the client reads slower than the session produces, live items beyond
    ``max_queue`` are dropped from memory and read back from the log instead: memory stays
    bounded and nothing is lost.
    """

    def __init__(
        self,
        session_id: str,
        store: Store,
        send: Send,
        on_sent: Callable[[int], None],
        max_queue: int,
        stream: int | None = None,
        owner: Owner | None = None,
        live_after: int | None = None,
    ) -> None:
        self.session_id = session_id
        self.store = store
        self.send = send
        self.on_sent = on_sent
        self.max_queue = max_queue
        self.stream = stream
        # A list read from ``_head`` and a future made only while the pump waits: most
        # outboxes are idle and empty, and a deque plus an Event cost 1.5 KB each.
        self._items: list[_Live | _Direct | _Again | _End] = []
        self._head = 0
        self._waiter: asyncio.Future[None] | None = None
        self._overflowed = False
        self.sent_lsn = 0
        self.caught_up: Callable[[], None] | None = None  # called once the replay is done
        self._halted: StoreError | None = None
        self.owner = owner
        # Every message of this outbox's stream(s) with an LSN above ``live_after`` reaches
        # ``push_live`` (its owner registered the outbox when no LSN above it was handed
        # out yet); None: unknown. Then the log holds nothing the pump will not be handed,
        # and a catch-up (a commit wait and a read in aiosqlite's thread, twice per HTTP
        # request: issue 20) is skipped, until an overflow drops live items again.
        self.live_after = live_after
        self._complete = False  # set by ``run``: nothing to read from the log
        self._reading = False  # a catch-up is delivering rows read from the log

    @property
    def parked(self) -> bool:
        """The pump waits for more with nothing queued: everything handed to it was written
        (the daemon's drain waits for this before it closes connections)."""
        return self._waiter is not None and self._head == len(self._items)

    def push_live(self, lsn: int, data: bytes, committed: asyncio.Future[None]) -> None:
        if self._overflowed:
            return  # the pump reads everything back from the log
        if len(self._items) - self._head >= self.max_queue:
            self._overflowed = True
            self._complete = False
            waiting = self._items[self._head :]
            self._items = [i for i in waiting if not isinstance(i, _Live)]
            self._head = 0
        else:
            self._items.append(_Live(lsn, data, committed))
            if self._waiter is not None and not committed.done():
                # The pump is parked and this is all it would wait for next: wake it once,
                # when the commit is done, rather than now and again then (a task step each).
                committed.add_done_callback(self._wake_committed)
                return
        self._wake()

    def halt(self, error: StoreError) -> None:
        """The session's writes failed (``SessionRunner.fail``): send nothing more; the pump
        raises ``error`` at its next step (its front closes the connection, 1011 on a
        WebSocket). Called before the failed batch's future resolves, so a message whose row
        was rolled back never goes out."""
        self._halted = error
        self._items.clear()
        self._head = 0
        self._wake()

    def _wake_committed(self, _: asyncio.Future[None]) -> None:
        self._wake()

    def push_direct(self, data: bytes) -> None:
        self._items.append(_Direct(data))
        self._wake()

    def push_again(self, lsn: int) -> None:
        self._items.append(_Again(lsn))
        self._wake()

    def push_end(self) -> None:
        """Nothing more will come (the stream's request is done): return once drained."""
        self._items.append(_End())
        self._wake()

    def ending(self) -> bool:
        """Whether the message being sent is the last: only the end follows, and nothing is
        left to read from the log. A ``send`` may then end its response in the same write."""
        items = self._items
        return (
            self._complete
            and not self._reading  # more rows of the read may follow (after an overflow)
            and self._head < len(items)
            and isinstance(items[self._head], _End)
            and self._halted is None
        )

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _next(self) -> _Live | _Direct | _Again | _End | None:
        items = self._items
        if self._head == len(items):
            return None
        item = items[self._head]
        self._head += 1
        if self._head == len(items):
            items.clear()  # also releases what was read
            self._head = 0
        elif self._head >= _COMPACT_AFTER and 2 * self._head >= len(items):
            # A pump that never quite catches up would otherwise keep every item it read.
            del items[: self._head]
            self._head = 0
        return item

    async def run(self, after_lsn: int, prelude: list[bytes], ended: bool = False) -> None:
        """Pump until cancelled, the send fails, or the end (``push_end``, or right after the
        catch-up if ``ended``)."""
        for data in prelude:
            await self.send(data, None)
        self.sent_lsn = after_lsn
        # (Not if live items overflowed while the prelude was going out.)
        live = self.live_after
        self._complete = not self._overflowed and live is not None and after_lsn >= live
        await self._catch_up()
        if self.caught_up is not None:
            self.caught_up()
        if ended:
            return
        while True:
            self._check_halted()
            if self._overflowed:
                await self._catch_up()
            item = self._next()
            if item is None:
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter
                continue
            if isinstance(item, _Direct):
                await self.send(item.data, None)
            elif isinstance(item, _End):
                await self._catch_up()  # anything dropped on overflow comes before the end
                return
            elif isinstance(item, _Again):
                await self.store.barrier()
                logged = await self.store.read_event(self.session_id, item.lsn)
                if logged is not None:
                    await self.send(logged, item.lsn)
            elif item.lsn > self.sent_lsn:
                if item.lsn != self.sent_lsn + 1:
                    await self._catch_up()  # a gap: the log has it (committed before item)
                    if item.lsn <= self.sent_lsn:
                        continue
                await item.committed
                await self._deliver(item.lsn, item.data)

    async def _catch_up(self) -> None:
        if self._complete:
            return
        # Both set before the commit wait: everything pushed until now is in the read below
        # (committed by then), and everything pushed from now on is in ``_items``, unless it
        # overflows again, which clears ``_complete`` for the next catch-up.
        self._overflowed = False
        self._complete = True
        await self.store.barrier()
        self._reading = True
        try:
            while True:
                rows = await self.store.read_events(
                    self.session_id, self.sent_lsn, _REPLAY_PAGE, self.stream
                )
                for lsn, data in rows:
                    await self._deliver(lsn, data)
                if len(rows) < _REPLAY_PAGE:
                    return
        finally:
            self._reading = False

    def _check_halted(self) -> None:
        # The owner's flag covers outboxes it no longer lists (an HTTP stream whose request
        # is done, still draining), which ``halt`` cannot reach.
        failed = self._halted or (self.owner.failed if self.owner is not None else None)
        if failed is not None:
            raise failed

    async def _deliver(self, lsn: int, data: bytes) -> None:
        self._check_halted()
        await self.send(data, lsn)
        self.sent_lsn = lsn
        self.on_sent(lsn)
