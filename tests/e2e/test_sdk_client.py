"""The official `mcp` SDK client works through the proxy, over both fronts.

Streamable HTTP uses the SDK's own ``streamable_http_client``. The SDK (2.x) ships no
WebSocket transport, so the test brings a minimal one: the SDK's stream contract is a
(read_stream, write_stream) pair of SessionMessage streams.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from mcp import Client, ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.message import SessionMessage
from mcp.types import (
    CreateMessageResult,
    ElicitResult,
    TextContent,
    jsonrpc_message_adapter,
)
from pydantic import ValidationError

from tests.helpers import ProxyProcess, free_port


@asynccontextmanager
async def websocket_transport(url: str) -> AsyncIterator[tuple[Any, Any]]:
    read_w, read_r = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_w, write_r = anyio.create_memory_object_stream[SessionMessage](0)
    async with aiohttp.ClientSession() as http, http.ws_connect(url, protocols=("mcp",)) as ws:

        async def reader() -> None:
            async with read_w:
                async for frame in ws:
                    if frame.type is not aiohttp.WSMsgType.TEXT:
                        break
                    try:
                        message = jsonrpc_message_adapter.validate_json(frame.data)
                    except ValidationError as exc:
                        await read_w.send(exc)
                        continue
                    await read_w.send(SessionMessage(message))

        async def writer() -> None:
            async with write_r:
                async for sm in write_r:
                    await ws.send_str(sm.message.model_dump_json(by_alias=True, exclude_unset=True))

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            tg.start_soon(writer)
            try:
                yield read_r, write_w
            finally:
                tg.cancel_scope.cancel()


async def on_sampling(ctx: Any, params: Any) -> CreateMessageResult:
    return CreateMessageResult(
        role="assistant", model="test", content=TextContent(type="text", text="sampled!")
    )


async def on_elicit(ctx: Any, params: Any) -> ElicitResult:
    return ElicitResult(action="accept", content={"name": "Grace"})


def transport(kind: str, url: str) -> Any:
    return websocket_transport(url) if kind == "ws" else streamable_http_client(url)


@pytest.mark.parametrize("kind", ["ws", "http"])
async def test_sdk_client_session_through_proxy(proxy: ProxyProcess, kind: str) -> None:
    progress: list[float] = []
    errors: list[Exception] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    async def on_message(message: Any) -> None:
        if isinstance(message, Exception):  # the proxy's additions must validate cleanly
            errors.append(message)

    async with (
        transport(kind, proxy.url) as (read, write),
        ClientSession(
            read,
            write,
            sampling_callback=on_sampling,
            elicitation_callback=on_elicit,
            message_handler=on_message,
        ) as session,
    ):
        init = await session.initialize()
        assert init.server_info.name == "fixture"
        tools = await session.list_tools()
        assert {"echo", "slow", "ask", "sample"} <= {t.name for t in tools.tools}
        echo = await session.call_tool("echo", {"text": "sdk"})
        assert isinstance(echo.content[0], TextContent) and echo.content[0].text == "sdk"
        slow = await session.call_tool(
            "slow", {"steps": 3, "delay": 0.01}, progress_callback=on_progress
        )
        assert not slow.is_error and progress == [1, 2, 3]
        asked = await session.call_tool("ask", {"message": "name?"})
        assert isinstance(asked.content[0], TextContent)
        assert asked.content[0].text == "accept:Grace"
        sampled = await session.call_tool("sample", {"prompt": "hi"})
        assert isinstance(sampled.content[0], TextContent)
        assert sampled.content[0].text == "sampled!"
    assert errors == []


async def test_sdk_resumes_its_http_stream_across_a_proxy_sigkill(tmp_path: Path) -> None:
    """The SDK's own Last-Event-ID resumption completes a call the proxy was killed during."""
    proxy = ProxyProcess(tmp_path / "db.sqlite", port=free_port()).start()
    progress: list[float] = []
    first = anyio.Event()

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)
        first.set()

    try:
        async with (
            streamable_http_client(proxy.url) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            await session.list_tools()  # slow_read is read-only: safe to re-issue
            async with anyio.create_task_group() as tg:

                async def killer() -> None:
                    await first.wait()
                    proxy.kill()
                    await anyio.to_thread.run_sync(proxy.start)  # same port and database

                tg.start_soon(killer)
                result = await session.call_tool(
                    "slow_read", {"steps": 4, "delay": 0.25}, progress_callback=on_progress
                )
            assert isinstance(result.content[0], TextContent)
            assert result.content[0].text == "read done after 4"
            # Re-issued on the new process (it starts over at 1); what it reports below what
            # the client saw is held back: progress MUST increase (basic/utilities/progress).
            assert progress == sorted(set(progress)) and progress[-1] == 4, progress
            assert len(proxy.events("daemon.listening")) == 2
            echo = await session.call_tool("echo", {"text": "still here"})
            assert isinstance(echo.content[0], TextContent) and echo.content[0].text == "still here"
    finally:
        proxy.kill()


async def test_a_2026_era_client_falls_back_to_the_legacy_handshake(proxy: ProxyProcess) -> None:
    """``Client(mode="auto")`` probes ``server/discover``; the proxy answers 400 naming the
    versions it speaks, and the client settles on ``initialize`` (docs/PROTOCOL.md)."""
    async with Client(proxy.url, mode="auto") as client:
        assert client.protocol_version == "2025-11-25"
        result = await client.call_tool("echo", {"text": "auto"})
        assert isinstance(result.content[0], TextContent) and result.content[0].text == "auto"
