"""An upstream MCP server reached over Streamable HTTP: the client side of MCP 2025-11-25
basic/transports §"Streamable HTTP", on aiohttp.

One ``HttpUpstream`` is one upstream MCP session (one ``Mcp-Session-Id``) serving one proxy
session, the way a ``StdioUpstream`` is one child process. ``start()`` checks that the endpoint
answers (and ends the upstream session a killed proxy left behind); the core then sends
``initialize`` through ``send()`` as it would to a child, and everything else follows it.

- **Sending** (§"Sending Messages to the Server"): every message is one POST. Requests are
  POSTed at once, each in its own task, and their answer (``application/json``, or an SSE
  stream carrying notifications, server requests and finally the response) is read there, so
  a long tool call never holds up later messages. Every message read from a request's stream
  is handed to the session with ``related`` = that request's id (the ids the upstream sees are
  the proxy's integers), which is how the core puts it on the right client stream (the SHOULD
  of §"Sending Messages" item 6). Notifications and responses are POSTed one at a time, in
  order (202 expected).
- **Listening** (§"Listening for Messages from the Server"): after
  ``notifications/initialized`` a GET stream carries what relates to no request
  (``related=None``); a server that answers 405 has none.
- **Resuming** (§"Resumability and Redelivery"): when a stream breaks (a cut connection, a
  read timeout, or a server closing it early to poll, SEP-1699), it is resumed with a GET and
  ``Last-Event-ID`` after the server's ``retry`` (1 s if it gave none), doubling on each
  failed attempt, at most ``upstream.sse_max_reconnects`` failures in a row. Messages are
  handed over once each: the cursor moves past an event when it is delivered. A stream that
  cannot be resumed (no event id seen, attempts exhausted, resumption refused) means the
  upstream is lost: ``on_upstream_lost``, and the core re-issues what is safe to repeat and
  answers the rest "outcome unknown". No request is ever left waiting on a dead stream.
- **Session** (§"Session Management"): the ``Mcp-Session-Id`` of the initialize answer goes
  on every later request, with ``MCP-Protocol-Version`` (§"Protocol Version Header"). A 404
  for it means the upstream ended it (it restarted, or expired the session): the upstream is
  lost, and the runner starts a new instance, which the core re-initializes from the stored
  ``initialize``, log level and subscriptions. A request answered that way (404, or a 400
  saying the session is unknown or not initialized) was refused before anything ran, so it
  is reported ``unsent`` with the loss, as are the requests still waiting in the outbox: the
  core sends them to the new upstream session as they are, whatever the tool's annotations,
  instead of answering "outcome unknown". ``aclose()`` DELETEs the session. Its id is
  persisted with the proxy session (``StateSlot``), so that after a proxy crash the next
  ``start()`` DELETEs it instead of leaking it.

The upstream's session id and event ids never leave this object and the store: the proxy's
clients see the proxy's own session ids and LSNs only. Timeouts: ``connect_timeout_s`` per
connection, ``read_timeout_s`` of silence per read; nothing here waits unbounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import urlsplit

import aiohttp
import msgspec
import structlog

from mcproxy import __version__
from mcproxy.config import LOOPBACK_HOSTS, UpstreamConfig
from mcproxy.core import jsonrpc
from mcproxy.core.framing import SseParser
from mcproxy.core.ids import short_id
from mcproxy.errors import ConfigError, LineTooLong, MCProxyError, ProtocolError, UpstreamError
from mcproxy.tasks import TaskSet
from mcproxy.upstreams.base import UpstreamHandler

log = structlog.get_logger("mcproxy")

SESSION_HEADER: Final = "Mcp-Session-Id"
VERSION_HEADER: Final = "MCP-Protocol-Version"
LAST_EVENT_ID_HEADER: Final = "Last-Event-ID"
JSON_TYPE: Final = "application/json"
SSE_TYPE: Final = "text/event-stream"
# transports §"Sending Messages to the Server": a POST accepts both answer forms.
POST_ACCEPT: Final = f"{JSON_TYPE}, {SSE_TYPE}"
# transports §Resumability: wait `retry` ms before reconnecting; with none given, the SDK's
# client waits 1 s, and so does this one.
DEFAULT_RETRY_MS: Final = 1000
# Ending an upstream session (DELETE) is a courtesy: bounded, and never worth a longer wait.
DELETE_TIMEOUT_S: Final = 2.0
# A gateway in front of the upstream says the upstream is not there (RFC 9110 §15.6.3-5).
_GATEWAY_ERRORS: Final = frozenset({502, 503, 504})
# Worth another try when resuming a stream: a GET stream still open on the server (409, the
# SDK allows one), throttling, a gateway without its upstream.
_TRANSIENT: Final = frozenset({409, 425, 429, *_GATEWAY_ERRORS})
_ERROR_BODY_MAX: Final = 64 * 1024  # of an HTTP error answer, read for its JSON-RPC error
# A 400 whose body says this refused the request for its session, not for its content: the
# SDKs answer "No valid session ID provided" (Python) or "Server not initialized" (TypeScript)
# to a session id that a restarted server does not know.
_NO_SESSION_HINTS: Final = (b"session", b"not initialized")
# After its response a request's stream ends (transports §"Sending Messages" item 6.4).
# Reading up to that end lets the connection be reused (measured: half of the latency mcproxy
# adds per call); a server that keeps the stream open is cut after this.
_DRAIN_TIMEOUT_S: Final = 1.0
_NETWORK_ERRORS: Final = (aiohttp.ClientError, TimeoutError, OSError)


class StateSlot(Protocol):
    """Where an upstream keeps the little that must outlive the proxy process (the daemon
    backs it with the session's row in the store)."""

    async def load(self) -> str | None:
        """The last saved value (None if none)."""

    def save(self, value: str | None) -> None:
        """Replace the value (queued; durable with the next group commit)."""


@dataclass(frozen=True, slots=True)
class HttpOptions:
    """What every upstream session to one endpoint shares; built once, at daemon start."""

    url: str
    headers: Mapping[str, str]
    token: str | None = None  # from the environment, read once
    token_file: Path | None = None  # re-read for each new upstream session (rotation)
    ssl: ssl.SSLContext | bool = True  # True: verify against the system trust store

    @classmethod
    def from_config(
        cls, url: str, config: UpstreamConfig, environ: Mapping[str, str]
    ) -> HttpOptions:
        """Resolve the credentials and the TLS settings now, so a mistake stops the daemon at
        start rather than failing every session later.

        Raises:
            ConfigError: the token's variable is unset or empty, its file unreadable, or the
                CA file unusable.
        """
        token = None
        if config.bearer_token_env:
            name = config.bearer_token_env
            value = environ.get(name)
            if value is None:
                raise ConfigError(
                    f"upstream.bearer_token_env: the environment variable {name} is not set"
                )
            token = _clean_token(value, f"the environment variable {name}", ConfigError)
        token_file = None
        if config.bearer_token_file:
            token_file = Path(config.bearer_token_file).expanduser()
            try:
                _read_token(token_file)
            except UpstreamError as exc:
                raise ConfigError(f"upstream.bearer_token_file: {exc}") from None
        context: ssl.SSLContext | bool = True
        if not config.tls_verify:
            context = False
            log.warning("upstream.tls_unverified", url=_redacted(url))
        elif config.tls_ca_file:
            try:
                context = ssl.create_default_context(cafile=config.tls_ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"upstream.tls_ca_file: {exc}") from None
        parts = urlsplit(url)
        if (
            (token or token_file)
            and parts.scheme == "http"
            and parts.hostname not in LOOPBACK_HOSTS
        ):
            log.warning("upstream.token_over_plain_http", url=_redacted(url))
        return cls(url, dict(config.headers), token, token_file, context)

    def session_headers(self) -> dict[str, str]:
        """The headers of every request of a new upstream session.

        Raises:
            UpstreamError: the token file cannot be read any more.
        """
        headers = {"User-Agent": f"mcproxy/{__version__}", **self.headers}
        token = self.token if self.token_file is None else _read_token(self.token_file)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return headers


def _clean_token(value: str, where: str, error: type[MCProxyError]) -> str:
    token = value.strip()
    if not token:
        raise error(f"{where} is empty")
    if any(c in token for c in "\r\n\0"):
        raise error(f"{where} holds more than one line")
    return token


def _read_token(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UpstreamError(f"cannot read the bearer token file {path}: {exc}") from None
    return _clean_token(text, f"the bearer token file {path}", UpstreamError)


def _redacted(url: str) -> str:
    """The URL without its query, which may carry a key: what the logs may show."""
    return urlsplit(url)._replace(query="").geturl()


def _valid_session_id(value: str) -> bool:
    # transports §"Session Management": visible ASCII only (0x21-0x7E).
    return bool(value) and all(0x21 <= ord(c) <= 0x7E for c in value)


async def _drain(resp: aiohttp.ClientResponse) -> None:
    with contextlib.suppress(*_NETWORK_ERRORS):
        async with asyncio.timeout(_DRAIN_TIMEOUT_S):
            while await resp.content.readany():
                pass  # anything after the response belongs to no request: dropped


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


class _Head(msgspec.Struct, gc=False):
    """Just enough of a message to route it: the rest is skipped while decoding."""

    id: int | str | None = None
    method: str | None = None


_HEAD: Final = msgspec.json.Decoder(_Head)
_BATCH: Final = msgspec.json.Decoder(list[msgspec.Raw])


def _head(data: bytes) -> _Head:
    try:
        return _HEAD.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return _Head()  # not routable; the session drops it as junk


@dataclass(slots=True)
class _Stream:
    """One SSE stream's resumption state (transports §Resumability)."""

    what: str  # for the logs: "tools/call 7", "the GET stream"
    request_id: int | str | None = None  # the request it answers; None: the GET stream
    last_id: str | None = None
    retry_ms: int = DEFAULT_RETRY_MS
    answered: bool = False

    @property
    def related(self) -> int | None:
        rid = self.request_id
        return rid if isinstance(rid, int) and not isinstance(rid, bool) else None


class HttpUpstream:
    """One upstream MCP session over Streamable HTTP. ``start()``, ``send()``, ``aclose()``."""

    def __init__(
        self,
        options: HttpOptions,
        handler: UpstreamHandler,
        config: UpstreamConfig,
        session_label: str,
        state: StateSlot | None = None,
        resume: bool = False,
    ) -> None:
        """``resume``: take up the initialized upstream session recorded in ``state`` (a
        reload in place released it, ``release``) instead of ending it as stale."""
        self.options = options
        self._resume_session = resume
        self.url = options.url
        self.handler = handler
        self.config = config
        self.session_label = session_label
        self.state = state
        # The upstream's session id and negotiated version: private to the proxy.
        self.session_id: str | None = None
        self.protocol_version: str | None = None
        self._http: aiohttp.ClientSession | None = None
        self._headers: dict[str, str] = {}  # the MCP headers of every request after initialize
        self._outbox: deque[bytes] = deque()
        self._wakeup = asyncio.Event()
        # A stream reader or the writer that dies of an unexpected error loses the upstream
        # (the session re-issues or answers what was in flight) rather than leaving a request
        # waiting forever on a task that no longer exists (issue 16 item 5).
        self._tasks = TaskSet(f"upstream:{session_label}", self._task_failed)
        self._ending = TaskSet(f"upstream-end:{session_label}")  # survives _tasks.cancel_all
        self._listening = False
        self._closing = False
        self._lost = False
        self._refused: set[int] = set()  # request ids the upstream provably did not accept
        self._delay_cap_s = max(config.respawn_max_delay_s, DEFAULT_RETRY_MS / 1000)

    # --- Upstream protocol ------------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP client and make sure the endpoint answers; end a stale session."""
        cfg = self.config
        http = aiohttp.ClientSession(
            headers=self.options.session_headers(),
            # No pool limit: each request in flight holds a connection for its answer stream,
            # and a cap would queue a quick call behind long-running ones.
            connector=aiohttp.TCPConnector(limit=0, ssl=self.options.ssl),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=cfg.connect_timeout_s, sock_read=cfg.read_timeout_s
            ),
        )
        try:
            status = await (self._take_up(http) if self._resume_session else self._probe(http))
        except BaseException as exc:  # a cancelled start too: never leave the client open
            await http.close()
            if isinstance(exc, _NETWORK_ERRORS):
                where = _redacted(self.url)
                raise UpstreamError(f"cannot reach {where}: {_describe(exc)}") from exc
            raise
        if status in _GATEWAY_ERRORS:
            await http.close()
            raise UpstreamError(f"{_redacted(self.url)} answered HTTP {status}")
        self._http = http
        log.info("upstream.connected", session=self.session_label, url=_redacted(self.url))
        self._tasks.spawn(self._write_loop(), f"writer:{self.session_label}")
        if self._resume_session:  # initialized already: the GET stream is opened again
            self._listening = True
            stream = _Stream("the GET stream")
            self._tasks.spawn(self._listen(stream), f"get:{self.session_label}")

    async def _take_up(self, http: aiohttp.ClientSession) -> int:
        """``start`` after a reload in place: the recorded session is ours again, with its
        negotiated version; the endpoint is probed like any start (OPTIONS)."""
        recorded = await self._stale_session()
        if recorded is None:
            raise UpstreamError("no upstream session recorded to take up")
        self.session_id, self.protocol_version = recorded
        self._headers[SESSION_HEADER] = self.session_id
        if self.protocol_version:
            self._headers[VERSION_HEADER] = self.protocol_version
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self.config.connect_timeout_s,
            sock_read=self.config.connect_timeout_s,
        )
        async with http.options(self.url, timeout=timeout, allow_redirects=False) as resp:
            log.info(
                "upstream.session_taken_up",
                session=self.session_label,
                upstream_session=short_id(self.session_id),
            )
            return resp.status

    def send(self, data: bytes) -> None:
        if self._closing or self._lost or self._http is None:
            return  # the loss is (being) reported; the session re-routes
        self._outbox.append(data)
        self._wakeup.set()

    async def release(self) -> None:
        """A reload in place: let the upstream session go without ending it (no DELETE):
        its id stays recorded in ``state`` for the next program (``resume``). The answer
        streams of requests in flight are cut; never reports ``on_upstream_lost``."""
        self._closing = True
        await self._tasks.cancel_all()
        await self._ending.cancel_all()
        await self._close_http()

    async def aclose(self) -> None:
        """End the upstream session (DELETE, best effort) and release everything. Bounded;
        never reports ``on_upstream_lost``."""
        self._closing = True
        await self._tasks.cancel_all()
        await self._ending.cancel_all()
        await self._end_session()
        await self._close_http()

    # --- start ------------------------------------------------------------------------

    async def _probe(self, http: aiohttp.ClientSession) -> int:
        """One request whose answer, any answer, shows the endpoint is reachable (DNS, TCP,
        TLS): the DELETE of a session a killed proxy left behind, else an OPTIONS (RFC 9110
        §9.3.7: safe; servers without it say 405). A refused connection or a bad certificate
        is then a clear "cannot start", answered at once, instead of requests waiting on it."""
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self.config.connect_timeout_s,
            sock_read=self.config.connect_timeout_s,
        )
        stale = await self._stale_session()
        if stale is None:
            async with http.options(self.url, timeout=timeout, allow_redirects=False) as resp:
                return resp.status
        session_id, version = stale
        headers = {SESSION_HEADER: session_id}
        if version:
            headers[VERSION_HEADER] = version
        async with http.delete(
            self.url, headers=headers, timeout=timeout, allow_redirects=False
        ) as resp:
            status = resp.status
        # 2xx: ended; 404: already gone; 405: the server does not let clients end sessions.
        log.info("upstream.stale_session_ended", session=self.session_label, status=status)
        if self.state is not None:
            self.state.save(None)
        return status

    async def _stale_session(self) -> tuple[str, str | None] | None:
        """The upstream session a previous proxy process left open, if it was at this URL."""
        if self.state is None:
            return None
        try:
            raw = await self.state.load()
        except MCProxyError as exc:
            log.warning("upstream.state_unreadable", session=self.session_label, error=str(exc))
            return None
        if raw is None:
            return None
        try:
            memo = json.loads(raw)
            session_id, url, version = memo["session"], memo["url"], memo.get("version")
        except (ValueError, KeyError, TypeError):
            return None
        if url != self.url or not isinstance(session_id, str) or not _valid_session_id(session_id):
            return None  # the target changed: that session is not ours to end any more
        return session_id, version if isinstance(version, str) else None

    # --- sending ----------------------------------------------------------------------

    async def _write_loop(self) -> None:
        outbox = self._outbox
        while True:
            if not outbox:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            data = outbox.popleft()
            head = _head(data)
            if head.method is not None and head.id is not None:
                stream = _Stream(f"{head.method} {head.id}", head.id)
                initialize = head.method == "initialize"
                self._tasks.spawn(self._request(data, stream, initialize), f"post:{stream.what}")
                continue
            if not await self._post(data, head.method or "response"):
                return
            if head.method == "notifications/initialized" and not self._listening:
                self._listening = True
                stream = _Stream("the GET stream")
                self._tasks.spawn(self._listen(stream), f"get:{self.session_label}")

    async def _post(self, data: bytes, what: str) -> bool:
        """POST a notification or a response; False if the upstream is now lost."""
        assert self._http is not None
        try:
            async with self._http.post(
                self.url, data=data, headers=self._post_headers(), allow_redirects=False
            ) as resp:
                if await self._session_unknown(resp):
                    self._lose(f"upstream session unknown (HTTP {resp.status})", ended=True)
                    return False
                if not self._session_alive(resp):
                    return False
                if resp.status >= 300:
                    # transports §"Sending Messages" item 4: not accepted. There is nobody to
                    # answer; the log says what the upstream refused.
                    body = await resp.content.read(_ERROR_BODY_MAX)
                    log.warning(
                        "upstream.http_refused",
                        session=self.session_label,
                        message=what,
                        status=resp.status,
                        body=body[:200].decode("utf-8", "replace"),
                    )
        except _NETWORK_ERRORS as exc:
            self._lose(f"cannot send {what} to the upstream: {_describe(exc)}")
            return False
        return True

    def _post_headers(self) -> dict[str, str]:
        return {"Content-Type": JSON_TYPE, "Accept": POST_ACCEPT, **self._headers}

    async def _request(self, data: bytes, stream: _Stream, initialize: bool) -> None:
        """POST one request and hand over everything its answer carries, resuming its SSE
        stream if it breaks before the response."""
        assert self._http is not None
        why = "the stream ended before the response"
        try:
            async with self._http.post(
                self.url, data=data, headers=self._post_headers(), allow_redirects=False
            ) as resp:
                if await self._session_unknown(resp):
                    # Refused before anything ran: not "outcome unknown", but sent again to
                    # the next upstream session (after its initialize).
                    if stream.related is not None:
                        self._refused.add(stream.related)
                    self._lose(f"upstream session unknown (HTTP {resp.status})", ended=True)
                    return
                if not self._session_alive(resp):
                    return
                if resp.status >= 300:
                    await self._answer_http_error(resp, stream)
                    return
                if initialize and not self._adopt_session(resp, stream):
                    return
                if resp.content_type == SSE_TYPE:
                    await self._read_events(resp, stream, initialize)
                    if stream.answered:
                        await _drain(resp)
                elif resp.content_type == JSON_TYPE:
                    await self._read_json(resp, stream, initialize)
                    return
                elif resp.status == 202:
                    # Not a valid answer to a request; an old-style server may send the
                    # response on the GET stream instead. Nothing to read here.
                    log.info("upstream.request_accepted", session=self.session_label)
                    return
                else:
                    self._answer(stream, f"upstream answered {resp.content_type or 'no body'}")
                    return
        except LineTooLong as exc:
            self._lose(f"{stream.what}: {exc}")
            return
        except _NETWORK_ERRORS as exc:
            why = _describe(exc)
            log.info(
                "upstream.stream_broken", session=self.session_label, stream=stream.what, error=why
            )
        if not stream.answered:
            await self._resume(stream, initialize, why)

    async def _session_unknown(self, resp: aiohttp.ClientResponse) -> bool:
        """The answer proves the upstream refused a POST for its session (so did not act on
        it): 404 for our session id (transports §"Session Management" item 4), or a 400 whose
        body says the session is unknown or not initialized (a restarted SDK server)."""
        if self.session_id is None:
            return False
        if resp.status == 404:
            return True
        if resp.status != 400:
            return False
        body = (await resp.content.read(_ERROR_BODY_MAX)).lower()
        return any(hint in body for hint in _NO_SESSION_HINTS)

    def _session_alive(self, resp: aiohttp.ClientResponse, resuming: bool = False) -> bool:
        """False (and the upstream lost) if the answer says the session or the server is
        gone: 404 for our session id (transports §"Session Management" item 4: start a new
        session), or a gateway without its upstream. ``resuming``: a gateway error is one
        more failed attempt instead (the session may well be alive behind it)."""
        if resp.status == 404 and self.session_id is not None:
            self._lose("upstream session expired (HTTP 404)", ended=True)
            return False
        if resp.status in _GATEWAY_ERRORS and not resuming:
            self._lose(f"upstream unavailable (HTTP {resp.status})")
            return False
        return True

    def _adopt_session(self, resp: aiohttp.ClientResponse, stream: _Stream) -> bool:
        session_id = resp.headers.get(SESSION_HEADER)
        if session_id is None:
            return True  # a server without sessions
        if not _valid_session_id(session_id):
            self._answer(stream, "upstream sent an invalid Mcp-Session-Id")
            return False
        self.session_id = session_id
        self._headers[SESSION_HEADER] = session_id
        return True

    async def _answer_http_error(self, resp: aiohttp.ClientResponse, stream: _Stream) -> None:
        """An HTTP error for a request (transports §"Sending Messages" item 4): answer it
        ourselves, saying what the upstream said."""
        if 300 <= resp.status < 400:
            where = resp.headers.get("Location", "?")
            message = f"upstream redirects to {where}; make that URL the upstream target"
        else:
            message = f"upstream answered HTTP {resp.status} {resp.reason or ''}".rstrip()
        data: dict[str, object] = {"httpStatus": resp.status}
        body = await resp.content.read(_ERROR_BODY_MAX)
        try:
            msg = jsonrpc.decode(body)
        except ProtocolError:
            msg = None
        if msg is not None and msg.error is not jsonrpc.NO_RAW:
            # As data, not as the error itself: its code means something on the upstream's
            # side of the proxy (-32001 there is not the proxy's "session not found").
            data["upstreamError"] = msg.error
        log.warning(
            "upstream.http_error",
            session=self.session_label,
            stream=stream.what,
            status=resp.status,
        )
        self._answer(stream, message, data)

    def _answer(self, stream: _Stream, message: str, data: object = None) -> None:
        """Answer the stream's request ourselves: the upstream's answer cannot be read."""
        assert stream.request_id is not None
        error = jsonrpc.error_bytes(stream.request_id, jsonrpc.INTERNAL_ERROR, message, data)
        self._deliver(error, stream, False)

    # --- receiving --------------------------------------------------------------------

    async def _read_json(
        self, resp: aiohttp.ClientResponse, stream: _Stream, initialize: bool
    ) -> None:
        limit = self.config.max_line_bytes
        if resp.content_length is not None and resp.content_length > limit:
            raise LineTooLong(f"JSON answer of {resp.content_length} bytes exceeds {limit}")
        body = bytearray()
        async for chunk in resp.content.iter_any():
            body += chunk
            if len(body) > limit:
                raise LineTooLong(f"JSON answer exceeds {limit} bytes")
        if body.lstrip()[:1] == b"[":  # a 2025-03-26 server may answer with a batch
            try:
                items = [bytes(item) for item in _BATCH.decode(body)]
            except msgspec.DecodeError:
                items = [bytes(body)]
        else:
            items = [bytes(body)]
        for item in items:
            self._deliver(item, stream, initialize)
        if not stream.answered:
            self._answer(stream, "upstream's JSON answer held no response to the request")

    async def _read_events(
        self, resp: aiohttp.ClientResponse, stream: _Stream, initialize: bool = False
    ) -> None:
        """Hand over the events of one SSE connection until it ends or the response came."""
        parser = SseParser(self.config.max_line_bytes)
        async for chunk in resp.content.iter_any():
            for event in parser.feed(chunk):
                if event.retry is not None:
                    stream.retry_ms = event.retry
                if event.event == "message" and event.data.strip():
                    self._deliver(event.data, stream, initialize)
                # Past this event now (it was handed over, if it carried a message): a resume
                # asks for what follows it, so nothing is delivered twice.
                if event.id is not None:
                    stream.last_id = event.id or None
                if stream.answered:
                    return

    def _deliver(self, data: bytes, stream: _Stream, initialize: bool) -> None:
        rid = stream.request_id
        if rid is not None:
            head = _head(data)
            if head.method is None and head.id == rid and type(head.id) is type(rid):
                stream.answered = True
                if initialize:
                    self._adopt_version(data)
        self.handler.on_upstream_message(data, stream.related)

    def _adopt_version(self, data: bytes) -> None:
        """transports §"Protocol Version Header": the negotiated version goes on every later
        request. Learnt before the session sees the answer, which sends the next messages."""
        try:
            msg = jsonrpc.decode(data)
        except ProtocolError:
            return
        if msg.result is jsonrpc.NO_RAW:
            return
        self.protocol_version = jsonrpc.protocol_version(msg.result)
        if self.protocol_version:
            self._headers[VERSION_HEADER] = self.protocol_version
        if self.session_id is not None:
            log.info(
                "upstream.session",
                session=self.session_label,
                upstream_session=short_id(self.session_id),
                version=self.protocol_version,
            )
            if self.state is not None:
                memo = {"url": self.url, "session": self.session_id}
                if self.protocol_version:
                    memo["version"] = self.protocol_version
                self.state.save(json.dumps(memo))

    def _get_headers(self, last_id: str | None) -> dict[str, str]:
        headers = {"Accept": SSE_TYPE, **self._headers}
        if last_id is not None:
            headers[LAST_EVENT_ID_HEADER] = last_id
        return headers

    async def _resume(self, stream: _Stream, initialize: bool, why: str) -> None:
        """Resume a request's broken stream with GET + Last-Event-ID until its response."""
        assert self._http is not None
        failures = 0
        last_error = why
        while True:
            if stream.last_id is None:
                self._lose(f"{stream.what}: {last_error} (no event id to resume from)")
                return
            if failures >= self.config.sse_max_reconnects:
                self._lose(f"{stream.what}: not resumed after {failures} attempts: {last_error}")
                return
            await asyncio.sleep(self._delay(stream, failures))
            try:
                async with self._http.get(
                    self.url, headers=self._get_headers(stream.last_id), allow_redirects=False
                ) as resp:
                    if not self._session_alive(resp, resuming=True):
                        return
                    if resp.status != 200 or resp.content_type != SSE_TYPE:
                        last_error = f"resumption answered HTTP {resp.status}"
                        if resp.status not in _TRANSIENT:
                            self._lose(f"{stream.what}: {last_error}")
                            return
                        failures += 1
                        continue
                    log.info(
                        "upstream.stream_resumed", session=self.session_label, stream=stream.what
                    )
                    failures = 0
                    await self._read_events(resp, stream, initialize)
                    if stream.answered:
                        return
                    last_error = "the resumed stream ended before the response"
            except LineTooLong as exc:
                self._lose(f"{stream.what}: {exc}")
                return
            except _NETWORK_ERRORS as exc:
                failures += 1
                last_error = _describe(exc)

    async def _listen(self, stream: _Stream) -> None:
        """Keep the GET stream open for the session's life, resuming it after each break."""
        assert self._http is not None
        failures = 0
        opened = False  # once: a 404 after that is the session's end, not a missing stream
        last_error = ""
        while True:
            if opened or failures:
                if failures >= self.config.sse_max_reconnects:
                    self._lose(f"the GET stream could not be reopened: {last_error}")
                    return
                await asyncio.sleep(self._delay(stream, failures))
            try:
                async with self._http.get(
                    self.url, headers=self._get_headers(stream.last_id), allow_redirects=False
                ) as resp:
                    ok = resp.status == 200 and resp.content_type == SSE_TYPE
                    if not ok and not opened and resp.status not in _TRANSIENT:
                        # transports §"Listening for Messages": a server may offer no GET
                        # stream (it MUST say 405; some say 404 or 400, which must not be
                        # taken for the end of the session, or it would never last).
                        log.info(
                            "upstream.no_get_stream", session=self.session_label, status=resp.status
                        )
                        return
                    if not self._session_alive(resp, resuming=True):
                        return
                    if not ok:
                        failures += 1
                        last_error = f"HTTP {resp.status}"
                        continue
                    if opened:
                        log.info(
                            "upstream.stream_resumed",
                            session=self.session_label,
                            stream=stream.what,
                        )
                    opened = True
                    failures = 0
                    await self._read_events(resp, stream)
                    last_error = "the stream ended"
            except LineTooLong as exc:
                self._lose(f"the GET stream: {exc}")
                return
            except _NETWORK_ERRORS as exc:
                failures += 1
                last_error = _describe(exc)
                log.info(
                    "upstream.stream_broken",
                    session=self.session_label,
                    stream=stream.what,
                    error=last_error,
                )

    def _delay(self, stream: _Stream, failures: int) -> float:
        """transports §Resumability: wait `retry` before reconnecting; doubling while the
        upstream does not answer (so a dead one is given up on, in bounded time)."""
        return float(min(stream.retry_ms / 1000 * 2**failures, self._delay_cap_s))

    # --- ending -----------------------------------------------------------------------

    def _task_failed(self, task: asyncio.Task[object], exc: BaseException) -> None:
        self._lose(f"internal error in {task.get_name()}: {exc!r}")

    def _lose(self, reason: str, ended: bool = False) -> None:
        """The upstream session cannot go on: stop everything, then tell the session (once).
        ``ended``: the upstream already forgot the session (404), so no DELETE."""
        if self._closing or self._lost:
            return
        self._lost = True
        if ended:
            self.session_id = None
            self._forget()
        self._ending.spawn(self._teardown(reason), f"lost:{self.session_label}")

    async def _teardown(self, reason: str) -> None:
        await self._tasks.cancel_all()  # every stream reader and the writer
        await self._end_session()
        await self._close_http()
        if self._closing:
            return
        # Never POSTed (still in the outbox) or provably refused: they go to the next upstream
        # session as they are (``UpstreamHandler.on_upstream_lost``).
        unsent = set(self._refused)
        for data in self._outbox:
            head = _head(data)
            if head.method is not None and type(head.id) is int:
                unsent.add(head.id)
        self._outbox.clear()
        log.warning("upstream.lost", session=self.session_label, reason=reason, unsent=len(unsent))
        self.handler.on_upstream_lost(reason, unsent)

    async def _end_session(self) -> None:
        """transports §"Session Management" item 5: DELETE the session we no longer use."""
        session_id, http = self.session_id, self._http
        if session_id is None or http is None or http.closed:
            return
        self.session_id = None
        try:
            async with http.delete(
                self.url,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=DELETE_TIMEOUT_S),
                allow_redirects=False,
            ) as resp:
                status = resp.status
        except _NETWORK_ERRORS as exc:
            # Kept in the state: the next start() for this session tries again.
            log.info("upstream.delete_failed", session=self.session_label, error=_describe(exc))
            return
        log.info("upstream.session_ended", session=self.session_label, status=status)
        self._forget()

    def _forget(self) -> None:
        if self.state is not None:
            self.state.save(None)

    async def _close_http(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.close()
