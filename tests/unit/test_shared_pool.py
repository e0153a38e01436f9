"""The shared pool's I/O half (``upstreams.shared``): processes, timers and the per-session
``SharedUpstream``, with fake child processes (the routing itself is tested loop-free in
test_shared_router.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection
from typing import Any

import pytest

from mcproxy.errors import UpstreamError
from mcproxy.upstreams.shared import PoolHandover, SharedPool, SharedUpstream
from mcproxy.upstreams.stdio import HandedOver
from tests.helpers import MS, eventually

INIT_RESULT = {"protocolVersion": "2025-11-25", "capabilities": {}, "serverInfo": {"name": "c"}}


class FakeProc:
    """Stands in for a child process (``StdioUpstream``): records every line sent to it.
    What the child writes is fed to ``handler``, the pool's demultiplexer for it."""

    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.sent: list[dict[str, Any]] = []
        self.closed = False
        self.on_close: list[bytes] = []  # lines it writes while it is being stopped

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        for line in self.on_close:
            self.handler.on_upstream_message(line)
        self.closed = True

    def send(self, data: bytes) -> None:
        self.sent.append(json.loads(data))

    def take(self) -> list[dict[str, Any]]:
        sent, self.sent = self.sent, []
        return sent


class Recorder:
    """A session as the shared upstream sees it (``UpstreamHandler``)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.lost: list[str] = []
        self.unsent: list[list[int]] = []

    def on_upstream_message(self, line: bytes, related: int | None = None) -> None:
        self.messages.append(json.loads(line))

    def on_upstream_lost(self, reason: str, unsent: Collection[int] = ()) -> None:
        self.lost.append(reason)
        self.unsent.append(sorted(unsent))


def request(rid: int | str, method: str, params: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params or {}})\
        .encode()  # fmt: skip


def result(rid: int | str, value: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rid, "result": value}).encode()


class Rig:
    def __init__(self, size: int = 1, max_in_flight: int = 0, timeout: float = 5.0) -> None:
        self.spawned: list[FakeProc] = []
        self.pool = SharedPool(self.spawn, size, timeout, max_in_flight)

    def spawn(self, handler: Any, label: str) -> FakeProc:
        proc = FakeProc(handler)
        self.spawned.append(proc)
        return proc

    def slow_starts(self) -> asyncio.Event:
        """From now on a child's start waits for the returned event to be set."""
        gate = asyncio.Event()

        def slow(handler: Any, label: str) -> FakeProc:
            proc = self.spawn(handler, label)

            async def start() -> None:
                await gate.wait()

            proc.start = start  # type: ignore[method-assign]
            return proc

        self.pool.spawn = slow
        return gate

    @property
    def proc(self) -> FakeProc:
        proc = self.pool.children[0].proc
        assert isinstance(proc, FakeProc)
        return proc

    async def session(self) -> tuple[SharedUpstream, Recorder]:
        recorder = Recorder()
        up = self.pool("session-id-0123456789", recorder)
        await up.start()
        up.send(request(1, "initialize", {"capabilities": {}}))
        assert up.index is not None
        proc = self.pool.children[up.index].proc
        assert isinstance(proc, FakeProc)
        for sent in proc.take():
            if sent.get("method") == "initialize":
                proc.handler.on_upstream_message(result(sent["id"], INIT_RESULT))
                proc.take()
        await asyncio.sleep(0)  # the pool's own answers are delivered after the event
        assert recorder.messages.pop() == {"jsonrpc": "2.0", "id": 1, "result": INIT_RESULT}
        return up, recorder


async def test_losing_the_child_loses_every_session_and_the_next_start_respawns_it() -> None:
    rig = Rig(max_in_flight=1)
    sessions = [await rig.session() for _ in range(3)]
    sessions[0][0].send(request(2, "tools/call", {"name": "x"}))
    sessions[0][0].send(request(3, "tools/call", {"name": "queued"}))
    dead = rig.proc
    dead.handler.on_upstream_lost("exit status 3")
    assert [r.lost for _, r in sessions] == [["exit status 3"]] * 3
    assert sessions[0][1].unsent == [[3]]
    assert rig.pool.children[0].proc is None and not rig.pool.sessions
    sessions[1][0].send(request(3, "ping"))  # a lost upstream sends nothing
    dead.handler.on_upstream_lost("again")  # reported once
    assert [len(r.lost) for _, r in sessions] == [1, 1, 1]
    again = [rig.pool("s", Recorder()) for _ in range(3)]
    await asyncio.gather(*(up.start() for up in again))  # one restart for everyone
    assert len(rig.spawned) == 2 and rig.proc is not dead
    dead.handler.on_upstream_message(result(1, {}))  # a stale line of the dead process
    assert all(r.messages == [] for _, r in sessions)
    assert set(rig.pool.sessions.values()) == set(again)
    assert rig.pool.snapshot().events["lost"] == 1


async def test_sessions_spread_over_the_pool() -> None:
    rig = Rig(size=2)
    sessions = [await rig.session() for _ in range(4)]
    assert [len(c.sessions) for c in rig.pool.router.children] == [2, 2]
    assert len(rig.spawned) == 2
    (a, _), (b, _) = sessions[0], sessions[1]
    assert a.index != b.index
    state = rig.pool.snapshot()
    assert state.children == 2 and state.in_flight == 0 and state.events["spawned"] == 2


async def test_a_child_lives_as_long_as_it_has_sessions() -> None:
    rig = Rig()
    (a, _), (b, _) = await rig.session(), await rig.session()
    first = rig.proc
    await a.aclose()
    await a.aclose()  # idempotent
    assert not first.closed  # b is still on it
    await b.aclose()
    late = rig.pool("s", Recorder())
    await late.start()  # waits for the stop, then starts a new child
    assert first.closed and rig.proc is not first and len(rig.spawned) == 2
    late.send(request(1, "initialize", {"capabilities": {}}))
    assert rig.proc.take()[0]["method"] == "initialize"  # the new child needs its own
    await rig.pool.aclose()
    assert rig.pool.children[0].proc is None
    # A session starting during the shutdown waits to be closed rather than fail (its runner
    # would answer its pending requests with an error; persisted, the next process has them).
    starting = asyncio.ensure_future(rig.pool("s", Recorder()).start())
    for _ in range(3):
        await asyncio.sleep(0)
    assert not starting.done() and len(rig.spawned) == 2
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting


async def test_a_session_whose_child_starts_as_the_pool_closes_waits_to_be_closed() -> None:
    rig = Rig()
    gate = rig.slow_starts()
    starting = asyncio.ensure_future(rig.pool("s", Recorder()).start())
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(rig.pool.aclose())
    await asyncio.sleep(0)
    gate.set()
    await closing  # the spawn finished after the close began: the process is stopped
    assert rig.spawned[0].closed and not starting.done()
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting


async def test_a_session_closed_while_starting_leaves_the_child_idle() -> None:
    rig = Rig()
    up = rig.pool("s", Recorder())
    starting = asyncio.ensure_future(up.start())
    await up.aclose()
    await starting
    assert up.sid is None and not rig.pool.sessions
    assert rig.pool.children[0].proc is None  # stopping: nobody is on it
    await eventually(lambda: rig.spawned[0].closed)


async def test_a_child_that_cannot_start_fails_the_sessions_starting() -> None:
    rig = Rig()

    def broken(handler: Any, label: str) -> Any:
        proc = FakeProc(handler)

        async def start() -> None:
            raise UpstreamError("cannot start 'nope'")

        proc.start = start  # type: ignore[method-assign]
        return proc

    rig.pool.spawn = broken
    results = await asyncio.gather(
        *(rig.pool("s", Recorder()).start() for _ in range(3)), return_exceptions=True
    )
    assert [str(r) for r in results] == ["cannot start 'nope'"] * 3
    assert rig.pool.children[0].proc is None and rig.pool.router.children[0].reserved == 0


async def test_a_child_that_does_not_answer_initialize_is_killed_and_lost() -> None:
    rig = Rig(timeout=10 * MS)
    recorder = Recorder()
    up = rig.pool("s", recorder)
    await up.start()
    up.send(request(1, "initialize", {}))
    proc = rig.proc
    await eventually(lambda: recorder.lost)
    assert recorder.lost == ["the shared upstream did not answer initialize in time"]
    assert proc.closed and rig.pool.children[0].proc is None


async def test_answers_written_while_the_pool_stops_are_delivered() -> None:
    """Issue 16, item 11: an answer the child writes during the shutdown reaches its session
    (the daemon closes the pool before the sessions, so it is logged)."""
    rig = Rig()
    (a, ra) = await rig.session()
    a.send(request(7, "tools/call", {"name": "slow"}))
    (call,) = rig.proc.take()
    rig.proc.on_close.append(result(call["id"], "done"))
    await rig.pool.aclose()
    assert ra.messages == [{"jsonrpc": "2.0", "id": 7, "result": "done"}]
    assert ra.lost == []  # sessions are not told: they are closed next, and persisted
    await a.aclose()  # then the session leaves: nothing left to cancel
    assert rig.spawned[0].sent == []
    await rig.pool.aclose()  # idempotent


@pytest.mark.parametrize("size", [0, -1])
def test_a_pool_needs_a_child(size: int) -> None:
    with pytest.raises(ValueError, match="at least one"):
        SharedPool(FakeProc, size, 1.0)


def test_config_and_factory() -> None:
    from mcproxy import config
    from mcproxy.errors import ConfigError
    from mcproxy.ops.daemon import upstream_factory

    assert config.Config().upstream.mode == "per-session"
    shared = config.load(None, {"upstream": {"mode": "shared", "pool_size": 3}})
    pool = upstream_factory(shared, None)  # type: ignore[arg-type]  # stdio needs no store
    assert isinstance(pool, SharedPool) and len(pool.children) == 3
    with pytest.raises(ConfigError, match="needs a 'stdio:' target"):
        config.load(None, {"upstream": {"mode": "shared", "target": "https://h/mcp"}})
    with pytest.raises(ConfigError, match=r"upstream.pool_size: .* >= 1"):
        config.load(None, {"upstream": {"mode": "shared", "pool_size": 0}})
    with pytest.raises(ConfigError, match="mode"):
        config.load(None, {"upstream": {"mode": "pooled"}})


async def test_cancelling_one_starting_session_leaves_the_others_starting() -> None:
    # Issue 16 item 6: two sessions wait for the same child to spawn; the first is cancelled
    # (its client left). The spawn goes on, the second session attaches and works, the
    # cancelled one holds no place on the child.
    rig = Rig()
    gate = rig.slow_starts()
    first, second = rig.pool("s1", Recorder()), rig.pool("s2", Recorder())
    starting = [asyncio.ensure_future(up.start()) for up in (first, second)]
    await asyncio.sleep(0)
    starting[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting[0]
    assert not starting[1].done()
    gate.set()
    await starting[1]  # not handed the first one's CancelledError
    assert len(rig.spawned) == 1 and not rig.spawned[0].closed
    assert first.sid is None and second.sid is not None
    assert list(rig.pool.sessions) == [second.sid]
    second.send(request(1, "initialize", {"capabilities": {}}))
    assert "initialize" in [m.get("method") for m in rig.proc.take()]  # it reached the child
    await second.aclose()
    await rig.pool.aclose()


async def test_an_answer_read_while_the_next_child_is_adopted_waits_for_its_session() -> None:
    """After a reload in place the first child taken up is read from the next loop turn on
    (its reader task), while the next child's adoption awaits its pipes: an answer the
    child wrote during the exec (already in its pipe) is routed then, before any session
    is loaded. It is held for its session and delivered once it is loaded, never dropped
    (a lost answer left a client waiting for a call in flight, issue: e2e
    test_shared_pool_children_are_kept_with_their_calls_in_flight under load)."""
    old = Rig(size=2)
    (a, _), (b, _) = await old.session(), await old.session()
    assert (a.index, b.index) == (0, 1) and a.sid is not None and b.sid is not None
    a.send(request(7, "tools/call", {"name": "bump"}))
    b.send(request(8, "tools/call", {"name": "bump"}))
    proc_a, proc_b = old.pool.children[0].proc, old.pool.children[1].proc
    assert isinstance(proc_a, FakeProc) and isinstance(proc_b, FakeProc)
    ((call_a,), (call_b,)) = proc_a.take(), proc_b.take()
    handed = HandedOver(pid=0, stdin_fd=-1, stdout_fd=-1, stderr_fd=-1, unread=b"")
    new = Rig(size=2)
    adopted: dict[str, FakeProc] = {}

    async def adopt(_: HandedOver, handler: Any, label: str) -> FakeProc:
        await asyncio.sleep(0)  # connecting its pipes to the loop: the loop turns
        proc = adopted[label] = FakeProc(handler)
        # Its reader task runs from the next loop turn (``StdioUpstream.attach`` spawns it
        # last): what the child wrote during the exec is read then.
        answer = call_a if label == "shared#0" else call_b
        asyncio.get_running_loop().call_soon(
            handler.on_upstream_message, result(answer["id"], {"from": label})
        )
        return proc

    sids = await new.pool.take_over(
        PoolHandover([(0, handed), (1, handed)], old.pool.router.snapshot()), adopt
    )
    assert sids is not None and sorted(sids) == sorted([a.sid, b.sid])
    await asyncio.sleep(0)
    got = {sid: Recorder() for sid in sids}
    for sid, recorder in got.items():
        new.pool.reattach(sid, recorder)
    await asyncio.sleep(0)
    assert got[a.sid].messages == [{"jsonrpc": "2.0", "id": 7, "result": {"from": "shared#0"}}]
    assert got[b.sid].messages == [{"jsonrpc": "2.0", "id": 8, "result": {"from": "shared#1"}}]
    assert new.pool.router.in_flight() == 0
