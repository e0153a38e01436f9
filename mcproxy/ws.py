"""The reconnecting WebSocket front (MCP WebSocket SEP-1288), served on ``GET /mcp``.

Framing (SEP "Message framing"): UTF-8 text frames, one JSON-RPC message each; a binary frame
closes the connection with 1003; invalid JSON gets a -32700 error with id null and the
connection stays open; a batch array or any other non-message gets -32600; a frame over
``limits.max_message_bytes`` closes with 1009.

Session selection supports both generations of the SEP (docs/PROTOCOL.md "Sessions"):

- draft v0: ``mcp_session_id`` in the query string, else in a cookie, at upgrade time. A known
  id attaches at once and replays from ``mcp_last_lsn`` (or from what was last written);
- draft v3: ``mcpSessionId`` in a re-sent ``initialize`` (top level, ``params`` or
  ``params._meta``), with the cursor in ``params._meta["io.mcproxy/lastLsn"]``; the proxy
  answers that ``initialize`` itself from the stored result, then replays.

Last connection wins: attaching closes the previous socket of the session with 1000 and the
SEP's reason; anything that socket does afterwards is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Final

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from mcproxy import jsonrpc
from mcproxy.config import Config
from mcproxy.errors import LimitExceeded, ProtocolError, StoreError
from mcproxy.guard import HostPolicy
from mcproxy.hub import Hub, mint_session_id, valid_session_id
from mcproxy.jsonrpc import Kind, Message
from mcproxy.runner import Outbox, SessionRunner
from mcproxy.session import Reply
from mcproxy.tasks import TaskSet

log = structlog.get_logger("mcproxy")

SUBPROTOCOL: Final = "mcp"  # what every SDK's WebSocket transport offered
QUERY_SESSION: Final = "mcp_session_id"
QUERY_CURSOR: Final = "mcp_last_lsn"
CLOSE_BINARY: Final = 1003
CLOSE_SERVICE_RESTART: Final = 1012
CLOSE_FORBIDDEN: Final = 4403  # 4000-4999 are for applications (RFC 6455 §7.4.2)


class WsConnection:
    """One client socket; the ``Attachment`` a ``SessionRunner`` pumps its outbox into."""

    _ids = itertools.count(1)

    def __init__(self, ws: web.WebSocketResponse, tasks: TaskSet, principal: str) -> None:
        self.ws = ws
        self.principal = principal
        self.label = f"ws#{next(self._ids)}"
        self._tasks = tasks
        self._pump: asyncio.Task[None] | None = None
        self.runner: SessionRunner | None = None

    async def send(self, data: bytes, lsn: int | None = None) -> None:
        await self.ws.send_frame(data, WSMsgType.TEXT)

    def start(self, outbox: Outbox, after_lsn: int, prelude: list[bytes], ended: bool) -> None:
        self._pump = self._tasks.spawn(self._run(outbox, after_lsn, prelude), f"pump:{self.label}")

    async def _run(self, outbox: Outbox, after_lsn: int, prelude: list[bytes]) -> None:
        try:
            await outbox.run(after_lsn, prelude)
        except (ConnectionError, RuntimeError):
            pass  # the socket went away mid-send; the log keeps everything for the resume
        except StoreError as exc:
            log.error("ws.store_failed", conn=self.label, error=str(exc))
            await self.close(WSCloseCode.INTERNAL_ERROR, "event log unavailable")

    def supersede(self) -> None:
        self._stop_pump()
        self._tasks.spawn(
            self.close(WSCloseCode.OK, jsonrpc.SUPERSEDED_REASON), f"close:{self.label}"
        )

    def terminated(self) -> None:
        self._stop_pump()
        self._tasks.spawn(
            self.close(WSCloseCode.OK, jsonrpc.TERMINATED_REASON), f"close:{self.label}"
        )

    def _stop_pump(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.close(code=code, message=reason.encode())

    async def reply(self, data: bytes) -> None:
        """Answer this connection in order with whatever the session is sending it."""
        outbox = self._outbox()
        if outbox is not None:
            outbox.push_direct(data)
        else:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.send(data)

    def _outbox(self) -> Outbox | None:
        runner = self.runner
        if runner is not None and runner.conn is self:
            return runner.outbox
        return None

    def to_session(self, msg: Message) -> None:
        """Hand a message to the bound session; answer what it answers directly."""
        runner = self.runner
        if runner is None or runner.conn is not self:
            return  # a late message on a superseded socket must not disturb the new one
        direct = runner.client_message(msg)
        outbox = self._outbox()
        if outbox is None:
            return
        for action in direct:
            if isinstance(action, Reply):
                outbox.push_direct(action.data)
            else:
                outbox.push_again(action.lsn)


class WebSocketFront:
    def __init__(self, hub: Hub, config: Config, guard: HostPolicy) -> None:
        self.hub = hub
        self.config = config
        self.guard = guard
        self.connections: set[WsConnection] = set()
        self._tasks = TaskSet("ws")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        cfg = self.config.server
        refusal = self.guard.check(request.host, request.headers.get("Origin"))
        if refusal is not None:
            return self._refuse(request, refusal.status, refusal.reason)
        now = asyncio.get_running_loop().time()
        if not self.hub.new_connections.allow(request.remote, now):
            return self._refuse(request, 429, "too many new connections from this address")
        principal = self.hub.tokens.authenticate(
            request.headers.get("Authorization"), request.headers.get("Sec-WebSocket-Protocol")
        )
        if principal is None:
            return self._refuse(request, 401, "a valid bearer token is required")
        hint = request.query.get(QUERY_SESSION) or request.cookies.get(cfg.cookie_name)
        if hint is not None and not valid_session_id(hint):
            return _bad_request("mcp_session_id must be 16-128 visible ASCII characters")
        if hint is None and cfg.require_session_id:
            return _bad_request("mcp_session_id is required (query parameter or cookie)")
        cursor: int | None = None
        raw_cursor = request.query.get(QUERY_CURSOR)
        if raw_cursor is not None:
            if not raw_cursor.isdigit() or len(raw_cursor) > 18:
                return _bad_request("mcp_last_lsn must be a non-negative integer")
            cursor = int(raw_cursor)

        ws = web.WebSocketResponse(
            protocols=(SUBPROTOCOL,),
            max_msg_size=self.config.limits.max_message_bytes,
            heartbeat=cfg.heartbeat_s,
            compress=False,
            decode_text=False,
        )
        if not ws.can_prepare(request).ok:
            return _bad_request("expected a WebSocket upgrade")
        runner = await self.hub.get(hint) if hint is not None else None
        proposed = hint
        if hint is None:
            proposed = mint_session_id()
            # SEP draft v0: the id travels in a cookie too, so browsers resume without code.
            ws.set_cookie(
                cfg.cookie_name, proposed, path=cfg.path, httponly=True, samesite="Strict"
            )
        await ws.prepare(request)
        conn = WsConnection(ws, self._tasks, principal)
        self.connections.add(conn)
        if runner is not None and not self.hub.owns(runner, principal):
            await self._foreign(conn, runner)
            self.connections.discard(conn)
            return ws
        log.info("ws.connected", conn=conn.label, bound=runner is not None, peer=request.remote)
        try:
            if runner is not None:
                conn.runner = runner
                runner.attach(conn, cursor)
            assert proposed is not None
            await self._serve(conn, proposed, cursor)
        finally:
            self.connections.discard(conn)
            conn._stop_pump()
            if conn.runner is not None:
                conn.runner.detach(conn)
            log.info("ws.closed", conn=conn.label, code=ws.close_code)
        return ws

    async def _serve(self, conn: WsConnection, proposed: str, url_cursor: int | None) -> None:
        ws = conn.ws
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.limits.bind_timeout_s
        while True:
            try:
                # limits.bind_timeout_s: a socket that never binds a session costs us for
                # nothing; once bound, aiohttp's heartbeat watches it instead.
                left = None if conn.runner is not None else max(deadline - loop.time(), 0)
                frame = await ws.receive(timeout=left)
            except TimeoutError:
                self.hub.metrics.error("ws_1008")
                await conn.close(WSCloseCode.POLICY_VIOLATION, "no session bound in time")
                return
            if frame.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if frame.type is WSMsgType.BINARY:
                self.hub.metrics.error(f"ws_{CLOSE_BINARY}")
                await conn.close(CLOSE_BINARY, "binary frames are not supported by MCP")
                return
            if frame.type is WSMsgType.ERROR:
                # aiohttp already closed with 1009 (too big) or 1002/1007 (bad frame).
                self.hub.metrics.error(f"ws_{ws.close_code}")
                log.info("ws.frame_error", conn=conn.label, error=str(ws.exception()))
                return
            if frame.type is not WSMsgType.TEXT:
                continue
            try:
                msg = jsonrpc.decode(frame.data)
            except ProtocolError as exc:
                self.hub.metrics.error(exc.code)
                await conn.reply(jsonrpc.error_bytes(None, exc.code, *_public(exc)))
                continue
            if conn.runner is None:
                await self._bind(conn, msg, proposed, url_cursor)
                continue
            if isinstance(msg.mcpSessionId, str) and msg.mcpSessionId != conn.runner.id:
                # One session per socket (SEP gap G11): a second id is an error, not a switch.
                if jsonrpc.kind_of(msg) is Kind.REQUEST:
                    await conn.reply(
                        jsonrpc.error_bytes(
                            msg.id if isinstance(msg.id, int | str) else None,
                            jsonrpc.INVALID_REQUEST,
                            "this connection is bound to another session",
                        )
                    )
                continue
            conn.to_session(msg)

    async def _bind(
        self, conn: WsConnection, msg: Message, proposed: str, url_cursor: int | None
    ) -> None:
        """The first messages of a connection not yet bound to a session."""
        kind = jsonrpc.kind_of(msg)
        is_init = msg.method == "initialize"
        if is_init:
            hint, cursor = jsonrpc.initialize_hints(msg)
        else:
            hint = msg.mcpSessionId if isinstance(msg.mcpSessionId, str) else None
            cursor = None
        if cursor is None:
            cursor = url_cursor
        if hint is not None and not valid_session_id(hint):
            if kind is Kind.REQUEST:
                await conn.reply(
                    jsonrpc.error_bytes(
                        msg.id if isinstance(msg.id, int | str) else None,
                        jsonrpc.INVALID_REQUEST,
                        "mcpSessionId must be 16-128 visible ASCII characters",
                    )
                )
            return
        runner = await self.hub.get(hint) if hint is not None else None
        if runner is not None and not self.hub.owns(runner, conn.principal):
            await self._foreign(conn, runner)
            return
        if hint is not None and runner is None and not is_init:
            # (An unknown id on initialize or on the URL is how a client proposes a new one.)
            self.hub.metrics.resumes.labels("unknown_session").inc()
        if runner is not None:
            conn.runner = runner
            if is_init:
                runner.attach(conn, cursor, hello=msg)
            else:
                runner.attach(conn, cursor)
                conn.to_session(msg)
            return
        if is_init:
            session_id = hint or proposed
            existing = await self.hub.get(session_id)
            if existing is not None and not self.hub.owns(existing, conn.principal):
                await self._foreign(conn, existing)
                return
            try:
                runner = existing or self.hub.create(session_id, conn.principal)
            except LimitExceeded as exc:
                self.hub.metrics.error(jsonrpc.TOO_MANY_SESSIONS)
                assert isinstance(msg.id, int | str)
                await conn.reply(jsonrpc.error_bytes(msg.id, jsonrpc.TOO_MANY_SESSIONS, str(exc)))
                return
            conn.runner = runner
            runner.attach(conn, cursor if existing else None)
            conn.to_session(msg)
            return
        if kind is not Kind.REQUEST:
            return  # notifications and responses before a session exist have nowhere to go
        assert isinstance(msg.id, int | str)
        if msg.method == "ping":  # basic/utilities/ping: answer promptly, even unbound
            await conn.reply(jsonrpc.encode(jsonrpc.result_message(msg.id, {})))
        elif hint is not None:
            await conn.reply(
                jsonrpc.error_bytes(msg.id, jsonrpc.SESSION_NOT_FOUND, "session not found")
            )
        else:
            await conn.reply(
                jsonrpc.error_bytes(
                    msg.id, jsonrpc.INVALID_REQUEST, "no session: send initialize first"
                )
            )

    def _refuse(self, request: web.Request, status: int, reason: str) -> web.Response:
        self.hub.metrics.error(f"http_{status}")
        log.warning("ws.refused", status=status, reason=reason, peer=request.remote)
        headers = {"WWW-Authenticate": 'Bearer realm="mcproxy"'} if status == 401 else None
        return web.Response(status=status, text=reason + "\n", headers=headers)

    async def _foreign(self, conn: WsConnection, runner: SessionRunner) -> None:
        """Another principal's session: refuse without saying whether it exists (4403)."""
        self.hub.metrics.error(f"ws_{CLOSE_FORBIDDEN}")
        log.warning("session.foreign", session=runner.label, principal=conn.principal)
        await conn.close(CLOSE_FORBIDDEN, "session not available to this principal")

    async def close_all(self, code: int, reason: str) -> None:
        await asyncio.gather(
            *(c.close(code, reason) for c in list(self.connections)), return_exceptions=True
        )

    async def aclose(self) -> None:
        await self._tasks.cancel_all()


def _bad_request(reason: str) -> web.Response:
    return web.Response(status=400, text=reason + "\n")


def _public(exc: ProtocolError) -> tuple[str, str]:
    """Wire text for a framing error: JSON-RPC's name for it, and what was wrong with the input."""
    name = "Parse error" if exc.code == jsonrpc.PARSE_ERROR else "Invalid Request"
    return name, str(exc)[:200]
