"""The shared pool's router, sans-I/O: every table of every child, fed events, returning actions.

``upstreams.shared`` owns the processes, the timers and the per-session ``SharedUpstream``
objects; everything that decides where a byte goes lives here, under the purity rule of the
core (no event loop, no clock, no logging: tests/unit/test_layers.py checks it), so it is
tested without processes or an event loop (tests/unit/test_shared_router.py). The pool feeds
it what happened and executes what it returns, in order:

========================================  ============================================
event (a method of ``Router``)            actions it may return
========================================  ============================================
``attach(child)`` a session starts on it  ``Write`` (the child's log level, see below)
``from_session(sid, data)``               ``Write``, ``Deliver`` (``soon``), ``StartInitTimer``
``from_child(child, line)``               ``Deliver``, ``Write``, ``CancelInitTimer``, ``Warn``
``detach(sid)`` the session left          ``Write`` (cancellations, refusals), ``Stop``
``lost(child, reason)`` the process died  ``Lose`` for each session on it
``idle(child)`` / ``down(child)``         ``Stop`` / nothing: the tables are forgotten
========================================  ============================================

A child's tables follow its process (``up``); states of one child::

    state   event                      next    effect on the tables
    -----   -------------------------  ------  ------------------------------------------
    DOWN    started(child)             UP      fresh tables (no initialize result yet)
    UP      lost(child)                DOWN    every session is told (Lose), tables reset
    UP      idle(child), no sessions   DOWN    Stop: the pool stops the process
    UP      down(child) (shutdown)     DOWN    sessions forgotten without a word
    DOWN    anything from the child    DOWN    ignored (the pool drops a replaced process's
                                               lines before they get here)

A request a session sends, by pool id (``_Pending``)::

    state     event                          next      effect
    --------  -----------------------------  --------  ----------------------------------
    (new)     slot free, or ``ping``         SENT      Write; holds a slot unless ping
    (new)     every slot taken               QUEUED    waits in ``waiting`` (FIFO)
    QUEUED    a slot frees                   SENT      Write
    QUEUED    cancelled / session leaves     (gone)    nothing: the child never saw it
    QUEUED    the child dies                 (gone)    reported ``unsent`` in Lose
    SENT      answered                       (gone)    Deliver to its session; slot freed
    SENT      cancelled / session leaves     (gone)    Write notifications/cancelled;
                                                       a late answer is counted, dropped
    SENT      the child dies                 (gone)    the core re-issues or fails it

Session ids (``sid``) are the pool's handles for its ``SharedUpstream`` objects; a session's
own request ids are ``local`` ids, the child sees only pool ids.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Final

import msgspec

from mcproxy.core import jsonrpc
from mcproxy.core.jsonrpc import NO_RAW, Kind, Message, RequestId
from mcproxy.errors import ProtocolError

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
# The level a session that never sent logging/setLevel stands for. MCP sets no default level
# (server/utilities/logging: the client *may* set one), and the SDK servers filter nothing
# until a client asks, so "what the server sends by default" is everything it logs: once the
# child has been set to any level, a session that never asked keeps it at the most verbose.
DEFAULT_LOG_LEVEL: Final = "debug"

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


# --- actions ---------------------------------------------------------------------------------
# Plain slotted records, not frozen: one or two are made per message on the hot path, and a
# frozen dataclass's __init__ costs several times more. Nobody mutates them.


@dataclass(slots=True)
class Write:
    """Write ``data`` (one encoded message) to child ``child``'s process."""

    child: int
    data: bytes


@dataclass(slots=True)
class Deliver:
    """Give ``data`` to session ``sid`` (``related``: its request this belongs to). ``soon``:
    an answer of the pool's own to what the session is sending right now; deliver it after
    the session's current event is done (its core is fed one event at a time)."""

    sid: int
    data: bytes
    related: int | None = None
    soon: bool = False


@dataclass(slots=True)
class Lose:
    """Session ``sid`` lost its upstream; ``unsent``: its requests the child never saw."""

    sid: int
    reason: str
    unsent: tuple[int, ...] = ()


@dataclass(slots=True)
class StartInitTimer:
    """Arm the child's ``initialize`` deadline (on expiry: kill it, then ``lost``)."""

    child: int


@dataclass(slots=True)
class CancelInitTimer:
    child: int


@dataclass(slots=True)
class Stop:
    """The child has no session left: stop its process (its tables are already reset)."""

    child: int


@dataclass(slots=True)
class Warn:
    """Something the operator should see in the log (the router logs nothing itself)."""

    event: str
    fields: dict[str, object] = field(default_factory=dict)


Action = Write | Deliver | Lose | StartInitTimer | CancelInitTimer | Stop | Warn


# --- tables ----------------------------------------------------------------------------------


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


class Session:
    """What the router keeps of one session on a child."""

    __slots__ = ("caps", "child", "level", "local", "ready", "server", "sid", "subs")

    def __init__(self, sid: int, child: int) -> None:
        self.sid = sid
        self.child = child
        self.ready = False  # its initialize was answered
        self.caps: frozenset[str] = frozenset()
        self.level: str | None = None  # None: never sent logging/setLevel
        # Allocated on first use: most sessions never hold a server request or a subscription.
        self.local: dict[RequestId, int] = {}  # the session's id -> pool id, while in flight
        self.server: set[str] | None = None  # id keys of the child's requests given to it
        self.subs: set[str] | None = None  # resource URIs it subscribed to

    def only_request(self) -> int | None:
        """The session's one request in flight, for routing within it (``related``)."""
        if len(self.local) != 1:
            return None
        local = next(iter(self.local))
        return local if isinstance(local, int) else None


class _Pending:
    """A request on a child, under its pool-unique id. ``owner`` None: the pool's own, or
    one whose session left (an initialize or subscribe whose outcome others wait for).
    ``queued``: its encoded line while it waits for a slot; ``counted``: it holds a slot."""

    __slots__ = ("counted", "kind", "local_id", "original_token", "owner", "queued", "token", "uri")

    def __init__(self, owner: Session | None, local_id: RequestId, kind: int = _PLAIN) -> None:
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
        self.members: set[Session] = set()
        self.confirmed = False  # the child answered the subscribe
        self.waiters: list[tuple[Session, RequestId]] = []  # answered with its outcome


class Child:
    """The routing tables of one child process (index ``index`` in the pool)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.label = f"shared#{index}"
        self.up = False  # a process is running and these tables describe it
        self.sessions: set[Session] = set()
        self.reserved = 0  # sessions in start(), counted as load and keeping the child up
        self.reset()

    def reset(self) -> None:
        """Forget everything about the current process (a new one starts from scratch)."""
        self.init_result: bytes | None = None  # the process's InitializeResult
        self.init_id: int | None = None  # its initialize, while in flight
        self.init_waiters: list[tuple[Session, Message]] = []
        self.pending: dict[int, _Pending] = {}
        self.tokens: dict[str, _Pending] = {}
        self.server_requests: dict[str, Session] = {}
        self.subs: dict[str, _Sub] = {}
        self.busy: set[Session] = set()  # sessions with a request in flight here
        self.in_flight = 0  # requests holding a slot (sent, not yet answered or cancelled)
        self.waiting: deque[int] = deque()  # pool ids of queued requests (and stale ones)
        self.queued = 0  # of which still queued
        self.levels: Counter[str] = Counter()  # sessions per requested log level
        self.level: str | None = None  # the level the process was set to (None: never)

    @property
    def load(self) -> int:
        return len(self.sessions) + self.reserved


class Router:
    """Every routing table of a pool of ``size`` children. ``max_in_flight``: requests each
    child works on at once (0: no limit); the others wait here."""

    def __init__(self, size: int, max_in_flight: int = 0) -> None:
        if size < 1:
            raise ValueError("a shared pool needs at least one child")
        if max_in_flight < 0:
            raise ValueError("max_in_flight must be 0 (no limit) or more")
        self.max_in_flight = max_in_flight
        self.children = [Child(index) for index in range(size)]
        self.sessions: dict[int, Session] = {}
        self.stats: Counter[str] = Counter()
        self._sids = itertools.count(1)
        self._ids = itertools.count(1)  # request ids toward the children: never reused
        self._tokens = itertools.count(1)  # progress tokens toward the children
        self._caps: dict[frozenset[str], frozenset[str]] = {}
        self._out: list[Action] = []

    def _flush(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def _write(self, child: Child, data: bytes) -> None:
        if child.up:
            self._out.append(Write(child.index, data))

    def _deliver(self, up: Session, data: bytes, related: int | None = None) -> None:
        self._out.append(Deliver(up.sid, data, related))

    def _reply(self, up: Session, data: bytes) -> None:
        self._out.append(Deliver(up.sid, data, None, soon=True))

    def _reply_result(self, up: Session, request_id: RequestId, result: object) -> None:
        self._reply(up, jsonrpc.encode(jsonrpc.result_message(request_id, result)))

    def _reply_error(self, up: Session, request_id: RequestId, code: int, message: str) -> None:
        self._reply(up, jsonrpc.error_bytes(request_id, code, message))

    # --- placement and the process lifecycle --------------------------------------------------

    def pick(self) -> int:
        """The least-loaded child (sessions on it, and sessions starting on it)."""
        return min(self.children, key=lambda child: child.load).index

    def intern(self, caps: frozenset[str]) -> frozenset[str]:
        """One shared copy of each distinct capability set (clients mostly send the same)."""
        if len(self._caps) >= _MAX_INTERNED and caps not in self._caps:
            return caps  # bounded: odd clients must not grow it
        return self._caps.setdefault(caps, caps)

    def started(self, index: int) -> None:
        """A new process of child ``index`` is up: its tables start empty."""
        child = self.children[index]
        child.reset()
        child.up = True
        self.stats["spawned"] += 1

    def reserve(self, index: int) -> None:
        """A session is starting on child ``index``: count it as load, keep the child up."""
        self.children[index].reserved += 1

    def unreserve(self, index: int) -> None:
        self.children[index].reserved -= 1

    def attach(self, index: int) -> tuple[int, list[Action]]:
        """A session joins child ``index`` (which is up); its id and what to do."""
        child = self.children[index]
        assert child.up
        sid = next(self._sids)
        up = Session(sid, index)
        self.sessions[sid] = up
        child.sessions.add(up)
        self._relevel(child)  # a session that never asked wants the default level
        return sid, self._flush()

    def idle(self, index: int) -> list[Action]:
        """Stop child ``index`` if no session is on it or starting on it."""
        child = self.children[index]
        if child.sessions or child.reserved or not child.up:
            return []
        child.up = False
        child.reset()
        return [CancelInitTimer(index), Stop(index)]

    def down(self, index: int) -> None:
        """The pool stopped child ``index`` (shutdown): forget it and its sessions, untold."""
        child = self.children[index]
        for up in child.sessions:
            self.sessions.pop(up.sid, None)
        child.sessions.clear()
        child.up = False
        child.reset()

    def lost(self, index: int, reason: str) -> list[Action]:
        """The process exited: every session on it is lost too, and recovers on its own."""
        child = self.children[index]
        if not child.up:
            return []
        actions: list[Action] = [CancelInitTimer(index)]
        for up in child.sessions:
            actions.append(Lose(up.sid, reason, self._unsent(child, up)))
            self.sessions.pop(up.sid, None)
        child.sessions.clear()
        child.up = False
        child.reset()
        self.stats["lost"] += 1
        return actions

    def _unsent(self, child: Child, up: Session) -> tuple[int, ...]:
        """The session's requests still in the admission queue (the process never saw them)."""
        if not child.queued:
            return ()
        unsent = []
        for local, pool_id in up.local.items():
            entry = child.pending.get(pool_id)
            if entry is not None and entry.queued is not None and isinstance(local, int):
                unsent.append(local)
        return tuple(unsent)

    def in_flight(self) -> int:
        return sum(child.in_flight for child in self.children)

    def queued(self) -> int:
        return sum(child.queued for child in self.children)

    # --- session -> child -------------------------------------------------------------------

    def from_session(self, sid: int, data: bytes) -> list[Action]:
        """Session ``sid`` sends one encoded message toward its child."""
        up = self.sessions.get(sid)
        if up is None or not self.children[up.child].up:
            return []  # lost (Lose was returned) or gone: nobody listens
        try:
            msg = jsonrpc.decode(data)
        except ProtocolError:
            return []  # the core only sends what it decoded itself
        child = self.children[up.child]
        kind = jsonrpc.kind_of(msg)
        if kind is Kind.REQUEST:
            self._client_request(child, up, msg, data)
        elif kind is Kind.NOTIFICATION:
            self._client_notification(child, up, msg, data)
        else:
            self._client_response(child, up, msg, data)
        return self._flush()

    def _client_request(self, child: Child, up: Session, msg: Message, data: bytes) -> None:
        assert isinstance(msg.id, int | str) and isinstance(msg.method, str)
        method = msg.method
        if method == "initialize":
            self._initialize(child, up, msg)
            return
        if not up.ready:
            # The core holds everything until initialize is answered; defensive only.
            self._reply_error(up, msg.id, jsonrpc.INTERNAL_ERROR, "shared upstream not initialized")
            return
        if len(up.local) >= MAX_PENDING_PER_SESSION:
            self._reply_error(up, msg.id, jsonrpc.TOO_MANY_PENDING, "too many requests in flight")
            return
        if method == "logging/setLevel":
            self._set_level(child, up, msg, data)
        elif method == "resources/subscribe":
            self._subscribe(child, up, msg, data)
        elif method == "resources/unsubscribe":
            self._unsubscribe(child, up, msg, data)
        else:
            self._forward(child, up, msg, data)

    def _forward(
        self, child: Child, up: Session, msg: Message, data: bytes, kind: int = _PLAIN
    ) -> _Pending:
        assert isinstance(msg.id, int | str)
        pool_id = next(self._ids)
        entry = _Pending(up, msg.id, kind)
        if b'"progressToken"' in data:
            msg = self._rewrite_token(child, msg, entry)
        child.pending[pool_id] = entry
        if not up.local:
            child.busy.add(up)
        up.local[entry.local_id] = pool_id
        line = jsonrpc.encode(msgspec.structs.replace(msg, id=pool_id))
        limit = self.max_in_flight
        if msg.method == "ping":
            # A client's liveness check of the server must not wait behind slow calls (and
            # costs the child nothing): it goes at once, holding no slot.
            self._write(child, line)
        elif limit and child.in_flight >= limit:
            entry.queued = line
            child.waiting.append(pool_id)
            child.queued += 1
            self.stats["queued"] += 1
        else:
            entry.counted = True
            child.in_flight += 1
            self._write(child, line)
        return entry

    def _release(self, child: Child, entry: _Pending) -> None:
        """``entry`` is answered or withdrawn: free its slot, or its place in the queue."""
        if entry.counted:
            entry.counted = False
            child.in_flight -= 1
            if child.queued:
                self._admit(child)
        elif entry.queued is not None:
            entry.queued = None
            child.queued -= 1
            if len(child.waiting) > 2 * child.queued + 64:  # withdrawn ones pile up otherwise
                pending = child.pending
                child.waiting = deque(
                    i for i in child.waiting if i in pending and pending[i].queued is not None
                )

    def _admit(self, child: Child) -> None:
        """Send queued requests, oldest first, while slots are free."""
        limit = self.max_in_flight
        while child.waiting and (not limit or child.in_flight < limit):
            entry = child.pending.get(child.waiting.popleft())
            if entry is None or entry.queued is None:
                continue  # withdrawn while it waited
            line, entry.queued = entry.queued, None
            child.queued -= 1
            entry.counted = True
            child.in_flight += 1
            self._write(child, line)

    def _rewrite_token(self, child: Child, msg: Message, entry: _Pending) -> Message:
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
        serial = next(self._tokens)
        ours: RequestId = serial if isinstance(token, int) else f"mcproxy.{serial}"
        entry.token = jsonrpc.id_key(ours)
        entry.original_token = token
        child.tokens[entry.token] = entry
        fields["progressToken"] = jsonrpc.raw_value(ours)
        params["_meta"] = jsonrpc.raw_value(fields)
        return msgspec.structs.replace(msg, params=jsonrpc.raw_value(params))

    def _internal(self, child: Child, method: str, params: dict[str, str]) -> None:
        """A request of the pool's own; its answer is dropped."""
        pool_id = next(self._ids)
        child.pending[pool_id] = _Pending(None, pool_id)
        self._write(child, jsonrpc.encode(jsonrpc.request_message(pool_id, method, params)))

    def _initialize(self, child: Child, up: Session, msg: Message) -> None:
        assert isinstance(msg.id, int | str)
        up.caps = self.intern(client_capabilities(msg))
        if child.init_result is not None:
            self._answer_initialize(up, msg.id, child.init_result)
        elif child.init_id is not None:
            child.init_waiters.append((up, msg))
        else:
            # The first session on this process: its client's initialize is the child's.
            child.init_id = next(self._ids)
            child.pending[child.init_id] = _Pending(up, msg.id, _INIT)
            self._write(child, jsonrpc.encode(msgspec.structs.replace(msg, id=child.init_id)))
            self._out.append(StartInitTimer(child.index))

    def _answer_initialize(self, up: Session, request_id: RequestId, result: bytes) -> None:
        up.ready = True
        answer = Message(jsonrpc="2.0", id=request_id, result=msgspec.Raw(result))
        self._reply(up, jsonrpc.encode(answer))

    # Logging level (server/utilities/logging). The child has one level for every session on
    # it, so the pool keeps each session's and sets the child to the most verbose needed:
    #
    #   sessions on the child                        the child's level
    #   -------------------------------------------  ------------------------------------
    #   none asked                                   never set (the server's own default)
    #   some asked, every one of them asked          the most verbose asked
    #   some asked, some never did                   DEFAULT_LOG_LEVEL (what they'd get)
    #
    # and each session receives notifications/message at or above its own level (all of them
    # if it never asked). So one session's "emergency" never silences another session.

    def _wanted_level(self, child: Child) -> str | None:
        if not child.levels.total() and child.level is None:
            return None  # nobody ever asked: leave the server at its default
        if len(child.sessions) > child.levels.total():
            return DEFAULT_LOG_LEVEL  # a session that never asked
        for name in LOG_LEVELS:
            if child.levels[name] > 0:
                return name
        return None  # nobody left: nothing to change

    def _relevel(self, child: Child) -> None:
        """Set the child to the level its sessions need, if that changed (and it is set up)."""
        wanted = self._wanted_level(child)
        if wanted is not None and wanted != child.level and child.init_result is not None:
            child.level = wanted
            self._internal(child, "logging/setLevel", {"level": wanted})

    def _set_level(self, child: Child, up: Session, msg: Message, data: bytes) -> None:
        assert isinstance(msg.id, int | str)
        level = jsonrpc.level_param(msg)
        if level not in _RANK:
            self._forward(child, up, msg, data)  # let the child refuse it
            return
        if up.level is not None:
            child.levels[up.level] -= 1
        up.level = level
        child.levels[level] += 1
        wanted = self._wanted_level(child)
        if wanted is not None and wanted != child.level:
            child.level = wanted
            if wanted == level:
                self._forward(child, up, msg, data)  # the child's own answer goes to it
                return
            self._internal(child, "logging/setLevel", {"level": wanted})
        self._reply_result(up, msg.id, {})

    def _subscribe(self, child: Child, up: Session, msg: Message, data: bytes) -> None:
        assert isinstance(msg.id, int | str)
        uri = jsonrpc.uri_param(msg)
        if uri is None:
            self._forward(child, up, msg, data)
            return
        if up.subs is None:
            up.subs = set()
        sub = child.subs.get(uri)
        if sub is None:
            sub = child.subs[uri] = _Sub()
            sub.members.add(up)
            up.subs.add(uri)
            self._forward(child, up, msg, data, _SUBSCRIBE).uri = uri
            return
        sub.members.add(up)
        up.subs.add(uri)
        if sub.confirmed:
            self._reply_result(up, msg.id, {})
        else:
            sub.waiters.append((up, msg.id))  # the outcome of the subscribe in flight

    def _unsubscribe(self, child: Child, up: Session, msg: Message, data: bytes) -> None:
        assert isinstance(msg.id, int | str)
        uri = jsonrpc.uri_param(msg)
        sub = None if uri is None else child.subs.get(uri)
        if uri is None or sub is None:
            self._forward(child, up, msg, data)  # nobody here holds it: the child answers
            return
        if up.subs is not None:
            up.subs.discard(uri)
        sub.members.discard(up)
        if not sub.members and sub.confirmed:
            del child.subs[uri]
            self._forward(child, up, msg, data)
        else:
            self._reply_result(up, msg.id, {})  # others still hold it (or it is in flight)

    def _client_notification(self, child: Child, up: Session, msg: Message, data: bytes) -> None:
        method = msg.method
        if method == "notifications/initialized":
            return  # the pool sent the child its own, right after the initialize result
        if method == "notifications/cancelled":
            local = jsonrpc.cancelled_request_id(msg)
            pool_id = None if local is None else up.local.pop(local, None)
            if pool_id is None:
                return
            if not up.local:
                up.local = {}
                child.busy.discard(up)
            entry = child.pending.get(pool_id)
            if entry is not None:
                queued = entry.queued is not None
                if entry.kind != _PLAIN:
                    entry.owner = None  # its outcome still matters to the pool
                else:
                    del child.pending[pool_id]  # a late answer is dropped
                    if entry.token is not None:
                        child.tokens.pop(entry.token, None)
                    self._release(child, entry)
                if queued:
                    return  # the child has not seen it: nothing to tell it
            self._write(child, jsonrpc.encode(jsonrpc.with_cancelled_request_id(msg, pool_id)))
            return
        if up.ready:
            self._write(child, data)  # roots/list_changed, progress of a server request, ...

    def _client_response(self, child: Child, up: Session, msg: Message, data: bytes) -> None:
        if not isinstance(msg.id, int | str):
            return
        key = jsonrpc.id_key(msg.id)
        if up.server is None or key not in up.server:
            return  # not a request this session was given: never forwarded
        up.server.discard(key)
        child.server_requests.pop(key, None)
        self._write(child, data)  # it carries the child's own id already

    # --- child -> sessions ------------------------------------------------------------------

    def from_child(self, index: int, line: bytes) -> list[Action]:
        """Child ``index``'s process wrote one line."""
        child = self.children[index]
        if not child.up:
            return []
        try:
            msg = jsonrpc.decode(line)
        except ProtocolError as exc:
            self.stats["junk"] += 1
            text = line[:200].decode("utf-8", "replace")
            return [Warn("upstream.junk", {"child": child.label, "error": str(exc), "line": text})]
        kind = jsonrpc.kind_of(msg)
        if kind is Kind.RESPONSE:
            self._response(child, msg)
        elif kind is Kind.REQUEST:
            self._server_request(child, msg, line)
        else:
            self._notification(child, msg, line)
        return self._flush()

    def _response(self, child: Child, msg: Message) -> None:
        pool_id = msg.id
        if not isinstance(pool_id, int) or isinstance(pool_id, bool):
            self.stats["unknown_response"] += 1
            return
        entry = child.pending.pop(pool_id, None)
        if entry is None:
            self.stats["late_response"] += 1  # cancelled, or its session left
            return
        if entry.queued is not None:  # an answer to a request it was never sent
            child.pending[pool_id] = entry
            self.stats["unknown_response"] += 1
            return
        self._release(child, entry)
        if entry.token is not None:
            child.tokens.pop(entry.token, None)
        owner = entry.owner
        if owner is not None:
            owner.local.pop(entry.local_id, None)
            if not owner.local:
                owner.local = {}  # an empty dict without the table the entries needed
                child.busy.discard(owner)
        ok = msg.error is NO_RAW
        if entry.kind == _INIT:
            self._initialized(child, msg, entry, ok)
            return
        if entry.kind == _SUBSCRIBE:
            self._subscribed(child, msg, entry, ok)
        if owner is not None:
            local = entry.local_id
            related = local if isinstance(local, int) else None
            self._deliver(owner, jsonrpc.encode(msgspec.structs.replace(msg, id=local)), related)

    def _initialized(self, child: Child, msg: Message, entry: _Pending, ok: bool) -> None:
        child.init_id = None
        self._out.append(CancelInitTimer(child.index))
        owner = entry.owner
        if owner is not None:
            owner.ready = ok
            self._deliver(owner, jsonrpc.encode(msgspec.structs.replace(msg, id=entry.local_id)))
        if ok:
            child.init_result = result = bytes(msg.result)
            self._write(child, _INITIALIZED)
            waiters, child.init_waiters = child.init_waiters, []
            for up, request in waiters:
                assert isinstance(request.id, int | str)
                self._answer_initialize(up, request.id, result)
        elif child.init_waiters:
            # That client's initialize was refused; the next one's is tried on its own merits.
            up, request = child.init_waiters.pop(0)
            self._initialize(child, up, request)

    def _subscribed(self, child: Child, msg: Message, entry: _Pending, ok: bool) -> None:
        uri = entry.uri
        sub = None if uri is None else child.subs.get(uri)
        if uri is None or sub is None:
            return
        waiters, sub.waiters = sub.waiters, []
        if ok:
            sub.confirmed = True
            for up, request_id in waiters:
                self._reply_result(up, request_id, {})
            if not sub.members:  # everyone left while it was in flight
                del child.subs[uri]
                self._internal(child, "resources/unsubscribe", {"uri": uri})
            return
        del child.subs[uri]
        for up in sub.members:
            if up.subs is not None:
                up.subs.discard(uri)
        for up, request_id in waiters:
            self._reply(up, jsonrpc.encode(msgspec.structs.replace(msg, id=request_id)))

    @staticmethod
    def _attribute(child: Child) -> Session | None:
        """The one session a message without an id of ours can only be for, if any: the only
        session on this child, or the only one with a request in flight on it."""
        if len(child.sessions) == 1:
            return next(iter(child.sessions))
        if len(child.busy) == 1:
            return next(iter(child.busy))
        return None

    def _server_request(self, child: Child, msg: Message, line: bytes) -> None:
        assert isinstance(msg.id, int | str) and isinstance(msg.method, str)
        if msg.method == "ping":  # basic/utilities/ping: the pool is this child's client
            self._write(child, jsonrpc.encode(jsonrpc.result_message(msg.id, {})))
            return
        target = self._attribute(child)
        need = REQUIRED_CAPABILITY.get(msg.method)
        if target is None:
            self.stats["unattributed_request"] += 1
            fields: dict[str, object] = {"child": child.label, "method": msg.method}
            fields.update(sessions=len(child.sessions), busy=len(child.busy))
            self._out.append(Warn("upstream.shared_unattributed", fields))
            self._refuse(child, msg.id, jsonrpc.INTERNAL_ERROR, CANNOT_ATTRIBUTE)
            return
        if need is not None and need not in target.caps:
            self.stats["capability_missing"] += 1
            self._refuse(
                child,
                msg.id,
                jsonrpc.METHOD_NOT_FOUND,
                f"the client of this request did not declare the {need!r} capability",
            )
            return
        if target.server is None:
            target.server = set()
        if len(target.server) >= MAX_SERVER_REQUESTS_PER_SESSION:
            self._refuse(child, msg.id, jsonrpc.INTERNAL_ERROR, "too many server requests pending")
            return
        key = jsonrpc.id_key(msg.id)
        child.server_requests[key] = target
        target.server.add(key)
        self._deliver(target, line, target.only_request())

    def _refuse(self, child: Child, request_id: RequestId, code: int, message: str) -> None:
        self._write(child, jsonrpc.error_bytes(request_id, code, message))

    def _notification(self, child: Child, msg: Message, line: bytes) -> None:
        method = msg.method
        if method == "notifications/progress":
            self._progress(child, msg)
        elif method == "notifications/cancelled":
            request_id = jsonrpc.cancelled_request_id(msg)
            key = None if request_id is None else jsonrpc.id_key(request_id)
            target = None if key is None else child.server_requests.pop(key, None)
            if target is not None and target.server is not None and key is not None:
                target.server.discard(key)
                self._deliver(target, line)
        elif method in FAN_OUT:
            for up in child.sessions:
                if up.ready:
                    self._deliver(up, line)
        elif method == "notifications/resources/updated":
            uri = jsonrpc.uri_param(msg)
            sub = None if uri is None else child.subs.get(uri)
            for up in sub.members if sub is not None else ():
                self._deliver(up, line)
        else:
            target = self._attribute(child)
            if target is None or not target.ready:
                self.stats["unattributed_notification"] += 1
                return
            if method == "notifications/message" and target.level is not None:
                level = _message_level(msg)
                if level in _RANK and _RANK[level] < _RANK[target.level]:
                    return  # more verbose than this session asked for (another one did)
            self._deliver(target, line, target.only_request())

    def _progress(self, child: Child, msg: Message) -> None:
        params = jsonrpc.raw_object(msg.params)
        raw = None if params is None else params.get("progressToken")
        entry = None
        if params is not None and raw is not None:
            with contextlib.suppress(msgspec.DecodeError):
                token = msgspec.json.decode(raw)
                if isinstance(token, int | str) and not isinstance(token, bool):
                    entry = child.tokens.get(jsonrpc.id_key(token))
        if entry is None or entry.owner is None or params is None:
            self.stats["unrouted_progress"] += 1  # after its request ended, or unknown
            return
        params["progressToken"] = jsonrpc.raw_value(entry.original_token)
        out = msgspec.structs.replace(msg, params=jsonrpc.raw_value(params))
        local = entry.local_id
        self._deliver(entry.owner, jsonrpc.encode(out), local if isinstance(local, int) else None)

    # --- a session leaves -------------------------------------------------------------------

    def detach(self, sid: int) -> list[Action]:
        """Session ``sid`` closed (parked, deleted, shut down): drop everything it had."""
        up = self.sessions.pop(sid, None)
        if up is None:
            return []  # lost, or forgotten at shutdown
        child = self.children[up.child]
        child.sessions.discard(up)
        child.busy.discard(up)
        entries: list[tuple[int, _Pending]] = []
        for pool_id in up.local.values():
            entry = child.pending.get(pool_id)
            if entry is not None:
                entries.append((pool_id, entry))
        # Queued ones first, so that freeing the slots of the others admits none of them.
        entries.sort(key=lambda item: item[1].queued is None)
        for pool_id, entry in entries:
            if entry.kind != _PLAIN:
                entry.owner = None  # others wait on its outcome
                continue
            del child.pending[pool_id]
            if entry.token is not None:
                child.tokens.pop(entry.token, None)
            sent = entry.queued is None
            self._release(child, entry)
            if sent:
                note = jsonrpc.notification_message(
                    "notifications/cancelled", {"requestId": pool_id, "reason": "session closed"}
                )
                self._write(child, jsonrpc.encode(note))
        up.local = {}
        init = None if child.init_id is None else child.pending.get(child.init_id)
        if init is not None and init.owner is up:
            init.owner = None  # its outcome is the others' (init_waiters), not its own
        child.init_waiters = [(w, m) for w, m in child.init_waiters if w is not up]
        for key in up.server or ():
            child.server_requests.pop(key, None)
            request_id = jsonrpc.id_from_key(key)
            self._refuse(child, request_id, jsonrpc.INTERNAL_ERROR, "client session closed")
        up.server = None
        for uri in up.subs or ():
            sub = child.subs.get(uri)
            if sub is None:
                continue
            sub.members.discard(up)
            sub.waiters = [(w, i) for w, i in sub.waiters if w is not up]
            if not sub.members and sub.confirmed:
                del child.subs[uri]
                self._internal(child, "resources/unsubscribe", {"uri": uri})
        up.subs = None
        if up.level is not None:
            child.levels[up.level] -= 1
        if child.sessions:
            self._relevel(child)
        out = self._flush()
        out.extend(self.idle(child.index))
        return out

    # --- reload in place: the tables as plain data ------------------------------------------
    # docs/ARCHITECTURE.md *Reload in place*: the pool's children outlive the program, and what
    # they answer after the exec is routed by these tables, so they cross it in the handover
    # record. Only what cannot be derived is written (``busy``, ``tokens``, ``server_requests``,
    # ``levels``, the counts and the session sets are rebuilt), and ``restore`` checks that
    # every reference holds before it takes anything: a snapshot that does not describe a
    # consistent pool is refused whole (ValueError), never half-applied, never guessed from.

    def snapshot(self) -> bytes:
        """Every table of the pool, encoded (``restore`` reads it in the next program).
        Sessions still starting (``reserve``) are not in it: they start anew there."""
        return _SNAPSHOT_ENCODER.encode(
            RouterSnapshot(
                SNAPSHOT_VERSION,
                next_sid=_peek(self, "_sids"),
                next_id=_peek(self, "_ids"),
                next_token=_peek(self, "_tokens"),
                stats=dict(self.stats),
                children=[_child_record(child) for child in self.children if child.up],
                sessions=[_session_record(up) for up in self.sessions.values()],
            )
        )

    def restore(self, data: bytes) -> list[Action]:
        """Take the tables of ``snapshot`` over (this router is new: no child up, no session).
        Its children come back up as they were (initialized, in flight, subscribed); returned:
        the queued requests this router's ``max_in_flight`` (a reload may have raised it)
        admits now, to write once the children are there.

        Raises:
            ValueError: not a snapshot of this version, or one that does not hold together
                (the router is left as it was).
        """
        if any(child.up or child.sessions for child in self.children) or self.sessions:
            raise ValueError("restore needs a new router")
        try:
            snap = _SNAPSHOT_DECODER.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ValueError(f"router snapshot: {exc}") from exc
        if snap.version != SNAPSHOT_VERSION:
            raise ValueError(
                f"router snapshot version {snap.version}, this program reads {SNAPSHOT_VERSION}"
            )
        children = [Child(index) for index in range(len(self.children))]
        sessions: dict[int, Session] = {}
        try:
            self._rebuild(snap, children, sessions)
        except (KeyError, IndexError, ProtocolError) as exc:
            raise ValueError(f"router snapshot does not hold together: {exc!r}") from exc
        self.children = children
        self.sessions = sessions
        self.stats.update(snap.stats)
        self._sids = itertools.count(snap.next_sid)
        self._ids = itertools.count(snap.next_id)
        self._tokens = itertools.count(snap.next_token)
        for child in children:
            if child.queued:
                self._admit(child)
        return self._flush()

    def _rebuild(
        self, snap: RouterSnapshot, children: list[Child], sessions: dict[int, Session]
    ) -> None:
        """Build the tables of ``snap`` into ``children`` and ``sessions``; any broken
        reference raises (KeyError, IndexError, ValueError)."""
        for record in snap.children:
            _check(0 <= record.index < len(children), f"child {record.index}")
            child = children[record.index]
            _check(not child.up, f"child {record.index} twice")
            child.up = True
            child.init_result = record.init_result
            _check(record.level is None or record.level in _RANK, f"log level {record.level!r}")
            child.level = record.level
        for srec in snap.sessions:
            _check(0 < srec.sid < snap.next_sid and srec.sid not in sessions, f"sid {srec.sid}")
            child = children[srec.child]
            _check(child.up, f"session {srec.sid} on a child that is down")
            up = Session(srec.sid, srec.child)
            up.ready = srec.ready
            up.caps = self.intern(frozenset(srec.caps))
            _check(srec.level is None or srec.level in _RANK, f"log level {srec.level!r}")
            up.level = srec.level
            up.local = dict(srec.local)
            up.server = None if srec.server is None else set(srec.server)
            up.subs = None if srec.subs is None else set(srec.subs)
            sessions[up.sid] = up
            child.sessions.add(up)
            if up.level is not None:
                child.levels[up.level] += 1
            for key in up.server or ():
                _check(key not in child.server_requests, f"server request {key} twice")
                child.server_requests[key] = up
        for record in snap.children:
            child = children[record.index]
            self._rebuild_child(snap, record, child, sessions)
        for up in sessions.values():
            child = children[up.child]
            for local, pool_id in up.local.items():
                entry = child.pending[pool_id]
                _check(entry.owner is up and entry.local_id == local, f"request {pool_id}")
            if up.local:
                child.busy.add(up)
            for uri in up.subs or ():
                _check(up in child.subs[uri].members, f"subscription {uri}")

    @staticmethod
    def _rebuild_child(
        snap: RouterSnapshot, record: ChildRecord, child: Child, sessions: dict[int, Session]
    ) -> None:
        def member(sid: int) -> Session:
            up = sessions[sid]
            _check(up.child == child.index, f"session {sid} is not on child {child.index}")
            return up

        for prec in record.pending:
            _check(
                0 < prec.pool_id < snap.next_id and prec.pool_id not in child.pending,
                f"pool id {prec.pool_id}",
            )
            _check(prec.kind in (_PLAIN, _INIT, _SUBSCRIBE), f"kind {prec.kind}")
            owner = None if prec.owner is None else member(prec.owner)
            entry = _Pending(owner, prec.local_id, prec.kind)
            entry.uri = prec.uri
            entry.queued = prec.queued
            entry.counted = prec.counted
            _check(
                not (entry.counted and entry.queued is not None),
                f"request {prec.pool_id} both sent and queued",
            )
            if prec.token is not None:
                _check(
                    prec.original_token is not None and prec.token not in child.tokens,
                    f"progress token {prec.token}",
                )
                entry.token = prec.token
                entry.original_token = prec.original_token
                child.tokens[prec.token] = entry
            if owner is not None and prec.kind != _INIT:  # a child's initialize is in no
                # session's ``local`` (``_initialize``): its owner is answered directly
                _check(owner.local.get(prec.local_id) == prec.pool_id, f"request {prec.pool_id}")
            child.pending[prec.pool_id] = entry
            child.in_flight += entry.counted
        for pool_id in record.waiting:
            _check(child.pending[pool_id].queued is not None, f"waiting {pool_id}")
            child.waiting.append(pool_id)
        child.queued = len(child.waiting)
        _check(
            child.queued == sum(e.queued is not None for e in child.pending.values()),
            "queued requests missing from the queue",
        )
        if record.init_id is not None:
            _check(child.pending[record.init_id].kind == _INIT, f"initialize {record.init_id}")
        child.init_id = record.init_id
        for sid, line in record.init_waiters:
            child.init_waiters.append((member(sid), jsonrpc.decode(line)))
        for srec in record.subs:
            _check(srec.uri not in child.subs, f"subscription {srec.uri} twice")
            sub = child.subs[srec.uri] = _Sub()
            sub.confirmed = srec.confirmed
            sub.members = {member(sid) for sid in srec.members}
            sub.waiters = [(member(sid), request_id) for sid, request_id in srec.waiters]


def _check(condition: bool, what: str) -> None:
    """A consistency check of ``restore`` (not an ``assert``: ``python -O`` keeps it)."""
    if not condition:
        raise ValueError(f"router snapshot does not hold together: {what}")


def _peek(router: Router, name: str) -> int:
    """The next value of one of the router's counters (taken, then put back)."""
    counter: itertools.count[int] = getattr(router, name)
    value = next(counter)
    setattr(router, name, itertools.count(value))
    return value


SNAPSHOT_VERSION: Final = 1


class PendingRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pool_id: int
    owner: int | None  # sid; None: the pool's own, or its session left
    local_id: int | str
    kind: int
    counted: bool
    queued: bytes | None = None
    token: str | None = None
    original_token: int | str | None = None
    uri: str | None = None


class SubRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    uri: str
    confirmed: bool
    members: list[int]
    waiters: list[tuple[int, int | str]]


class ChildRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    index: int
    init_result: bytes | None
    init_id: int | None
    level: str | None
    pending: list[PendingRecord]
    waiting: list[int]  # queued pool ids, oldest first
    init_waiters: list[tuple[int, bytes]]  # sid, its initialize request
    subs: list[SubRecord]


class SessionRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sid: int
    child: int
    ready: bool
    caps: list[str]
    level: str | None
    local: list[tuple[int | str, int]]  # its request id -> pool id
    server: list[str] | None
    subs: list[str] | None


class RouterSnapshot(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``Router.snapshot``: plain data, JSON-encoded into the handover record."""

    version: int
    next_sid: int
    next_id: int
    next_token: int
    stats: dict[str, int]
    children: list[ChildRecord]
    sessions: list[SessionRecord]


_SNAPSHOT_ENCODER: Final = msgspec.json.Encoder()
_SNAPSHOT_DECODER: Final = msgspec.json.Decoder(RouterSnapshot)


def _child_record(child: Child) -> ChildRecord:
    pending = child.pending
    return ChildRecord(
        index=child.index,
        init_result=child.init_result,
        init_id=child.init_id,
        level=child.level,
        pending=[
            PendingRecord(
                pool_id,
                None if entry.owner is None else entry.owner.sid,
                entry.local_id,
                entry.kind,
                entry.counted,
                entry.queued,
                entry.token,
                entry.original_token,
                entry.uri,
            )
            for pool_id, entry in pending.items()
        ],
        waiting=[i for i in child.waiting if i in pending and pending[i].queued is not None],
        init_waiters=[(up.sid, jsonrpc.encode(msg)) for up, msg in child.init_waiters],
        subs=[
            SubRecord(
                uri,
                sub.confirmed,
                sorted(up.sid for up in sub.members),
                [(up.sid, request_id) for up, request_id in sub.waiters],
            )
            for uri, sub in child.subs.items()
        ],
    )


def _session_record(up: Session) -> SessionRecord:
    return SessionRecord(
        sid=up.sid,
        child=up.child,
        ready=up.ready,
        caps=sorted(up.caps),
        level=up.level,
        local=list(up.local.items()),
        server=None if up.server is None else sorted(up.server),
        subs=None if up.subs is None else sorted(up.subs),
    )
