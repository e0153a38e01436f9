"""A client that is done ends its session, and its upstream child exits at once instead of
idling until it is parked (``sessions.park_after_s``, 300 s by default; issue 20).

Real daemon, real stdio children (per-session mode), real clients: HTTP DELETE, and its
WebSocket equivalent, a close 1000 with the reason ``MCP session terminated``
(docs/PROTOCOL.md *Ending a session*), sent by ``MCPClient.end()``. A plain close keeps both.
"""

from __future__ import annotations

import asyncio

from mcproxy.client.mcp import MCPClient
from tests.helpers import (
    MS,
    HttpClient,
    ProxyProcess,
    eventually,
    messages,
    pid_alive,
    tool_text,
)


async def _child_of_last_session(proxy: ProxyProcess) -> int:
    await eventually(lambda: len(proxy.upstream_pids()) > 0)
    return proxy.upstream_pids()[-1]


async def _session_gone(proxy: ProxyProcess, session_id: str) -> bool:
    client = HttpClient(proxy.url)
    client.session_id = session_id
    try:
        resp, events = await client.request("tools/list")
        return resp.status == 404 and messages(events)[0]["error"]["code"] == -32001
    finally:
        await client.close()


async def test_http_delete_stops_the_child_at_once(proxy: ProxyProcess) -> None:
    client = HttpClient(proxy.url)
    try:
        await client.initialize()
        echo = {"name": "echo", "arguments": {"text": "x"}}
        assert tool_text(await client.call("tools/call", echo)) == "x"
        child = await _child_of_last_session(proxy)
        assert pid_alive(child)
        async with client.http.delete(client.url, headers=client.headers()) as gone:
            assert gone.status == 204
        # No wait for the sweeper: the DELETE itself stopped it.
        await eventually(lambda: not pid_alive(child))
        assert client.session_id is not None
        assert await _session_gone(proxy, client.session_id)
    finally:
        await client.close()


async def test_a_websocket_client_that_ends_its_session_stops_the_child(
    proxy: ProxyProcess,
) -> None:
    async with MCPClient(proxy.url.replace("http://", "ws://")) as mcp:
        assert (await mcp.call_tool("echo", {"text": "x"}))["content"][0]["text"] == "x"
        session_id = mcp.session_id
        child = await _child_of_last_session(proxy)
        await mcp.end()
    await eventually(lambda: not pid_alive(child))
    await eventually(lambda: len(proxy.events("session.terminated")) == 1)
    assert session_id is not None
    assert await _session_gone(proxy, session_id)


async def test_a_plain_close_keeps_the_session_and_its_child(proxy: ProxyProcess) -> None:
    """A disconnect is not an end (SEP-1288): the same steps with close() change nothing."""
    async with MCPClient(proxy.url.replace("http://", "ws://")) as mcp:
        assert (await mcp.call_tool("echo", {"text": "x"}))["content"][0]["text"] == "x"
        session_id = mcp.session_id
        child = await _child_of_last_session(proxy)
    await eventually(lambda: len(proxy.events("ws.closed")) == 1)
    await asyncio.sleep(50 * MS)
    assert pid_alive(child)
    assert not proxy.events("session.terminated")
    assert session_id is not None
    assert not await _session_gone(proxy, session_id)
