"""A reconnecting JSON-RPC connection to mcproxy's WebSocket front (the client side of
docs/PROTOCOL.md): the layer under ``mcproxy.client.mcp`` and the SDK adapter.

What it guarantees to the layer above, across any number of drops and proxy restarts:

- every server message is delivered once, in order: the connection resumes with the session
  id and the last LSN it delivered (SEP draft v3: a re-sent ``initialize`` carrying
  ``mcpSessionId`` and ``_meta["io.mcproxy/lastLsn"]``), the proxy replays exactly what was
  missed, and anything at or below the cursor is dropped;
- a request is never lost: requests written while disconnected are queued (bounded; a full
  queue is an error the caller sees), and after a resume every request still unanswered is
  sent again with the same id; the proxy runs it once and answers once;
- close codes are obeyed: no reconnect after supersession (1000 with the SEP's reason), a
  terminated session, or an authentication refusal; an immediate reconnect after 1001, 1006
  or 1012 (going away, abnormal, service restart).

Backoff (compare PartySocket, docs/CLIENT.md): the first retry after a connection that stayed
up ``min_uptime_s`` is immediate; later ones wait a full-jitter draw under
``min_reconnection_delay_s * grow ** n``, capped at ``max_reconnection_delay_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import msgspec
import structlog
import yarl

from mcproxy.core.backoff import backoff
from mcproxy.core.jsonrpc import (
    META_LAST_LSN,
    META_LSN,
    META_RESUMED,
    SHUTTING_DOWN,
    SUPERSEDED_REASON,
    TERMINATED_REASON,
)
from mcproxy.errors import MCProxyError

log = structlog.get_logger("mcproxy.client")

# Close codes after which reconnecting at once is right (RFC 6455 §7.4.1; 1012 per IANA).
_IMMEDIATE: Final = frozenset({1001, 1006, 1011, 1012, 1013})
_AUTH_REFUSED: Final = frozenset({4401, 4403})
_RESENT_NOTIFICATIONS: Final = frozenset({"notifications/cancelled"})
_RESEND_WINDOW: Final = 256  # answers to server requests kept for a re-send after a drop

JsonMessage = dict[str, Any]


class ConnectionClosed(MCProxyError):
    """The connection ended for good; pending requests fail with it."""


class Superseded(ConnectionClosed):
    """Another connection took the session over (SEP: do not reconnect)."""


class SessionTerminated(ConnectionClosed):
    """The session was deleted on the proxy."""


class Refused(ConnectionClosed):
    """The proxy refused us (authentication, Origin, a bad request): retrying cannot help."""


class QueueFull(MCProxyError):
    """Too many messages waiting for the connection to come back (max_enqueued_messages)."""


@dataclass(frozen=True, slots=True)
class ReconnectOptions:
    """Knobs, named after PartySocket's (camelCase there), with the differences documented
    in docs/CLIENT.md: an immediate first retry, full jitter, and a bounded queue."""

    min_reconnection_delay_s: float = 0.1
    max_reconnection_delay_s: float = 10.0
    reconnection_delay_grow_factor: float = 2.0
    min_uptime_s: float = 5.0
    connection_timeout_s: float = 4.0
    max_retries: int | None = None  # None: forever
    max_enqueued_messages: int = 1000
    heartbeat_s: float = 20.0  # WebSocket pings; a silent peer is dropped, then resumed
    close_timeout_s: float = 2.0  # close(): how long to wait for the server's close frame


def delays(options: ReconnectOptions, rng: Callable[[], float] = random.random) -> Iterator[float]:
    """Backed-off waits: full jitter under a cap that grows exponentially to the maximum."""
    return backoff(
        options.min_reconnection_delay_s,
        options.max_reconnection_delay_s,
        options.reconnection_delay_grow_factor,
        rng,
    )


class ReconnectingConnection:
    """Call ``start()``, then ``send()``; server messages go to ``on_message`` in order.

    The first ``initialize`` request sent through it is remembered (its params are what a
    resume re-sends), and the session id is learned from its result (``mcpSessionId``).
    """

    _resume_ids = itertools.count(1)

    def __init__(
        self,
        url: str,
        on_message: Callable[[JsonMessage], Awaitable[None]],
        *,
        options: ReconnectOptions | None = None,
        session_id: str | None = None,
        cursor: int = 0,
        init_params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        on_resumed: Callable[[bool], Awaitable[None]] | None = None,
        on_cursor: Callable[[int], None] | None = None,
        on_closed: Callable[[ConnectionClosed], Awaitable[None]] | None = None,
    ) -> None:
        self.url = url
        self.options = options or ReconnectOptions()
        self.session_id = session_id
        self.cursor = cursor
        self.init_params = init_params
        self.initialized = session_id is not None
        self._on_message = on_message
        self._on_resumed = on_resumed
        self._on_cursor = on_cursor
        self._on_closed = on_closed
        self._headers = headers or {}
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._queue: deque[tuple[str | None, bytes]] = deque()  # (request key, data), in order
        self._unanswered: OrderedDict[str, bytes] = OrderedDict()  # our requests, by id
        self._answers: deque[bytes] = deque(maxlen=_RESEND_WINDOW)  # since the last resume
        self._open = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.closed: ConnectionClosed | None = None
        self.connects = 0
        self.ready = asyncio.Event()  # the first connection is up (and resumed, if resuming)

    # --- public -----------------------------------------------------------------------

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(headers=self._headers)
        self._task = asyncio.create_task(self._run(), name=f"mcproxy-client:{self.url}")

    async def send(self, message: JsonMessage) -> None:
        """Send now, or queue until the connection is back (raises ``QueueFull``)."""
        if self.closed is not None:
            raise self.closed
        data = msgspec.json.encode(message)
        method = message.get("method")
        key: str | None = None
        if "id" in message and method is not None:
            if method == "initialize" and self.init_params is None:
                self.init_params = dict(message.get("params") or {})
            key = _key(message["id"])
            self._unanswered[key] = data
        elif method == "notifications/initialized":
            self.initialized = True
        elif method is None or method in _RESENT_NOTIFICATIONS:
            self._answers.append(data)
        ws = self._ws
        if ws is not None and self._open.is_set() and not ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(data.decode())
                return
        if len(self._queue) >= self.options.max_enqueued_messages:
            if key is not None:
                del self._unanswered[key]
            raise QueueFull(f"{len(self._queue)} messages already wait for the connection")
        self._queue.append((key, data))

    def forget(self, request_id: Any) -> None:
        """Stop re-sending a request (it was cancelled or timed out)."""
        self._unanswered.pop(_key(request_id), None)

    async def close(self) -> None:
        """End the connection cleanly: RFC 6455 §7.1.2, a close frame (1000) and the server's
        echo, waited for at most ``close_timeout_s``, then the TCP connection. (The reading
        task clears ``_ws`` when it stops, so the socket is taken first: closing after that
        used to drop the TCP connection without a frame, which the server logged as 1006.)
        The session stays on the server, to be resumed (``session_id``, ``cursor``)."""
        await self._shutdown(b"client closing", ConnectionClosed("closed by the client"))

    async def end(self) -> None:
        """End the session for good, the WebSocket equivalent of HTTP DELETE: close 1000 with
        the reason ``MCP session terminated`` (docs/PROTOCOL.md *Ending a session*). The
        server stops its upstream at once and erases the session. Only a connected client
        can say so: if the connection is down, the session is left to be parked and expire."""
        await self._shutdown(TERMINATED_REASON.encode(), SessionTerminated("ended by the client"))

    async def _shutdown(self, reason: bytes, closed: ConnectionClosed) -> None:
        self.closed = self.closed or closed
        ws = self._ws
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if ws is not None and not ws.closed:
            try:
                await asyncio.wait_for(
                    ws.close(code=1000, message=reason), self.options.close_timeout_s
                )
            except (TimeoutError, ConnectionError, aiohttp.ClientError) as exc:
                log.info("client.close_unanswered", error=repr(exc))
        if self._http is not None:
            await self._http.close()

    # --- the connection loop ----------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        waits = delays(self.options)
        retries = 0
        try:
            while self.closed is None:
                started = loop.time()
                code, reason = await self._connect_once()
                if self.closed is not None:
                    break
                terminal = _terminal(code, reason)
                if terminal is not None:
                    self.closed = terminal
                    break
                healthy = loop.time() - started >= self.options.min_uptime_s
                if healthy:
                    waits, retries = delays(self.options), 0  # a stable run resets the count
                retries += 1
                if self.options.max_retries is not None and retries > self.options.max_retries:
                    self.closed = ConnectionClosed(f"gave up after {retries - 1} retries")
                    break
                # Once at once (after a healthy connection, or a close that invites it), then
                # backed off: a peer that keeps failing is not hammered.
                immediate = retries == 1 and (healthy or code in _IMMEDIATE)
                wait = 0.0 if immediate else next(waits)
                log.info("client.reconnecting", code=code, reason=reason, wait_s=round(wait, 3))
                await asyncio.sleep(wait)
        finally:
            self._open.clear()
            self.ready.set()
            if self.closed is None:
                self.closed = ConnectionClosed("connection task stopped")
            if self._on_closed is not None:
                await self._on_closed(self.closed)

    async def _connect_once(self) -> tuple[int | None, str]:
        """One connection: open, resume, flush, read until it closes. Returns its close."""
        assert self._http is not None
        try:
            ws = await asyncio.wait_for(
                self._http.ws_connect(
                    self._connect_url(),
                    protocols=("mcp",),
                    heartbeat=self.options.heartbeat_s,
                    max_msg_size=0,
                ),
                self.options.connection_timeout_s,
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403, 400, 404):
                return 4000 + exc.status, f"upgrade refused: HTTP {exc.status}"
            return None, f"upgrade failed: HTTP {exc.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return None, f"cannot connect: {exc}"
        self._ws = ws
        self.connects += 1
        try:
            if self.session_id is not None and self.init_params is not None:
                closing = await self._resume(ws)
                if closing is not None:
                    return ws.close_code, closing
            self._open.set()
            self.ready.set()
            await self._flush(ws)
            while True:
                message = await _receive(ws)
                if not isinstance(message, dict):
                    return ws.close_code, message
                await self._deliver(message)
        except (ConnectionError, RuntimeError, TimeoutError, msgspec.DecodeError) as exc:
            return 1006, str(exc)
        finally:
            self._open.clear()
            self._ws = None

    def _connect_url(self) -> yarl.URL | str:
        """A resume names the session on the upgrade URL too (SEP draft v0), not only in the
        re-sent initialize: a load balancer in front of several instances routes on it
        (docs/DEPLOY.md), and a URL-bound attach replays after our cursor at once."""
        if self.session_id is None or self.init_params is None:
            return self.url
        return yarl.URL(self.url).update_query(
            mcp_session_id=self.session_id, mcp_last_lsn=str(self.cursor)
        )

    async def _resume(self, ws: aiohttp.ClientWebSocketResponse) -> str | None:
        """SEP draft v3: re-send initialize with our session id and cursor; the proxy answers
        from the stored result (``resumed``) and then replays what we missed."""
        assert self.init_params is not None and self.session_id is not None
        params = dict(self.init_params)
        params["_meta"] = {**(params.get("_meta") or {}), META_LAST_LSN: self.cursor}
        rid = f"mcproxy-resume-{next(self._resume_ids)}"
        hello = {"jsonrpc": "2.0", "id": rid, "method": "initialize", "params": params,
                 "mcpSessionId": self.session_id}  # fmt: skip
        await ws.send_str(msgspec.json.encode(hello).decode())
        while True:
            message = await _receive(ws)
            if not isinstance(message, dict):
                return message  # closed before answering: its reason
            if message.get("id") != rid:
                await self._deliver(message)  # cannot happen before the answer; be safe
                continue
            result = message.get("result") or {}
            resumed = bool((result.get("_meta") or {}).get(META_RESUMED))
            if not resumed:
                # The proxy no longer had the session: it started a new one under our id
                # with our initialize. Finish the handshake; the layer above is told.
                self.cursor = 0
                await ws.send_str('{"jsonrpc":"2.0","method":"notifications/initialized"}')
            if self._on_resumed is not None:
                await self._on_resumed(resumed)
            return None

    async def _flush(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        # Requests of earlier connections still unanswered first (same ids: the proxy joins
        # the running one or answers from its log), then answers and cancellations sent on the
        # last connection (the proxy ignores late ones), then what was queued while we were
        # away, in the order it was sent.
        queued = {key for key, _ in self._queue if key is not None}
        earlier = [d for k, d in self._unanswered.items() if k not in queued]
        for data in [*earlier, *self._answers]:
            await ws.send_str(data.decode())
        self._answers.clear()
        while self._queue:
            key, data = self._queue[0]
            if key is None or key in self._unanswered:  # not cancelled meanwhile
                await ws.send_str(data.decode())
            self._queue.popleft()

    async def _deliver(self, message: JsonMessage) -> None:
        lsn = lsn_of(message)
        if lsn is not None:
            if lsn <= self.cursor:
                return  # already delivered (a replay overlapping a live send)
            self.cursor = lsn
            if self._on_cursor is not None:
                self._on_cursor(lsn)
        if "method" not in message and "id" in message:
            key = _key(message["id"])
            if lsn is None and _shutting_down(message) and key in self._unanswered:
                # The proxy is draining before a stop and did not run it (docs/PROTOCOL.md
                # "Stopping"): it stays unanswered and goes again, same id, after the resume.
                return
            self._unanswered.pop(key, None)
            result = message.get("result")
            if self.session_id is None and isinstance(result, dict):
                sid = result.get("mcpSessionId")
                if isinstance(sid, str):
                    self.session_id = sid
        await self._on_message(message)


def _shutting_down(message: JsonMessage) -> bool:
    error = message.get("error")
    return isinstance(error, dict) and error.get("code") == SHUTTING_DOWN


def _key(request_id: Any) -> str:
    return msgspec.json.encode(request_id).decode()


def lsn_of(message: JsonMessage) -> int | None:
    """The LSN the proxy put in a decoded message's ``_meta`` (or ``error.data``)."""
    for holder in (message.get("result"), message.get("params")):
        if isinstance(holder, dict):
            meta = holder.get("_meta")
            if isinstance(meta, dict) and isinstance(meta.get(META_LSN), int):
                return int(meta[META_LSN])
    error = message.get("error")
    if isinstance(error, dict) and isinstance(error.get("data"), dict):
        value = error["data"].get(META_LSN)
        return int(value) if isinstance(value, int) else None
    return None


async def _receive(ws: aiohttp.ClientWebSocketResponse) -> JsonMessage | str:
    """The next JSON-RPC message, or the close reason once the socket is closing."""
    while True:
        frame = await ws.receive()
        if frame.type is aiohttp.WSMsgType.TEXT:
            decoded = msgspec.json.decode(frame.data)
            if isinstance(decoded, dict):
                return decoded
            continue
        if frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING):
            return str(frame.extra or "")
        if frame.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            return ""


def _terminal(code: int | None, reason: str) -> ConnectionClosed | None:
    if code == 1000 and reason == SUPERSEDED_REASON:
        return Superseded(reason)
    if code == 1000 and reason == TERMINATED_REASON:
        return SessionTerminated(reason)
    if code in _AUTH_REFUSED or (code is not None and 4400 <= code < 4500):
        return Refused(reason or f"refused with {code}")
    return None
