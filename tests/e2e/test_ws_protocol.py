"""The WebSocket front's own RFC 6455 handling, over raw sockets against the real daemon:
the two ways a handshake arrives, control frames, fragmentation, the close handshake, the
heartbeat, and the close codes for broken input."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import struct
from pathlib import Path
from typing import Any

from mcproxy.core.websocket import OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, parse_close
from tests.helpers import INIT_PARAMS, MS, TIMEOUT, ProxyProcess, client_frame, eventually

INIT = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT_PARAMS})


def upgrade(port: int, extra: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: mcp\r\n{extra}\r\n"
    ).encode()


class RawWs:
    """A socket that speaks HTTP, then hand-made frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> RawWs:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def head(self) -> str:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        return raw.decode("latin-1")

    async def http_body(self, head: str) -> bytes:
        size = next(
            int(line.split(":", 1)[1])
            for line in head.split("\r\n")
            if line.lower().startswith("content-length:")
        )
        return await asyncio.wait_for(self.reader.readexactly(size), TIMEOUT)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def frame(self) -> tuple[int, bytes]:
        first, second = await asyncio.wait_for(self.reader.readexactly(2), TIMEOUT)
        assert not second & 0x80, "a server never masks"
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif size == 127:
            (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return first & 0x0F, await self.reader.readexactly(size)

    async def message(self) -> dict[str, Any]:
        while True:
            opcode, payload = await self.frame()
            if opcode == OP_TEXT:
                return dict(json.loads(payload))
            assert opcode in (OP_PING, OP_PONG), (opcode, payload)

    async def closed_with(self) -> int:
        while True:
            opcode, payload = await self.frame()
            if opcode == OP_CLOSE:
                return parse_close(payload)[0]

    async def eof(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), TIMEOUT) == b""

    def close(self) -> None:
        self.writer.close()


async def test_handshake_on_a_fresh_and_on_a_kept_alive_connection(proxy: ProxyProcess) -> None:
    fresh = await RawWs.open(proxy.port)
    # The upgrade and the first frame in one write: the frame waits for the 101.
    fresh.send(upgrade(proxy.port) + client_frame(OP_TEXT, INIT.encode()))
    head = await fresh.head()
    assert head.startswith("HTTP/1.1 101 ") and "Sec-WebSocket-Protocol: mcp\r\n" in head
    [cookie] = [line for line in head.split("\r\n") if line.startswith("Set-Cookie: ")]
    # Not readable by page scripts, sent only to the MCP path, never cross-site.
    assert cookie.startswith("Set-Cookie: mcp_session_id=")
    assert cookie.endswith("; HttpOnly; Path=/mcp; SameSite=Strict"), cookie
    assert "result" in await fresh.message()
    fresh.close()

    reused = await RawWs.open(proxy.port)  # plain HTTP first: aiohttp serves it...
    reused.send(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n\r\n".encode())
    head = await reused.head()
    assert head.startswith("HTTP/1.1 200 ") and b"ok" in await reused.http_body(head)
    reused.send(upgrade(proxy.port))  # ...then the upgrade on the same connection
    assert (await reused.head()).startswith("HTTP/1.1 101 ")
    reused.send(client_frame(OP_TEXT, INIT.encode()))
    init = await reused.message()
    assert init["result"]["serverInfo"]
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call"}
    call["params"] = {"name": "echo", "arguments": {"text": "over a reused socket"}}
    reused.send(client_frame(OP_TEXT, json.dumps(call).encode()))
    answer = await reused.message()
    assert answer["id"] == 2 and "over a reused socket" in json.dumps(answer["result"])
    reused.send(client_frame(OP_CLOSE, struct.pack("!H", 1000)))
    assert await reused.closed_with() == 1000 and await reused.eof()
    await asyncio.sleep(200 * MS)  # aiohttp's handler for that connection finishes quietly
    assert not [e for e in proxy.logs if e.get("event") == "raw" or e.get("level") == "error"]


async def test_control_frames_fragments_and_close_handshake(proxy: ProxyProcess) -> None:
    ws = await RawWs.open(proxy.port)
    ws.send(upgrade(proxy.port))
    assert (await ws.head()).startswith("HTTP/1.1 101 ")
    ws.send(client_frame(OP_PING, b"are you there"))
    assert await ws.frame() == (OP_PONG, b"are you there")
    data = INIT.encode()
    ws.send(client_frame(OP_TEXT, data[:10], fin=False))
    ws.send(client_frame(OP_PING, b"between"))  # control frames may come between fragments
    ws.send(client_frame(OP_CONTINUATION, data[10:30], fin=False))
    ws.send(client_frame(OP_CONTINUATION, data[30:]))
    assert await ws.frame() == (OP_PONG, b"between")
    assert "result" in await ws.message()
    ws.send(client_frame(OP_CLOSE, struct.pack("!H", 4001) + b"bye"))
    assert await ws.closed_with() == 4001  # the code is echoed (RFC 6455 §5.5.1)
    assert await ws.eof()  # and the server closes the TCP connection (§7.1.1)


async def test_broken_frames_close_with_their_codes(proxy: ProxyProcess) -> None:
    cases = [
        (client_frame(OP_TEXT, b'{"jsonrpc":"2.0","id":1,"method":"\xff"}'), 1007),
        (bytes((0x81, 0x02)) + b"{}", 1002),  # an unmasked client frame
        (client_frame(OP_CONTINUATION, b"x"), 1002),
        (client_frame(OP_CLOSE, b"\x03"), 1002),  # a close body of one byte
    ]
    for frame, code in cases:
        ws = await RawWs.open(proxy.port)
        ws.send(upgrade(proxy.port) + frame)
        assert (await ws.head()).startswith("HTTP/1.1 101 ")
        assert await ws.closed_with() == code
        assert await ws.eof()
    healthy = await RawWs.open(proxy.port)  # and everyone else is still served
    healthy.send(upgrade(proxy.port) + client_frame(OP_TEXT, INIT.encode()))
    assert (await healthy.head()).startswith("HTTP/1.1 101 ")
    assert "result" in await healthy.message()
    healthy.close()


async def test_bad_handshakes_get_http_errors(proxy: ProxyProcess) -> None:
    for extra, status in [
        ("", None),
        ("Origin: http://evil.example\r\n", "403"),
        ("Cookie: mcp_session_id=short\r\n", "400"),
    ]:
        ws = await RawWs.open(proxy.port)
        request = upgrade(proxy.port, extra)
        if status is None:  # no key at all
            request = request.replace(b"Sec-WebSocket-Key", b"X-Other-Key")
            status = "400"
        ws.send(request)
        head = await ws.head()
        assert head.startswith(f"HTTP/1.1 {status} "), head
        assert await ws.http_body(head) and await ws.eof()


class PingAnswerer:
    """A peer that keeps reading: it answers every ping at once (as a browser does) and
    queues the rest, so the heartbeat never finds it late however slow the test is."""

    def __init__(self, ws: RawWs) -> None:
        self.ws = ws
        self.pings = 0
        self.frames: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            first, second = await self.ws.reader.readexactly(2)
            size = second & 0x7F
            if size == 126:
                (size,) = struct.unpack("!H", await self.ws.reader.readexactly(2))
            elif size == 127:
                (size,) = struct.unpack("!Q", await self.ws.reader.readexactly(8))
            opcode, payload = first & 0x0F, await self.ws.reader.readexactly(size)
            if opcode == OP_PING:
                self.ws.send(client_frame(OP_PONG, payload))
                self.pings += 1
            else:
                self.frames.put_nowait((opcode, payload))

    async def message(self) -> dict[str, Any]:
        opcode, payload = await asyncio.wait_for(self.frames.get(), TIMEOUT)
        assert opcode == OP_TEXT, (opcode, payload)
        return dict(json.loads(payload))

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def test_heartbeat_drops_a_silent_peer_and_keeps_a_live_one(tmp_path: Path) -> None:
    # The heartbeat scales with the suite's unit: a peer has half of it to answer a ping.
    config = tmp_path / "mcproxy.toml"
    config.write_text(f"[server]\nheartbeat_s = {1000 * MS}\n")
    proxy = ProxyProcess(tmp_path / "db.sqlite", None, "--config", str(config)).start()
    try:
        peers = []
        for _ in range(2):  # both answer pings while their session starts
            ws = await RawWs.open(proxy.port)
            ws.send(upgrade(proxy.port) + client_frame(OP_TEXT, INIT.encode()))
            assert (await ws.head()).startswith("HTTP/1.1 101 ")
            peers.append(PingAnswerer(ws))
        for peer in peers:
            assert "result" in await peer.message()
        silent, live = peers
        await silent.stop()  # from now on it reads nothing and answers nothing
        assert await asyncio.wait_for(silent.ws.reader.read(), TIMEOUT) in (b"", b"\x89\x00")
        # (The log line is read from the daemon's stderr by another thread: wait for it.)
        await eventually(lambda: any(e.get("event") == "ws.heartbeat_timeout" for e in proxy.logs))
        # The live one was pinged too, answered, and is still served.
        await eventually(lambda: live.pings >= 2)
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call"}
        call["params"] = {"name": "echo", "arguments": {"text": "alive"}}
        live.ws.send(client_frame(OP_TEXT, json.dumps(call).encode()))
        answer = await live.message()
        assert answer["id"] == 2 and "alive" in json.dumps(answer["result"])
        timeouts = [e for e in proxy.logs if e.get("event") == "ws.heartbeat_timeout"]
        assert len(timeouts) == 1
        await live.stop()
        live.ws.close()
    finally:
        proxy.kill()
