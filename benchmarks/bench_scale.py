"""Scale benchmark: thousands of concurrent WebSocket sessions on a shared upstream.

For each scenario (sessions x pool size) one mcproxy process runs with ``upstream.mode =
"shared"`` in front of an upstream server, and this process:

1. opens the sessions (WebSocket upgrade, ``initialize``, ``notifications/initialized``),
   a batch at a time, and counts those held;
2. measures the proxy's memory: VmRSS from /proc/<pid>/status after a warm-up of a few
   sessions, and again with every session open and idle; the difference per session;
3. drives load for a fixed time: every session calls ``echo`` in a closed loop (one call in
   flight per session), each with a unique payload checked against its answer (a payload
   that comes back to the wrong session or request counts as a mis-route); aggregate
   calls/s, p50/p99 round trip, errors, and the CPU time each process used per call;
4. checks that every session is still open, then stops the proxy.

The baseline, in the same run: the same number of upstream processes driven directly over
stdio (pipelined, ``--window`` requests in flight per process) for the same time, in rounds
that alternate with the load through the proxy (``--rounds``; the proxy's sessions stay open
and idle meanwhile), because on a shared VM a process's speed drifts by tens of percent over
minutes. ``--max-in-flight`` sets the proxy's ``upstream.max_in_flight``. The children driven
directly run under the same scheduling policy as the proxy's (``upstream.batch_scheduling``,
SCHED_BATCH by default; ``--no-batch-scheduling`` turns it off for both).

Upstreams: ``fixture`` (the default) is a server written with the official ``mcp`` SDK, the
kind of Python server a shared pool exists for (about 0.35-0.45 ms of CPU per call);
``demo`` is the bundled stdlib server, which answers in about 7 µs of CPU and so measures
the proxy's own ceiling rather than a realistic ratio.

The load generator is a small WebSocket client on raw asyncio transports (RFC 6455 frames
with a zero masking key), so that it costs the machine far less than the proxy it measures.
Everything runs on loopback and stops by itself; the file-descriptor limit is raised to the
hard limit (both this process and the proxy need one per session).

    python benchmarks/bench_scale.py [--sessions 1000 10000] [--pool 1 2] [--duration 10]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
from bench_ws import INIT as INIT_MESSAGE
from bench_ws import _listening_port, pct

ROOT = Path(__file__).resolve().parent.parent
UPSTREAMS = {
    "demo": (sys.executable, "-m", "mcproxy.examples.demo_server"),
    "fixture": (sys.executable, str(ROOT / "tests" / "fixtures" / "server.py")),
}
CONNECT_BATCH = 100  # concurrent connection attempts (the listen backlog is 128)
INIT = msgspec.json.encode(INIT_MESSAGE)
INITIALIZED = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'
CALL = b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"echo","arguments":{"text":"%s"}}}'  # noqa: E501


class Reply(msgspec.Struct):
    id: int | str | None = None
    result: Any = None
    error: Any = None


_reply = msgspec.json.Decoder(Reply)


# --- a lean WebSocket client -------------------------------------------------------------


class WsClient(asyncio.Protocol):
    """One client connection: HTTP upgrade, then text frames; answers pings, one waiter."""

    def __init__(self, host: str, port: int, path: str = "/mcp") -> None:
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
            "Sec-WebSocket-Protocol: mcp\r\n\r\n"
        ).encode()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiter: asyncio.Future[bytes] | None = None
        self.deadline = 0.0  # of the call in flight (see ``begin``)
        self.closed = False
        self.seq = 0  # the last request id used: ids are never reused within a session

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for future in (self.ready, self.waiter):
            if future is not None and not future.done():
                future.set_exception(ConnectionError("connection lost"))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end])
            del buf[: end + 4]
            if not head.startswith(b"HTTP/1.1 101"):
                self.ready.set_exception(ConnectionError(head.split(b"\r\n")[0].decode()))
                return
            self.upgraded = True
            self.ready.set_result(None)
        while len(buf) >= 2:
            opcode, size, at = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if size == 126:
                if len(buf) < 4:
                    return
                size, at = int.from_bytes(buf[2:4], "big"), 4
            elif size == 127:
                if len(buf) < 10:
                    return
                size, at = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < at + size:
                return
            payload = bytes(buf[at : at + size])
            del buf[: at + size]
            if opcode == 0x1:
                self.text(payload)
            elif opcode == 0x9:
                self._frame(0xA, payload)  # pong
            elif opcode == 0x8:
                self.closed = True

    def text(self, payload: bytes) -> None:
        """A text frame: the answer the waiter expects (bench_peers checks each one instead)."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(payload)

    def _frame(self, opcode: int, data: bytes) -> None:
        size = len(data)
        if size < 126:
            head = bytes((0x80 | opcode, 0x80 | size))
        elif size < 65536:
            head = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
        assert self.transport is not None
        self.transport.write(head + b"\0\0\0\0" + data)  # a zero key: masking is a no-op

    def send(self, data: bytes) -> None:
        self._frame(0x1, data)

    async def call(self, data: bytes, timeout: float) -> bytes:
        self.waiter = asyncio.get_running_loop().create_future()
        self.send(data)
        return await asyncio.wait_for(self.waiter, timeout)

    def begin(self, data: bytes, deadline: float) -> asyncio.Future[bytes]:
        """Send a call whose answer ``expire`` fails after ``deadline`` (loop time): the load
        loop does without ``wait_for``, a timer and a task hop per call, which made this
        client cost twice what the direct one does per call."""
        self.waiter = waiter = asyncio.get_running_loop().create_future()
        self.deadline = deadline
        self.send(data)
        return waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_session(port: int, timeout: float) -> WsClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: WsClient("127.0.0.1", port), "127.0.0.1", port)
    await asyncio.wait_for(client.ready, timeout)
    reply = _reply.decode(await client.call(INIT, timeout))
    if reply.result is None:
        raise ConnectionError(f"initialize failed: {reply.error}")
    client.send(INITIALIZED)
    return client


# --- processes ---------------------------------------------------------------------------


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


class Proxy:
    def __init__(
        self,
        tmp: Path,
        pool: int,
        upstream: tuple[str, ...],
        max_in_flight: int | None,
        batch_scheduling: bool,
    ) -> None:
        self.config = tmp / f"scale-{pool}.toml"
        limit = "" if max_in_flight is None else f"max_in_flight = {max_in_flight}\n"
        self.config.write_text(
            "[upstream]\n"
            f'target = "stdio:{" ".join(upstream)}"\nmode = "shared"\npool_size = {pool}\n'
            f"batch_scheduling = {str(batch_scheduling).lower()}\n"
            + limit
            + "[limits]\n"  # one address opens every session: lift the per-address rates
            "connections_per_s = 1000000.0\nconnection_burst = 1000000\n"
        )
        self.db = tmp / f"scale-{pool}.db"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mcproxy", "--config", str(self.config), "--listen",
             "127.0.0.1:0", "--db", str(self.db), "--log-format", "json",
             "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.port = _listening_port(self.proc.pid)
            if self.port:
                return
            time.sleep(0.01)
        raise RuntimeError("proxy did not start")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def commits(port: int) -> int:
    """Group-commit transactions so far (the proxy's /metrics)."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("mcproxy_store_commits_total "):
                return int(float(line.split()[1]))
    return 0


# --- load --------------------------------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.misrouted = 0


async def expire(clients: list[WsClient], every: float = 1.0) -> None:
    """Fail calls past their deadline: one timer for every session, not one per call."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(every)
        now = loop.time()
        for client in clients:
            waiter = client.waiter
            if waiter is not None and not waiter.done() and client.deadline < now:
                waiter.set_exception(TimeoutError())


async def drive(client: WsClient, tag: int, until: float, tally: Tally, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < until and not client.closed:
        client.seq += 1
        seq = client.seq
        text = f"s{tag}-{seq}"
        t0 = time.perf_counter()
        try:
            data = CALL % (seq, text.encode())
            reply = _reply.decode(await client.begin(data, loop.time() + timeout))
        except (TimeoutError, ConnectionError, msgspec.DecodeError):
            tally.errors += 1
            continue
        tally.latencies.append(time.perf_counter() - t0)
        if reply.error is not None or reply.result is None:
            tally.errors += 1
        elif reply.id != seq or reply.result["content"][0]["text"] != text:
            tally.misrouted += 1


async def scenario(
    tmp: Path,
    upstream: tuple[str, ...],
    sessions: int,
    pool: int,
    duration: float,
    timeout: float,
    max_in_flight: int | None,
    rounds: int,
    window: int,
    batch_scheduling: bool,
) -> tuple[float, float]:
    """Returns the proxy's calls/s and the direct baseline's, measured in alternating rounds."""
    print(f"\n{sessions} sessions, shared pool of {pool}:")
    proxy = Proxy(tmp, pool, upstream, max_in_flight, batch_scheduling)
    proxy.start()
    try:
        warm = [await open_session(proxy.port, timeout) for _ in range(20)]
        for client in warm:
            await client.call(CALL % (1, b"warm"), timeout)
        await asyncio.sleep(1.0)
        before = rss(proxy.pid)
        t0 = time.perf_counter()
        clients: list[WsClient] = []
        failures: list[str] = []
        for start in range(0, sessions, CONNECT_BATCH):
            count = min(CONNECT_BATCH, sessions - start)
            results = await asyncio.gather(
                *(open_session(proxy.port, timeout) for _ in range(count)), return_exceptions=True
            )
            for result in results:
                if isinstance(result, WsClient):
                    clients.append(result)
                else:
                    failures.append(repr(result))
        opened_s = time.perf_counter() - t0
        await asyncio.sleep(2.0)  # let the store commit and the proxy settle
        after = rss(proxy.pid)
        per_session = (after - before) / max(len(clients), 1)
        print(f"  sessions held        {len(clients):9d} of {sessions}   opened in {opened_s:.1f} s"
              f" ({len(clients) / opened_s:.0f}/s); failures {len(failures)}"
              + (f" e.g. {failures[0]}" if failures else ""))  # fmt: skip
        print(f"  proxy RSS            {before / 2**20:9.1f} MiB -> {after / 2**20:.1f} MiB"
              f"   = {per_session / 1024:.1f} KiB per idle session")  # fmt: skip

        pids = {"proxy": [proxy.pid], "upstream": children(proxy.pid), "client": [os.getpid()]}
        commits0 = await asyncio.to_thread(commits, proxy.port)
        tally = Tally()
        loop = asyncio.get_running_loop()
        through, baseline = Run(), Run()
        # Rounds alternate between the proxy (its sessions stay open) and the same number of
        # children driven directly: on a shared VM a process's speed drifts by tens of
        # percent over minutes, more than the difference being measured.
        for _ in range(rounds):
            await direct(upstream, pool, duration / rounds, window, baseline, batch_scheduling)
            cpu0 = {name: sum(cpu_s(p) for p in group) for name, group in pids.items()}
            before = len(tally.latencies)
            t0 = time.perf_counter()
            until = loop.time() + duration / rounds
            expiry = asyncio.create_task(expire(clients))
            await asyncio.gather(
                *(drive(c, i, until, tally, timeout) for i, c in enumerate(clients)),
            )
            expiry.cancel()
            wall = time.perf_counter() - t0
            used = {n: sum(cpu_s(p) for p in group) - cpu0[n] for n, group in pids.items()}
            through.add(len(tally.latencies) - before, wall, used, [])
        through.latencies = tally.latencies
        transactions = await asyncio.to_thread(commits, proxy.port) - commits0
        calls = through.calls
        print(f"  direct stdio, {pool} process(es), {window} calls in flight each, "
              f"{rounds} rounds:")  # fmt: skip
        baseline.print()
        print(f"  through the proxy, {rounds} rounds between those:")
        through.print()
        print(f"  errors               {tally.errors:9d}   mis-routed {tally.misrouted}")
        # Each call is two statements: its request's row, and its answer's (which retires the
        # request's row inside SQLite).
        batch = 2 * calls / max(transactions, 1)
        print(f"  event log            {transactions} commits, {batch:.0f} writes per commit"
              " (group commit; durability normal: no fsync per commit)")  # fmt: skip
        held = sum(1 for c in clients if not c.closed)
        print(f"  still open after     {held:9d}   peak RSS {rss(proxy.pid) / 2**20:.1f} MiB")
        for client in [*warm, *clients]:
            client.close()
        return through.rate, baseline.rate
    finally:
        proxy.stop()


# --- baseline: the same upstream processes over stdio ------------------------------------


class Run:
    """Calls answered, wall time and CPU per process group, summed over rounds."""

    def __init__(self) -> None:
        self.calls = 0
        self.wall = 0.0
        self.cpu: dict[str, float] = {}
        self.latencies: list[float] = []

    def add(self, calls: int, wall: float, cpu: dict[str, float], latencies: list[float]) -> None:
        self.calls += calls
        self.wall += wall
        for name, used in cpu.items():
            self.cpu[name] = self.cpu.get(name, 0.0) + used
        self.latencies += latencies

    @property
    def rate(self) -> float:
        return self.calls / max(self.wall, 1e-9)

    def print(self) -> None:
        ms = sorted(s * 1000 for s in self.latencies) or [0.0]
        print(f"  calls                {self.calls:9d} in {self.wall:.1f} s = {self.rate:9.0f} "
              f"calls/s   p50 {pct(ms, 50):.2f} ms  p99 {pct(ms, 99):.2f} ms")  # fmt: skip
        print(f"  cpu per call         {_cpu_line(self.cpu, self.calls, self.wall)}")


def _batch_policy() -> None:  # in the child, before exec: as upstream.batch_scheduling does
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


async def direct(
    upstream: tuple[str, ...],
    pool: int,
    duration: float,
    window: int,
    run: Run,
    batch_scheduling: bool,
) -> None:
    """``pool`` servers, each driven over its own pipes with ``window`` calls in flight."""
    procs = [
        await asyncio.create_subprocess_exec(
            *upstream,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            cwd=ROOT,
            preexec_fn=_batch_policy if batch_scheduling else None,
        )
        for _ in range(pool)
    ]
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    used: dict[int, float] = {}

    async def one(proc: asyncio.subprocess.Process, until: float) -> int:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(INIT + b"\n")
        await proc.stdout.readline()
        proc.stdin.write(INITIALIZED + b"\n")
        sent: dict[int, float] = {}
        seq = 0
        done = 0

        def send() -> None:
            nonlocal seq
            seq += 1
            sent[seq] = time.perf_counter()
            proc.stdin.write(CALL % (seq, b"direct") + b"\n")  # type: ignore[union-attr]

        for _ in range(window):
            send()
        while sent:
            line = await proc.stdout.readline()
            reply = _reply.decode(line)
            assert isinstance(reply.id, int)
            latencies.append(time.perf_counter() - sent.pop(reply.id))
            done += 1
            if loop.time() < until:
                send()
        used[proc.pid] = cpu_s(proc.pid)  # before it exits and leaves /proc
        proc.stdin.close()
        await proc.wait()
        return done

    upstream0 = sum(cpu_s(p.pid) for p in procs)
    client0 = cpu_s(os.getpid())
    t0 = time.perf_counter()
    until = loop.time() + duration
    total = sum(await asyncio.gather(*(one(p, until) for p in procs)))
    wall = time.perf_counter() - t0
    cpu = {"upstream": sum(used.values()) - upstream0, "client": cpu_s(os.getpid()) - client0}
    run.add(total, wall, cpu, latencies)


def _cpu_line(cpu: dict[str, float], calls: int, wall: float) -> str:
    return "  ".join(
        f"{name} {1e6 * used / max(calls, 1):.0f} µs ({100 * used / wall:.0f}% of a cpu)"
        for name, used in cpu.items()
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--pool", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--duration", type=float, default=12.0,
        help="seconds of load through the proxy (and as many driven directly)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two")
    parser.add_argument("--window", type=int, default=64, help="direct: calls in flight")
    parser.add_argument("--timeout", type=float, default=30.0, help="per call, seconds")
    parser.add_argument(
        "--max-in-flight", type=int, default=None,
        help="the proxy's upstream.max_in_flight (default: the proxy's own default)",
    )  # fmt: skip
    parser.add_argument(
        "--no-batch-scheduling", dest="batch_scheduling", action="store_false",
        help="children under the default policy (upstream.batch_scheduling = false), both ways",
    )  # fmt: skip
    parser.add_argument(
        "--upstream", choices=sorted(UPSTREAMS), default="fixture",
        help="fixture: the mcp SDK test server; demo: the bundled stdlib server (very fast)",
    )  # fmt: skip
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max(args.sessions) + 1000  # per process: a socket per session, and some
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the proxy inherits it
    upstream = UPSTREAMS[args.upstream]
    short = "" if hard >= need else f" (below the {need} needed)"
    print(f"mcproxy scale benchmark on {platform.node()} ({os.cpu_count()} cpus, Python "
          f"{platform.python_version()}), upstream {args.upstream}; open files limit "
          f"{soft} -> {hard}{short}")  # fmt: skip
    results: list[tuple[int, int, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for sessions in args.sessions:
            for pool in args.pool:
                rate, baseline = await scenario(
                    Path(tmp),
                    upstream,
                    sessions,
                    pool,
                    args.duration,
                    args.timeout,
                    args.max_in_flight,
                    args.rounds,
                    args.window,
                    args.batch_scheduling,
                )
                results.append((sessions, pool, rate, baseline))
    print("\nsummary: aggregate calls/s through the proxy vs the same upstreams driven directly")
    print("(in alternating rounds of the same scenario)")
    for sessions, pool, rate, baseline in results:
        print(
            f"  {sessions:6d} sessions, pool {pool}: {rate:8.0f} calls/s = "
            f"{100 * rate / baseline:5.1f}% of direct ({baseline:.0f} calls/s)"
        )


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
