"""The composition root: builds every long-lived object from the Config, owns the signals, the
periodic tasks and the shutdown order. Nothing else wires concrete classes together.

Start-up: open the database, drop orphan rows, resolve what a crash left in flight
(``Hub.recover``), run one sweep, then listen (on a socket systemd passed in, if any) and
report READY to systemd.

Shutdown on SIGTERM/SIGINT (docs/ARCHITECTURE.md "Shutdown"):
0. drain (``_drain``, up to ``server.drain_timeout_s``): stop accepting connections (systemd
   STOPPING=1), refuse new requests, let the upstreams finish what they are working on and
   the answers reach the clients still connected; a second signal ends the wait;
1. stop accepting connections;
2. end every SSE stream and close every WebSocket with 1012 (service restart), so clients
   come back at once to the next process;
3. stop every upstream (close stdin → SIGTERM → SIGKILL, or DELETE the upstream's HTTP
   session; bounded) and persist each session; a shared pool's children are stopped before
   their sessions close, so what they answer while stopping is still logged;
4. commit what is queued in the log and close the database.
Each step is bounded by ``server.shutdown_timeout_s``; a signal during them exits at once.

Reload in place on SIGHUP (docs/ARCHITECTURE.md "Reload in place", ``ops/reload.py``): the
program on disk is validated first; then clients are told to come back as on a shutdown, but
the listening sockets stay open and every initialized stdio child keeps running: the log is
committed, the database closed, and the program replaced by exec (same pid), which adopts
the sockets and the children.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import signal
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import msgspec
import structlog
from aiohttp import web

from mcproxy import __version__
from mcproxy.config import Config, HttpTarget, db_path, parse_listen, parse_target
from mcproxy.core.auth import TokenTable
from mcproxy.core.guard import HostPolicy
from mcproxy.core.ids import short_id
from mcproxy.core.websocket import CLOSE_SERVICE_RESTART
from mcproxy.engine.hub import Hub, Kept
from mcproxy.engine.store import Store
from mcproxy.errors import ConfigError, ReloadFailed, StoreError
from mcproxy.fronts.app import build_app, build_metrics_app
from mcproxy.fronts.listener import listen
from mcproxy.fronts.streamable import StreamableHttpFront
from mcproxy.fronts.ws import WebSocketFront
from mcproxy.metrics import Metrics, WorldState
from mcproxy.ops import reload
from mcproxy.ops.sdnotify import NOTIFY_ENV, Notifier, listen_fds, listening_socket
from mcproxy.tasks import TaskSet
from mcproxy.upstreams.adopted import adopt
from mcproxy.upstreams.base import Upstream, UpstreamFactory, UpstreamHandler
from mcproxy.upstreams.http import HttpOptions, HttpUpstream
from mcproxy.upstreams.shared import PoolHandover, SharedPool, SharedUpstream, stop_handed
from mcproxy.upstreams.stdio import (
    HandedOver,
    StdioUpstream,
    child_environment,
    command_available,
)

log = structlog.get_logger("mcproxy")

# How often the drain looks at what is left, and tells systemd (at most once a second).
DRAIN_POLL_S: Final = 0.05
DRAIN_REPORT_S: Final = 1.0
# The shutdown steps after the drain, each bounded by server.shutdown_timeout_s (close the
# clients, stop the upstreams, the HTTP server's cleanup) and the final commit: what the
# drain asks systemd for beyond its own end (EXTEND_TIMEOUT_USEC).
SHUTDOWN_STEPS: Final = 4

# A tokens file with any of these bits is refused: group/other write, other read.
TOKENS_FILE_FORBIDDEN = stat.S_IWGRP | stat.S_IWOTH | stat.S_IROTH
PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
# Sweeps that fail in a row before /readyz says so: one transient failure (a busy file) is
# retried at the next interval and is no reason to leave a load balancer; three in a row
# mean parking, pruning and expiry have stopped, which an operator must see.
SWEEP_FAILURES_NOT_READY = 3


def prepare_state(path: Path) -> None:
    """The database, its WAL and shared-memory files private to this user whatever the umask
    (sessions and their messages are in them), and the directories created for them too.

    SQLite creates ``-wal`` and ``-shm`` with the database file's own mode, so the file is
    made 0600 before SQLite opens it; files left by an older, laxer run are tightened. A
    directory that already exists is the operator's (``/tmp``, a shared volume): left alone.
    """
    missing = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    for directory in reversed(missing):  # the XDG base directory spec asks 0700 too
        directory.mkdir(mode=PRIVATE_DIR, exist_ok=True)
        directory.chmod(PRIVATE_DIR)  # mkdir's mode is filtered by the umask
    fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
    os.close(fd)
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", PRIVATE_FILE)


class _UpstreamState:
    """An HTTP upstream's ``StateSlot``: the ``upstream_state`` column of its session's row."""

    def __init__(self, store: Store, session_id: str) -> None:
        self.store = store
        self.session_id = session_id

    async def load(self) -> str | None:
        await self.store.barrier()  # this process's own earlier saves first
        return await self.store.load_upstream_state(self.session_id)

    def save(self, value: str | None) -> None:
        self.store.save_upstream_state(self.session_id, value)


def load_tokens(config: Config) -> TokenTable:
    """[auth]: token lines from the file and the variable (docs/SECURITY.md).

    Raises:
        ConfigError: unreadable file, unset variable, a malformed line, or a source that
            is configured but holds no token (an empty file must not mean "no auth").
    """
    auth = config.auth
    tables: list[TokenTable] = []
    if auth.tokens_file:
        try:
            with Path(auth.tokens_file).expanduser().open() as file:
                mode = os.fstat(file.fileno()).st_mode
                text = file.read()
        except OSError as exc:
            raise ConfigError(f"auth.tokens_file: {exc}") from exc
        if mode & TOKENS_FILE_FORBIDDEN:
            # Refused, not warned about: a file others can write lets them add a principal,
            # one everybody can read gives the tokens away (docs/SECURITY.md).
            raise ConfigError(
                f"auth.tokens_file: {auth.tokens_file} is mode {stat.S_IMODE(mode):04o}; it must"
                " not be writable by group or others, nor readable by others (chmod 600 or 640)"
            )
        tables.append(TokenTable.parse(text, auth.tokens_file))
    if auth.tokens_env:
        value = os.environ.get(auth.tokens_env)
        if value is None:
            raise ConfigError(f"auth.tokens_env: ${auth.tokens_env} is not set")
        tables.append(TokenTable.parse(value.replace(",", "\n"), f"${auth.tokens_env}"))
    if tables and not any(t.enabled for t in tables):
        raise ConfigError("[auth] is configured but holds no token")
    return TokenTable([entry for table in tables for entry in table.entries])


def upstream_factory(config: Config, store: Store) -> UpstreamFactory:
    """How each session reaches the upstream: a child process, or an upstream MCP session of
    its own at a Streamable HTTP endpoint (one per proxy session: docs/ARCHITECTURE.md).

    Raises:
        ConfigError: the HTTP upstream's credentials or CA file cannot be used.
    """
    target = parse_target(config.upstream.target)
    if isinstance(target, HttpTarget):
        options = HttpOptions.from_config(target.url, config.upstream, os.environ)

        def http_factory(session_id: str, handler: UpstreamHandler) -> Upstream:
            return HttpUpstream(
                options,
                handler,
                config.upstream,
                short_id(session_id),
                _UpstreamState(store, session_id),
            )

        return http_factory
    argv = target.argv
    env = child_environment(config, os.environ)  # once: no token variable, ever
    if config.upstream.mode == "shared":  # one pool of children for every session

        def child(handler: UpstreamHandler, label: str) -> Upstream:
            return StdioUpstream(argv, handler, config.upstream, label, env)

        return SharedPool(
            child,
            config.upstream.pool_size,
            config.upstream.init_timeout_s,
            config.upstream.max_in_flight,
        )

    def factory(session_id: str, handler: UpstreamHandler) -> Upstream:
        return StdioUpstream(argv, handler, config.upstream, short_id(session_id), env)

    return factory


@dataclass
class _Daemon:
    """The long-lived objects, and the probes that read them."""

    config: Config
    store: Store
    hub: Hub
    metrics: Metrics
    ws_front: WebSocketFront
    http_front: StreamableHttpFront
    notifier: Notifier
    listening: bool = False
    sweep_failures: int = 0  # consecutive; reset by a sweep that succeeds
    servers: list[asyncio.Server] = field(default_factory=list)
    tasks: TaskSet = field(default_factory=lambda: TaskSet("daemon"))
    argv: Sequence[str] = ()  # this program's arguments: a reload runs the next one with them
    reloads: int = 0  # reloads in place since the process started
    reloading: bool = False  # a reload is being validated or carried out
    reload_wanted: asyncio.Event = field(default_factory=asyncio.Event)

    def request_reload(self) -> None:
        """SIGHUP: validate the program on disk, then reload (one at a time)."""
        if self.reloading or not self.listening:
            reason = "a reload is in progress" if self.reloading else "not serving"
            log.warning("reload.refused", reason=reason)
            return
        self.reloading = True
        log.info("reload.requested")
        self.notifier.status("reload: validating the program and configuration on disk")
        self.tasks.spawn(self._validate(), "reload-validate")

    async def _validate(self) -> None:
        error = await reload.validate(self.argv, os.environ)
        if error is not None:
            # Nothing was touched: the running program goes on serving as it was.
            self.reloading = False
            self.metrics.error("reload_rejected")
            log.error("reload.rejected", reason=error)
            self.notifier.status(f"reload rejected; serving on. {self.status_line()}")
            return
        self.reload_wanted.set()

    async def readiness(self) -> dict[str, bool]:
        """/readyz: the log is writable and readable, the listener is up (and not draining),
        housekeeping runs (fewer than ``SWEEP_FAILURES_NOT_READY`` failed sweeps in a row),
        and the upstream command can be found. A remote (HTTP) upstream is not probed: its
        outages are answered per request (-32011), and must not take this proxy out of a
        load balancer that could not route around them anyway."""
        target = parse_target(self.config.upstream.target)
        return {
            "database": await self.store.ping(),
            "listener": self.listening,
            "housekeeping": self.sweep_failures < SWEEP_FAILURES_NOT_READY,
            "upstream": isinstance(target, HttpTarget) or command_available(target.argv),
        }

    async def scrape(self) -> bytes:
        stats = await self.store.stats()
        sessions = list(self.hub.runners.values())
        attached = sum(1 for r in sessions if r.attached)
        self.metrics.refresh(
            WorldState(
                sessions_attached=attached,
                sessions_idle=len(sessions) - attached,
                sessions_stored=stats.sessions,
                connections_ws=len(self.ws_front.connections),
                connections_http=len(self.http_front.streams),
                commits=self.store.commits,
                log_rows=stats.log_rows,
                log_bytes=stats.log_bytes,
                db_bytes=stats.file_bytes,
            )
        )
        if isinstance(self.hub.upstream_factory, SharedPool):
            pool = self.hub.upstream_factory.snapshot()
            self.metrics.refresh_pool(pool.children, pool.in_flight, pool.queued, pool.events)
        return self.metrics.render()

    def status_line(self) -> str:
        attached = sum(1 for r in self.hub.runners.values() if r.attached)
        return f"{len(self.hub.runners)} sessions in memory, {attached} with a client"

    async def sweeper(self) -> None:
        interval = self.config.sessions.sweep_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self.hub.sweep()
                self.sweep_failures = 0
            except Exception as exc:
                self.sweep_failures += 1
                # A transient error (a busy file, one bad row) must not end parking, pruning
                # and expiry for the life of the process: say it, count it, try again at the
                # next interval. A storage failure also stops the daemon (Store.failure).
                self.metrics.error("sweep_failed")
                log.error(
                    "daemon.sweep_failed", error=repr(exc), failures_in_a_row=self.sweep_failures
                )
            self.notifier.status(self.status_line())

    async def watchdog(self, interval: float) -> None:
        # On the event loop, not a thread: a stalled loop stops the pings and systemd restarts
        # us. A failed log does too: the process cannot keep its promises any more.
        while True:
            if self.store.healthy:
                self.notifier.watchdog()
            await asyncio.sleep(interval)


async def serve(
    config: Config,
    on_ready: Callable[[str, int], None] | None = None,
    argv: Sequence[str] = (),
) -> None:
    """Run the daemon until SIGTERM or SIGINT; SIGHUP reloads it in place (``argv``: this
    program's arguments, which the next one gets)."""
    loop = asyncio.get_running_loop()
    identity = _identity()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Until the daemon serves, a SIGHUP must not end it (its default action) nor reload it.
    loop.add_signal_handler(
        signal.SIGHUP, lambda: log.warning("reload.refused", reason="starting up")
    )
    # Read (and unset, so MCP children do not inherit them) systemd's variables first; a
    # reload passes them on to the next program.
    systemd_env = {name: os.environ[name] for name in NOTIFY_ENV if name in os.environ}
    notifier = Notifier.from_env(os.environ, unset_environment=True)
    try:
        handover = reload.take_record(os.environ)
    except ReloadFailed as exc:
        log.error("reload.failed", error=str(exc))  # the CLI exits 1: systemd restarts it
        raise
    inherited = listen_fds(os.environ)
    if handover is not None:  # a reload in place: the sockets stayed open across exec
        inherited = [listening_socket(fd) for fd in handover.listeners]

    tokens = load_tokens(config)
    path = db_path(config)
    try:
        prepare_state(path)
    except OSError as exc:
        raise ConfigError(f"store.path: {exc}") from exc
    store = await Store.open(
        path,
        config.store.durability,
        config.store.max_batch,
        checkpoints=config.store.checkpoints == "mcproxy",
    )
    try:
        factory = upstream_factory(config, store)
    except ConfigError:
        await store.aclose()
        raise
    metrics = Metrics()
    hub = Hub(store, config, factory, metrics, tokens)
    host, port = parse_listen(config.server.listen)
    if inherited:
        host = str(inherited[0].getsockname()[0])
    guard = HostPolicy(config.server.allowed_hosts, config.server.allowed_origins, host)
    ws_front = WebSocketFront(hub, config, guard)
    http_front = StreamableHttpFront(hub, config, guard)
    daemon = _Daemon(config, store, hub, metrics, ws_front, http_front, notifier, argv=argv)
    if handover is not None:
        daemon.reloads = handover.reloads
        metrics.reloads.inc(handover.reloads)
        for child in handover.children:
            start = functools.partial(_adopt, child.handed_over(), config, short_id(child.session))
            hub.kept[child.session] = Kept(start, requests_kept=True)
        target = parse_target(config.upstream.target)
        if isinstance(target, HttpTarget):  # the same kind of upstream still: take them up
            options = HttpOptions.from_config(target.url, config.upstream, os.environ)
            for key in handover.http_sessions:
                start = functools.partial(_take_up, options, config, store, key)
                hub.kept[key] = Kept(start, requests_kept=False)
    identity["reloads"] = daemon.reloads  # /healthz: an upgrade by reload is checked by it
    scrape = daemon.scrape if config.metrics.enabled else None
    app = build_app(
        config,
        ws_front,
        http_front,
        daemon.readiness,
        None if config.metrics.listen else scrape,
        guard,
        identity,
    )
    failure: StoreError | None = None
    web_runners = [
        web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=config.server.shutdown_timeout_s,
            # Idle connections between requests (issue 15 finding 7: aiohttp's default is
            # an hour, unauthenticated ones included).
            keepalive_timeout=config.limits.http_keepalive_s,
        )
    ]
    if scrape is not None and config.metrics.listen:
        metrics_guard = HostPolicy(
            config.server.allowed_hosts,
            config.server.allowed_origins,
            parse_listen(config.metrics.listen)[0],
        )
        web_runners.append(
            web.AppRunner(
                build_metrics_app(config, scrape, metrics_guard),
                access_log=None,
                keepalive_timeout=config.limits.http_keepalive_s,
            )
        )
    try:
        notifier.status("recovering sessions")
        await store.delete_orphans()
        await hub.load_counts()
        pool_children = 0
        if handover is not None and handover.pool is not None:
            pool_children = await _take_over_pool(handover.pool, factory, hub, config)
        adopted = await hub.adopt_all()
        recovered = await hub.recover()
        # The recovery point: after a restore from a replica (docs/DEPLOY.md *Restore*), what
        # was logged after this instant was lost with the machine (the replication lag).
        newest = await store.newest_event_at()
        await hub.sweep()
        for web_runner in web_runners:
            await web_runner.setup()
        assert web_runners[0].server is not None
        # Socket activation (inherited): clients queued while we started are served first.
        daemon.servers = await listen(ws_front, web_runners[0].server, host, port, inherited)
        if len(web_runners) > 1:
            metrics_host, metrics_port = parse_listen(config.metrics.listen)
            await web.TCPSite(
                web_runners[1], metrics_host, metrics_port, reuse_address=True
            ).start()
        bound = _bound_port(daemon.servers, port)
        # Everything built so far lives as long as the process: keep it out of the cyclic
        # GC's scans, whose full passes otherwise stall every stream for ~15 ms (measured).
        gc.freeze()
        # Thousands of sessions mean about a million tracked objects; the default young-
        # generation threshold (700) triggers full passes that stalled every stream for
        # 0.6-0.9 s at 10,000 sessions (benchmarks/bench_scale.py). Collect less often.
        gc.set_threshold(50_000, 20, 100)
        daemon.listening = True
        log.info(
            "daemon.listening",
            host=host,
            port=bound,
            socket_activated=bool(inherited),
            db=str(path),
            upstream=config.upstream.target,
            recovered_sessions=recovered,
            instance=config.server.instance,
            newest_event_at=newest,
            **identity,
        )
        if handover is not None:
            log.info(
                "reload.done",
                version=__version__,
                reloads=daemon.reloads,
                adopted_upstreams=adopted,
                adopted_pool_children=pool_children,
            )
            notifier.ready(
                f"reloaded ({daemon.reloads}): listening on {host}:{bound}", reloaded=True
            )
        else:
            notifier.ready(f"listening on {host}:{bound}, {recovered} sessions recovered")
        loop.add_signal_handler(signal.SIGHUP, daemon.request_reload)
        daemon.tasks.spawn(daemon.sweeper(), "sweeper")
        daemon.tasks.spawn(ws_front.heartbeat(), "ws-heartbeat")
        if notifier.watchdog_interval_s:
            daemon.tasks.spawn(daemon.watchdog(notifier.watchdog_interval_s), "watchdog")
        if on_ready is not None:
            on_ready(host, bound)
        signalled = daemon.tasks.spawn(stop.wait(), "stop-signal")
        wanted = daemon.tasks.spawn(daemon.reload_wanted.wait(), "reload-wanted")
        await asyncio.wait({signalled, wanted, store.failure}, return_when=asyncio.FIRST_COMPLETED)
        if daemon.reload_wanted.is_set() and not stop.is_set() and not store.failure.done():
            # A SIGHUP from now on is refused by request_reload (``reloading`` is set).
            await _hand_over(daemon, {**os.environ, **systemd_env}, db_path(config).parent, stop)
        if store.failure.done():
            # The storage failed (I/O error, disk full, corruption): the store commits
            # nothing more and refuses every write. Serving 503 until someone notices would
            # keep no promise; exiting non-zero lets systemd (Restart=on-failure) start a
            # new process, which recovers from what was committed (docs/SECURITY.md).
            failure = store.failure.result()
            log.error("daemon.store_failed", error=str(failure))
        log.info("daemon.stopping")
        daemon.listening = False
        if failure is None:
            await _drain(daemon)
        notifier.stopping("closing client connections")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _force_exit)
        await _shutdown(daemon)
    finally:
        await daemon.tasks.cancel_all()
        for web_runner in web_runners:
            with contextlib.suppress(Exception):
                await web_runner.cleanup()
        if isinstance(factory, SharedPool):
            await factory.aclose()  # already closed by _shutdown, unless start-up failed
        notifier.status("flushing the log")
        await store.aclose()
        notifier.close()
        log.info("daemon.stopped")
    if failure is not None:
        raise failure  # cli: exit status EXIT_RUNTIME


def _identity() -> dict[str, object]:
    """Which program serves (/healthz, the ``daemon.listening`` line): checked after an
    upgrade. The start is this program's (after a reload in place: the exec), in RFC 3339
    UTC; the daemon adds how many reloads in place the process has had."""
    started = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return {"version": __version__, "pid": os.getpid(), "started_at": started}


async def _drain(daemon: _Daemon) -> None:
    """SIGTERM's first step: stop accepting connections, refuse new requests (``Hub.
    drain_refusal``: -32016, HTTP 503), and wait up to ``server.drain_timeout_s`` for the
    requests the upstreams are working on (unsafe ones too: a stop would answer them -32010),
    then for their answers, committed, to be written to the clients still connected. A second
    signal, a failed store or the bound ends it; what is still running then is cut by the
    shutdown as before. systemd hears STOPPING=1 with the count, and EXTEND_TIMEOUT_USEC so
    that a drain within its bound is not killed by TimeoutStopSec."""
    server = daemon.config.server
    if server.drain_timeout_s == 0:
        return  # no drain: the stop of earlier versions
    loop = asyncio.get_running_loop()
    skip = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, skip.set)
    for listener in daemon.servers:
        listener.close()  # with socket activation systemd's copy queues for the next process
    started = loop.time()
    deadline = started + server.drain_timeout_s
    daemon.hub.draining_until = deadline
    after = SHUTDOWN_STEPS * server.shutdown_timeout_s
    pending = _at_upstream(daemon)
    seen = set(pending)
    daemon.notifier.stopping(f"draining {len(pending)} requests")
    reported = -DRAIN_REPORT_S
    ended = daemon.tasks.spawn(skip.wait(), "drain-signal")  # the second signal
    failure = daemon.store.failure
    try:

        def stopped() -> bool:
            return ended.done() or failure.done() or loop.time() >= deadline

        while pending and not stopped():
            now = loop.time()
            if now - reported >= DRAIN_REPORT_S:
                reported = now
                daemon.notifier.status(f"draining {len(pending)} requests")
                daemon.notifier.extend_timeout(deadline - now + after)
            await asyncio.wait({ended, failure}, timeout=min(DRAIN_POLL_S, deadline - now))
            pending = _at_upstream(daemon)
            seen |= pending
        # The answers: committed, then written by each connection's pump (bounded: a client
        # that reads nothing must not hold the stop; it gets them from the log on resume).
        flush_until = min(deadline, loop.time() + server.shutdown_timeout_s)
        with contextlib.suppress(Exception):  # a failed store: the shutdown reports it
            await asyncio.wait_for(daemon.store.barrier(), max(0.0, flush_until - loop.time()))
        while _unflushed(daemon) and not ended.done() and loop.time() < flush_until:
            await asyncio.wait({ended}, timeout=DRAIN_POLL_S)
    finally:
        ended.cancel()
    daemon.notifier.extend_timeout(after)
    log.info(
        "daemon.drain",
        finished=len(seen - pending),
        cut=len(pending),
        waited_s=round(loop.time() - started, 3),
        skipped=skip.is_set(),
    )


def _at_upstream(daemon: _Daemon) -> set[tuple[str, int]]:
    """(session key, upstream id) of every client request an upstream is working on."""
    runners = daemon.hub.runners.items()
    return {(key, uid) for key, runner in runners for uid in runner.core.at_upstream()}


def _unflushed(daemon: _Daemon) -> int:
    """Connections with something still to write: a pump not parked, or an HTTP request
    stream finishing its response (no longer a session's, it ends once that is written)."""
    owned: set[object] = set()
    busy = 0
    for runner in daemon.hub.runners.values():
        if runner.conn is not None:
            owned.add(runner.conn)
            busy += runner.outbox is not None and not runner.outbox.parked
        for conn, outbox in runner.streams.values():
            owned.add(conn)
            busy += not outbox.parked
    return busy + sum(1 for stream in daemon.http_front.streams if stream not in owned)


async def _shutdown(daemon: _Daemon) -> None:
    grace = daemon.config.server.shutdown_timeout_s
    for server in daemon.servers:
        server.close()  # 1. stop accepting
    daemon.http_front.close_all()  # 2. tell clients to come back (SSE: resume after `retry`)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            daemon.ws_front.close_all(CLOSE_SERVICE_RESTART, "server restarting"), grace
        )
    daemon.notifier.status("stopping upstreams")
    factory = daemon.hub.upstream_factory
    if isinstance(factory, SharedPool):
        # 3a. Shared children stop first, their sessions still attached: an answer a child
        # writes during its stop ladder is routed and logged like any other. A session that
        # closed first would cancel its requests on the child and drop such answers (issue 16).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(factory.aclose(), grace)
    try:  # 3. stop upstreams, persist sessions
        await asyncio.wait_for(daemon.hub.aclose(), grace)
    except TimeoutError:
        log.error("daemon.shutdown_timeout", step="stop upstreams", timeout_s=grace)
    except ExceptionGroup as group:  # every other session was closed; say which were not
        log.error(
            "daemon.sessions_close_failed",
            error=str(group),
            errors=[repr(e) for e in group.exceptions],
        )
    await daemon.ws_front.aclose()
    await daemon.http_front.aclose()


async def _adopt(
    handed: HandedOver, config: Config, label: str, handler: UpstreamHandler
) -> Upstream:
    # The session's next child, if it needs one, comes from the factory: the argv and the
    # environment of this upstream object are never used to start anything.
    return await adopt(handed, (), handler, config.upstream, label, {})


async def _adopt_pool_child(
    config: Config, handed: HandedOver, handler: UpstreamHandler, label: str
) -> Upstream:
    # A new child of the pool, if one is needed, comes from the pool's own factory.
    return await adopt(handed, (), handler, config.upstream, label, {})


async def _take_over_pool(kept: reload.KeptPool, factory: object, hub: Hub, config: Config) -> int:
    """After a reload in place: the shared pool's children and tables taken up, each session
    of the last program given its router handle back when it is loaded (``Hub.kept``). A
    section this program cannot take up (another version, an upstream that is no longer a
    shared pool, tables that do not restore) stops the children: every session restarts as
    after a restart. Returns how many children were taken up."""
    adopter = functools.partial(_adopt_pool_child, config)
    handed = [(child.index, child.handed_over()) for child in kept.children]
    reason = None
    if kept.version != reload.POOL_VERSION:
        reason = f"pool section version {kept.version}, this program reads {reload.POOL_VERSION}"
    elif not isinstance(factory, SharedPool):
        reason = "the upstream is no longer a shared pool"
    if reason is not None or not isinstance(factory, SharedPool):
        log.error("reload.shared_pool_not_kept", reason=reason, children=len(handed))
        await asyncio.gather(*(stop_handed(h, adopter) for _, h in handed))
        return 0
    sids = await factory.take_over(PoolHandover(handed, bytes(kept.router)), adopter)
    if sids is None:
        return 0
    claimed = []
    for key, sid in kept.sessions.items():
        if sid in sids:
            start = functools.partial(_reattach, factory, sid)
            hub.kept[key] = Kept(start, requests_kept=True)
            claimed.append(sid)
    factory.detach_unclaimed(claimed)
    return sum(child.proc is not None for child in factory.children)


async def _reattach(pool: SharedPool, sid: int, handler: UpstreamHandler) -> Upstream:
    return pool.reattach(sid, handler)


async def _take_up(
    options: HttpOptions, config: Config, store: Store, key: str, handler: UpstreamHandler
) -> Upstream:
    upstream = HttpUpstream(
        options, handler, config.upstream, short_id(key), _UpstreamState(store, key), resume=True
    )
    await upstream.start()
    return upstream


async def _hand_over(
    daemon: _Daemon, environ: dict[str, str], state_dir: Path, stop: asyncio.Event
) -> None:
    """Reload in place: quiesce, write the handover record, exec the program on disk.

    Does not return but for a stop signal that arrived meanwhile (what was kept is stopped,
    and the shutdown goes on). When a step fails once clients were told to go, raises
    ``ReloadFailed`` after stopping what was kept (no rollback: systemd's ``Restart=`` starts
    the program anew, and every session resumes from the log as after any restart).
    """
    grace = daemon.config.server.shutdown_timeout_s
    started = time.monotonic()
    log.info("reload.quiescing")
    daemon.notifier.reloading("reloading: handing over to the program on disk")
    daemon.listening = False
    # 1. Stop accepting, the sockets staying open: a duplicate of each keeps it listening
    # (connections wait in its backlog) while the server lets its own descriptor go.
    listeners: list[int] = []
    kept: dict[str, StdioUpstream] = {}
    released: list[str] = []  # sessions whose HTTP upstream session goes on
    pool_sessions: dict[str, int] = {}  # sessions on the shared pool: their router handles
    try:
        for server in daemon.servers:  # in the try: a failed dup closes those made
            for sock in server.sockets:
                listeners.append(os.dup(sock.fileno()))
            server.close()
        # 2. Clients come back to the next program: SSE streams end, WebSockets get 1012.
        daemon.hub.quiesce()  # a request arriving on a kept-alive connection waits for exec
        daemon.http_front.close_all()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                daemon.ws_front.close_all(CLOSE_SERVICE_RESTART, "server reloading"), grace
            )
        # 3. Commit what is queued: the requests held back for their commit are then
        # written to their children (the commit's callbacks run on the next loop turn).
        await daemon.store.barrier()
        await asyncio.sleep(0)
        pool = daemon.hub.upstream_factory
        if isinstance(pool, SharedPool):
            # Its children stop being read at a message boundary, before any session is
            # handed over: nothing a child answers from now on can reach a runner that is
            # closing; it is read by the next program, routed by the tables handed over.
            await pool.quiesce(grace)

        async def keep(key: str, upstream: Upstream) -> bool:
            inner = getattr(upstream, "inner", upstream)  # the hub's slot wrapper
            if isinstance(inner, SharedUpstream) and isinstance(pool, SharedPool):
                sid = pool.keep(inner)
                if sid is not None:
                    pool_sessions[key] = sid
                return sid is not None
            if isinstance(inner, HttpUpstream) and inner.session_id is not None:
                await inner.release()
                released.append(key)
                return True
            if not isinstance(inner, StdioUpstream):
                return False
            if not await inner.quiesce(grace):
                return False
            kept[key] = inner
            return True

        runners = list(daemon.hub.runners.items())
        daemon.hub.runners.clear()
        results = await asyncio.gather(
            *(r.hand_over(functools.partial(keep, key)) for key, r in runners),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise ReloadFailed(f"{len(errors)} sessions could not be handed over: {errors[0]!r}")
        await daemon.hub.aclose()  # its own tasks (loads in progress)
        await daemon.ws_front.aclose()
        await daemon.http_front.aclose()
        await daemon.tasks.cancel_all()
        # 4. Everything logged is committed; the next program opens the database anew.
        await daemon.store.aclose()
        if stop.is_set():  # SIGTERM while quiescing: a stop, not a reload, was asked last
            log.info("reload.abandoned", reason="stop signal")
            await _release_kept(kept, listeners)
            return
        children = [
            reload.KeptChild(key, *_fields(upstream.handover())) for key, upstream in kept.items()
        ]
        kept_pool = None
        if isinstance(pool, SharedPool):
            handed = pool.handover()
            kept_pool = reload.KeptPool(
                reload.POOL_VERSION,
                [reload.KeptPoolChild(i, *_fields(h)) for i, h in handed.children],
                msgspec.Raw(handed.router),
                pool_sessions,
            )
        record = reload.Handover(
            reload.RECORD_VERSION,
            os.getpid(),
            daemon.reloads + 1,
            listeners,
            children,
            released,
            kept_pool,
        )
        for fd in listeners:
            os.set_inheritable(fd, True)
        path = reload.write_record(state_dir, record)
        daemon.notifier.watchdog()  # the next program pings from its start
        log.info(
            "reload.exec",
            kept_upstreams=len(children),
            kept_http_sessions=len(released),
            kept_pool_children=0 if kept_pool is None else len(kept_pool.children),
            kept_pool_sessions=len(pool_sessions),
            listeners=len(listeners),
            quiesce_ms=round((time.monotonic() - started) * 1000, 1),
        )
        try:
            reload.exec_program(daemon.argv, environ, path)
        finally:  # only reached if exec failed
            with contextlib.suppress(OSError):
                path.unlink()
    except BaseException as exc:
        log.error("reload.failed", error=repr(exc))
        await _release_kept(kept, listeners)
        if isinstance(exc, ReloadFailed):
            raise
        raise ReloadFailed(f"reload failed: {exc!r}") from exc


async def _release_kept(kept: dict[str, StdioUpstream], listeners: list[int]) -> None:
    """A reload that does not exec after all: stop the children it kept (their sessions
    resume from the log after the restart, as after any), close the listener duplicates."""
    for upstream in kept.values():
        with contextlib.suppress(Exception):
            await upstream.aclose()
    reload.close_descriptors(listeners)


def _fields(handed: HandedOver) -> tuple[int, int, int, int, bytes]:
    return handed.pid, handed.stdin_fd, handed.stdout_fd, handed.stderr_fd, handed.unread


def _force_exit() -> None:
    log.warning("daemon.forced_exit")
    raise SystemExit(1)


def _bound_port(servers: list[asyncio.Server], requested: int) -> int:
    for server in servers:
        for sock in server.sockets:
            address = sock.getsockname()
            if isinstance(address, tuple):
                return int(address[1])
    return requested
