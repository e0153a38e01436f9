"""The session state machine: one MCP session between a client and an upstream, sans I/O.

A ``Session`` is fed events (a client message, an upstream message, the upstream spawned or
lost) and answers each with a list of *actions* for the I/O driver to carry out, in order.
It never awaits, never reads the clock and never touches a socket, a process or the database:
``runner.py`` executes the actions (append to the log, write to a socket or a pipe, persist a
row, spawn a child). That keeps every routing decision testable without an event loop.

What the session guarantees (docs/PROTOCOL.md has the wire contract):

- Every server→client message gets the next LSN (dense, from 1) and is emitted as ``Emit``;
  the driver commits it to the log before it writes it to any socket.
- Ids toward the upstream are the proxy's own (a per-session counter that is persisted and
  never reused), so a client's ids can never collide with the proxy's internal requests nor
  with ids of an earlier upstream process (MCP 2025-11-25 basic §Requests: ids MUST NOT be
  reused within a session). Server→client requests get proxy-minted ids the same way.
- A request id the client already used is a retry: the logged response is re-sent, or the
  live one is awaited; the request is never run twice.
- A disconnect is not a cancel (SEP-1288; transports §"Sending Messages" item 5): nothing here
  reacts to a client going away. ``notifications/cancelled`` is forwarded with the id translated
  (basic/utilities/cancellation).
- When the upstream is lost, requests that never reached it (still queued here, or held by
  the upstream itself, as a shared child's admission queue does) are simply sent to the
  next one; requests known to be safe to repeat are re-issued under a new id; every other
  in-flight request is answered with an "outcome unknown" error. Server→client requests of the
  dead upstream are withdrawn with ``notifications/cancelled``.
- A respawned upstream is brought back by replaying the stored ``initialize``, then
  ``notifications/initialized``, the log level and the resource subscriptions, before any
  queued traffic (lifecycle §Initialization; server/utilities/logging; server/resources).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgspec

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
from mcproxy.core.jsonrpc import Kind, Message, RequestId

# Methods whose repetition cannot change the upstream's state: re-issued transparently when
# the upstream is lost mid-request. `initialize` is safe because it goes to a *new* process.
SAFE_METHODS: Final = frozenset(
    {
        "initialize",
        "ping",
        "tools/list",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
        "tasks/get",
        "tasks/list",
    }
)


# Stream 0 carries what relates to no client request (the Streamable HTTP GET stream); every
# client request has its own stream, numbered by the first upstream id it was given.
GENERAL_STREAM: Final = 0
# Upstream ids are reserved this many at a time in the stored session row: one extra session
# write per block instead of per request; a restart skips what was left of the block.
UPSTREAM_ID_BLOCK: Final = 1024
# The proxy's own `tools/list` follows at most this many `nextCursor`s (a server whose cursors
# never end must not keep it busy).
TOOLS_LIST_MAX_PAGES: Final = 64


class UpstreamState(enum.IntEnum):
    DOWN = 0  # no process, or it was lost
    STARTING = 1  # spawned; `initialize` (the client's first, or the stored one) in flight
    READY = 2  # initialized; traffic flows


class UpstreamEvent(enum.Enum):
    SPAWNED = "spawned"
    INITIALIZED = "initialized"
    LOST = "lost"


# h11-style: every legal transition is here, a missing key is a bug in the caller.
TRANSITIONS: Final[dict[UpstreamState, dict[UpstreamEvent, UpstreamState]]] = {
    UpstreamState.DOWN: {UpstreamEvent.SPAWNED: UpstreamState.STARTING},
    UpstreamState.STARTING: {
        UpstreamEvent.INITIALIZED: UpstreamState.READY,
        UpstreamEvent.LOST: UpstreamState.DOWN,
    },
    UpstreamState.READY: {UpstreamEvent.LOST: UpstreamState.DOWN},
}


class IllegalTransition(RuntimeError):
    """The driver reported an upstream event that cannot happen in the current state."""


# --- state ------------------------------------------------------------------------------


@dataclass(slots=True)
class InFlight:
    """A request the proxy sent (or will send) upstream and awaits an answer for."""

    kind: Literal["client", "replay-init", "internal"]
    method: str
    msg: Message  # as the upstream sees it (proxy id), for re-issue and bookkeeping
    key: str | None = None  # id_key of the client's id
    client_id: RequestId | None = None
    safe: bool = False
    sent: bool = False  # written to the current upstream process
    recorded_written: bool = True  # what its stored row says (``MarkWritten``)
    stream: int = 0  # the first upstream id it got: unique in the session, never reused
    start_lsn: int = 0  # the log head when it arrived: its stream has only later LSNs
    progress: str | None = None  # id_key of its progress token
    progress_shown: float | None = None  # the highest progress value emitted for it
    task: str | None = None  # the task id it is about (tasks/result, tasks/get, ...)


@dataclass(slots=True)
class SessionRecord:
    """Everything ``snapshot()`` persists; what ``Session.restore`` is given back."""

    init_request: bytes | None = None
    init_result: bytes | None = None
    initialized: bool = False
    log_level: str | None = None
    subscriptions: list[str] = field(default_factory=list)
    safe_tools: list[str] = field(default_factory=list)
    next_upstream_id: int = 1
    next_server_id: int = 1
    next_lsn: int = 1
    delivered_lsn: int = 0
    principal: str | None = None
    # Server→client requests the client has not answered, as (client id, upstream id,
    # stream): a restored session withdraws them (their upstream died with the proxy).
    server_requests: list[tuple[int, RequestId, int]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PendingRow:
    """A persisted in-flight request, as read back after a proxy restart."""

    key: str
    upstream_id: int
    method: str
    safe: bool
    body: bytes
    stream: int
    written: bool = True  # False: it never reached an upstream process (``MarkWritten``)


@dataclass(frozen=True, slots=True)
class ServerRequest:
    """A server→client request (sampling, elicitation, roots) the client has not answered."""

    client_id: int  # the id the client sees: the proxy's own, never repeated in a session
    upstream_id: RequestId  # the id the upstream gave it
    stream: int  # the stream it went on (its withdrawal follows it there)


class ServerRequests:
    """The server→client requests awaiting the client's answer, found by either id.

    One entry per request in two indexes that always change together (a request leaves when
    the client answers it, the upstream withdraws it, or the upstream is lost).
    """

    __slots__ = ("_by_client", "_by_upstream")

    def __init__(self) -> None:
        self._by_client: dict[int, ServerRequest] = {}
        self._by_upstream: dict[str, ServerRequest] = {}

    def __bool__(self) -> bool:
        return bool(self._by_client)

    def __len__(self) -> int:
        return len(self._by_client)

    def add(self, request: ServerRequest) -> None:
        self._by_client[request.client_id] = request
        self._by_upstream[jsonrpc.id_key(request.upstream_id)] = request

    def pop_client(self, client_id: int) -> ServerRequest | None:
        """The request the client answers under ``client_id`` (None if not pending)."""
        request = self._by_client.pop(client_id, None)
        if request is not None:
            del self._by_upstream[jsonrpc.id_key(request.upstream_id)]
        return request

    def pop_upstream(self, upstream_id: RequestId) -> ServerRequest | None:
        """The request the upstream withdraws under ``upstream_id`` (None if not pending)."""
        request = self._by_upstream.pop(jsonrpc.id_key(upstream_id), None)
        if request is not None:
            del self._by_client[request.client_id]
        return request

    def listed(self) -> list[ServerRequest]:
        """Every pending request, oldest first (what a snapshot persists)."""
        return sorted(self._by_client.values(), key=lambda r: r.client_id)

    def pop_all(self) -> list[ServerRequest]:
        """Every pending request, oldest first; none is left."""
        requests = sorted(self._by_client.values(), key=lambda r: r.client_id)
        self._by_client.clear()
        self._by_upstream.clear()
        return requests


@dataclass(frozen=True, slots=True)
class Limits:
    max_pending_requests: int
    dedupe_window: int


def logged_progress(row: PendingRow, logged: bytes) -> float | None:
    """The progress value of ``logged`` (a message of ``row``'s stream in the log) if it is a
    ``notifications/progress`` for ``row``'s token; what ``Session.restore`` is given."""
    token, _ = jsonrpc.routing_keys(jsonrpc.decode(row.body))
    if token is None:
        return None
    msg = jsonrpc.decode(logged)
    if msg.method != "notifications/progress" or jsonrpc.routing_keys(msg)[0] != token:
        return None
    return jsonrpc.progress_value(msg)


class Session:
    """One durable MCP session. See the module docstring for the guarantees.

    Call order: construct (or ``restore``), then any mix of ``client_message``,
    ``upstream_spawned``, ``upstream_message`` and ``upstream_lost``; execute the returned
    actions in order before feeding the next event.
    """

    def __init__(self, session_id: str, limits: Limits, principal: str | None = None) -> None:
        self.id = session_id
        self.limits = limits
        self.principal = principal  # who created it: only they may use it (docs/SECURITY.md)
        self.state = UpstreamState.DOWN
        self.init_request: Message | None = None
        self.init_result: msgspec.Raw | None = None
        self.initialized = False
        self.log_level: str | None = None
        self.subscriptions: set[str] = set()
        self.safe_tools: set[str] = set()
        # The proxy's own `tools/list` in flight: its upstream id, the page number, and the
        # safe tools of the pages so far (``_learn_tools``).
        self._listing: tuple[int, int, set[str]] | None = None
        self.next_upstream_id = 1
        self._id_ceiling = 1  # ids below it are reserved in the stored session row
        self._reserve_due = False
        self.next_server_id = 1
        self.next_lsn = 1
        self.delivered_lsn = 0
        self._inflight: dict[int, InFlight] = {}
        self._by_client: dict[str, int] = {}
        # Waiting for READY, already in upstream ids. A list, not a deque: it is short-lived
        # and usually empty, and an empty deque costs 760 bytes in every idle session.
        self._queue: list[Message] = []
        # Answered client ids -> (response LSN or None if cancelled, method), LRU-bounded.
        self._answered: OrderedDict[str, tuple[int | None, str]] = OrderedDict()
        self._server_requests = ServerRequests()

    # --- persistence ------------------------------------------------------------------

    def snapshot(self) -> SessionRecord:
        return SessionRecord(
            init_request=None if self.init_request is None else jsonrpc.encode(self.init_request),
            init_result=None if self.init_result is None else bytes(self.init_result),
            initialized=self.initialized,
            log_level=self.log_level,
            subscriptions=sorted(self.subscriptions),
            safe_tools=sorted(self.safe_tools),
            next_upstream_id=self._id_ceiling,
            next_server_id=self.next_server_id,
            next_lsn=self.next_lsn,
            delivered_lsn=self.delivered_lsn,
            principal=self.principal,
            server_requests=[
                (r.client_id, r.upstream_id, r.stream) for r in self._server_requests.listed()
            ],
        )

    @classmethod
    def restore(
        cls,
        session_id: str,
        limits: Limits,
        record: SessionRecord,
        pending: list[PendingRow],
        answered: list[tuple[str, int | None, str]],
        progress_shown: dict[str, float] | None = None,
        upstream_kept: bool | None = None,
    ) -> tuple[Session, list[Action]]:
        """Rebuild a session from the store after a proxy restart.

        The previous proxy's upstream died with it, so every persisted in-flight request is
        resolved at once as if the upstream had been lost (``upstream_lost``), and every
        server→client request the client had not answered is withdrawn. ``progress_shown``:
        the highest progress value in the log for each pending request (by client key; see
        ``logged_progress``), so that a re-issued one never goes back.

        ``upstream_kept``: a reload in place handed the session's initialized upstream over
        alive (docs/ARCHITECTURE.md *Reload in place*); no re-initialization. True: nothing
        was lost either: the requests it was sent stay in flight on it (their answers come
        from it, once), server→client requests stay open, and requests never written to it
        are written now. False: its session goes on but what was in flight on it is resolved
        as after a restart (an HTTP upstream: the answer streams were cut). None: the
        upstream died with the last process.
        """
        s = cls(session_id, limits, record.principal)
        if record.init_request is not None:
            s.init_request = jsonrpc.decode(record.init_request)
        if record.init_result is not None:
            s.init_result = msgspec.Raw(record.init_result)
        s.initialized = record.initialized
        s.log_level = record.log_level
        s.subscriptions = set(record.subscriptions)
        s.safe_tools = set(record.safe_tools)
        s.next_upstream_id = max([record.next_upstream_id, *(p.upstream_id + 1 for p in pending)])
        s._id_ceiling = s.next_upstream_id
        s.next_server_id = record.next_server_id
        s.next_lsn = record.next_lsn
        s.delivered_lsn = record.delivered_lsn
        for asked in record.server_requests:
            s._server_requests.add(ServerRequest(*asked))
        # Every remembered id the store holds, oldest first: any it holds beyond the window
        # (a smaller window than the last process's) is forgotten here, or its rows would
        # never be.
        forgotten = [
            pair for key, lsn, method in answered for pair in s._remember(key, lsn, method)
        ]
        for row in sorted(pending, key=lambda p: p.upstream_id):
            msg = jsonrpc.decode(row.body)
            client_id = jsonrpc.id_from_key(row.key)
            upstream_msg = msgspec.structs.replace(msg, id=row.upstream_id)
            progress, task = jsonrpc.routing_keys(msg)
            s._inflight[row.upstream_id] = InFlight(
                "client",
                row.method,
                upstream_msg,
                row.key,
                client_id,
                row.safe,
                sent=row.written,
                recorded_written=row.written,
                stream=row.stream or row.upstream_id,
                progress=progress,
                progress_shown=(progress_shown or {}).get(row.key),
                task=task,
            )
            s._by_client[row.key] = row.upstream_id
            if not row.written:
                s._queue.append(upstream_msg)  # never written: it goes to the next process
        actions: list[Action] = [Forget(tuple(forgotten))] if forgotten else []
        if upstream_kept is not None:
            s.state = UpstreamState.READY
            if not upstream_kept and (s._inflight or s._server_requests):
                lost = s._lose("proxy reloaded")
                actions += [a for a in lost if not isinstance(a, StartUpstream)]
            actions += s._flush()
        elif s._inflight or s._server_requests:
            actions += s._lose("proxy restarted")
        return s, actions

    # --- queries ----------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        """True while anything waits for the upstream (so it must be running)."""
        return bool(self._queue) or bool(self._inflight)

    @property
    def quiescent(self) -> bool:
        """Nothing waits on either side: no client request, no server request unanswered."""
        return not self.has_work and not self._server_requests

    def at_upstream(self) -> list[int]:
        """Upstream ids of the client's requests written to the current upstream and not
        answered yet: what stopping it now would answer -32010 (or re-issue). A request not
        written yet is not among them: the next process sends it (``never_written``)."""
        return [uid for uid, f in self._inflight.items() if f.kind == "client" and f.sent]

    @property
    def protocol_version(self) -> str | None:
        """The version the upstream negotiated (lifecycle §Version Negotiation), once known."""
        return None if self.init_result is None else jsonrpc.protocol_version(self.init_result)

    def stream_of(self, client_id: RequestId) -> tuple[int, int] | None:
        """(stream, start LSN) of the client request in flight under ``client_id``."""
        upstream_id = self._by_client.get(jsonrpc.id_key(client_id))
        if upstream_id is None:
            return None
        flight = self._inflight[upstream_id]
        return flight.stream, flight.start_lsn

    def stream_live(self, stream: int) -> bool:
        """Whether messages may still be added to ``stream`` (the general one always)."""
        if stream == GENERAL_STREAM:
            return True
        return any(f.kind == "client" and f.stream == stream for f in self._inflight.values())

    # --- client -> proxy --------------------------------------------------------------

    def client_message(self, msg: Message) -> list[Action]:
        """A message from the attached client (already classified valid by ``jsonrpc.decode``)."""
        kind = jsonrpc.kind_of(msg)
        if kind is Kind.REQUEST:
            return self._client_request(msg)
        if kind is Kind.NOTIFICATION:
            return self._client_notification(msg)
        return self._client_response(msg)

    def _client_request(self, msg: Message) -> list[Action]:
        assert isinstance(msg.method, str) and isinstance(msg.id, int | str)
        method, client_id = msg.method, msg.id
        key = jsonrpc.id_key(client_id)
        if method == "initialize":
            return self._client_initialize(msg, key)
        if self.init_request is None:
            # lifecycle §Initialization: initialize MUST be the first interaction.
            return self._reply_error(
                client_id,
                jsonrpc.INVALID_REQUEST,
                "session not initialized: send initialize first",
            )
        retry = self._retry(client_id, key, method)
        if retry is not None:
            return retry
        if len(self._by_client) >= self.limits.max_pending_requests:
            return self._reply_error(
                client_id,
                jsonrpc.TOO_MANY_PENDING,
                "too many requests in flight for this session",
            )
        safe = method in SAFE_METHODS or (
            method == "tools/call" and jsonrpc.tool_name(msg) in self.safe_tools
        )
        return self._forward_request(jsonrpc.strip_session_hints(msg), key, client_id, safe)

    def _client_initialize(self, msg: Message, key: str) -> list[Action]:
        assert isinstance(msg.id, int | str)
        if self.init_result is not None:
            # SEP draft v3: a re-sent initialize resumes the session. Never forward a second
            # initialize (backends reject or mishandle it); answer from the stored result.
            result = msgspec.structs.replace(
                jsonrpc.result_message(msg.id, None), result=self.init_result
            )
            result = jsonrpc.with_meta(
                result, {jsonrpc.META_RESUMED: True, jsonrpc.META_HEAD_LSN: self.next_lsn - 1}
            )
            return [Reply(jsonrpc.encode(result))]
        if self.init_request is not None:
            if key in self._by_client:
                return []  # a retry of the initialize still in flight
            return self._reply_error(
                msg.id, jsonrpc.INVALID_REQUEST, "initialize already in progress"
            )
        stripped = jsonrpc.strip_session_hints(msg)
        self.init_request = stripped
        actions: list[Action] = [SaveSession()]
        actions += self._forward_request(stripped, key, msg.id, safe=True)
        return actions

    def _retry(self, client_id: RequestId, key: str, method: str) -> list[Action] | None:
        """A request id seen before in this session is a retry, never a second execution.
        The same id with another method is no retry but a reuse (basic §Requests: an id MUST
        NOT have been used before in the session), refused whether the first is answered or
        still running: joining it would answer the second request with the first's result."""
        running = self._by_client.get(key)
        seen = self._answered.get(key) if running is None else None
        if running is not None:
            first_method = self._inflight[running].method
        elif seen is not None:
            first_method = seen[1]
        else:
            return None
        if first_method != method:
            return self._reply_error(
                client_id, jsonrpc.INVALID_REQUEST, "request id already used in this session"
            )
        if seen is None:
            # Still running: its response will be emitted to whoever is attached.
            return [Tally("deduplicated")]
        lsn = seen[0]
        if lsn is None:
            return self._reply_error(client_id, jsonrpc.REQUEST_CANCELLED, "request was cancelled")
        return [Tally("deduplicated"), Resend(lsn)]

    def _forward_request(
        self, msg: Message, key: str, client_id: RequestId, safe: bool
    ) -> list[Action]:
        assert isinstance(msg.method, str)
        upstream_id = self._alloc_id()
        upstream_msg = msgspec.structs.replace(msg, id=upstream_id)
        progress, task = jsonrpc.routing_keys(msg)
        ready = self.state is UpstreamState.READY  # so it is written now (``_to_upstream``)
        flight = InFlight(
            "client",
            msg.method,
            upstream_msg,
            key,
            client_id,
            safe,
            recorded_written=ready,
            stream=upstream_id,
            start_lsn=self.next_lsn - 1,
            progress=progress,
            task=task,
        )
        self._inflight[upstream_id] = flight
        self._by_client[key] = upstream_id
        body = jsonrpc.encode(msg)
        actions: list[Action] = [
            *self._reserved(),
            SaveRequest(key, upstream_id, msg.method, safe, body, upstream_id, ready),
        ]
        actions += self._to_upstream(upstream_msg)
        return actions

    def _client_notification(self, msg: Message) -> list[Action]:
        method = msg.method
        if method == "notifications/initialized":
            if self.initialized:
                return []  # a resumed client re-sends it; the upstream already had it
            if self.init_result is None:
                return []  # lifecycle: only after the initialize response; ignore early ones
            self.initialized = True
            actions: list[Action] = [SaveSession()]
            actions += self._to_upstream(jsonrpc.strip_session_hints(msg))
            return actions + self._learn_tools()
        if method == "notifications/cancelled":
            return self._client_cancel(msg)
        if self.init_request is None:
            return []
        return self._to_upstream(jsonrpc.strip_session_hints(msg))

    def _client_cancel(self, msg: Message) -> list[Action]:
        # cancellation §Behavior: only for requests believed in flight; unknown ids are ignored.
        client_id = jsonrpc.cancelled_request_id(msg)
        if client_id is None:
            return []
        key = jsonrpc.id_key(client_id)
        upstream_id = self._by_client.pop(key, None)
        if upstream_id is None:
            return []
        flight = self._inflight.pop(upstream_id)
        if flight.method == "initialize":  # clients MUST NOT cancel initialize; keep it
            self._inflight[upstream_id] = flight
            self._by_client[key] = upstream_id
            return []
        forget = self._remember(key, None, flight.method)
        actions: list[Action] = [FinishRequest(key, None, flight.stream, forget)]
        if flight.sent:
            forwarded = jsonrpc.with_cancelled_request_id(
                jsonrpc.strip_session_hints(msg), upstream_id
            )
            actions += self._to_upstream(forwarded)
        else:
            self._queue = list(
                m for m in self._queue if m.method is msgspec.UNSET or m.id != upstream_id
            )
        return actions

    def _client_response(self, msg: Message) -> list[Action]:
        """The client answers a server→client request (sampling, elicitation, roots)."""
        client_facing = msg.id
        request = None
        if isinstance(client_facing, int) and not isinstance(client_facing, bool):
            request = self._server_requests.pop_client(client_facing)
        if request is None:
            # Unknown, already answered, or withdrawn (the upstream that asked was lost, or
            # withdrew it): nobody waits for it (cancellation §Behavior). Said in the log.
            shown = None if isinstance(client_facing, msgspec.UnsetType) else client_facing
            issued = isinstance(shown, int) and 0 < shown < self.next_server_id
            return [Dropped("late answer" if issued else "unknown id", shown)]
        forwarded = msgspec.structs.replace(
            jsonrpc.strip_session_hints(msg), id=request.upstream_id
        )
        return [SaveSession(), *self._to_upstream(forwarded)]

    # --- upstream -> proxy ------------------------------------------------------------

    def upstream_spawned(self) -> list[Action]:
        """The driver started a new upstream process; begin its initialization."""
        self._transition(UpstreamEvent.SPAWNED)
        if self.init_result is not None and self.init_request is not None:
            upstream_id = self._alloc_id()
            replay = msgspec.structs.replace(self.init_request, id=upstream_id)
            self._inflight[upstream_id] = InFlight("replay-init", "initialize", replay, sent=True)
            return [*self._reserved(), SendUpstream(jsonrpc.encode(replay))]
        # A fresh session: the client's own initialize heads the queue; send it alone and
        # hold the rest until its response (lifecycle §Initialization).
        if self._queue and self._queue[0].method == "initialize":
            return self._send(self._queue.pop(0))
        return []

    def upstream_message(self, msg: Message, related: int | None = None) -> list[Action]:
        """``related``: the upstream request id this message arrived with, when the upstream
        says so (a Streamable HTTP upstream's POST stream); it beats every heuristic."""
        kind = jsonrpc.kind_of(msg)
        if kind is Kind.RESPONSE:
            return self._upstream_response(msg)
        if kind is Kind.REQUEST:
            return self._upstream_request(msg, related)
        return self._upstream_notification(msg, related)

    def _upstream_response(self, msg: Message) -> list[Action]:
        upstream_id = msg.id
        if not isinstance(upstream_id, int) or isinstance(upstream_id, bool):
            return []
        flight = self._inflight.pop(upstream_id, None)
        if flight is None:
            return []  # cancelled, or sent to a process that was lost: nobody waits
        if flight.kind == "replay-init":
            if msg.error is not jsonrpc.NO_RAW:
                return [RestartUpstream("upstream rejected the replayed initialize")]
            return self._after_replayed_init()
        if flight.kind == "internal":
            if flight.method == "tools/list":
                return self._listed_tools(upstream_id, msg)
            return []
        assert flight.key is not None and flight.client_id is not None
        del self._by_client[flight.key]
        actions: list[Action] = []
        ok = msg.result is not jsonrpc.NO_RAW
        out = msgspec.structs.replace(msg, id=flight.client_id)
        if flight.method == "initialize":
            if not ok:
                # The upstream refused; the session stays uninitialized and may retry.
                self.init_request = None
                actions.append(SaveSession())
            else:
                out = jsonrpc.with_result_fields(out, {jsonrpc.SESSION_ID_FIELD: self.id})
                self.init_result = out.result
                actions.append(SaveSession())
                self._transition(UpstreamEvent.INITIALIZED)
                actions += self._flush()
        elif ok:
            actions += self._track_state(flight, msg)
        emit = self._emit(out, flight.stream, (flight.key, flight.method))
        forget = self._remember(flight.key, emit.lsn, flight.method)
        actions += [emit, FinishRequest(flight.key, emit.lsn, flight.stream, forget)]
        if flight.method == "initialize" and not ok:
            actions.append(RestartUpstream("upstream refused initialize"))
        return actions

    def _track_state(self, flight: InFlight, response: Message) -> list[Action]:
        """Remember the session state a respawned upstream must be given back."""
        method = flight.method
        if method == "tools/list":
            safe, listed = jsonrpc.idempotent_tools(response.result)
            updated = (self.safe_tools - listed) | safe
            if updated != self.safe_tools:
                self.safe_tools = updated
                return [SaveSession()]
        elif method == "logging/setLevel":
            self.log_level = jsonrpc.level_param(flight.msg)
            return [SaveSession()]
        elif method in ("resources/subscribe", "resources/unsubscribe"):
            uri = jsonrpc.uri_param(flight.msg)
            if uri is not None:
                if method == "resources/subscribe":
                    self.subscriptions.add(uri)
                else:
                    self.subscriptions.discard(uri)
                return [SaveSession()]
        return []

    def _after_replayed_init(self) -> list[Action]:
        actions: list[Action] = []
        if self.initialized:
            initialized = jsonrpc.notification_message("notifications/initialized")
            actions.append(SendUpstream(jsonrpc.encode(initialized)))
        if self.log_level is not None:
            actions.append(self._internal("logging/setLevel", {"level": self.log_level}))
        for uri in sorted(self.subscriptions):
            actions.append(self._internal("resources/subscribe", {"uri": uri}))
        self._transition(UpstreamEvent.INITIALIZED)
        actions += self._learn_tools()
        return self._reserved() + actions + self._flush()

    def _learn_tools(self, cursor: str | None = None, page: int = 0) -> list[Action]:
        """List the upstream's tools for the proxy itself (server/tools §"Tool annotations"):
        which calls are safe to re-issue must not depend on whether the client listed them
        (a client may cache its list). After ``notifications/initialized`` (lifecycle: no
        other request before it) and after each ``notifications/tools/list_changed``; the
        answers are never shown to the client. Only if the server offers tools."""
        if (
            not self.initialized
            or self.state is not UpstreamState.READY
            or self.init_result is None
            or not jsonrpc.offers_tools(self.init_result)
        ):
            return []
        upstream_id = self.next_upstream_id  # the id ``_internal`` takes
        send = self._internal("tools/list", None if cursor is None else {"cursor": cursor})
        learned = set() if self._listing is None or page == 0 else self._listing[2]
        self._listing = (upstream_id, page, learned)
        return [*self._reserved(), send]

    def _listed_tools(self, upstream_id: int, response: Message) -> list[Action]:
        """A page of the proxy's own ``tools/list``: the next page, or, after the last, the
        safe tools become exactly what it listed (basic/utilities/pagination)."""
        listing = self._listing
        if listing is None or listing[0] != upstream_id:
            return []  # superseded by a newer listing (list_changed meanwhile)
        _, page, learned = listing
        if response.result is jsonrpc.NO_RAW:
            self._listing = None  # refused: what was known stays
            return []
        safe, _ = jsonrpc.idempotent_tools(response.result)
        learned |= safe
        cursor = jsonrpc.next_cursor(response.result)
        if cursor is not None and page + 1 < TOOLS_LIST_MAX_PAGES:
            return self._learn_tools(cursor, page + 1)
        self._listing = None
        if learned == self.safe_tools:
            return []
        self.safe_tools = learned
        return [SaveSession()]

    def _internal(self, method: str, params: dict[str, Any] | None) -> SendUpstream:
        upstream_id = self._alloc_id()
        msg = jsonrpc.request_message(upstream_id, method, params)
        self._inflight[upstream_id] = InFlight("internal", method, msg, sent=True)
        return SendUpstream(jsonrpc.encode(msg))

    def _upstream_request(self, msg: Message, related: int | None) -> list[Action]:
        # Server→client request (sampling, elicitation, roots): give it an id of ours so the
        # ids the client sees never repeat, even across upstream restarts.
        assert isinstance(msg.id, int | str)
        client_facing = self.next_server_id
        self.next_server_id += 1
        stream = self._route(msg, related)
        self._server_requests.add(ServerRequest(client_facing, msg.id, stream))
        return [SaveSession(), self._emit(msgspec.structs.replace(msg, id=client_facing), stream)]

    def _upstream_notification(self, msg: Message, related: int | None) -> list[Action]:
        if msg.method == "notifications/cancelled":
            upstream_id = jsonrpc.cancelled_request_id(msg)
            if upstream_id is None:
                return []
            request = self._server_requests.pop_upstream(upstream_id)
            if request is None:
                return []
            stream = self._withdrawal_stream(request)
            note = jsonrpc.with_cancelled_request_id(msg, request.client_id)
            return [SaveSession(), self._emit(note, stream)]
        if msg.method == "notifications/progress" and not self._progress_increases(msg):
            return []
        actions: list[Action] = [self._emit(msg, self._route(msg, related))]
        if msg.method == "notifications/tools/list_changed":
            actions += self._learn_tools()  # the annotations may have changed too
        return actions

    def _progress_increases(self, msg: Message) -> bool:
        """basic/utilities/progress: "The progress value MUST increase with each
        notification". A request re-issued after an upstream loss starts its progress over
        under the same token (the client's): its notes are suppressed until they pass the
        highest value already emitted, rather than offset by it. An offset would report work
        as done that the new process has not done, and push ``progress`` past ``total``; a
        pause keeps every value true. (Within one process the upstream's own order is kept.)
        """
        token, _ = jsonrpc.routing_keys(msg)
        if token is None:
            return True
        value = jsonrpc.progress_value(msg)
        if value is None:
            return True
        for flight in self._inflight.values():
            if flight.kind == "client" and flight.progress == token:
                if flight.progress_shown is not None and value <= flight.progress_shown:
                    return False
                flight.progress_shown = value
                return True
        return True

    def _route(self, msg: Message, related: int | None = None) -> int:
        """The stream an upstream request or notification belongs to.

        A stdio upstream says nothing about which client request a message relates to
        (transports §"Sending Messages to the Server" wants related messages on that request's
        stream), so: a progress notification goes with the request that set its token; a
        message tagged with a related task goes with the in-flight request about that task;
        anything else goes with the newest request in flight, else to the general stream.
        """
        if related is not None:
            flight = self._inflight.get(related)
            if flight is not None and flight.kind == "client":
                return flight.stream
        flights = [f for f in self._inflight.values() if f.kind == "client"]
        if not flights:
            return GENERAL_STREAM
        progress, task = jsonrpc.routing_keys(msg)
        if progress is not None and msg.method == "notifications/progress":
            for flight in flights:
                if flight.progress == progress:
                    return flight.stream
            return GENERAL_STREAM  # a late progress note of a finished request
        if task is not None:
            about = [f.stream for f in flights if f.task == task]
            return max(about) if about else GENERAL_STREAM
        return max(f.stream for f in flights)

    def _withdrawal_stream(self, request: ServerRequest) -> int:
        """Where to cancel a server request: its own stream while that is still open."""
        stream = request.stream
        return stream if self.stream_live(stream) else GENERAL_STREAM

    def upstream_unavailable(self, reason: str) -> list[Action]:
        """The upstream could not be started: answer everything that waits for it, now."""
        actions: list[Action] = []
        for upstream_id in sorted(self._inflight):
            flight = self._inflight.pop(upstream_id)
            if flight.kind != "client":
                continue
            assert flight.key is not None and flight.client_id is not None
            del self._by_client[flight.key]
            if flight.method == "initialize" and self.init_result is None:
                self.init_request = None  # the client may try initialize again
                actions.append(SaveSession())
            actions += self._fail(
                flight,
                jsonrpc.UPSTREAM_UNAVAILABLE,
                "the upstream server could not be started",
                reason,
            )
        self._queue.clear()
        return actions

    def upstream_lost(self, reason: str, unsent: AbstractSet[int] = frozenset()) -> list[Action]:
        """The upstream process exited, broke its framing or was stopped. ``unsent``: the
        upstream ids of requests it accepted but never passed on (they are sent again)."""
        if self.state is UpstreamState.DOWN:
            return []
        self._transition(UpstreamEvent.LOST)
        return self._lose(reason, unsent)

    def _lose(self, reason: str, unsent: AbstractSet[int] = frozenset()) -> list[Action]:
        # Server→client requests of the dead process can no longer be answered: withdraw them
        # (cancellation: the receiver SHOULD stop work; a late answer is dropped above). First,
        # so that each reaches its stream before the request it belongs to is answered.
        actions: list[Action] = []
        withdrawn = self._server_requests.pop_all()
        if withdrawn:
            actions.append(SaveSession())  # a later restart must not withdraw them again
        for request in withdrawn:
            note = jsonrpc.notification_message(
                "notifications/cancelled",
                {"requestId": request.client_id, "reason": f"upstream lost: {reason}"},
            )
            actions.append(self._emit(note, self._withdrawal_stream(request)))
        reissue: list[Message] = []  # to the next process first, in their original order
        for upstream_id in sorted(self._inflight):
            flight = self._inflight.pop(upstream_id)
            if flight.kind != "client":
                continue
            assert flight.key is not None and flight.client_id is not None
            if not flight.sent:
                self._inflight[upstream_id] = flight  # still queued: send it to the next one
                continue
            if upstream_id in unsent:
                # It never reached the process, so it cannot have taken effect: not "outcome
                # unknown" but simply sent to the next one, under the same id (its saved row
                # still matches).
                flight.sent = False
                flight.recorded_written = False
                self._inflight[upstream_id] = flight
                actions += [MarkWritten(flight.key, False), Tally("resent")]
                reissue.append(flight.msg)
                continue
            if self._safe_now(flight):
                new_id = self._alloc_id()
                flight.msg = msgspec.structs.replace(flight.msg, id=new_id)
                flight.sent = False
                flight.recorded_written = False
                self._inflight[new_id] = flight
                self._by_client[flight.key] = new_id
                body = jsonrpc.encode(msgspec.structs.replace(flight.msg, id=flight.client_id))
                actions.append(
                    SaveRequest(flight.key, new_id, flight.method, True, body, flight.stream, False)
                )
                actions.append(Tally("reissued"))
                reissue.append(flight.msg)
                continue
            del self._by_client[flight.key]
            actions += self._fail(
                flight,
                jsonrpc.OUTCOME_UNKNOWN,
                "upstream lost before answering; the request may or may not have taken effect",
                reason,
            )
        # Responses queued for the dead process are moot; requests and notifications stay.
        kept = [m for m in self._queue if m.method is not msgspec.UNSET]
        self._queue = [*reissue, *kept]
        actions += self._reserved()
        if self.has_work:
            actions.append(StartUpstream())
        return actions

    def _safe_now(self, flight: InFlight) -> bool:
        """Whether a request may be repeated, from what is known at the loss, not when it
        arrived: a ``tools/list`` answer may name the tool read-only after its call came."""
        if flight.safe:
            return True
        return flight.method == "tools/call" and jsonrpc.tool_name(flight.msg) in self.safe_tools

    # --- helpers ----------------------------------------------------------------------

    def _fail(self, flight: InFlight, code: int, message: str, reason: str) -> list[Action]:
        """Answer a client request with a logged error (it counts as its one answer)."""
        assert flight.key is not None and flight.client_id is not None
        error = jsonrpc.error_message(
            flight.client_id, code, message, {"method": flight.method, "reason": reason}
        )
        emit = self._emit(error, flight.stream, (flight.key, flight.method))
        forget = self._remember(flight.key, emit.lsn, flight.method)
        unknown = code == jsonrpc.OUTCOME_UNKNOWN
        tally = Tally("outcome_unknown") if unknown else Tally("error", code)
        return [tally, emit, FinishRequest(flight.key, emit.lsn, flight.stream, forget)]

    def delivered(self, lsn: int) -> None:
        """The driver wrote ``lsn`` to a socket (used for replay when no cursor is given)."""
        if lsn > self.delivered_lsn:
            self.delivered_lsn = lsn

    def _transition(self, event: UpstreamEvent) -> None:
        try:
            self.state = TRANSITIONS[self.state][event]
        except KeyError:
            raise IllegalTransition(f"upstream {event.value} while {self.state.name}") from None

    def _to_upstream(self, msg: Message) -> list[Action]:
        if self.state is UpstreamState.READY:
            return self._send(msg)
        self._queue.append(msg)
        return [StartUpstream()] if self.state is UpstreamState.DOWN else []

    def _flush(self) -> list[Action]:
        actions: list[Action] = []
        queued, self._queue = self._queue, []
        for msg in queued:
            actions += self._send(msg)
        return actions

    def _send(self, msg: Message) -> list[Action]:
        """Write ``msg`` now; a request is marked as seen by the current upstream process
        (and on record as possibly written, before it is)."""
        durable = False
        actions: list[Action] = []
        if isinstance(msg.id, int) and msg.method is not msgspec.UNSET:
            flight = self._inflight.get(msg.id)
            if flight is not None:
                flight.sent = True
                durable = not flight.safe
                if not flight.recorded_written and flight.key is not None:
                    flight.recorded_written = True
                    actions.append(MarkWritten(flight.key, True))
        actions.append(SendUpstream(jsonrpc.encode(msg), durable))
        return actions

    def never_written(self, upstream_ids: AbstractSet[int]) -> list[Action]:
        """The driver stopped with these requests still held back (never written to the
        process, which is gone): on record as not written, so that the next process gets
        them after a restart (``restore``)."""
        actions: list[Action] = []
        for upstream_id in sorted(upstream_ids):
            flight = self._inflight.get(upstream_id)
            if flight is None or flight.kind != "client" or flight.key is None:
                continue
            flight.sent = False
            flight.recorded_written = False
            actions.append(MarkWritten(flight.key, False))
        return actions

    def _alloc_id(self) -> int:
        upstream_id = self.next_upstream_id
        self.next_upstream_id += 1
        if upstream_id >= self._id_ceiling:
            # Reserve a block in the session row rather than persist every id: the rows of
            # answered requests are deleted, and an id (or the HTTP stream named after it)
            # must never be handed out twice, even after a crash.
            self._id_ceiling = upstream_id + UPSTREAM_ID_BLOCK
            self._reserve_due = True
        return upstream_id

    def _reserved(self) -> list[Action]:
        """``SaveSession`` if an id was just taken from a new block (see ``_alloc_id``)."""
        if not self._reserve_due:
            return []
        self._reserve_due = False
        return [SaveSession()]

    def _emit(self, msg: Message, stream: int, answers: tuple[str, str] | None = None) -> Emit:
        lsn = self.next_lsn
        self.next_lsn += 1
        data = jsonrpc.encode(jsonrpc.with_meta(msg, {jsonrpc.META_LSN: lsn}))
        return Emit(lsn, data, stream, answers)

    def _remember(
        self, key: str, lsn: int | None, method: str
    ) -> tuple[tuple[str, int | None], ...]:
        """Keep ``key`` for retries. Returns the (key, answer LSN) pairs that fell out of the
        window: an eighth of it at a time, so their rows go in batches, not one per answer."""
        answered = self._answered
        forgotten: list[tuple[str, int | None]] = []
        earlier = answered.get(key)
        if earlier is not None and earlier[0] is not None and earlier[0] != lsn:
            forgotten.append((key, earlier[0]))  # answered again (a re-sent initialize)
        answered[key] = (lsn, method)
        answered.move_to_end(key)
        window = self.limits.dedupe_window
        if len(answered) <= window + max(1, window // 8):
            return tuple(forgotten)
        while len(answered) > window:
            old, (old_lsn, _) = answered.popitem(last=False)
            forgotten.append((old, old_lsn))
        return tuple(forgotten)

    @staticmethod
    def _reply_error(request_id: RequestId, code: int, message: str) -> list[Action]:
        return [Tally("error", code), Reply(jsonrpc.error_bytes(request_id, code, message))]
