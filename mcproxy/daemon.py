"""The composition root: builds every long-lived object from the Config, owns the signals and
the shutdown order. Nothing else wires concrete classes together.

Shutdown on SIGTERM/SIGINT (docs/ARCHITECTURE.md "Shutdown"):
1. stop accepting connections;
2. close every client socket with 1012 (service restart), so reconnecting clients come back
   at once to the next process;
3. stop every upstream (close stdin → SIGTERM → SIGKILL, bounded) and persist each session;
4. commit what is queued in the log and close the database.
Each step is bounded by ``server.shutdown_timeout_s``; a second signal skips the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable

import structlog
from aiohttp import web

from mcproxy.app import build_app
from mcproxy.config import Config, db_path, parse_listen, parse_target
from mcproxy.guard import HostPolicy
from mcproxy.hub import Hub
from mcproxy.runner import short_id
from mcproxy.store import Store
from mcproxy.streamable import StreamableHttpFront
from mcproxy.upstream import Upstream, UpstreamFactory, UpstreamHandler
from mcproxy.upstream_stdio import StdioUpstream
from mcproxy.ws import CLOSE_SERVICE_RESTART, WebSocketFront

log = structlog.get_logger("mcproxy")


def upstream_factory(config: Config) -> UpstreamFactory:
    target = parse_target(config.upstream.target)

    def factory(session_id: str, handler: UpstreamHandler) -> Upstream:
        return StdioUpstream(target.argv, handler, config.upstream, short_id(session_id))

    return factory


async def serve(config: Config, on_ready: Callable[[str, int], None] | None = None) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    path = db_path(config)
    store = await Store.open(path, config.store.durability, config.store.max_batch)
    hub = Hub(store, config, upstream_factory(config))
    host, port = parse_listen(config.server.listen)
    guard = HostPolicy(config.server.allowed_hosts, config.server.allowed_origins, host)
    ws_front = WebSocketFront(hub, config, guard)
    http_front = StreamableHttpFront(hub, config, guard)
    app = build_app(config, ws_front, http_front)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    try:
        recovered = await hub.recover()
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        bound = _bound_port(runner, port)
        log.info(
            "daemon.listening",
            host=host,
            port=bound,
            db=str(path),
            upstream=config.upstream.target,
            recovered_sessions=recovered,
        )
        if on_ready is not None:
            on_ready(host, bound)
        await stop.wait()
        log.info("daemon.stopping")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _force_exit)
        await _shutdown(config, runner, ws_front, http_front, hub)
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
        await store.aclose()
        log.info("daemon.stopped")


async def _shutdown(
    config: Config,
    runner: web.AppRunner,
    ws_front: WebSocketFront,
    http_front: StreamableHttpFront,
    hub: Hub,
) -> None:
    grace = config.server.shutdown_timeout_s
    for site in list(runner.sites):
        await site.stop()  # 1. stop accepting
    http_front.close_all()  # 2. tell clients to come back (SSE: resume after `retry`)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            ws_front.close_all(CLOSE_SERVICE_RESTART, "server restarting"), grace
        )
    with contextlib.suppress(TimeoutError):  # 3. stop upstreams, persist sessions
        await asyncio.wait_for(hub.aclose(), grace)
    await ws_front.aclose()
    await http_front.aclose()


def _force_exit() -> None:
    log.warning("daemon.forced_exit")
    raise SystemExit(1)


def _bound_port(runner: web.AppRunner, requested: int) -> int:
    if requested:
        return requested
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    return requested
