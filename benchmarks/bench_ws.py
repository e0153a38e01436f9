"""WebSocket front benchmarks, measured in one run against a baseline from the same run.

1. tools/call round trip: direct over stdio (the baseline) vs through mcproxy; p50, p99, ratio.
2. reconnect-and-resume: drop a connection, reconnect with the session id and cursor, time to
   the first replayed message.
3. recovery after SIGKILL: kill the proxy, start it on the same database, time until a client
   has reconnected and received its first replayed message.

The upstream is a real MCP server process: the bundled stdlib demo server by default (a fast
server, so the proxy's overhead shows plainly), or the SDK fixture with ``--upstream fixture``.
Everything runs on loopback and stops by itself.

    python benchmarks/bench_ws.py [--calls 2000] [--resumes 200] [--restarts 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
DEMO = f"{sys.executable} -m mcproxy.examples.demo_server"
FIXTURE = f"{sys.executable} {ROOT / 'tests' / 'fixtures' / 'server.py'}"
# A stop waits this long for the daemon's drain (calls a benchmark left running) before the
# second SIGTERM that skips it.
DRAIN_PATIENCE_S = 3.0


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM; a second one if the process is still draining (calls a benchmark left
    running, e.g. a cancelled producer's, are not worth server.drain_timeout_s)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(DRAIN_PATIENCE_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the second signal skips the drain
        proc.wait(30)


INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "bench", "version": "1"},
    },
}


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def report(name: str, samples_s: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    row = {"p50_ms": statistics.median(ms), "p99_ms": pct(ms, 99), "n": len(ms)}
    print(f"  {name:<34} p50 {row['p50_ms']:8.3f} ms   p99 {row['p99_ms']:8.3f} ms   n={len(ms)}")
    return row


def echo_call(i: int) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": i,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": f"ping {i}"}},
    }


async def direct_stdio(upstream: str, calls: int) -> list[float]:
    proc = await asyncio.create_subprocess_exec(
        *shlex.split(upstream),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdin and proc.stdout

    async def rpc(message: dict[str, Any]) -> None:
        proc.stdin.write(json.dumps(message).encode() + b"\n")  # type: ignore[union-attr]
        while True:
            reply = json.loads(await proc.stdout.readline())  # type: ignore[union-attr]
            if reply.get("id") == message.get("id"):
                return

    await rpc(INIT)
    proc.stdin.write(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
    samples = []
    for i in range(1, calls + 1):
        t0 = time.perf_counter()
        await rpc(echo_call(i))
        samples.append(time.perf_counter() - t0)
    proc.stdin.close()
    await proc.wait()
    return samples


class Proxy:
    def __init__(self, db: Path, upstream: str, *extra: str) -> None:
        self.db, self.upstream, self.extra = db, upstream, extra
        self.stderr: Any = subprocess.PIPE  # a file for long runs: a full pipe would block it
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mcproxy", "--listen", "127.0.0.1:0", "--db", str(self.db),
             "--upstream", f"stdio:{self.upstream}", "--log-format", "json",
             "--log-level", "warning", *self.extra],
            stderr=self.stderr, stdout=subprocess.DEVNULL, cwd=ROOT,
            env={**os.environ, "FIXTURE_COUNTER_DIR": str(self.db.parent)},
        )  # fmt: skip
        self.wait_listening()

    def wait_listening(self) -> None:
        """Warning-level logs hide the listening line; ask the kernel for the port."""
        assert self.proc is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            port = _listening_port(self.proc.pid)
            if port:
                self.port = port
                return
            time.sleep(0.005)
        raise RuntimeError("proxy did not start")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            terminate(self.proc)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"


def _listening_port(pid: int) -> int:
    """The TCP port a process listens on, from /proc (Linux)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return 0
    for line in lines:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN
            return int(fields[1].split(":")[1], 16)
    return 0


async def through_proxy(proxy: Proxy, calls: int) -> list[float]:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(proxy.url, protocols=("mcp",)) as ws,
    ):
        await ws.send_json(INIT)
        await ws.receive_json()
        await ws.send_json({"jsonrpc": "2.0", "method": "notifications/initialized"})
        await ws.send_json({"jsonrpc": "2.0", "id": "tools", "method": "tools/list"})
        while (await ws.receive_json()).get("id") != "tools":
            pass  # like any client: list first (the proxy learns which tools are read-only)
        samples = []
        for i in range(1, calls + 1):
            t0 = time.perf_counter()
            await ws.send_str(json.dumps(echo_call(i)))
            while (await ws.receive_json()).get("id") != i:
                pass
            samples.append(time.perf_counter() - t0)
        return samples


async def new_session(http: aiohttp.ClientSession, url: str) -> tuple[str, int]:
    async with http.ws_connect(url, protocols=("mcp",)) as ws:
        await ws.send_json(INIT)
        init = await ws.receive_json()
        await ws.send_json({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return init["result"]["mcpSessionId"], 1


async def resume_times(proxy: Proxy, resumes: int) -> list[float]:
    samples = []
    async with aiohttp.ClientSession() as http:
        session_id, cursor = await new_session(http, proxy.url)
        for i in range(resumes):
            ws = await http.ws_connect(
                proxy.url, params={"mcp_session_id": session_id, "mcp_last_lsn": str(cursor)}
            )
            await ws.send_str(json.dumps(echo_call(1000 + i)))
            ws._response.connection.transport.abort()  # type: ignore[union-attr]  # drop
            await asyncio.sleep(0.02)  # the answer lands in the log while nobody listens
            t0 = time.perf_counter()
            ws = await http.ws_connect(
                proxy.url, params={"mcp_session_id": session_id, "mcp_last_lsn": str(cursor)}
            )
            first = await ws.receive_json()
            samples.append(time.perf_counter() - t0)
            cursor = first["result"]["_meta"]["io.mcproxy/lsn"]
            await ws.close()
    return samples


async def restart_times(db: Path, upstream: str, restarts: int) -> list[float]:
    samples = []
    proxy = Proxy(db, upstream)
    proxy.start()
    async with aiohttp.ClientSession() as http:
        session_id, cursor = await new_session(http, proxy.url)
        for i in range(restarts):
            ws = await http.ws_connect(proxy.url, params={"mcp_session_id": session_id})
            await ws.send_str(json.dumps(echo_call(5000 + i)))
            reply = await ws.receive_json()
            await ws.close()
            t0 = time.perf_counter()
            proxy.kill()
            proxy.start()
            ws = await http.ws_connect(
                proxy.url, params={"mcp_session_id": session_id, "mcp_last_lsn": str(cursor)}
            )
            first = await ws.receive_json()
            samples.append(time.perf_counter() - t0)
            assert first["result"]["_meta"]["io.mcproxy/lsn"] == cursor + 1
            cursor = reply["result"]["_meta"]["io.mcproxy/lsn"]
            await ws.close()
    proxy.stop()
    return samples


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--resumes", type=int, default=200)
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument("--upstream", choices=["demo", "fixture"], default="demo")
    args = parser.parse_args()
    upstream = DEMO if args.upstream == "demo" else FIXTURE
    print(f"mcproxy WebSocket benchmarks on {platform.node()} ({os.cpu_count()} cpus, "
          f"Python {platform.python_version()}), upstream: {args.upstream}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        warm = max(50, args.calls // 10)
        await direct_stdio(upstream, warm)
        direct = report("tools/call direct stdio", (await direct_stdio(upstream, args.calls)))
        proxy = Proxy(Path(tmp) / "rt.db", upstream)
        proxy.start()
        try:
            await through_proxy(proxy, warm)
            proxied = report("tools/call through mcproxy", await through_proxy(proxy, args.calls))
            resume = report(
                "reconnect+resume to 1st replayed", await resume_times(proxy, args.resumes)
            )
        finally:
            proxy.stop()
        restart = report("SIGKILL+restart to 1st replayed", await restart_times(
            Path(tmp) / "restart.db", upstream, args.restarts))  # fmt: skip
    ratio = proxied["p50_ms"] / direct["p50_ms"]
    added = proxied["p50_ms"] - direct["p50_ms"]
    print(f"  round trip p50 ratio proxy/direct: {ratio:.2f}x (+{added:.3f} ms per call)")
    print(f"  targets: resume p99 < 10 ms -> {resume['p99_ms']:.2f} ms; "
          f"added p50 < 30% of direct -> {100 * (ratio - 1):.0f}%")  # fmt: skip
    del restart


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
