"""The main listener: one port for both fronts.

Each new TCP connection starts with a ``Dispatch`` protocol that reads the first request's
head. A WebSocket upgrade to the MCP path is handed to the WebSocket front, which takes the
socket itself (``ws.WebSocketFront.take``); anything else (Streamable HTTP, health, metrics,
malformed input) is handed, bytes and all, to aiohttp's server, exactly as if aiohttp had
accepted the connection. aiohttp's router still handles an upgrade that arrives later on a
kept-alive connection.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Final, cast

import structlog

from mcproxy.core.websocket import MAX_HEAD_BYTES, http_refusal, parse_request_head
from mcproxy.fronts.ws import WebSocketFront

HttpProtocolFactory = Callable[[], asyncio.BaseProtocol]
log = structlog.get_logger("mcproxy")
_PRUNE_EVERY: Final = 4096  # accepted connections between sweeps of the whole table


class OpenConnections:
    """Open TCP connections per client address (``limits.max_connections_per_address``).

    A connection changes hands (aiohttp, a WebSocket) and its end is seen by whoever holds it
    then, so no close hook is relied on: each address keeps its transports and forgets the
    closed ones when it connects again; the whole table is swept every few thousand accepts.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._by_address: dict[str, list[asyncio.BaseTransport]] = {}
        self._accepted = 0

    def admit(self, address: str, transport: asyncio.BaseTransport) -> bool:
        live = [t for t in self._by_address.get(address, ()) if not t.is_closing()]
        if len(live) >= self.limit:
            self._by_address[address] = live
            return False
        live.append(transport)
        self._by_address[address] = live
        self._accepted += 1
        if self._accepted % _PRUNE_EVERY == 0:
            self._prune()
        return True

    def _prune(self) -> None:
        for address, transports in list(self._by_address.items()):
            live = [t for t in transports if not t.is_closing()]
            if live:
                self._by_address[address] = live
            else:
                del self._by_address[address]


class Dispatch(asyncio.Protocol):
    """A connection until its first request head is complete; then someone else's."""

    __slots__ = ("_buffer", "_front", "_http", "_open", "_timer", "_transport")

    def __init__(
        self, front: WebSocketFront, http: HttpProtocolFactory, open_connections: OpenConnections
    ) -> None:
        self._front = front
        self._http = http
        self._open = open_connections
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) else "?"
        if not self._open.admit(address, transport):
            # Issue 15 finding 7: one address must not hold every socket the process has.
            self._front.hub.metrics.error("http_429")
            log.warning("listener.refused", reason="too many connections", peer=address)
            transport.write(http_refusal(429, "too many open connections from this address"))
            transport.close()
            self._transport = None
            return
        # A head must arrive within limits.bind_timeout_s (no slow-loris sockets held open).
        timeout = self._front.config.limits.bind_timeout_s
        self._timer = asyncio.get_running_loop().call_later(timeout, transport.abort)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return  # refused in connection_made
        buffered = self._buffer + data if self._buffer else data
        end = buffered.find(b"\r\n\r\n")
        if end < 0 and len(buffered) <= MAX_HEAD_BYTES:
            self._buffer = buffered
            return
        self._buffer = b""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        raw = buffered[:end]
        if end > 0 and raw.startswith(b"GET ") and b"websocket" in raw.lower():
            head = parse_request_head(raw)
            if head is not None and self._front.wants(head):
                peer = transport.get_extra_info("peername")
                conn = self._front.take(transport, head, peer[0] if peer else None)
                if conn is not None and end + 4 < len(buffered):
                    conn.data_received(buffered[end + 4 :])
                return
        http = self._http()
        transport.set_protocol(http)
        http.connection_made(transport)
        cast(asyncio.Protocol, http).data_received(buffered)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None


async def listen(
    front: WebSocketFront,
    http: HttpProtocolFactory,
    host: str,
    port: int,
    inherited: list[socket.socket],
) -> list[asyncio.Server]:
    """Listen on ``host:port``, or on the sockets systemd passed (socket activation)."""
    loop = asyncio.get_running_loop()

    open_connections = OpenConnections(front.config.limits.max_connections_per_address)

    def factory() -> Dispatch:
        return Dispatch(front, http, open_connections)

    if inherited:
        return [
            await loop.create_server(factory, sock=sock, backlog=socket.SOMAXCONN)
            for sock in inherited
        ]
    # SOMAXCONN, not aiohttp's 128: every client of a restarted proxy reconnects at once.
    server = await loop.create_server(
        factory, host, port, reuse_address=True, backlog=socket.SOMAXCONN
    )
    return [server]
