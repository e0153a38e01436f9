"""The Streamable HTTP front (MCP 2025-11-25 basic/transports §"Streamable HTTP") on ``/mcp``.

The same durable sessions as the WebSocket front, reached over POST / GET / DELETE:

- POST carries one client message. A notification or a response gets 202. A request gets
  an SSE stream that carries the messages related to it and ends with its answer, or a JSON
  body when the proxy answers at once (an error, a retried id whose answer is logged, a
  re-sent ``initialize``). ``initialize`` without ``Mcp-Session-Id`` creates a session and
  returns its id in that header; every other request must carry it (400 without, 404 for an
  unknown or deleted one).
- GET opens the session's general stream (server messages related to no request) or, with
  ``Last-Event-ID``, resumes the stream that id belongs to.
- DELETE ends the session and stops its upstream.

SSE event ids are ``<stream>.<lsn>``: the LSN is the session's log position (unique within the
session) and the stream says which stream to resume (§"Resumability and Redelivery": replay
only that stream's messages). A plain ``<lsn>`` on GET is the cross-transport cursor: every
stream after that LSN, as a WebSocket connection would get them (docs/PROTOCOL.md).
The log is in SQLite, so all of this works the same after a proxy restart.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Final

import structlog
from aiohttp import hdrs, web

from mcproxy.config import Config
from mcproxy.core import jsonrpc
from mcproxy.core.actions import Reply
from mcproxy.core.guard import SINGLETON_HEADERS, HostPolicy
from mcproxy.core.ids import mint_session_id, misdirected, short_id, valid_session_id
from mcproxy.core.jsonrpc import Kind
from mcproxy.core.session import GENERAL_STREAM
from mcproxy.engine.hub import Hub
from mcproxy.engine.outbox import Outbox
from mcproxy.engine.runner import SessionRunner
from mcproxy.errors import LimitExceeded, ProtocolError, StoreError
from mcproxy.tasks import TaskSet

log = structlog.get_logger("mcproxy")

HEADER_SESSION: Final = "Mcp-Session-Id"
HEADER_VERSION: Final = "MCP-Protocol-Version"
HEADER_LAST_EVENT: Final = "Last-Event-ID"
# Every revision that has the initialize handshake (basic/lifecycle). 2026-07-28 removed it
# and sessions with it; its clients fall back to this era when their probe is refused.
SUPPORTED_VERSIONS: Final = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
# transports §"Protocol Version Header": a client that sends none is assumed to be 2025-03-26.
ASSUMED_VERSION: Final = "2025-03-26"
# Priming events (an id with empty data) arrived in 2025-11-25; older clients may choke on an
# empty `data`, so they only get them from that version on (as the Python SDK does).
PRIMING_SINCE: Final = "2025-11-25"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_JSON: Final = "application/json"
_SSE: Final = "text/event-stream"
_SSE_HEADERS: Final = {
    "Content-Type": _SSE,
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
}


class SseStream:
    """One SSE response; the ``Attachment`` a ``SessionRunner`` pumps one stream into."""

    _ids = itertools.count(1)

    def __init__(
        self,
        resp: web.StreamResponse,
        stream: int | None,
        tasks: TaskSet,
        transport: asyncio.Transport | None = None,
        max_output: int = 0,
    ) -> None:
        self.resp = resp
        self.stream = stream  # None: every stream (the cross-transport cursor form)
        self.label = f"sse#{next(self._ids)}"
        self._tasks = tasks
        self._pump: asyncio.Task[None] | None = None
        self._outbox: Outbox | None = None
        self._transport = transport
        self._max_output = max_output  # limits.max_output_bytes; 0: not checked

    def _check_budget(self) -> None:
        """The output budget (docs/SECURITY.md): a client that leaves more than
        ``limits.max_output_bytes`` unread loses the stream, which is dropped at once (a
        graceful end would wait for it to read); it resumes with ``Last-Event-ID``."""
        transport = self._transport
        if transport is None or not self._max_output:
            return
        buffered = transport.get_write_buffer_size()
        if buffered > self._max_output:
            log.warning("http.over_budget", conn=self.label, buffered=buffered)
            transport.abort()
            raise ConnectionResetError("the client does not read its stream")

    async def send(self, data: bytes, lsn: int | None) -> None:
        head = b""
        if lsn is not None:
            data = jsonrpc.without_lsn(data)  # the event id carries it
            head = b"id: %s\n" % event_id(self.stream, lsn).encode()
        if b"\n" in data or b"\r" in data:
            # JSON from an upstream may be pretty-printed; SSE joins data lines with "\n".
            data = b"\ndata: ".join(data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"))
        self._check_budget()
        event = head + b"data: " + data + b"\n\n"
        if self._outbox is not None and self._outbox.ending():
            # The request's answer, and nothing after it: the event and the end of the
            # chunked body in one write (issue 20: each write is a system call).
            await self.resp.write_eof(event)
        else:
            await self.resp.write(event)

    async def prime(self, event_id: str, retry_ms: int) -> None:
        """transports §"Sending Messages to the Server" 6.a: an event id with empty data, so
        the client can resume even before the first message; ``retry`` paces that resume."""
        await self.resp.write(b"id: %s\nretry: %d\ndata: \n\n" % (event_id.encode(), retry_ms))

    def start(self, outbox: Outbox, after_lsn: int, prelude: list[bytes], ended: bool) -> None:
        self._outbox = outbox
        self._pump = self._tasks.spawn(
            self._run(outbox, after_lsn, prelude, ended), f"pump:{self.label}"
        )

    async def _run(self, outbox: Outbox, after_lsn: int, prelude: list[bytes], ended: bool) -> None:
        try:
            await outbox.run(after_lsn, prelude, ended)
        except (ConnectionError, RuntimeError) as exc:
            # Mostly the client went away mid-write (aiohttp: a reset, or a write after the
            # response ended because of it): ordinary, and the log keeps everything for its
            # resume. ``failed`` tells that from a write that failed on an open connection.
            self.failed(exc)
        except StoreError as exc:
            # Not the client's doing either: the stream must not end as if complete.
            log.error("http.store_failed", conn=self.label, error=str(exc))
            self.cut()

    def failed(self, exc: BaseException) -> None:
        """A write failed. With the client gone, that is all (one info line). With its
        connection still open it is not the client's doing (a write after the response
        ended: a bug), and the response must not end as if complete: a POST stream would
        end without its answer, silently (peer benchmark, issue 20). It is cut instead, so
        the client sees a broken stream and resumes with ``Last-Event-ID`` (the log has the
        answer), and the log says what happened."""
        transport = self._transport
        if isinstance(exc, ConnectionError) or transport is None or transport.is_closing():
            client_gone(exc, conn=self.label)
            return
        log.error("http.stream_failed", conn=self.label, error=repr(exc)[:200])
        self.cut()

    def cut(self) -> None:
        """End the connection without the end of the chunked body (not a complete response)."""
        if self._transport is not None:
            self._transport.abort()

    def supersede(self) -> None:
        self.stop()

    def terminated(self) -> None:
        self.stop()

    def stop(self) -> None:
        """End the response; the client resumes (or not) with ``Last-Event-ID``."""
        if self._pump is not None:
            self._pump.cancel()

    async def serve(self, keepalive_s: float) -> None:
        """Until the stream ends, is superseded or the client is gone; keep-alives meanwhile."""
        pump = self._pump
        assert pump is not None
        while True:
            done, _ = await asyncio.wait({pump}, timeout=keepalive_s)
            if done:
                break
            try:
                self._check_budget()  # a pump stuck on a peer that reads nothing ends here
                if self._transport is not None and self._transport.get_write_buffer_size():
                    # Bytes still wait for this client: the stream is not idle, and a
                    # keep-alive would wait behind them, so no budget check would come again.
                    continue
                await self.resp.write(b": keepalive\n\n")
            except (ConnectionError, RuntimeError) as exc:
                self.failed(exc)
                pump.cancel()
                break
        # The pump logs its own end (``_run``); a cancelled one may not have finished yet,
        # and asking it for its exception then raised InvalidStateError (issue 16 item 8).


class StreamableHttpFront:
    def __init__(self, hub: Hub, config: Config, guard: HostPolicy) -> None:
        self.hub = hub
        self.config = config
        self.guard = guard
        self.streams: set[SseStream] = set()
        self._tasks = TaskSet("http")

    # --- the handlers ----------------------------------------------------------------

    async def post(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, self._post)

    async def get(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, self._get)

    async def delete(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, self._delete)

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Run ``handler`` and write its answer here, so that a client that left (a reset or
        closed connection: a timed-out session opening, a killed process) is what it is, one
        info line (``http.client_gone``), on every path: an exception that escapes a handler
        is aiohttp's "Error handling request", logged at error level with a traceback, and
        a response left for aiohttp to write fails there unseen. What the request did stands
        (its answer is in the log for a resume)."""
        resp: web.StreamResponse | None = None
        try:
            resp = await handler(request)
            if not resp.prepared:  # a JSON body or a status; an SSE stream wrote itself
                await resp.prepare(request)
                await resp.write_eof()
        except ConnectionError as exc:  # aiohttp's ClientConnectionResetError is one
            client_gone(exc, method=request.method, peer=request.remote)
            # Nobody reads it: aiohttp's own write of it fails quietly (a ConnectionError).
            return resp if resp is not None else web.Response(status=499)
        return resp

    # --- POST -------------------------------------------------------------------------

    async def _post(self, request: web.Request) -> web.StreamResponse:
        admitted = self._admit(request)
        if isinstance(admitted, web.Response):
            return admitted
        principal = admitted
        if request.content_type != _JSON:
            return self._status(415, "Content-Type must be application/json")
        if not _accepts(request, _JSON) or not _accepts(request, _SSE):
            return self._status(406, "Accept must list application/json and text/event-stream")
        body = await request.read()
        try:
            msg = jsonrpc.decode(body)
        except ProtocolError as exc:
            return self._error(400, None, exc.code, str(exc)[:200])
        request_id = msg.id if isinstance(msg.id, int | str) else None
        kind = jsonrpc.kind_of(msg)
        if kind is Kind.REQUEST and request_id is not None:
            refusal = self.hub.drain_refusal(request_id)
            if refusal is not None:  # draining before a stop (docs/PROTOCOL.md "Stopping")
                body, retry_s = refusal
                self.hub.metrics.error("http_503")
                retry = {hdrs.RETRY_AFTER: str(retry_s)}
                return web.Response(status=503, body=body, content_type=_JSON, headers=retry)
        session_id = request.headers.get(HEADER_SESSION)
        created = False
        if session_id is None:
            if kind is not Kind.REQUEST or msg.method != "initialize":
                return self._error(
                    400, request_id, jsonrpc.INVALID_REQUEST, "Mcp-Session-Id header is required"
                )
            if not self._new_connection(request):
                return self._status(429, "too many new sessions from this address")
            session_id = mint_session_id(self.config.server.instance)
            try:
                runner = self.hub.create(session_id, principal)
            except LimitExceeded as exc:
                return self._error(exc.status, request_id, jsonrpc.TOO_MANY_SESSIONS, str(exc))
            created = True
        else:
            found = await self._session(session_id, request_id, principal)
            if isinstance(found, web.Response):
                return found
            runner = found
        if kind is not Kind.REQUEST:
            runner.client_message(msg)
            # 202 says "accepted": what the message wrote (a client's answer to a server
            # request, a cancellation) must be committed first, or a crash loses it.
            failed = await self._committed(runner, None)
            return failed or web.Response(status=202)
        assert request_id is not None
        headers = {HEADER_SESSION: session_id}
        direct = runner.client_message(msg)
        if direct:
            answer = direct[0]
            if isinstance(answer, Reply):
                data: bytes | None = answer.data
            else:
                await runner.store.barrier()
                data = await runner.store.read_event(runner.key, answer.lsn)
                data = None if data is None else jsonrpc.without_lsn(data)
            if data is None:  # pruned: the answer is gone, say so rather than hang
                data = jsonrpc.error_bytes(
                    request_id, jsonrpc.INVALID_REQUEST, "request id already answered"
                )
            return web.Response(body=data, content_type=_JSON, headers=headers)
        located = runner.core.stream_of(request_id)
        if located is None:  # cannot happen: a request is answered directly or in flight
            return self._error(500, request_id, jsonrpc.INTERNAL_ERROR, "request was not accepted")
        stream, start = located
        # The response's headers (and the priming event) acknowledge the request: it must be
        # in the log by then, or a crash right after loses a request the client saw
        # accepted, and its Last-Event-ID would resume a stream the next process never had.
        # It costs one group commit, which the answer has to wait for in any case.
        failed = await self._committed(runner, request_id)
        if failed is not None:
            return failed
        if created:
            log.info("http.session_created", session=runner.label, peer=request.remote)
        version = (
            jsonrpc.protocol_version(msg.params)
            if msg.method == "initialize"
            else runner.core.protocol_version
        )
        return await self._stream(request, runner, stream, start, version, headers)

    # --- GET --------------------------------------------------------------------------

    async def _get(self, request: web.Request) -> web.StreamResponse:
        admitted = self._admit(request)
        if isinstance(admitted, web.Response):
            return admitted
        principal = admitted
        if not _accepts(request, _SSE):
            return self._status(406, "Accept must list text/event-stream")
        session_id = request.headers.get(HEADER_SESSION)
        if session_id is None:
            return self._error(
                400, None, jsonrpc.INVALID_REQUEST, "Mcp-Session-Id header is required"
            )
        last = request.headers.get(HEADER_LAST_EVENT)
        if not self._new_connection(request):
            return self._status(429, "too many new streams from this address")
        found = await self._session(session_id, None, principal)
        if isinstance(found, web.Response):
            if found.status == 404 and last is not None:
                self.hub.metrics.resumes.labels("unknown_session").inc()
            return found
        runner = found
        if last is None:
            # A new general stream: from what no GET stream carried yet, so nothing the
            # upstream said between `initialized` and this GET is lost.
            return await self._stream(
                request,
                runner,
                GENERAL_STREAM,
                runner.general_sent,
                runner.core.protocol_version,
                {},
            )
        cursor = parse_event_id(last)
        if cursor is None:
            return self._error(400, None, jsonrpc.INVALID_REQUEST, "malformed Last-Event-ID")
        stream, after = cursor
        return await self._stream(request, runner, stream, after, None, {})

    # --- DELETE -----------------------------------------------------------------------

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        admitted = self._admit(request)
        if isinstance(admitted, web.Response):
            return admitted
        principal = admitted
        session_id = request.headers.get(HEADER_SESSION)
        if session_id is None:
            return self._error(
                400, None, jsonrpc.INVALID_REQUEST, "Mcp-Session-Id header is required"
            )
        found = await self._session(session_id, None, principal)
        if isinstance(found, web.Response):
            return found
        await self.hub.terminate(session_id, principal)
        return web.Response(status=204)

    # --- shared -----------------------------------------------------------------------

    async def _committed(
        self, runner: SessionRunner, request_id: int | str | None
    ) -> web.Response | None:
        """Wait until every write so far is committed; a 503 if the log cannot take it."""
        try:
            await runner.store.barrier()
        except StoreError as exc:
            return self._error(503, request_id, jsonrpc.INTERNAL_ERROR, str(exc))
        if runner.failed is not None:  # its writes alone were rolled back (Hub._session_failed)
            return self._error(503, request_id, jsonrpc.INTERNAL_ERROR, str(runner.failed))
        return None

    def _error(
        self,
        status: int,
        request_id: jsonrpc.RequestId | None,
        code: int,
        message: str,
        data: object = None,
    ) -> web.Response:
        """An HTTP error whose body is a JSON-RPC error (transports: "MAY comprise a JSON-RPC
        error response that has no id"; with the id when we know it, as SDK clients match it)."""
        self.hub.metrics.error(f"http_{status}")
        body = jsonrpc.error_bytes(request_id, code, message, data)
        return web.Response(status=status, body=body, content_type=_JSON)

    def _status(self, status: int, reason: str) -> web.Response:
        return self._error(status, None, jsonrpc.INVALID_REQUEST, reason)

    def _admit(self, request: web.Request) -> web.Response | str:
        """Host/Origin, protocol version and authentication: the principal, or a refusal."""
        refusal = self.guard.check(request.raw_path, guarded_headers(request))
        if refusal is not None:
            log.warning("http.refused", reason=refusal.reason, peer=request.remote)
            return self._error(refusal.status, None, jsonrpc.INVALID_REQUEST, refusal.reason)
        principal = self.hub.tokens.authenticate(request.headers.get("Authorization"), None)
        if principal is None:
            log.warning("http.refused", reason="no valid bearer token", peer=request.remote)
            response = self._error(401, None, jsonrpc.INVALID_REQUEST, "Unauthorized")
            response.headers["WWW-Authenticate"] = 'Bearer realm="mcproxy"'
            return response
        version = request.headers.get(HEADER_VERSION)
        if version is not None and version not in SUPPORTED_VERSIONS:
            # transports §"Protocol Version Header": an unsupported version MUST get 400.
            # The body names what we speak, so a 2026-era client falls back to initialize.
            return self._error(
                400,
                None,
                jsonrpc.INVALID_REQUEST,
                f"Unsupported protocol version: {version[:40]}",
                {"supported": list(SUPPORTED_VERSIONS)},
            )
        return principal

    def _new_connection(self, request: web.Request) -> bool:
        """limits.connections_per_s: new sessions and new SSE streams per client address."""
        now = asyncio.get_running_loop().time()
        return self.hub.new_connections.allow(request.remote, now)

    async def _session(
        self, session_id: str, request_id: jsonrpc.RequestId | None, principal: str
    ) -> SessionRunner | web.Response:
        if not valid_session_id(session_id):
            return self._error(
                400, request_id, jsonrpc.INVALID_REQUEST, "malformed Mcp-Session-Id header"
            )
        # By principal and id: another principal's id is looked up exactly like an unknown one
        # (the same misses, the same database read) and gets the same 404 (docs/SECURITY.md).
        runner = await self.hub.get(session_id, principal)
        elsewhere = misdirected(session_id, self.config.server.instance) if runner is None else None
        if elsewhere is not None:
            # A fleet (docs/DEPLOY.md): the balancer sent another instance's session here (its
            # owner is down or the rule is wrong). RFC 9110 §15.5.20: 421, not 404, which
            # would tell the client its session is gone; it may retry, and nothing is created.
            log.warning("session.misdirected", session=short_id(session_id), reason=elsewhere)
            return self._error(421, request_id, jsonrpc.SESSION_NOT_FOUND, elsewhere)
        if runner is None or runner.closed:
            # transports §"Session Management" 3: an ended or unknown session gets 404.
            return self._error(404, request_id, jsonrpc.SESSION_NOT_FOUND, "Session not found")
        return runner

    async def _stream(
        self,
        request: web.Request,
        runner: SessionRunner,
        stream: int | None,
        after: int,
        version: str | None,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """Serve ``stream`` after LSN ``after`` as SSE until it ends. ``version`` set: a new
        stream, primed if the client is recent enough; None: a resumption, not primed."""
        primed = version is not None and version >= PRIMING_SINCE and stream is not None
        resp = web.StreamResponse(headers={**_SSE_HEADERS, **headers})
        # aiohttp sends a StreamResponse's headers in prepare(); held back, they go out in one
        # write with the priming event that follows at once (issue 20: a system call each).
        # A private attribute of the pinned aiohttp: tests/io/test_aiohttp_handover.py.
        resp._send_headers_immediately = not primed
        conn = SseStream(
            resp, stream, self._tasks, request.transport, self.config.limits.max_output_bytes
        )
        self.streams.add(conn)
        try:
            # The headers may be the first write (no priming): a client gone by now fails it.
            await resp.prepare(request)
            if primed:
                assert stream is not None
                await conn.prime(event_id(stream, after), self.config.server.sse_retry_ms)
            if stream is None:
                runner.attach(conn, after)
            else:
                runner.attach_stream(conn, stream, after, resume=version is None)
            await conn.serve(self.config.server.sse_keepalive_s)
        except (ConnectionError, RuntimeError) as exc:
            # The client went away before its stream was attached (the headers or the
            # priming event could not be written): the log keeps everything for its resume.
            conn.failed(exc)
        finally:
            conn.stop()
            self.streams.discard(conn)
            runner.detach(conn)
        return resp

    def close_all(self) -> None:
        """Shutdown: end every stream; clients resume on the next process (``retry``)."""
        for conn in list(self.streams):
            conn.stop()

    async def aclose(self) -> None:
        await self._tasks.cancel_all()


def client_gone(exc: BaseException, **where: str | None) -> None:
    """A client left while something was written to it: ordinary, not an error."""
    log.info("http.client_gone", error=type(exc).__name__, **where)


def event_id(stream: int | None, lsn: int) -> str:
    return str(lsn) if stream is None else f"{stream}.{lsn}"


def parse_event_id(value: str) -> tuple[int | None, int] | None:
    """``<stream>.<lsn>`` → (stream, lsn); ``<lsn>`` → (None, lsn); anything else → None."""
    head, dot, tail = value.strip().partition(".")
    parts = [head, tail] if dot else [head]
    if not all(p.isdigit() and len(p) <= 18 for p in parts):
        return None
    if dot:
        return int(head), int(tail)
    return None, int(head)


def guarded_headers(request: web.Request) -> dict[str, list[str]]:
    """Every value of the headers the guard reads (``HostPolicy.check``); not
    ``request.host``, which falls back to this machine's name when ``Host`` is missing."""
    return {name: request.headers.getall(name, []) for name in SINGLETON_HEADERS}


def _accepts(request: web.Request, media: str) -> bool:
    major = media.split("/")[0]
    for item in request.headers.get("Accept", "").split(","):
        value = item.split(";")[0].strip().lower()
        if value in (media, f"{major}/*", "*/*"):
            return True
    return False
