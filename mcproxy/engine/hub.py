"""The registry of live sessions: mint ids, create, load from the store, recover after a crash.

Both fronts (WebSocket and Streamable HTTP) find sessions here and never build runners
themselves; one session is one ``SessionRunner`` in this process, whichever front it is
reached through. A session is named by its principal and its id (``schema.session_key``):
the fronts ask for ``get(id, principal)``, so another principal's id names a session of the
asker's own, which does not exist (yet). Nothing here ever refuses an id because it belongs
to someone else, so nothing tells that it does (issue 15 finding 8, docs/SECURITY.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

import structlog

from mcproxy.config import Config
from mcproxy.core import jsonrpc
from mcproxy.core.auth import ANONYMOUS, TokenTable
from mcproxy.core.guard import AddressLimiter
from mcproxy.core.ids import short_id
from mcproxy.core.jsonrpc import RequestId
from mcproxy.core.session import Limits, PendingRow, Session, logged_progress
from mcproxy.engine.runner import SessionRunner
from mcproxy.engine.schema import id_of, session_key
from mcproxy.engine.store import Store
from mcproxy.errors import LimitExceeded, StoreError, UpstreamCapacity, UpstreamError
from mcproxy.metrics import Metrics
from mcproxy.tasks import TaskSet
from mcproxy.upstreams.base import Upstream, UpstreamFactory, UpstreamHandler

log = structlog.get_logger("mcproxy")


class Hub:
    def __init__(
        self,
        store: Store,
        config: Config,
        upstream_factory: UpstreamFactory,
        metrics: Metrics,
        tokens: TokenTable | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.upstream_factory = upstream_factory
        self.metrics = metrics
        self.limits = Limits(
            max_pending_requests=config.limits.max_pending_requests,
            dedupe_window=config.limits.dedupe_window,
        )
        self.runners: dict[str, SessionRunner] = {}  # by session key
        if config.upstream.mode == "per-session":  # shared: its processes are pool_size
            self.slots: UpstreamSlots | None = UpstreamSlots(self)
            self.upstream_factory = self.slots.wrap(upstream_factory)
        else:
            self.slots = None
        self.counts: Counter[str] = Counter()  # stored sessions per principal
        self.tokens = tokens or TokenTable([])
        limits = config.limits
        self.new_connections = AddressLimiter(limits.connections_per_s, limits.connection_burst)
        self._tasks = TaskSet("hub")
        store.on_session_failed = self._session_failed
        self._loading: dict[str, asyncio.Task[SessionRunner | None]] = {}
        self._parking: dict[str, asyncio.Future[None]] = {}
        # Set by the daemon when SIGTERM begins the drain (loop time it ends by): the fronts
        # refuse new client requests from then on (-32016, HTTP 503); what is in flight runs.
        self.draining_until: float | None = None
        # Upstreams a reload handed over running, by session key: each builds the session's
        # upstream around its handler when the session is loaded (``adopt_all``).
        self.kept: dict[str, Kept] = {}
        self.quiescing = False  # a reload hands every session over: nobody may use one

    def drain_refusal(self, request_id: RequestId) -> tuple[bytes, int] | None:
        """While draining: the error answering a new client request, and the seconds after
        which to retry (the drain's end, when the next process can be there); else None."""
        if self.draining_until is None:
            return None
        left = self.draining_until - asyncio.get_running_loop().time()
        retry_s = max(1, math.ceil(left))
        self.metrics.error(jsonrpc.SHUTTING_DOWN)
        body = jsonrpc.error_bytes(
            request_id,
            jsonrpc.SHUTTING_DOWN,
            "the proxy is shutting down: send the request again after reconnecting",
            {"retryAfterS": retry_s},
        )
        return body, retry_s

    def quiesce(self) -> None:
        """A reload in place begins: from now on no session is created, loaded or handed
        to a client (a request that asks waits until the exec ends this program; its
        client sees an ordinary drop and asks the next one)."""
        self.quiescing = True

    async def adopt_all(self) -> int:
        """Start-up after a reload in place: load every session whose upstream was handed
        over, so each gets its running upstream back before any client comes. Returns how
        many got it back (not those whose adoption failed, nor orphans)."""
        keys = list(self.kept)
        for key in keys:
            await self._get(key)
        for key in list(self.kept):  # stored no more (a concurrent delete): let the child go
            log.warning("hub.kept_orphan", session=short_id(key))
            with contextlib.suppress(UpstreamError):
                upstream = await self.kept.pop(key).start(_Late())
                await upstream.aclose()
        return sum(
            1 for key in keys if (r := self.runners.get(key)) is not None and r.upstream is not None
        )

    async def load_counts(self) -> None:
        """Start-up: how many sessions each principal has stored (for the limits)."""
        self.counts = Counter()
        for principal, count in (await self.store.session_counts()).items():
            self.counts[principal or ANONYMOUS] += count

    def create(self, session_id: str, principal: str = ANONYMOUS) -> SessionRunner:
        """A new, empty session of ``principal`` (its row is written when ``initialize``
        arrives).

        Raises:
            LimitExceeded: ``limits.max_sessions`` or ``max_sessions_per_principal``.
        """
        if self.quiescing:
            raise LimitExceeded("the proxy is reloading; try again", 503)
        key = session_key(session_id, principal)
        if key in self.runners:
            # Two runners for one id would both write LSN 1 (get_or_create is the atomic way).
            raise ValueError("session already exists")
        limits = self.config.limits
        if sum(self.counts.values()) >= limits.max_sessions:
            raise LimitExceeded("too many sessions on this proxy", 503)
        if self.counts[principal] >= limits.max_sessions_per_principal:
            raise LimitExceeded("too many sessions for this principal", 429)
        self.counts[principal] += 1
        runner = SessionRunner(
            Session(session_id, self.limits, principal),
            self.store,
            self.upstream_factory,
            self.config,
            self.metrics,
            key=key,
        )
        self.runners[key] = runner
        log.info("session.created", session=short_id(session_id), principal=principal)
        return runner

    async def get_or_create(
        self, session_id: str, principal: str = ANONYMOUS
    ) -> tuple[SessionRunner, bool]:
        """``principal``'s session ``session_id`` (loaded if stored), or a new one under that
        id: atomic, so connections of one principal that propose the same new id at the same
        moment get one runner, and every one but the first is a later connection to it
        (True: this call created it). Another principal's session of that id is another
        session, untouched.

        Raises:
            LimitExceeded: see ``create``.
        """
        key = session_key(session_id, principal)
        runner = await self._get(key)
        if runner is None:
            # Another caller may have created it while this one waited for the load; from
            # here to ``create`` nothing awaits, so the check and the insert are one step.
            runner = self.runners.get(key)
        if runner is not None:
            return runner, False
        return self.create(session_id, principal), True

    async def get(self, session_id: str, principal: str = ANONYMOUS) -> SessionRunner | None:
        """``principal``'s session ``session_id``, loading it from the store if needed; None
        if that principal has none by that id. Whether another principal has one makes no
        difference: same lookups, same database read, nothing loaded or refreshed."""
        return await self._get(session_key(session_id, principal))

    async def _get(self, key: str) -> SessionRunner | None:
        await self._unless_quiescing()
        runner = self.runners.get(key)
        if runner is not None:
            return runner
        parking = self._parking.get(key)
        if parking is not None:  # let its last state reach the database first
            await asyncio.shield(parking)
            return await self._get(key)
        loading = self._loading.get(key)
        if loading is None:
            # The load runs in a task of the Hub's, not in the first requester: cancelling a
            # requester (a socket that drops mid-bind) cancels its own wait only, never the
            # load that every other requester of the id shares.
            loading = self._tasks.spawn(self._load_once(key), f"load:{short_id(key)}")
            self._loading[key] = loading
        runner = await asyncio.shield(loading)
        # A reload that began during the load hands over (or has closed) what it loaded.
        await self._unless_quiescing()
        return runner

    async def _unless_quiescing(self) -> None:
        """Returns at once, or never while a reload quiesces: the exec ends the wait."""
        if self.quiescing:
            await asyncio.get_running_loop().create_future()  # never set

    async def _load_once(self, key: str) -> SessionRunner | None:
        try:
            return await self._load(key)
        finally:
            del self._loading[key]

    async def _load(self, key: str) -> SessionRunner | None:
        loaded = await self.store.load_session(key)
        self.metrics.session_loads.labels("not_found" if loaded is None else "loaded").inc()
        if loaded is None or key in self.runners:
            return self.runners.get(key)
        shown = await self._progress_shown(key, loaded.pending)
        late = _Late()
        upstream = await self._adopt(key, late)
        core, actions = Session.restore(
            id_of(key),
            self.limits,
            loaded.record,
            loaded.pending,
            loaded.answered,
            shown,
            upstream_kept=None if upstream is None else upstream[1],
        )
        runner = SessionRunner(
            core,
            self.store,
            self.upstream_factory,
            self.config,
            self.metrics,
            log_floor=loaded.log_floor,
            key=key,
        )
        if upstream is not None:  # nothing was awaited since it started: no message missed
            late.target = runner
            if self.slots is not None:  # it holds a slot, as it did in the last program
                admitted = _Admitted(self.slots, key, runner)
                admitted.inner = upstream[0]
                admitted.hold(core.principal or ANONYMOUS)
                late.target = admitted
                runner.adopt(admitted)
            else:
                runner.adopt(upstream[0])
        self.runners[key] = runner
        log.info(
            "session.restored",
            session=short_id(key),
            principal=core.principal or ANONYMOUS,
            head_lsn=core.next_lsn - 1,
            resolved=len(loaded.pending),
        )
        runner.execute(actions)
        return runner

    async def _adopt(self, key: str, late: _Late) -> tuple[Upstream, bool] | None:
        """The upstream a reload kept for this session, running again (and whether its
        requests in flight are still answered by it), or None: none was kept, or it cannot
        be taken up again, and the session is restored as after a restart."""
        kept = self.kept.pop(key, None)
        if kept is None:
            return None
        try:
            return await kept.start(late), kept.requests_kept
        except UpstreamError as exc:
            log.error("upstream.adopt_failed", session=short_id(key), error=str(exc))
            return None

    async def _progress_shown(self, key: str, pending: list[PendingRow]) -> dict[str, float]:
        """The highest progress value logged for each request left in flight with a progress
        token (on its stream), so a re-issue after the restart never delivers a lower one
        (basic/utilities/progress: it MUST increase). Read only when restoring such rows."""
        shown: dict[str, float] = {}
        for row in pending:
            if row.stream == 0 or b"progressToken" not in row.body:
                continue
            after = 0
            while True:
                page = await self.store.read_events(key, after, 1000, row.stream)
                for lsn, data in page:
                    value = logged_progress(row, data)
                    if value is not None and value > shown.get(row.key, value - 1):
                        shown[row.key] = value
                    after = lsn
                if len(page) < 1000:
                    break
        return shown

    async def recover(self) -> int:
        """After a restart: resolve every request the previous process left in flight.

        Unsafe ones are answered "outcome unknown" into the log right away; safe ones are
        re-issued, which respawns those sessions' upstreams.
        """
        keys = await self.store.sessions_with_pending()
        for key in keys:
            await self._get(key)
        await self.store.barrier()  # the resolutions are in the log before anyone connects
        if keys:
            log.info("hub.recovered", sessions=len(keys))
        return len(keys)

    async def terminate(self, session_id: str, principal: str = ANONYMOUS) -> None:
        """End ``principal``'s session for good (HTTP DELETE): close its connections, stop
        its upstream, erase its rows. Later lookups of the id find nothing (404 on HTTP)."""
        key = session_key(session_id, principal)
        runner = self.runners.get(key)
        if runner is not None:
            runner.terminate()
            await runner.aclose(persist=False)
            self._forget(runner.core.principal)
        await self.store.delete_session(key)
        self.runners.pop(key, None)
        log.info("session.terminated", session=short_id(session_id))

    async def sweep(self) -> None:
        """Periodic housekeeping (the daemon calls it every ``sessions.sweep_interval_s``).

        - Park: a session idle for ``park_after_s`` (no client attached, nothing in flight on
          either side) has its upstream stopped and leaves memory; it is loaded again, and its
          upstream respawned and re-initialized, the next time a client uses it.
        - Bound the log: keep at most ``max_log_events`` messages per session.
        - Expire: delete sessions not seen for ``expire_after_s``.
        """
        cfg = self.config.sessions
        now = asyncio.get_running_loop().time()
        for key, runner in list(self.runners.items()):
            head = runner.core.next_lsn - 1
            if head - runner.log_floor > cfg.max_log_events:
                floor = head - cfg.max_log_events
                self.store.prune(key, floor)
                self.metrics.log_pruned.inc(floor - runner.log_floor)
                runner.log_floor = floor
            if runner.idle and now - runner.last_active >= cfg.park_after_s:
                await self.park(key)
        cutoff = time.time() - cfg.expire_after_s
        # Only the owner's use loads a session (``get`` is by principal), so only it keeps
        # one from expiring: another principal probing the id never does (issue 15 finding 9).
        for key, principal in await self.store.expired_sessions(cutoff):
            if key in self.runners or key in self._loading:
                continue  # in use: its row is refreshed when it parks or detaches
            await self.store.delete_session(key)
            self._forget(principal)
            self.metrics.sessions_expired.inc()
            log.info("session.expired", session=short_id(key))

    def _session_failed(self, key: str, error: StoreError) -> None:
        """The store rolled back this session's writes alone (a constraint, a bug): fail it,
        and it only (its clients are told; the next use reloads what was committed)."""
        self.metrics.error("session_failed")
        log.error("session.failed", session=short_id(key), error=str(error))
        runner = self.runners.pop(key, None)
        if runner is None:
            return
        runner.fail(error)
        self._tasks.spawn(runner.aclose(persist=False), f"close:{runner.label}")

    def _forget(self, principal: str | None) -> None:
        key = principal or ANONYMOUS
        if self.counts[key] > 0:
            self.counts[key] -= 1

    async def park(self, key: str) -> None:
        runner = self.runners.pop(key, None)
        if runner is None:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._parking[key] = done
        try:
            await runner.aclose()
            self.metrics.upstream_events.labels("parked").inc()
            log.info("session.parked", session=runner.label, head_lsn=runner.core.next_lsn - 1)
        finally:
            del self._parking[key]
            done.set_result(None)

    async def aclose(self) -> None:
        """Stop every upstream and persist every session (shutdown).

        Raises:
            ExceptionGroup: the sessions that could not be closed cleanly, one error each
                (every other session is closed all the same).
        """
        runners = list(self.runners.values())
        results = await asyncio.gather(*(r.aclose() for r in runners), return_exceptions=True)
        await self._tasks.cancel_all()  # loads in progress, closes of failed sessions
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            raise ExceptionGroup(
                f"{len(errors)} of {len(runners)} sessions failed to close", errors
            )


class UpstreamSlots:
    """The cap on live per-session upstreams (``upstream.max_live_upstreams``, in total and
    per principal; issue 15 finding 5: a session flood must not be a process flood).

    A slot is taken when an upstream starts and given back when it is closed, lost or fails
    to start. At the cap, the least recently used idle session (no client attached, nothing
    in flight: what ``sweep`` would park later anyway) is parked now to make room, of the
    same principal when it is that principal's share that is full; with none to park the
    start is refused with ``UpstreamCapacity``, which the session answers -32011 with the
    reason (docs/SECURITY.md).
    """

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.live: dict[str, str] = {}  # session key -> principal, of upstreams holding a slot
        self.per_principal: Counter[str] = Counter()

    def wrap(self, factory: UpstreamFactory) -> UpstreamFactory:
        def admitted(session_id: str, handler: UpstreamHandler) -> Upstream:
            upstream = _Admitted(self, session_id, handler)
            upstream.inner = factory(session_id, upstream)
            return upstream

        return admitted

    def _principal(self, session_id: str) -> str:
        runner = self.hub.runners.get(session_id)
        return (runner.core.principal if runner is not None else None) or ANONYMOUS

    def _full(self, principal: str) -> str | None:
        # The principal's share first: parking one of its own sessions frees a slot of the
        # total too, and never costs another principal its upstream.
        cfg = self.hub.config.upstream
        if self.per_principal[principal] >= cfg.max_live_upstreams_per_principal:
            return "upstream.max_live_upstreams_per_principal"
        if len(self.live) >= cfg.max_live_upstreams:
            return "upstream.max_live_upstreams"
        return None

    async def acquire(self, session_id: str) -> None:
        """Take a slot for ``session_id``, parking idle sessions if needed.

        Raises:
            UpstreamCapacity: the cap is reached and no idle session can be parked.
        """
        principal = self._principal(session_id)
        tried: set[str] = set()
        while (full := self._full(principal)) is not None:
            same = full.endswith("per_principal")
            idle = [
                runner
                for sid, owner in self.live.items()
                if sid != session_id
                and sid not in tried
                and (not same or owner == principal)
                and (runner := self.hub.runners.get(sid)) is not None
                and runner.idle
            ]
            if not idle:
                # Counted as spawn_failed by the runner; the log says why.
                log.warning("upstream.capacity", session=short_id(session_id), limit=full)
                raise UpstreamCapacity(f"too many live upstreams ({full}); none idle to park")
            victim = min(idle, key=lambda r: r.last_active)
            tried.add(victim.key)
            log.info("upstream.park_for_room", session=victim.label, limit=full)
            await self.hub.park(victim.key)
        self.hold(session_id, principal)

    def hold(self, session_id: str, principal: str) -> None:
        """Take a slot, even over the cap: ``acquire`` made room first; an upstream already
        running (handed over by a reload) gets one whatever the cap (a reload that lowered
        it stops no child; later starts wait). Counted per principal like any, since
        ``release`` uncounts it."""
        self.live[session_id] = principal
        self.per_principal[principal] += 1

    def release(self, session_id: str) -> None:
        principal = self.live.pop(session_id, None)
        if principal is not None:
            self.per_principal[principal] -= 1


class _Admitted:
    """An upstream that holds a slot of ``UpstreamSlots`` from its start to its end."""

    inner: Upstream

    def __init__(
        self,
        slots: UpstreamSlots,
        session_id: str,
        handler: UpstreamHandler,
    ) -> None:
        """The caller sets ``inner``, built with this object as its handler."""
        self.slots = slots
        self.session_id = session_id
        self.handler = handler
        self.on_upstream_message = handler.on_upstream_message  # straight through
        self._holding = False  # released once, by whichever end comes first

    async def start(self) -> None:
        await self.slots.acquire(self.session_id)
        self._holding = True
        try:
            await self.inner.start()
        except BaseException:
            self._release()
            raise

    def hold(self, principal: str) -> None:
        """Take the slot of an upstream already running (handed over by a reload)."""
        self.slots.hold(self.session_id, principal)
        self._holding = True

    def send(self, data: bytes) -> None:
        self.inner.send(data)

    async def aclose(self) -> None:
        try:
            await self.inner.aclose()
        finally:
            self._release()

    def on_upstream_lost(self, reason: str, unsent: Collection[int] = ()) -> None:
        self._release()
        self.handler.on_upstream_lost(reason, unsent)

    def _release(self) -> None:
        if self._holding:
            self._holding = False
            self.slots.release(self.session_id)


@dataclass(frozen=True, slots=True)
class Kept:
    """An upstream a reload in place handed over running (docs/ARCHITECTURE.md *Reload in
    place*). ``start`` takes it up again around the session's handler; ``requests_kept``:
    its requests in flight are still answered by it (a stdio child: the same pipes), or
    only its session goes on (an HTTP upstream: the answer streams were cut, so they are
    resolved as after a restart)."""

    start: Callable[[UpstreamHandler], Awaitable[Upstream]]
    requests_kept: bool


class _Late:
    """The handler of an upstream taken up before its runner exists: forwards to
    ``target`` once set (nothing arrives before: no await between the two)."""

    __slots__ = ("target",)

    def __init__(self) -> None:
        self.target: UpstreamHandler | None = None

    def on_upstream_message(self, line: bytes, related: int | None = None) -> None:
        if self.target is not None:
            self.target.on_upstream_message(line, related)

    def on_upstream_lost(self, reason: str, unsent: Collection[int] = ()) -> None:
        if self.target is not None:
            self.target.on_upstream_lost(reason, unsent)
