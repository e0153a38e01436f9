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
  session asked for; each session gets log messages at or above its own level.
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

Per session the pool keeps only what is in flight (requests, tokens, server requests) plus
its subscriptions, log level and capabilities; entries go when answered, cancelled or when
the session detaches, and each map is bounded. A child with no session left is stopped.
See docs/ARCHITECTURE.md, "Shared upstreams".
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Final

import msgspec
import structlog

from mcproxy.core import jsonrpc
from mcproxy.core.jsonrpc import NO_RAW, Kind, Message, RequestId
from mcproxy.errors import ProtocolError, UpstreamError
from mcproxy.tasks import TaskSet
from mcproxy.upstreams.base import Upstream, UpstreamHandler

log = structlog.get_logger("mcproxy")

# server/utilities/logging: syslog severities, most verbose first.
LOG_LEVELS: Final = (
    "debug",
    "info",
    "notice",
    "warning",
    "error",
    "critical",
    "alert",
    "emergency",
)
_RANK: Final = {name: rank for rank, name in enumerate(LOG_LEVELS)}

# What a server→client request needs the client to have declared (lifecycle §Capability
# Negotiation: a server MUST NOT use a capability the client did not offer).
REQUIRED_CAPABILITY: Final = {
    "sampling/createMessage": "sampling",
    "elicitation/create": "elicitation",
    "roots/list": "roots",
}
FAN_OUT: Final = frozenset(
    {
        "notifications/tools/list_changed",
        "notifications/prompts/list_changed",
        "notifications/resources/list_changed",
    }
)
CANNOT_ATTRIBUTE: Final = "cannot attribute a server request on a shared upstream"
# Bounds on what one session may have outstanding on a child (the core's own limit on client
# requests, limits.max_pending_requests, is lower by default; this also bounds internal ones).
MAX_PENDING_PER_SESSION: Final = 4096
MAX_SERVER_REQUESTS_PER_SESSION: Final = 1024

_MAX_INTERNED: Final = 256
_PLAIN: Final = 0
_INIT: Final = 1
_SUBSCRIBE: Final = 2
_INITIALIZED: Final = jsonrpc.encode(jsonrpc.notification_message("notifications/initialized"))


class _Caps(msgspec.Struct):
    capabilities: dict[str, msgspec.Raw] | None = None


class _Level(msgspec.Struct):
    level: str | None = None


def client_capabilities(msg: Message) -> frozenset[str]:
    """The capability names an ``initialize`` request declares (``params.capabilities``)."""
    if msg.params is NO_RAW:
        return frozenset()
    try:
        parsed = msgspec.json.decode(msg.params, type=_Caps)
    except msgspec.DecodeError:
        return frozenset()
    return frozenset(parsed.capabilities or ())


def _message_level(msg: Message) -> str | None:
    if msg.params is NO_RAW:
        return None
    try:
        return msgspec.json.decode(msg.params, type=_Level).level
    except msgspec.DecodeError:
        return None


class _Pending:
    """A request on a child, under its pool-unique id. ``owner`` None: the pool's own, or
    one whose session left (an initialize or subscribe whose outcome others wait for).
    ``queued``: its encoded line while it waits for a slot; ``counted``: it holds a slot."""

    __slots__ = ("counted", "kind", "local_id", "original_token", "owner", "queued", "token", "uri")

    def __init__(
        self, owner: SharedUpstream | None, local_id: RequestId, kind: int = _PLAIN
    ) -> None:
        self.owner = owner
        self.local_id = local_id
        self.kind = kind
        self.token: str | None = None  # id_key of the pool's progress token
        self.original_token: RequestId | None = None
        self.uri: str | None = None
        self.queued: bytes | None = None
        self.counted = False


class _Sub:
    """One resource URI the child is subscribed to, and the sessions that asked for it."""

    __slots__ = ("confirmed", "members", "waiters")

    def __init__(self) -> None:
        self.members: set[SharedUpstream] = set()
        self.confirmed = False  # the child answered the subscribe
        self.waiters: list[tuple[SharedUpstream, RequestId]] = []  # answered with its outcome


class _Link:
    """The ``UpstreamHandler`` of one child process: ignores a process that was replaced."""

    __slots__ = ("child", "generation")

    def __init__(self, child: _Child, generation: int) -> None:
        self.child = child
        self.generation = generation

    def on_upstream_message(self, line: bytes, related: int | None = None) -> None:
        if self.child.generation == self.generation:
            self.child.from_child(line)

    def on_upstream_lost(self, reason: str, unsent: Collection[int] = ()) -> None:
        # A process of its own writes every line it is given: ``unsent`` is always empty.
        if self.child.generation == self.generation:
            self.child.lost(reason)


class SharedUpstream:
    """One session's view of a shared child: implements ``Upstream``."""

    __slots__ = (
        "_closed",
        "_local",
        "_lost",
        "_server",
        "_subs",
        "caps",
        "child",
        "handler",
        "level",
        "pool",
        "ready",
    )

    def __init__(self, pool: SharedPool, handler: UpstreamHandler) -> None:
        self.pool = pool
        self.handler = handler
        self.child: _Child | None = None
        self.ready = False  # its initialize was answered
        self.caps: frozenset[str] = frozenset()
        self.level: str | None = None
        # Allocated on first use: most sessions never hold a server request or a subscription.
        self._local: dict[RequestId, int] = {}  # the session's id -> pool id, while in flight
        self._server: set[str] | None = None  # id keys of the child's requests given to it
        self._subs: set[str] | None = None  # resource URIs it subscribed to
        self._closed = False
        self._lost = False

    async def start(self) -> None:
        child = self.pool.pick()
        child.reserved += 1
        try:
            await child.ensure_running()
        except BaseException:
            child.reserved -= 1
            child.stop_if_idle()
            raise
        child.reserved -= 1
        if self._closed:
            child.stop_if_idle()
            return
        # No await since ensure_running() saw the process up: it is still up.
        self.child = child
        child.sessions.add(self)

    def send(self, data: bytes) -> None:
        child = self.child
        if child is None or child.proc is None:
            return  # lost: on_upstream_lost was (or is being) reported; closed: nobody listens
        try:
            msg = jsonrpc.decode(data)
        except ProtocolError:
            return  # the core only sends what it decoded itself
        kind = jsonrpc.kind_of(msg)
        if kind is Kind.REQUEST:
            child.client_request(self, msg, data)
        elif kind is Kind.NOTIFICATION:
            child.client_notification(self, msg, data)
        else:
            child.client_response(self, msg, data)

    async def aclose(self) -> None:
        """Detach from the child (the child itself goes on for the other sessions)."""
        if self._closed:
            return
        self._closed = True
        child, self.child = self.child, None
        if child is not None:
            child.detach(self)

    # --- toward the session ------------------------------------------------------------

    def deliver(self, data: bytes, related: int | None = None) -> None:
        if not self._closed and not self._lost:
            self.handler.on_upstream_message(data, related)

    def deliver_soon(self, data: bytes) -> None:
        """Answer from the pool itself, after the session's current actions are executed
        (the core is fed one event at a time)."""
        asyncio.get_running_loop().call_soon(self.deliver, data, None)

    def reply_result(self, request_id: RequestId, result: object) -> None:
        self.deliver_soon(jsonrpc.encode(jsonrpc.result_message(request_id, result)))

    def reply_error(self, request_id: RequestId, code: int, message: str) -> None:
        self.deliver_soon(jsonrpc.error_bytes(request_id, code, message))

    def only_request(self) -> int | None:
        """The session's one request in flight, for routing within it (``related``)."""
        if len(self._local) != 1:
            return None
        local = next(iter(self._local))
        return local if isinstance(local, int) else None

    def add_sub(self, uri: str) -> None:
        if self._subs is None:
            self._subs = set()
        self._subs.add(uri)

    def lose(self, reason: str, unsent: list[int]) -> None:
        self.child = None
        self._local = {}
        self._server = self._subs = None
        if self._closed or self._lost:
            return
        self._lost = True
        self.handler.on_upstream_lost(reason, unsent)


class _Child:
    """One child process of the pool and every routing table of the sessions on it."""

    def __init__(self, pool: SharedPool, index: int) -> None:
        self.pool = pool
        self.label = f"shared#{index}"
        self.proc: Upstream | None = None
        self.generation = 0  # bumped whenever the process is replaced or dropped
        self.sessions: set[SharedUpstream] = set()
        self.reserved = 0  # sessions in start(), counted as load and keeping the child up
        self._spawning: asyncio.Task[UpstreamError | None] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._init_timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        """Forget everything about the current process (a new one starts from scratch)."""
        if self._init_timer is not None:
            self._init_timer.cancel()
        self._init_timer = None
        self.init_result: bytes | None = None  # the process's InitializeResult
        self.init_id: int | None = None  # its initialize, while in flight
        self.init_waiters: list[tuple[SharedUpstream, Message]] = []
        self.pending: dict[int, _Pending] = {}
        self.tokens: dict[str, _Pending] = {}
        self.server_requests: dict[str, SharedUpstream] = {}
        self.subs: dict[str, _Sub] = {}
        self.busy: set[SharedUpstream] = set()  # sessions with a request in flight here
        self.in_flight = 0  # requests holding a slot (sent, not yet answered or cancelled)
        self.waiting: deque[int] = deque()  # pool ids of queued requests (and stale ones)
        self.queued = 0  # of which still queued
        self.levels: Counter[str] = Counter()  # sessions per requested log level
        self.level: str | None = None  # the level the process was set to

    @property
    def load(self) -> int:
        return len(self.sessions) + self.reserved

    # --- process lifecycle --------------------------------------------------------------

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
            self._reset()
            self.proc = proc
            self.pool.stats["spawned"] += 1
            return None
        finally:
            self._spawning = None

    def stop_if_idle(self) -> None:
        """A child with no session left is stopped (the next session starts a new one)."""
        if self.sessions or self.reserved or self.proc is None or self._stopping is not None:
            return
        proc, self.proc = self.proc, None  # from now on a session starting waits for the stop
        self.generation += 1
        self._reset()
        log.info("upstream.shared_idle", child=self.label)
        self._stopping = self.pool.tasks.spawn(self._stop(proc), f"stop:{self.label}")

    async def _stop(self, proc: Upstream) -> None:
        try:
            await proc.aclose()
        finally:
            self._stopping = None

    async def shutdown(self) -> None:
        for task in (self._spawning, self._stopping):
            if task is not None:
                await asyncio.shield(task)  # neither raises: a spawn returns its error
        proc, self.proc = self.proc, None
        self.generation += 1
        self._reset()
        self.sessions.clear()
        if proc is not None:
            await proc.aclose()

    def lost(self, reason: str) -> None:
        """The process exited: every session on it is lost too, and recovers on its own."""
        self.proc = None
        self.generation += 1
        sessions = [(up, self._unsent(up)) for up in self.sessions]
        self.sessions.clear()
        self._reset()
        self.pool.stats["lost"] += 1
        log.warning("upstream.shared_lost", child=self.label, sessions=len(sessions), reason=reason)
        for upstream, unsent in sessions:
            upstream.lose(reason, unsent)

    def _unsent(self, up: SharedUpstream) -> list[int]:
        """The session's requests still in the admission queue (the process never saw them)."""
        if not self.queued:
            return []
        unsent = []
        for local, pool_id in up._local.items():
            entry = self.pending.get(pool_id)
            if entry is not None and entry.queued is not None and isinstance(local, int):
                unsent.append(local)
        return unsent

    def _init_timed_out(self) -> None:
        self._init_timer = None
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

    def _send(self, data: bytes) -> None:
        if self.proc is not None:
            self.proc.send(data)

    # --- session -> child ---------------------------------------------------------------

    def client_request(self, up: SharedUpstream, msg: Message, data: bytes) -> None:
        assert isinstance(msg.id, int | str) and isinstance(msg.method, str)
        method = msg.method
        if method == "initialize":
            self._initialize(up, msg)
            return
        if not up.ready:
            # The core holds everything until initialize is answered; defensive only.
            up.reply_error(msg.id, jsonrpc.INTERNAL_ERROR, "shared upstream not initialized")
            return
        if len(up._local) >= MAX_PENDING_PER_SESSION:
            up.reply_error(msg.id, jsonrpc.TOO_MANY_PENDING, "too many requests in flight")
            return
        if method == "logging/setLevel":
            self._set_level(up, msg, data)
        elif method == "resources/subscribe":
            self._subscribe(up, msg, data)
        elif method == "resources/unsubscribe":
            self._unsubscribe(up, msg, data)
        else:
            self._forward(up, msg, data)

    def _forward(
        self, up: SharedUpstream, msg: Message, data: bytes, kind: int = _PLAIN
    ) -> _Pending:
        assert isinstance(msg.id, int | str)
        pool_id = next(self.pool.ids)
        entry = _Pending(up, msg.id, kind)
        if b'"progressToken"' in data:
            msg = self._rewrite_token(msg, entry)
        self.pending[pool_id] = entry
        if not up._local:
            self.busy.add(up)
        up._local[entry.local_id] = pool_id
        line = jsonrpc.encode(msgspec.structs.replace(msg, id=pool_id))
        limit = self.pool.max_in_flight
        if msg.method == "ping":
            # A client's liveness check of the server must not wait behind slow calls (and
            # costs the child nothing): it goes at once, holding no slot.
            self._send(line)
        elif limit and self.in_flight >= limit:
            entry.queued = line
            self.waiting.append(pool_id)
            self.queued += 1
            self.pool.stats["queued"] += 1
        else:
            entry.counted = True
            self.in_flight += 1
            self._send(line)
        return entry

    def _release(self, entry: _Pending) -> None:
        """``entry`` is answered or withdrawn: free its slot, or its place in the queue."""
        if entry.counted:
            entry.counted = False
            self.in_flight -= 1
            if self.queued:
                self._admit()
        elif entry.queued is not None:
            entry.queued = None
            self.queued -= 1
            if len(self.waiting) > 2 * self.queued + 64:  # withdrawn ones pile up otherwise
                self.waiting = deque(i for i in self.waiting if self._is_queued(i))

    def _is_queued(self, pool_id: int) -> bool:
        entry = self.pending.get(pool_id)
        return entry is not None and entry.queued is not None

    def _admit(self) -> None:
        """Send queued requests, oldest first, while slots are free."""
        limit = self.pool.max_in_flight
        while self.waiting and self.in_flight < limit:
            entry = self.pending.get(self.waiting.popleft())
            if entry is None or entry.queued is None:
                continue  # withdrawn while it waited
            line, entry.queued = entry.queued, None
            self.queued -= 1
            entry.counted = True
            self.in_flight += 1
            self._send(line)

    def _rewrite_token(self, msg: Message, entry: _Pending) -> Message:
        """basic/utilities/progress: the token must be unique among the child's requests."""
        params = jsonrpc.raw_object(msg.params)
        meta = None if params is None or "_meta" not in params else params["_meta"]
        fields = None if meta is None else jsonrpc.raw_object(meta)
        if params is None or fields is None or "progressToken" not in fields:
            return msg
        try:
            token = msgspec.json.decode(fields["progressToken"])
        except msgspec.DecodeError:
            return msg
        if isinstance(token, bool) or not isinstance(token, int | str):
            return msg  # not a valid token: passed on as it is, its progress unroutable
        serial = next(self.pool.tokens)
        ours: RequestId = serial if isinstance(token, int) else f"mcproxy.{serial}"
        entry.token = jsonrpc.id_key(ours)
        entry.original_token = token
        self.tokens[entry.token] = entry
        fields["progressToken"] = jsonrpc.raw_value(ours)
        params["_meta"] = jsonrpc.raw_value(fields)
        return msgspec.structs.replace(msg, params=jsonrpc.raw_value(params))

    def _internal(self, method: str, params: dict[str, str]) -> None:
        """A request of the pool's own; its answer is dropped."""
        pool_id = next(self.pool.ids)
        self.pending[pool_id] = _Pending(None, pool_id)
        self._send(jsonrpc.encode(jsonrpc.request_message(pool_id, method, params)))

    def _initialize(self, up: SharedUpstream, msg: Message) -> None:
        assert isinstance(msg.id, int | str)
        up.caps = self.pool.intern(client_capabilities(msg))
        if self.init_result is not None:
            self._answer_initialize(up, msg.id)
        elif self.init_id is not None:
            self.init_waiters.append((up, msg))
        else:
            # The first session on this process: its client's initialize is the child's.
            self.init_id = next(self.pool.ids)
            self.pending[self.init_id] = _Pending(up, msg.id, _INIT)
            self._send(jsonrpc.encode(msgspec.structs.replace(msg, id=self.init_id)))
            self._init_timer = asyncio.get_running_loop().call_later(
                self.pool.init_timeout_s, self._init_timed_out
            )

    def _answer_initialize(self, up: SharedUpstream, request_id: RequestId) -> None:
        assert self.init_result is not None
        up.ready = True
        result = Message(jsonrpc="2.0", id=request_id, result=msgspec.Raw(self.init_result))
        up.deliver_soon(jsonrpc.encode(result))

    def _set_level(self, up: SharedUpstream, msg: Message, data: bytes) -> None:
        assert isinstance(msg.id, int | str)
        level = jsonrpc.level_param(msg)
        if level not in _RANK:
            self._forward(up, msg, data)  # let the child refuse it
            return
        if up.level is not None:
            self.levels[up.level] -= 1
        up.level = level
        self.levels[level] += 1
        effective = self._effective_level()
        if effective != self.level:
            self.level = effective
            if effective == level:
                self._forward(up, msg, data)  # the child's own answer goes to the session
                return
            assert effective is not None
            self._internal("logging/setLevel", {"level": effective})
        up.reply_result(msg.id, {})

    def _effective_level(self) -> str | None:
        for name in LOG_LEVELS:
            if self.levels[name] > 0:
                return name
        return None

    def _subscribe(self, up: SharedUpstream, msg: Message, data: bytes) -> None:
        assert isinstance(msg.id, int | str)
        uri = jsonrpc.uri_param(msg)
        if uri is None:
            self._forward(up, msg, data)
            return
        sub = self.subs.get(uri)
        if sub is None:
            sub = self.subs[uri] = _Sub()
            sub.members.add(up)
            up.add_sub(uri)
            self._forward(up, msg, data, _SUBSCRIBE).uri = uri
            return
        sub.members.add(up)
        up.add_sub(uri)
        if sub.confirmed:
            up.reply_result(msg.id, {})
        else:
            sub.waiters.append((up, msg.id))  # the outcome of the subscribe in flight

    def _unsubscribe(self, up: SharedUpstream, msg: Message, data: bytes) -> None:
        assert isinstance(msg.id, int | str)
        uri = jsonrpc.uri_param(msg)
        sub = None if uri is None else self.subs.get(uri)
        if uri is None or sub is None:
            self._forward(up, msg, data)  # nobody here holds it: the child answers
            return
        if up._subs is not None:
            up._subs.discard(uri)
        sub.members.discard(up)
        if not sub.members and sub.confirmed:
            del self.subs[uri]
            self._forward(up, msg, data)
        else:
            up.reply_result(msg.id, {})  # others still hold it (or its subscribe is in flight)

    def client_notification(self, up: SharedUpstream, msg: Message, data: bytes) -> None:
        method = msg.method
        if method == "notifications/initialized":
            return  # the pool sent the child its own, right after the initialize result
        if method == "notifications/cancelled":
            local = jsonrpc.cancelled_request_id(msg)
            pool_id = None if local is None else up._local.pop(local, None)
            if pool_id is None:
                return
            if not up._local:
                up._local = {}
                self.busy.discard(up)
            entry = self.pending.get(pool_id)
            if entry is not None:
                queued = entry.queued is not None
                if entry.kind != _PLAIN:
                    entry.owner = None  # its outcome still matters to the pool
                else:
                    del self.pending[pool_id]  # a late answer is dropped
                    if entry.token is not None:
                        self.tokens.pop(entry.token, None)
                    self._release(entry)
                if queued:
                    return  # the child has not seen it: nothing to tell it
            self._send(jsonrpc.encode(jsonrpc.with_cancelled_request_id(msg, pool_id)))
            return
        if up.ready:
            self._send(data)  # roots/list_changed, progress of a server request, ...

    def client_response(self, up: SharedUpstream, msg: Message, data: bytes) -> None:
        if not isinstance(msg.id, int | str):
            return
        key = jsonrpc.id_key(msg.id)
        if up._server is None or key not in up._server:
            return  # not a request this session was given: never forwarded
        up._server.discard(key)
        self.server_requests.pop(key, None)
        self._send(data)  # it carries the child's own id already

    # --- child -> sessions --------------------------------------------------------------

    def from_child(self, line: bytes) -> None:
        try:
            msg = jsonrpc.decode(line)
        except ProtocolError as exc:
            self.pool.stats["junk"] += 1
            log.warning(
                "upstream.junk",
                child=self.label,
                error=str(exc),
                line=line[:200].decode("utf-8", "replace"),
            )
            return
        kind = jsonrpc.kind_of(msg)
        if kind is Kind.RESPONSE:
            self._response(msg)
        elif kind is Kind.REQUEST:
            self._server_request(msg, line)
        else:
            self._notification(msg, line)

    def _response(self, msg: Message) -> None:
        pool_id = msg.id
        if not isinstance(pool_id, int) or isinstance(pool_id, bool):
            self.pool.stats["unknown_response"] += 1
            return
        entry = self.pending.pop(pool_id, None)
        if entry is None:
            self.pool.stats["late_response"] += 1  # cancelled, or its session left
            return
        if entry.queued is not None:  # an answer to a request it was never sent
            self.pending[pool_id] = entry
            self.pool.stats["unknown_response"] += 1
            return
        self._release(entry)
        if entry.token is not None:
            self.tokens.pop(entry.token, None)
        owner = entry.owner
        if owner is not None:
            owner._local.pop(entry.local_id, None)
            if not owner._local:
                owner._local = {}  # an empty dict without the table the entries needed
                self.busy.discard(owner)
        ok = msg.error is NO_RAW
        if entry.kind == _INIT:
            self._initialized(msg, entry, ok)
            return
        if entry.kind == _SUBSCRIBE:
            self._subscribed(msg, entry, ok)
        if owner is not None:
            local = entry.local_id
            related = local if isinstance(local, int) else None
            owner.deliver(jsonrpc.encode(msgspec.structs.replace(msg, id=local)), related)

    def _initialized(self, msg: Message, entry: _Pending, ok: bool) -> None:
        self.init_id = None
        if self._init_timer is not None:
            self._init_timer.cancel()
            self._init_timer = None
        owner = entry.owner
        if owner is not None:
            owner.ready = ok
            owner.deliver(jsonrpc.encode(msgspec.structs.replace(msg, id=entry.local_id)))
        if ok:
            self.init_result = bytes(msg.result)
            self._send(_INITIALIZED)
            waiters, self.init_waiters = self.init_waiters, []
            for up, request in waiters:
                assert isinstance(request.id, int | str)
                self._answer_initialize(up, request.id)
        elif self.init_waiters:
            # That client's initialize was refused; the next one's is tried on its own merits.
            up, request = self.init_waiters.pop(0)
            self._initialize(up, request)

    def _subscribed(self, msg: Message, entry: _Pending, ok: bool) -> None:
        uri = entry.uri
        sub = None if uri is None else self.subs.get(uri)
        if uri is None or sub is None:
            return
        waiters, sub.waiters = sub.waiters, []
        if ok:
            sub.confirmed = True
            for up, request_id in waiters:
                up.reply_result(request_id, {})
            if not sub.members:  # everyone left while it was in flight
                del self.subs[uri]
                self._internal("resources/unsubscribe", {"uri": uri})
            return
        del self.subs[uri]
        for up in sub.members:
            if up._subs is not None:
                up._subs.discard(uri)
        for up, request_id in waiters:
            up.deliver_soon(jsonrpc.encode(msgspec.structs.replace(msg, id=request_id)))

    def _attribute(self) -> SharedUpstream | None:
        """The one session a message without an id of ours can only be for, if any: the only
        session on this child, or the only one with a request in flight on it."""
        if len(self.sessions) == 1:
            return next(iter(self.sessions))
        if len(self.busy) == 1:
            return next(iter(self.busy))
        return None

    def _server_request(self, msg: Message, line: bytes) -> None:
        assert isinstance(msg.id, int | str) and isinstance(msg.method, str)
        if msg.method == "ping":  # basic/utilities/ping: the pool is this child's client
            self._send(jsonrpc.encode(jsonrpc.result_message(msg.id, {})))
            return
        target = self._attribute()
        need = REQUIRED_CAPABILITY.get(msg.method)
        if target is None:
            self.pool.stats["unattributed_request"] += 1
            log.warning(
                "upstream.shared_unattributed",
                child=self.label,
                method=msg.method,
                sessions=len(self.sessions),
                busy=len(self.busy),
            )
            self._refuse(msg.id, jsonrpc.INTERNAL_ERROR, CANNOT_ATTRIBUTE)
            return
        if need is not None and need not in target.caps:
            self.pool.stats["capability_missing"] += 1
            self._refuse(
                msg.id,
                jsonrpc.METHOD_NOT_FOUND,
                f"the client of this request did not declare the {need!r} capability",
            )
            return
        if target._server is None:
            target._server = set()
        if len(target._server) >= MAX_SERVER_REQUESTS_PER_SESSION:
            self._refuse(msg.id, jsonrpc.INTERNAL_ERROR, "too many server requests pending")
            return
        key = jsonrpc.id_key(msg.id)
        self.server_requests[key] = target
        target._server.add(key)
        target.deliver(line, target.only_request())

    def _refuse(self, request_id: RequestId, code: int, message: str) -> None:
        self._send(jsonrpc.error_bytes(request_id, code, message))

    def _notification(self, msg: Message, line: bytes) -> None:
        method = msg.method
        if method == "notifications/progress":
            self._progress(msg)
        elif method == "notifications/cancelled":
            request_id = jsonrpc.cancelled_request_id(msg)
            key = None if request_id is None else jsonrpc.id_key(request_id)
            target = None if key is None else self.server_requests.pop(key, None)
            if target is not None and target._server is not None and key is not None:
                target._server.discard(key)
                target.deliver(line)
        elif method in FAN_OUT:
            for up in list(self.sessions):
                if up.ready:
                    up.deliver(line)
        elif method == "notifications/resources/updated":
            uri = jsonrpc.uri_param(msg)
            sub = None if uri is None else self.subs.get(uri)
            for up in list(sub.members) if sub is not None else []:
                up.deliver(line)
        else:
            target = self._attribute()
            if target is None or not target.ready:
                self.pool.stats["unattributed_notification"] += 1
                return
            if method == "notifications/message" and target.level is not None:
                level = _message_level(msg)
                if level in _RANK and _RANK[level] < _RANK[target.level]:
                    return  # more verbose than this session asked for (another one did)
            target.deliver(line, target.only_request())

    def _progress(self, msg: Message) -> None:
        params = jsonrpc.raw_object(msg.params)
        raw = None if params is None else params.get("progressToken")
        entry = None
        if params is not None and raw is not None:
            with contextlib.suppress(msgspec.DecodeError):
                token = msgspec.json.decode(raw)
                if isinstance(token, int | str) and not isinstance(token, bool):
                    entry = self.tokens.get(jsonrpc.id_key(token))
        if entry is None or entry.owner is None or params is None:
            self.pool.stats["unrouted_progress"] += 1  # after its request ended, or unknown
            return
        params["progressToken"] = jsonrpc.raw_value(entry.original_token)
        out = msgspec.structs.replace(msg, params=jsonrpc.raw_value(params))
        local = entry.local_id
        entry.owner.deliver(jsonrpc.encode(out), local if isinstance(local, int) else None)

    # --- a session leaves ---------------------------------------------------------------

    def detach(self, up: SharedUpstream) -> None:
        """``up`` closed (parked, deleted, shut down): drop everything it had here."""
        self.sessions.discard(up)
        self.busy.discard(up)
        entries: list[tuple[int, _Pending]] = []
        for pool_id in up._local.values():
            entry = self.pending.get(pool_id)
            if entry is not None:
                entries.append((pool_id, entry))
        # Queued ones first, so that freeing the slots of the others admits none of them.
        entries.sort(key=lambda item: item[1].queued is None)
        for pool_id, entry in entries:
            if entry.kind != _PLAIN:
                entry.owner = None  # others wait on its outcome
                continue
            del self.pending[pool_id]
            if entry.token is not None:
                self.tokens.pop(entry.token, None)
            sent = entry.queued is None
            self._release(entry)
            if sent:
                note = jsonrpc.notification_message(
                    "notifications/cancelled", {"requestId": pool_id, "reason": "session closed"}
                )
                self._send(jsonrpc.encode(note))
        up._local = {}
        self.init_waiters = [(w, m) for w, m in self.init_waiters if w is not up]
        for key in up._server or ():
            self.server_requests.pop(key, None)
            self._refuse(jsonrpc.id_from_key(key), jsonrpc.INTERNAL_ERROR, "client session closed")
        up._server = None
        for uri in up._subs or ():
            sub = self.subs.get(uri)
            if sub is None:
                continue
            sub.members.discard(up)
            sub.waiters = [(w, i) for w, i in sub.waiters if w is not up]
            if not sub.members and sub.confirmed:
                del self.subs[uri]
                self._internal("resources/unsubscribe", {"uri": uri})
        up._subs = None
        if up.level is not None:
            self.levels[up.level] -= 1
            effective = self._effective_level()
            if effective is not None and effective != self.level:
                self.level = effective
                self._internal("logging/setLevel", {"level": effective})
        self.stop_if_idle()


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
        if size < 1:
            raise ValueError("a shared pool needs at least one child")
        if max_in_flight < 0:
            raise ValueError("max_in_flight must be 0 (no limit) or more")
        self.spawn = spawn
        self.init_timeout_s = init_timeout_s
        self.max_in_flight = max_in_flight
        self.children = [_Child(self, index) for index in range(size)]
        self.ids = itertools.count(1)  # request ids toward the children: never reused
        self.tokens = itertools.count(1)  # progress tokens toward the children
        self.tasks = TaskSet("shared-pool")
        self.stats: Counter[str] = Counter()
        self.closed = False
        self._caps: dict[frozenset[str], frozenset[str]] = {}

    def __call__(self, session_id: str, handler: UpstreamHandler) -> SharedUpstream:
        return SharedUpstream(self, handler)

    def snapshot(self) -> PoolState:
        children = self.children
        return PoolState(
            children=sum(1 for child in children if child.proc is not None),
            in_flight=sum(child.in_flight for child in children),
            queued=sum(child.queued for child in children),
            events=dict(self.stats),
        )

    def intern(self, caps: frozenset[str]) -> frozenset[str]:
        """One shared copy of each distinct capability set (clients mostly send the same)."""
        if len(self._caps) >= _MAX_INTERNED and caps not in self._caps:
            return caps  # bounded: odd clients must not grow it
        return self._caps.setdefault(caps, caps)

    def pick(self) -> _Child:
        """The least-loaded child (sessions on it, and sessions starting on it)."""
        return min(self.children, key=lambda child: child.load)

    async def aclose(self) -> None:
        """Stop every child (bounded by the stop ladder); sessions are not told."""
        self.closed = True
        await asyncio.gather(*(child.shutdown() for child in self.children))
        await self.tasks.cancel_all()
