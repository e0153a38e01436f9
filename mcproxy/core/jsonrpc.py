"""The JSON-RPC 2.0 envelope, and nothing more.

mcproxy routes MCP messages; it does not interpret them. So a message is decoded into one
permissive envelope whose ``params``, ``result`` and ``error`` stay ``msgspec.Raw`` (the
already-encoded bytes), ids are rewritten with ``msgspec.structs.replace`` and the envelope is
re-encoded with a shared encoder. Only the few methods the proxy must understand
(``initialize``, cancellation, ``tools/list`` annotations, log level and subscriptions) have
their params or result decoded, each through a small partial Struct that ignores the rest.

MCP 2025-11-25 basic §"Messages": a message is a request, a notification or a response; there
are no batches (they existed only in 2025-03-26). Request ids are strings or integers, never
null, and the proxy must keep their JSON type when it rewrites them.

This module is part of the sans-I/O core: it imports no asyncio, aiohttp or sqlite.
"""

from __future__ import annotations

import enum
from typing import Any, Final, Literal

import msgspec
from msgspec import UNSET, Raw, UnsetType

from mcproxy.errors import InvalidMessage, ParseError

# JSON-RPC 2.0 §5.1 error codes, plus the MCP / mcproxy server-error range (-32000..-32099).
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
# The TypeScript SDK and McpAgent answer an unknown session with -32001; mcproxy follows them.
SESSION_NOT_FOUND: Final = -32001
# mcproxy's own codes (documented in docs/PROTOCOL.md).
OUTCOME_UNKNOWN: Final = -32010
UPSTREAM_UNAVAILABLE: Final = -32011
TOO_MANY_PENDING: Final = -32012
TOO_MANY_SESSIONS: Final = -32013
RATE_LIMITED: Final = -32014
UPSTREAM_BUSY: Final = -32015  # the upstream is not reading: the request was not sent
SHUTTING_DOWN: Final = -32016  # the proxy is draining before a stop: retry on the next one
REQUEST_CANCELLED: Final = -32800

# The `_meta` keys mcproxy adds to what it sends. `io.mcproxy/` is our own reverse-DNS prefix
# (MCP 2025-11-25 basic §"_meta": prefixes whose second label is `modelcontextprotocol` or
# `mcp` are reserved, anything else is free for implementations).
META_LSN: Final = "io.mcproxy/lsn"
META_LAST_LSN: Final = "io.mcproxy/lastLsn"
META_HEAD_LSN: Final = "io.mcproxy/headLsn"
META_RESUMED: Final = "io.mcproxy/resumed"
SESSION_ID_FIELD: Final = "mcpSessionId"
# Sent (unlogged, no LSN) before a replay that cannot be exact: the client's cursor is below
# the log floor, so some LSNs after it are gone (docs/PROTOCOL.md, *LSNs and replay*).
REPLAY_PARTIAL_METHOD: Final = "notifications/io.mcproxy/replayPartial"
# WebSocket close reasons the proxy sends and its client library acts on (docs/PROTOCOL.md).
SUPERSEDED_REASON: Final = "MCP session reconnected on another connection"  # SEP, verbatim
TERMINATED_REASON: Final = "MCP session terminated"

NO_RAW: Final = Raw()
"""Sentinel for an absent params/result/error; ``"result": null`` is ``Raw(b"null")``."""

RequestId = int | str


class Message(msgspec.Struct, omit_defaults=True, gc=False):
    """One JSON-RPC 2.0 message with its payload kept raw.

    ``mcpSessionId`` is the top-level member of the WebSocket SEP (draft v3); it is stripped
    before a message goes upstream. Any other unknown top-level member is dropped.
    """

    jsonrpc: Literal["2.0"]
    id: RequestId | UnsetType | None = UNSET
    method: str | UnsetType = UNSET
    params: Raw = NO_RAW
    result: Raw = NO_RAW
    error: Raw = NO_RAW
    mcpSessionId: str | UnsetType = UNSET


class Kind(enum.IntEnum):
    REQUEST = 1
    NOTIFICATION = 2
    RESPONSE = 3


_DECODER: Final = msgspec.json.Decoder(Message)
_ENCODER: Final = msgspec.json.Encoder()
_OBJECT_DECODER: Final = msgspec.json.Decoder(dict[str, Raw])
_TOO_DEEP: Final = "JSON nested too deeply"


def decode(data: bytes | str) -> Message:
    """Decode one frame or line into an envelope.

    Raises:
        ParseError: the bytes are not JSON.
        InvalidMessage: JSON, but not a single JSON-RPC 2.0 message (a batch array, a missing
            or wrong ``jsonrpc``, an id that is neither string nor integer, ...).
    """
    try:
        msg = _DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise InvalidMessage(str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise ParseError(str(exc)) from exc
    except RecursionError:
        # Even a skipped (Raw) value is walked level by level: nesting deeper than the
        # interpreter's stack allows is refused like any other JSON we cannot parse.
        raise ParseError(_TOO_DEEP) from None
    kind_of(msg)  # validates the shape
    return msg


def kind_of(msg: Message) -> Kind:
    """Classify an envelope (JSON-RPC 2.0 §4, §4.1, §5).

    Raises:
        InvalidMessage: the combination of members fits none of the three kinds.
    """
    has_method = msg.method is not UNSET
    if has_method:
        if msg.result is not NO_RAW or msg.error is not NO_RAW:
            raise InvalidMessage("a message cannot carry both method and result/error")
        if msg.id is UNSET:
            return Kind.NOTIFICATION
        if msg.id is None:
            # MCP 2025-11-25 basic §Requests: the id MUST NOT be null.
            raise InvalidMessage("request id must be a string or an integer, not null")
        return Kind.REQUEST
    if msg.id is UNSET:
        raise InvalidMessage("not a JSON-RPC request, notification or response")
    if (msg.result is NO_RAW) == (msg.error is NO_RAW):
        raise InvalidMessage("a response carries exactly one of result and error")
    return Kind.RESPONSE


def encode(msg: Message) -> bytes:
    return _ENCODER.encode(msg)


def id_key(request_id: RequestId) -> str:
    """A canonical string for an id that keeps its JSON type apart: ``1`` vs ``"1"``."""
    return _ENCODER.encode(request_id).decode()


def id_from_key(key: str) -> RequestId:
    value = msgspec.json.decode(key)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidMessage("bad id key")
    return value


def error_message(
    request_id: RequestId | None, code: int, message: str, data: Any = None
) -> Message:
    """Build an error response. ``message`` must never carry internal details."""
    body: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        body["data"] = data
    return Message(jsonrpc="2.0", id=request_id, error=Raw(_ENCODER.encode(body)))


def error_bytes(request_id: RequestId | None, code: int, message: str, data: Any = None) -> bytes:
    return encode(error_message(request_id, code, message, data))


def result_message(request_id: RequestId, result: Any) -> Message:
    return Message(jsonrpc="2.0", id=request_id, result=Raw(_ENCODER.encode(result)))


def request_message(request_id: RequestId, method: str, params: Any = None) -> Message:
    raw = NO_RAW if params is None else Raw(_ENCODER.encode(params))
    return Message(jsonrpc="2.0", id=request_id, method=method, params=raw)


def notification_message(method: str, params: Any = None) -> Message:
    raw = NO_RAW if params is None else Raw(_ENCODER.encode(params))
    return Message(jsonrpc="2.0", method=method, params=raw)


def raw_object(raw: Raw) -> dict[str, Raw] | None:
    """Shallow-decode a raw JSON object into ``{key: raw value}``; None if it is not an object."""
    if raw is NO_RAW:
        return None
    try:
        return _OBJECT_DECODER.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        # A client's params: one that passed ``decode`` may still be too deep here, where
        # the stack is already deeper; treated as "not an object we can look into".
        return None


def raw_value(value: Any) -> Raw:
    return Raw(_ENCODER.encode(value))


def _with_keys(raw: Raw, items: dict[str, Any], *, in_meta: bool) -> Raw | None:
    """Return ``raw`` (a JSON object) with ``items`` set, in its ``_meta`` if ``in_meta``.

    Returns None when ``raw`` is not a JSON object, so the caller can leave it alone.
    """
    obj = {} if raw is NO_RAW else raw_object(raw)
    if obj is None:
        return None
    if in_meta:
        meta = raw_object(obj["_meta"]) if "_meta" in obj else {}
        if meta is None:  # a non-object `_meta` belongs to someone else; do not touch it
            return None
        for key, value in items.items():
            meta[key] = raw_value(value)
        obj["_meta"] = raw_value(meta)
    else:
        for key, value in items.items():
            obj[key] = raw_value(value)
    return raw_value(obj)


def with_result_fields(msg: Message, fields: dict[str, Any]) -> Message:
    """Set top-level members of a response's ``result`` object (e.g. ``mcpSessionId``)."""
    raw = _with_keys(msg.result, fields, in_meta=False)
    return msg if raw is None else msgspec.structs.replace(msg, result=raw)


def with_meta(msg: Message, items: dict[str, Any]) -> Message:
    """Add ``_meta`` entries where the MCP schema allows them.

    - a result: ``result._meta`` (every MCP Result has an optional ``_meta``);
    - a request or notification: ``params._meta`` (params are created if absent);
    - an error response: ``error.data`` when it is absent or an object, since JSON-RPC error
      objects have no ``_meta``; any other ``data`` is left untouched.
    """
    if msg.result is not NO_RAW:
        raw = _with_keys(msg.result, items, in_meta=True)
        return msg if raw is None else msgspec.structs.replace(msg, result=raw)
    if msg.error is not NO_RAW:
        err = raw_object(msg.error)
        if err is None:
            return msg
        data = _with_keys(err.get("data", NO_RAW), items, in_meta=False)
        if data is None:
            return msg
        err["data"] = data
        return msgspec.structs.replace(msg, error=raw_value(err))
    raw = _with_keys(msg.params, items, in_meta=True)
    return msg if raw is None else msgspec.structs.replace(msg, params=raw)


def _without_key(raw: Raw, key: str, *, in_meta: bool) -> Raw | None:
    """``raw`` without ``key`` (in its ``_meta`` if ``in_meta``); None if it had none."""
    obj = raw_object(raw)
    if obj is None:
        return None
    if not in_meta:
        if obj.pop(key, None) is None:
            return None
        return raw_value(obj)
    meta = raw_object(obj["_meta"]) if "_meta" in obj else None
    if meta is None or meta.pop(key, None) is None:
        return None
    if meta:
        obj["_meta"] = raw_value(meta)
    else:
        del obj["_meta"]
    return raw_value(obj)


def without_lsn(data: bytes) -> bytes:
    """A logged message as a transport that carries the LSN elsewhere sends it.

    The inverse of the ``META_LSN`` entry ``with_meta`` added (an SSE event id already says
    where the message is in the log, and some checks want an empty result to be ``{}``).
    """
    msg = _DECODER.decode(data)
    if msg.result is not NO_RAW:
        raw = _without_key(msg.result, META_LSN, in_meta=True)
        return data if raw is None else encode(msgspec.structs.replace(msg, result=raw))
    if msg.error is not NO_RAW:
        err = raw_object(msg.error)
        if err is None or "data" not in err:
            return data
        stripped = _without_key(err["data"], META_LSN, in_meta=False)
        if stripped is None:
            return data
        if bytes(stripped) == b"{}":
            del err["data"]
        else:
            err["data"] = stripped
        return encode(msgspec.structs.replace(msg, error=raw_value(err)))
    raw = _without_key(msg.params, META_LSN, in_meta=True)
    if raw is None:
        return data
    params = NO_RAW if bytes(raw) == b"{}" else raw
    return encode(msgspec.structs.replace(msg, params=params))


# --- partial views of the few payloads the proxy must understand -----------------------


class _InitializeParams(msgspec.Struct):
    """The parts of `initialize` params the SEP resume flow reads."""

    mcpSessionId: str | None = None
    meta: dict[str, Any] | None = msgspec.field(default=None, name="_meta")


class _CancelParams(msgspec.Struct):
    requestId: RequestId | None = None


class _NamedParams(msgspec.Struct):
    name: str | None = None


class _UriParams(msgspec.Struct):
    uri: str | None = None


class _LevelParams(msgspec.Struct):
    level: str | None = None


class _RelatedTask(msgspec.Struct):
    taskId: str | None = None


class _RoutingMeta(msgspec.Struct):
    progressToken: RequestId | None = None
    related_task: _RelatedTask | None = msgspec.field(
        default=None, name="io.modelcontextprotocol/related-task"
    )


class _RoutingParams(msgspec.Struct):
    """What stream routing reads: progress tokens and task ids (never anything else)."""

    meta: _RoutingMeta | None = msgspec.field(default=None, name="_meta")
    progressToken: RequestId | None = None  # notifications/progress carries it in params
    taskId: str | None = None  # tasks/get, tasks/result, tasks/cancel


class _ProgressParams(msgspec.Struct):
    progress: float | None = None


class _VersionResult(msgspec.Struct):
    protocolVersion: str | None = None


class _ToolAnnotations(msgspec.Struct):
    readOnlyHint: bool | None = None
    idempotentHint: bool | None = None


class _Tool(msgspec.Struct):
    name: str
    annotations: _ToolAnnotations | None = None


class _ToolList(msgspec.Struct):
    tools: list[_Tool] = []
    nextCursor: str | None = None


class _Capabilities(msgspec.Struct):
    tools: dict[str, Any] | None = None


class _ServerCapabilities(msgspec.Struct):
    capabilities: _Capabilities | None = None


def _partial(raw: Raw, typ: type[Any]) -> Any:
    if raw is NO_RAW:
        return None
    try:
        return msgspec.json.decode(raw, type=typ)
    except (msgspec.DecodeError, RecursionError):  # RecursionError: see raw_object
        return None


def initialize_hints(msg: Message) -> tuple[str | None, int | None]:
    """The session id and LSN cursor a (re-)``initialize`` carries, if any.

    The SEP (draft v3) puts ``mcpSessionId`` "in the JSON-RPC package" without pinning where;
    we accept, in order: the top-level member, ``params.mcpSessionId``,
    ``params._meta.mcpSessionId``. The cursor is ``params._meta["io.mcproxy/lastLsn"]``.
    """
    session_id = msg.mcpSessionId if isinstance(msg.mcpSessionId, str) else None
    cursor: int | None = None
    params = _partial(msg.params, _InitializeParams)
    if params is not None:
        session_id = session_id or params.mcpSessionId
        meta = params.meta or {}
        if session_id is None and isinstance(meta.get(SESSION_ID_FIELD), str):
            session_id = meta[SESSION_ID_FIELD]
        last = meta.get(META_LAST_LSN)
        if isinstance(last, int) and not isinstance(last, bool) and last >= 0:
            cursor = last
    return session_id, cursor


def strip_session_hints(msg: Message) -> Message:
    """Remove the SEP's ``mcpSessionId`` (and our cursor) before a message goes upstream."""
    if msg.mcpSessionId is not UNSET:
        msg = msgspec.structs.replace(msg, mcpSessionId=UNSET)
    obj = raw_object(msg.params)
    if obj is None:
        return msg
    changed = obj.pop(SESSION_ID_FIELD, None) is not None
    meta = raw_object(obj["_meta"]) if "_meta" in obj else None
    if meta is not None:
        dropped = [meta.pop(k, None) for k in (SESSION_ID_FIELD, META_LAST_LSN)]
        if any(d is not None for d in dropped):
            changed = True
            if meta:
                obj["_meta"] = raw_value(meta)
            else:
                del obj["_meta"]
    return msgspec.structs.replace(msg, params=raw_value(obj)) if changed else msg


def cancelled_request_id(msg: Message) -> RequestId | None:
    params = _partial(msg.params, _CancelParams)
    return None if params is None else params.requestId


def with_cancelled_request_id(msg: Message, request_id: RequestId) -> Message:
    raw = _with_keys(msg.params, {"requestId": request_id}, in_meta=False)
    return msg if raw is None else msgspec.structs.replace(msg, params=raw)


def tool_name(msg: Message) -> str | None:
    params = _partial(msg.params, _NamedParams)
    return None if params is None else params.name


def uri_param(msg: Message) -> str | None:
    params = _partial(msg.params, _UriParams)
    return None if params is None else params.uri


def level_param(msg: Message) -> str | None:
    params = _partial(msg.params, _LevelParams)
    return None if params is None else params.level


def offers_tools(init_result: Raw) -> bool:
    """Whether an InitializeResult declares the ``tools`` capability (server/tools)."""
    parsed = _partial(init_result, _ServerCapabilities)
    return (
        parsed is not None
        and parsed.capabilities is not None
        and (parsed.capabilities.tools is not None)
    )


def next_cursor(result: Raw) -> str | None:
    """``nextCursor`` of a paginated result (basic/utilities/pagination); None on the last."""
    listing = _partial(result, _ToolList)
    return None if listing is None else listing.nextCursor


def idempotent_tools(result: Raw) -> tuple[set[str], set[str]]:
    """From a ``tools/list`` result: (tools safe to repeat, tools listed).

    MCP 2025-11-25 server/tools §"Tool annotations": ``readOnlyHint`` means no side effects,
    ``idempotentHint`` means repeating a call with the same arguments has no further effect.
    Either makes a call safe to re-issue after the upstream was lost.
    """
    listing = _partial(result, _ToolList)
    if listing is None:
        return set(), set()
    safe = {
        t.name
        for t in listing.tools
        if t.annotations is not None
        and (t.annotations.readOnlyHint is True or t.annotations.idempotentHint is True)
    }
    return safe, {t.name for t in listing.tools}


def routing_keys(msg: Message) -> tuple[str | None, str | None]:
    """(progress token key, task id) a message refers to, for stream routing.

    A request names its progress token in ``params._meta.progressToken`` (basic/utilities/
    progress) and a task in ``params.taskId``; a ``notifications/progress`` names the token in
    ``params.progressToken``; any message may carry the related-task tag in ``_meta``
    (basic/utilities/tasks §"Associating Task-Related Messages").
    """
    params = _partial(msg.params, _RoutingParams)
    if params is None:
        return None, None
    token = params.progressToken
    task = params.taskId
    if params.meta is not None:
        if token is None:
            token = params.meta.progressToken
        if task is None and params.meta.related_task is not None:
            task = params.meta.related_task.taskId
    return (None if token is None or isinstance(token, bool) else id_key(token)), task


def progress_value(msg: Message) -> float | None:
    """``params.progress`` of a ``notifications/progress`` (basic/utilities/progress)."""
    params = _partial(msg.params, _ProgressParams)
    return None if params is None else params.progress


def protocol_version(raw: Raw) -> str | None:
    """``protocolVersion`` of initialize params or of an InitializeResult."""
    parsed = _partial(raw, _VersionResult)
    return None if parsed is None else parsed.protocolVersion
