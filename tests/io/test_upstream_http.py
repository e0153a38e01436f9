"""``HttpUpstream`` against small scripted HTTP servers (aiohttp, in the test's loop): the
answers a well-behaved SDK server never gives, each checked for what the session sees."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import pytest
from aiohttp import web

from mcproxy.config import UpstreamConfig
from mcproxy.errors import UpstreamError
from mcproxy.upstreams.http import HttpOptions, HttpUpstream
from tests.helpers import TIMEOUT, eventually, free_port

Handler = Callable[[web.Request, dict[str, Any] | None], Awaitable[web.StreamResponse]]
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
INIT_RESULT = {"protocolVersion": "2025-06-18", "capabilities": {}, "serverInfo": {"name": "s"}}


class Session:
    """The session side: what the upstream hands over."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.messages: list[tuple[dict[str, Any], int | None]] = []
        self.lost: list[str] = []
        self.unsent: list[set[int]] = []
        self.changed = asyncio.Event()
        self.fail_on = fail_on  # raise while handling the answer to this id (a bug)

    def on_upstream_message(self, line: bytes, related: int | None = None) -> None:
        message = json.loads(line)
        if self.fail_on is not None and message.get("id") == self.fail_on:
            raise RuntimeError("bug in the session")
        self.messages.append((message, related))
        self.changed.set()

    def on_upstream_lost(self, reason: str, unsent: Collection[int] = ()) -> None:
        self.lost.append(reason)
        self.unsent.append(set(unsent))
        self.changed.set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


class Slot:
    def __init__(self, value: str | None = None) -> None:
        self.value = value

    async def load(self) -> str | None:
        return self.value

    def save(self, value: str | None) -> None:
        self.value = value


class Server:
    """An HTTP endpoint whose answers each test scripts; it records every request."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}  # "POST initialize", "GET", "DELETE", ...
        self.seen: list[tuple[str, dict[str, str], dict[str, Any] | None]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read()) if request.method == "POST" else None
        key = request.method + (f" {body.get('method', 'response')}" if body else "")
        self.seen.append((key, dict(request.headers), body))
        route = self.routes.get(key) or self.routes.get(request.method)
        if route is None:
            return web.Response(status=202 if request.method == "POST" else 405)
        return await route(request, body)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    scripted = Server()
    app = web.Application()
    app.router.add_route("*", "/mcp", scripted.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    scripted.url = f"http://127.0.0.1:{port}/mcp"
    yield scripted
    await runner.cleanup()


def upstream(url: str, session: Session, slot: Slot | None = None, **cfg: Any) -> HttpUpstream:
    config = UpstreamConfig(**cfg)
    return HttpUpstream(HttpOptions.from_config(url, config, {}), session, config, "t", slot)


def initialized(session_id: str = "up-1") -> Handler:
    async def answer(request: web.Request, body: dict[str, Any] | None) -> web.Response:
        assert body is not None
        reply = {"jsonrpc": "2.0", "id": body["id"], "result": INIT_RESULT}
        return web.json_response(reply, headers={"Mcp-Session-Id": session_id})

    return answer


def sse(*events: bytes, status: int = 200) -> Handler:
    async def answer(request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
        resp = web.StreamResponse(status=status, headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in events:
            await resp.write(event)
        return resp

    return answer


async def test_json_answers_headers_state_and_a_missing_get_stream(server: Server) -> None:
    async def batch(request: web.Request, body: dict[str, Any] | None) -> web.Response:
        assert body is not None  # a 2025-03-26 server may answer with a batch
        return web.json_response(
            [
                {"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": "x"}},
                {"jsonrpc": "2.0", "id": body["id"], "result": {}},
            ]
        )

    async def not_found(request: web.Request, body: dict[str, Any] | None) -> web.Response:
        return web.Response(status=404)  # should be 405; must not end the session

    server.routes |= {"POST initialize": initialized(), "POST ping": batch, "GET": not_found}
    session, slot = Session(), Slot()
    up = upstream(server.url, session, slot)
    await up.start()
    up.send(json.dumps(INIT).encode())
    await session.until(lambda: len(session.messages) == 1)
    assert session.messages[0] == ({"jsonrpc": "2.0", "id": 1, "result": INIT_RESULT}, 1)
    assert json.loads(slot.value or "") == {
        "url": server.url,
        "session": "up-1",
        "version": "2025-06-18",
    }
    up.send(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
    up.send(b'{"jsonrpc":"2.0","id":2,"method":"ping"}')
    await session.until(lambda: len(session.messages) == 3)
    assert [related for _, related in session.messages[1:]] == [2, 2]
    await session.until(lambda: any(key == "GET" for key, _, _ in server.seen))
    await up.aclose()
    keys = [key for key, _, _ in server.seen]
    assert [k for k in keys if k != "GET"] == [
        "OPTIONS",
        "POST initialize",
        "POST notifications/initialized",
        "POST ping",
        "DELETE",
    ]
    assert keys.count("GET") == 1  # opened after initialized; the 404 is not retried
    for key, headers, _ in server.seen[2:]:
        assert headers["Mcp-Session-Id"] == "up-1", key
        assert headers["MCP-Protocol-Version"] == "2025-06-18", key
    assert "Mcp-Session-Id" not in server.seen[1][1]  # initialize starts a session
    assert slot.value is None and not session.lost  # ended, and forgotten


async def test_a_stream_without_event_ids_that_breaks_loses_the_upstream(server: Server) -> None:
    note = b'data: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\n\n'
    server.routes |= {"POST initialize": initialized(), "POST tools/call": sse(note)}
    session = Session()
    up = upstream(server.url, session)
    await up.start()
    up.send(json.dumps(INIT).encode())
    up.send(b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{}}')
    await session.until(lambda: bool(session.lost))
    assert session.messages[-1][1] == 7  # the note came, related to its request
    assert "no event id" in session.lost[0] and "tools/call 7" in session.lost[0]
    assert [k for k, _, _ in server.seen][-1] == "DELETE"  # the session was ended first
    up.send(b'{"jsonrpc":"2.0","id":8,"method":"ping"}')  # after the loss: dropped
    await up.aclose()
    assert len(session.lost) == 1


async def test_a_polling_server_is_resumed_after_its_retry(server: Server) -> None:
    first = b"id: a1\nretry: 50\ndata:\n\n"  # priming; then the server closes the stream
    answer = b'id: a2\ndata: {"jsonrpc":"2.0","id":3,"result":{"ok":true}}\n\n'
    server.routes |= {"POST initialize": initialized(), "POST tools/call": sse(first)}
    server.routes["GET"] = sse(answer)
    session = Session()
    up = upstream(server.url, session)
    await up.start()
    up.send(json.dumps(INIT).encode())
    up.send(b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{}}')
    await session.until(lambda: len(session.messages) == 2)
    assert session.messages[1] == ({"jsonrpc": "2.0", "id": 3, "result": {"ok": True}}, 3)
    resumed = [h for key, h, _ in server.seen if key == "GET"]
    assert resumed[0]["Last-Event-ID"] == "a1"
    await up.aclose()
    assert not session.lost


@pytest.mark.parametrize(
    ("status", "extra", "expected"),
    [
        (401, b'{"jsonrpc":"2.0","id":null,"error":{"code":-1,"message":"no"}}', "HTTP 401"),
        (307, b"", "redirects to http://elsewhere/mcp"),
    ],
)
async def test_http_errors_answer_the_request(
    server: Server, status: int, extra: bytes, expected: str
) -> None:
    async def refuse(request: web.Request, body: dict[str, Any] | None) -> web.Response:
        return web.Response(
            status=status,
            body=extra,
            headers={"Location": "http://elsewhere/mcp", "Content-Type": "application/json"},
        )

    server.routes["POST initialize"] = refuse
    session = Session()
    up = upstream(server.url, session)
    await up.start()
    up.send(json.dumps(INIT).encode())
    await session.until(lambda: bool(session.messages))
    error = session.messages[0][0]["error"]
    assert error["code"] == -32603 and expected in error["message"]
    assert error["data"]["httpStatus"] == status
    if extra:
        assert error["data"]["upstreamError"] == {"code": -1, "message": "no"}
    await up.aclose()
    assert not session.lost


async def test_gateway_errors_and_session_expiry_lose_the_upstream(server: Server) -> None:
    async def unavailable(request: web.Request, body: dict[str, Any] | None) -> web.Response:
        return web.Response(status=503)

    async def expired(request: web.Request, body: dict[str, Any] | None) -> web.Response:
        return web.Response(status=404)

    server.routes |= {"POST initialize": initialized(), "POST ping": unavailable}
    session, slot = Session(), Slot()
    up = upstream(server.url, session, slot)
    await up.start()
    up.send(json.dumps(INIT).encode())
    up.send(b'{"jsonrpc":"2.0","id":2,"method":"ping"}')
    await session.until(lambda: bool(session.lost))
    assert session.lost == ["upstream unavailable (HTTP 503)"]
    assert slot.value is None  # its session was ended

    server.routes["POST ping"] = expired
    again = Session()
    up = upstream(server.url, again, slot)
    await up.start()
    up.send(json.dumps(INIT).encode())
    up.send(b'{"jsonrpc":"2.0","id":2,"method":"ping"}')
    await again.until(lambda: bool(again.lost))
    assert again.lost == ["upstream session unknown (HTTP 404)"]
    assert again.unsent == [{2}]  # refused before it ran: sent again, not "outcome unknown"
    assert slot.value is None and [k for k, _, _ in server.seen][-1] == "POST ping"  # no DELETE


async def test_start_ends_a_stale_session_or_fails_clearly(server: Server) -> None:
    stale = json.dumps({"url": server.url, "session": "old-1", "version": "2025-11-25"})
    slot = Slot(stale)
    up = upstream(server.url, Session(), slot)
    await up.start()
    key, headers, _ = server.seen[0]
    assert key == "DELETE" and headers["Mcp-Session-Id"] == "old-1"
    assert slot.value is None
    await up.aclose()

    moved = Slot(json.dumps({"url": "http://other/mcp", "session": "old-2"}))
    up = upstream(server.url, Session(), moved)
    await up.start()  # a session at another URL is not ours to end
    assert [k for k, _, _ in server.seen][-1] == "OPTIONS"
    await up.aclose()

    with pytest.raises(UpstreamError, match="cannot reach"):
        await upstream(f"http://127.0.0.1:{free_port()}/mcp", Session()).start()


@pytest.mark.parametrize(
    ("status", "body", "refused"),
    [
        (404, b"Session not found", True),
        (
            400,
            b'{"jsonrpc":"2.0","error":{"code":-32000,"message":"Bad Request: No valid session'
            b' ID provided"},"id":null}',
            True,
        ),
        (
            400,
            b'{"jsonrpc":"2.0","error":{"code":-32000,"message":"Bad Request: Server not'
            b' initialized"},"id":null}',
            True,
        ),
        (400, b'{"jsonrpc":"2.0","error":{"code":-32602,"message":"bad arguments"},"id":3}', False),
    ],
)
async def test_a_request_refused_for_its_session_is_unsent_not_unknown(
    server: Server, status: int, body: bytes, refused: bool
) -> None:
    # Issue 16 item 1: a restarted upstream answers 404 (or 400, "no session") to the old
    # session's requests before running anything: those requests are reported unsent (the
    # core sends them again after re-initializing), and so are those never POSTed.
    async def refuse(request: web.Request, body_: dict[str, Any] | None) -> web.Response:
        return web.Response(status=status, body=body, content_type="application/json")

    server.routes |= {"POST initialize": initialized(), "POST tools/call": refuse}
    session = Session()
    up = upstream(server.url, session)
    await up.start()
    up.send(json.dumps(INIT).encode())
    await session.until(lambda: bool(session.messages))
    up.send(b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{}}')
    if refused:
        await session.until(lambda: bool(session.lost))
        assert session.unsent == [{3}] and "session unknown" in session.lost[0]
        assert [k for k, _, _ in server.seen][-1] == "POST tools/call"  # no DELETE: it is gone
    else:  # refused for its content: answered, and the session goes on
        await session.until(lambda: len(session.messages) == 2)
        error = session.messages[1][0]["error"]
        assert error["data"]["httpStatus"] == 400
        assert not session.lost
    await up.aclose()


async def test_a_reader_that_dies_loses_the_upstream(server: Server) -> None:
    # Issue 16 item 5: an unexpected error in a stream reader (here: in the session's handling
    # of the answer) must reach the session as a loss, not leave its request waiting forever.
    async def answer(request: web.Request, body: dict[str, Any] | None) -> web.Response:
        assert body is not None
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": {}})

    server.routes |= {"POST initialize": initialized(), "POST tools/call": answer}
    session = Session(fail_on=5)
    up = upstream(server.url, session)
    await up.start()
    up.send(json.dumps(INIT).encode())
    up.send(b'{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{}}')
    await session.until(lambda: bool(session.lost))
    assert "internal error" in session.lost[0] and "bug in the session" in session.lost[0]
    assert [k for k, _, _ in server.seen][-1] == "DELETE"  # its upstream session was ended
    await up.aclose()
    assert len(session.lost) == 1


@pytest.mark.filterwarnings("error")  # an unclosed aiohttp ClientSession warns when collected
async def test_a_start_cancelled_mid_probe_closes_its_connection(server: Server) -> None:
    # Issue 16 item 6: a session closed while its HTTP upstream is being reached cancels
    # ``start()``; the client it opened must be closed (no connection left to the remote
    # server), and closing the upstream afterwards is safe.
    probing = asyncio.Event()
    client_gone = asyncio.Event()

    async def stall(request: web.Request, body: dict[str, Any] | None) -> web.Response:
        probing.set()
        transport = request.transport
        await eventually(lambda: transport is None or transport.is_closing())
        client_gone.set()
        return web.Response(status=204)

    server.routes["OPTIONS"] = stall
    session = Session()
    up = upstream(server.url, session)
    starting = asyncio.ensure_future(up.start())
    async with asyncio.timeout(TIMEOUT):
        await probing.wait()
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    del starting  # its traceback holds start()'s frame, and with it the client
    gc.collect()  # a client left open warns here, failing the test
    async with asyncio.timeout(TIMEOUT):
        await client_gone.wait()
    await up.aclose()
    assert not session.lost
    assert [key for key, _, _ in server.seen] == ["OPTIONS"]  # nothing else was sent
