"""``StdioUpstream`` with a real child (the SDK fixture server): failures reach the session."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import uuid
from collections.abc import Callable, Collection

import pytest
import uvloop

from mcproxy.config import UpstreamConfig
from mcproxy.upstreams.stdio import StdioUpstream
from tests.helpers import FIXTURE_SERVER, INIT_PARAMS, TIMEOUT, eventually, pid_alive


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


def _children_marked(marker: str) -> list[int]:
    """Live (not zombie) processes whose environment carries ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as file:
                environ = file.read()
            with open(f"/proc/{entry}/stat", "rb") as file:
                state = file.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in environ and state != b"Z":
            found.append(int(entry))
    return found


async def _cancel_a_start(turns: int) -> None:
    marker = f"FIXTURE_CANCEL_MARK={uuid.uuid4().hex}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    session = Session()
    up = StdioUpstream((sys.executable, str(FIXTURE_SERVER)), session, UpstreamConfig(), "t", env)
    starting = asyncio.ensure_future(up.start())
    for _ in range(turns):
        await asyncio.sleep(0)
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await starting  # cancelled before it finished (or not): no child may remain
    await up.aclose()
    await eventually(lambda: not _children_marked(marker))
    assert not session.lost  # closing is not a loss


@pytest.mark.parametrize("turns", [0, 1, 2, 5, 20])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_start_cancelled_at_any_point_leaves_no_child(loop: str, turns: int) -> None:
    # Issue 16 item 6: a session closed while its child is being spawned (a client that
    # leaves mid-initialize) cancels ``start()``. Wherever the cancellation lands, no child
    # may be left running unowned, and closing the upstream afterwards is safe. On the
    # daemon's loop (uvloop) as well as asyncio's: the spawn is the loop's code.
    run = uvloop.run if loop == "uvloop" else asyncio.run
    run(_cancel_a_start(turns))
