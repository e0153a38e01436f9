"""The reconnecting client library against the real daemon: cuts, restarts, supersession,
outages. Each test asserts no loss, no duplicate and no hang."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from mcproxy.client.connection import QueueFull, ReconnectOptions, Superseded
from mcproxy.client.mcp import MCPClient
from tests.helpers import (
    INIT_PARAMS,
    MS,
    TIMEOUT,
    ProxyProcess,
    eventually,
    free_port,
    logged,
    wait_until,
)

FAST = ReconnectOptions(min_reconnection_delay_s=0.05, max_reconnection_delay_s=0.5)


class Relay:
    """A TCP relay between client and proxy that the test can cut or hold down."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.down = False
        self.cuts = 0
        self._links: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/mcp"

    def cut(self) -> None:
        """Abort every open connection, as a network failure would (no close frame)."""
        self.cuts += 1
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._links.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()


def text(result: dict[str, Any]) -> str:
    return str(result["content"][0]["text"])


async def test_a_cut_mid_call_loses_and_repeats_nothing(proxy: ProxyProcess) -> None:
    relay = await Relay(proxy.port).start()
    progress: list[float] = []
    cut_done = asyncio.Event()

    def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)
        if value == 2 and not cut_done.is_set():
            relay.cut()
            cut_done.set()

    try:
        async with MCPClient(relay.url, options=FAST) as mcp:
            result = await mcp.call_tool(
                "slow", {"steps": 6, "delay": 0.1}, progress=on_progress, timeout_s=TIMEOUT
            )
            assert text(result) == "slow done after 6"
            assert progress == [1, 2, 3, 4, 5, 6]  # every note once, in order
            assert mcp._conn.connects == 2 and relay.cuts == 1
    finally:
        await relay.close()


async def test_a_proxy_restart_is_invisible_to_a_safe_call(tmp_path: Path) -> None:
    proxy = ProxyProcess(tmp_path / "db.sqlite", port=free_port()).start()
    first = asyncio.Event()
    try:
        async with MCPClient(f"ws://127.0.0.1:{proxy.port}/mcp", options=FAST) as mcp:
            await mcp.list_tools()  # the proxy learns slow_read is read-only

            async def restart() -> None:
                await first.wait()
                proxy.kill()
                await asyncio.to_thread(proxy.start)

            restarter = asyncio.create_task(restart())
            result = await mcp.call_tool(
                "slow_read", {"steps": 4, "delay": 250 * MS}, progress=lambda *_: first.set()
            )
            await restarter
            assert text(result) == "read done after 4"
            assert text(await mcp.call_tool("echo", {"text": "after"})) == "after"
    finally:
        proxy.kill()


async def test_a_burst_during_an_outage_runs_each_request_once(
    proxy: ProxyProcess, counter_dir: Path
) -> None:
    relay = await Relay(proxy.port).start()
    try:
        async with MCPClient(relay.url, options=FAST) as mcp:
            relay.down = True
            relay.cut()
            calls = [
                asyncio.create_task(mcp.call_tool("bump", {"name": f"b{i}"}, timeout_s=TIMEOUT))
                for i in range(25)
            ]
            await asyncio.sleep(200 * MS)  # the requests wait in the client's queue
            assert not any(c.done() for c in calls)
            relay.down = False
            results = await asyncio.gather(*calls)
            assert [r["structuredContent"]["result"] for r in results] == [1] * 25
            for i in range(25):
                assert (counter_dir / f"b{i}").read_text() == "x\n"
    finally:
        await relay.close()


async def test_the_queue_is_bounded_and_says_so(proxy: ProxyProcess) -> None:
    relay = await Relay(proxy.port).start()
    options = ReconnectOptions(min_reconnection_delay_s=0.05, max_enqueued_messages=2)
    try:
        async with MCPClient(relay.url, options=options) as mcp:
            relay.down = True
            relay.cut()
            await eventually(lambda: not mcp._conn._open.is_set())
            await mcp.notify("notifications/roots/list_changed")
            await mcp.notify("notifications/roots/list_changed")
            with pytest.raises(QueueFull):
                await mcp.notify("notifications/roots/list_changed")
    finally:
        await relay.close()


async def test_supersession_is_final(proxy: ProxyProcess, tmp_path: Path) -> None:
    state = tmp_path / "session.json"
    url = f"ws://127.0.0.1:{proxy.port}/mcp"
    first = MCPClient(url, options=FAST, state_file=state)
    await first.connect()
    try:
        await first.call_tool("echo", {"text": "one"})
        first._save_state()
        async with MCPClient(url, options=FAST, state_file=state) as second:
            assert second.session_id == first.session_id
            assert text(await second.call_tool("echo", {"text": "two"})) == "two"
            with pytest.raises(Superseded):
                await first.call_tool("echo", {"text": "late"}, timeout_s=TIMEOUT)
            await asyncio.sleep(100 * MS)  # proves an absence: no reconnect loop
            assert first._conn.connects == 1
    finally:
        await first.close()


async def test_a_restarted_client_process_resumes_from_its_state_file(
    proxy: ProxyProcess, tmp_path: Path
) -> None:
    state = tmp_path / "session.json"
    url = f"ws://127.0.0.1:{proxy.port}/mcp"
    async with MCPClient(url, state_file=state) as before:
        session_id = before.session_id
        await before.call_tool("notify_later", {"text": "while away", "delay": 300 * MS})
    # The note is logged while no client is connected ...
    assert session_id is not None
    wait_until(lambda: logged(proxy.db, session_id, "while away"))
    notes: list[dict[str, Any]] = []
    after = MCPClient(url, state_file=state)
    after.on_notification("notifications/message", notes.append)
    async with after:
        assert after.session_id == session_id
        await eventually(lambda: bool(notes))
        assert [n["data"] for n in notes] == ["while away"]
        assert text(await after.call_tool("echo", {"text": "same session"})) == "same session"


async def test_the_sdk_session_never_sees_a_cut(proxy: ProxyProcess) -> None:
    """The official ClientSession over mcproxy.client.sdk: reconnects stay below it."""
    from mcp import ClientSession
    from mcp.types import TextContent

    from mcproxy.client.sdk import reconnecting_transport

    relay = await Relay(proxy.port).start()
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)
        if value == 2:
            relay.cut()

    try:
        async with (
            reconnecting_transport(relay.url, options=FAST) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            result = await session.call_tool(
                "slow", {"steps": 5, "delay": 0.1}, progress_callback=on_progress
            )
            assert isinstance(result.content[0], TextContent)
            assert result.content[0].text == "slow done after 5"
            assert progress == [1, 2, 3, 4, 5] and relay.cuts == 1
            relay.cut()  # between calls too
            echo = await session.call_tool("echo", {"text": "still"})
            assert isinstance(echo.content[0], TextContent) and echo.content[0].text == "still"
    finally:
        await relay.close()


async def test_the_stdio_bridge_carries_a_session_across_a_cut(proxy: ProxyProcess) -> None:
    relay = await Relay(proxy.port).start()
    bridge = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcproxy", "connect", relay.url,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert bridge.stdin is not None and bridge.stdout is not None

    async def send(message: dict[str, Any]) -> None:
        assert bridge.stdin is not None
        bridge.stdin.write(json.dumps(message).encode() + b"\n")
        await bridge.stdin.drain()

    async def answer(rid: int) -> dict[str, Any]:
        assert bridge.stdout is not None
        while True:
            line = await asyncio.wait_for(bridge.stdout.readline(), TIMEOUT)
            message: dict[str, Any] = json.loads(line)
            if message.get("id") == rid and "method" not in message:
                return message

    try:
        await send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT_PARAMS})
        assert "serverInfo" in (await answer(1))["result"]
        await send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        call = {"name": "slow", "arguments": {"steps": 4, "delay": 0.15}}
        await send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": call})
        await asyncio.sleep(200 * MS)  # not waiting for anything: lands the cut mid-call
        relay.cut()  # mid-call: the bridge resumes, the answer still comes, once
        assert text((await answer(2))["result"]) == "slow done after 4"
        await send({"jsonrpc": "2.0", "id": 3, "method": "bogus/method"})
        assert (await answer(3))["error"]["code"] == -32601
        bridge.stdin.write(b"not json\n")
        await bridge.stdin.drain()
        parse_error = json.loads(await asyncio.wait_for(bridge.stdout.readline(), TIMEOUT))
        assert parse_error["error"]["code"] == -32700
        bridge.stdin.close()
        assert await asyncio.wait_for(bridge.wait(), TIMEOUT) == 0  # stdin's end: clean exit
    finally:
        if bridge.returncode is None:
            bridge.kill()
            await bridge.wait()
        await relay.close()


def ws_closes(proxy: ProxyProcess) -> list[int]:
    return [int(e["code"]) for e in proxy.events("ws.closed")]


async def test_the_client_and_the_sdk_adapter_close_with_a_close_frame(
    proxy: ProxyProcess,
) -> None:
    """Issue 16 item 12: both closed by dropping TCP; the server logged 1006 for each."""
    from mcp import ClientSession

    from mcproxy.client.sdk import reconnecting_transport

    url = f"ws://127.0.0.1:{proxy.port}/mcp"
    async with MCPClient(url) as mcp:
        assert text(await mcp.call_tool("echo", {"text": "bye"})) == "bye"
    await eventually(lambda: len(ws_closes(proxy)) == 1)
    async with (
        reconnecting_transport(url) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
    await eventually(lambda: len(ws_closes(proxy)) == 2)
    assert ws_closes(proxy) == [1000, 1000]


async def test_close_waits_for_the_handlers_it_cancels(proxy: ProxyProcess) -> None:
    """Issue 16 item 5: MCPClient.close cancelled its server-request handlers and returned
    while they still ran (their cleanup after the client was gone, their errors lost)."""
    started = asyncio.Event()
    finished: list[str] = []

    async def sampling(params: dict[str, Any]) -> dict[str, Any]:
        started.set()
        try:
            await asyncio.sleep(TIMEOUT)
        finally:
            await asyncio.sleep(0)  # cleanup that needs the loop a moment
            finished.append("cleaned up")
        return {}

    mcp = MCPClient(f"ws://127.0.0.1:{proxy.port}/mcp", sampling=sampling)
    await mcp.connect()
    call = asyncio.create_task(mcp.call_tool("sample", {"prompt": "hi"}))
    await asyncio.wait_for(started.wait(), TIMEOUT)
    await mcp.close()
    assert finished == ["cleaned up"]  # done by the time close returned
    call.cancel()
    with contextlib.suppress(BaseException):
        await call


@pytest.mark.parametrize("failure", ["queue", "line"])
async def test_the_bridge_exits_non_zero_when_its_pump_dies(
    proxy: ProxyProcess, failure: str
) -> None:
    """Issue 16 item 5: `mcproxy connect` exited 0 when its stdin pump failed."""
    # "queue": nothing listens, so every message waits in the bounded queue until it is full.
    url = f"ws://127.0.0.1:{free_port() if failure == 'queue' else proxy.port}/mcp"
    bridge = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcproxy", "connect", url,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert bridge.stdin is not None and bridge.stderr is not None
    try:
        if failure == "queue":
            note = b'{"jsonrpc":"2.0","method":"notifications/roots/list_changed"}\n'
            data = note * (ReconnectOptions().max_enqueued_messages + 10)
        else:
            data = b"x" * (16 * 1024 * 1024 + 1)  # no newline in sight
        with contextlib.suppress(ConnectionError):
            bridge.stdin.write(data)
            await bridge.stdin.drain()
        code = await asyncio.wait_for(bridge.wait(), TIMEOUT)
        stderr = (await bridge.stderr.read()).decode()
        assert code == 3, stderr
        assert ("QueueFull" if failure == "queue" else "LineTooLong") in stderr
    finally:
        if bridge.returncode is None:
            bridge.kill()
            await bridge.wait()
