"""A reconnecting MCP client for mcproxy's WebSocket front (docs/CLIENT.md).

    async with MCPClient("ws://127.0.0.1:8765/mcp", state_file="session.json") as mcp:
        result = await mcp.call_tool("countdown", {"n": 3}, progress=print)

The application sees every server message exactly once and in order, whatever happens to the
connection or the proxy (``mcproxy.client.connection`` does that part). On top of it this module
puts what every MCP client needs: the ``initialize`` handshake, a cached ``tools/list``
refreshed on ``notifications/tools/list_changed``, ``call_tool`` with a progress callback,
per-request timeouts and cancellation, handlers for the server's sampling, elicitation and
roots requests, notification subscriptions, and optional persistence of the session id and
cursor so that a restarted client process resumes its session.

Only mcproxy's own dependencies are used (aiohttp, msgspec); payloads are plain dicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import msgspec
import structlog

from mcproxy import __version__
from mcproxy.client.connection import (
    ConnectionClosed,
    JsonMessage,
    ReconnectingConnection,
    ReconnectOptions,
)
from mcproxy.core.ids import short_id
from mcproxy.core.jsonrpc import METHOD_NOT_FOUND
from mcproxy.errors import MCProxyError

log = structlog.get_logger("mcproxy.client")

PROTOCOL_VERSION: Final = "2025-11-25"
STATE_SAVE_INTERVAL_S: Final = 0.2  # the cursor is written at most this often (and on close)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
Progress = Callable[[float, float | None, str | None], Any]


class MCPError(MCProxyError):
    """A JSON-RPC error answer."""

    def __init__(self, error: dict[str, Any]) -> None:
        self.code = int(error.get("code", 0))
        self.data = error.get("data")
        super().__init__(f"{error.get('message', 'error')} ({self.code})")


class SessionLost(MCProxyError):
    """The proxy no longer had our session; a new one was started in its place."""


class MCPClient:
    def __init__(
        self,
        url: str,
        *,
        client_info: dict[str, str] | None = None,
        sampling: Handler | None = None,
        elicitation: Handler | None = None,
        roots: Callable[[], Awaitable[list[dict[str, Any]]]] | None = None,
        options: ReconnectOptions | None = None,
        request_timeout_s: float = 60.0,
        state_file: str | os.PathLike[str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.client_info = client_info or {"name": "mcproxy.client", "version": __version__}
        self.request_timeout_s = request_timeout_s
        self._handlers: dict[str, Handler] = {}
        if sampling is not None:
            self._handlers["sampling/createMessage"] = sampling
        if elicitation is not None:
            self._handlers["elicitation/create"] = elicitation
        self._roots = roots
        self._state_file = Path(state_file) if state_file is not None else None
        state = self._load_state()
        self._conn = ReconnectingConnection(
            url,
            self._on_message,
            options=options,
            session_id=state.get("session_id"),
            cursor=int(state.get("cursor", 0)),
            init_params=state.get("init_params"),
            headers=headers,
            on_resumed=self._on_resumed,
            on_cursor=self._on_cursor,
            on_closed=self._on_closed,
        )
        # Ids are unique within the session even across client processes that share it.
        self._ids = (f"{secrets.token_hex(4)}-{n}" for n in itertools.count(1))
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._progress: dict[str, Progress] = {}
        self._subscribers: dict[str, list[Callable[[dict[str, Any]], Any]]] = {}
        self._tools: list[dict[str, Any]] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._save_handle: asyncio.TimerHandle | None = None
        self.server_info: dict[str, Any] = {}

    @property
    def session_id(self) -> str | None:
        return self._conn.session_id

    @property
    def cursor(self) -> int:
        return self._conn.cursor

    # --- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> MCPClient:
        await self.connect()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect; a new session is initialized, a stored one is resumed."""
        await self._conn.start()
        if self._conn.session_id is not None:
            await self._conn.ready.wait()
            if self._conn.closed is not None:
                raise self._conn.closed
            return
        capabilities: dict[str, Any] = {}
        if "sampling/createMessage" in self._handlers:
            capabilities["sampling"] = {}
        if "elicitation/create" in self._handlers:
            capabilities["elicitation"] = {"form": {}}
        if self._roots is not None:
            capabilities["roots"] = {"listChanged": True}
        result = await self.request(
            "initialize",
            {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": capabilities,
                "clientInfo": self.client_info,
            },
        )
        self.server_info = result.get("serverInfo", {})
        await self.notify("notifications/initialized")
        self._save_state()

    async def close(self) -> None:
        """Close the connection; the session stays on the proxy, to be resumed."""
        self._save_state()
        await self._conn.close()
        await self._stop_tasks()

    async def end(self) -> None:
        """End the session for good (the proxy stops its upstream at once and erases it, as
        for HTTP DELETE: docs/PROTOCOL.md *Ending a session*); the state file goes too."""
        if self._save_handle is not None:
            self._save_handle.cancel()
            self._save_handle = None
        await self._conn.end()
        if self._state_file is not None:
            self._state_file.unlink(missing_ok=True)
        await self._stop_tasks()

    async def _stop_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        # Awaited, not only cancelled: a handler must not outlive its client (nor run on
        # into a closed loop); one that failed on its way out is logged by ``_done``.
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- requests ---------------------------------------------------------------------

    async def request(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Send a request and wait for its result (raises ``MCPError`` for an error answer,
        ``TimeoutError`` after ``timeout_s``, having sent ``notifications/cancelled``)."""
        rid = next(self._ids)
        message: JsonMessage = {"jsonrpc": "2.0", "id": rid, "method": method}
        params = dict(params or {})
        if progress is not None:
            params["_meta"] = {**(params.get("_meta") or {}), "progressToken": rid}
            self._progress[rid] = progress
        if params:
            message["params"] = params
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            await self._conn.send(message)
            timeout = self.request_timeout_s if timeout_s is None else timeout_s
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            await self.cancel(rid, "timed out")
            raise
        except asyncio.CancelledError:
            await self.cancel(rid, "cancelled by the caller")
            raise
        finally:
            self._pending.pop(rid, None)
            self._progress.pop(rid, None)

    async def cancel(self, request_id: str, reason: str) -> None:
        """basic/utilities/cancellation: tell the server; stop re-sending after drops."""
        self._conn.forget(request_id)
        with contextlib.suppress(MCProxyError):
            await self.notify(
                "notifications/cancelled", {"requestId": request_id, "reason": reason}
            )

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        message: JsonMessage = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        await self._conn.send(message)

    async def list_tools(self, *, refresh: bool = False) -> list[dict[str, Any]]:
        """All tools (following ``nextCursor``), cached until the server says they changed."""
        if self._tools is None or refresh:
            tools: list[dict[str, Any]] = []
            cursor: str | None = None
            while True:
                page = await self.request("tools/list", {"cursor": cursor} if cursor else None)
                tools += page.get("tools", [])
                cursor = page.get("nextCursor")
                if not cursor:
                    break
            self._tools = tools
        return self._tools

    async def call_tool(
        self,
        name: str,
        arguments: dict[str, Any] | None = None,
        *,
        progress: Progress | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        return await self.request(
            "tools/call",
            {"name": name, "arguments": arguments or {}},
            progress=progress,
            timeout_s=timeout_s,
        )

    def on_notification(self, method: str, callback: Callable[[dict[str, Any]], Any]) -> None:
        """Call ``callback(params)`` for every ``method`` notification (sync or async)."""
        self._subscribers.setdefault(method, []).append(callback)

    # --- from the connection ------------------------------------------------------------

    async def _on_message(self, message: JsonMessage) -> None:
        method = message.get("method")
        if method is None:
            future = self._pending.get(str(message.get("id")))
            if future is not None and not future.done():
                if "error" in message:
                    future.set_exception(MCPError(message["error"]))
                else:
                    future.set_result(message.get("result") or {})
            return
        params = message.get("params") or {}
        if "id" in message:
            self._spawn(self._answer(message["id"], method, params))
            return
        if method == "notifications/progress":
            callback = self._progress.get(str(params.get("progressToken")))
            if callback is not None:
                await _call(callback, params.get("progress"), params.get("total"),
                            params.get("message"))  # fmt: skip
        elif method == "notifications/tools/list_changed":
            self._tools = None
        for subscriber in self._subscribers.get(method, []):
            await _call(subscriber, params)

    async def _answer(self, rid: Any, method: str, params: dict[str, Any]) -> None:
        """A server request (sampling, elicitation, roots): run the handler, send the answer."""
        reply: JsonMessage = {"jsonrpc": "2.0", "id": rid}
        try:
            if method == "roots/list" and self._roots is not None:
                reply["result"] = {"roots": await self._roots()}
            elif method == "ping":
                reply["result"] = {}
            elif method in self._handlers:
                reply["result"] = await self._handlers[method](params)
            else:
                reply["error"] = {"code": METHOD_NOT_FOUND, "message": f"no handler: {method}"}
        except Exception as exc:  # a handler's failure is the server's answer, not our crash
            reply["error"] = {"code": -32603, "message": str(exc)[:200]}
        with contextlib.suppress(MCProxyError):
            await self._conn.send(reply)

    async def _on_resumed(self, resumed: bool) -> None:
        if resumed:
            return
        log.warning("client.session_lost", session=short_id(self.session_id or ""))
        lost = SessionLost("the proxy lost the session; a new one was started")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(lost)
        self._tools = None

    async def _on_closed(self, reason: ConnectionClosed) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(reason)

    def _on_cursor(self, _: int) -> None:
        if self._state_file is not None and self._save_handle is None:
            loop = asyncio.get_running_loop()
            self._save_handle = loop.call_later(STATE_SAVE_INTERVAL_S, self._save_state)

    # --- persistence ------------------------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        if self._state_file is None or not self._state_file.exists():
            return {}
        try:
            state = msgspec.json.decode(self._state_file.read_bytes())
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("client.state_unreadable", file=str(self._state_file), error=str(exc))
            return {}
        return state if isinstance(state, dict) else {}

    def _save_state(self) -> None:
        """Atomically (write, then rename): a crash leaves the old state or the new one."""
        self._save_handle = None
        if self._state_file is None or self._conn.session_id is None:
            return
        state = {
            "session_id": self._conn.session_id,
            "cursor": self._conn.cursor,
            "init_params": self._conn.init_params,
        }
        tmp = self._state_file.with_name(self._state_file.name + ".tmp")
        tmp.write_bytes(msgspec.json.encode(state))
        os.replace(tmp, self._state_file)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("client.handler_failed", error=repr(exc), exc_info=exc)


async def _call(callback: Callable[..., Any], *args: Any) -> None:
    result = callback(*args)
    if asyncio.iscoroutine(result):
        await result
