"""The aiohttp application: routes only. The daemon builds the objects it routes to."""

from __future__ import annotations

from aiohttp import web

from mcproxy.config import Config
from mcproxy.ws import WebSocketFront


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_app(config: Config, ws_front: WebSocketFront) -> web.Application:
    app = web.Application(client_max_size=config.limits.max_message_bytes)
    app.router.add_get(config.server.path, ws_front.handle)
    app.router.add_get("/healthz", _healthz)
    return app
