"""Every malformed input gets a clear answer, and the daemon keeps serving everyone else."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.helpers import (
    INIT_PARAMS,
    SSE_HEADERS,
    TIMEOUT,
    HttpClient,
    ProxyProcess,
    WsClient,
    tool_text,
)


async def test_invalid_json_keeps_the_connection(proxy: ProxyProcess) -> None:
    client = await WsClient.connect(proxy.url)
    try:
        await client.ws.send_str("{not json")
        error = await client.recv()
        assert error["id"] is None and error["error"]["code"] == -32700
        for bad in (
            '[{"jsonrpc":"2.0","id":1,"method":"ping"}]',  # a batch
            '{"hello": "world"}',  # not JSON-RPC
            '{"jsonrpc":"2.0","id":null,"method":"ping"}',  # null request id
            '{"jsonrpc":"2.0","id":true,"method":"ping"}',  # bool id
            '"just a string"',
        ):
            await client.ws.send_str(bad)
            error = await client.recv()
            assert error["error"]["code"] == -32600, bad
        # Still open, and usable.
        await client.initialize()
        assert tool_text(await client.response(await client.call_tool("echo", {"text": "ok"})))
    finally:
        await client.close()


async def test_requests_before_initialize(proxy: ProxyProcess) -> None:
    client = await WsClient.connect(proxy.url)
    try:
        pong = await client.call("ping")
        assert pong["result"] == {}
        early = await client.call("tools/list")
        assert early["error"]["code"] == -32600
        unknown = await client.response(
            await client.send_and_id(
                {
                    "jsonrpc": "2.0",
                    "id": 7,
                    "method": "tools/list",
                    "mcpSessionId": "no-such-session-0123456789",
                }
            )
        )
        assert unknown["error"]["code"] == -32001
    finally:
        await client.close()


async def test_binary_frame_closes_with_1003(proxy: ProxyProcess) -> None:
    client = await WsClient.connect(proxy.url)
    bystander = await WsClient.connect(proxy.url)
    try:
        await bystander.initialize()
        await client.ws.send_bytes(b"\x00\x01")
        frame = await client.ws.receive(timeout=TIMEOUT)
        assert frame.type is aiohttp.WSMsgType.CLOSE and frame.data == 1003
        # Others are unaffected.
        echo = await bystander.response(await bystander.call_tool("echo", {"text": "fine"}))
        assert tool_text(echo) == "fine"
    finally:
        await client.close()
        await bystander.close()


@pytest.mark.parametrize(
    "query",
    [
        "mcp_session_id=short",
        "mcp_session_id=has%20space-0123456789",
        "mcp_last_lsn=-1",
        "mcp_last_lsn=abc",
    ],
)
async def test_bad_upgrade_parameters_get_400(proxy: ProxyProcess, query: str) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(f"{proxy.url}?{query}")
        assert info.value.status == 400


async def test_oversized_frame_and_strict_mode(tmp_path: Path) -> None:
    config = tmp_path / "mcproxy.toml"
    config.write_text("[server]\nrequire_session_id = true\n[limits]\nmax_message_bytes = 2048\n")
    proxy = ProxyProcess(tmp_path / "db.sqlite", None, "--config", str(config)).start()
    try:
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await http.ws_connect(proxy.url)  # v0 strict mode: an id is required
            assert info.value.status == 400
        client = await WsClient.connect(proxy.url, "a-session-id-of-our-own")
        try:
            await client.initialize()
            await client.ws.send_str('{"jsonrpc":"2.0","method":"x","params":"' + "y" * 4096 + '"}')
            frame = await client.ws.receive(timeout=TIMEOUT)
            assert frame.type is aiohttp.WSMsgType.CLOSE and frame.data == 1009
        finally:
            await client.close()
        # The same bound on Streamable HTTP: a body over it is 413, before it is parsed, and
        # one within it is served on the same daemon.
        http = HttpClient(proxy.url)
        try:
            big = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"y": "y" * 4096}}
            async with await http.post(big) as resp:
                assert resp.status == 413
            await http.initialize()
        finally:
            await http.close()
    finally:
        proxy.kill()


async def test_upstream_that_cannot_start_gets_a_clear_error(tmp_path: Path) -> None:
    proxy = ProxyProcess(tmp_path / "db.sqlite", "stdio:/nonexistent/mcp-server").start()
    try:
        client = await WsClient.connect(proxy.url)
        try:
            first = await client.call("initialize", INIT_PARAMS)
            assert first["error"]["code"] == -32011
            assert first["error"]["data"]["reason"] == "spawn failed"  # no paths on the wire
            again = await client.call("initialize", INIT_PARAMS)
            assert again["error"]["code"] == -32011  # tried again, still refused, no hang
        finally:
            await client.close()
    finally:
        proxy.kill()


def _deep_call(request_id: int, depth: int = 1000) -> str:
    """A tools/call whose params nest ``depth`` levels deep (written by hand: ``json`` itself
    cannot build it), in ``arguments`` and in ``_meta``, where the proxy looks."""
    nested = "[" * depth + "]" * depth
    return (
        f'{{"jsonrpc":"2.0","id":{request_id},"method":"tools/call","params":'
        f'{{"name":"echo","_meta":{{"deep":{nested}}},"arguments":{{"text":{nested}}}}}}}'
    )


async def test_deeply_nested_json_is_a_parse_error_on_both_fronts(proxy: ProxyProcess) -> None:
    """issue 15 finding 10: nesting past the interpreter's stack was an uncaught
    RecursionError (HTTP 500, a WebSocket aborted without a close frame)."""
    client = await WsClient.connect(proxy.url)
    bystander = HttpClient(proxy.url)
    try:
        await client.initialize()
        await bystander.initialize()
        await client.ws.send_str(_deep_call(5))
        error = await client.recv()
        assert error["id"] is None and error["error"]["code"] == -32700
        # The connection is kept, and still usable.
        echo = await client.response(await client.call_tool("echo", {"text": "still here"}))
        assert tool_text(echo) == "still here"
        for session in (None, bystander.session_id):
            headers = dict(SSE_HEADERS, **({"Mcp-Session-Id": session} if session else {}))
            if session:
                headers["MCP-Protocol-Version"] = bystander.version
            async with bystander.http.post(
                proxy.url,
                data=_deep_call(6),
                headers={**headers, "Content-Type": "application/json"},
            ) as resp:
                assert resp.status == 400
                body = await resp.json()
                assert body["error"]["code"] == -32700 and body["id"] is None
        answer = await bystander.call("tools/call", {"name": "echo", "arguments": {"text": "ok"}})
        assert tool_text(answer) == "ok"
        assert not [e for e in proxy.logs if e.get("event") == "raw" or e.get("level") == "error"]
    finally:
        await client.close()
        await bystander.close()
