"""``StdioUpstream`` with a real child (the SDK fixture server): failures reach the session."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Collection

from mcproxy.config import UpstreamConfig
from mcproxy.upstreams.stdio import StdioUpstream
from tests.helpers import FIXTURE_SERVER, INIT_PARAMS, TIMEOUT, pid_alive


class Session:
    def __init__(self, fail_on: int | None = None) -> None:
        self.messages: list[dict[str, object]] = []
        self.lost: list[str] = []
        self.changed = asyncio.Event()
        self.fail_on = fail_on

    def on_upstream_message(self, line: bytes, related: int | None = None) -> None:
        message = json.loads(line)
        if message.get("id") == self.fail_on:
            raise RuntimeError("bug in the session")
        self.messages.append(message)
        self.changed.set()

    def on_upstream_lost(self, reason: str, unsent: Collection[int] = ()) -> None:
        self.lost.append(reason)
        self.changed.set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


def init(request_id: int) -> bytes:
    message = {"jsonrpc": "2.0", "id": request_id, "method": "initialize", "params": INIT_PARAMS}
    return json.dumps(message).encode()


async def test_a_reader_that_dies_stops_the_child_and_loses_the_upstream() -> None:
    # Issue 16 item 5: the stdout reader raising (a bug in handling one line) used to leave
    # the child running with nobody reading it, and the session waiting forever.
    session = Session(fail_on=1)
    config = UpstreamConfig(stdin_close_grace_s=0.5, sigterm_grace_s=0.5)
    up = StdioUpstream((sys.executable, str(FIXTURE_SERVER)), session, config, "t")
    await up.start()
    assert up.pid is not None
    up.send(init(1))
    await session.until(lambda: bool(session.lost))
    assert "internal error" in session.lost[0] and "bug in the session" in session.lost[0]
    assert not pid_alive(up.pid)  # stopped, not left running unread
    await up.aclose()
    assert len(session.lost) == 1


async def test_a_healthy_child_is_not_reported_lost() -> None:
    session = Session()
    up = StdioUpstream((sys.executable, str(FIXTURE_SERVER)), session, UpstreamConfig(), "t")
    await up.start()
    up.send(init(1))
    await session.until(lambda: bool(session.messages))
    assert session.messages[0]["id"] == 1
    await up.aclose()
    assert not session.lost
