"""The reconnecting connection as a transport for the official ``mcp`` SDK's ``ClientSession``.

    async with reconnecting_transport("ws://127.0.0.1:8765/mcp") as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()

The SDK talks to a ``(read_stream, write_stream)`` pair of ``SessionMessage`` streams and
must keep one pair for its whole life; drops, resumes and re-sent requests all happen below
it, in ``mcproxy.client.connection``, so the SDK never sees them. Needs the ``mcp`` package (2.x),
which mcproxy itself does not depend on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
from mcp.shared.message import SessionMessage
from mcp.types import jsonrpc_message_adapter
from pydantic import ValidationError

from mcproxy.client.connection import (
    ConnectionClosed,
    JsonMessage,
    ReconnectingConnection,
    ReconnectOptions,
)

READ_BUFFER = 64  # messages the SDK has not read yet before the connection waits for it


@asynccontextmanager
async def reconnecting_transport(
    url: str, *, options: ReconnectOptions | None = None, headers: dict[str, str] | None = None
) -> AsyncIterator[tuple[Any, Any]]:
    read_w, read_r = anyio.create_memory_object_stream[SessionMessage | Exception](READ_BUFFER)
    write_w, write_r = anyio.create_memory_object_stream[SessionMessage](0)

    async def on_message(message: JsonMessage) -> None:
        try:
            parsed = jsonrpc_message_adapter.validate_python(message)
        except ValidationError as exc:
            await read_w.send(exc)  # ClientSession hands it to its message_handler
            return
        await read_w.send(SessionMessage(parsed))

    async def on_closed(reason: ConnectionClosed) -> None:
        # Terminal (superseded, terminated, refused, closed): the SDK's waiters must learn.
        with anyio.CancelScope(shield=True):
            await read_w.aclose()

    conn = ReconnectingConnection(
        url, on_message, options=options, headers=headers, on_closed=on_closed
    )
    await conn.start()

    async def writer() -> None:
        async with write_r:
            async for item in write_r:
                wire = item.message.model_dump_json(by_alias=True, exclude_unset=True)
                await conn.send(msgspec.json.decode(wire))

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            try:
                yield read_r, write_w
            finally:
                tg.cancel_scope.cancel()
    finally:
        await conn.close()
