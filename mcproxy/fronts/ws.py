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

A disconnect never ends a session (SEP: "disconnection MUST NOT be interpreted as terminating
the MCP session"). A client that is done closes with 1000 and the reason the proxy itself uses
for a deleted session, ``MCP session terminated``: the WebSocket equivalent of HTTP DELETE
(docs/PROTOCOL.md *Ending a session*). Its upstream is stopped at once instead of idling until
it is parked.

A connection is an ``asyncio.Protocol`` over the RFC 6455 framing in ``core.websocket``:
frames are handled in ``data_received`` with no task per socket, and liveness is one sweep over
every socket (``heartbeat``) instead of a timer each. The opening handshake arrives either straight
from the listener (``listener.Dispatch``: a new TCP connection whose first request is the
upgrade) or through aiohttp's router (an upgrade on a connection that served plain HTTP
first); both go through ``WebSocketFront.check`` and ``WebSocketFront.open``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass
from typing import Final

import structlog
from aiohttp import web

from mcproxy.config import Config
from mcproxy.core import jsonrpc
from mcproxy.core.actions import Reply
from mcproxy.core.guard import SINGLETON_HEADERS, HostPolicy
from mcproxy.core.ids import mint_session_id, misdirected, short_id, valid_session_id
from mcproxy.core.jsonrpc import Kind, Message
from mcproxy.core.websocket import (
    CLOSE_ABNORMAL,
    CLOSE_INTERNAL_ERROR,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TRY_AGAIN_LATER,
    CloseReceived,
    CloseStarted,
    PongReceived,
    ProtocolFailed,
    RequestHead,
    ServerConnection,
    State,
    TextReceived,
    accept_response,
    handshake_problem,
    http_refusal,
    offered_protocols,
)
from mcproxy.engine.hub import Hub
from mcproxy.engine.outbox import Outbox
from mcproxy.engine.runner import SessionRunner
from mcproxy.errors import LimitExceeded, ProtocolError, StoreError
from mcproxy.fronts.streamable import guarded_headers
from mcproxy.tasks import TaskSet

log = structlog.get_logger("mcproxy")

SUBPROTOCOL: Final = "mcp"  # what every SDK's WebSocket transport offered
QUERY_SESSION: Final = "mcp_session_id"
QUERY_CURSOR: Final = "mcp_last_lsn"
# 4000-4999 are for applications (RFC 6455 §7.4.2). No 4403: another principal's session id
# is treated as an unknown one (docs/SECURITY.md, issue 15 finding 8).
# Another fleet instance's session id named in a message (HTTP 421 at the upgrade): reconnect
# with the id on the URL so the balancer routes it (docs/DEPLOY.md).
CLOSE_MISDIRECTED: Final = 4421
# After our close frame, how long the peer has to answer with its own before the TCP
# connection is dropped anyway (RFC 6455 §7.1.1: the server closes the TCP connection first).
CLOSE_WAIT_S: Final = 2.0


@dataclass(frozen=True, slots=True)
class HandshakeRefusal:
    """An opening handshake turned down with an HTTP status."""

    status: int
    reason: str
    headers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Accepted:
    """What an acceptable opening handshake asked for."""

    principal: str
    hint: str | None  # the session id proposed in the query or cookie
    cursor: int | None
    protocol: str | None  # the subprotocol to echo


class WsConnection(asyncio.Protocol):
    """One client socket after the opening handshake; the ``Attachment`` a
    ``SessionRunner`` pumps its outbox into. The RFC 6455 rules (state, ping, close, output
    budget) are ``core.websocket.ServerConnection``'s; this class moves the bytes, binds the
    session and keeps the timers."""

    _ids = itertools.count(1)

    def __init__(
        self,
        front: WebSocketFront,
        transport: asyncio.Transport,
        principal: str,
        peer: str | None,
        previous: asyncio.BaseProtocol | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        limits = front.config.limits
        self.front = front
        self.transport: asyncio.Transport | None = transport
        self.principal = principal
        self.peer = peer
        self.label = f"ws#{next(self._ids)}"
        self.runner: SessionRunner | None = None
        self.ws = ServerConnection(limits.max_message_bytes, limits.max_output_bytes)
        self.closed: asyncio.Future[None] = loop.create_future()
        self.last_heard = loop.time()
        self.ping_sent: float | None = None
        # aiohttp's handler for the connection, when the upgrade came through its router:
        # told when the socket goes, so it finishes too.
        self._previous = previous
        self._proposed = ""
        self._url_cursor: int | None = None
        self._reading = False
        self._early: bytearray | None = None  # bytes that arrived before the 101 was sent
        self._pump: asyncio.Task[None] | None = None
        self._binder: asyncio.Task[None] | None = None
        self._backlog: list[Message] = []
        self._drained: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._close_timer = False  # ``_timer`` is the wait for the peer's close frame

    @property
    def close_code(self) -> int:
        """What the connection ended (or is ending) with: 1006 if no close frame went."""
        code = self.ws.close_code
        return CLOSE_ABNORMAL if code is None else code

    # --- asyncio.Protocol --------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self._reading:
            early = self._early if self._early is not None else bytearray()
            early += data
            if len(early) > self.front.config.limits.max_message_bytes + 1024:
                self.abort()  # a client may not send frames before the 101 (RFC 6455 §4.1)
            self._early = early
            return
        self.last_heard = asyncio.get_running_loop().time()
        events = self.ws.receive_data(data)
        # Pongs and close frames first: pongs only within the output budget (issue 15).
        if self.ws.state is State.OPEN and self._over_budget():
            return
        self._flush()
        for event in events:
            if self.transport is None:
                return
            if isinstance(event, TextReceived):
                self._text(event.payload)
            elif isinstance(event, PongReceived):
                self.ping_sent = None
            elif isinstance(event, ProtocolFailed):
                self.front.hub.metrics.error(f"ws_{event.code}")
                log.info("ws.frame_error", conn=self.label, code=event.code, error=event.reason)
            elif isinstance(event, CloseStarted):
                self.front.hub.metrics.error(f"ws_{event.code}")
                self._wait_for_close()
            elif (
                isinstance(event, CloseReceived)
                and event.code == CLOSE_NORMAL
                and event.reason == jsonrpc.TERMINATED_REASON
            ):
                self._end_session()
        if self.ws.state is State.CLOSED:
            # The peer's close came (ours is out now), or it broke the protocol: the server
            # closes the TCP connection first (§7.1.1).
            self._stop_pump()
            if self.transport is not None:
                self.transport.close()

    def _end_session(self) -> None:
        """The client ended its session (close 1000, ``MCP session terminated``): as HTTP
        DELETE, if this socket still holds it (a superseded socket changes nothing)."""
        runner = self.runner
        if runner is None or runner.conn is not self or runner.closed:
            return
        log.info("ws.session_ended", conn=self.label, session=runner.label)
        self.front.tasks.spawn(
            self.front.hub.terminate(runner.id, self.principal), f"end:{self.label}"
        )

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.resume_writing()
        self._stop_pump()
        if self._binder is not None:
            self._binder.cancel()
        self.front.connections.discard(self)
        if self.runner is not None:
            self.runner.detach(self)
        if self._reading:
            log.info("ws.closed", conn=self.label, code=self.close_code)
        if self._previous is not None:
            self._previous.connection_lost(exc)
            self._previous = None
        if not self.closed.done():
            self.closed.set_result(None)

    # --- reading -----------------------------------------------------------------------

    def start_reading(self, proposed: str, url_cursor: int | None) -> None:
        """The 101 is out: frames may be handled (first any that came early)."""
        self._proposed, self._url_cursor = proposed, url_cursor
        self._reading = True
        early, self._early = self._early, None
        if early and self.transport is not None:
            self.data_received(bytes(early))

    def _text(self, payload: bytes) -> None:
        try:
            msg = jsonrpc.decode(payload)
        except ProtocolError as exc:
            self.front.hub.metrics.error(exc.code)
            self.reply(jsonrpc.error_bytes(None, exc.code, *_public(exc)))
            return
        if self._binder is not None:
            self._backlog.append(msg)  # keep the order behind a bind that waits on the store
        elif self.runner is None:
            self._backlog.append(msg)
            self._binder = self.front.tasks.spawn(self._bind_backlog(), f"bind:{self.label}")
        else:
            self._bound_message(msg)

    async def _bind_backlog(self) -> None:
        try:
            while self._backlog and self.transport is not None and self.ws.state is State.OPEN:
                msg = self._backlog.pop(0)
                if self.runner is None:
                    await self.front.bind(self, msg, self._proposed, self._url_cursor)
                else:
                    self._bound_message(msg)
        finally:
            self._binder = None
            self._backlog = []

    def _bound_message(self, msg: Message) -> None:
        runner = self.runner
        assert runner is not None
        if isinstance(msg.mcpSessionId, str) and msg.mcpSessionId != runner.id:
            # One session per socket (SEP gap G11): a second id is an error, not a switch.
            self.invalid_request(msg, "this connection is bound to another session")
            return
        self.to_session(msg)

    def invalid_request(self, msg: Message, reason: str) -> None:
        """Answer a request with -32600; a notification or response is dropped."""
        if jsonrpc.kind_of(msg) is Kind.REQUEST:
            request_id = msg.id if isinstance(msg.id, int | str) else None
            self.reply(jsonrpc.error_bytes(request_id, jsonrpc.INVALID_REQUEST, reason))

    def to_session(self, msg: Message) -> None:
        """Hand a message to the bound session; answer what it answers directly."""
        runner = self.runner
        if runner is None or runner.conn is not self:
            return  # a late message on a superseded socket must not disturb the new one
        if jsonrpc.kind_of(msg) is Kind.REQUEST and isinstance(msg.id, int | str):
            refusal = self.front.hub.drain_refusal(msg.id)
            if refusal is not None:  # answers and notifications still go through
                self.reply(refusal[0])
                return
        direct = runner.client_message(msg)
        outbox = self._outbox()
        if outbox is None:
            return
        for action in direct:
            if isinstance(action, Reply):
                self.reply(action.data)
            else:
                outbox.push_again(action.lsn)

    def bind_to(self, runner: SessionRunner) -> None:
        """From now on this socket carries ``runner``'s session (the caller attaches it)."""
        self.runner = runner
        if self._timer is not None and not self._close_timer:
            self._timer.cancel()  # the bind deadline no longer applies
            self._timer = None

    def bind_deadline(self) -> None:
        """limits.bind_timeout_s passed: a socket that never bound a session costs us for
        nothing (once bound, the heartbeat watches it instead)."""
        self._timer = None
        if not self._reading:
            self.abort()  # still no 101 (the session did not load in time): just hang up
        elif self.runner is None and self.transport is not None and self.ws.state is State.OPEN:
            self.front.hub.metrics.error(f"ws_{CLOSE_POLICY}")
            self.begin_close(CLOSE_POLICY, "no session bound in time")

    # --- writing -----------------------------------------------------------------------

    def _flush(self) -> None:
        chunks = self.ws.data_to_send()
        transport = self.transport
        if not chunks or transport is None or transport.is_closing():
            return
        if len(chunks) == 1:
            transport.write(chunks[0])
        else:
            transport.writelines(chunks)

    def _over_budget(self) -> bool:
        """Check the output budget before more output; past it, close the peer (1013)."""
        transport = self.transport
        if transport is None:
            return True
        buffered = transport.get_write_buffer_size()
        if not self.ws.over_budget(buffered):
            return False
        self.ws.data_to_send()  # pongs for a peer that reads nothing: not worth holding
        self.front.hub.metrics.error(f"ws_{CLOSE_TRY_AGAIN_LATER}")
        log.warning("ws.over_budget", conn=self.label, buffered=buffered, owed=self.ws.owed)
        if self.ws.close_over_budget():
            self._flush()
            # Nor is what it sends worth our time now: it is gone after CLOSE_WAIT_S.
            transport.pause_reading()
            self._wait_for_close()
        return True

    async def send(self, data: bytes, lsn: int | None = None) -> None:
        if self.ws.state is not State.OPEN or self.transport is None:
            raise ConnectionError("the WebSocket is closing")
        if lsn is None:
            self.ws.paid(len(data))  # a queued reply (or the prelude) leaves the outbox
        if self._over_budget():
            raise ConnectionError("the client does not read")
        self.ws.send_text(data)
        self._flush()
        if self._drained is not None:
            await self._drained  # the kernel buffer is full: wait for the client to read

    def reply(self, data: bytes) -> None:
        """Answer this connection in order with whatever the session is sending it."""
        if self.ws.state is not State.OPEN or self._over_budget():
            return
        outbox = self._outbox()
        if outbox is not None:
            self.ws.owe(len(data))  # held in the outbox until the pump sends it
            outbox.push_direct(data)
        else:
            self.ws.send_text(data)
            self._flush()

    def _outbox(self) -> Outbox | None:
        runner = self.runner
        if runner is not None and runner.conn is self:
            return runner.outbox
        return None

    def start(self, outbox: Outbox, after_lsn: int, prelude: list[bytes], ended: bool) -> None:
        self._pump = self.front.tasks.spawn(
            self._run(outbox, after_lsn, prelude), f"pump:{self.label}"
        )

    async def _run(self, outbox: Outbox, after_lsn: int, prelude: list[bytes]) -> None:
        try:
            await outbox.run(after_lsn, prelude)
        except ConnectionError:
            pass  # the socket went away mid-send; the log keeps everything for the resume
        except StoreError as exc:
            log.error("ws.store_failed", conn=self.label, error=str(exc))
            self.begin_close(CLOSE_INTERNAL_ERROR, "event log unavailable")
        except Exception as exc:
            # Anything else would leave an open socket that never sends again (issue 16
            # item 5): say so once, and close so the client resumes on a new connection.
            log.error("ws.pump_failed", conn=self.label, error=repr(exc), exc_info=exc)
            self._pump = None  # (this task: not cancelled by begin_close)
            self.begin_close(CLOSE_INTERNAL_ERROR, "internal error")

    def _stop_pump(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None

    # --- closing -----------------------------------------------------------------------

    def supersede(self) -> None:
        self.begin_close(CLOSE_NORMAL, jsonrpc.SUPERSEDED_REASON)

    def terminated(self) -> None:
        self.begin_close(CLOSE_NORMAL, jsonrpc.TERMINATED_REASON)

    def begin_close(self, code: int, reason: str) -> None:
        """Send our close frame (once); the TCP connection goes when the peer answers with
        its own, or after ``CLOSE_WAIT_S`` (RFC 6455 §7.1.2)."""
        self._stop_pump()
        if self.transport is None or not self.ws.send_close(code, reason):
            return
        self._flush()
        self._wait_for_close()

    def _wait_for_close(self) -> None:
        self._stop_pump()
        if self._timer is not None:
            self._timer.cancel()
        self._close_timer = True
        self._timer = asyncio.get_running_loop().call_later(CLOSE_WAIT_S, self.abort)

    async def close(self, code: int, reason: str) -> None:
        """``begin_close`` and wait until the connection is gone."""
        self.begin_close(code, reason)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.closed), CLOSE_WAIT_S + 1)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def check_alive(self, now: float, interval: float) -> None:
        """One heartbeat tick: ping a socket silent for ``interval``; drop one whose ping
        went unanswered for half of it (the client resumes on a new one)."""
        if self.transport is None or not self._reading or self.ws.state is not State.OPEN:
            return
        if self.ping_sent is not None:
            if now - self.ping_sent >= interval / 2:
                log.info("ws.heartbeat_timeout", conn=self.label)
                self.abort()
        elif now - self.last_heard >= interval and not self._over_budget():
            self.ping_sent = now
            self.ws.send_ping()
            self._flush()


class WebSocketFront:
    def __init__(self, hub: Hub, config: Config, guard: HostPolicy) -> None:
        self.hub = hub
        self.config = config
        self.guard = guard
        self.connections: set[WsConnection] = set()
        self.tasks = TaskSet("ws")

    def wants(self, head: RequestHead) -> bool:
        """Is this request line and header set an upgrade to this front?"""
        return head.is_websocket_upgrade() and head.path == self.config.server.path

    def check(self, head: RequestHead, peer: str | None) -> HandshakeRefusal | Accepted:
        """Everything about an opening handshake decided before the socket is taken."""
        cfg = self.config.server
        headers = head.headers
        # parse_request_head hands a repeat of these to aiohttp (``handle``): one value each.
        singles: dict[str, list[str]] = {
            name: [headers[name]] for name in SINGLETON_HEADERS if name in headers
        }
        refusal = self.guard.check(head.target, singles)
        if refusal is not None:
            return self._refused(refusal.status, refusal.reason, peer)
        now = asyncio.get_running_loop().time()
        if not self.hub.new_connections.allow(peer, now):
            return self._refused(429, "too many new connections from this address", peer)
        principal = self.hub.tokens.authenticate(
            headers.get("authorization"), headers.get("sec-websocket-protocol")
        )
        if principal is None:
            return self._refused(
                401,
                "a valid bearer token is required",
                peer,
                ('WWW-Authenticate: Bearer realm="mcproxy"',),
            )
        query = head.query()
        hint = query.get(QUERY_SESSION) or head.cookie(cfg.cookie_name)
        if hint is not None and not valid_session_id(hint):
            return HandshakeRefusal(400, "mcp_session_id must be 16-128 visible ASCII characters")
        if hint is None and cfg.require_session_id:
            return HandshakeRefusal(400, "mcp_session_id is required (query parameter or cookie)")
        cursor: int | None = None
        raw_cursor = query.get(QUERY_CURSOR)
        if raw_cursor is not None:
            if not raw_cursor.isdigit() or len(raw_cursor) > 18:
                return HandshakeRefusal(400, "mcp_last_lsn must be a non-negative integer")
            cursor = int(raw_cursor)
        problem = handshake_problem(head)
        if problem is not None:
            return HandshakeRefusal(400, problem, ("Sec-WebSocket-Version: 13",))
        # Only "mcp" is ever echoed: the mcp.auth.* entry carries a token (docs/SECURITY.md).
        protocol = SUBPROTOCOL if SUBPROTOCOL in offered_protocols(head) else None
        return Accepted(principal, hint, cursor, protocol)

    def _refused(
        self, status: int, reason: str, peer: str | None, headers: tuple[str, ...] = ()
    ) -> HandshakeRefusal:
        self.hub.metrics.error(f"http_{status}")
        log.warning("ws.refused", status=status, reason=reason, peer=peer)
        return HandshakeRefusal(status, reason, headers)

    def take(
        self,
        transport: asyncio.Transport,
        head: RequestHead,
        peer: str | None,
        previous: asyncio.BaseProtocol | None = None,
    ) -> WsConnection | None:
        """Handle an opening handshake on ``transport``: answer a refusal and hang up, or
        take the socket over (its protocol becomes a ``WsConnection``)."""
        decision = self.check(head, peer)
        if isinstance(decision, HandshakeRefusal):
            transport.write(http_refusal(decision.status, decision.reason, list(decision.headers)))
            transport.close()
            return None
        return self.open(transport, head, decision, peer, previous)

    def open(
        self,
        transport: asyncio.Transport,
        head: RequestHead,
        accepted: Accepted,
        peer: str | None,
        previous: asyncio.BaseProtocol | None,
    ) -> WsConnection:
        conn = WsConnection(self, transport, accepted.principal, peer, previous)
        transport.set_protocol(conn)
        loop = asyncio.get_running_loop()
        conn._timer = loop.call_later(self.config.limits.bind_timeout_s, conn.bind_deadline)
        self.tasks.spawn(self._accept(conn, head, accepted), f"accept:{conn.label}")
        return conn

    async def _accept(self, conn: WsConnection, head: RequestHead, accepted: Accepted) -> None:
        hint = accepted.hint
        try:
            # By principal and id: another principal's id is an unknown id here (no oracle).
            runner = await self.hub.get(hint, conn.principal) if hint is not None else None
        except StoreError as exc:
            log.error("ws.store_failed", conn=conn.label, error=str(exc))
            if conn.transport is not None:
                conn.transport.write(http_refusal(503, "event log unavailable"))
                conn.transport.close()
            return
        transport = conn.transport
        if transport is None:
            return  # the client gave up while the session loaded
        cfg = self.config.server
        elsewhere = None
        if runner is None and hint is not None:
            elsewhere = misdirected(hint, cfg.instance)
        if elsewhere is not None and hint is not None:
            # A fleet: the balancer sent another instance's id here (its owner is down, or
            # the rule is wrong). RFC 9110 §15.5.20 421; creating it here would make a twin.
            log.warning("session.misdirected", session=short_id(hint), reason=elsewhere)
            self.hub.metrics.error("http_421")
            transport.write(http_refusal(421, elsewhere))
            transport.close()
            return
        extra: list[str] = []
        proposed = hint
        if proposed is None:
            proposed = mint_session_id(cfg.instance)
            # SEP draft v0: the id travels in a cookie too, so browsers resume without code.
            extra.append(
                f"Set-Cookie: {cfg.cookie_name}={proposed}; HttpOnly; Path={cfg.path};"
                " SameSite=Strict"
            )
        transport.write(accept_response(head, accepted.protocol, extra))
        self.connections.add(conn)
        log.info("ws.connected", conn=conn.label, bound=runner is not None, peer=conn.peer)
        if runner is not None:
            conn.bind_to(runner)
            runner.attach(conn, accepted.cursor)
        conn.start_reading(proposed, accepted.cursor)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """An upgrade that reached aiohttp's router (the connection served plain HTTP
        first): the same checks, then the socket is taken from aiohttp until it closes."""
        headers: dict[str, str] = {}
        for name in request.headers:
            key = name.lower()
            if key not in headers:
                joiner = "; " if key == "cookie" else ", "
                headers[key] = joiner.join(request.headers.getall(name))
        head = RequestHead(request.method, request.raw_path, headers)
        # The joined values above hide a repeat: the guard sees every value, as on POST.
        refusal = self.guard.check(request.raw_path, guarded_headers(request))
        decision = (
            self._refused(refusal.status, refusal.reason, request.remote)
            if refusal is not None
            else self.check(head, request.remote)
        )
        if isinstance(decision, HandshakeRefusal):
            extra = dict(line.split(": ", 1) for line in decision.headers)
            return web.Response(status=decision.status, text=decision.reason + "\n", headers=extra)
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("the client went away")
        conn = self.open(transport, head, decision, request.remote, request.protocol)
        await conn.closed
        # aiohttp writes this to a closed transport, which it takes as a client that left.
        return web.Response()

    async def bind(
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
            conn.invalid_request(msg, "mcpSessionId must be 16-128 visible ASCII characters")
            return
        runner = await self.hub.get(hint, conn.principal) if hint is not None else None
        if conn.transport is None:
            return
        instance = self.config.server.instance
        elsewhere = misdirected(hint, instance) if runner is None and hint is not None else None
        if elsewhere is not None and hint is not None:
            # In the message (draft v3) the balancer could not see the id; never a twin here.
            self.hub.metrics.error(f"ws_{CLOSE_MISDIRECTED}")
            log.warning("session.misdirected", session=short_id(hint), reason=elsewhere)
            conn.begin_close(CLOSE_MISDIRECTED, elsewhere[:120])
            return
        if hint is not None and runner is None and not is_init:
            # (An unknown id on initialize or on the URL is how a client proposes a new one.)
            self.hub.metrics.resumes.labels("unknown_session").inc()
        if runner is not None:
            conn.bind_to(runner)
            if is_init:
                runner.attach(conn, cursor, hello=msg)
            else:
                runner.attach(conn, cursor)
                conn.to_session(msg)
            return
        if is_init:
            session_id = hint or proposed
            try:
                runner, created = await self.hub.get_or_create(session_id, conn.principal)
            except LimitExceeded as exc:
                self.hub.metrics.error(jsonrpc.TOO_MANY_SESSIONS)
                assert isinstance(msg.id, int | str)
                conn.reply(jsonrpc.error_bytes(msg.id, jsonrpc.TOO_MANY_SESSIONS, str(exc)))
                return
            if conn.transport is None:
                return
            conn.bind_to(runner)
            if created:
                runner.attach(conn, None)
                conn.to_session(msg)
            else:  # it exists after all (a racing connection made it): a later connection
                runner.attach(conn, cursor, hello=msg)
            return
        if kind is not Kind.REQUEST:
            return  # notifications and responses before a session exist have nowhere to go
        assert isinstance(msg.id, int | str)
        if msg.method == "ping":  # basic/utilities/ping: answer promptly, even unbound
            conn.reply(jsonrpc.encode(jsonrpc.result_message(msg.id, {})))
        elif hint is not None:
            conn.reply(jsonrpc.error_bytes(msg.id, jsonrpc.SESSION_NOT_FOUND, "session not found"))
        else:
            conn.reply(
                jsonrpc.error_bytes(
                    msg.id, jsonrpc.INVALID_REQUEST, "no session: send initialize first"
                )
            )

    async def heartbeat(self) -> None:
        """Ping quiet sockets and drop dead ones: one sweep for all (server.heartbeat_s)."""
        interval = self.config.server.heartbeat_s
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval / 2)
            now = loop.time()
            for conn in list(self.connections):
                conn.check_alive(now, interval)

    async def close_all(self, code: int, reason: str) -> None:
        await asyncio.gather(
            *(c.close(code, reason) for c in list(self.connections)), return_exceptions=True
        )

    async def aclose(self) -> None:
        await self.tasks.cancel_all()


def _public(exc: ProtocolError) -> tuple[str, str]:
    """Wire text for a framing error: JSON-RPC's name for it, and what was wrong with the input."""
    name = "Parse error" if exc.code == jsonrpc.PARSE_ERROR else "Invalid Request"
    return name, str(exc)[:200]
