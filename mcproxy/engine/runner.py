"""The I/O driver of one session: executes the core's actions against the store, the attached
client and the upstream process.

Ordering rules it enforces (docs/PROTOCOL.md, "Delivery"):

- a logged message reaches a socket only after the transaction holding it committed;
- a message to the upstream leaves only after every store write issued before it committed,
  so a request the upstream may act on is always on record (and answered exactly once, or
  resolved as "outcome unknown", after a crash);
- on attach, the log after the client's cursor is replayed first, then live messages, with
  every LSN sent at most once per connection and none skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Collection, Iterator
from typing import Protocol

import msgspec
import structlog

from mcproxy.config import Config
from mcproxy.core import jsonrpc
from mcproxy.core.actions import (
    Action,
    Dropped,
    Emit,
    FinishRequest,
    Forget,
    MarkWritten,
    Reply,
    Resend,
    RestartUpstream,
    SaveRequest,
    SaveSession,
    SendUpstream,
    StartUpstream,
    Tally,
)
from mcproxy.core.backoff import backoff
from mcproxy.core.guard import TokenBucket
from mcproxy.core.ids import short_id
from mcproxy.core.jsonrpc import Kind, Message
from mcproxy.core.session import GENERAL_STREAM, Session, UpstreamState
from mcproxy.engine.outbox import Outbox
from mcproxy.engine.store import Store
from mcproxy.errors import MCProxyError, ProtocolError, StoreError, UpstreamCapacity, UpstreamError
from mcproxy.metrics import Metrics
from mcproxy.tasks import TaskSet
from mcproxy.upstreams.base import Upstream, UpstreamFactory

log = structlog.get_logger("mcproxy")


def _ignore(_: int) -> None:
    pass


class Attachment(Protocol):
    """A client connection as the runner sees it (implemented by each front)."""

    label: str

    async def send(self, data: bytes, lsn: int | None) -> None:
        """Write one message to the client."""

    def start(self, outbox: Outbox, after_lsn: int, prelude: list[bytes], ended: bool) -> None:
        """Begin pumping ``outbox`` to the client (``ended``: stop after the catch-up)."""

    def supersede(self) -> None:
        """Another connection took over what this one carried: close it (SEP: 1000)."""

    def terminated(self) -> None:
        """The session was deleted: close this connection for good."""


class SessionRunner:
    """Drives one ``Session``. Implements ``UpstreamHandler`` for its upstream."""

    def __init__(
        self,
        core: Session,
        store: Store,
        upstream_factory: UpstreamFactory,
        config: Config,
        metrics: Metrics,
        log_floor: int = 0,
        key: str | None = None,
    ) -> None:
        self.core = core
        # The store's name for the session (engine.schema.session_key: its principal and its
        # id); the client knows it by ``core.id``. Its rows, its upstream and its slot use it.
        self.key = core.id if key is None else key
        self.store = store
        self.upstream_factory = upstream_factory
        self.config = config
        self.metrics = metrics
        # LSNs up to here were pruned from the log: a cursor below it cannot be served exactly.
        self.log_floor = log_floor
        self.label = short_id(core.id)
        # Where messages go: one connection taking every stream (a WebSocket), or any number
        # of Streamable HTTP streams, each taking its own. Never both: whichever kind attaches
        # last supersedes the other, so no message is ever delivered on two connections.
        self.conn: Attachment | None = None
        self.outbox: Outbox | None = None
        self.streams: dict[int, tuple[Attachment, Outbox]] = {}
        self.general_sent = core.next_lsn - 1  # last general-stream LSN an HTTP GET carried
        self.upstream: Upstream | None = None
        self._tasks = TaskSet(f"session:{self.label}")
        self._spawning: asyncio.Task[None] | None = None
        # Lists and a lazily made Event rather than deques: idle sessions are the many, and
        # an empty deque is 760 bytes (benchmarks/bench_store.py measures per-session memory).
        self._up_pending: list[tuple[asyncio.Future[None], bytes]] = []
        self._ready: asyncio.Event | None = None  # until a spawned upstream is READY
        self._backoff: Iterator[float] | None = None
        self._spawned_at: float | None = None
        self._closed = False
        self.failed: StoreError | None = None  # its writes failed (see ``fail``)
        self.last_active = asyncio.get_running_loop().time()
        limits = config.limits
        self._rate = TokenBucket(limits.messages_per_s, limits.message_burst, self.last_active)

    @property
    def id(self) -> str:
        return self.core.id

    @property
    def closed(self) -> bool:
        return self._closed

    # --- client side ------------------------------------------------------------------

    def attach(self, conn: Attachment, cursor: int | None, hello: Message | None = None) -> None:
        """Bind ``conn`` to every stream of this session: last connection wins (SEP-1288)."""
        previous = self.conn
        if previous is not None and previous is not conn:
            log.info("session.superseded", session=self.label, old=previous.label, new=conn.label)
            previous.supersede()
        self._drop_streams(None)
        self.conn = conn
        head = self.core.next_lsn - 1
        outbox = Outbox(
            self.key,
            self.store,
            conn.send,
            self._on_sent,
            self.config.limits.send_queue_max,
            owner=self,
            live_after=head,  # every later Emit is pushed to it (``execute``)
        )
        self.outbox = outbox
        if cursor is not None and cursor > head:
            # The client has seen LSNs this log never had: only after a restore from a
            # replica that lagged (docs/DEPLOY.md *Restore*). New messages must get LSNs
            # past its cursor, or its dedupe (and the pump's) would drop them as seen.
            log.warning("session.cursor_ahead", session=self.label, cursor=cursor, head_lsn=head)
            self.core.next_lsn = cursor + 1
        prelude: list[bytes] = []
        if hello is not None:
            for action in self.client_message(hello):
                if isinstance(action, Reply):
                    prelude.append(action.data)
        after = self.core.delivered_lsn if cursor is None else cursor
        log.info(
            "session.attached",
            session=self.label,
            conn=conn.label,
            after_lsn=after,
            head_lsn=self.core.next_lsn - 1,
        )
        if cursor is not None:
            prelude += self._partial_replay(after)
            self._measure_resume(outbox, after)
            self._acknowledged(after, None)
        self.touch()
        conn.start(outbox, after, prelude, False)
        self._spawn_if_initialized()

    def attach_stream(
        self, conn: Attachment, stream: int, after: int, resume: bool = False
    ) -> None:
        """Bind ``conn`` to one stream: replay it after LSN ``after``, then live, and end it
        once its request is done (the general stream never ends). ``resume``: the client
        asked for it with a cursor (Last-Event-ID)."""
        if self.conn is not None:
            log.info("session.superseded", session=self.label, old=self.conn.label, new=conn.label)
            self.conn.supersede()
            self.conn = None
            self.outbox = None
        self._drop_streams(stream)
        on_sent = self._on_general_sent if stream == GENERAL_STREAM else _ignore
        outbox = Outbox(
            self.key,
            self.store,
            conn.send,
            on_sent,
            self.config.limits.send_queue_max,
            stream,
            owner=self,
            # Every later Emit of the stream is pushed to it (``execute``) if it is live;
            # an ended stream is not registered, but gets nothing more either.
            live_after=self.core.next_lsn - 1,
        )
        ended = not self.core.stream_live(stream)
        if not ended:
            self.streams[stream] = (conn, outbox)
        log.debug(
            "session.stream_attached",
            session=self.label,
            conn=conn.label,
            stream=stream,
            after_lsn=after,
            ended=ended,
        )
        prelude: list[bytes] = []
        if resume:
            prelude += self._partial_replay(after)
            self._measure_resume(outbox, after)
            self._acknowledged(after, stream)
        self.touch()
        conn.start(outbox, after, prelude, ended)
        self._spawn_if_initialized()

    def _partial_replay(self, after: int) -> list[bytes]:
        """The notice that a resume from ``after`` cannot be exact: the messages after it up
        to the log floor were pruned or acknowledged (only answers kept for retries remain).
        Said to that connection only, before the replay; not logged, so it has no LSN."""
        if after >= self.log_floor:
            return []
        params = {"afterLsn": after, "floorLsn": self.log_floor}
        return [jsonrpc.encode(jsonrpc.notification_message(jsonrpc.REPLAY_PARTIAL_METHOD, params))]

    def _measure_resume(self, outbox: Outbox, after: int) -> None:
        m = self.metrics
        m.resumes.labels("partial" if after < self.log_floor else "exact").inc()
        m.replay_depth.observe(max(self.core.next_lsn - 1 - after, 0))
        loop = asyncio.get_running_loop()
        started = loop.time()
        outbox.caught_up = lambda: m.resume_seconds.observe(loop.time() - started)

    def _acknowledged(self, lsn: int, stream: int | None) -> None:
        """A client resumed from ``lsn``: it holds everything before, which may go."""
        through = min(lsn, self.core.next_lsn - 1)
        if through <= self.log_floor:
            return
        self.store.prune(self.key, through, stream)
        if stream is None:
            self.log_floor = through

    def touch(self) -> None:
        """Activity: postpones parking (see ``Hub.sweep``)."""
        self.last_active = asyncio.get_running_loop().time()

    @property
    def attached(self) -> bool:
        """A client connection (WebSocket) or HTTP stream is open."""
        return self.conn is not None or bool(self.streams)

    @property
    def idle(self) -> bool:
        """No client attached, nothing in flight either way: the upstream may be stopped."""
        return not self.attached and self.core.quiescent

    def _drop_streams(self, only: int | None) -> None:
        """Supersede the HTTP stream ``only`` (or all of them, if None)."""
        for stream in [only] if only is not None else list(self.streams):
            entry = self.streams.pop(stream, None)
            if entry is not None:
                entry[0].supersede()

    def _spawn_if_initialized(self) -> None:
        if self.core.init_result is not None:
            self._ensure_upstream()  # spawn on attach so server-initiated traffic can flow

    def detach(self, conn: Attachment) -> None:
        """``conn`` closed. A late close of a superseded connection changes nothing."""
        for stream, (attached, _) in list(self.streams.items()):
            if attached is conn:
                del self.streams[stream]
        if self.conn is not conn:
            return
        self.conn = None
        self.outbox = None
        log.info(
            "session.detached",
            session=self.label,
            conn=conn.label,
            delivered_lsn=self.core.delivered_lsn,
        )
        self.touch()
        if self.core.init_request is not None and not self._closed:
            self.store.save_session(self.key, self.core.snapshot())

    def client_message(self, msg: Message) -> list[Reply | Resend]:
        """Feed a client message to the core. Returns what answers the sender directly (its
        front delivers those in order with whatever else it is sending that client)."""
        if self._closed:
            return []
        self.metrics.client_in.inc()
        self.touch()
        if not self._rate.take(self.last_active):
            # limits.messages_per_s: a request learns why; a notification is dropped.
            self.metrics.error(jsonrpc.RATE_LIMITED)
            if isinstance(msg.id, int | str) and msg.method is not msgspec.UNSET:
                error = jsonrpc.error_bytes(msg.id, jsonrpc.RATE_LIMITED, "rate limited")
                return [Reply(error)]
            return []
        direct: list[Reply | Resend] = []
        rest: list[Action] = []
        for action in self.core.client_message(msg):
            if isinstance(action, Reply | Resend):
                direct.append(action)
            else:
                rest.append(action)
        self.execute(rest)
        return direct

    def _on_sent(self, lsn: int) -> None:
        self.core.delivered(lsn)

    def _on_general_sent(self, lsn: int) -> None:
        self.general_sent = max(self.general_sent, lsn)

    # --- upstream side ----------------------------------------------------------------

    def on_upstream_message(self, line: bytes, related: int | None = None) -> None:
        try:
            msg = jsonrpc.decode(line)
        except ProtocolError as exc:
            # transports §stdio: the server MUST NOT write non-MCP data to stdout. Drop it.
            log.warning(
                "upstream.junk",
                session=self.label,
                error=str(exc),
                line=line[:200].decode("utf-8", "replace"),
            )
            return
        self.metrics.upstream_in.inc()
        self.execute(self.core.upstream_message(msg, related))

    def on_upstream_lost(self, reason: str, unsent: Collection[int] = ()) -> None:
        self.metrics.upstream_events.labels("lost").inc()
        self.upstream = None
        # Requests still held here for their commit never reached the dead process either.
        never_sent = set(unsent) | self._held_requests()
        self._up_pending.clear()
        self._ready = None
        self.execute(self.core.upstream_lost(reason, never_sent))

    def _held_requests(self) -> set[int]:
        """Upstream ids of the requests held back for their commit (not written yet)."""
        held: set[int] = set()
        for _, data in self._up_pending:
            msg = jsonrpc.decode(data)  # encoded by the core itself: it decodes
            if jsonrpc.kind_of(msg) is Kind.REQUEST and isinstance(msg.id, int):
                held.add(msg.id)
        return held

    # --- action execution -------------------------------------------------------------

    def execute(self, actions: list[Action]) -> None:
        if self.failed is not None:
            return  # the core is ahead of the log; the reloaded session takes over
        store, sid = self.store, self.key
        for action in actions:
            if isinstance(action, Emit):
                self.metrics.client_out.inc()
                committed = store.append(
                    sid, action.lsn, action.data, action.stream, action.answers
                )
                outbox = self.outbox
                if outbox is None and action.stream in self.streams:
                    outbox = self.streams[action.stream][1]
                if outbox is not None:
                    outbox.push_live(action.lsn, action.data, committed)
            elif isinstance(action, SendUpstream):
                self.metrics.upstream_out.inc()
                self._send_upstream(action.data, action.durable)
            elif isinstance(action, Reply | Resend):
                raise AssertionError("direct answers are returned by client_message")
            elif isinstance(action, SaveRequest):
                store.save_request(
                    sid,
                    action.key,
                    action.upstream_id,
                    action.method,
                    action.safe,
                    action.body,
                    action.stream,
                    action.written,
                )
            elif isinstance(action, MarkWritten):
                store.mark_written(sid, action.key, action.written)
            elif isinstance(action, FinishRequest):
                store.finish_request(sid, action.key, action.lsn, action.forget)
                entry = self.streams.pop(action.stream, None)
                if entry is not None:
                    entry[1].push_end()
            elif isinstance(action, Forget):
                store.forget(sid, action.pairs)
            elif isinstance(action, Dropped):
                # cancellation §Behavior: an answer to a request that is no longer pending
                # is ignored; the log says so, since a client that keeps doing it has a bug.
                log.info(
                    "session.answer_dropped",
                    session=self.label,
                    id=action.request_id,
                    reason=action.reason,
                )
            elif isinstance(action, SaveSession):
                store.save_session(sid, self.core.snapshot())
            elif isinstance(action, StartUpstream):
                self._ensure_upstream()
            elif isinstance(action, Tally):
                self._tally(action)
            elif isinstance(action, RestartUpstream):
                self.metrics.upstream_events.labels("restarted").inc()
                log.warning("upstream.restart", session=self.label, reason=action.reason)
                self._tasks.spawn(self._restart(action.reason), f"restart:{self.label}")
        if self.core.state is UpstreamState.READY and self._ready is not None:
            self._ready.set()
            self._ready = None  # only _spawn waits on it; an idle session keeps no Event

    def _tally(self, tally: Tally) -> None:
        m = self.metrics
        if tally.name == "error":
            m.error(tally.code)
        elif tally.name == "deduplicated":
            m.deduplicated.inc()
        else:  # reissued, resent, outcome_unknown
            m.inflight_resolved.labels(tally.name).inc()

    def _send_upstream(self, data: bytes, durable: bool) -> None:
        # A durable message waits until every store write issued before it has committed;
        # any message waits behind earlier held ones. Futures complete in FIFO order, so a
        # queue drained from the front keeps sends in order.
        last = self.store.last_write
        if not self._up_pending and (not durable or last is None or last.done()):
            if self.upstream is not None:
                self.upstream.send(data)
            return
        assert last is not None
        self._up_pending.append((last, data))
        if len(self._up_pending) == 1:
            last.add_done_callback(self._drain_upstream)

    def _drain_upstream(self, _: asyncio.Future[None]) -> None:
        while self._up_pending and self._up_pending[0][0].done():
            future, data = self._up_pending.pop(0)
            if future.exception() is not None:
                # The request is not on record: it must not reach the upstream. The store
                # failure fails the session's connections through the outbox.
                continue
            if self.upstream is not None:
                self.upstream.send(data)
        if self._up_pending:
            self._up_pending[0][0].add_done_callback(self._drain_upstream)

    def _ensure_upstream(self) -> None:
        if self.upstream is not None or self._spawning is not None or self._closed:
            return
        self._spawning = self._tasks.spawn(self._spawn(), f"spawn:{self.label}")

    async def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config.upstream
        try:
            if self._spawned_at is not None:  # a respawn: back off if the last one was short
                if loop.time() - self._spawned_at >= cfg.respawn_stable_s or self._backoff is None:
                    self._backoff = backoff(cfg.respawn_initial_delay_s, cfg.respawn_max_delay_s)
                delay = next(self._backoff)
                log.info("upstream.respawn", session=self.label, delay_s=round(delay, 3))
                await asyncio.sleep(delay)
            upstream = self.upstream_factory(self.key, self)
            try:
                await upstream.start()
            except UpstreamError as exc:
                self.metrics.upstream_events.labels("spawn_failed").inc()
                log.error("upstream.spawn_failed", session=self.label, error=str(exc))
                # Only a capacity refusal says why on the wire: other causes carry paths.
                reason = str(exc) if isinstance(exc, UpstreamCapacity) else "spawn failed"
                self.execute(self.core.upstream_unavailable(reason))
                return
            self.metrics.upstream_events.labels("spawned").inc()
            self.upstream = upstream
            self._spawned_at = loop.time()
            ready = self._ready = asyncio.Event()
            self.execute(self.core.upstream_spawned())
        finally:
            self._spawning = None
        try:
            await asyncio.wait_for(ready.wait(), cfg.init_timeout_s)
        except TimeoutError:
            if self.upstream is upstream:
                await self._restart("upstream did not answer initialize in time")

    async def _restart(self, reason: str) -> None:
        upstream = self.upstream
        if upstream is None:
            return
        await upstream.aclose()
        if self.upstream is upstream:
            self.on_upstream_lost(reason)

    # --- lifecycle --------------------------------------------------------------------

    def fail(self, error: StoreError) -> None:
        """The store rolled back this session's writes in a batch everyone else's committed
        in (fault isolation, docs/ARCHITECTURE.md *Persistence*). Called before that batch's
        future resolves: nothing that was not committed may reach a client or the upstream.
        Its pumps stop with ``error`` (WebSocket: close 1011; SSE: the stream ends), what was
        held for the upstream is dropped, and the Hub forgets this runner: the next use of
        the id loads what was committed."""
        self._closed = True
        self.failed = error
        self._up_pending.clear()
        for outbox in [self.outbox, *(o for _, o in self.streams.values())]:
            if outbox is not None:
                outbox.halt(error)

    def terminate(self) -> None:
        """The client ended the session (HTTP DELETE): close every connection of it."""
        self._closed = True
        for conn in [self.conn, *(c for c, _ in self.streams.values())]:
            if conn is not None:
                conn.terminated()
        self.conn = None
        self.outbox = None
        self.streams.clear()

    def adopt(self, upstream: Upstream) -> None:
        """A reload handed this session's upstream over running and initialized (the core
        was restored with ``upstream_kept``): it is this session's upstream, as if spawned."""
        self.upstream = upstream
        self._spawned_at = asyncio.get_running_loop().time()
        self.metrics.upstream_events.labels("adopted").inc()

    async def hand_over(self, keep: Callable[[Upstream], Awaitable[bool]]) -> bool:
        """A reload in place: close this runner like ``aclose``, but ask ``keep`` to take the
        upstream over alive (it quiesces it for the next program) rather than stop it. Only
        an initialized upstream with nothing held back for a commit is offered (the reload
        committed everything first, so the holding list is empty unless a commit failed).
        True if it was kept; otherwise it was stopped, as on a restart."""
        self._closed = True
        await self._tasks.cancel_all()
        upstream, self.upstream = self.upstream, None
        held = self._held_requests()
        self._up_pending.clear()
        kept = False
        if upstream is not None:
            if not held and self.core.state is UpstreamState.READY:
                kept = await keep(upstream)
            if not kept:
                await upstream.aclose()
        if held:
            self.execute(self.core.never_written(held))
        if self.core.init_request is not None:
            # Awaited: a save that fails must fail the reload (the next program would restore
            # an older snapshot around a live child), not vanish in an unread future.
            await self.store.save_session(self.key, self.core.snapshot())
        return kept

    async def aclose(self, persist: bool = True) -> None:
        """Stop the upstream and persist the session; the log itself is already durable."""
        self._closed = True
        await self._tasks.cancel_all()
        upstream, self.upstream = self.upstream, None
        # What is still held back for its commit is never written now (nothing writes to a
        # stopped upstream): on record as such, the next process gets it after a restart
        # instead of an "outcome unknown" (taken before the stop: a commit during it drains
        # the holding list without writing).
        held = self._held_requests()
        self._up_pending.clear()
        if upstream is not None:
            await upstream.aclose()
        if persist and held:
            self.execute(self.core.never_written(held))
        if persist and self.core.init_request is not None:
            with contextlib.suppress(MCProxyError):
                await self.store.save_session(self.key, self.core.snapshot())
