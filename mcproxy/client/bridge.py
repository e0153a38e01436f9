"""``mcproxy connect URL``: a stdio ↔ reconnecting-WebSocket bridge.

A desktop MCP client that can only launch stdio servers launches this instead; it gets a
durable session on a remote mcproxy (the role mcp-remote plays for Streamable HTTP). Each
line on stdin is one JSON-RPC message to the proxy; each message from the proxy is one line
on stdout (MCP basic/transports §stdio: newline-delimited, no embedded newlines). Drops and
proxy restarts are absorbed by ``mcproxy.client.connection``; stdin's end closes the session's
connection (the session itself lives on in the proxy until it expires). Diagnostics go to
stderr, never stdout.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Final

import msgspec

from mcproxy.client.connection import (
    ConnectionClosed,
    JsonMessage,
    ReconnectingConnection,
    ReconnectOptions,
)
from mcproxy.core.framing import LineFramer

EXIT_CLOSED: Final = 1  # the proxy ended the session or refused us
EXIT_FAILED: Final = 3  # the bridge itself failed (its queue overflowed, a line too long)
_PARSE_ERROR: Final = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}'
MAX_LINE_BYTES: Final = 16 * 1024 * 1024


async def run(url: str, options: ReconnectOptions | None = None) -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE_BYTES)
    stdin, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer
    done = asyncio.Event()
    ended: list[ConnectionClosed] = []

    async def to_stdout(message: JsonMessage) -> None:
        out.write(msgspec.json.encode(message) + b"\n")
        out.flush()

    async def closed(reason: ConnectionClosed) -> None:
        ended.append(reason)
        done.set()

    conn = ReconnectingConnection(url, to_stdout, options=options, on_closed=closed)
    await conn.start()
    pump = asyncio.create_task(_pump(reader, LineFramer(MAX_LINE_BYTES), conn))
    waiter = asyncio.create_task(done.wait())
    await asyncio.wait({pump, waiter}, return_when=asyncio.FIRST_COMPLETED)
    terminal = done.is_set()  # the proxy ended it; otherwise stdin reached its end
    # The pump's own failure (QueueFull, a line over MAX_LINE_BYTES, ...) is the bridge's
    # failure: the desktop client must see a non-zero exit and why, not a clean end.
    failure = pump.exception() if pump.done() and not pump.cancelled() else None
    pump.cancel()
    waiter.cancel()
    await asyncio.gather(pump, waiter, return_exceptions=True)
    await conn.close()
    stdin.close()
    if terminal:
        print(f"mcproxy connect: {ended[0]}", file=sys.stderr)
        return EXIT_CLOSED
    if failure is not None:
        print(f"mcproxy connect: {type(failure).__name__}: {failure}", file=sys.stderr)
        return EXIT_FAILED
    return 0


async def _pump(
    reader: asyncio.StreamReader, framer: LineFramer, conn: ReconnectingConnection
) -> None:
    while chunk := await reader.read(65536):
        for line in framer.feed(chunk):
            if not line.strip():
                continue
            try:
                message = msgspec.json.decode(line)
            except msgspec.DecodeError:
                message = None
            if not isinstance(message, dict):
                sys.stdout.buffer.write(_PARSE_ERROR + b"\n")
                sys.stdout.buffer.flush()
                continue
            await conn.send(message)
