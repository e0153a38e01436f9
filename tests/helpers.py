"""Test harness: the daemon as a real process, and a small raw WebSocket MCP client."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shlex
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Final, NamedTuple

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from mcproxy.client.connection import lsn_of

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_SERVER = ROOT / "tests" / "fixtures" / "server.py"
# Every wait in the tests is a multiple of this unit; raise it on a slow machine.
MS = 0.001 * float(os.environ.get("MCPROXY_TESTS_TIMEOUT_FACTOR", "1"))
TIMEOUT = 10_000 * MS
# Starting a process (Python importing the daemon or the mcp SDK) is the step a loaded
# machine slows most; a longer bound costs nothing when it starts in time.
STARTUP = 3 * TIMEOUT


def fixture_upstream() -> str:
    return f"stdio:{sys.executable} {FIXTURE_SERVER}"


class ProxyProcess:
    """``python -m mcproxy`` on an ephemeral port, its JSON log collected from stderr."""

    def __init__(
        self,
        db: Path,
        upstream: str | None = None,
        *extra: str,
        env: dict[str, str] | None = None,
        port: int = 0,
        pass_fds: tuple[int, ...] = (),
        cwd: Path = ROOT,
    ) -> None:
        self.db = db
        self.cwd = cwd  # `python -m mcproxy` imports the package found here first
        self.pass_fds = pass_fds  # descriptors the daemon inherits
        self.upstream = upstream or fixture_upstream()
        # A stdio child sees only an allow-list of the daemon's environment (upstream
        # .env_passthrough): the fixture's own variables are handed to it explicitly.
        for_child = {k: v for k, v in (env or {}).items() if k.startswith("FIXTURE_")}
        if for_child and self.upstream.startswith("stdio:"):
            assigned = " ".join(shlex.quote(f"{k}={v}") for k, v in for_child.items())
            self.upstream = f"stdio:env {assigned} {self.upstream[len('stdio:') :]}"
        self.extra = extra
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = port  # 0: an ephemeral port, a new one on each start
        self.logs: list[dict[str, Any]] = []
        self._ready = threading.Event()

    def start(self) -> ProxyProcess:
        self._ready.clear()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mcproxy",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--db",
                str(self.db),
                "--upstream",
                self.upstream,
                "--log-format",
                "json",
                *self.extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=self.cwd,
            pass_fds=self.pass_fds,
        )
        threading.Thread(target=self._drain, args=(self.proc,), daemon=True).start()
        if not self._ready.wait(STARTUP):
            self.kill()
            raise RuntimeError(f"proxy did not start: {self.logs[-5:]}")
        return self

    def _drain(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            try:
                entry = json.loads(raw)
            except ValueError:
                entry = {"event": "raw", "line": raw.decode(errors="replace")}
            self.logs.append(entry)
            if entry.get("event") == "daemon.listening":
                self.port = int(entry["port"])
                self._ready.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.logs if e.get("event") == name]

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as in a crash or an OOM kill."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(TIMEOUT)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(TIMEOUT)

    def upstream_pids(self) -> list[int]:
        return [int(e["pid"]) for e in self.events("upstream.spawned")]


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(proxy: ProxyProcess) -> Samples:
    """Every sample of the proxy's /metrics, by name and labels."""
    url = f"http://127.0.0.1:{proxy.port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        text = await resp.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def wait_for_metric(proxy: ProxyProcess, name: str, expected: float, **labels: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while value(await scrape(proxy), name, **labels) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} never became {expected}")
        await asyncio.sleep(10 * MS)


def free_port() -> int:
    """A port to restart a proxy on (clients that resume by themselves need the same URL)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); its state in /proc tells.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.split(")")[-1].split()[0] != "Z"


def rss(pid: int) -> int:
    """Resident memory of a process in bytes, from the kernel's own accounting."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def children_of(pid: int) -> set[int]:
    """The live children of ``pid`` (from every one of its threads)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            found |= {int(p) for p in (task / "children").read_text().split()}
    return found


def wait_until(predicate: Any, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(10 * MS)


async def eventually(predicate: Any, timeout: float = TIMEOUT) -> None:
    """``wait_until`` for conditions the test's own event loop must make true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(10 * MS)


def logged(db: Path, session_id: str, fragment: str) -> bool:
    """True once a message containing ``fragment`` is committed to the session's log."""
    import sqlite3

    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM events WHERE session_id = ? AND instr(payload, ?) > 0",
            (session_id, fragment.encode()),
        ).fetchone()
    return bool(rows[0])


# The database layout mcproxy 0.1 wrote (schema version 1), for migration and admin tests.
SCHEMA_V1 = (
    "CREATE TABLE sessions (id TEXT PRIMARY KEY, created_at REAL NOT NULL,"
    " last_seen_at REAL NOT NULL, init_request BLOB, init_result BLOB,"
    " initialized INTEGER NOT NULL DEFAULT 0, log_level TEXT,"
    " subscriptions TEXT NOT NULL DEFAULT '[]', safe_tools TEXT NOT NULL DEFAULT '[]',"
    " next_upstream_id INTEGER NOT NULL DEFAULT 1,"
    " next_server_id INTEGER NOT NULL DEFAULT 1, next_lsn INTEGER NOT NULL DEFAULT 1,"
    " delivered_lsn INTEGER NOT NULL DEFAULT 0);"
    "CREATE TABLE events (session_id TEXT NOT NULL, lsn INTEGER NOT NULL,"
    " created_at REAL NOT NULL, payload BLOB NOT NULL, PRIMARY KEY (session_id, lsn))"
    " WITHOUT ROWID;"
    "CREATE TABLE requests (session_id TEXT NOT NULL, client_key TEXT NOT NULL,"
    " upstream_id INTEGER NOT NULL, method TEXT NOT NULL, safe INTEGER NOT NULL,"
    " body BLOB, done INTEGER NOT NULL DEFAULT 0, lsn INTEGER,"
    " PRIMARY KEY (session_id, client_key)) WITHOUT ROWID;"
    "PRAGMA user_version=1;"
)
# The layout of schema version 5 (the last clustered by session), for the migration test.
SCHEMA_V5 = (
    "CREATE TABLE sessions (id TEXT PRIMARY KEY, created_at REAL NOT NULL,"
    " last_seen_at REAL NOT NULL, init_request BLOB, init_result BLOB,"
    " initialized INTEGER NOT NULL DEFAULT 0, log_level TEXT,"
    " subscriptions TEXT NOT NULL DEFAULT '[]', safe_tools TEXT NOT NULL DEFAULT '[]',"
    " next_upstream_id INTEGER NOT NULL DEFAULT 1,"
    " next_server_id INTEGER NOT NULL DEFAULT 1, next_lsn INTEGER NOT NULL DEFAULT 1,"
    " delivered_lsn INTEGER NOT NULL DEFAULT 0, upstream_state TEXT, principal TEXT);"
    "CREATE TABLE events (session_id TEXT NOT NULL, lsn INTEGER NOT NULL,"
    " created_at REAL NOT NULL, payload BLOB NOT NULL, stream INTEGER NOT NULL DEFAULT 0,"
    " PRIMARY KEY (session_id, lsn)) WITHOUT ROWID;"
    "CREATE TABLE requests (session_id TEXT NOT NULL, client_key TEXT NOT NULL,"
    " upstream_id INTEGER NOT NULL, method TEXT NOT NULL, safe INTEGER NOT NULL,"
    " body BLOB, done INTEGER NOT NULL DEFAULT 0, lsn INTEGER,"
    " stream INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (session_id, client_key)) WITHOUT ROWID;"
    "CREATE INDEX requests_in_flight ON requests (session_id) WHERE done = 0;"
    "PRAGMA user_version=5;"
)

INIT_PARAMS = {
    "protocolVersion": "2025-11-25",
    "capabilities": {"sampling": {}, "elicitation": {"form": {}}},
    "clientInfo": {"name": "tests", "version": "1"},
}


# The ids the test clients pick themselves: unique in the whole test process (two clients
# may share a session) and strings, so they never meet the integer ids a test writes by hand.
# A shared integer counter did: by the time a long suite reached a test, its `initialize`
# could take the very id that test later chose for a call, and the proxy rightly refused
# the reuse (-32600, "request id already used in this session").
AUTO_IDS: Final = (f"t{n}" for n in itertools.count(1))


class WsClient:
    """A deliberately thin MCP-over-WebSocket client: raw frames, LSN bookkeeping."""

    _ids = AUTO_IDS

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse):
        self.http = http
        self.ws = ws
        self.received: list[dict[str, Any]] = []

    @classmethod
    async def connect(
        cls, url: str, session_id: str | None = None, last_lsn: int | None = None
    ) -> WsClient:
        params: dict[str, str] = {}
        if session_id is not None:
            params["mcp_session_id"] = session_id
        if last_lsn is not None:
            params["mcp_last_lsn"] = str(last_lsn)
        http = aiohttp.ClientSession()
        try:
            ws = await http.ws_connect(url, params=params, protocols=("mcp",))
        except BaseException:
            await http.close()
            raise
        return cls(http, ws)

    async def close(self) -> None:
        await self.ws.close()
        await self.http.close()

    async def drop(self) -> None:
        """Vanish without a close handshake, like a network cut."""
        transport = self.ws._response.connection.transport  # type: ignore[union-attr]
        if transport is not None:
            transport.abort()
        await self.http.close()

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(message))

    async def send_and_id(self, message: dict[str, Any]) -> int | str:
        await self.send(message)
        return message["id"]  # type: ignore[no-any-return]

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        frame = await self.ws.receive(timeout=timeout)
        if frame.type is not aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"got {frame.type!r} {frame.data!r} {frame.extra!r}")
        message: dict[str, Any] = json.loads(frame.data)
        self.received.append(message)
        return message

    async def request(
        self, method: str, params: dict[str, Any] | None = None, request_id: int | str | None = None
    ) -> int | str:
        rid = next(self._ids) if request_id is None else request_id
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            message["params"] = params
        await self.send(message)
        return rid

    async def response(self, request_id: int | str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The response to ``request_id``, from what already arrived or by receiving more."""
        for message in self.received:
            if message.get("id") == request_id and "method" not in message:
                return message
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            message = await self.recv(max(left, 0.001))
            if message.get("id") == request_id and "method" not in message:
                return message

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.response(await self.request(method, params))

    async def initialize(self) -> dict[str, Any]:
        response = await self.call("initialize", INIT_PARAMS)
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return response

    async def call_tool(
        self, name: str, arguments: dict[str, Any], progress_token: str | None = None
    ) -> int | str:
        params: dict[str, Any] = {"name": name, "arguments": arguments}
        if progress_token is not None:
            params["_meta"] = {"progressToken": progress_token}
        return await self.request("tools/call", params)

    def lsns(self) -> list[int]:
        return [n for n in (lsn_of(m) for m in self.received) if n is not None]


def tool_text(response: dict[str, Any]) -> str:
    content = response["result"]["content"]
    return str(content[0]["text"])


SSE_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


class SseEvent(NamedTuple):
    id: str | None
    data: str
    retry: int | None

    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.data)
        return value


async def read_sse(resp: aiohttp.ClientResponse, stop: Any = None) -> list[SseEvent]:
    """Events of an SSE response until it ends (or ``stop(event)`` is true); comments skipped."""
    events: list[SseEvent] = []
    fields: dict[str, list[str]] = {}
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if line:
            if not line.startswith(":"):
                name, _, value = line.partition(":")
                fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
            continue
        if not fields:
            continue
        retry = fields.get("retry")
        event = SseEvent(
            fields.get("id", [None])[-1],
            "\n".join(fields.get("data", [])),
            int(retry[-1]) if retry else None,
        )
        fields = {}
        events.append(event)
        if stop is not None and stop(event):
            break
    return events


class HttpClient:
    """A raw Streamable HTTP MCP client: one POST per message, SSE read by hand."""

    _ids = AUTO_IDS

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.http = aiohttp.ClientSession(headers=headers)
        self.session_id: str | None = None
        self.version = "2025-11-25"

    async def close(self) -> None:
        await self.http.close()

    def headers(self, **extra: str) -> dict[str, str]:
        headers = dict(SSE_HEADERS)
        if self.session_id is not None:
            headers["Mcp-Session-Id"] = self.session_id
            headers["MCP-Protocol-Version"] = self.version
        headers.update(extra)
        return headers

    async def post(self, message: dict[str, Any], **extra: str) -> aiohttp.ClientResponse:
        return await self.http.post(self.url, json=message, headers=self.headers(**extra))

    async def request(
        self, method: str, params: dict[str, Any] | None = None, request_id: int | str | None = None
    ) -> tuple[aiohttp.ClientResponse, list[SseEvent]]:
        """POST a request; the whole SSE stream (or a JSON body as one event)."""
        rid = next(self._ids) if request_id is None else request_id
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            message["params"] = params
        resp = await self.post(message)
        if resp.content_type == "text/event-stream":
            return resp, await read_sse(resp)
        return resp, [SseEvent(None, await resp.text(), None)]

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> int:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        async with await self.post(message) as resp:
            return resp.status

    async def initialize(self) -> dict[str, Any]:
        resp, events = await self.request("initialize", INIT_PARAMS)
        assert resp.status == 200, await resp.text()
        self.session_id = resp.headers["Mcp-Session-Id"]
        assert await self.notify("notifications/initialized") == 202
        return messages(events)[-1]

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        _, events = await self.request(method, params)
        return messages(events)[-1]


def messages(events: list[SseEvent]) -> list[dict[str, Any]]:
    """The JSON-RPC messages among ``events`` (priming events have empty data)."""
    return [e.json() for e in events if e.data.strip()]


def client_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes | None = None) -> bytes:
    """What a client sends: always masked (RFC 6455 §5.3)."""
    key = os.urandom(4) if mask is None else mask
    size = len(payload)
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        head = bytes((first, 0x80 | size))
    elif size < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, size)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))
