"""Test harness: the daemon as a real process, and a small raw WebSocket MCP client."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_SERVER = ROOT / "tests" / "fixtures" / "server.py"
# Every wait in the tests is a multiple of this unit; raise it on a slow machine.
MS = 0.001 * float(os.environ.get("MCPROXY_TESTS_TIMEOUT_FACTOR", "1"))
TIMEOUT = 10_000 * MS


def fixture_upstream() -> str:
    return f"stdio:{sys.executable} {FIXTURE_SERVER}"


class ProxyProcess:
    """``python -m mcproxy`` on an ephemeral port, its JSON log collected from stderr."""

    def __init__(
        self, db: Path, upstream: str | None = None, *extra: str, env: dict[str, str] | None = None
    ) -> None:
        self.db = db
        self.upstream = upstream or fixture_upstream()
        self.extra = extra
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
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
                "127.0.0.1:0",
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
            cwd=ROOT,
        )
        threading.Thread(target=self._drain, args=(self.proc,), daemon=True).start()
        if not self._ready.wait(TIMEOUT):
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


def wait_until(predicate: Any, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(10 * MS)


def logged(db: Path, session_id: str, fragment: str) -> bool:
    """True once a message containing ``fragment`` is committed to the session's log."""
    import sqlite3

    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM events WHERE session_id = ? AND instr(payload, ?) > 0",
            (session_id, fragment.encode()),
        ).fetchone()
    return bool(rows[0])


def lsn_of(message: dict[str, Any]) -> int | None:
    for holder in (message.get("result"), message.get("params")):
        if isinstance(holder, dict):
            meta = holder.get("_meta") or {}
            if "io.mcproxy/lsn" in meta:
                return int(meta["io.mcproxy/lsn"])
    error = message.get("error")
    if isinstance(error, dict) and isinstance(error.get("data"), dict):
        value = error["data"].get("io.mcproxy/lsn")
        return None if value is None else int(value)
    return None


INIT_PARAMS = {
    "protocolVersion": "2025-11-25",
    "capabilities": {"sampling": {}, "elicitation": {"form": {}}},
    "clientInfo": {"name": "tests", "version": "1"},
}


class WsClient:
    """A deliberately thin MCP-over-WebSocket client: raw frames, LSN bookkeeping."""

    _ids = itertools.count(1)

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
