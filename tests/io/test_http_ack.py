"""The Streamable HTTP front acknowledges only what is committed.

A POST's response headers (and its priming event) tell the client its request was accepted and
which stream to resume with ``Last-Event-ID`` (MCP 2025-11-25 transports §"Resumability and
Redelivery"). If the proxy is killed after that but before the request reached the log, the next
process has never heard of the request. These tests read the database file itself, from another
connection, at the instant the client holds the acknowledgement: only committed rows are visible
there, exactly what a SIGKILL would leave.

With ``store.durability = "full"`` every commit runs (and fsyncs) in the writer's thread while
the event loop goes on serving, so an acknowledgement sent without waiting for the commit
reaches the client first. With "normal" the same happens during the writer's periodic WAL
restart; otherwise the window is one turn of the loop, which is what a crash hit in CI.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from mcproxy.config import load
from mcproxy.core.auth import TokenTable
from mcproxy.core.guard import HostPolicy
from mcproxy.engine.hub import Hub
from mcproxy.engine.store import Store
from mcproxy.fronts.app import build_app
from mcproxy.fronts.streamable import StreamableHttpFront
from mcproxy.fronts.ws import WebSocketFront
from mcproxy.metrics import Metrics
from mcproxy.ops.daemon import upstream_factory
from tests.helpers import SSE_HEADERS, fixture_upstream, read_sse


class _Proxy:
    def __init__(self, url: str, db: Path, http: aiohttp.ClientSession) -> None:
        self.url = url
        self.db = db
        self.http = http

    def committed(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        """What a SIGKILL now would leave: rows committed to the file, read from outside."""
        with sqlite3.connect(self.db) as conn:
            return conn.execute(sql, params).fetchall()


@pytest.fixture(params=["full", "normal"])
async def proxy(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[_Proxy]:
    db = tmp_path / "db.sqlite"
    store_config = {"path": str(db), "durability": request.param}
    config = load(None, {"upstream": {"target": fixture_upstream()}, "store": store_config})
    store = await Store.open(db, config.store.durability)
    hub = Hub(store, config, upstream_factory(config, store), Metrics(), TokenTable([]))
    guard = HostPolicy(config.server.allowed_hosts, config.server.allowed_origins, "127.0.0.1")
    http_front = StreamableHttpFront(hub, config, guard)
    ws_front = WebSocketFront(hub, config, guard)

    async def ready() -> dict[str, bool]:
        return {}

    runner = web.AppRunner(build_app(config, ws_front, http_front, ready, None, guard))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as http:
            yield _Proxy(f"http://127.0.0.1:{port}{config.server.path}", db, http)
    finally:
        http_front.close_all()
        await hub.aclose()
        await ws_front.aclose()
        await http_front.aclose()
        await runner.cleanup()
        await store.aclose()


def _initialize(rid: int) -> dict[str, object]:
    return {
        "jsonrpc": "2.0",
        "id": rid,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "ack-test", "version": "0"},
        },
    }


async def test_a_request_is_committed_before_its_stream_is_acknowledged(proxy: _Proxy) -> None:
    async with proxy.http.post(proxy.url, json=_initialize(1), headers=SSE_HEADERS) as resp:
        assert resp.status == 200
        session_id = resp.headers["Mcp-Session-Id"]
        # The client holds the session id: the session must survive a crash from here on.
        assert proxy.committed("SELECT id FROM sessions WHERE id = ?", session_id)
        assert proxy.committed("SELECT method FROM requests WHERE session_id = ?", session_id) == [
            ("initialize",)
        ]
        await read_sse(resp)
    headers = {**SSE_HEADERS, "Mcp-Session-Id": session_id, "MCP-Protocol-Version": "2025-11-25"}
    async with proxy.http.post(
        proxy.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers
    ) as resp:
        assert resp.status == 202
    for n in range(2, 12):  # every acknowledgement, not only a lucky first one
        call = {
            "jsonrpc": "2.0",
            "id": n,
            "method": "tools/call",
            # Not read-only: sent only once its row is committed. (A safe call may race its
            # record, and its answer may retire the row before this test looks.)
            "params": {"name": "slow", "arguments": {"steps": 0, "delay": 0}},
        }
        async with proxy.http.post(proxy.url, json=call, headers=headers) as resp:
            assert resp.status == 200
            primed = await read_sse(resp, lambda e: True)  # the priming event: resume point
            assert primed[0].id is not None and not primed[0].data
            assert proxy.committed(
                "SELECT method FROM requests WHERE session_id = ? AND client_key = ?",
                session_id,
                str(n),
            ) == [("tools/call",)], f"request {n} acknowledged before it was committed"
            await read_sse(resp)
