"""The aiohttp application: routes only. The daemon builds the objects it routes to."""

from __future__ import annotations

from aiohttp import hdrs, web

from mcproxy.config import Config
from mcproxy.streamable import StreamableHttpFront
from mcproxy.ws import WebSocketFront


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_app(
    config: Config, ws_front: WebSocketFront, http_front: StreamableHttpFront
) -> web.Application:
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
    app.router.add_get("/healthz", _healthz)
    return app
