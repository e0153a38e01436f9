"""A WebSocket whose outbox pump fails unexpectedly is closed 1011 (issue 16 item 5).

In process, over real sockets: the store's replay read fails with a raw ``sqlite3`` error (the
kind three store reads did not map to ``StoreError``). Before, the pump task died, the socket
stayed open and never sent again, and the only trace was a ``task.failed`` traceback.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import structlog

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
from tests.helpers import TIMEOUT, WsClient, fixture_upstream, tool_text


async def test_a_failed_pump_closes_the_socket_with_1011(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    config = load(None, {"upstream": {"target": fixture_upstream()}, "store": {"path": str(db)}})
    store = await Store.open(db, config.store.durability)
    hub = Hub(store, config, upstream_factory(config, store), Metrics(), TokenTable([]))
    guard = HostPolicy(config.server.allowed_hosts, config.server.allowed_origins, "127.0.0.1")
    http_front = StreamableHttpFront(hub, config, guard)
    ws_front = WebSocketFront(hub, config, guard)

    async def ready() -> dict[str, bool]:
        return {}

    runner = aiohttp.web.AppRunner(build_app(config, ws_front, http_front, ready, None, guard))
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"ws://127.0.0.1:{runner.addresses[0][1]}{config.server.path}"
    try:
        client = await WsClient.connect(url)
        init = await client.initialize()
        session_id = init["result"]["mcpSessionId"]
        assert tool_text(await client.response(await client.call_tool("echo", {"text": "x"})))
        await client.drop()

        async def failing_read(*args: Any, **kwargs: Any) -> Any:
            raise sqlite3.OperationalError("disk I/O error")

        store.read_events = failing_read  # type: ignore[method-assign]
        with structlog.testing.capture_logs() as logs:
            again = await WsClient.connect(url, session_id, last_lsn=0)  # a replay: it reads
            try:
                frame = await again.ws.receive(timeout=TIMEOUT)
                assert frame.type is aiohttp.WSMsgType.CLOSE and frame.data == 1011
            finally:
                await again.close()
        failures = [e for e in logs if e["event"] in ("ws.pump_failed", "task.failed")]
        assert [e["event"] for e in failures] == ["ws.pump_failed"]  # once, and ours
        assert "disk I/O error" in failures[0]["error"]
    finally:
        http_front.close_all()
        await hub.aclose()
        await ws_front.aclose()
        await http_front.aclose()
        await runner.cleanup()
        await store.aclose()
