"""Canary for the undocumented aiohttp behaviour the main listener relies on (pyproject.toml
pins the tested aiohttp range; widen it only after this and tests/e2e/test_ws_protocol.py
pass on the new release).

``fronts.listener`` hands a connection it accepted itself to aiohttp: it calls
``web.AppRunner.server()`` for a protocol, ``transport.set_protocol`` + ``connection_made``,
then feeds the bytes it already read. ``fronts.ws`` takes a transport back from aiohttp's
handler (``request.transport.set_protocol``) for an upgrade on a kept-alive connection. Both
are exercised here over a real socket pair, without the rest of mcproxy.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from typing import cast

import aiohttp
from aiohttp import web

from tests.helpers import TIMEOUT, eventually


def test_the_aiohttp_version_is_in_the_tested_range() -> None:
    version = tuple(int(p) for p in importlib.metadata.version("aiohttp").split(".")[:2])
    assert (3, 14) <= version < (3, 15), "re-test the listener before widening the aiohttp pin"


class _Recorder(asyncio.Protocol):
    """Takes a transport over from aiohttp, as ``ws.WebSocketFront.handle`` does."""

    def __init__(self) -> None:
        self.data = bytearray()

    def data_received(self, data: bytes) -> None:
        self.data += data


async def test_a_connection_handed_to_aiohttp_is_served_and_can_be_taken_back() -> None:
    taken = _Recorder()
    took: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/take":
            transport = request.transport
            assert transport is not None
            transport.set_protocol(taken)
            took.set_result(None)
            return web.Response()
        return web.Response(text="served")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        assert runner.server is not None
        head = b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n"

        def dispatch() -> asyncio.Protocol:
            class Dispatch(asyncio.Protocol):
                def connection_made(self, transport: asyncio.BaseTransport) -> None:
                    self.transport = cast(asyncio.Transport, transport)

                def data_received(self, data: bytes) -> None:
                    # What fronts.listener.Dispatch does once it has a request head.
                    assert runner.server is not None
                    http = runner.server()
                    self.transport.set_protocol(http)
                    http.connection_made(self.transport)
                    cast(asyncio.Protocol, http).data_received(data)

            return Dispatch()

        server = await asyncio.get_running_loop().create_server(dispatch, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head)
        status = await asyncio.wait_for(reader.readline(), TIMEOUT)
        assert status.startswith(b"HTTP/1.1 200")
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        assert await reader.readexactly(6) == b"served"
        # Kept alive: the next request is taken from aiohttp's handler.
        writer.write(b"GET /take HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(took, TIMEOUT)
        writer.write(b"after")
        await writer.drain()
        # aiohttp must stop reading a transport taken from it.
        await eventually(lambda: bytes(taken.data).endswith(b"after"))
        writer.close()
        server.close()
        await server.wait_closed()
    finally:
        await runner.cleanup()


async def test_held_headers_go_out_with_the_first_chunk_and_the_last_with_the_end() -> None:
    """``fronts.streamable`` writes an SSE response in two writes (issue 20): the headers
    held back (``_send_headers_immediately``, private) go with the priming event, and the
    answer goes with the end of the chunked body (``write_eof(data)``)."""
    writes: list[bytes] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        transport = cast(asyncio.Transport, request.transport)
        write, writelines = transport.write, transport.writelines

        def counted(data: bytes) -> None:
            writes.append(bytes(data))
            write(data)

        def counted_lines(chunks: list[bytes]) -> None:
            writes.append(b"".join(chunks))
            writelines(chunks)

        transport.write = counted  # type: ignore[method-assign]
        transport.writelines = counted_lines  # type: ignore[method-assign]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        resp._send_headers_immediately = False
        await resp.prepare(request)
        assert writes == []
        await resp.write(b"id: 1\ndata: \n\n")
        assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 200")
        await resp.write_eof(b"data: last\n\n")
        assert len(writes) == 2 and writes[1].endswith(b"\r\n0\r\n\r\n")
        transport.write, transport.writelines = write, writelines  # type: ignore[method-assign]
        return resp

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/") as resp:
            assert await asyncio.wait_for(resp.read(), TIMEOUT) == (
                b"id: 1\ndata: \n\ndata: last\n\n"
            )
        assert len(writes) == 2
    finally:
        await runner.cleanup()
