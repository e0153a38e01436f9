"""The aiohttp applications: routes only. The daemon builds the objects they route to."""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

import msgspec
from aiohttp import hdrs, web

from mcproxy.config import CLIENT_MODULES_PATH, DEMO_PATH, Config
from mcproxy.core.guard import HostPolicy
from mcproxy.fronts.streamable import StreamableHttpFront, guarded_headers
from mcproxy.fronts.ws import WebSocketFront
from mcproxy.metrics import CONTENT_TYPE

# The JS client package (one copy: what npm packs, the wheel ships and the tests load).
WEB_DIR: Final = Path(__file__).resolve().parents[1] / "web"
# The files served, with their types (RFC 9239: text/javascript for modules, which browsers
# only run when the type is a JavaScript one).
WEB_FILES: Final = {
    "demo.html": "text/html; charset=utf-8",
    "demo.js": "text/javascript; charset=utf-8",
    "mcproxy-client.js": "text/javascript; charset=utf-8",
    "mcproxy-client.d.ts": "text/plain; charset=utf-8",
    "sdk-transport.js": "text/javascript; charset=utf-8",
    "sdk-transport.d.ts": "text/plain; charset=utf-8",
}
_ENDPOINT_META: Final = '<meta name="mcproxy-endpoint" content="/mcp">'

Readiness = Callable[[], Awaitable[dict[str, bool]]]
Scrape = Callable[[], Awaitable[bytes]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _guarded(guard: HostPolicy, handler: Handler) -> Handler:
    """The fronts' Host/Origin check on the probes too: a DNS-rebinding page must not read
    /metrics or /readyz any more than it may reach /mcp (docs/SECURITY.md)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        refusal = guard.check(request.raw_path, guarded_headers(request))
        if refusal is not None:
            return web.Response(status=refusal.status, text=refusal.reason + "\n")
        return await handler(request)

    return handle


def _healthz(identity: dict[str, object]) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Alive: the event loop answers. Nothing else is checked (that is /readyz). The body
    also says which program answers (``identity``: version, pid, start time), so an upgrade
    can be checked; encoded once, it costs nothing per probe (docs/SECURITY.md)."""
    body = msgspec.json.encode({"status": "ok", **identity})

    async def handle(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return handle


def _readyz(readiness: Readiness) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(_: web.Request) -> web.Response:
        checks = await readiness()
        ok = all(checks.values())
        body = {"status": "ready" if ok else "not ready", "checks": checks}
        return web.json_response(body, status=200 if ok else 503)

    return handle


def _metrics(scrape: Scrape) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(_: web.Request) -> web.Response:
        return web.Response(body=await scrape(), headers={"Content-Type": CONTENT_TYPE})

    return handle


def _web_routes(app: web.Application, config: Config, guard: HostPolicy) -> None:
    """``[demo] enabled``: the tool console at DEMO_PATH and the client modules at
    CLIENT_MODULES_PATH, read once from the package; Host and Origin are checked as on the MCP
    endpoint (a page is a target of DNS rebinding too)."""
    files = {name: (WEB_DIR / name).read_bytes() for name in WEB_FILES}
    endpoint = f'<meta name="mcproxy-endpoint" content="{html.escape(config.server.path)}">'
    files["demo.html"] = files["demo.html"].replace(_ENDPOINT_META.encode(), endpoint.encode())

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("name") or "demo.html"
        if name not in WEB_FILES:
            raise web.HTTPNotFound()
        headers = {
            hdrs.CONTENT_TYPE: WEB_FILES[name],
            hdrs.CACHE_CONTROL: "no-cache",
            "X-Content-Type-Options": "nosniff",
        }
        return web.Response(body=files[name], headers=headers)

    async def to_page(_: web.Request) -> web.StreamResponse:
        raise web.HTTPPermanentRedirect(DEMO_PATH)

    app.router.add_get(DEMO_PATH.rstrip("/"), _guarded(guard, to_page))
    app.router.add_get(DEMO_PATH, _guarded(guard, serve))
    app.router.add_get(DEMO_PATH + "{name}", _guarded(guard, serve))
    app.router.add_get(CLIENT_MODULES_PATH + "{name}", _guarded(guard, serve))


def build_app(
    config: Config,
    ws_front: WebSocketFront,
    http_front: StreamableHttpFront,
    readiness: Readiness,
    scrape: Scrape | None,
    guard: HostPolicy,
    identity: dict[str, object] | None = None,
) -> web.Application:
    """The main listener. ``scrape`` set: /metrics is served here too. ``identity``: what
    /healthz says about the running program besides its status."""

    async def get(request: web.Request) -> web.StreamResponse:
        # One endpoint for both transports (the SEP: the WebSocket lives at the Streamable
        # HTTP endpoint); an upgrade request is the WebSocket front's, any other GET is SSE.
        if request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
            return await ws_front.handle(request)
        return await http_front.get(request)

    app = web.Application(client_max_size=config.limits.max_message_bytes)
    app.router.add_get(config.server.path, get, allow_head=False)
    app.router.add_post(config.server.path, http_front.post)
    app.router.add_delete(config.server.path, http_front.delete)
    app.router.add_get("/healthz", _guarded(guard, _healthz(identity or {})))
    app.router.add_get("/readyz", _guarded(guard, _readyz(readiness)))
    if scrape is not None:
        app.router.add_get(config.metrics.path, _guarded(guard, _metrics(scrape)))
    if config.demo.enabled:
        _web_routes(app, config, guard)
    return app


def build_metrics_app(config: Config, scrape: Scrape, guard: HostPolicy) -> web.Application:
    """A separate metrics listener (``metrics.listen``), e.g. on a private interface. Its
    guard allows ``server.allowed_hosts`` and its own listen address, so a scraper on another
    host names that address (docs/SECURITY.md)."""
    app = web.Application()
    app.router.add_get(config.metrics.path, _guarded(guard, _metrics(scrape)))
    return app
