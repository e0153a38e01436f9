"""Shared stdio upstreams: one child process (or a small pool of N) multiplexing many sessions.

A Python stdio MCP server costs tens of megabytes; one per session stops a proxy at a few
hundred sessions. In ``upstream.mode = "shared"`` a ``SharedPool`` owns ``pool_size`` children
(each an ``Upstream`` the daemon makes: a ``StdioUpstream``, whose handler is the pool's
demultiplexer) and is the daemon's upstream factory, handing every session a
``SharedUpstream``: an ``Upstream`` like any other, so the session core and its runner are
unchanged and each session still believes it has an upstream of its own. What makes sharing
safe is that nothing a child says reaches a session unless it provably belongs to it:

- **Ids.** Every request a session sends gets a pool-unique integer id; the answer goes back
  to that session only, under the id it sent (same value, same JSON type). A cancellation is
  translated the same way. Server→client requests keep the child's id; a session may answer
  only the ones it was given.
- **Progress.** ``params._meta.progressToken`` is replaced by a pool-unique token of the same
  JSON type (an integer, or a string ``"mcproxy.<n>"``) and mapped back on
  ``notifications/progress``: two sessions using the same token never see each other's.
- **Fan-out.** ``notifications/{tools,prompts,resources}/list_changed`` concern every client:
  they go to every session on that child. ``notifications/resources/updated`` goes to the
  sessions subscribed to that URI. The child is sent ``resources/subscribe`` once per URI
  and ``resources/unsubscribe`` when the last session drops it.
- **Unattributable traffic.** stdio does not say which client request a server request
  (sampling, elicitation, roots) or a log message relates to. It is delivered only when the
  recipient is certain enough: the only session on the child, or the only one with a
  request in flight there. Otherwise a server request is answered to the child with an error
  (``CANNOT_ATTRIBUTE``) and a notification is dropped; both are counted, never guessed.
  ``ping`` from the child is answered by the pool.
- **initialize.** The child sees one ``initialize`` per process: that of the first session
  to start on it (its client's capabilities and info). The pool then sends
  ``notifications/initialized`` itself, and answers every later session's ``initialize``
  with the child's stored ``InitializeResult`` (under that session's id). A server request
  needing a capability goes only to a session whose client declared it; the child is
  answered ``-32601`` otherwise. ``logging/setLevel`` sets the most verbose level any
  session needs (a session that never asked needs the default: everything); each session
  gets log messages at or above its own level.
- **Admission.** A child works on at most ``max_in_flight`` requests at once; the rest wait
  in the pool, first come first served, and go to the child as answers free their slots.
  An SDK server given thousands of requests at once spends more CPU on each (it schedules
  them all); queued here they cost a list entry. A queued request that is cancelled, or
  whose session leaves, is simply dropped: the child never heard of it.
- **Loss.** A child that exits takes every session on it down together: each gets
  ``on_upstream_lost`` (the core re-issues or fails its in-flight requests, as for a child of
  its own, and resends those that were still queued here: they cannot have taken effect)
  and respawns through the factory; the first ``start()`` restarts the child, the first
  ``initialize`` re-initializes it, later ones are answered from the new result.
- **Shutdown.** ``SharedPool.aclose`` stops the children while their sessions are still
  attached (the daemon closes the pool before the sessions): what a child writes during its
  stop ladder is routed and logged like anything else, not cancelled and dropped.
- **Reload in place.** The children outlive the program: ``quiesce`` stops reading each at
  a message boundary, ``handover`` gives their pipes and the router's tables
  (``Router.snapshot``) to the record, and the next program's pool takes them up
  (``take_over``: no new ``initialize``) and gives each session its router handle back as
  it is loaded (``reattach``). Tables that do not restore stop the children instead: every
  session restarts (docs/ARCHITECTURE.md *Reload in place*).

The routing tables and every decision above live in ``upstreams.shared_router`` (sans-I/O,
tested without an event loop); this module is its I/O driver: the processes, the timers and
the per-session ``SharedUpstream`` objects, executing the router's actions in order.

Per session the pool keeps only what is in flight (requests, tokens, server requests) plus
its subscriptions, log level and capabilities; entries go when answered, cancelled or when
the session detaches, and each map is bounded. A child with no session left is stopped.
See docs/ARCHITECTURE.md, "Shared upstreams".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import NoReturn

import structlog

from mcproxy.errors import UpstreamError
from mcproxy.tasks import TaskSet
from mcproxy.upstreams.base import Upstream, UpstreamHandler
from mcproxy.upstreams.shared_router import (
    Action,
    CancelInitTimer,
    Deliver,
    Lose,
    Router,
    StartInitTimer,
    Stop,
    Warn,
    Write,
)
from mcproxy.upstreams.stdio import HandedOver, StdioUpstream

log = structlog.get_logger("mcproxy")


class _Link:
    """The ``UpstreamHandler`` of one child process: ignores a process that was replaced."""

    __slots__ = ("child", "generation")

    def __init__(self, child: _Child, generation: int) -> None:
        self.child = child
        self.generation = generation

    def on_upstream_message(self, line: bytes, related: int | None = None) -> None:
        child = self.child
        if child.generation == self.generation:
            child.pool.execute(child.pool.router.from_child(child.index, line))

    def on_upstream_lost(self, reason: str, unsent: Collection[int] = ()) -> None:
        # A process of its own writes every line it is given: ``unsent`` is always empty.
        if self.child.generation == self.generation:
            self.child.lost(reason)


class SharedUpstream:
    """One session's view of a shared child: implements ``Upstream``."""

    __slots__ = ("_backlog", "_closed", "_lost", "handler", "index", "pool", "sid")

    def __init__(self, pool: SharedPool, handler: UpstreamHandler) -> None:
        self.pool = pool
        self.handler = handler
        self.index: int | None = None  # the child it is on
        self.sid: int | None = None  # its handle in the router, while attached
        self._closed = False
        self._lost = False
        # Re-attached after a reload: what its child answered before the session was loaded,
        # delivered first (``SharedPool.reattach``); None once delivered.
        self._backlog: list[tuple[bytes, int | None]] | None = None

    async def start(self) -> None:
        pool, router = self.pool, self.pool.router
        if pool.closed:
            await pool.closed_forever()
        index = router.pick()
        child = pool.children[index]
        router.reserve(index)
        try:
            await child.ensure_running()
        except BaseException as exc:
            router.unreserve(index)
            pool.execute(router.idle(index))
            if isinstance(exc, UpstreamError) and pool.closed:
                await pool.closed_forever()
            raise
        router.unreserve(index)
        if self._closed:
            pool.execute(router.idle(index))
            return
        # No await since ensure_running() saw the process up: it is still up.
        self.index = index
        self.sid, actions = router.attach(index)
        pool.sessions[self.sid] = self
        pool.execute(actions)

    def send(self, data: bytes) -> None:
        # None: lost (reported), closed, or never started. While the pool is handed over
        # its children are written no more (as a quiesced child of its own): the tables
        # must keep describing what each child was actually sent.
        if self.sid is not None and not self.pool.handing_over:
            self.pool.execute(self.pool.router.from_session(self.sid, data))

    async def aclose(self) -> None:
        """Detach from the child (the child itself goes on for the other sessions)."""
        if self._closed:
            return
        self._closed = True
        sid, self.sid = self.sid, None
        if sid is not None:
            self.pool.sessions.pop(sid, None)
            if not self.pool.handing_over:
                self.pool.execute(self.pool.router.detach(sid))
            # else: its child is no longer written to; the next program detaches it (its
            # cancellations then reach the child), as it does every session it gets no
            # runner for (``SharedPool.detach_unclaimed``).

    def deliver(self, data: bytes, related: int | None = None) -> None:
        if self._closed or self._lost:
            return
        if self._backlog is not None:
            self._backlog.append((data, related))  # after what the child said before
            return
        self.handler.on_upstream_message(data, related)

    def _deliver_backlog(self) -> None:
        # A list iterated while it may grow: what arrives during delivery is seen too.
        for data, related in self._backlog or ():
            if self._closed or self._lost:
                break
            self.handler.on_upstream_message(data, related)
        self._backlog = None

    def lose(self, reason: str, unsent: Collection[int]) -> None:
        self.sid = None
        if self._closed or self._lost:
            return
        self._lost = True
        self.handler.on_upstream_lost(reason, unsent)


class _Child:
    """One child process of the pool: spawning, stopping, the initialize deadline."""

    def __init__(self, pool: SharedPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.label = f"shared#{index}"
        self.proc: Upstream | None = None
        self.generation = 0  # bumped whenever the process is replaced or dropped
        self._spawning: asyncio.Task[UpstreamError | None] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self.init_timer: asyncio.TimerHandle | None = None

    async def ensure_running(self) -> None:
        """Return with the process up (spawning it, or waiting for a spawn or stop)."""
        while self.proc is None:
            if self.pool.closed:
                raise UpstreamError("the proxy is shutting down")
            if self._stopping is not None:
                await asyncio.shield(self._stopping)
                continue
            if self._spawning is None:
                self._spawning = self.pool.tasks.spawn(self._spawn(), f"spawn:{self.label}")
            error = await asyncio.shield(self._spawning)
            if error is not None:
                raise error

    async def _spawn(self) -> UpstreamError | None:
        try:
            generation = self.generation + 1
            proc = self.pool.spawn(_Link(self, generation), self.label)
            try:
                await proc.start()
            except UpstreamError as exc:
                return exc
            if self.pool.closed:  # shut down while it started
                await proc.aclose()
                return UpstreamError("the proxy is shutting down")
            self.generation = generation
            self.pool.router.started(self.index)
            self.proc = proc
            return None
        finally:
            self._spawning = None

    def send(self, data: bytes) -> None:
        if self.proc is not None:
            self.proc.send(data)

    def stop_idle(self) -> None:
        """The router saw no session left: stop the process (the next session starts one)."""
        if self.proc is None or self._stopping is not None:
            return
        proc, self.proc = self.proc, None  # from now on a session starting waits for the stop
        self.generation += 1
        log.info("upstream.shared_idle", child=self.label)
        self._stopping = self.pool.tasks.spawn(self._stop(proc), f"stop:{self.label}")

    async def _stop(self, proc: Upstream) -> None:
        try:
            await proc.aclose()
        finally:
            self._stopping = None

    async def shutdown(self) -> None:
        """Stop the process for good. Until it has exited, what it writes is still routed:
        an answer it gives during the stop ladder reaches (and is logged by) its session."""
        for task in (self._spawning, self._stopping):
            if task is not None:
                await asyncio.shield(task)  # neither raises: a spawn returns its error
        self.cancel_init_timer()
        proc = self.proc
        if proc is not None:
            await proc.aclose()  # never reports a loss; its link stays live meanwhile
        self.proc = None
        self.generation += 1
        self.pool.router.down(self.index)

    def lost(self, reason: str) -> None:
        """The process exited: every session on it is lost too, and recovers on its own."""
        self.proc = None
        self.generation += 1
        actions = self.pool.router.lost(self.index, reason)
        sessions = sum(isinstance(action, Lose) for action in actions)
        log.warning("upstream.shared_lost", child=self.label, sessions=sessions, reason=reason)
        self.pool.execute(actions)

    def start_init_timer(self) -> None:
        self.cancel_init_timer()
        loop = asyncio.get_running_loop()
        self.init_timer = loop.call_later(self.pool.init_timeout_s, self._init_timed_out)

    def cancel_init_timer(self) -> None:
        if self.init_timer is not None:
            self.init_timer.cancel()
            self.init_timer = None

    def _init_timed_out(self) -> None:
        self.init_timer = None
        self.pool.tasks.spawn(
            self._kill("the shared upstream did not answer initialize in time"),
            f"kill:{self.label}",
        )

    async def _kill(self, reason: str) -> None:
        proc = self.proc
        if proc is None:
            return
        await proc.aclose()
        if self.proc is proc:
            self.lost(reason)


@dataclass(frozen=True, slots=True)
class PoolState:
    """What /metrics shows of a pool: children running, requests on them and waiting for a
    slot, and the pool's counters (``SharedPool.stats``: spawned, lost, queued, and every
    kind of message it refused or dropped rather than guess where it belonged)."""

    children: int
    in_flight: int
    queued: int
    events: dict[str, int]


ChildFactory = Callable[[UpstreamHandler, str], Upstream]
"""``spawn(handler, label)`` builds an unstarted child process (the daemon: a ``StdioUpstream``)."""

ChildAdopter = Callable[[HandedOver, UpstreamHandler, str], Awaitable[Upstream]]
"""``adopt(handed, handler, label)``: a child a reload handed over, running again
(the daemon: ``upstreams.adopted.adopt``)."""


@dataclass(frozen=True, slots=True)
class PoolHandover:
    """What a reload in place passes on of the pool (``SharedPool.handover``): its children
    kept running, by index, and the router's tables (``Router.snapshot``)."""

    children: list[tuple[int, HandedOver]]
    router: bytes


class SharedPool:
    """``size`` shared children; an ``UpstreamFactory`` (call it with a session id and its
    handler). The daemon owns it and closes it on shutdown.

    ``init_timeout_s``: a child that does not answer its ``initialize`` within this is killed
    and treated as lost. ``max_in_flight``: requests each child works on at once (0: no
    limit); the others wait in the pool.
    """

    def __init__(
        self, spawn: ChildFactory, size: int, init_timeout_s: float, max_in_flight: int = 0
    ) -> None:
        self.router = Router(size, max_in_flight)  # raises ValueError on a bad size or limit
        self.spawn = spawn
        self.init_timeout_s = init_timeout_s
        self.children = [_Child(self, index) for index in range(size)]
        self.sessions: dict[int, SharedUpstream] = {}  # by router session id
        self.tasks = TaskSet("shared-pool")
        self.stats = self.router.stats
        self.closed = False
        # A reload in place: its children are quiesced, sessions keep their router handles.
        self.handing_over = False
        self._kept: list[int] = []  # indices of the children quiesced for the next program
        # After a reload: what the router routed to sessions not loaded yet, by sid.
        self._parked: dict[int, list[tuple[bytes, int | None]]] = {}

    def __call__(self, session_id: str, handler: UpstreamHandler) -> SharedUpstream:
        return SharedUpstream(self, handler)

    def snapshot(self) -> PoolState:
        return PoolState(
            children=sum(1 for child in self.children if child.proc is not None),
            in_flight=self.router.in_flight(),
            queued=self.router.queued(),
            events=dict(self.stats),
        )

    async def closed_forever(self) -> NoReturn:
        """Wait until cancelled: the daemon is stopping. A session that (re)starts now is
        closed next and persisted with its requests still pending, for the next process to
        resolve; failing its start would make its runner fail them all instead
        (``upstream_unavailable``). The daemon closes the pool before the sessions."""
        await asyncio.Event().wait()
        raise AssertionError("unreachable: an Event nobody sets")

    def execute(self, actions: list[Action]) -> None:
        """Carry out the router's actions, in order."""
        for action in actions:
            if isinstance(action, Write):  # the hot path: one Write or Deliver per message
                self.children[action.child].send(action.data)
            elif isinstance(action, Deliver):
                up = self.sessions.get(action.sid)
                if up is None:
                    parked = self._parked.get(action.sid)
                    if parked is not None:  # its session is being loaded after a reload
                        parked.append((action.data, action.related))
                    continue
                if action.soon:
                    asyncio.get_running_loop().call_soon(up.deliver, action.data, None)
                else:
                    up.deliver(action.data, action.related)
            elif isinstance(action, Lose):
                self._parked.pop(action.sid, None)  # its session restarts when loaded
                up = self.sessions.pop(action.sid, None)
                if up is not None:
                    up.lose(action.reason, action.unsent)
            elif isinstance(action, StartInitTimer):
                self.children[action.child].start_init_timer()
            elif isinstance(action, CancelInitTimer):
                self.children[action.child].cancel_init_timer()
            elif isinstance(action, Stop):
                self.children[action.child].stop_idle()
            elif isinstance(action, Warn):
                log.warning(action.event, **action.fields)

    async def aclose(self) -> None:
        """Stop every child (bounded by the stop ladder); sessions are not told, but what a
        child answers while it stops is still delivered to them (the daemon closes the pool
        before the sessions, so those answers are logged). Idempotent."""
        self.closed = True
        await asyncio.gather(*(child.shutdown() for child in self.children))
        self.sessions.clear()
        await self.tasks.cancel_all()

    # --- reload in place (docs/ARCHITECTURE.md *Reload in place*) ---------------------------

    async def quiesce(self, drain_s: float) -> None:
        """A reload begins: stop reading each child at a message boundary, leaving it running
        (``StdioUpstream.quiesce``, as a session's own child); from now on nothing is written
        to a child nor routed from one, so the router's tables describe exactly what each
        child was sent and has not answered. A child that cannot be handed over (starting,
        stopping, not taking its input) is stopped as on a restart: its sessions are
        forgotten here, and restart in the next program."""
        self.handing_over = True

        async def one(child: _Child) -> None:
            for task in (child._spawning, child._stopping):
                if task is not None:
                    await asyncio.shield(task)
            proc = child.proc
            child.cancel_init_timer()  # re-armed by the next program if still pending
            up = self.router.children[child.index].up
            if isinstance(proc, StdioUpstream) and up and await proc.quiesce(drain_s):
                self._kept.append(child.index)
                return
            if proc is not None:
                log.warning("reload.shared_child_not_kept", child=child.label)
            await child.shutdown()

        await asyncio.gather(*(one(child) for child in self.children))

    def keep(self, up: SharedUpstream) -> int | None:
        """A session handed over with the pool: its router handle, which the next program
        gives back to it (``reattach``); None if its child was not kept."""
        sid = up.sid
        if not self.handing_over or sid is None or sid not in self.router.sessions:
            return None
        if self.router.sessions[sid].child not in self._kept:
            return None
        up._closed = True  # nothing reaches it any more: the child is not read
        up.sid = None
        self.sessions.pop(sid, None)
        return sid

    def handover(self) -> PoolHandover:
        """After ``quiesce``, just before exec: the kept children (descriptors made
        inheritable, unread output) and the router's tables."""
        children = []
        for index in sorted(self._kept):
            proc = self.children[index].proc
            assert isinstance(proc, StdioUpstream)
            children.append((index, proc.handover()))
        return PoolHandover(children, self.router.snapshot())

    async def take_over(self, handed: PoolHandover, adopt: ChildAdopter) -> list[int] | None:
        """Start-up after a reload in place: rebuild the pool around the children the last
        program kept (already initialized: they are sent nothing) and its router's tables.
        Returns the router handles of the sessions it had (each session gets its own back
        with ``reattach`` when it is loaded), or None if the tables do not restore: then
        the children are stopped and every session restarts, as after a restart."""
        indices = [index for index, _ in handed.children]
        try:
            if any(not 0 <= i < len(self.children) for i in indices):
                raise ValueError(f"children {indices}, this pool has {len(self.children)}")
            admitted = self.router.restore(handed.router)
            for index in range(len(self.children)):
                if self.router.children[index].up and index not in indices:
                    raise ValueError(f"the tables of child {index}, whose process is gone")
        except ValueError as exc:
            log.error("reload.shared_pool_not_kept", reason=str(exc), children=len(indices))
            self.router = Router(len(self.children), self.router.max_in_flight)
            self.stats = self.router.stats
            await asyncio.gather(*(stop_handed(h, adopt) for _, h in handed.children))
            return None
        # Held from now on, before the first child is taken up: its reader runs from the
        # next loop turn, which the next child's adoption awaits, and what it answered
        # during the exec is routed then, before any session is loaded. A Deliver to a
        # handle with neither a session nor a parking place is dropped (the answer to a
        # call in flight was lost under load this way: its client waited forever).
        self._parked = {sid: [] for sid in self.router.sessions}
        for index, child_handed in handed.children:
            child = self.children[index]
            generation = child.generation + 1
            try:
                proc = await adopt(child_handed, _Link(child, generation), child.label)
            except UpstreamError as exc:
                log.error("reload.shared_child_not_adopted", child=child.label, error=str(exc))
                _kill_handed(child_handed)
                self.router.down(index)  # its sessions restart when loaded
                continue
            child.generation = generation
            child.proc = proc
            if self.router.children[index].init_id is not None:
                child.start_init_timer()  # its initialize is still in flight
        sids = list(self.router.sessions)
        # A child not taken up took its sessions out of the tables: they restart when loaded.
        self._parked = {sid: self._parked.get(sid, []) for sid in sids}
        self.execute(admitted)  # a child that was not adopted is down: not written to
        return sids

    def reattach(self, sid: int, handler: UpstreamHandler) -> SharedUpstream:
        """The session of router handle ``sid`` loaded after a reload: its view of its child,
        what the child said meanwhile delivered first, on the next loop turn (the session's
        runner is set up without an await in between).

        Raises:
            UpstreamError: its child is gone (the session restarts as after a restart).
        """
        backlog = self._parked.pop(sid, None)
        state = self.router.sessions.get(sid)
        if backlog is None or state is None:
            raise UpstreamError("its shared upstream was lost during the reload")
        up = SharedUpstream(self, handler)
        up.index = state.child
        up.sid = sid
        self.sessions[sid] = up
        if backlog:
            up._backlog = backlog
            asyncio.get_running_loop().call_soon(up._deliver_backlog)
        return up

    def detach_unclaimed(self, claimed: Collection[int]) -> None:
        """The sessions of the last program that no session here will take back (they had
        no runner to hand over): detached, their requests cancelled on the child."""
        for sid in list(self._parked):
            if sid not in claimed:
                del self._parked[sid]
                self.execute(self.router.detach(sid))


class _Discard:
    """The handler of a handed-over child that is only stopped: its last words go nowhere."""

    def on_upstream_message(self, line: bytes, related: int | None = None) -> None:
        pass

    def on_upstream_lost(self, reason: str, unsent: Collection[int] = ()) -> None:
        pass


async def stop_handed(handed: HandedOver, adopt: ChildAdopter) -> None:
    """Stop a child that was handed over but is not taken up (bounded stop ladder)."""
    try:
        proc = await adopt(handed, _Discard(), f"pid {handed.pid}")
    except UpstreamError:
        _kill_handed(handed)
        return
    await proc.aclose()


def _kill_handed(handed: HandedOver) -> None:
    for fd in (handed.stdin_fd, handed.stdout_fd, handed.stderr_fd):
        with contextlib.suppress(OSError):
            os.close(fd)
    with contextlib.suppress(OSError):
        os.killpg(handed.pid, signal.SIGKILL)  # its own process group (stdio: pgid == pid)
        os.waitpid(handed.pid, 0)
