"""A peer that stops reading must not grow the daemon's memory (issue 15 finding 3).

Each test floods the real daemon from a real socket that never reads (its receive buffer made
small), measures the daemon's RSS from /proc before and after, and keeps a bystander session
calling a tool meanwhile. Before the output budget (``limits.max_output_bytes``), every pong and
every error reply was written without backpressure and held until the peer read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from pathlib import Path

import pytest

from mcproxy.config import DEFAULT_MAX_OUTPUT_BYTES
from mcproxy.core.websocket import OP_PING, OP_TEXT
from tests.e2e.test_ws_protocol import INIT, RawWs, upgrade
from tests.helpers import (
    MS,
    TIMEOUT,
    HttpClient,
    ProxyProcess,
    WsClient,
    client_frame,
    eventually,
    rss,
    tool_text,
)

MB = 1024 * 1024
# What the daemon may grow by during a flood from two deaf sockets: their two budgets, plus
# allocator slack, the parser's input and the bystander's traffic. Measured: 16-24 MB with the
# budget; 81-108 MB without it (the flood unfinished: more with more time).
RSS_BOUND = 2 * DEFAULT_MAX_OUTPUT_BYTES + 24 * MB


async def deaf_socket(port: int) -> RawWs:
    """A WebSocket whose client side never reads after the 101."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    ws = RawWs(*await asyncio.open_connection(sock=sock))
    ws.send(upgrade(port))
    assert (await ws.head()).startswith("HTTP/1.1 101 ")
    return ws


async def flood(ws: RawWs, chunk: bytes, total: int) -> bool:
    """Write ``total`` bytes of ``chunk`` repeats; False if the daemon dropped us first."""
    try:
        for _ in range(total // len(chunk)):
            ws.writer.write(chunk)
            await asyncio.wait_for(ws.writer.drain(), TIMEOUT)
            await asyncio.sleep(0)  # drain() does not yield while the socket takes it all
    except (ConnectionError, TimeoutError):
        return False
    return True


class Bystander:
    """Another client's session: it keeps calling a tool for the whole attack."""

    def __init__(self, client: WsClient) -> None:
        self.client = client
        self.calls = 0
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            # Served, but maybe slowly: the daemon parses the flood on the same core.
            answer = await self.client.response(
                await self.client.call_tool("echo", {"text": f"call {self.calls}"}), 3 * TIMEOUT
            )
            assert tool_text(answer) == f"call {self.calls}"
            self.calls += 1
            await asyncio.sleep(20 * MS)

    async def stop(self) -> None:
        assert not self.task.done() or self.task.exception() is None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.client.close()


@pytest.mark.parametrize("bound", [False, True], ids=["unbound", "bound"])
async def test_pings_and_bad_frames_from_a_peer_that_never_reads(
    proxy: ProxyProcess, bound: bool
) -> None:
    assert proxy.proc is not None
    client = await WsClient.connect(proxy.url)
    await client.initialize()
    bystander = Bystander(client)
    try:
        await asyncio.sleep(200 * MS)  # the bystander's first calls, before the baseline
        before = rss(proxy.proc.pid)
        pinger = await deaf_socket(proxy.port)
        garbler = await deaf_socket(proxy.port)
        if bound:  # a session bound first: error replies queue behind its outbox
            garbler.send(client_frame(OP_TEXT, INIT.encode()))
        pings = client_frame(OP_PING, b"p" * 125) * 512  # 64 KB: 58 MB of pongs for 60 MB
        garbage = client_frame(OP_TEXT, b"x") * 8192  # 56 KB of invalid JSON, one reply each
        results = await asyncio.gather(
            flood(pinger, pings, 60 * MB), flood(garbler, garbage, 8 * MB)
        )
        grown = rss(proxy.proc.pid) - before
        print(f"RSS grew by {grown / MB:.1f} MB during the flood (bound {RSS_BOUND / MB:.0f} MB)")
        assert grown < RSS_BOUND, f"RSS grew by {grown / MB:.1f} MB (flood done: {results})"
        assert any(e.get("event") == "ws.over_budget" for e in proxy.logs)
        assert bystander.calls >= 1
        before_calls = bystander.calls
        await asyncio.sleep(100 * MS)
        await client_still_served(bystander, before_calls)
        pinger.close()
        garbler.close()
    finally:
        await bystander.stop()


async def client_still_served(bystander: Bystander, calls: int) -> None:
    deadline = asyncio.get_running_loop().time() + 3 * TIMEOUT
    while bystander.calls <= calls:
        assert not bystander.task.done(), bystander.task.exception()
        assert asyncio.get_running_loop().time() < deadline, "the bystander is stuck"
        await asyncio.sleep(10 * MS)


async def test_a_peer_dropped_over_budget_resumes_its_session(proxy: ProxyProcess) -> None:
    """Over budget is a 1013, not a loss: the session and its log stay, the client resumes."""
    session_id = "deaf-session-0123456789"
    deaf = await deaf_socket(proxy.port)
    hello = json.loads(INIT)
    hello["mcpSessionId"] = session_id
    deaf.send(client_frame(OP_TEXT, json.dumps(hello).encode()))
    assert "result" in await deaf.message()  # the last thing it reads
    await flood(deaf, client_frame(OP_PING, b"p" * 125) * 512, 60 * MB)
    assert any(e.get("event") == "ws.over_budget" for e in proxy.logs)
    deaf.close()
    again = await WsClient.connect(proxy.url, session_id, last_lsn=0)
    try:
        replayed = await again.response(1)  # the initialize answer, from the log
        assert replayed["result"]["serverInfo"]
        await again.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        params = {"name": "echo", "arguments": {"text": "resumed"}}
        fine = await again.response(await again.request("tools/call", params, "after"))
        assert tool_text(fine) == "resumed"
    finally:
        await again.close()


async def test_an_sse_stream_nobody_reads_is_ended(tmp_path: Path) -> None:
    """The Streamable HTTP front: a GET stream whose client reads nothing is dropped once
    more than the budget waits for it; the session and its other clients go on. (aiohttp's
    own backpressure holds the buffer near one message, so the budget here is below one.)"""
    config = tmp_path / "mcproxy.toml"
    config.write_text(
        f"[server]\nsse_keepalive_s = {200 * MS}\n[limits]\nmax_output_bytes = {256 * 1024}\n"
    )
    proxy = ProxyProcess(tmp_path / "db.sqlite", None, "--config", str(config)).start()
    http = HttpClient(proxy.url)
    try:
        await http.initialize()
        assert http.session_id is not None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", proxy.port))
        deaf = RawWs(*await asyncio.open_connection(sock=sock))
        deaf.send(
            (
                f"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n"
                f"Accept: text/event-stream\r\nMcp-Session-Id: {http.session_id}\r\n"
                f"MCP-Protocol-Version: {http.version}\r\n\r\n"
            ).encode()
        )
        assert (await deaf.head()).startswith("HTTP/1.1 200 ")
        # It lands on the general stream as a log notification, sent after the call's own
        # stream ended. One message larger than the kernel's largest send buffer (the
        # maximum of net.ipv4.tcp_wmem, 4 MiB by default) plus the budget: whatever part of
        # it the kernel takes, the rest of that one write is over the budget. (Many smaller
        # messages are not enough: the pump then waits for the socket holding less than the
        # budget, with the rest in the log, which is bounded, so the stream is rightly kept.)
        big = "x" * (6 * 1024 * 1024)
        params = {"name": "notify_later", "arguments": {"text": big, "delay": 50 * MS}}
        assert "result" in await http.call("tools/call", params)

        def dropped() -> bool:
            return any(e.get("event") == "http.over_budget" for e in proxy.logs)

        await eventually(dropped)
        answer = await http.call("tools/call", {"name": "echo", "arguments": {"text": "on"}})
        assert tool_text(answer) == "on"
        deaf.close()
    finally:
        await http.close()
        proxy.kill()
