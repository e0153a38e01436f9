"""Peer benchmark: mcproxy side by side with a direct stdio connection and with supergateway,
in one run, on a Python and a Node upstream (issue 20).

    python benchmarks/bench_peers.py                # the full run (about 8 minutes on 2 cores)
    python benchmarks/bench_peers.py --write-docs   # the same, and writes docs/PEERS.md
    python benchmarks/bench_peers.py --quick        # smoke mode (tests): tiny levels, < 60 s

Targets (``--targets``): ``direct`` (the load process spawns the server itself and speaks NDJSON
to it), mcproxy's WebSocket and Streamable HTTP fronts with a child per session
(``ws-session``, ``http-session``) and with ``[upstream] mode = "shared"``, pool of 2
(``ws-shared``, ``http-shared``), and supergateway (``sg-ws``: ``--outputTransport ws``, one
child shared by every client; ``sg-http``: ``--outputTransport streamableHttp --stateful``, a
child per session). Upstreams (``--upstreams``): ``python`` (the bundled demo server) and
``node`` (``@modelcontextprotocol/server-everything`` over stdio); the tool is ``echo``.

supergateway and server-everything are benchmark dependencies, not runtime ones: when missing
they are installed with npm into ``benchmarks/.peers/`` (gitignored), at the pinned versions
below. Without npm or the network, the targets and upstream that need them are skipped with a
note, or the run fails with exit code 75 when MCPROXY_REQUIRE_PEERS=1.

Per target x upstream, one run measures:

- sequential p50/p99 of one ``tools/call`` at a time on one session;
- CPU per call of the target's whole process tree (the proxy and its children; for direct
  stdio, the server child), from utime+stime in /proc/<pid>/stat before and after the
  sequential calls;
- calls/s at C = 1, 10, 100, 1000 sessions, each with one call in flight, for a fixed time per
  level (targets with a child per session stop at ``--max-children``: 1000 children of a Node
  server do not fit in memory);
- memory per session: the tree's RSS with every session of the largest level open and idle,
  minus its RSS with one, over the sessions added;
- wrong answers: every message is checked. A call's answer must carry the call's own id
  (odd calls use string ids such as "c-17", even ones numbers) and echo its own unique
  payload; every call carries a unique progress token, so a notification about another
  client's call is recognised. An answer or notification that belongs to another call or
  client, or that is malformed, is *wrong*; timeouts, errors and answers that come after
  their call timed out are counted apart; other notifications (logging, list changes) are
  counted as *notes*.
  Calls/s counts every answer, right or wrong (the wrong ones have their own column).
- the progress probe: on one session a call to a tool that reports progress for a second (the
  demo's ``countdown``, server-everything's ``trigger-long-running-operation``) while another
  session calls echo; the second must see none of the first one's notifications, and the
  first must see them (their number is printed).

The load generator: ``--load-procs`` separate processes (2 by default), each driving its
share of the sessions with lean clients (raw asyncio WebSocket frames from bench_scale, aiohttp
for HTTP, pipes for stdio), so that the load is not one event loop on one core; their own CPU
is printed per level (``gen %``: percent of one core) to show when they, not the target, are
the limit. On a 2-core machine the generator and the target share the cores: the absolute
numbers are a floor, the ratios in the same run are what compares.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from bench_http import VERSION, HttpSession, Stdio
from bench_scale import WsClient, children, cpu_s, rss
from bench_ws import DEMO, INIT, Proxy, pct

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "benchmarks" / ".peers"
SUPERGATEWAY = "4.0.0"
EVERYTHING = "2026.8.31"  # @modelcontextprotocol/server-everything
EVERYTHING_JS = PEERS / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist"
SUPERGATEWAY_JS = PEERS / "node_modules" / "supergateway" / "dist" / "index.js"
DOCS = ROOT / "docs" / "PEERS.md"
TARGETS = ("direct", "ws-session", "ws-shared", "http-session", "http-shared", "sg-ws", "sg-http")
PER_CHILD = {"direct", "ws-session", "http-session", "sg-http"}  # a child per session
UPSTREAMS = ("python", "node")
LABELS = {
    "direct": "direct stdio (client spawns the server)",
    "ws-session": "mcproxy WebSocket, per-session children",
    "ws-shared": "mcproxy WebSocket, shared pool of 2",
    "http-session": "mcproxy Streamable HTTP, per-session children",
    "http-shared": "mcproxy Streamable HTTP, shared pool of 2",
    "sg-ws": "supergateway `--outputTransport ws` (one shared child)",
    "sg-http": "supergateway `streamableHttp --stateful` (child per session)",
}
EX_TEMPFAIL = 75  # the peers could not be installed and MCPROXY_REQUIRE_PEERS=1
CONNECT_BATCH = 50  # sessions opened at once by a load process
CHILD_BATCH = 10  # the same where each session starts a process
LIST = b'{"jsonrpc":"2.0","id":"tools","method":"tools/list"}'


def upstream_command(upstream: str) -> str:
    if upstream == "python":
        return DEMO
    return f"node {EVERYTHING_JS / 'index.js'} stdio"


# --- checking every answer -----------------------------------------------------------------


class Tally(msgspec.Struct):
    ok: int = 0
    wrong: int = 0
    errors: int = 0
    timeouts: int = 0
    late: int = 0
    notes: int = 0
    progress: int = 0  # the call's own progress notifications
    note_methods: dict[str, int] = msgspec.field(default_factory=dict)  # notes, by method
    examples: list[str] = msgspec.field(default_factory=list)  # the first few wrong ones
    latencies: list[float] = msgspec.field(default_factory=list)

    def bad(self, why: str, raw: bytes) -> None:
        self.wrong += 1
        if len(self.examples) < 3:
            self.examples.append(f"{why}: {raw[:200]!r}")

    def merge(self, other: Tally) -> None:
        for name in ("ok", "wrong", "errors", "timeouts", "late", "notes", "progress"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.examples += other.examples[: max(0, 3 - len(self.examples))]
        for method, count in other.note_methods.items():
            self.note_methods[method] = self.note_methods.get(method, 0) + count
        self.latencies += other.latencies


class Call:
    """One tools/call: its own id (a string for odd calls), payload and progress token.

    ``progress``: instead of echo, a tool that reports progress for about a second (the
    demo's ``countdown``, server-everything's ``trigger-long-running-operation``), with a
    numeric id; its answer is any result under its id (``expected`` None). ``numeric``: an
    echo with a numeric id whatever its number."""

    def __init__(
        self, tag: str, seq: int, upstream: str, progress: bool = False, numeric: bool = False
    ) -> None:
        self.id: int | str = f"c-{seq}" if seq % 2 and not (progress or numeric) else seq
        self.text = f"{tag}-{seq}"
        self.token = f"p-{tag}-{seq}"
        key, expected = ("text", self.text) if upstream == "python" else (
            "message", f"Echo: {self.text}")  # fmt: skip
        self.expected: str | None = expected
        name, arguments = "echo", {key: self.text}
        if progress:
            self.expected = None
            name, arguments = ("countdown", {"n": 2}) if upstream == "python" else (
                "trigger-long-running-operation", {"duration": 1, "steps": 4})  # fmt: skip
        self.body = msgspec.json.encode({
            "jsonrpc": "2.0", "id": self.id, "method": "tools/call",
            "params": {"name": name, "arguments": arguments,
                       "_meta": {"progressToken": self.token}},
        })  # fmt: skip


def _answer_text(message: dict[str, Any]) -> str | None:
    try:
        text = message["result"]["content"][0]["text"]
    except (KeyError, IndexError, TypeError):
        return None
    return text if isinstance(text, str) else None


def check(call: Call | None, raw: bytes, tally: Tally, late: set[str]) -> bool:
    """Classify one message received by a session whose call in flight is ``call``; True when
    it is that call's answer (right or wrong), so the session may send its next call."""
    try:
        message = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        tally.bad("not JSON", raw)
        return False
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        tally.bad("not JSON-RPC 2.0", raw)
        return False
    if "method" in message:  # a notification or a request from the server
        params = message.get("params")
        params = params if isinstance(params, dict) else {}
        meta = params.get("_meta")
        token = params.get("progressToken", meta.get("progressToken") if isinstance(
            meta, dict) else None)  # fmt: skip
        if token is None:
            tally.notes += 1
            method = str(message["method"])[:60]
            tally.note_methods[method] = tally.note_methods.get(method, 0) + 1
        elif call is None or token != call.token:
            tally.bad("another call's notification", raw)
        else:
            tally.progress += 1
        return False
    if "result" not in message and "error" not in message:
        tally.bad("neither result nor error", raw)
        return False
    rid = message.get("id", ...)
    mine = call is not None and type(rid) is type(call.id) and rid == call.id
    text = _answer_text(message)
    if mine and "error" in message:
        tally.errors += 1
        return True
    if mine and call is not None and call.expected is None:  # a progress call: any result
        tally.ok += 1
        return True
    if call is not None and text == call.expected:
        if mine:
            tally.ok += 1
        else:
            tally.bad(f"own payload under id {rid!r} (sent {call.id!r})", raw)
        return True
    if mine:
        tally.bad("another call's payload under this call's id", raw)
        return True
    if text is not None and text in late:  # late: an echo's answer after its call timed out
        late.discard(text)
        tally.late += 1
        return False
    tally.bad("an answer to another call", raw)
    return False


class Checked:
    """What every kind of session shares: the call in flight, its future, and the tally."""

    tally: Tally
    upstream: str
    tag: str
    call: Call | None = None
    future: asyncio.Future[None] | None = None

    def setup(self, tag: str, upstream: str, tally: Tally) -> None:
        self.tag, self.upstream, self.tally = tag, upstream, tally
        self.seq = 0
        self.call: Call | None = None
        self.future: asyncio.Future[None] | None = None
        self.deadline = 0.0
        self.timeout = 0.0
        self.late: set[str] = set()
        self.closed = False

    def next_call(self, progress: bool = False, numeric: bool = False) -> Call:
        self.seq += 1
        self.call = Call(self.tag, self.seq, self.upstream, progress, numeric)
        self.future = asyncio.get_running_loop().create_future()
        return self.call

    def feed(self, raw: bytes) -> None:
        if check(self.call, raw, self.tally, self.late):
            self.call = None
            if self.future is not None and not self.future.done():
                self.future.set_result(None)

    def expire(self) -> None:
        """The call in flight timed out: its answer, if it comes, is late, not wrong."""
        if self.call is not None and self.call.expected is not None:
            self.late.add(self.call.expected)
            self.call = None
        if self.future is not None and not self.future.done():
            self.future.set_exception(TimeoutError())

    async def transmit(self, call: Call) -> None:
        raise NotImplementedError

    async def one(self, timeout: float, progress: bool = False, numeric: bool = False) -> None:
        """One call, checked; raises TimeoutError or ConnectionError."""
        call = self.next_call(progress, numeric)
        self.timeout = timeout
        self.deadline = asyncio.get_running_loop().time() + timeout
        future = self.future
        assert future is not None
        await self.transmit(call)
        await future

    async def aclose(self) -> None:
        raise NotImplementedError


class WsSession(WsClient, Checked):
    """mcproxy's or supergateway's WebSocket front (one JSON-RPC message per text frame)."""

    handshake: asyncio.Queue[bytes] | None = None

    def text(self, payload: bytes) -> None:
        if self.handshake is not None:  # before any checked call: initialize, tools/list
            self.handshake.put_nowait(payload)
        else:
            self.feed(payload)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.future is not None and not self.future.done():
            self.future.set_exception(ConnectionError("connection lost"))

    async def transmit(self, call: Call) -> None:
        self.send(call.body)

    async def aclose(self) -> None:
        self.close()

    async def rpc(self, data: bytes, timeout: float) -> dict[str, Any]:
        """Sends a request once and waits for a response (supergateway's ws mode sends every
        client the shared child's notifications, some before the answer)."""
        assert self.handshake is not None
        self.send(data)
        while True:
            reply = msgspec.json.decode(await asyncio.wait_for(self.handshake.get(), timeout))
            if isinstance(reply, dict) and "method" not in reply:
                return reply

    @classmethod
    async def open(
        cls, host: str, port: int, path: str, timeout: float, tag: str, upstream: str
    ) -> WsSession:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(lambda: cls(host, port, path), host, port)
        client.setup(tag, upstream, Tally())
        client.handshake = asyncio.Queue()
        await asyncio.wait_for(client.ready, timeout)
        await client.rpc(msgspec.json.encode(INIT), timeout)
        client.send(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
        # like any client: list first (mcproxy learns which tools are read-only)
        await client.rpc(LIST, timeout)
        client.handshake = None
        return client


class StdioSession(Checked):
    """A server process this process spawned itself, NDJSON over its pipes (the baseline)."""

    async def start(self, command: str) -> StdioSession:
        self.stdio = await Stdio().start(command)
        await self.stdio.rpc({"jsonrpc": "2.0", "id": "tools", "method": "tools/list"})
        self.reader = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        stdout = self.stdio.proc.stdout
        assert stdout is not None
        while line := await stdout.readline():
            if line.strip():
                self.feed(line)
        self.closed = True
        if self.future is not None and not self.future.done():
            self.future.set_exception(ConnectionError("the server exited"))

    async def transmit(self, call: Call) -> None:
        stdin = self.stdio.proc.stdin
        assert stdin is not None
        stdin.write(call.body + b"\n")

    async def aclose(self) -> None:
        self.reader.cancel()
        with contextlib.suppress(Exception):
            await self.stdio.close()


class HttpCall(Checked):
    """A Streamable HTTP session: one POST per call, the answer as JSON or in an SSE stream."""

    async def start(self, http: aiohttp.ClientSession, url: str) -> HttpCall:
        self.session = await HttpSession(http, url).start()
        return self

    async def transmit(self, call: Call) -> None:
        session = self.session
        headers = session.headers
        limit = aiohttp.ClientTimeout(total=self.timeout)  # the expiry timer cannot end a POST
        async with session.http.post(
            session.url, data=call.body, headers=headers, timeout=limit
        ) as resp:
            if resp.status != 200:
                raise ConnectionError(f"HTTP {resp.status}")
            if resp.content_type == "application/json":
                self.feed(await resp.read())
                return
            data: list[bytes] = []
            async for raw in resp.content:
                line = raw.rstrip(b"\r\n")
                if line.startswith(b"data:"):
                    data.append(line[5:].removeprefix(b" "))
                elif not line and data:
                    payload = b"\n".join(data).strip()
                    data = []
                    if payload:
                        self.feed(payload)
        if self.future is not None and not self.future.done():
            self.future.set_exception(ConnectionError("the response ended without the answer"))

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            async with self.session.http.delete(self.session.url, headers=self.session.headers):
                pass


# --- the load process ----------------------------------------------------------------------


async def expiry(sessions: list[Checked]) -> None:
    """Fail calls past their deadline: one timer for every session, not one per call."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(0.5)
        now = loop.time()
        for session in sessions:
            if session.call is not None and session.deadline < now:
                session.expire()


class Worker:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.sessions: list[Checked] = []
        self.http: aiohttp.ClientSession | None = None
        self.failures: list[str] = []

    async def open_one(self, index: int) -> Checked:
        # a session may start a process (a Node one takes a second of CPU), many at once
        spec, timeout = self.spec, max(60.0, self.spec["timeout"])
        tag = f"w{spec['worker']}s{index}"
        session: Checked
        if spec["kind"] == "ws":
            session = await WsSession.open(
                "127.0.0.1", spec["port"], spec["path"], timeout, tag, spec["upstream"]
            )
        elif spec["kind"] == "http":
            if self.http is None:
                self.http = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0, force_close=False),
                    timeout=aiohttp.ClientTimeout(total=timeout),
                )
            session = HttpCall()
            session.setup(tag, spec["upstream"], Tally())
            await asyncio.wait_for(session.start(self.http, spec["url"]), timeout)
        else:
            session = StdioSession()
            session.setup(tag, spec["upstream"], Tally())
            await asyncio.wait_for(session.start(spec["command"]), timeout)
        return session

    async def open(self, n: int) -> dict[str, Any]:
        while len(self.sessions) < n:
            batch = CHILD_BATCH if self.spec["per_child"] else CONNECT_BATCH
            count = min(batch, n - len(self.sessions))
            base = len(self.sessions) + len(self.failures)
            results = await asyncio.gather(
                *(self.open_one(base + i) for i in range(count)), return_exceptions=True
            )
            for result in results:
                if isinstance(result, Checked):
                    self.sessions.append(result)
                else:
                    self.failures.append(repr(result))
            if len(self.failures) > max(10, n // 10):
                break
        return {
            "opened": len(self.sessions),
            "failed": len(self.failures),
            "failures": self.failures[:3],
        }

    async def run(self, sessions: list[Checked], until: float) -> Tally:
        tally = Tally()
        for s in sessions:
            s.tally = tally
        loop = asyncio.get_running_loop()
        timeout = self.spec["timeout"]

        async def drive(session: Checked) -> None:
            while loop.time() < until and not session.closed:
                t0 = time.perf_counter()
                try:
                    await session.one(timeout)
                except TimeoutError:
                    tally.timeouts += 1
                    continue
                except (ConnectionError, aiohttp.ClientError, OSError):
                    tally.errors += 1
                    session.closed = True
                    continue
                tally.latencies.append(time.perf_counter() - t0)

        timer = asyncio.ensure_future(expiry(sessions))
        try:
            await asyncio.gather(*(drive(s) for s in sessions))
        finally:
            timer.cancel()
        return tally

    async def probe(self) -> dict[str, Any]:
        """Session 0 makes a call that reports progress while session 1 calls echo: session 1
        must see none of session 0's notifications, and session 0 must see them all. Numeric
        ids only: what goes wrong here is about notifications, not string ids."""
        talker, listener = self.sessions[0], self.sessions[1]
        talker.tally, listener.tally = Tally(), Tally()
        timeout = self.spec["timeout"]
        with contextlib.suppress(TimeoutError, ConnectionError, aiohttp.ClientError, OSError):
            long = asyncio.ensure_future(talker.one(timeout, progress=True))
            while not long.done():
                with contextlib.suppress(TimeoutError):
                    await listener.one(timeout, numeric=True)
            await long
        return {"talker": msgspec.to_builtins(talker.tally),
                "listener": msgspec.to_builtins(listener.tally)}  # fmt: skip

    async def command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        if cmd["op"] == "open":
            return await self.open(cmd["n"])
        if cmd["op"] == "seq":  # session 0 alone, a fixed number of calls
            session = self.sessions[0]
            tally = Tally()
            session.tally = tally
            t0 = time.perf_counter()
            for _ in range(cmd["calls"]):
                c0 = time.perf_counter()
                try:
                    await session.one(self.spec["timeout"])
                except TimeoutError:
                    tally.timeouts += 1
                    continue
                except (ConnectionError, aiohttp.ClientError, OSError):
                    tally.errors += 1
                    break
                tally.latencies.append(time.perf_counter() - c0)
            return {"tally": msgspec.to_builtins(tally), "wall": time.perf_counter() - t0}
        if cmd["op"] == "probe":
            return await self.probe()
        if cmd["op"] == "load":
            t0 = time.perf_counter()
            tally = await self.run(self.sessions[: cmd["c"]], loop.time() + cmd["duration"])
            return {"tally": msgspec.to_builtins(tally), "wall": time.perf_counter() - t0}
        if cmd["op"] == "close":
            await asyncio.gather(*(s.aclose() for s in self.sessions), return_exceptions=True)
            if self.http is not None:
                await self.http.close()
            return {"closed": len(self.sessions)}
        raise ValueError(cmd)


async def worker_main(spec: dict[str, Any]) -> None:
    worker = Worker(spec)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        cmd = json.loads(line)
        try:
            result = await worker.command(cmd)
        except Exception as exc:  # reported to the orchestrator, which prints it and fails
            result = {"error": repr(exc)}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
        if cmd["op"] == "close":
            return


# --- targets -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def tree_rss(roots: list[int]) -> int:
    total = 0
    for root in roots:
        for p in tree(root):
            with contextlib.suppress(OSError):
                total += rss(p)
    return total


def tree_cpu(roots: list[int]) -> float:
    return sum(cpu_s(p) for root in roots for p in tree(root))


class Target:
    """A running target: the processes whose tree is measured, and how clients reach it."""

    def __init__(self, name: str, upstream: str, tmp: Path, max_children: int) -> None:
        self.name, self.upstream, self.tmp = name, upstream, tmp
        self.max_children = max_children
        self.proc: subprocess.Popen[bytes] | None = None
        self.proxy: Proxy | None = None
        self.spec: dict[str, Any] = {"upstream": upstream, "target": name}
        self.log = open(tmp / f"{name}-{upstream}.log", "wb")  # noqa: SIM115

    def start(self) -> None:
        command = upstream_command(self.upstream)
        if self.name == "direct":
            self.spec |= {"kind": "stdio", "command": command}
        elif self.name.startswith(("ws-", "http-")):
            config = self.tmp / f"{self.name}-{self.upstream}.toml"
            shared = self.name.endswith("-shared")
            live = self.max_children + 16
            config.write_text(
                "[upstream]\n"
                + ('mode = "shared"\npool_size = 2\n' if shared else 'mode = "per-session"\n')
                + f"max_live_upstreams = {live}\nmax_live_upstreams_per_principal = {live}\n"
                "[limits]\n"  # one address opens every session: lift the per-address rates
                "connections_per_s = 1000000.0\nconnection_burst = 1000000\n"
                "messages_per_s = 1000000.0\nmessage_burst = 1000000\n"
            )
            self.proxy = Proxy(
                self.tmp / f"{self.name}-{self.upstream}.db", command, "--config", str(config)
            )
            self.proxy.stderr = self.log
            self.proxy.start()
            self.proc = self.proxy.proc
            if self.name.startswith("ws-"):
                self.spec |= {"kind": "ws", "port": self.proxy.port, "path": "/mcp"}
            else:
                self.spec |= {"kind": "http", "url": self.proxy.url}
        else:
            port = free_port()
            output = ["ws"] if self.name == "sg-ws" else ["streamableHttp", "--stateful"]
            self.proc = subprocess.Popen(
                ["node", str(SUPERGATEWAY_JS), "--stdio", command, "--port", str(port),
                 "--outputTransport", *output, "--protocolVersion", VERSION,
                 "--logLevel", "none"],
                stdout=self.log, stderr=self.log, cwd=PEERS, start_new_session=True,
            )  # fmt: skip
            wait_port(port, self.proc)
            if self.name == "sg-ws":
                self.spec |= {"kind": "ws", "port": port, "path": "/message"}
            else:
                self.spec |= {"kind": "http", "url": f"http://127.0.0.1:{port}/mcp"}

    def roots(self, workers: list[asyncio.subprocess.Process]) -> list[int]:
        """The measured trees: the target's process, or (direct) the servers the load spawned."""
        if self.proc is not None:
            return [self.proc.pid]
        return [c for w in workers for c in children(w.pid)]

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        elif self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()

    def log_tail(self, lines: int = 5) -> list[str]:
        """The target's last log lines (warnings and errors only: it runs at that level)."""
        with contextlib.suppress(OSError):
            return Path(self.log.name).read_text(errors="replace").splitlines()[-lines:]
        return []


class Load:
    """The load processes, driven by JSON lines over their pipes."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[asyncio.subprocess.Process] = []
        self.failed = 0  # session openings that failed (each retried), over the processes

    async def start(self, spec: dict[str, Any], timeout: float) -> None:
        for i in range(self.count):
            worker_spec = {**spec, "worker": i, "timeout": timeout}
            worker_spec["per_child"] = spec["target"] in PER_CHILD
            self.procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--worker",
                    json.dumps(worker_spec),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    cwd=ROOT,
                    limit=2**26,
                )
            )

    async def ask(self, i: int, cmd: dict[str, Any]) -> dict[str, Any]:
        proc = self.procs[i]
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        line = await proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load process {i} exited ({await proc.wait()})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"load process {i}: {answer['error']}")
        return answer

    def split(self, n: int) -> list[int]:
        """n sessions over the processes (the first one gets the remainder)."""
        used = min(self.count, n)
        return [n // used + (1 if i < n % used else 0) for i in range(used)]

    async def open(self, n: int) -> int:
        shares = self.split(n)
        answers = await asyncio.gather(*(self.ask(i, {"op": "open", "n": k})
                                         for i, k in enumerate(shares)))  # fmt: skip
        self.failed = sum(a["failed"] for a in answers)
        for answer in answers:
            if answer["failures"]:
                print(f"      session failures: {answer['failures']}")
        return sum(min(a["opened"], k) for a, k in zip(answers, shares, strict=True))

    async def load(self, c: int, duration: float) -> tuple[Tally, float]:
        answers = await asyncio.gather(
            *(self.ask(i, {"op": "load", "c": k, "duration": duration})
              for i, k in enumerate(self.split(c)))
        )  # fmt: skip
        tally = Tally()
        for a in answers:
            tally.merge(msgspec.convert(a["tally"], Tally))
        return tally, max(a["wall"] for a in answers)

    async def close(self) -> None:
        for i, proc in enumerate(self.procs):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ask(i, {"op": "close"}), 30)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    def cpu(self) -> float:
        return sum(cpu_s(p.pid) for p in self.procs)


async def measure(name: str, upstream: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"target": name, "upstream": upstream, "levels": {}}
    target = Target(name, upstream, tmp, args.max_children)
    load = Load(args.load_procs)
    try:
        await asyncio.to_thread(target.start)
        await load.start(target.spec, args.timeout)
        if await load.open(1) < 1:
            raise RuntimeError("could not open one session")
        roots = target.roots(load.procs)
        await load.ask(0, {"op": "seq", "calls": args.warmup})
        cpu0 = tree_cpu(roots)
        seq = await load.ask(0, {"op": "seq", "calls": args.calls})
        cpu1 = tree_cpu(roots)
        tally = msgspec.convert(seq["tally"], Tally)
        us = sorted(s * 1e6 for s in tally.latencies) or [0.0]
        row |= {"p50_us": pct(us, 50), "p99_us": pct(us, 99),
                "cpu_us": 1e6 * (cpu1 - cpu0) / max(1, len(tally.latencies)),
                "seq": _counts(tally)}  # fmt: skip
        rss1 = tree_rss(target.roots(load.procs))
        await load.ask(0, {"op": "open", "n": 2})
        probe = await load.ask(0, {"op": "probe"})
        talker = msgspec.convert(probe["talker"], Tally)
        listener = msgspec.convert(probe["listener"], Tally)
        row["probe"] = {"own_progress": talker.progress, "answered": talker.ok,
                        "wrong": talker.wrong + listener.wrong, "echoes": listener.ok,
                        "examples": talker.examples + listener.examples}  # fmt: skip
        opened = 1
        levels = [c for c in args.levels if name not in PER_CHILD or c <= args.max_children]
        for c in args.levels:
            if c not in levels:
                row["levels"][str(c)] = {"skipped": f"{c} children > --max-children"}
        for c in levels:
            opened = await load.open(c)
            if opened < c:
                row["levels"][str(c)] = {"skipped": f"only {opened} sessions opened"}
                break
            roots = target.roots(load.procs)
            await asyncio.sleep(args.settle)
            if c == levels[-1] and c > 1:
                row["mem_kib"] = (tree_rss(roots) - rss1) / 1024 / (c - 1)
                row["mem_sessions"] = c
            cpu0, gen0 = tree_cpu(roots), load.cpu()
            tally, wall = await load.load(c, args.duration)
            cpu1, gen1 = tree_cpu(roots), load.cpu()
            ms = sorted(s * 1e3 for s in tally.latencies) or [0.0]
            row["levels"][str(c)] = {
                "rps": (tally.ok + tally.wrong) / wall, "right_per_s": tally.ok / wall,
                "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99),
                "cpu_us": 1e6 * (cpu1 - cpu0) / max(1, tally.ok + tally.wrong),
                "gen_pct": 100 * (gen1 - gen0) / wall, "gen_procs": len(load.split(c)),
                **_counts(tally),
            }  # fmt: skip
    except Exception as exc:
        row["failed"] = repr(exc)
    finally:
        t0 = time.monotonic()
        await load.close()
        t1 = time.monotonic()
        await asyncio.to_thread(target.stop)
        row["teardown_s"] = [round(t1 - t0, 1), round(time.monotonic() - t1, 1)]
        row["log"] = target.log_tail()
        row["open_failures"] = load.failed
    return row


def _counts(tally: Tally) -> dict[str, Any]:
    return {"ok": tally.ok, "wrong": tally.wrong, "errors": tally.errors,
            "timeouts": tally.timeouts, "late": tally.late, "notes": tally.notes,
            "note_methods": tally.note_methods,
            "examples": tally.examples}  # fmt: skip


# --- peers, versions, output ---------------------------------------------------------------


def installed(package: str) -> str | None:
    path = PEERS / "node_modules" / package / "package.json"
    try:
        version: str = json.loads(path.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None
    return version


def ensure_peers() -> str | None:
    """Installs the pinned peers into benchmarks/.peers when missing; the reason if not."""
    wanted = {"supergateway": SUPERGATEWAY, "@modelcontextprotocol/server-everything": EVERYTHING}
    if all(installed(p) == v for p, v in wanted.items()):
        return None
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        return "node/npm not found"
    print(f"installing {', '.join(f'{p}@{v}' for p, v in wanted.items())} into {PEERS}")
    run = subprocess.run(
        [npm, "install", "--prefix", str(PEERS), "--no-audit", "--no-fund", "--save-exact",
         "--loglevel=error", *(f"{p}@{v}" for p, v in wanted.items())],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if run.returncode != 0 or not all(installed(p) == v for p, v in wanted.items()):
        return f"npm install failed: {run.stderr.strip()[-300:]}"
    return None


def versions() -> dict[str, str]:
    node = shutil.which("node")
    out = {
        "mcproxy": importlib.metadata.version("mcproxy"),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "node": subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
        if node else "-",
        "supergateway": installed("supergateway") or "-",
        "server-everything": installed("@modelcontextprotocol/server-everything") or "-",
    }  # fmt: skip
    return out


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "loadavg": Path("/proc/loadavg").read_text().split()[:3]}  # fmt: skip


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def table(rows: list[dict[str, Any]], levels: list[int]) -> str:
    """The markdown table, with ratios against direct stdio and supergateway of the same run."""
    ok = {(r["target"], r["upstream"]): r for r in rows if "p50_us" in r}
    head = ("| target | upstream | seq p50 µs | p99 µs | x direct | x sg-ws | CPU/call µs "
            "| CPU x sg-ws | " + " | ".join(f"calls/s C={c}" for c in levels)
            + " | mem/session KiB | wrong | other notifications | timeouts / errors |")  # fmt: skip
    lines = [head, "|---|---|" + "---:|" * (10 + len(levels))]
    for r in rows:
        label = f"{LABELS[r['target']]}"
        if "p50_us" not in r:
            cells = ["failed: " + r.get("failed", "?")[:80]] + ["—"] * (9 + len(levels))
            lines.append(f"| {label} | {r['upstream']} | " + " | ".join(cells) + " |")
            continue
        direct = ok.get(("direct", r["upstream"]))
        sg = ok.get(("sg-ws", r["upstream"]))

        def ratio(key: str, base: dict[str, Any] | None, row: dict[str, Any] = r) -> str:
            if base is None or not base.get(key):
                return "—"
            return f"{row[key] / base[key]:.2f}"  # of the same run, same upstream

        wrong = r["seq"]["wrong"] + r.get("probe", {}).get("wrong", 0)
        notes = r["seq"]["notes"]
        bad = r["seq"]["timeouts"] + r["seq"]["late"], r["seq"]["errors"] + r["open_failures"]
        level_cells = []
        for c in levels:
            level = r["levels"].get(str(c), {})
            wrong += level.get("wrong", 0)
            notes += level.get("notes", 0)
            bad = bad[0] + level.get("timeouts", 0) + level.get("late", 0), bad[1] + level.get(
                "errors", 0)  # fmt: skip
            if "rps" not in level:
                level_cells.append("—")
                continue
            cell = _fmt(level["rps"])
            base = sg and sg["levels"].get(str(c), {}).get("rps")
            if base:
                cell += f" ({level['rps'] / base:.2f}x sg-ws)"
            if level["gen_pct"] / level.get("gen_procs", 1) > 85:
                cell += " ‡"
            level_cells.append(cell)
        mem = r.get("mem_kib")
        mem_cell = f"{_fmt(mem)} ({r['mem_sessions']})" if mem is not None else "—"
        lines.append(
            f"| {label} | {r['upstream']} | {_fmt(r['p50_us'])} | {_fmt(r['p99_us'])} | "
            f"{ratio('p50_us', direct)} | {ratio('p50_us', sg)} | {_fmt(r['cpu_us'])} | "
            f"{ratio('cpu_us', sg)} | "
            + " | ".join(level_cells)
            + f" | {mem_cell} | **{wrong}** | {notes} | {bad[0]} / {bad[1]} |"
        )
    return "\n".join(lines)


def document(result: dict[str, Any], markdown: str) -> str:
    return f"""# mcproxy and its peers, side by side

Measured by `benchmarks/bench_peers.py` (its docstring says what each figure is and how it is
taken). Regenerate this file with:

    {result["command"]}

Run of {result["date"]} on {result["machine"]["nproc"]} cores ({result["machine"]["cpu"]}),
load average at start {" ".join(result["machine"]["loadavg"])}{result["note"]}.
Versions: {", ".join(f"{k} {v}" for k, v in result["versions"].items())}.

- *seq p50/p99*: one `tools/call` echo at a time on one session, µs to the checked answer.
- *x direct*, *x sg-ws*: that p50 over direct stdio's and over supergateway ws's, same upstream.
- *CPU/call*: utime+stime of the target's whole process tree (proxy and children; for direct
  stdio the server) over the sequential calls, per call. *CPU x sg-ws*: over supergateway ws's.
- *calls/s C=n*: answers per second with n sessions, one call in flight each, for
  {result["duration"]} s, right or wrong (the wrong ones are in their own column; right ones
  alone are `right_per_s` in the JSON); in brackets, over supergateway ws's at the same level.
  — means not run (a target with a child per session stops at {result["max_children"]}
  children); ‡ marks a level where the load processes used over 85% of a core each, on
  average (the generator may be the limit there).
- *mem/session*: the tree's RSS with n idle sessions (in brackets) minus with one, per session
  (children included).
- *wrong*: answers or notifications that belong to another call or client, or are malformed,
  over every phase (supergateway's ws mode turns string ids into `null`: every odd call uses
  one), and in a progress probe: one session calls a tool that reports progress for a second
  (the demo's `countdown`, server-everything's `trigger-long-running-operation`) while another
  calls echo, which must see none of the first one's notifications (supergateway's ws mode
  sends them to every client; the probe's echoes use numeric ids). *other notifications*:
  those that name no call (a list change, a log message), received over the run (the JSON
  below counts them by method). *timeouts /
  errors*: calls unanswered in {result["timeout"]} s (or answered after that), error answers,
  broken sessions and failed session openings (each retried).

{markdown}

The load generator: {result["load_procs"]} processes apart from the targets (and from the one
that measures them), each driving its share of the sessions with lean clients: WebSocket
frames on raw asyncio transports (bench_scale's client), aiohttp for Streamable HTTP (one POST
per call on a kept-alive connection, the SSE answer parsed by hand), pipes for direct stdio
(whose servers are the load processes' children). Their CPU per level is in the JSON
(`gen_pct`, percent of one core). On 2 cores they share the machine with the target: the
absolute figures are a floor, the ratios within one run are what compares.

<details><summary>machine-readable results</summary>

```json
{json.dumps(result, indent=1)}
```

</details>
"""


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny levels, < 60 s")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--upstreams", nargs="+", choices=UPSTREAMS, default=list(UPSTREAMS))
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per level")
    parser.add_argument("--calls", type=int, default=1000, help="sequential calls")
    parser.add_argument("--warmup", type=int, default=200, help="sequential calls not counted")
    parser.add_argument("--max-children", type=int, default=100,
                        help="per-child targets: the largest level run")  # fmt: skip
    parser.add_argument("--load-procs", type=int, default=2, help="load generator processes")
    parser.add_argument("--timeout", type=float, default=10.0, help="per call, seconds")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds before a level")
    parser.add_argument("--write-docs", action="store_true", help=f"write {DOCS.relative_to(ROOT)}")
    parser.add_argument("--note", default="", help="a remark for the docs (e.g. a loaded machine)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--render", type=Path, metavar="FILE",
                        help="measure nothing: write docs/PEERS.md from the results in FILE "
                        "(a --json file, or a PEERS.md with its JSON block)")  # fmt: skip
    parser.add_argument("--verbose", action="store_true", help="print each target's log tail")
    parser.add_argument("--parallel", type=int, default=1,
                        help="targets measured at once (figures are void above 1)")  # fmt: skip
    args = parser.parse_args()
    if args.render:
        text = args.render.read_text()
        if "```json" in text:
            text = text[text.index("```json") + 7 : text.rindex("```")]
        result = json.loads(text)
        DOCS.write_text(document(result, table(result["rows"], result["levels"])))
        print(f"wrote {DOCS}")
        return 0
    args.levels = sorted(set(args.levels))
    if args.quick:
        args.levels, args.duration, args.calls, args.warmup = [1, 3], 0.3, 20, 5
        args.max_children, args.load_procs, args.settle = 3, 1, 0.0
        args.parallel = max(args.parallel, 4)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # every process inherits it
    del soft
    missing = ensure_peers()
    targets, upstreams = list(args.targets), list(args.upstreams)
    if missing:
        if os.environ.get("MCPROXY_REQUIRE_PEERS") == "1":
            print(f"peers required (MCPROXY_REQUIRE_PEERS=1) but unavailable: {missing}")
            return EX_TEMPFAIL
        print(f"skipping supergateway and the node upstream: {missing}")
        targets = [t for t in targets if not t.startswith("sg-")]
        upstreams = [u for u in upstreams if u != "node"]
        if not targets or not upstreams:
            return EX_TEMPFAIL
    command = "python benchmarks/bench_peers.py " + shlex.join(sys.argv[1:])
    info = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command.strip(), "machine": machine(), "versions": versions(),
            "levels": args.levels, "duration": args.duration, "calls": args.calls,
            "max_children": args.max_children, "load_procs": args.load_procs,
            "timeout": args.timeout, "parallel": args.parallel, "peers_missing": missing,
            "note": f" — {args.note}" if args.note else ""}  # fmt: skip
    print(f"peer benchmark on {info['machine']['nproc']} cpus ({info['machine']['cpu']}), "
          + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))  # fmt: skip
    started = time.monotonic()
    # --parallel > 1 (the smoke mode) measures several targets at once: quicker, and every
    # check still holds, but they compete for the cores, so the figures mean nothing.
    running = asyncio.Semaphore(args.parallel)

    async def one(name: str, upstream: str) -> dict[str, Any]:
        async with running:
            t0 = time.monotonic()
            row = await measure(name, upstream, args, Path(tmp))
            print(_line(row, args.levels) + f"  [{time.monotonic() - t0:.0f} s]", flush=True)
            for line in row["log"] if args.verbose or "failed" in row else []:
                print(f"      log: {line[:300]}")
            return row

    with tempfile.TemporaryDirectory() as tmp:
        rows = await asyncio.gather(*(one(t, u) for u in upstreams for t in targets))
    info["rows"] = rows
    info["wall_s"] = round(time.monotonic() - started)
    markdown = table(rows, args.levels)
    print()
    print(markdown)
    if args.json:
        args.json.write_text(json.dumps(info, indent=1))
    if args.write_docs:
        DOCS.write_text(document(info, markdown))
        print(f"\nwrote {DOCS}")
    failed = [r for r in rows if "failed" in r]
    for r in failed:
        print(f"FAILED {r['target']} / {r['upstream']}: {r['failed']}")
    return 1 if failed else 0


def _line(row: dict[str, Any], levels: list[int]) -> str:
    head = f"  {row['target']:<13} {row['upstream']:<7}"
    if "p50_us" not in row:
        return head + f" failed: {row.get('failed')}"
    parts = [f"p50 {row['p50_us']:7.0f} µs p99 {row['p99_us']:7.0f} µs cpu {row['cpu_us']:6.0f} µs"]
    for c in levels:
        level = row["levels"].get(str(c), {})
        if "rps" in level:
            parts.append(f"C={c} {level['rps']:.0f}/s w{level['wrong']} t{level['timeouts']}"
                         f" e{level['errors']} gen {level['gen_pct']:.0f}%")  # fmt: skip
    if "mem_kib" in row:
        parts.append(f"mem {row['mem_kib']:.0f} KiB/session")
    parts.append(f"seq wrong {row['seq']['wrong']}")
    if "probe" in row:
        probe = row["probe"]
        parts.append(f"progress probe: {probe['own_progress']} own notifications, "
                     f"{probe['wrong']} wrong beside {probe['echoes']} echoes")  # fmt: skip
    return head + " " + "; ".join(parts)


if __name__ == "__main__":
    import uvloop

    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        uvloop.run(worker_main(json.loads(sys.argv[2])))
    else:
        sys.exit(uvloop.run(main()))
