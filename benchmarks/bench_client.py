"""MCPClient reconnect benchmarks: how long an application waits, through the real daemon,
from a failure to the first server message it is handed after it.

1. drop: a TCP relay between client and proxy swallows the next message the proxy sends (a
   progress notification of a long tool call), then aborts both sides (no close frame);
   measured from the cut to that message reaching the application (resumed, replayed).
2. proxy restart: the same with a SIGKILL of the proxy, started again on the same port and
   database; its time to "daemon.listening" is shown too, so the client's part shows apart.

For context, a plain WebSocket tools/call round trip through the relay, same run.

    python benchmarks/bench_client.py [--drops 50] [--restarts 10] [--upstream demo|fixture]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import structlog
from bench_ws import DEMO, FIXTURE, ROOT, Proxy, report, through_proxy

from mcproxy.client.connection import ReconnectOptions
from mcproxy.client.mcp import MCPClient, MCPError

# Cuts come one message apart (1 s with the demo, 0.5 s with the fixture): under the default
# min_uptime_s (5 s) they would count as retries of one outage, and back off from the third.
MIN_UPTIME_S = 0.25
OPTIONS = ReconnectOptions(min_uptime_s=MIN_UPTIME_S)
PRODUCERS = {"demo": ("countdown", {"n": 60}), "fixture": ("slow", {"steps": 120, "delay": 0.5})}
WAITS: list[float] = []  # wait_s of each "client.reconnecting" event: one per attempt


def capture(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    if event.get("event") == "client.reconnecting":
        WAITS.append(float(event["wait_s"]))
    raise structlog.DropEvent


class Relay:
    """TCP relay client <-> proxy. While ``hold`` is set it swallows what the proxy sends and
    sets ``held`` at a text frame (a message was due); ``cut`` aborts every link."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.port = target_port, 0
        self.hold, self.held = False, asyncio.Event()
        self._links: set[asyncio.StreamWriter] = set()
        self._accepts: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/mcp"

    def cut(self, close: bool = False) -> None:
        self.hold = False
        for writer in self._links:
            writer.transport.abort()
        self._links.clear()
        if close and self._server is not None:
            self._server.close()

    async def aclose(self) -> None:
        """Cut everything and wait for the links to wind down: one still piping when the loop
        ends is cancelled, and Python 3.11's stream callback prints that as a traceback (the
        client's close handshake leaves a link a few iterations from its end)."""
        self.cut(close=True)
        await asyncio.gather(*self._accepts, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._accepts.add(task)
        task.add_done_callback(self._accepts.discard)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._links.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, down: bool) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    if down and self.hold:
                        if data[0] == 0x81:  # FIN + text (the proxy does not compress)
                            self.held.set()
                        continue
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()
            self._links.discard(dst)

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))


class Daemon(Proxy):
    """bench_ws's Proxy on a fixed port, at info level, noting when it logs it listens."""

    def __init__(self, db: Path, upstream: str) -> None:
        super().__init__(db, upstream)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.ready, self.listening_at = threading.Event(), list[float]()

    def restart(self) -> None:
        self.kill()
        self.start()

    def start(self) -> None:
        """Start without waiting; ``ready`` is set at the "daemon.listening" line."""
        self.ready = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mcproxy", "--listen", f"127.0.0.1:{self.port}",
             "--db", str(self.db), "--upstream", f"stdio:{self.upstream}",
             "--log-format", "json", "--log-level", "info"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=ROOT,
            env={**os.environ, "FIXTURE_COUNTER_DIR": str(self.db.parent)},
        )  # fmt: skip
        threading.Thread(target=self._drain, args=(self.proc, self.ready), daemon=True).start()

    def _drain(self, proc: subprocess.Popen[bytes], ready: threading.Event) -> None:
        for line in proc.stderr or ():
            if b'"daemon.listening"' in line:
                self.listening_at.append(time.perf_counter())
                ready.set()


class Deliveries:
    """What the application is handed (progress callbacks, call results), timed."""

    def __init__(self) -> None:
        self.at, self.event = 0.0, asyncio.Event()

    def mark(self, *_: Any) -> None:
        self.at = time.perf_counter()
        self.event.set()


async def produce(mcp: MCPClient, tool: str, arguments: dict[str, Any], seen: Deliveries) -> None:
    while True:
        with contextlib.suppress(MCPError):  # a restart loses a running call: an error answer
            await mcp.call_tool(tool, arguments, progress=seen.mark, timeout_s=3600)
        seen.mark()


async def failures(
    relay: Relay, seen: Deliveries, n: int, daemon: Daemon | None = None
) -> tuple[list[float], list[float], list[float]]:
    """Cut (or restart the proxy) ``n`` times while a message is due. Returns the times to
    the first delivered message, the proxy's times to listening, and the client's waits."""
    samples, listening, waits = [], [], []
    for _ in range(n):
        await asyncio.sleep(MIN_UPTIME_S)  # a healthy connection: the next retry is immediate
        relay.held.clear()
        relay.hold = True
        await relay.held.wait()
        seen.event.clear()
        before, t0 = len(WAITS), time.perf_counter()
        relay.hold = False  # no await until the cut or the kill is done: nothing slips by
        relay.cut() if daemon is None else daemon.restart()
        await asyncio.wait_for(seen.event.wait(), 60)
        samples.append(seen.at - t0)
        waits += WAITS[before:]
        if daemon is not None:
            await asyncio.to_thread(daemon.ready.wait, 30)
            listening.append(daemon.listening_at[-1] - t0)
    return samples, listening, waits


def attempts(name: str, waits: list[float]) -> None:
    slept = [w for w in waits if w > 0]
    print(f"  {name:<34} {len(waits)} reconnect attempts, {len(slept)} after a backoff wait"
          + (f" ({', '.join(f'{w * 1000:.0f}' for w in slept)} ms)" if slept else ""))  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--drops", type=int, default=50)
    parser.add_argument("--restarts", type=int, default=10)
    parser.add_argument("--upstream", choices=["demo", "fixture"], default="demo")
    args = parser.parse_args()
    structlog.configure(processors=[capture])
    upstream = DEMO if args.upstream == "demo" else FIXTURE
    tool, arguments = PRODUCERS[args.upstream]
    print(f"mcproxy MCPClient reconnect benchmarks on {platform.node()} ({os.cpu_count()} cpus, "
          f"Python {platform.python_version()}), upstream: {args.upstream} ({tool}); "
          f"ReconnectOptions defaults but min_uptime_s={MIN_UPTIME_S}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(Path(tmp) / "client.db", upstream)
        daemon.start()
        await asyncio.to_thread(daemon.ready.wait, 30)
        relay = await Relay(daemon.port).start()
        try:
            await through_proxy(relay, 50)  # type: ignore[arg-type]  # it only needs .url
            report("plain WebSocket tools/call, relay", await through_proxy(relay, 500))  # type: ignore[arg-type]
            seen = Deliveries()
            async with MCPClient(relay.url, options=OPTIONS) as mcp:
                await mcp.list_tools()
                producer = asyncio.create_task(produce(mcp, tool, arguments, seen))
                drops, _, drop_waits = await failures(relay, seen, args.drops)
                report("drop -> 1st message to the app", drops)
                restarts, up, restart_waits = await failures(relay, seen, args.restarts, daemon)
                report("SIGKILL -> daemon.listening", up)
                report("SIGKILL -> 1st message to the app", restarts)
                client = [r - u for r, u in zip(restarts, up, strict=True)]
                report("daemon.listening -> 1st message", client)
                attempts("drops:", drop_waits)
                attempts("restarts:", restart_waits)
                producer.cancel()
        finally:
            await relay.aclose()
            daemon.stop()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
