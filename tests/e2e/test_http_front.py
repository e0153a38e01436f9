"""The Streamable HTTP front against the real daemon: lifecycle, streams, refusals, resumption."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from mcproxy.config import DEFAULT_SSE_RETRY_MS
from tests.helpers import (
    INIT_PARAMS,
    SSE_HEADERS,
    HttpClient,
    ProxyProcess,
    WsClient,
    free_port,
    messages,
    read_sse,
    tool_text,
)


async def test_lifecycle_streams_and_delete(proxy: ProxyProcess) -> None:
    client = HttpClient(proxy.url)
    try:
        resp, events = await client.request("initialize", INIT_PARAMS, request_id=0)
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        session_id = resp.headers["Mcp-Session-Id"]
        assert len(session_id) >= 16 and all(0x21 <= ord(c) <= 0x7E for c in session_id)
        priming, answer = events
        # transports §"Sending Messages" 6: a priming event (id, empty data) with `retry`.
        assert priming.data == "" and priming.retry == DEFAULT_SSE_RETRY_MS
        assert priming.id is not None
        stream, _, start = priming.id.partition(".")
        assert answer.id == f"{stream}.1" and int(start) == 0
        result = answer.json()["result"]
        assert result["serverInfo"]["name"] == "fixture"
        assert "_meta" not in result  # the LSN rides in the event id, not in the message
        client.session_id = session_id
        assert await client.notify("notifications/initialized") == 202

        resp, events = await client.request(
            "tools/call",
            {
                "name": "slow",
                "arguments": {"steps": 3, "delay": 0.01},
                "_meta": {"progressToken": 7},
            },
        )
        *notes, done = messages(events)
        assert [n["params"]["progress"] for n in notes] == [1, 2, 3]
        assert tool_text(done) == "slow done after 3"
        ids = [e.id for e in events]
        assert len(set(ids)) == len(ids)  # unique within the session
        assert await client.notify("notifications/cancelled", {"requestId": 999}) == 202

        async with client.http.delete(client.url, headers=client.headers()) as gone:
            assert gone.status == 204
        resp, events = await client.request("tools/list")
        assert resp.status == 404
        assert messages(events)[0]["error"]["code"] == -32001
        async with client.http.get(client.url, headers=client.headers()) as get:
            assert get.status == 404
    finally:
        await client.close()


async def test_a_retried_request_id_is_answered_from_the_log(
    proxy: ProxyProcess, counter_dir: Path
) -> None:
    client = HttpClient(proxy.url)
    try:
        await client.initialize()
        first = await client.request("tools/call", {"name": "bump", "arguments": {"name": "r"}}, 5)
        again = await client.request("tools/call", {"name": "bump", "arguments": {"name": "r"}}, 5)
        assert again[0].content_type == "application/json"  # answered at once, from the log
        assert messages(first[1])[-1]["result"] == messages(again[1])[-1]["result"]
        assert (counter_dir / "r").read_text() == "x\n"  # executed once
    finally:
        await client.close()


async def test_unrelated_messages_go_to_the_get_stream(proxy: ProxyProcess) -> None:
    client = HttpClient(proxy.url)
    try:
        await client.initialize()
        await client.call("logging/setLevel", {"level": "info"})
        reply = await client.call(
            "tools/call", {"name": "notify_later", "arguments": {"text": "late", "delay": 0.3}}
        )
        assert tool_text(reply) == "scheduled"
        # Opened after the note was logged? It is delivered all the same (nothing lost
        # between `initialized` and the GET); opened before, it arrives live.
        async with client.http.get(client.url, headers=client.headers()) as get:
            assert get.status == 200
            events = await asyncio.wait_for(read_sse(get, lambda e: bool(e.data)), 5)
        note = events[-1].json()
        assert note["method"] == "notifications/message" and note["params"]["data"] == "late"
        assert events[0].data == "" and events[-1].id is not None
        assert events[-1].id.startswith("0.")  # the general stream
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Host": "evil.example.com"}, 421),
        ({"Origin": "http://evil.example.com"}, 403),
        ({"Content-Type": "text/plain"}, 415),
        ({"Accept": "application/json"}, 406),
        ({"MCP-Protocol-Version": "2031-01-01"}, 400),
    ],
)
async def test_bad_requests_are_refused(
    proxy: ProxyProcess, headers: dict[str, str], status: int
) -> None:
    async with aiohttp.ClientSession() as http:
        body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT_PARAMS}
        async with http.post(proxy.url, json=body, headers={**SSE_HEADERS, **headers}) as resp:
            assert resp.status == status
            if status == 400:
                error = (await resp.json())["error"]
                assert "2025-11-25" in error["data"]["supported"]


async def test_session_header_rules_and_parse_errors(proxy: ProxyProcess) -> None:
    async with aiohttp.ClientSession() as http:
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        cases = [
            ({}, ping, 400, -32600),  # no Mcp-Session-Id on a non-initialize request
            ({"Mcp-Session-Id": "short"}, ping, 400, -32600),
            ({"Mcp-Session-Id": "x" * 32}, ping, 404, -32001),
            ({}, b"{nope", 400, -32700),
            ({}, b"[]", 400, -32600),
        ]
        for extra, body, status, code in cases:
            kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
            headers = {**SSE_HEADERS, **extra}
            async with http.post(proxy.url, headers=headers, **kwargs) as resp:  # type: ignore[arg-type]
                assert resp.status == status, (extra, body)
                assert (await resp.json())["error"]["code"] == code
        async with http.get(proxy.url, headers={"Accept": "text/event-stream"}) as resp:
            assert resp.status == 400
        async with http.put(proxy.url) as resp:
            assert resp.status == 405
    # A WebSocket upgrade from a foreign page is refused just the same.
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(
                proxy.url, protocols=("mcp",), headers={"Origin": "http://evil.example.com"}
            )
        assert refused.value.status == 403
        allowed = {"Origin": f"http://localhost:{proxy.port}"}
        ws = await http.ws_connect(proxy.url, protocols=("mcp",), headers=allowed)
        await ws.close()


async def test_resume_with_last_event_id_after_sigkill(tmp_path: Path) -> None:
    """The POST stream dies with the proxy; GET + Last-Event-ID on the next process gets the
    rest of that stream only: the re-issued safe call's answer, or the unsafe one's -32010."""
    proxy = ProxyProcess(tmp_path / "db.sqlite", port=free_port()).start()
    client = HttpClient(proxy.url)
    try:
        await client.initialize()
        await client.call("tools/list")  # the proxy learns which tools are read-only
        safe = await client.post(
            {
                "jsonrpc": "2.0",
                "id": "safe",
                "method": "tools/call",
                "params": {
                    "name": "slow_read",
                    "arguments": {"steps": 3, "delay": 0.3},
                    "_meta": {"progressToken": "p"},
                },
            }
        )
        unsafe = await client.post(
            {
                "jsonrpc": "2.0",
                "id": "unsafe",
                "method": "tools/call",
                "params": {"name": "slow", "arguments": {"steps": 30, "delay": 0.1}},
            }
        )
        seen = await read_sse(safe, lambda e: bool(e.data))  # priming + first progress
        primed = await read_sse(unsafe, lambda e: True)
        proxy.kill()
        await asyncio.to_thread(proxy.start)  # same port, same database

        async with client.http.get(
            client.url, headers=client.headers(**{"Last-Event-ID": str(seen[-1].id)})
        ) as resumed:
            rest = messages(await read_sse(resumed))
        assert tool_text(rest[-1]) == "read done after 3"
        assert all(m.get("method") == "notifications/progress" for m in rest[:-1])
        async with client.http.get(
            client.url, headers=client.headers(**{"Last-Event-ID": str(primed[0].id)})
        ) as resumed:
            [lost] = messages(await read_sse(resumed))
        assert lost["id"] == "unsafe" and lost["error"]["code"] == -32010
        # A resume of a finished stream replays it and ends; the session still works.
        assert (
            tool_text(await client.call("tools/call", {"name": "echo", "arguments": {"text": "k"}}))
            == "k"
        )
    finally:
        await client.close()
        proxy.kill()


async def test_one_session_two_transports(proxy: ProxyProcess) -> None:
    """Begun over HTTP, resumed over WebSocket with the cursor, and back (docs/PROTOCOL.md)."""
    client = HttpClient(proxy.url)
    try:
        await client.initialize()
        await client.call("tools/call", {"name": "echo", "arguments": {"text": "over http"}})
        assert client.session_id is not None
        ws = await WsClient.connect(proxy.url, client.session_id, last_lsn=0)
        try:
            replayed = [await ws.recv(), await ws.recv()]
            assert "serverInfo" in replayed[0]["result"] and tool_text(replayed[1]) == "over http"
            # Ids must stay unique within the session, whatever the transport.
            rid = await ws.request(
                "tools/call", {"name": "echo", "arguments": {"text": "over ws"}}, "ws-1"
            )
            echo = await ws.response(rid)
            assert tool_text(echo) == "over ws" and echo["result"]["_meta"]["io.mcproxy/lsn"] == 3
        finally:
            await ws.close()
        # Back to HTTP: a plain-LSN Last-Event-ID replays every stream after it.
        async with client.http.get(
            client.url, headers=client.headers(**{"Last-Event-ID": "2"})
        ) as get:
            [event] = await asyncio.wait_for(read_sse(get, lambda e: True), 5)
        assert event.id == "3" and tool_text(event.json()) == "over ws"
    finally:
        await client.close()
