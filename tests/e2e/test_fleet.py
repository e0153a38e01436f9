"""A fleet (issue 19, docs/DEPLOY.md): three instances behind the real HAProxy and nginx on
the shipped configurations, sessions on both fronts routed by the instance in their id.

One scenario per balancer: 300 sessions (WebSocket by URL, WebSocket by cookie, Streamable
HTTP by header) spread over a, b and c; b is SIGKILLed and restarted (its sessions resume,
the others' connections never drop); c is drained (new sessions avoid it, its own are still
served), stopped for maintenance and started again (its sessions resume); the balancer
restarts and every session is still routed to its owner; no session is ever stored by two
instances.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from mcproxy.client.connection import ReconnectOptions
from mcproxy.client.mcp import MCPClient
from mcproxy.core.ids import instance_of
from tests.e2e.fleet import NAMES, Balancer, instance, stored_sessions
from tests.helpers import INIT_PARAMS, MS, TIMEOUT, HttpClient, free_port, messages

SESSIONS = 300
FAST = ReconnectOptions(min_reconnection_delay_s=0.05, max_reconnection_delay_s=0.3)
T = TypeVar("T")


async def retrying(action: Callable[[], Awaitable[T]], timeout: float = 3 * TIMEOUT) -> T:
    """Retry what a client retries while the owner of its session is away (421 from another
    instance, 502/503 from the balancer, a refused connection)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await action()
        except (aiohttp.ClientError, ConnectionError, OSError, Misrouted):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(50 * MS)


class Misrouted(Exception):
    pass


class CookieClient:
    """SEP draft v0 in a browser's way: the id lives in the mcp_session_id cookie only."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.session_id = ""
        self.ids = 0
        self.connects = 0

    async def connect(self) -> None:
        self.ws = await self.http.ws_connect(self.url, protocols=("mcp",))
        self.connects += 1

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        assert self.ws is not None
        self.ids += 1
        await self.ws.send_str(
            json.dumps({"jsonrpc": "2.0", "id": self.ids, "method": method, "params": params})
        )
        while True:
            frame = await self.ws.receive(timeout=TIMEOUT)
            if frame.type is not aiohttp.WSMsgType.TEXT:
                raise ConnectionError(f"closed: {frame.data!r} {frame.extra!r}")
            message: dict[str, Any] = json.loads(frame.data)
            if message.get("id") == self.ids:
                return message

    async def start(self) -> None:
        await self.connect()
        result = await self.call("initialize", INIT_PARAMS)
        self.session_id = result["result"]["mcpSessionId"]
        assert self.ws is not None
        await self.ws.send_str('{"jsonrpc":"2.0","method":"notifications/initialized"}')

    async def echo(self, text: str) -> str:
        if self.ws is None or self.ws.closed:
            await self.connect()  # the cookie names the session: attached at the upgrade
        try:
            answer = await self.call("tools/call", {"name": "echo", "arguments": {"text": text}})
        except ConnectionError:
            self.ws = None
            raise
        return str(answer["result"]["content"][0]["text"])

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        await self.http.close()


async def http_echo(client: HttpClient, text: str) -> str:
    resp, events = await client.request("tools/call", {"name": "echo", "arguments": {"text": text}})
    if resp.status != 200:
        raise Misrouted(f"HTTP {resp.status}")
    return str(messages(events)[-1]["result"]["content"][0]["text"])


async def http_start(client: HttpClient) -> None:
    resp, events = await client.request("initialize", INIT_PARAMS)
    assert resp.status == 200, events
    client.session_id = resp.headers["Mcp-Session-Id"]
    assert await client.notify("notifications/initialized") == 202


class Fleet:
    def __init__(self, tmp: Path, kind: str) -> None:
        self.ports = {name: free_port() for name in NAMES}
        self.proxies = {name: instance(tmp, name, self.ports[name]) for name in NAMES}
        self.balancer = Balancer(kind, tmp, self.ports)

    def start(self) -> None:
        for proxy in self.proxies.values():
            proxy.start()
        self.balancer.start()

    def stop(self) -> str:
        for proxy in self.proxies.values():
            proxy.kill()
        return self.balancer.stop()


@pytest.fixture(params=["haproxy", "nginx"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    f = Fleet(tmp_path, request.param)
    f.start()
    yield f
    f.stop()


async def test_sessions_route_by_their_instance_through_kills_and_drains(fleet: Fleet) -> None:
    base = fleet.balancer.url
    ws_url = base.replace("http://", "ws://")
    gate = asyncio.Semaphore(30)
    by_url = [MCPClient(ws_url, options=FAST) for _ in range(SESSIONS // 3)]
    by_cookie = [CookieClient(ws_url) for _ in range(SESSIONS // 3)]
    by_header = [HttpClient(base) for _ in range(SESSIONS - 2 * (SESSIONS // 3))]

    async def gated(action: Awaitable[T]) -> T:
        async with gate:
            return await action

    try:
        await asyncio.gather(
            *(gated(c.connect()) for c in by_url),
            *(gated(c.start()) for c in by_cookie),
            *(gated(http_start(c)) for c in by_header),
        )
        owner: dict[str, str] = {}  # session id -> instance, from the id alone
        clients: list[tuple[str, Any]] = []
        for c in [*by_url, *by_cookie, *by_header]:
            sid = c.session_id
            assert sid is not None
            name = instance_of(sid)
            assert name in NAMES, sid
            owner[sid] = name
            clients.append((sid, c))
        spread = Counter(owner.values())
        assert all(spread[name] >= SESSIONS // 10 for name in NAMES), spread

        async def echo(client: Any, text: str) -> str:
            if isinstance(client, MCPClient):
                result = await client.call_tool("echo", {"text": text}, timeout_s=3 * TIMEOUT)
                return str(result["content"][0]["text"])
            if isinstance(client, CookieClient):
                return await retrying(lambda: client.echo(text))
            return await retrying(lambda: http_echo(client, text))

        async def everyone(text: str, only: str | None = None) -> None:
            chosen = [(s, c) for s, c in clients if only is None or owner[s] == only]
            answers = await asyncio.gather(*(gated(echo(c, f"{text}-{s}")) for s, c in chosen))
            assert answers == [f"{text}-{s}" for s, _ in chosen]

        await everyone("first")

        # --- b dies (SIGKILL) and comes back on the same port and database -------------
        b = fleet.proxies["b"]
        b.kill()
        victim = next(c for s, c in clients if owner[s] == "b" and isinstance(c, HttpClient))
        resp, _ = await victim.request("tools/call", {"name": "echo", "arguments": {"text": "x"}})
        assert resp.status in (421, 502, 503), resp.status  # told, never served elsewhere
        b.start()
        await everyone("after-kill")
        for sid, c in clients:  # the others never noticed: not one of their sockets dropped
            if owner[sid] != "b" and isinstance(c, MCPClient | CookieClient):
                connects = c._conn.connects if isinstance(c, MCPClient) else c.connects
                assert connects == 1, (sid, connects)

        # --- c is drained: new sessions avoid it, its own are still served --------------
        await fleet.balancer.drain("c")
        fresh = [HttpClient(base) for _ in range(30)]
        try:
            await asyncio.gather(*(http_start(c) for c in fresh))
            assert all(instance_of(c.session_id or "") in ("a", "b") for c in fresh)
            fresh_ids = {c.session_id for c in fresh}
        finally:
            await asyncio.gather(*(c.close() for c in fresh))
        await everyone("drained", only="c")
        # Maintenance: c stops (SIGTERM: 1012 to its sockets, SSE ended), starts again.
        assert fleet.proxies["c"].terminate() == 0
        fleet.proxies["c"].start()
        await everyone("after-maintenance")

        # --- the balancer restarts: it learnt nothing, so it forgets nothing -----------
        fleet.balancer.stop()
        fleet.balancer.start()
        await everyone("after-balancer-restart")

        # --- no twin, anywhere ----------------------------------------------------------
        stored = {name: stored_sessions(fleet.proxies[name].db) for name in NAMES}
        for name, ids in stored.items():
            assert all(instance_of(sid) == name for sid in ids), name
        assert set(owner) | fresh_ids == set().union(*stored.values())
        assert sum(len(ids) for ids in stored.values()) == len(owner) + len(fresh_ids)
    finally:
        await asyncio.gather(
            *(c.close() for c in by_url),
            *(c.close() for c in by_cookie),
            *(c.close() for c in by_header),
            return_exceptions=True,
        )


async def test_an_instance_refuses_another_instances_session_and_creates_no_twin(
    tmp_path: Path,
) -> None:
    """Without a balancer: ids naming b sent straight to a get 421 (HTTP, WebSocket upgrade)
    or close 4421 (in the message), and a stores nothing."""
    a = instance(tmp_path, "a", 0).start()
    try:
        other = "b.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        http = HttpClient(a.url)
        http.session_id = other
        resp, events = await http.request("tools/call", {"name": "echo", "arguments": {}})
        assert resp.status == 421
        assert "instance 'b'" in messages(events)[-1]["error"]["message"]
        await http.close()
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await s.ws_connect(a.url, params={"mcp_session_id": other})
            assert refused.value.status == 421
            unprefixed = "x" * 32  # a client-chosen id without an instance: not ours either
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await s.ws_connect(a.url, params={"mcp_session_id": unprefixed})
            assert refused.value.status == 421
            ws = await s.ws_connect(a.url)
            hello = {"jsonrpc": "2.0", "id": 1, "method": "initialize"}
            await ws.send_str(json.dumps({**hello, "params": INIT_PARAMS, "mcpSessionId": other}))
            frame = await ws.receive(timeout=TIMEOUT)
            assert frame.type is aiohttp.WSMsgType.CLOSE and frame.data == 4421, frame
            # Its own prefix: a client-chosen id is fine (SEP draft v0).
            mine = "a." + "y" * 32
            ws = await s.ws_connect(a.url, params={"mcp_session_id": mine})
            await ws.send_str(json.dumps({**hello, "params": INIT_PARAMS}))
            answer = json.loads((await ws.receive(timeout=TIMEOUT)).data)
            assert answer["result"]["mcpSessionId"] == mine
            await ws.close()
        await asyncio.sleep(50 * MS)
    finally:
        a.kill()
    assert stored_sessions(a.db) == {mine}
